"""`run --devices`: one worker per device, each with its own data, run id and health port."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tops_job.errors import ConfigError, DeviceError, ExitCode
from tops_job.job.fleet import child_environment, parse_devices, worst_exit


def test_parse_devices_lists_and_all():
    assert parse_devices("0,2") == [0, 2]
    assert parse_devices("all", count_gpus=lambda: 3) == [0, 1, 2]
    with pytest.raises(DeviceError):
        parse_devices("all", count_gpus=lambda: 0)
    for bad in ("x", "1,1", "-1", ""):
        with pytest.raises(ConfigError) as info:
            parse_devices(bad)
        assert info.value.variable == "TOPS_JOB_DEVICES"


def test_worst_exit_prefers_the_most_serious_code():
    assert worst_exit([0, 0]) == ExitCode.OK
    assert worst_exit([0, 3]) == ExitCode.PENDING
    assert worst_exit([3, 5, 0]) == ExitCode.DEVICE_ERROR
    assert worst_exit([143, 0]) == ExitCode.TERMINATED
    assert worst_exit([0, 77]) == ExitCode.INTERNAL_ERROR


def test_child_environment_separates_workers(tmp_path):
    env = child_environment({"TOPS_JOB_OUTBOX_DIR": "/o", "TOPS_JOB_DEVICES": "all", "TOPS_JOB_SUMMARY": "/s/sum.json"},
                            1, data_dir=tmp_path, run_id="r", health_port=8082)
    assert env["CUDA_VISIBLE_DEVICES"] == "1" and env["TOPS_JOB_RUN_ID"] == "r-gpu1"
    assert env["TOPS_JOB_DATA_DIR"] == str(tmp_path / "gpu1") and env["TOPS_JOB_OUTBOX_DIR"] == "/o/gpu1"
    assert env["TOPS_JOB_SUMMARY"] == "/s/sum.gpu1.json"
    assert env["TOPS_JOB_HEALTH_PORT"] == "8083" and env["METRICS_ENABLED"] == "1" and "TOPS_JOB_DEVICES" not in env


def test_devices_run_one_worker_per_device(isolated_env, tmp_path):
    """On the CPU backend the same launcher runs two workers: each writes its own ledger and
    summary under <data>/gpuN, and the parent exits with their combined code."""
    env = dict(os.environ, TOPS_JOB_RUN_ID="fleet")
    receipts = tmp_path / "receipts.jsonl"
    result = subprocess.run([sys.executable, "-m", "tops_job.cli", "run", "--devices", "0,1", "--backend", "numpy",
                             "--attempts", "2", "--size", "16", "--receipts-out", str(receipts)],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for device in (0, 1):  # a file option becomes one file per worker
        lines = (tmp_path / f"receipts.gpu{device}.jsonl").read_text().splitlines()
        assert [json.loads(line)["run_id"] for line in lines] == [f"fleet-gpu{device}"] * 2
    for device in (0, 1):
        data = isolated_env["data"] / f"gpu{device}"
        summary = json.loads((data / "summaries" / f"fleet-gpu{device}.json").read_text())
        assert summary["receipts"]["accepted"] == 2
        ledger = [json.loads(line) for line in (data / "ledger.jsonl").read_text().splitlines()]
        assert {entry["receipt"]["run_id"] for entry in ledger} == {f"fleet-gpu{device}"}
