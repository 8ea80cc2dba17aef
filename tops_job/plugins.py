"""The plugin manager: built-ins first, then entry points in the group `tops_job`.

TOPS_JOB_DISABLE_PLUGINS=name,… blocks plugins by name (entry-point or module name);
TOPS_JOB_TRACE_PLUGINS=1 logs every hook call.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Mapping

import pluggy

from . import hookspecs

log = logging.getLogger("tops_job.plugins")

DEFAULT_PLUGINS = (
    "tops_job.builtins.local_signer",
    "tops_job.builtins.ledger_submitter",
    "tops_job.builtins.profile_store",
)
ENTRY_POINT_GROUP = "tops_job"


@dataclass
class PluginLoad:
    """What loading found: loaded names, blocked names, and plugins that raised."""

    loaded: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def _blocked(environ: Mapping[str, str]) -> set[str]:
    return {name.strip() for name in environ.get("TOPS_JOB_DISABLE_PLUGINS", "").split(",") if name.strip()}


def get_plugin_manager(environ: Mapping[str, str] | None = None, *, load_entry_points: bool = True) -> pluggy.PluginManager:
    """A new manager with the built-ins and the installed plugins registered."""
    environ = os.environ if environ is None else environ
    pm = pluggy.PluginManager("tops_job")
    pm.add_hookspecs(hookspecs)
    report = PluginLoad()
    pm.load_report = report  # type: ignore[attr-defined]
    blocked = _blocked(environ)
    for module_name in DEFAULT_PLUGINS:
        if module_name in blocked:
            report.blocked.append(module_name)
            continue
        pm.register(importlib.import_module(module_name), name=module_name)
        report.loaded.append(module_name)
    if load_entry_points:
        for entry_point in entry_points(group=ENTRY_POINT_GROUP):
            if entry_point.name in blocked or pm.has_plugin(entry_point.name):
                report.blocked.append(entry_point.name)
                continue
            try:
                plugin = entry_point.load()
                pm.register(plugin, name=entry_point.name)
            except Exception as exc:  # a broken plugin is reported, not fatal by itself
                report.failed[entry_point.name] = f"{type(exc).__name__}: {exc}"
                log.warning("plugin %s failed to load: %s", entry_point.name, exc)
                continue
            report.loaded.append(entry_point.name)
    pm.check_pending()
    if environ.get("TOPS_JOB_TRACE_PLUGINS", "") not in ("", "0"):
        pm.trace.root.setwriter(lambda message: log.info("[plugins] %s", message.rstrip()))
        pm.enable_tracing()
    return pm
