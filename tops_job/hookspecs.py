"""Hook specifications: the ways a plugin changes what `tops-job` does.

Every hook is called with keyword arguments. Plugins implement them with
`@tops_job.hookimpl` and declare an entry point in the group `tops_job`; the built-ins
(tops_job.plugins.builtins, listed in plugins.manager.DEFAULT_PLUGINS) implement the same hooks.
docs/plugins.md describes each hook with an example; tests/plugins/test_docs.py fails
when a hook here is missing from that page or has no `test_hook_<name>` test.

Failures: a hook that raises during a run is logged and counted in the summary's
`plugin_failures` and the run goes on, except that a plugin raising a
`tops_job.errors.TopsJobError` (e.g. ConfigError for a malformed setting) stops the run
with that error's exit code, and the signer hook, whose failure always stops the run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # imports for annotations only: keep plugin loading light
    import click

    from tops_job.compute.autotune import ProfileCache
    from tops_job.config import Config
    from tops_job.delivery.backend import OutboxBackend
    from tops_job.observability.events import Reporter
    from tops_job.spec.signing import Signer

hookspec = pluggy.HookspecMarker("tops_job")


@hookspec(firstresult=True)
def tops_job_signer(config: Config) -> Signer | None:
    """Return the signer for this run, or None to leave the choice to others.

    Called once per run (`tops-job run`), after configuration is loaded and before the
    first attempt. The first non-None result wins; the built-in local-key signer is
    registered `trylast`, so an installed signer that answers (e.g. the KMS signer when
    TOPS_JOB_KMS_KEY_ID is set) takes precedence. Return None when your settings are
    absent. With `--signer NAME` (TOPS_JOB_SIGNER) the run stops unless the chosen
    signer's `name` is NAME. An exception here stops the run (a Signature-class error,
    or the TopsJobError raised).
    """


@hookspec
def tops_job_register_submitters(register: Callable[..., None]) -> None:
    """Offer submitters: call `register(name, factory, schemes=())` for each.

    `factory(config)` returns a `tops_job.delivery.outcomes.Submitter`; it is called only for
    the submitter the run picks: `--submitter NAME` (TOPS_JOB_SUBMITTER), else the one
    whose `schemes` include the scheme of AGGREGATOR_URL, else "ledger". Called once per
    run before the first attempt. Installed plugins are called before the built-ins and
    the first registration of a name wins, so a plugin registering "http" replaces the
    built-in HTTP submitter (and its scheme claims come first).
    """


@hookspec
def tops_job_register_reporters(register: Callable[[Reporter], None], config: Config) -> None:
    """Offer health reporters: call `register(reporter)` for each.

    A reporter (subclass `tops_job.observability.events.Reporter`) receives run start, the profile,
    each attempt outcome, each receipt outcome and run end. Called once per run, before
    the first attempt. A reporter method that raises is counted and the run goes on.
    """


@hookspec(firstresult=True)
def tops_job_profile_store(config: Config) -> ProfileCache | None:
    """Return where autotune profiles are cached, or None (first non-None wins).

    Called once per run and by `tops-job autotune`. The built-in (trylast) is the user
    cache directory; a fleet can share one, e.g. in S3. The result must offer
    `load(key, expect)`, `save(profile)` and `path_for(key)` (see
    `tops_job.compute.autotune.ProfileCache`).
    """


@hookspec
def tops_job_register_commands(cli: click.Group) -> None:
    """Add commands or command groups to the `tops-job` CLI with `cli.add_command(...)`,
    e.g. a plugin's own settings check. Called once, when the CLI is asked for a command
    it does not define itself or for its command list (`tops-job --help`)."""


@hookspec
def tops_job_run_finished(summary: dict[str, Any], config: Config) -> None:
    """Called once at the end of `tops-job run`, after the summary file is written, with
    the summary as written. For plugins that publish it (e.g. upload to S3). A failure
    is logged, counted in `plugin_failures`, and the summary file is written again."""


@hookspec(firstresult=True)
def tops_job_outbox(config: Config) -> OutboxBackend | None:
    """Return where this run keeps receipts until the aggregator answers for them, or None
    (first non-None wins).

    Called once per run (`tops-job run`) and by `tops-job outbox [send]`, before anything is
    stored. The built-in (trylast) is the local directory (`TOPS_JOB_OUTBOX_DIR`,
    `tops_job.LocalOutbox`); a backend in storage that outlives the instance (the AWS
    plugin's S3 outbox) lets a later run on another machine deliver what a dead one left.
    The result must offer `location`, `receipts()` (a `tops_job.ReceiptStore`), `exchanges()`
    (a `tops_job.ExchangeStore`) and `waiting()`; see `tops_job/delivery/backend.py` for
    the promises every store keeps. A failure here stops the run (exit 6 for a
    StorageError, 2 for a ConfigError).
    """
