"""The `tops-job` command line: parse, build a Config, call the library, map errors to exits."""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" or os.path.basename(sys.argv[0]) == "tops-job":
    # The program itself (not a test importing it): handle TERM/INT before anything slow.
    from tops_job.job.stop import install_early

    install_early(sys.argv[1:])

import json
import logging
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from tops_job import __version__
from tops_job.compute import DTYPES
from tops_job.errors import LIBRARY_ERRORS, ConfigError, exit_code_of

if TYPE_CHECKING:
    from tops_job.config import Config

log = logging.getLogger("tops_job.cli")


class JobFailed(click.ClickException):
    """A library error as a CLI error: message on stderr, the error's exit code."""

    def __init__(self, error: Exception):
        super().__init__(f"configuration error: {error}" if isinstance(error, ConfigError) else str(error))
        # click declares exit_code a class variable; each JobFailed carries its error's code.
        setattr(self, "exit_code", int(exit_code_of(error)))  # noqa: B010

    def show(self, file: Any = None) -> None:
        click.echo(f"tops-job: {self.format_message()}", err=True)


def _config(flags: dict[str, Any], need_key: bool = True) -> Config:
    from tops_job.config import load_config

    return load_config(flags, need_key=need_key)


class SizeType(click.ParamType):
    name = "N|M,N,K"

    def convert(self, value: Any, param: Any, ctx: Any) -> tuple[int, int, int]:
        from tops_job.config import parse_size

        if isinstance(value, tuple):
            return value
        try:
            return parse_size("--size", value)
        except ConfigError as exc:
            self.fail(exc.problem, param, ctx)


def _install_plugin_commands(group: click.Group) -> None:
    """Let plugins add commands (tops_job_register_commands); a failure is only logged."""
    try:
        from tops_job.plugins.manager import get_plugin_manager

        get_plugin_manager().hooks.register_commands(cli=group)
    except Exception as exc:  # the CLI must work even with a broken plugin installed
        log.warning("plugins could not add commands: %s", exc)


class TopsJobGroup(click.Group):
    """The top-level group: loads plugin commands on demand, and is the CLI's one error
    boundary: an error the library raises on purpose, from any command (plugins' too),
    becomes a message and that error's exit code."""

    _plugins_loaded = False

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LIBRARY_ERRORS as exc:
            raise JobFailed(exc) from None

    def _ensure_plugins(self) -> None:
        if not TopsJobGroup._plugins_loaded:
            TopsJobGroup._plugins_loaded = True
            _install_plugin_commands(self)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        command = super().get_command(ctx, name)
        if command is None:
            self._ensure_plugins()
            command = super().get_command(ctx, name)
        return command

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._ensure_plugins()
        return super().list_commands(ctx)


@click.group(cls=TopsJobGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="tops-job")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def cli(verbose: bool) -> None:
    """Proof-of-compute batch worker: timed GEMM attempts, signed receipts, delivered once.

    Settings come from flags, then environment variables, then defaults; see the README.
    """
    from tops_job.config import log_settings
    from tops_job.observability.logs import setup_logging

    setup_logging(log_settings(), verbose=verbose)


# ---------------------------------------------------------------- run

@cli.command()
@click.option("-n", "--attempts", type=click.IntRange(1), help="Attempts to run (TOPS_JOB_ATTEMPTS, default 10).")
@click.option("--backend", type=click.Choice(["auto", "numpy", "cupy"]), help="Compute backend (TOPS_JOB_BACKEND, default auto).")
@click.option("--dtype", type=click.Choice(list(DTYPES)), help="Inputs type (TOPS_JOB_DTYPE; float32).")
@click.option("--size", type=SizeType(), help="Skip autotune: N or M,N,K (TOPS_JOB_SIZE).")
@click.option("--target-ms", type=click.IntRange(1, 600_000), help="Autotune target per product (AUTOTUNE_TARGET_MS, default 300).")
@click.option("--retune", is_flag=True, default=None, help="Ignore the cached profile and tune again.")
@click.option("--tile", type=click.IntRange(1), help="Leaf width in columns (TOPS_JOB_TILE; backend default).")
@click.option("--opens", type=click.IntRange(1, 256), help="v1: openings per receipt (TOPS_JOB_OPENS, default 16).")
@click.option("--protocol", type=click.Choice(["v1", "v2"]),
              help="Receipt protocol (TOPS_JOB_PROTOCOL, default v2: commit, aggregator challenge, open).")
