"""End to end: real `tops-job` processes with the plugin configured against the moto server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tops_job.spec.signing import is_low_s

TOPS_JOB = [sys.executable, "-m", "tops_job.cli"]


def tops_job(*args: str, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    result = subprocess.run([*TOPS_JOB, *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        pytest.fail(f"tops-job {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
    return result


def test_kms_signed_run_verifies_and_summary_lands_in_s3(aws_env, kms_key, s3, bucket, tmp_path):
    receipts, summary = tmp_path / "receipts.jsonl", tmp_path / "summary.json"
    env = {"TOPS_JOB_KMS_KEY_ID": kms_key, "TOPS_JOB_SIGNER": "kms", "TOPS_JOB_S3_SUMMARY_URL": f"s3://{bucket}/runs"}
    run = tops_job("run", "--size", "64", "--attempts", "2", "--receipts-out", str(receipts),
                   "--summary", str(summary), **env)
    assert "(plugin signer)" in run.stderr
    key = json.loads(tops_job("aws", "key", **env).stdout)

    lines = [json.loads(line) for line in receipts.read_text().splitlines()]
    assert len(lines) == 2
    for receipt in lines:
        assert receipt["pubkey"] == key["pubkey"] and receipt["did"] == key["did"]
        assert is_low_s(bytes.fromhex(receipt["sig"]))
    verify = tops_job("verify", "--full", str(receipts))
    assert verify.stdout.count(": ok ") == 2

    written = json.loads(summary.read_text())
    uploaded = json.loads(s3.get_object(Bucket=bucket, Key=f"runs/{written['run_id']}.json")["Body"].read())
    assert uploaded["run_id"] == written["run_id"] and uploaded["receipts"]["accepted"] == 2
    assert written["plugin_failures"] == {}
    assert not (Path(aws_env["TOPS_JOB_CONFIG_DIR"]) / "worker.key").exists()  # no local key made


def test_failed_summary_upload_is_counted_and_the_receipts_are_kept(aws_env, kms_key, tmp_path):
    summary = tmp_path / "summary.json"
    run = tops_job("run", "--size", "64", "--attempts", "2", "--summary", str(summary),
                   TOPS_JOB_KMS_KEY_ID=kms_key, TOPS_JOB_S3_SUMMARY_URL="s3://no-such-bucket-here/runs")
    assert "aws: hook tops_job_run_finished failed" in run.stderr
    written = json.loads(summary.read_text())
    assert written["plugin_failures"] == {"aws.tops_job_run_finished": 1}
    assert written["receipts"]["accepted"] == 2
    ledger = Path(aws_env["TOPS_JOB_DATA_DIR"]) / "ledger.jsonl"
    assert len(ledger.read_text().splitlines()) == 2


def test_autotune_profile_is_shared_through_s3(aws_env, s3, bucket, tmp_path):
    env = {"TOPS_JOB_S3_PROFILE_URL": f"s3://{bucket}/profiles"}
    first = tops_job("autotune", "--backend", "numpy", "--target-ms", "5", **env)
    profile = json.loads(first.stdout)
    assert profile["path"].startswith(f"s3://{bucket}/profiles/profile-numpy-")
    # Another worker with an empty local cache finds it in the bucket.
    second = tops_job("autotune", "--backend", "numpy", "--target-ms", "5",
                      TOPS_JOB_CACHE_DIR=str(tmp_path / "other-cache"), **env)
    assert f"using cached profile {profile['path']}" in second.stderr
    assert json.loads(second.stdout)["m"] == profile["m"]


def test_required_kms_signer_missing_stops_the_run(aws_env):
    run = tops_job("run", "--size", "64", "--attempts", "1", "--signer", "kms", check=False,
                   TOPS_JOB_DISABLE_PLUGINS="aws")
    assert run.returncode == 2
    assert "TOPS_JOB_SIGNER: signer 'kms' was asked for but 'local-key' answered" in run.stderr
