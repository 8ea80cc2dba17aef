"""Hook specifications: the ways a plugin changes what `tops-job` does.

Every hook is called with keyword arguments. Plugins implement them with
`@tops_job.hookimpl` and declare an entry point in the group `tops_job`.
See docs/plugins.md for each hook with an example.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:  # imports for annotations only: keep plugin loading light
    import click

    from .autotune import ProfileStore
    from .config import Config
    from .reporting import Reporter
    from .signing import Signer
    from .submission import Submitter

hookspec = pluggy.HookspecMarker("tops_job")


@hookspec(firstresult=True)
def tops_job_signer(config: "Config") -> "Signer | None":
    """Return the signer for this run, or None to leave the choice to others.

    Called once per run, after configuration is loaded. The first non-None result wins;
    the built-in local-key signer is registered `trylast`, so any installed signer that
    answers (e.g. a KMS signer when its key id is configured) takes precedence.
    """


@hookspec
def tops_job_register_submitters(register: Callable[..., None]) -> None:
    """Offer submitters: call `register(name, factory, schemes=())` for each.

    `factory(config)` returns a Submitter. The run picks one by `TOPS_JOB_SUBMITTER=name`,
    else by the URL scheme of AGGREGATOR_URL, else the local ledger. Called once per run.
    """


@hookspec
def tops_job_register_reporters(register: Callable[["Reporter"], None], config: "Config") -> None:
    """Offer health reporters: call `register(reporter)` for each.

    A reporter receives run start, each attempt outcome, each receipt outcome and run end
    (see tops_job.reporting.Reporter). Called once per run, before the first attempt.
    """


@hookspec(firstresult=True)
def tops_job_profile_store(config: "Config") -> "ProfileStore | None":
    """Return where autotune profiles are cached (first non-None wins; built-in: the
    user cache directory). A fleet can share one, e.g. in S3."""


@hookspec
def tops_job_register_commands(cli: "click.Group") -> None:
    """Add commands or command groups to the `tops-job` CLI (e.g. a plugin's own settings).
    Called once when the CLI starts."""


@hookspec
def tops_job_run_finished(summary: dict[str, Any], config: "Config") -> None:
    """Called once after the run summary is written, with the summary as written.
    For plugins that publish it (e.g. upload to S3). Failures are logged and counted."""