@click.option("--aggregator-url", help="Aggregator verify URL (AGGREGATOR_URL); unset: local ledger.")
@click.option("--did", "device_did", help="Device DID (DEVICE_DID; default did:peaq:<key address>).")
@click.option("--submitter", "submitter_name", envvar="TOPS_JOB_SUBMITTER", help="Submitter by name (TOPS_JOB_SUBMITTER).")
@click.option("--signer", "signer_name", envvar="TOPS_JOB_SIGNER",
              help="Require this signer, e.g. kms (TOPS_JOB_SIGNER; default: the first plugin that answers, else the local key).")
@click.option("--ledger", "ledger_path", type=click.Path(path_type=Path), help="Local ledger file (TOPS_JOB_LEDGER).")
@click.option("--outbox", "outbox_dir", type=click.Path(path_type=Path), help="Outbox directory (TOPS_JOB_OUTBOX_DIR).")
@click.option("--summary", "summary_path", type=click.Path(path_type=Path), help="Summary JSON path (TOPS_JOB_SUMMARY).")
@click.option("--receipts-out", type=click.Path(path_type=Path),
              help="Append every signed receipt here as JSON lines (- for standard output).")
@click.option("--drain-timeout", type=click.FloatRange(0), help="Seconds to keep sending at the end (TOPS_JOB_DRAIN_TIMEOUT, 30).")
@click.option("--challenge/--no-challenge", default=None,
              help="Ask the aggregator for a run challenge (TOPS_JOB_CHALLENGE; default: when it offers one).")
@click.option("--health-port", type=click.IntRange(0, 65535), help="Serve /health, /metrics, dashboard (METRICS_ENABLED=1: 8082).")
@click.option("--metrics-textfile", type=click.Path(path_type=Path), help="Write final metrics here for node_exporter.")
@click.option("--selftest/--no-selftest", default=None,
              help="Known-answer test of the device before the first attempt (TOPS_JOB_SELFTEST, on).")
@click.option("--audit-every", type=click.IntRange(0),
              help="Verify every Nth receipt on the CPU, and flagged ones; 0 off (TOPS_JOB_AUDIT_EVERY, 10).")
@click.option("--strict-device", is_flag=True, default=None,
              help="Fail instead of falling back to the host when the GPU kernels cannot be built (TOPS_JOB_STRICT_DEVICE).")
@click.option("--devices", envvar="TOPS_JOB_DEVICES",
              help="all|0,1,…: one worker process per GPU, each with its own data dir (TOPS_JOB_DEVICES).")
