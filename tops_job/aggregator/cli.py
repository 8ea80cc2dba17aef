"""`tops-job aggregator serve`: the reference aggregator on waitress (threads)."""

from __future__ import annotations

import logging
import os
import re
import signal
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
@click.option("--db", type=click.Path(dir_okay=False, path_type=Path), envvar="TOPS_JOB_AGGREGATOR_DB",
              help="SQLite database (default: <TOPS_JOB_DATA_DIR or user data dir>/aggregator.sqlite3).")
@click.option("--allow", multiple=True, help="Only these pubkeys may submit: hex, or a file of them (repeatable).")
@click.option("--max-body", type=click.IntRange(1024), default=4 * 1024 * 1024, show_default=True,
              help="Largest receipt body in bytes (413 above).")
@click.option("--min-opens", type=click.IntRange(1, 256), default=16, show_default=True, help="Minimum openings.")
@click.option("--full", is_flag=True, help="Recompute every revealed value, not a sample of columns.")
@click.option("--threads", type=click.IntRange(1, 256), default=8, show_default=True, help="Server threads.")
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
def serve(host: str, port: int, db: Path | None, allow: tuple[str, ...], max_body: int, min_opens: int,
          full: bool, threads: int, accept: str, openings: int, cost_cap: int, run_ttl: float,
          open_ttl: float) -> None:
    """Verify and count receipts over HTTP until TERM or INT."""
    import platformdirs
    from waitress.server import create_server

    from tops_job.aggregator.app import AggregatorApp
    from tops_job.aggregator.store import Store
    from tops_job.aggregator.v2_exchange import V2Endpoints
    from tops_job.aggregator.v2_store import V2Store

    db = db or Path(os.environ.get("TOPS_JOB_DATA_DIR") or platformdirs.user_data_dir("tops-job")) / "aggregator.sqlite3"
    allowed = load_allow(allow)
    store = Store(db)
    v2 = V2Endpoints(V2Store(db), s=openings, cost_cap=cost_cap, allow=allowed, run_ttl_ms=int(run_ttl * 1000),
                     open_ttl_ms=int(open_ttl * 1000))
    app = AggregatorApp(store, max_body=max_body, min_opens=min_opens, allow=allowed, full=full, accept=accept, v2=v2)
    # waitress answers its own (plain) 413 only far above our limit; up to there the app answers in JSON
    server = create_server(app, host=host, port=port, threads=threads, max_request_body_size=4 * max_body + 65536,
                           connection_limit=1000, channel_timeout=60, ident="tops-job-aggregator",
                           clear_untrusted_proxy_headers=True)
    bound = getattr(server, "effective_port", port)
    click.echo(f"[aggregator] serving on http://{host}:{bound} (db {db}, accepts {accept}, v2 openings {openings}, min v1 opens {min_opens}"
               + (f", {len(allowed)} allowed keys" if allowed is not None else "") + ")", err=True)
    sys.stderr.flush()

    def on_signal(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_signal)  # also as PID 1, where TERM is otherwise ignored
    try:
        server.run()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        server.close()
        store.close()
        v2.store.close()
        click.echo("[aggregator] stopped", err=True)
