"""The device guard in a real run (CLI, NumPy backend, local ledger): the start-up self-test
and the background self-audit stop a run whose device computes wrongly, with exit 5, the
device named, and only verified receipts delivered."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.support import read_jsonl
from tops_job.cli import cli
from tops_job.compute import selftest
from tops_job.compute.base import Shape
from tops_job.compute.numpy_backend import NumpyBackend
from tops_job.errors import ExitCode
from tops_job.job.attempt import Identity, run_attempt
from tops_job.job.device_guard import DeviceGuard, SelfAuditFailed
from tops_job.spec.signing import LocalKeySigner


class FaultyCpu(NumpyBackend):
    """A CPU whose products go wrong from the `bad_from`-th timed product (the self-test's
    product not counted): every value off by one, so that any opening shows it."""

    bad_from = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.products = 0

    def multiply(self):
        elapsed = super().multiply()
        if self.shape == selftest.SHAPE and self.bad_from > 0:
            return elapsed  # passes the self-test: the fault is in the run
        self.products += 1
        if self.products > self.bad_from:
            self.c += 1.0
        return elapsed


def run_with(monkeypatch, backend_cls, *args):
    monkeypatch.setattr("tops_job.job.build.create_backend", lambda *a, **k: backend_cls("float32", threads=1))
    return CliRunner().invoke(cli, ["run", "--size", "24,40,56", "--tile", "8", *args], catch_exceptions=False)


def summary_of(isolated_env) -> dict:
    (path,) = (isolated_env["data"] / "summaries").glob("*.json")
    return json.loads(path.read_text())


def test_a_healthy_run_self_tests_and_audits_every_nth_receipt_in_order(isolated_env):
    result = CliRunner().invoke(cli, ["run", "--backend", "numpy", "--size", "24,40,56", "-n", "7",
                                      "--audit-every", "3"], catch_exceptions=False)
    assert result.exit_code == ExitCode.OK, result.output
    checks = summary_of(isolated_env)["device_checks"]
    assert checks["selftest"]["ok"] and checks["selftest"]["seconds"] > 0
    assert checks["self_audit"]["audited"] == 3 and checks["self_audit"]["failure"] is None  # attempts 0, 3, 6
    ledger = read_jsonl(isolated_env["data"] / "ledger.jsonl")
    assert [e["receipt"]["attempt"] for e in ledger] == list(range(7))  # held receipts keep their place
    assert "self-test: passed" in result.output and "self-audit: 3 receipts verified" in result.output


def test_a_device_that_fails_the_selftest_exits_5_before_any_receipt(isolated_env, monkeypatch):
    result = run_with(monkeypatch, FaultyCpu, "-n", "3")
    assert result.exit_code == ExitCode.DEVICE_ERROR, result.output
    assert "self-test failed" in result.output and "product differ" in result.output
    summary = summary_of(isolated_env)
    assert summary["device_checks"]["selftest"]["stage"] == "product"
    assert summary["attempts"]["ok"] == 0 and summary["errors_by_class"] == {"gpu": 1}
    assert not (isolated_env["data"] / "ledger.jsonl").exists() or not read_jsonl(isolated_env["data"] / "ledger.jsonl")


def test_a_failed_self_audit_stops_the_run_names_the_device_and_withholds_the_receipt(isolated_env, monkeypatch):
    class LateFault(FaultyCpu):
        bad_from = 2  # attempts 0 and 1 are right, 2 onwards wrong

    result = run_with(monkeypatch, LateFault, "-n", "300", "--audit-every", "2")
    assert result.exit_code == ExitCode.DEVICE_ERROR, result.output
    summary = summary_of(isolated_env)
    failure = summary["device_checks"]["self_audit"]["failure"]
    assert failure["attempt"] == 2 and failure["reason"] == "sample" and "wrong_product" in failure["error"]
    assert failure["device"] == summary["device"]["model"]  # the CPU has no bus id or UUID
    assert summary["errors_by_class"].get("gpu") == 1 and summary["error"]["class"] == "gpu"
    assert summary["attempts"]["ok"] < 300  # stopped early (the audit runs beside the attempts)
    assert "DEVICE UNTRUSTWORTHY" in result.output and "self-audit" in result.output
    delivered = [e["receipt"]["attempt"] for e in read_jsonl(isolated_env["data"] / "ledger.jsonl")]
    assert 2 not in delivered and delivered[:2] == [0, 1]


def identity():
    return Identity(did="did:peaq:0xguard", signer=LocalKeySigner(bytes(range(1, 33))))


def test_attempts_nvml_flags_are_audited_and_a_failure_is_a_span_event():
    class Throttled(FaultyCpu):
        bad_from = 1

        def telemetry(self):
            return {"throttled": 1} if self.products == 2 else {}

    backend = Throttled("float32", threads=1)
    guard = DeviceGuard(backend, selftest=True, audit_every=100)
    failures = []
    guard.attach(failures.append)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    try:
        guard.start()
        held, settled = [], []
        for attempt in range(3):
            result = run_attempt(backend, Shape(16, 24, 8), identity(), run_id="guard", attempt=attempt, tile=8, opens=16)
            if guard.take(attempt, result):
                held.append(attempt)
            settled += guard.settled()
        settled += guard.finish()
        with provider.get_tracer("test").start_as_current_span("run"):
            error = guard.pending_failure()
    finally:
        backend.close()
    assert isinstance(error, SelfAuditFailed) and error.exit_code == ExitCode.DEVICE_ERROR
    assert guard.failure.attempt == 1 and guard.failure.reason == "throttled" and guard.flagged == 1
    assert held == [0, 1]  # 0: sampled; 1: flagged; 2: not audited (stored and sent at once)
    assert [(s.attempt, s.ok) for s in settled] == [(0, True), (1, False)]  # 0 is released, 1 withheld
    assert failures == ["gpu"]
    (span,) = exporter.get_finished_spans()
    (event,) = span.events
    assert event.name == "device.self_audit_failed" and event.attributes["tops_job.device"] == guard.device


@pytest.mark.parametrize("every", [-1])
def test_bad_audit_interval_is_rejected(every):
    with pytest.raises(ValueError):
        DeviceGuard(NumpyBackend("float32", threads=1), audit_every=every)


def test_metrics_name_the_device_of_a_failed_check():
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from tops_job.observability.metrics import RunMetrics

    reader = InMemoryMetricReader()
    metrics = RunMetrics(MeterProvider(metric_readers=[reader]).get_meter("t"))
    metrics.record_device_checks({"device": "H200 0000:17:00.0 GPU-1", "selftest": {"ok": True},
                                  "self_audit": {"failure": {"attempt": 3}},
                                  "health": {"changes": {"ecc_uncorrected": 2, "xid_last": 79}}})
    points = {m.name: list(m.data.data_points) for rm in reader.get_metrics_data().resource_metrics
              for sm in rm.scope_metrics for m in sm.metrics}
    by_check = {p.attributes["check"]: p for p in points["tops_job.device.check_failures"]}
    assert by_check["selftest"].value == 0  # a passed self-test still makes the series
    assert by_check["self_audit"].value == 1 and by_check["self_audit"].attributes == {
        "check": "self_audit", "device": "H200 0000:17:00.0 GPU-1", "stage": "receipt"}
    (health,) = points["tops_job.device.health_changes"]
    assert health.value == 2 and health.attributes["counter"] == "ecc_uncorrected"




def test_a_sink_failing_on_receipts_released_at_the_end_still_summarises(isolated_env):
    # Every receipt held for audit: stored, then written out at once (it is durable already).
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    result = CliRunner().invoke(cli, ["run", "--backend", "numpy", "--size", "8", "-n", "3", "--audit-every", "1",
                                      "--receipts-out", "/dev/full"], catch_exceptions=False)
    assert result.exit_code == ExitCode.STORAGE_ERROR, result.output  # a full disk: retried elsewhere
    summary = summary_of(isolated_env)
    assert "No space left" in summary["error"]["message"] and summary["errors_by_class"] == {"storage": 1}
    assert len(read_jsonl(isolated_env["data"] / "ledger.jsonl")) >= 1  # in the outbox before the sink failed


def test_a_run_on_the_emulated_gpu_whose_kernels_do_not_build_falls_back_and_says_so(isolated_env, monkeypatch):
    from tests.support import fake_cupy

    device = fake_cupy.install(monkeypatch)
    device.compile_error = "nvrtc: error: unknown option"
    args = ["run", "--backend", "cupy", "--dtype", "bfloat16", "--size", "32,48,24", "--tile", "8", "-n", "3",
            "--audit-every", "1"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == ExitCode.OK, result.output
    checks = summary_of(isolated_env)["device_checks"]
    assert "NVRTC cannot build" in checks["fallback"] and checks["selftest"]["ok"]
    assert checks["self_audit"]["audited"] == 3 and checks["self_audit"]["failure"] is None
    assert "inputs and commitment ran on the host" in result.output
    assert len(read_jsonl(isolated_env["data"] / "ledger.jsonl")) == 3  # verified by the ledger too
    strict = CliRunner().invoke(cli, [*args, "--strict-device"], catch_exceptions=False)
    assert strict.exit_code == ExitCode.DEVICE_ERROR and "strict-device" in strict.output


def test_a_flagged_attempt_is_verified_in_full():
    # One wrong column in 1024: the aggregator's 8 random columns per opening would miss it
    # about 9 times in 10; a flagged attempt has every revealed value recomputed.
    class OneBadColumn(NumpyBackend):
        def multiply(self):
            elapsed = super().multiply()
            if self.shape != selftest.SHAPE:
                self.c[:, 700] += 1.0
            return elapsed

        def telemetry(self):
            return {"ecc_uncorrected_new": 1}

    backend = OneBadColumn("float32", threads=1)
    guard = DeviceGuard(backend, selftest=False, audit_every=1000)
    try:
        guard.start()
        result = run_attempt(backend, Shape(8, 1024, 8), identity(), run_id="full", attempt=1, tile=1024, opens=16)
        assert guard.take(1, result) is True
        (settled,) = guard.finish()
    finally:
        backend.close()
    assert guard.failure is not None and guard.failure.reason == "ecc_uncorrected_new"
    assert "wrong_product" in guard.failure.error
    assert not settled.ok and settled.digest == result.digest and "wrong_product" in (settled.error or "")
