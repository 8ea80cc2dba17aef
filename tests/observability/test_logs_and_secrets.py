"""JSON log lines (run id, attempt, trace and span ids), and the worker key in no output."""

from __future__ import annotations

import json
import signal

from tests.support.health import SECRET_HEX, get, wait_for_attempts


def test_default_logs_are_human_lines(job_env, start_job):
    job = start_job(["run", "--size", "32", "--attempts", "1"], job_env)
    assert job.wait() == 0, job.stderr()
    first = job.stderr().splitlines()[0]
    assert first.startswith("[config]") and not first.startswith("{")


def test_json_logs_carry_run_attempt_and_trace_ids(receiver, job_env, start_job):
    env = {**job_env, "TOPS_JOB_LOG_FORMAT": "json", "TOPS_JOB_RUN_ID": "json-logs-1",
           "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}
    job = start_job(["-v", "run", "--size", "32", "--attempts", "3"], env)
    assert job.wait() == 0, job.stderr()
    lines = [line for line in job.stderr().splitlines() if line.startswith("{")]
    entries = [json.loads(line) for line in lines]
    assert entries and all({"timestamp", "level", "message", "run_id"} <= set(e) for e in entries)
    assert {e["run_id"] for e in entries} == {"json-logs-1"}
    in_attempts = [e for e in entries if e["message"].startswith("[run] attempt")]
    assert [e["attempt"] for e in in_attempts] == [0, 1, 2]
    (run_span,) = [s for s in receiver.spans() if s["name"] == "run"]
    assert {e["trace_id"] for e in in_attempts} == {run_span["trace_id"]}
    assert all(len(e["span_id"]) == 16 for e in in_attempts)
    assert not any("attempt" in e for e in entries if e["message"].startswith("[config]"))


def test_the_worker_key_appears_in_no_output(receiver, job_env, start_job, tmp_path):
    textfile, summary, receipts = tmp_path / "m.prom", tmp_path / "summary.json", tmp_path / "receipts.jsonl"
    env = {**job_env, "TOPS_JOB_LOG_FORMAT": "json", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
           "OTEL_TRACES_EXPORTER": "otlp,console", "WORKER_DEBUG_RECEIPT": "1", "TOPS_JOB_HEALTH_HOST": "127.0.0.1"}
    job = start_job(["-v", "run", "--size", "32", "--attempts", "100000", "--health-port", "0",
                     "--metrics-textfile", str(textfile), "--summary", str(summary),
                     "--receipts-out", str(receipts)], env)
    port = job.health_port()
    wait_for_attempts(port, 3)
    served = b"".join(get(port, path)[2] for path in ("/health", "/metrics", "/metrics.json", "/"))
    job.proc.send_signal(signal.SIGTERM)
    job.wait(timeout=30)

    outputs = {
        "stderr": job.stderr_path.read_bytes(), "stdout": job.stdout_path.read_bytes(), "served": served,
        "otlp": b"".join(receiver.raw), "textfile": textfile.read_bytes(), "summary": summary.read_bytes(),
        "receipts": receipts.read_bytes(),
    }
    for path in (tmp_path / "data").rglob("*"):
        if path.is_file():
            outputs[str(path)] = path.read_bytes()
    assert receiver.raw and outputs["summary"] and outputs["receipts"]
    secret = bytes.fromhex(SECRET_HEX)
    for name, data in outputs.items():
        for needle in (SECRET_HEX.encode(), SECRET_HEX.upper().encode(), secret):
            assert needle not in data, f"the worker key leaked into {name}"
