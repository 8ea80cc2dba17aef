"""Traces and metrics of real runs, as an OTLP/HTTP collector on loopback receives them."""

from __future__ import annotations

import signal
import socket
import time

import pytest

from tests.support.health import wait_for_attempts
from tops_job.errors import ExitCode

STAGES = ["inputs", "product", "commitment", "signing"]


def otlp_env(job_env: dict[str, str], endpoint: str, **extra: str) -> dict[str, str]:
    return {**job_env, "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, **extra}


def test_run_exports_span_tree_resource_and_metrics(receiver, job_env, start_job):
    env = otlp_env(job_env, receiver.endpoint, TOPS_JOB_RUN_ID="otlp-run-1", OTEL_SERVICE_NAME="tops-job-test",
                   OTEL_RESOURCE_ATTRIBUTES="deployment.environment=ci,tops_job.run_id=ignored-by-operator",
                   KUBERNETES_SERVICE_HOST="10.0.0.1", HOSTNAME="tops-job-abc12", JOB_COMPLETION_INDEX="7",
                   SLURM_JOB_ID="4242", SLURM_ARRAY_TASK_ID="3", AWS_BATCH_JOB_ID="batch-1")
    job = start_job(["run", "--size", "64", "--attempts", "3"], env)
    assert job.wait() == 0, job.stderr()

    spans = receiver.spans()
    by_id = {span["span_id"]: span for span in spans}
    (run,) = [s for s in spans if s["name"] == "run"]
    assert run["parent"] == ""
    assert run["attributes"]["tops_job.exit_code"] == 0
    assert {s["trace_id"] for s in spans} == {run["trace_id"]}, "one trace per run"
    attempts = sorted((s for s in spans if s["name"] == "attempt"), key=lambda s: s["attributes"]["tops_job.attempt"])
    assert [s["attributes"]["tops_job.attempt"] for s in attempts] == [0, 1, 2]
    for attempt in attempts:
        assert attempt["parent"] == run["span_id"]
        assert len(attempt["attributes"]["tops_job.digest"]) == 64
        stages = sorted((s for s in spans if s["parent"] == attempt["span_id"]), key=lambda s: s["start"])
        assert [s["name"] for s in stages] == STAGES
    (drain,) = [s for s in spans if s["name"] == "drain"]
    assert drain["parent"] == run["span_id"]
    assert not [s for s in spans if s["name"] == "autotune"], "--size skips autotune"
    assert all(s["parent"] in by_id or s is run for s in spans)

    resource = run["resource"]
    assert resource["service.name"] == "tops-job-test"  # OTEL_SERVICE_NAME wins
    assert resource["deployment.environment"] == "ci"
    assert resource["tops_job.run_id"] == "ignored-by-operator"  # the operator's attributes win over ours
    assert resource["service.version"]
    assert resource["tops_job.did"].startswith("did:peaq:0x")
    assert resource["tops_job.backend"] == "numpy" and resource["tops_job.device.model"]
    assert resource["host.name"]
    assert resource["k8s.pod.name"] == "tops-job-abc12" and resource["k8s.job.completion_index"] == "7"
    assert resource["slurm.job.id"] == "4242" and resource["slurm.array.task_id"] == "3"
    assert resource["aws.batch.job.id"] == "batch-1"

    points = receiver.metric_points()
    (ok,) = points["tops_job.attempts"]
    assert ok["attributes"] == {"outcome": "ok", "error_class": "none"} and ok["value"] == 3
    assert ok["unit"] == "{attempt}" and ok["kind"] == "sum"
    (accepted,) = points["tops_job.receipts"]
    assert accepted["attributes"] == {"outcome": "accepted"} and accepted["value"] == 3
    for name in ("tops_job.product.duration", "tops_job.attempt.duration", "tops_job.submit.latency"):
        (hist,) = points[name]
        assert hist["kind"] == "histogram" and hist["unit"] == "s" and hist["count"] == 3, name
        assert 0 < hist["sum"] < 60 and hist["bounds"][0] <= 0.001
    (ops,) = points["tops_job.ops"]
    assert ops["unit"] == "{op}/s" and ops["value"] > 0
    assert points["tops_job.outbox.depth"][0]["value"] == 0
    assert points["tops_job.breaker.state"][0]["value"] == 0
    assert abs(points["tops_job.last_success.timestamp"][0]["value"] - time.time()) < 120
    assert ok["resource"]["tops_job.did"] == resource["tops_job.did"]


def test_sigterm_still_flushes_traces_and_metrics(receiver, job_env, start_job):
    # Exports only at shutdown: nothing is sent on a schedule during this run.
    env = otlp_env(job_env, receiver.endpoint, OTEL_BSP_SCHEDULE_DELAY="600000",
                   OTEL_METRIC_EXPORT_INTERVAL="600000")
    job = start_job(["run", "--size", "64", "--attempts", "1000000", "--health-port", "0"], env)
    port = job.health_port()
    wait_for_attempts(port, 3)
    assert receiver.spans() == [], "the batch processor was asked to hold spans until shutdown"
    job.proc.send_signal(signal.SIGTERM)
    assert job.wait(timeout=30) == int(ExitCode.TERMINATED), job.stderr()

    spans = receiver.spans()
    (run,) = [s for s in spans if s["name"] == "run"]
    assert run["attributes"]["tops_job.exit_code"] == int(ExitCode.TERMINATED)
    attempts = [s for s in spans if s["name"] == "attempt"]
    assert len(attempts) >= 3
    assert [s for s in spans if s["name"] == "drain"]
    total = sum(p["value"] for p in receiver.metric_points()["tops_job.attempts"])
    assert total >= len(attempts)  # batch processor may drop none here; metrics count every attempt


def _blackhole() -> socket.socket:
    """Accepts connections into the backlog and never answers: a hung collector."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock


def _refusing_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


@pytest.mark.parametrize("collector", ["hung", "refusing"])
def test_dead_collector_delays_exit_no_more_than_the_bound(collector, job_env, start_job, tmp_path):
    bound = 1.5
    args = ["run", "--size", "64", "--attempts", "3"]
    baseline = start_job(args, dict(job_env))
    assert baseline.wait() == 0, baseline.stderr()

    hole = _blackhole() if collector == "hung" else None
    port = hole.getsockname()[1] if hole else _refusing_port()
    try:
        env = otlp_env(job_env, f"http://127.0.0.1:{port}", TOPS_JOB_OTEL_EXPORT_TIMEOUT=str(bound))
        job = start_job(args, env)
        assert job.wait(timeout=60) == 0, job.stderr()
    finally:
        if hole:
            hole.close()
    delay = job.wall_s - baseline.wall_s
    print(f"\n[{collector} collector] exit delay {delay:.2f} s (bound {bound} s; "
          f"baseline run {baseline.wall_s:.2f} s, with dead collector {job.wall_s:.2f} s)")
    assert delay <= bound + 1.0, f"exit delayed {delay:.2f} s by a {collector} collector; bound {bound} s"
    if collector == "hung":
        assert "did not finish within" in job.stderr()


def test_console_exporter_and_bad_exporter_name(job_env, start_job):
    job = start_job(["run", "--size", "32", "--attempts", "1"],
                    {**job_env, "OTEL_TRACES_EXPORTER": "console", "OTEL_METRICS_EXPORTER": "none"})
    assert job.wait() == 0, job.stderr()
    assert '"name": "attempt"' in job.stderr()
    bad = start_job(["run", "--size", "32", "--attempts", "1"], {**job_env, "OTEL_TRACES_EXPORTER": "zipkin"})
    assert bad.wait() == 2
    assert "OTEL_TRACES_EXPORTER" in bad.stderr()


def test_runs_in_one_process_each_get_their_own_resource(receiver, monkeypatch):
    """The global tracer provider is set once per process; each run still exports under
    its own resource (run id) and nothing is lost between runs."""
    from click.testing import CliRunner

    from tests.support.health import SECRET_HEX
    from tops_job.cli import cli

    monkeypatch.setenv("WORKER_SK_HEX", SECRET_HEX)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    for run_id in ("in-process-1", "in-process-2"):
        monkeypatch.setenv("TOPS_JOB_RUN_ID", run_id)
        result = CliRunner().invoke(cli, ["run", "--size", "32", "--attempts", "2"])
        assert result.exit_code == 0, result.output
    runs = {s["resource"]["tops_job.run_id"]: s for s in receiver.spans() if s["name"] == "run"}
    assert set(runs) == {"in-process-1", "in-process-2"}
    assert runs["in-process-1"]["trace_id"] != runs["in-process-2"]["trace_id"]
    attempts = [s for s in receiver.spans() if s["name"] == "attempt"]
    assert sorted(s["resource"]["tops_job.run_id"] for s in attempts) == ["in-process-1"] * 2 + ["in-process-2"] * 2


def test_bad_export_timeout_is_a_usage_error(job_env, start_job):
    job = start_job(["run", "--size", "32", "--attempts", "1"], {**job_env, "TOPS_JOB_OTEL_EXPORT_TIMEOUT": "soon"})
    assert job.wait() == 2
    assert "TOPS_JOB_OTEL_EXPORT_TIMEOUT" in job.stderr()


def test_bad_metric_export_interval_is_a_usage_error(job_env, start_job):
    job = start_job(["run", "--size", "32", "--attempts", "1"],
                    {**job_env, "OTEL_METRICS_EXPORTER": "console", "OTEL_METRIC_EXPORT_INTERVAL": "soon"})
    assert job.wait() == 2
    assert "OTEL_METRIC_EXPORT_INTERVAL" in job.stderr() and "Traceback" not in job.stderr()


def test_submissions_are_spans_with_retries_as_events(receiver, job_env, start_job, tmp_path):
    """Against the reference aggregator behind a proxy that answers 503 first: each receipt
    is one `submit` span; the retry is an event on it; the rate limiter's wait is measured."""
    from tests.support.peers import Aggregator, FaultProxy

    aggregator = Aggregator(tmp_path / "agg.sqlite3")
    proxy = FaultProxy(aggregator.base)
    proxy.faults.append("503")
    try:
        env = otlp_env(job_env, receiver.endpoint, TOPS_JOB_RETRY_BASE="0.05", RATE_LIMIT_PER_SECOND="50",
                       TOPS_JOB_PROTOCOL="v1")  # the v1 sender's submit spans
        job = start_job(["run", "--size", "32", "--attempts", "3", "--aggregator-url", proxy.url,
                         "--no-challenge"], env)
        assert job.wait() == 0, job.stderr()
    finally:
        proxy.close()
        aggregator.stop()
    spans = receiver.spans()
    submits = [s for s in spans if s["name"] == "submit"]
    assert len(submits) == 3 and all(s["attributes"]["tops_job.outcome"] == "accepted" for s in submits)
    retried = [s for s in submits if s["events"]]
    assert len(retried) == 1
    (event_name, event_attrs), = retried[0]["events"]
    assert event_name == "retry" and event_attrs["http.response.status_code"] == 503
    assert retried[0]["attributes"]["tops_job.sends"] == 2
    (wait,) = receiver.metric_points()["tops_job.rate_limiter.wait"]
    assert wait["kind"] == "histogram" and wait["count"] == 3