def run(submitter_name: str | None, signer_name: str | None, devices: str | None, **flags: Any) -> None:
    """Run a batch of attempts and deliver their receipts."""
    if devices:
        _run_fleet(devices, flags)
    from tops_job.config import log_settings
    from tops_job.job.build import ReceiptsFile, build_job
    from tops_job.job.stop import StopSignal, early_stop_signal, install_stop_handlers
    from tops_job.job.summary import human_lines
    from tops_job.observability.logs import set_run_id
    from tops_job.observability.telemetry import setup_for_job
    from tops_job.plugins.manager import get_plugin_manager

    if flags.get("health_port") is not None:
        flags["metrics_enabled"] = True
    config = _config(flags, need_key=False)  # the local signer resolves the key if it is the one used
    set_run_id(config.run_id)
    stop = early_stop_signal() or StopSignal()  # a TERM during start-up is already in it
    previous_handlers = install_stop_handlers(stop)
    sinks: list[Callable[[dict[str, Any]], None]] = []
    receipts_file = None
    telemetry = None
    try:
        pm = get_plugin_manager()
        if sys.stderr.isatty() and not log_settings().json:
            from tops_job.observability.progress import ProgressPlugin

            pm.register(ProgressPlugin(sys.stderr), name="tops_job.progress")
        if config.receipts_out:
            receipts_file = ReceiptsFile(config.receipts_out)
            sinks.append(receipts_file)
        if config.debug_receipt:
            sinks.append(_debug_receipt)
        job = build_job(config, pm, stop=stop, receipt_sinks=sinks, submitter_name=submitter_name,
                        signer_name=signer_name)
        telemetry = setup_for_job(config, job)  # flushed below, bounded, on every way out (SIGTERM included)
        for line in config.describe(job.identity.did, job.identity.signer.public_key.hex()):
            log.info(line)
        key = config.key_if_resolved()
        if key is not None and key.generated:
            log.info("[keys] generated a new worker key at %s; back it up, it is this worker's identity",
                     key.origin.removeprefix("generated (").rstrip(")"))
        if not config.aggregator_url and not submitter_name:
            log.info("[ledger] no AGGREGATOR_URL: receipts are verified in-process and appended to %s", config.ledger)
        result = job.run()
    finally:
        if telemetry is not None:
            telemetry.shutdown()
        if receipts_file is not None:
            receipts_file.close()
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
    for line in human_lines(result.summary):
        click.echo(line, err=True)
    if result.summary_path is not None:
        click.echo(f"[summary] written to {result.summary_path}", err=True)
    if result.error is not None and not stop.stopped:
        click.echo(f"tops-job: {result.error}", err=True)
    sys.exit(int(result.exit_code))


