"""`tops-job aggregator serve`: the reference aggregator on waitress (poll, guarded; one
process or several: aggregator/serve.py), on SQLite or PostgreSQL."""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import click

log = logging.getLogger("tops_job.aggregator")
_PUBKEY = re.compile(r"0[23][0-9a-f]{64}")


def load_allow(values: tuple[str, ...]) -> set[str] | None:
    """--allow: each value is a compressed pubkey (hex) or a file of them, one a line
    (blank lines and # comments skipped)."""
    if not values:
        return None
    allowed: set[str] = set()
    for value in values:
        if _PUBKEY.fullmatch(value.strip().lower()):
            allowed.add(value.strip().lower())
            continue
        path = Path(value).expanduser()
        if not path.is_file():
            raise click.BadParameter(f"{value!r} is neither a compressed pubkey (66 hex) nor a file", param_hint="--allow")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise click.BadParameter(f"cannot read {path}: {exc}", param_hint="--allow") from None
        for number, line in enumerate(text.splitlines(), 1):
            entry = line.split("#", 1)[0].strip().lower()
            if not entry:
                continue
            if not _PUBKEY.fullmatch(entry):
                raise click.BadParameter(f"{path}:{number}: not a compressed pubkey", param_hint="--allow")
            allowed.add(entry)
    return allowed


@click.group()
def aggregator() -> None:
    """Run the reference aggregator (spec §9)."""


@aggregator.command()
@click.option("--host", default="127.0.0.1", show_default=True, envvar="TOPS_JOB_AGGREGATOR_HOST", help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8081, show_default=True,
              envvar="TOPS_JOB_AGGREGATOR_PORT", help="Port (0: any free port, printed at start).")
@click.option("--db", envvar="TOPS_JOB_AGGREGATOR_DB",
              help="SQLite database path, or a postgresql://… DSN (default: <TOPS_JOB_DATA_DIR or user data dir>/aggregator.sqlite3).")
@click.option("--allow", multiple=True, help="Only these pubkeys may submit: hex, or a file of them (repeatable).")
@click.option("--max-body", type=click.IntRange(1024), default=4 * 1024 * 1024, show_default=True,
              help="Largest receipt body in bytes (413 above).")
@click.option("--min-opens", type=click.IntRange(1, 256), default=16, show_default=True, help="Minimum openings.")
@click.option("--full", is_flag=True, help="Recompute every revealed value, not a sample of columns.")
@click.option("--threads", type=click.IntRange(1, 256), default=8, show_default=True, help="Server threads per worker.")
@click.option("--workers", type=click.IntRange(0, 256), default=1, show_default=True, envvar="TOPS_JOB_AGGREGATOR_WORKERS",
              help="Worker processes sharing the port (0: one per CPU this container may use).")
@click.option("--connection-limit", type=click.IntRange(16), default=None,
              help="Connections per worker (default and ceiling: what the file-descriptor limit allows).")
@click.option("--header-timeout", type=click.FloatRange(0.5), default=10.0, show_default=True,
              help="Seconds a request may take to send its headers.")
@click.option("--body-timeout", type=click.FloatRange(0.5), default=30.0, show_default=True,
              help="Seconds a request may take to send its body after the headers.")
@click.option("--idle-timeout", type=click.IntRange(1), default=60, show_default=True, help="Idle keep-alive seconds.")
@click.option("--max-cost", type=click.IntRange(1), default=1 << 25, show_default=True,
              help="Largest verification cost, opens × k × (1 + columns) (422 cost_over_cap above).")
@click.option("--verify-slots", type=click.IntRange(1, 64), default=2, show_default=True,
              help="Verifications at once per worker (503 busy when none frees within 5 s).")
@click.option("--inline-cost", type=click.IntRange(0), default=1 << 24, show_default=True,
              help="Requests whose verification costs at most this run on the worker's poll thread, without "
                   "a thread hand-over; costlier ones in the costly lane (--costly-lane). 0: every request on a thread.")
@click.option("--costly-lane", type=click.Choice(["auto", "poll", "thread"]), default="auto", show_default=True,
              help="Where requests over --inline-cost run: on the worker's threads, within --verify-slots, or on its "
                   "poll thread, one a turn, so that cheap ones wait behind one at most. auto: poll when there is a "
                   "worker per CPU, else thread.")
@click.option("--challenge-ttl", type=click.IntRange(1), default=24 * 3600, show_default=True, help="Challenge lifetime, seconds.")
@click.option("--challenge-rate", type=click.FloatRange(0.01), default=20.0, show_default=True,
              help="Challenges per second per client address (bursts of 5 s worth).")
@click.option("--accept", type=click.Choice(["v1", "v2", "both"]), default="v2", show_default=True,
              envvar="TOPS_JOB_AGGREGATOR_ACCEPT", help="Receipt schemas taken: tops-receipt/1, /2 or both.")
@click.option("--openings", type=click.IntRange(32, 256), default=64, show_default=True,
              help="v2: leaves drawn per commitment (s; soundness (1-f)^s).")
@click.option("--cost-cap", type=click.IntRange(1 << 26), default=1 << 26, show_default=True,
              help="v2: largest verification cost s*(tile+1)*k taken (cost_over_cap above).")
@click.option("--run-ttl", type=click.FloatRange(0.001), default=6 * 3600.0, show_default=True,
              help="v2: seconds a run challenge stays usable.")
@click.option("--open-ttl", type=click.FloatRange(0.001), default=600.0, show_default=True,
              help="v2: seconds a drawn challenge stays answerable.")
@click.option("--keep-openings", is_flag=True, envvar="TOPS_JOB_AGGREGATOR_KEEP_OPENINGS",
              help="v1: store accepted receipts whole, as sent (default: the signed claim without its openings).")
def serve(host: str, port: int, db: str | None, allow: tuple[str, ...], max_body: int, min_opens: int,
          full: bool, threads: int, **guards: Any) -> None:
    """Verify and count receipts over HTTP until TERM or INT."""

    import platformdirs

    from tops_job.aggregator.service import Settings, UnusableDatabase, start
    from tops_job.cpus import usable_cpus
    from tops_job.errors import ExitCode

    db = db or str(Path(os.environ.get("TOPS_JOB_DATA_DIR") or platformdirs.user_data_dir("tops-job")) / "aggregator.sqlite3")
    allowed = load_allow(allow)
    guards["workers"] = guards["workers"] or usable_cpus()
    guards["challenge_ttl_s"] = guards.pop("challenge_ttl")
    settings = Settings(db=db, host=host, port=port, allow=allowed, max_body=max_body, min_opens=min_opens, full=full,
                        threads=threads, **guards)

    def announce(line: str) -> None:
        click.echo(f"[aggregator] {line}", err=True)
        sys.stderr.flush()

    try:
        status = start(settings, announce)
    except UnusableDatabase as exc:
        click.echo(f"[aggregator] error: {exc}", err=True)
        sys.exit(ExitCode.CONFIG_ERROR)
    except OSError as exc:
        click.echo(f"[aggregator] error: cannot listen on {host}:{port}: {exc.strerror or exc}", err=True)
        sys.exit(ExitCode.CONFIG_ERROR)
    click.echo("[aggregator] stopped", err=True)
    sys.exit(status)
