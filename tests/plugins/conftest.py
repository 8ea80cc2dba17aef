"""Fixtures for plugin tests: a temporary plugin registered for one test and gone after."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support import invoke as support_invoke
from tops_job.cli import TopsJobGroup, cli
from tops_job.plugins import manager as plugins


@pytest.fixture
def register_plugin(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Any, str], None]]:
    """`register_plugin(obj, name)`: every plugin manager built during this test (the CLI
    builds its own) gets `obj` registered under `name`, after the built-ins and entry
    points. Commands a plugin adds to the CLI are removed again after the test."""
    extra: list[tuple[Any, str]] = []
    real_factory = plugins.get_plugin_manager

    def factory(*args: Any, **kwargs: Any) -> plugins.PluginManager:
        pm = real_factory(*args, **kwargs)
        for plugin, name in extra:
            pm.register(plugin, name=name)
            pm.load_report.loaded.append(name)
            pm.load_report.versions[name] = ("test", "0")
        return pm

    monkeypatch.setattr(plugins, "get_plugin_manager", factory)
    monkeypatch.setattr(TopsJobGroup, "_plugins_loaded", False)
    commands = dict(cli.commands)
    yield lambda plugin, name: extra.append((plugin, name))
    cli.commands.clear()
    cli.commands.update(commands)
    TopsJobGroup._plugins_loaded = False


@pytest.fixture
def invoke() -> Callable[..., Any]:
    return support_invoke