def _run_fleet(devices_text: str, flags: dict[str, Any]) -> None:
    """--devices: re-run this command once per device in child processes (see fleet.py)."""
    from tops_job.job.fleet import PER_WORKER_DIRS, PER_WORKER_FILES, parse_devices, run_fleet

    config = _config(flags, need_key=False)
    devices = parse_devices(devices_text)
    ctx = click.get_current_context()
    child_args: list[str] = []
    environ = dict(os.environ)
    for param in ctx.command.params:
        if param.name in ("devices", "health_port") or \
                ctx.get_parameter_source(param.name) != click.core.ParameterSource.COMMANDLINE:
            continue  # variables reach the workers through the environment; ports are per worker
        value = ctx.params[param.name]
        variable = {**PER_WORKER_FILES, **PER_WORKER_DIRS}.get(param.name)
        if variable:
            environ[variable] = str(value)  # made per worker by the fleet
        elif getattr(param, "is_flag", False):
            child_args.append(param.opts[0] if value else param.secondary_opts[0])
        else:
            child_args += [param.opts[0], ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    code = run_fleet(child_args, devices, environ, data_dir=config.data_dir, run_id=config.run_id,
                     health_port=config.health_port if config.metrics_enabled else None)
    sys.exit(int(code))


def _debug_receipt(receipt: dict[str, Any]) -> None:
    from tops_job.spec.canonical import receipt_line

    click.echo(receipt_line(receipt), err=True)


# ---------------------------------------------------------------- outbox

@cli.group(invoke_without_command=True)
@click.option("--outbox", "outbox_dir", type=click.Path(path_type=Path), help="Outbox directory (TOPS_JOB_OUTBOX_DIR).")
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of lines.")
@click.pass_context
def outbox(ctx: click.Context, outbox_dir: Path | None, as_json: bool) -> None:
    """List the receipts waiting in the outbox and those the aggregator rejected (with its answers)."""
    ctx.obj = {"outbox_dir": outbox_dir}
    if ctx.invoked_subcommand is not None:
        return
    from tops_job.plugins.manager import get_plugin_manager

    config = _config({"outbox_dir": outbox_dir}, need_key=False)
    listing = get_plugin_manager().hooks.outbox(config=config).inventory()
    if as_json:
        click.echo(json.dumps(listing, indent=2))
        return
    click.echo(f"{listing['outbox']}: {len(listing['pending'])} pending, {len(listing['rejected'])} rejected, "
               f"{len(listing['quarantined'])} quarantined")
    for entry in listing["pending"]:
        last = entry.get("last_answer")
        click.echo(f"pending   {entry['digest']}  run {entry.get('run_id')} attempt {entry.get('attempt')}  "
                   f"{entry['age_s']:.0f}s old" + (f"  last answer {last.get('status')} {last.get('error')}: "
                                                   f"{json.dumps(last.get('answer'), sort_keys=True)}" if last else ""))
    for entry in listing["rejected"]:
        answer = entry.get("answer") or {}
        click.echo(f"rejected  {entry['digest']}  run {entry.get('run_id')} attempt {entry.get('attempt')}  "
                   f"{answer.get('status')} {answer.get('error')}: {json.dumps(answer.get('answer'), sort_keys=True)}")
    for name in listing["quarantined"]:
        click.echo(f"quarantined  {name}")
    for entry in listing["withheld"]:
        click.echo(f"withheld  {entry['digest']}  run {entry.get('run_id')} attempt {entry.get('attempt')}  "
                   f"{entry.get('reason')}")


@outbox.command("send")
@click.option("--aggregator-url", help="Aggregator verify URL (AGGREGATOR_URL).")
@click.option("--submitter", "submitter_name", envvar="TOPS_JOB_SUBMITTER", help="Submitter by name (TOPS_JOB_SUBMITTER).")
@click.option("--drain-timeout", type=click.FloatRange(0), help="Seconds to keep sending (TOPS_JOB_DRAIN_TIMEOUT, 30).")
@click.pass_context
def outbox_send(ctx: click.Context, submitter_name: str | None, **flags: Any) -> None:
    """Deliver the pending receipts without running attempts (after an outage, from cron).

    Safe beside running workers: each receipt is claimed before it is sent. Exits like
    `run`: 0 all delivered, 3 some still pending, 4 some rejected, 6 storage, 130/143 stopped."""
    from tops_job.delivery.drain import send_outbox
    from tops_job.job.build import choose_submitter
    from tops_job.job.stop import StopSignal, early_stop_signal, install_stop_handlers
    from tops_job.plugins.manager import get_plugin_manager

    stop = early_stop_signal() or StopSignal()
    previous = install_stop_handlers(stop)
    try:
        config = _config({**flags, "outbox_dir": ctx.obj["outbox_dir"]}, need_key=False)
        if not config.aggregator_url and not submitter_name:
            raise ConfigError("AGGREGATOR_URL", "set it (or --aggregator-url) to say where to send the outbox")
        pm = get_plugin_manager()
        _name, factory = choose_submitter(config, pm, submitter_name)
        backend = pm.hooks.outbox(config=config)
        code, report = send_outbox(config, factory(config), stop, store=backend.receipts())
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    counts = report.counts
    click.echo(f"[outbox] {backend.location}: {counts['accepted']} accepted, {counts['duplicate']} duplicate, "
               f"{counts['rejected']} rejected, {report.pending} pending"
               + (f" (left because {report.detail['left_because']})" if report.detail.get("left_because") else ""),
               err=True)
    sys.exit(int(code))


# ---------------------------------------------------------------- plugins

@cli.command()
def plugins() -> None:
    """List plugins (built-in and installed) as JSON: name, status, package, version, hooks.

    Blocked plugins (TOPS_JOB_DISABLE_PLUGINS, TOPS_JOB_LOAD_PLUGINS) and plugins that
    failed to load, with the error, are listed too."""
    from tops_job.plugins.manager import describe_plugins, get_plugin_manager

    click.echo(json.dumps(describe_plugins(get_plugin_manager()), indent=2))


# ---------------------------------------------------------------- autotune

@cli.command()
@click.option("--target-ms", type=click.IntRange(1, 600_000), help="Target product time (AUTOTUNE_TARGET_MS, 300).")
@click.option("--backend", type=click.Choice(["auto", "numpy", "cupy"]), help="Compute backend (TOPS_JOB_BACKEND).")
@click.option("--dtype", type=click.Choice(list(DTYPES)), help="Inputs type.")
@click.option("--force", is_flag=True, help="Tune even when a matching profile is cached.")
def autotune(target_ms: int | None, backend: str | None, dtype: str | None, force: bool) -> None:
    """Find the matrix size whose product takes the target time, and cache it."""
    from tops_job.compute import create_backend
    from tops_job.compute.autotune import resolve_profile
    from tops_job.plugins.manager import get_plugin_manager

    config = _config({"target_ms": target_ms, "backend": backend, "dtype": dtype}, need_key=False)
    engine = create_backend(config.backend, config.dtype)
    store = get_plugin_manager().hooks.profile_store(config=config)
    if store is None:
        raise ConfigError("TOPS_JOB_DISABLE_PLUGINS", "no profile store plugin answered; enable one")
    profile, _cached = resolve_profile(engine, config.target_ms, store, retune=force)
    click.echo(json.dumps({"m": profile.m, "n": profile.n, "k": profile.k, "measured_ms": profile.measured_ms,
                           "backend": profile.backend, "device": profile.device, "dtype": profile.dtype,
                           "target_ms": profile.target_ms, "path": str(store.path_for(profile.key))}))


# ---------------------------------------------------------------- selftest

@cli.command()
@click.option("--backend", type=click.Choice(["auto", "numpy", "cupy"]), help="Compute backend (TOPS_JOB_BACKEND).")
@click.option("--dtype", "dtypes", type=click.Choice(list(DTYPES)), multiple=True,
              help="A dtype to check (repeat; default: every dtype the backend has).")
@click.option("-n", "--attempts", type=click.IntRange(1), default=10, show_default=True,
              help="Attempts per dtype, every one verified on the CPU.")
@click.option("--size", type=SizeType(), help="Attempt shape: N or M,N,K (default 4096 on a GPU, 256 on the CPU).")
@click.option("--strict-device", is_flag=True, help="Fail where the GPU kernels cannot be built (no host fallback).")
def selftest(backend: str | None, dtypes: tuple[str, ...], attempts: int, size: tuple[int, int, int] | None,
             strict_device: bool) -> None:
    """Burn-in check of this node's device: known-answer self-test, self-audit of N attempts
    and NVML health, per dtype, as a pass/fail table. Exit 0 all passed, 5 a check failed."""
    from tops_job.compute import gpu_available
    from tops_job.compute.base import Shape
    from tops_job.job.burn_in import burn_in

    config = _config({"backend": backend}, need_key=False)
    name = config.backend if config.backend != "auto" else ("cupy" if gpu_available() else "numpy")
    if not dtypes:
        if name == "cupy":
            from tops_job.compute.cuda_kernels import GPU_DTYPES

            dtypes = GPU_DTYPES
        else:
            from tops_job.compute.numpy_backend import CPU_DTYPES

            dtypes = tuple(CPU_DTYPES)
    side = 4096 if name == "cupy" else 256
    shape = Shape(*size) if size else Shape(side, side, side)
    report = burn_in(name, list(dtypes), attempts=attempts, size=shape, strict_device=strict_device)
    click.echo(report.table())
    sys.exit(int(report.exit_code))


# ---------------------------------------------------------------- verify

@cli.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, allow_dash=True))
@click.option("--min-opens", type=click.IntRange(1, 256), default=16, show_default=True, help="Minimum openings.")
@click.option("--full", is_flag=True, help="v1: recompute every revealed value, not a sample of columns (v2 always does).")
@click.option("--cost-cap", type=click.IntRange(1), default=1 << 26, show_default=True,
              help="Refuse receipts whose verification cost (from the header) is above this.")
