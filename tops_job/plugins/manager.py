"""The plugin manager: built-ins first, then entry points in the group `tops_job`.

Environment:
  TOPS_JOB_DISABLE_PLUGINS=name,…  block plugins by the name `tops-job plugins` shows
                                  (entry-point name, or module name for a built-in)
  TOPS_JOB_LOAD_PLUGINS=name,…     load only these entry-point plugins ("" loads none;
                                  unset loads all); built-ins are not affected
  TOPS_JOB_TRACE_PLUGINS=1         log every hook call with its arguments and result

A plugin that raises while loading (import error, bad hook signature, a hook that is not
in hookspecs.py) is left out and recorded in `pm.load_report`; the run goes on, unless
that plugin was the configured signer or submitter (see app.py). A hook that raises
during a run is counted in `pm.hook_failures` (plugin.hook -> count), which the run
summary reports as `plugin_failures`.
"""

from __future__ import annotations

import importlib
import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

import pluggy

from tops_job import __version__, hookspecs
from tops_job.errors import LIBRARY_ERRORS, ConfigError, SignatureError, StorageError

if TYPE_CHECKING:
    import click

    from tops_job.compute.autotune import ProfileCache
    from tops_job.config import Config
    from tops_job.delivery.backend import OutboxBackend
    from tops_job.observability.events import Reporter
    from tops_job.spec.signing import Signer

log = logging.getLogger("tops_job.plugins")

# Built-ins by the name users type in TOPS_JOB_DISABLE_PLUGINS (kept from before the
# package was regrouped) and the module that implements each.
DEFAULT_PLUGINS = {
    "tops_job.builtins.local_signer": "tops_job.plugins.builtins.local_signer",
    "tops_job.builtins.ledger_submitter": "tops_job.plugins.builtins.ledger_submitter",
    "tops_job.builtins.http_submitter": "tops_job.plugins.builtins.http_submitter",
    "tops_job.builtins.profile_store": "tops_job.plugins.builtins.profile_store",
    "tops_job.builtins.outbox": "tops_job.plugins.builtins.outbox",
    "tops_job.builtins.observability": "tops_job.plugins.builtins.observability",
}
ENTRY_POINT_GROUP = "tops_job"


@dataclass
class PluginLoad:
    """What loading found: loaded names, blocked names, and plugins that raised."""

    loaded: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # name -> "ExceptionType: message"
    versions: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (distribution, version)

    def failures_text(self) -> str:
        """For error messages: '; plugins that failed to load: aws (ImportError: …)' or ''."""
        if not self.failed:
            return ""
        return "; plugins that failed to load: " + ", ".join(f"{name} ({error})" for name, error in self.failed.items())


class PluginManager(pluggy.PluginManager):
    """pluggy's manager plus what loading found, the hook failures of this run, and
    `hooks`: the typed way to call them."""

    def __init__(self) -> None:
        super().__init__("tops_job")
        self.load_report = PluginLoad()
        self.hook_failures: Counter[str] = Counter()
        self.hooks = Hooks(self)

    def record_failure(self, plugin_name: str, hook_name: str, exc: BaseException) -> None:
        self.hook_failures[f"{plugin_name}.{hook_name}"] += 1
        log.warning("[plugins] %s: hook %s failed: %s: %s", plugin_name, hook_name, type(exc).__name__, exc)


def get_plugin_manager(environ: Mapping[str, str] | None = None, *, load_entry_points: bool = True) -> PluginManager:
    """A new manager with the built-ins and the installed plugins registered."""
    from tops_job.config import plugin_settings

    settings = plugin_settings(environ)
    pm = PluginManager()
    pm.add_hookspecs(hookspecs)
    report = pm.load_report
    blocked, only = settings.disabled, settings.only
    for name, module_name in DEFAULT_PLUGINS.items():
        if name in blocked:
            report.blocked.append(name)
            continue
        _register(pm, name, lambda module=module_name: importlib.import_module(module), ("tops-job", __version__))
    if load_entry_points:
        for entry_point in entry_points(group=ENTRY_POINT_GROUP):
            name = entry_point.name
            if name in blocked or (only is not None and name not in only):
                report.blocked.append(name)
                continue
            if pm.has_plugin(name) or name in report.failed:
                report.failed.setdefault(name, f"DuplicateName: another plugin is already named {name!r} "
                                               f"({entry_point.value} left out)")
                continue
            dist = entry_point.dist
            version = (dist.metadata["Name"], dist.version) if dist is not None else ("?", "?")
            _register(pm, name, entry_point.load, version)
    pm.check_pending()  # every loaded plugin passed it alone; this only guards the invariant
    if settings.trace:
        pm.trace.root.setwriter(lambda message: log.info("[plugins] %s", message.rstrip()))
        pm.enable_tracing()
    return pm


def _register(pm: PluginManager, name: str, load: Any, version: tuple[str, str]) -> None:
    """Import and register one plugin; on any failure leave it out and record why."""
    report = pm.load_report
    try:
        plugin = load()
        pm.register(plugin, name=name)
    except (Exception, SystemExit) as exc:  # SystemExit: a script's sys.exit or argparse run at import
        report.failed[name] = f"{type(exc).__name__}: {exc}"
        log.warning("[plugins] plugin %s failed to load and is left out: %s", name, report.failed[name])
        return
    try:
        pm.check_pending()  # a hook not in hookspecs.py (a typo, a newer tops-job) fails here
    except pluggy.PluginValidationError as exc:
        pm.unregister(name=name)
        report.failed[name] = f"PluginValidationError: {exc}"
        log.warning("[plugins] plugin %s failed to load and is left out: %s", name, exc)
        return
    report.loaded.append(name)
    report.versions[name] = version


# ---------------------------------------------------------------- calling hooks safely

