"""Fixtures for the observability tests: an OTLP receiver on loopback, the job's
environment (with a known key), and real `tops-job run` subprocesses cleaned up after."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.health import SECRET_HEX, Job
from tests.support.otlp_receiver import OtlpReceiver


@pytest.fixture
def receiver():
    with OtlpReceiver() as found:
        yield found


@pytest.fixture
def job_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(WORKER_SK_HEX=SECRET_HEX, PYTHONUNBUFFERED="1")
    return env


@pytest.fixture
def start_job(tmp_path: Path):
    jobs: list[Job] = []

    def start(args: list[str], env: dict[str, str]) -> Job:
        job = Job(args, env, tmp_path)
        jobs.append(job)
        return job

    yield start
    for job in jobs:
        job.kill()