def verify(files: tuple[str, ...], min_opens: int, full: bool, cost_cap: int) -> None:
    """Verify receipts (a JSON object, or JSON lines): tops-receipt/1, tops-receipt/2 fiat-shamir
    receipts, and v2 challenge transcripts; exit 0 only if all are valid. Says what each
    acceptance proves: fiat-shamir receipts are grinding-bounded."""
    from tops_job.errors import ReceiptInvalid
    from tops_job.heap import keep_freed_memory
    from tops_job.spec.any_receipt import verify_any
    from tops_job.spec.v2 import VerifierBusy, parse_json

    keep_freed_memory()  # one receipt after another: reuse the heap, not fresh pages each time
    total = bad = 0
    for name, line_no, text in _receipt_texts(files):
        total += 1
        where = f"{name}:{line_no}"
        try:
            value = parse_json(text)
            if isinstance(value, dict) and set(value) == {"receipt", "reason"}:
                value = value["receipt"]  # the spec's invalid-vector wrapper
            verified = verify_any(value, min_opens=min_opens, full=full, cost_cap=cost_cap)
        except ReceiptInvalid as exc:
            bad += 1
            click.echo(f"{where}: invalid: {exc.code}: {exc.detail}")
            continue
        except (VerifierBusy, MemoryError) as exc:  # not a verdict: say so, and fail the command
            bad += 1
            click.echo(f"{where}: not verified (out of resources, not a verdict): {exc}")
            continue
        click.echo(f"{where}: ok {verified.schema} digest={verified.digest.hex()} did={verified.did} "
                   f"attempt={verified.attempt} soundness: {verified.soundness}")
    click.echo(f"{total - bad} valid, {bad} invalid", err=True)
    sys.exit(0 if bad == 0 and total > 0 else 1)


