"""A throw-away PostgreSQL cluster for tests: `initdb` in a temporary directory, `postgres`
on a free loopback port (and a unix socket in that directory), stopped and deleted at the
end. PostgreSQL refuses to run as root, so as root the cluster runs as a system user made
for it (`useradd --system tops-job-pg`), or `nobody`.

Tools: Debian's `postgresql` package (initdb and postgres under /usr/lib/postgresql/*/bin).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tests.support.net import free_port

USER = "tops-job-pg"


def find_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    return found[-1] if found else shutil.which(name)


def _run_as() -> tuple[int, int] | None:
    if os.getuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER],
                       capture_output=True, check=False)
        try:
            entry = pwd.getpwnam(USER)
        except KeyError:
            entry = pwd.getpwnam("nobody")
    return entry.pw_uid, entry.pw_gid


class PostgresCluster:
    def __init__(self) -> None:
        initdb, postgres = find_bin("initdb"), find_bin("postgres")
        if not initdb or not postgres:
            pytest.skip("PostgreSQL not found; install it with: apt-get install postgresql")
        try:
            import psycopg  # noqa: F401
        except ImportError:
            pytest.skip("psycopg not installed; pip install 'psycopg[binary]'")
        self.dir = Path(tempfile.mkdtemp(prefix="tops-job-pg-"))
        self.data = self.dir / "data"
        ids = _run_as()
        kwargs: dict = {}
        if ids:
            os.chown(self.dir, *ids)
            kwargs = {"user": ids[0], "group": ids[1], "extra_groups": []}
        result = subprocess.run([initdb, "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync",
                                 "-E", "UTF8", "--locale=C"], capture_output=True, text=True, timeout=120,
                                cwd=self.dir, **kwargs)
        if result.returncode != 0:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise RuntimeError(f"initdb failed: {result.stderr[-2000:]}")
        self.port = free_port()
        self.log = open(self.dir / "postgres.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [postgres, "-D", str(self.data), "-p", str(self.port), "-k", str(self.dir), "-c", "listen_addresses=127.0.0.1",
             "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off", "-c", "max_connections=300",
             "-c", "shared_buffers=64MB"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=self.dir, **kwargs)
        self.base_dsn = f"postgresql://postgres@127.0.0.1:{self.port}"
        self._wait_ready()

    def _wait_ready(self) -> None:
        import psycopg

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited: {(self.dir / 'postgres.log').read_text()[-2000:]}")
            try:
                psycopg.connect(self.base_dsn + "/postgres", connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                time.sleep(0.2)
        raise RuntimeError("postgres did not become ready")

    def new_database(self) -> str:
        """A fresh, empty database; its DSN."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.base_dsn + "/postgres", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"{self.base_dsn}/{name}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(2)  # SIGINT: fast shutdown (clients are disconnected)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
