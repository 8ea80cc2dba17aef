"""Plugins stand on the public API only (tops_job.__all__), and the one private pluggy call
the manager makes keeps its contract."""

from __future__ import annotations

import ast
import inspect

import pluggy
import pytest

import tops_job
from tests.support import REPO_ROOT
from tops_job.config import load_config
from tops_job.plugins.manager import PluginManager, get_plugin_manager

AWS_PLUGIN = REPO_ROOT / "plugins" / "tops-job-aws" / "tops_job_aws"


@pytest.mark.parametrize("name", sorted(tops_job.__all__))
def test_every_public_name_resolves(name):
    assert getattr(tops_job, name) is not None


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        tops_job.nope  # noqa: B018


def test_the_aws_plugin_imports_only_the_public_api():
    private = []
    for path in sorted(AWS_PLUGIN.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tops_job.") \
                    and not node.module.startswith("tops_job_aws"):
                private.append(f"{path.name}:{node.lineno} from {node.module}")
            if isinstance(node, ast.ImportFrom) and node.module == "tops_job":
                private += [f"{path.name}:{node.lineno} {alias.name}" for alias in node.names
                            if alias.name not in tops_job.__all__]
            if isinstance(node, ast.Import):
                private += [f"{path.name}:{node.lineno} import {alias.name}" for alias in node.names
                            if alias.name.startswith("tops_job.")]
    assert private == []


def test_pluggy_hookexec_contract(tmp_path):
    """The manager calls one implementation at a time through `_hookexec(name, impls,
    kwargs, firstresult)` (plugins/manager.py `_call_one`); pluggy is pinned below 2, and
    this fails first if a release changes that private call."""
    assert pluggy.__version__.split(".")[0] == "1"
    parameters = list(inspect.signature(pluggy.PluginManager._hookexec).parameters)
    assert parameters == ["self", "hook_name", "methods", "kwargs", "firstresult"]
    pm = get_plugin_manager(load_entry_points=False)
    assert isinstance(pm, PluginManager)
    (impl,) = pm.hook.tops_job_profile_store.get_hookimpls()
    config = load_config({}, environ={"TOPS_JOB_CACHE_DIR": str(tmp_path)}, need_key=False)
    store = pm._hookexec("tops_job_profile_store", [impl], {"config": config}, True)
    assert store is not None and str(store.path_for("k")).startswith(str(tmp_path))