def _receipt_texts(files: tuple[str, ...]) -> Iterator[tuple[str, int, str]]:
    for name in files:
        handle = click.open_file(name, "r", encoding="utf-8", errors="replace")
        with handle:
            text = handle.read()
        stripped = text.strip()
        if not stripped:
            continue
        if "\n" not in stripped:
            yield name, 1, stripped
            continue
        try:  # one pretty-printed object
            json.loads(stripped)
            yield name, 1, stripped
            continue
        except ValueError:
            pass
        lines = text.splitlines()
        if not text.endswith("\n") and not _is_json(lines[-1]):  # a write cut short (kill -9, full disk)
            click.echo(f"{name}:{len(lines)}: warning: partial last line ({len(lines[-1])} bytes, an interrupted "
                       "write): skipped", err=True)
            lines.pop()
        for line_no, line in enumerate(lines, 1):
            if line.strip():
                yield name, line_no, line


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------- keys

@cli.group()
def keys() -> None:
    """Show or generate the worker key."""


@keys.command("show")
def keys_show() -> None:
    """Print the public key, address and DID of the configured key (never the secret)."""
    from tops_job.spec.identity import default_did, eth_address
    from tops_job.spec.signing import LocalKeySigner

    config = _config({})
    public = LocalKeySigner(config.key.secret).public_key
    click.echo(json.dumps({"pubkey": public.hex(), "address": eth_address(public),
                           "did": config.device_did or default_did(public), "key_origin": config.key.origin}, indent=2))


@keys.command("generate")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
def keys_generate(path: Path) -> None:
    """Write a new secret key to PATH (mode 0600; an existing file is never overwritten)."""
    import coincurve

    from tops_job.keys import write_key_file
    from tops_job.spec.identity import default_did

    try:
        secret = write_key_file(path)
    except FileExistsError:
        raise ConfigError("PATH", f"{path} exists; refusing to overwrite a key") from None
    except OSError as exc:
        raise ConfigError("PATH", f"cannot write {path}: {exc.strerror}") from None
    public = coincurve.PrivateKey(secret).public_key.format(compressed=True)
    click.echo(json.dumps({"path": str(path), "pubkey": public.hex(), "did": default_did(public)}, indent=2))


class _LazyGroup(click.Group):
    """A command group defined in another module, imported only when it is used."""

    def __init__(self, name: str, import_path: str, help: str):
        super().__init__(name=name, help=help)
        self.import_path = import_path

    def _target(self) -> click.Group:
        import importlib

        module_name, attribute = self.import_path.split(":")
        return getattr(importlib.import_module(module_name), attribute)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return self._target().get_command(ctx, name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return self._target().list_commands(ctx)


cli.add_command(_LazyGroup("aggregator", "tops_job.aggregator.cli:aggregator", "Run the reference aggregator (spec §9)."))


def main() -> None:
    cli(prog_name="tops-job")


if __name__ == "__main__":
    main()
