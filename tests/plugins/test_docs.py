"""Every hook in hookspecs.py is documented in docs/plugins.md and has a test (a function
named `test_hook_<hook>…` in tests/plugins), like datasette's test_docs.py."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

from tops_job import hookspecs

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "plugins.md").read_text()
HOOKS = {name: function for name, function in inspect.getmembers(hookspecs, inspect.isfunction)
         if name.startswith("tops_job_")}


def doc_section(name: str) -> str:
    match = re.search(rf"^### {name}\(.*?(?=^#{{2,3}} |\Z)", DOC, re.S | re.M)
    return match.group(0) if match else ""


def test_hookspecs_are_found():
    assert len(HOOKS) >= 6 and all(function.__doc__ for function in HOOKS.values())


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_hook_is_documented(name):
    arguments = list(inspect.signature(HOOKS[name]).parameters)
    section = doc_section(name)
    assert section, f"docs/plugins.md has no '### {name}(...)' section"
    assert section.splitlines()[0] == f"### {name}({', '.join(arguments)})", "heading must match the signature"
    for argument in arguments:
        assert f"- `{argument}`" in section, f"argument {argument} of {name} is not described"
    assert "Called " in section, f"{name}: say when it is called"
    example = re.search(r"```python\n(.*?)```", section, re.S)
    assert example and "@hookimpl" in example.group(1) and f"def {name}(" in example.group(1)


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_hook_has_a_test(name):
    tested = set()
    for path in Path(__file__).parent.glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_hook_"):
                tested.add(node.name)
    assert any(test == f"test_hook_{name}" or test.startswith(f"test_hook_{name}_") for test in tested), \
        f"no test named test_hook_{name}… in tests/plugins"


def test_documented_hooks_exist():
    documented = set(re.findall(r"^### (tops_job_\w+)\(", DOC, re.M))
    assert documented == set(HOOKS), f"documented but not in hookspecs.py: {documented - set(HOOKS)}"
