"""tops-job on Modal: one L4 GPU function, started on a schedule.

    modal secret create tops-job-key --from-dotenv worker-key.env   # WORKER_SK_HEX=...
    modal secret create tops-job-config AGGREGATOR_URL=https://aggregator.example/verify
    modal deploy infra/modal/tops_job_app.py                         # from the checkout
    modal run infra/modal/tops_job_app.py::run                       # one run now

The image is built by Modal from this checkout (the same CUDA base and `tops-job[gpu]` as
Containerfile.gpu). The function runs `tops-job run` as a child process and turns its exit
code into the function's outcome: 0 returns, anything else raises `TopsJobFailed`, which
Modal records as a failure and retries (see README.md here for the mapping).
`tests/infra/test_serverless.py` imports this module offline and checks the function's
GPU, image, schedule, timeout, retries, secrets and volumes with `modal` itself.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import modal

APP_NAME = "tops-job"
GPU = "L4"
# Containerfile.gpu's default base and its interpreter (Ubuntu 24.04: Python 3.12).
CUDA_IMAGE = "nvidia/cuda:12.6.3-runtime-ubuntu24.04"
PYTHON = "3.12"
DATA_DIR = "/var/lib/tops-job"
CACHE_DIR = "/var/cache/tops-job"
# UTC. Runs are spaced wider than one call can last, retry included: 2 x 1 h < 6 h.
SCHEDULE = modal.Cron("17 */6 * * *")
TIMEOUT_S = 3600  # Modal kills the call at this point, without a signal first
# Modal gives a preempted container 30 s after the interrupt. The function also stops
# tops-job itself this long before TIMEOUT_S, so a run never meets the hard timeout.
GRACE_S = 30
STOP_AFTER_S = TIMEOUT_S - 2 * GRACE_S
MAX_RETRIES = 1
ARGS = ("run", "--attempts", "100", "--backend", "cupy")
# What the child gets on top of the container's environment and the secrets.
ENV = {
    "TOPS_JOB_DATA_DIR": DATA_DIR,  # the outbox lives here, on the Volume
    "TOPS_JOB_CACHE_DIR": CACHE_DIR,
    "TOPS_JOB_CONFIG_DIR": f"{DATA_DIR}/config",
    "CUPY_CACHE_DIR": f"{CACHE_DIR}/cupy",
    # 20 s drain + 5 s telemetry bound + ~2 s to leave the attempt fits in GRACE_S.
    "TOPS_JOB_DRAIN_TIMEOUT": "20",
    "TOPS_JOB_LOG_FORMAT": "json",
    "OTEL_SERVICE_NAME": "tops-job",
}

# The checkout when deploying. In the container this module is imported again from another
# place; the image is not rebuilt there, so the paths are never read (`.parent` of "/" is "/").
REPO = Path(__file__).resolve().parent.parent.parent

image = (
    modal.Image.from_registry(CUDA_IMAGE, add_python=PYTHON)
    .entrypoint([])
    .add_local_file(REPO / "pyproject.toml", "/src/pyproject.toml", copy=True)
    .add_local_file(REPO / "README.md", "/src/README.md", copy=True)
    .add_local_dir(REPO / "tops_job", "/src/tops_job", copy=True, ignore=["**/__pycache__/**"])
    .run_commands("python -m pip install --no-cache-dir '/src[gpu]'")
)

# Modal Volumes outlive the container: receipts left pending (exit 3) wait here for the
# next run. Changes are committed when the function ends (and explicitly below).
data = modal.Volume.from_name("tops-job-data", create_if_missing=True)
cache = modal.Volume.from_name("tops-job-cache", create_if_missing=True)

app = modal.App(APP_NAME)


class TopsJobFailed(Exception):
    """tops-job exited non-zero; `code` is a tops_job.errors.ExitCode value."""

    def __init__(self, code: int):
        super().__init__(f"tops-job exited {code}")
        self.code = code


def run_tops_job(command: list[str], env: dict[str, str], stop_after_s: float, grace_s: float) -> int:
    """Run `command` to the end and return its exit status. SIGINT or SIGTERM to this process
    (Modal's preemption), or `stop_after_s` running, sends SIGTERM to the child, which stops
    cleanly (exit 143); SIGKILL only if it is still there `grace_s` later."""
    child = subprocess.Popen(command, env=env)
    previous = {}

    def forward(signum, frame):
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)

    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, forward)
    except ValueError:  # not the main thread: Modal's own handling applies
        pass
    try:
        try:
            return child.wait(timeout=stop_after_s)
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGTERM)
        try:
            return child.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            child.kill()
            return child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@app.function(
    image=image,
    gpu=GPU,
    schedule=SCHEDULE,
    timeout=TIMEOUT_S,
    # Modal retries every exception and cannot be told which codes are final: one retry.
    retries=modal.Retries(max_retries=MAX_RETRIES, initial_delay=60.0, backoff_coefficient=1.0),
    secrets=[
        modal.Secret.from_name("tops-job-key", required_keys=["WORKER_SK_HEX"]),
        modal.Secret.from_name("tops-job-config", required_keys=["AGGREGATOR_URL"]),
    ],
    volumes={DATA_DIR: data, CACHE_DIR: cache},
    # One container at a time: the outbox has one writer.
    max_containers=1,
)
def run() -> None:
    started = time.monotonic()
    tops_job = shutil.which("tops-job") or "tops-job"
    code = run_tops_job([tops_job, *ARGS], {**os.environ, **ENV},
                        stop_after_s=STOP_AFTER_S, grace_s=GRACE_S)
    data.commit()
    cache.commit()
    print(f"tops-job exited {code} after {time.monotonic() - started:.0f} s")
    if code != 0:
        raise TopsJobFailed(code)
