"""The store on PostgreSQL (psycopg 3): several aggregator processes, on one machine or
many, share one database with SQLite's guarantees.

The queries are `store.Store`'s own: that SQL is written in the dialect both engines speak
(`ON CONFLICT DO NOTHING`, `?` placeholders, translated here to psycopg's `%s`). What makes
replicas safe is the database's: `digest` is the primary key and `(did, nonce)` unique, so of
two replicas inserting one receipt at once one inserts and the other waits on the index and
finds a duplicate (or a replay); challenges and their expiry are rows every replica reads.
Every psycopg error surfaces as `StorageUnavailable` (answered 503), and a connection that
failed is replaced on the next request.
"""

from __future__ import annotations

from typing import Any

from tops_job.aggregator.migrations import StorageUnavailable
from tops_job.aggregator.store import Store


def is_dsn(value: str) -> bool:
    return value.startswith(("postgresql://", "postgres://"))


class _Connection:
    """A psycopg connection that speaks the `?` placeholders of `Store`'s SQL."""

    def __init__(self, dsn: str):
        import psycopg

        self._psycopg = psycopg
        try:
            self.raw = psycopg.connect(dsn, autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:
            raise StorageUnavailable(f"cannot connect to PostgreSQL: {exc}".strip()) from None
        self.broken = False

    @property
    def in_transaction(self) -> bool:
        return self.raw.info.transaction_status != self._psycopg.pq.TransactionStatus.IDLE

    def execute(self, sql: str, args: Any = None) -> Any:
        try:
            return self.raw.execute(sql.replace("?", "%s"), args)
        except self._psycopg.OperationalError as exc:
            self.broken = self.raw.closed or self.raw.broken
            raise StorageUnavailable(str(exc).strip() or type(exc).__name__) from exc
        except self._psycopg.Error as exc:
            raise StorageUnavailable(f"{type(exc).__name__}: {str(exc).strip()}") from exc

    def close(self) -> None:
        self.raw.close()


class PostgresStore(Store):
    dialect = "postgres"
    begin = "BEGIN"

    def __init__(self, dsn: str):
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise StorageUnavailable("--db postgresql://… needs psycopg 3: pip install 'tops-job[postgres]'") from None
        self.dsn = dsn
        super().__init__(":memory:")  # the path is unused; connections come from _connect

    def _connect(self) -> Any:
        return _Connection(self.dsn)

    def failed_whole(self, exc: BaseException) -> bool:
        """Every psycopg error is a StorageUnavailable; a lost or refused connection (psycopg's
        OperationalError, or none at all) is the database's, a constraint or data error one write's."""
        import psycopg

        return isinstance(exc, StorageUnavailable) and (
            exc.__cause__ is None or isinstance(exc.__cause__, psycopg.OperationalError))

    def describe(self) -> str:
        """The DSN without its password, for logs."""
        from psycopg.conninfo import conninfo_to_dict

        try:
            parts = conninfo_to_dict(self.dsn)
        except Exception:
            return "postgresql"
        return f"postgresql://{parts.get('user', '')}@{parts.get('host', '')}:{parts.get('port', '')}/{parts.get('dbname', '')}"


def open_store(db: str) -> Store:
    """SQLite for a path, PostgreSQL for a postgresql:// DSN."""
    if is_dsn(db):
        return PostgresStore(db)
    return Store(db)
