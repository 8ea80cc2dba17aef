"""Helpers for the observability tests: a real `tops-job run` in a subprocess, the health
server's port and numbers, and tools that may be missing."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

# A known key: the tests grep every output for it.
SECRET_HEX = "7b706b652278aba9b01dd473e026fd0baf215fd5afbf92d860b03fa661e07dc2"
TOPS_JOB = [sys.executable, "-m", "tops_job.cli"]
_PORT_LINE = re.compile(r"serving .* on http://[^:]+:(\d+)/")


class Job:
    def __init__(self, args: list[str], env: dict[str, str], workdir: Path):
        self.stderr_path = workdir / "stderr.log"
        self.stdout_path = workdir / "stdout.log"
        self._err = open(self.stderr_path, "wb")
        self._out = open(self.stdout_path, "wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(TOPS_JOB + args, env=env, stdout=self._out, stderr=self._err, cwd=workdir)
        self.ended: float | None = None

    def wait(self, timeout: float = 60) -> int:
        code = self.proc.wait(timeout=timeout)
        self.ended = time.monotonic()
        self._err.close()
        self._out.close()
        return code

    @property
    def wall_s(self) -> float:
        assert self.ended is not None
        return self.ended - self.started

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def health_port(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = _PORT_LINE.search(self.stderr())
            if match:
                return int(match.group(1))
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"the health server never said its port; stderr:\n{self.stderr()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.wait()


def get(port: int, path: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return response.status, response.headers.get("Content-Type", ""), response.read()


def wait_for_attempts(port: int, at_least: int, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        data = json.loads(get(port, "/metrics.json")[2])
        if data["metrics"]["successful_attempts"] >= at_least or time.monotonic() > deadline:
            return data
        time.sleep(0.1)