def _impls_in_call_order(pm: pluggy.PluginManager, hook_name: str) -> list[Any]:
    # pluggy calls the last-registered implementation first (tryfirst/trylast aside) and
    # get_hookimpls() lists them in the reverse order.
    return list(reversed(getattr(pm.hook, hook_name).get_hookimpls()))


def _call_one(pm: pluggy.PluginManager, hook_name: str, impl: Any, kwargs: dict[str, Any]) -> Any:
    """Call one plugin's implementation through pluggy's hook executor (so tracing still
    sees it). Not `subset_hook_caller`: it only leaves out plugins that have an attribute
    named like the hook, so one implementing it under another name (`specname`) would be
    called again with every other implementation."""
    spec = getattr(pm.hook, hook_name).spec
    firstresult = bool(spec is not None and spec.opts.get("firstresult"))
    return pm._hookexec(hook_name, [impl], kwargs, firstresult)


def call_each(pm: PluginManager, hook_name: str, *, fatal: tuple[type[BaseException], ...] = LIBRARY_ERRORS,
              **kwargs: Any) -> list[Any]:
    """Call every implementation of `hook_name`; one that raises is counted in
    `pm.hook_failures` and logged, and the others still run. Exceptions of the `fatal`
    types propagate (a plugin raising ConfigError means the user's settings are wrong)."""
    results: list[Any] = []
    for impl in _impls_in_call_order(pm, hook_name):
        try:
            results.extend(_call_one(pm, hook_name, impl, kwargs))
        except fatal:
            raise
        except Exception as exc:
            pm.record_failure(impl.plugin_name, hook_name, exc)
    return results


def first_result(pm: PluginManager, hook_name: str, **kwargs: Any) -> Any:
    """A firstresult hook where a failing plugin is counted and skipped (the next one
    answers). The library's own errors (LIBRARY_ERRORS) propagate. Not for the signer: a configured signer that fails
    must stop the run, not give way to the local key."""
    for impl in _impls_in_call_order(pm, hook_name):
        try:
            result = _call_one(pm, hook_name, impl, kwargs)
        except LIBRARY_ERRORS:
            raise
        except Exception as exc:
            pm.record_failure(impl.plugin_name, hook_name, exc)
            continue
        if result is not None:
            return result
    return None


def first_result_or_stop(pm: PluginManager, hook_name: str, failure: type[Exception], what: str, **kwargs: Any) -> Any:
    """A firstresult hook whose failure must stop the run, never give way to the next
    answer (a signer, an outbox backend): the library's own errors propagate, anything else
    becomes `failure` naming `what`."""
    try:
        return getattr(pm.hook, hook_name)(**kwargs)
    except LIBRARY_ERRORS:
        raise
    except Exception as exc:
        raise failure(f"{what} failed: {type(exc).__name__}: {exc}") from exc


def describe_plugins(pm: PluginManager) -> list[dict[str, Any]]:
    """What `tops-job plugins` prints: each plugin with its status, version and hooks."""
    report = pm.load_report
    rows: list[dict[str, Any]] = []
    for name in report.loaded:
        plugin = pm.get_plugin(name)
        if plugin is None:
            continue
        dist, version = report.versions.get(name, ("?", "?"))
        rows.append({"name": name, "status": "loaded", "builtin": name in DEFAULT_PLUGINS, "package": dist,
                     "version": version, "hooks": sorted(caller.name for caller in pm.get_hookcallers(plugin) or [])})
    rows += [{"name": name, "status": "blocked"} for name in report.blocked]
    rows += [{"name": name, "status": "failed", "error": error} for name, error in report.failed.items()]
    return rows


class Hooks:
    """One typed method per hook in hookspecs.py, so that every call site is type-checked
    and no hook is named by a string outside this class. Each says how failures go."""

    def __init__(self, pm: PluginManager):
        self._pm = pm

    def signer(self, *, config: Config) -> Signer | None:
        """The chosen signer. A failing signer stops the run (a SignatureError, unless it
        raised one of the library's errors): never a silent fall-back to the local key."""
        result: Signer | None = first_result_or_stop(self._pm, "tops_job_signer", SignatureError,
                                                     "the signer plugin", config=config)
        return result

    def register_submitters(self, *, register: Callable[..., None]) -> None:
        call_each(self._pm, "tops_job_register_submitters", register=register)

    def register_reporters(self, *, register: Callable[[Reporter], None], config: Config) -> None:
        call_each(self._pm, "tops_job_register_reporters", register=register, config=config)

    def profile_store(self, *, config: Config) -> ProfileCache | None:
        store: ProfileCache | None = first_result(self._pm, "tops_job_profile_store", config=config)
        return store

    def outbox(self, *, config: Config) -> OutboxBackend:
        """Where the run keeps receipts. A configured backend that fails stops the run (as a
        StorageError, exit 6, unless it raised one of the library's errors): falling back to
        the instance's disk would lose receipts the operator put in durable storage."""
        backend: OutboxBackend | None = first_result_or_stop(self._pm, "tops_job_outbox", StorageError,
                                                             "the outbox plugin", config=config)
        if backend is None:
            raise ConfigError("TOPS_JOB_DISABLE_PLUGINS", "no outbox backend answered (is the built-in "
                              "tops_job.builtins.outbox disabled?)")
        return backend

    def register_commands(self, *, cli: click.Group) -> None:
        """Failures only logged: the CLI must work with a broken plugin installed."""
        call_each(self._pm, "tops_job_register_commands", fatal=(), cli=cli)

    def run_finished(self, *, summary: dict[str, Any], config: Config) -> None:
        """Failures only counted: the run is over and its summary written."""
        call_each(self._pm, "tops_job_run_finished", fatal=(), summary=summary, config=config)
