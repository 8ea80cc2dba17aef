"""`run --devices all|0,1,…`: one worker process per GPU, in one invocation.

Each child is an ordinary `tops-job run` that sees only its GPU (CUDA_VISIBLE_DEVICES) and
has its own data directory (outbox, ledger, summary), run id and health port, so a failing
device takes down one worker, not the others. The parent forwards TERM/INT and exits with
the most serious of the children's codes.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from tops_job.errors import ConfigError, DeviceError, ExitCode

log = logging.getLogger("tops_job.fleet")

# Most serious first: a config error anywhere means the fleet is misconfigured.
_SEVERITY = (ExitCode.CONFIG_ERROR, ExitCode.DEVICE_ERROR, ExitCode.REJECTED, ExitCode.INTERNAL_ERROR,
             ExitCode.PENDING, ExitCode.TERMINATED, ExitCode.INTERRUPTED, ExitCode.OK)


# run's file options -> the variables that carry them to the workers, one file each
PER_WORKER_FILES = {"ledger_path": "TOPS_JOB_LEDGER", "summary_path": "TOPS_JOB_SUMMARY",
                    "receipts_out": "TOPS_JOB_RECEIPTS_OUT", "metrics_textfile": "TOPS_JOB_METRICS_TEXTFILE"}
PER_WORKER_DIRS = {"outbox_dir": "TOPS_JOB_OUTBOX_DIR"}


def visible_gpu_count() -> int:
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:
        raise DeviceError(f"--devices all needs CuPy and a CUDA driver to count GPUs: {exc}") from None


def parse_devices(text: str, count_gpus=visible_gpu_count) -> list[int]:
    """'all' or a comma-separated list of device indices."""
    text = text.strip()
    if text == "all":
        count = count_gpus()
        if count < 1:
            raise DeviceError("--devices all: no CUDA device is visible")
        return list(range(count))
    try:
        devices = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError("TOPS_JOB_DEVICES", f"{text!r} is not 'all' or a list like 0,1,2") from None
    if not devices or min(devices) < 0 or len(set(devices)) != len(devices):
        raise ConfigError("TOPS_JOB_DEVICES", f"{text!r} must name distinct non-negative device indices")
    return devices


def worst_exit(codes: Sequence[int]) -> ExitCode:
    known = [ExitCode(code) if code in ExitCode._value2member_map_ else ExitCode.INTERNAL_ERROR for code in codes]
    return min(known, key=_SEVERITY.index)


def child_environment(environ: Mapping[str, str], device: int, *, data_dir: Path, run_id: str,
                      health_port: int | None) -> dict[str, str]:
    env = dict(environ)
    env["CUDA_VISIBLE_DEVICES"] = str(device)
    env["TOPS_JOB_DATA_DIR"] = str(data_dir / f"gpu{device}")
    env["TOPS_JOB_RUN_ID"] = f"{run_id}-gpu{device}"[:64]
    env.pop("TOPS_JOB_DEVICES", None)
    # One writer per file: each worker gets its own outbox, ledger, summary and outputs.
    if "TOPS_JOB_OUTBOX_DIR" in env:
        env["TOPS_JOB_OUTBOX_DIR"] = str(Path(env["TOPS_JOB_OUTBOX_DIR"]) / f"gpu{device}")
    for per_worker in PER_WORKER_FILES.values():
        if per_worker in env:
            path = Path(env[per_worker])
            env[per_worker] = str(path.with_name(f"{path.stem}.gpu{device}{path.suffix}"))
    if health_port:
        env["METRICS_ENABLED"] = "1"
        env["TOPS_JOB_HEALTH_PORT"] = str(health_port + device)
    return env


def run_fleet(child_args: Sequence[str], devices: Sequence[int], environ: Mapping[str, str], *,
              data_dir: Path, run_id: str, health_port: int | None) -> ExitCode:
    """Start one `tops-job run` per device, forward TERM/INT, wait, return the worst code."""
    children: list[subprocess.Popen] = []
    for device in devices:
        env = child_environment(environ, device, data_dir=data_dir, run_id=run_id, health_port=health_port)
        command = [sys.executable, "-m", "tops_job.cli", "run", *child_args]
        log.info("[fleet] device %d: run id %s, data %s", device, env["TOPS_JOB_RUN_ID"], env["TOPS_JOB_DATA_DIR"])
        children.append(subprocess.Popen(command, env=env))

    def forward(signum: int, frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        codes = [child.wait() for child in children]
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    for device, code in zip(devices, codes):
        log.info("[fleet] device %d exited %d", device, code)
    return worst_exit(codes)
