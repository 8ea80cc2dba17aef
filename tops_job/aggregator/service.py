"""The aggregator put together: the store (SQLite or PostgreSQL), the application with its
guards, the fleet views and /metrics, served by `serve.run` in one or several processes."""

from __future__ import annotations

import logging
import shutil
import sqlite3
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tops_job.aggregator import guard
from tops_job.aggregator.migrations import SchemaTooNew, StorageUnavailable

log = logging.getLogger("tops_job.aggregator")


class UnusableDatabase(Exception):
    """The database cannot be opened, created or migrated: a configuration problem (exit 2)."""


@dataclass
class Settings:
    db: str
    host: str = "127.0.0.1"
    port: int = 8081
    allow: set[str] | None = None
    max_body: int = 4 * 1024 * 1024
    min_opens: int = 16
    full: bool = False
    threads: int = 8
    workers: int = 1
    connection_limit: int | None = None
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    idle_timeout: int = 60
    max_cost: int = guard.DEFAULT_MAX_COST
    verify_slots: int = 2
    inline_cost: int = guard.DEFAULT_INLINE_COST  # 0: every request on a thread (serve.py)
    costly_lane: str = "auto"  # where requests over the inline cost run: "thread", "poll", or "auto" (costly_on_poll)
    challenge_ttl_s: int = 24 * 3600
    challenge_rate: float = 20.0
    accept: str = "v2"  # receipt schemas taken: v1, v2 or both
    openings: int = 64  # v2: leaves drawn per commitment
    cost_cap: int = 1 << 26  # v2: largest verification cost taken
    run_ttl: float = 6 * 3600.0  # v2: seconds a run challenge stays usable
    open_ttl: float = 600.0  # v2: seconds a drawn challenge stays answerable
    keep_openings: bool = False  # v1: store accepted receipts whole, not their claim
    extra: dict[str, Any] = field(default_factory=dict)


def open_store(db: str) -> Any:
    """The store for `db` (a path or postgresql:// DSN), created and migrated; raises
    UnusableDatabase naming the problem."""
    from tops_job.aggregator.store_pg import open_store as _open

    try:
        return _open(db)
    except (sqlite3.Error, OSError, StorageUnavailable, SchemaTooNew) as exc:
        what = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnusableDatabase(f"cannot use the database {describe(db)} (--db / TOPS_JOB_AGGREGATOR_DB): {what}") from None


def describe(db: str) -> str:
    from tops_job.aggregator.store_pg import is_dsn

    if is_dsn(db):
        from psycopg.conninfo import conninfo_to_dict

        try:
            parts = conninfo_to_dict(db)
            return f"postgresql://{parts.get('user', '')}@{parts.get('host', '')}:{parts.get('port', '')}/{parts.get('dbname', '')}"
        except Exception:
            return "postgresql://…"
    return db


def build_app(settings: Settings, store: Any, metrics: Any) -> tuple[Any, Any]:
    """(the WSGI app with fleet views and /metrics, its verification gate)."""
    from tops_job.aggregator.app import AggregatorApp
    from tops_job.aggregator.fleet import FleetViews
    from tops_job.aggregator.metrics import MetricsMiddleware, TimedStore
    from tops_job.aggregator.v2_exchange import V2Endpoints
    from tops_job.aggregator.v2_store import V2Store

    timed = TimedStore(store, metrics)
    gate = guard.VerifyGate(settings.verify_slots, cheap_cost=max(1, settings.max_cost // 16),
                            inline_cost=settings.inline_cost)
    v2 = V2Endpoints(V2Store(timed), s=settings.openings, cost_cap=settings.cost_cap, allow=settings.allow,
                     run_ttl_ms=int(settings.run_ttl * 1000), open_ttl_ms=int(settings.open_ttl * 1000), gate=gate,
                     events=metrics)
    app = AggregatorApp(timed, max_body=settings.max_body, min_opens=settings.min_opens, allow=settings.allow,  # type: ignore[arg-type]
                        full=settings.full, max_cost=settings.max_cost, gate=gate,
                        challenge_limiter=guard.RateLimiter(rate=settings.challenge_rate, burst=max(1, int(settings.challenge_rate * 5))),
                        challenge_ttl_ms=settings.challenge_ttl_s * 1000, events=metrics, accept=settings.accept, v2=v2,
                        keep_openings=settings.keep_openings,
                        **settings.extra)
    return MetricsMiddleware(FleetViews(app, timed), metrics, gate), gate


def costly_on_poll(settings: Settings) -> bool:
    """Whether a worker runs its requests over the inline cost on its poll thread, one a turn
    (serve.py), rather than on its threads. "auto": when there is a worker for every CPU this
    process may use, a worker's threads have no core of their own to run on; with fewer
    workers, threads are how a worker's verifications use the other cores."""
    if settings.costly_lane != "auto":
        return settings.costly_lane == "poll"
    from tops_job.cpus import usable_cpus

    return settings.workers >= usable_cpus()


def start(settings: Settings, announce: Callable[[str], None]) -> int:
    """Check the database, bind, announce, serve until TERM/INT. Raises UnusableDatabase
    (and OSError when the port cannot be bound) before serving."""
    from tops_job.aggregator import serve
    from tops_job.aggregator.metrics import AggregatorMetrics, enable_multiprocess

    store = open_store(settings.db)  # fail fast, in one place; migrations run once, here
    many = settings.workers > 1
    sock = serve.bind(settings.host, settings.port, shared=many, listen=not many)
    limit = serve.connection_limit(settings.connection_limit, settings.threads)
    multiproc_dir = tempfile.mkdtemp(prefix="tops-job-aggregator-metrics-") if settings.workers > 1 else None
    if settings.workers > 1:
        store.close()  # workers open their own connections after the fork

    def build() -> serve.Built:
        if multiproc_dir:
            enable_multiprocess(multiproc_dir)
        from tops_job.aggregator.group_commit import GroupCommitStore

        worker_store = GroupCommitStore(open_store(settings.db) if settings.workers > 1 else store)
        metrics = AggregatorMetrics()
        app, _gate = build_app(settings, worker_store, metrics)
        return app, worker_store.close, metrics.server_tick

    def on_exit(pid: int) -> None:
        if multiproc_dir:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid, multiproc_dir)

    host, port = sock.getsockname()[:2]
    on_poll = settings.inline_cost > 0 and costly_on_poll(settings)
    announce(f"serving on http://{settings.host if ':' not in settings.host else '[' + settings.host + ']'}:{port}"
             f" (db {describe(settings.db)}, accepts {settings.accept}, v2 openings {settings.openings},"
             f" min v1 opens {settings.min_opens}, {settings.workers} worker"
             f"{'s' if settings.workers != 1 else ''}, connection limit {limit} each, costly requests on"
             f" {'the poll thread' if on_poll else 'threads'}"
             + (f", {len(settings.allow)} allowed keys" if settings.allow is not None else "") + ")")
    options = {"threads": settings.threads, "inline": settings.inline_cost > 0, "costly_on_poll": on_poll,
               "limit": limit, "header_timeout": settings.header_timeout,
               "body_timeout": settings.body_timeout, "idle_timeout": settings.idle_timeout,
               # waitress answers its own (plain) 413 only far above our limit; up to there the app answers in JSON
               "max_request_body_size": 4 * settings.max_body + 65536}
    try:
        return serve.run(build, sock, workers=settings.workers, server_options=options, on_worker_exit=on_exit)
    finally:
        if multiproc_dir:
            shutil.rmtree(multiproc_dir, ignore_errors=True)
