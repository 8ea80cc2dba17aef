"""The CLI as a user meets it (click's CliRunner, the real library underneath)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.support import TEST_KEY, VECTORS_DIR, read_jsonl
from tops_job import __version__
from tops_job.cli import cli
from tops_job.errors import ExitCode


def invoke(*args: str, env: dict | None = None):
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and __version__ in result.output


@pytest.mark.parametrize("command", [[], ["run"], ["autotune"], ["verify"], ["keys"], ["keys", "show"],
                                     ["keys", "generate"], ["aggregator"]])
def test_every_command_has_help(command):
    result = invoke(*command, "--help")
    assert result.exit_code == 0 and "Usage:" in result.output


def test_tiny_run_writes_verified_ledger_summary_and_receipts(isolated_env, tmp_path):
    out = tmp_path / "receipts.jsonl"
    result = invoke("run", "--attempts", "3", "--size", "24,40,56", "--tile", "16", "--receipts-out", str(out))
    assert result.exit_code == ExitCode.OK, result.output
    ledger = isolated_env["data"] / "ledger.jsonl"
    assert f"ledger {ledger}" in result.output or str(ledger) in result.output
    assert "[config] Loaded configuration:" in result.output
    receipts = read_jsonl(out)
    assert [r["attempt"] for r in receipts] == [0, 1, 2]
    assert len({r["run_id"] for r in receipts}) == 1
    entries = read_jsonl(ledger)
    assert [e["receipt"] for e in entries] == receipts
    summary_path = isolated_env["data"] / "summaries" / f"{receipts[0]['run_id']}.json"
    summary = json.loads(summary_path.read_text())
    assert summary["exit_code"] == 0 and summary["attempts"]["ok"] == 3
    assert summary["receipts"]["accepted"] == 3 and summary["device"]["backend"] == "numpy"
    assert summary["profile"]["source"] == "--size" and summary["timings"]["product_ms"]["p95"] >= 0
    assert "attempts: 3 (3 ok" in result.output and "GFLOP/s" in result.output
    verified = invoke("verify", str(out))
    assert verified.exit_code == 0 and verified.output.count(": ok ") == 3


def test_debug_receipt_prints_each_receipt_as_a_json_line(monkeypatch):
    monkeypatch.setenv("WORKER_DEBUG_RECEIPT", "1")
    result = invoke("run", "--attempts", "2", "--size", "8")
    lines = [json.loads(line) for line in result.output.splitlines() if line.startswith('{"attempt"')]
    assert [r["attempt"] for r in lines] == [0, 1] and all("sig" in r for r in lines)


def test_verify_keeps_freed_memory_for_the_next_receipt(monkeypatch):
    """The heap setting that nearly halves `verify`'s CPU on large receipts (benchmarks/verify_bench.py)
    is applied before the first receipt."""
    applied = []
    monkeypatch.setattr("tops_job.heap.keep_freed_memory", lambda: applied.append(True) or True)
    result = invoke("verify", str(VECTORS_DIR / "valid.jsonl"))
    assert result.exit_code == 0 and applied == [True]


def test_verify_accepts_valid_vectors_and_rejects_invalid_ones():
    valid = invoke("verify", str(VECTORS_DIR / "valid.jsonl"))
    assert valid.exit_code == 0 and valid.output.count(": ok ") == 6
    invalid = invoke("verify", str(VECTORS_DIR / "invalid.jsonl"))
    assert invalid.exit_code == 1
    assert invalid.output.count(": invalid: ") == len(read_jsonl(VECTORS_DIR / "invalid.jsonl"))


def test_verify_reports_garbage_lines(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"did": "x"}\nnot json\n')
    result = invoke("verify", str(path))
    assert result.exit_code == 1 and "malformed_json" in result.output and "missing_field" in result.output


def test_keys_generate_writes_0600_and_never_overwrites(tmp_path):
    path = tmp_path / "k" / "worker.key"
    first = invoke("keys", "generate", str(path))
    assert first.exit_code == 0 and json.loads(first.output)["did"].startswith("did:peaq:0x")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = invoke("keys", "generate", str(path))
    assert again.exit_code == ExitCode.CONFIG_ERROR and "refusing to overwrite" in again.output
    shown = invoke("keys", "show", env={"TOPS_JOB_KEY_FILE": str(path)})
    assert json.loads(shown.output)["pubkey"] == json.loads(first.output)["pubkey"]
    assert path.read_text().strip() not in shown.output


def test_cupy_backend_without_gpu_is_a_device_error():
    pytest.importorskip("numpy")
    from tops_job.compute import gpu_available

    if gpu_available():
        pytest.skip("a GPU is present: this test checks the no-GPU error")
    result = invoke("run", "--backend", "cupy", "--attempts", "1", "--size", "8")
    assert result.exit_code == ExitCode.DEVICE_ERROR and "CUDA" in result.output


def test_unwritable_ledger_directory_is_a_clear_error(tmp_path, monkeypatch):
    if os.geteuid() == 0:
        # root ignores permissions; a path under a regular file can't be created by anyone.
        blocker = tmp_path / "file"
        blocker.write_text("")
        ledger = blocker / "ledger.jsonl"
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        ledger = locked / "sub" / "ledger.jsonl"
    result = invoke("run", "--attempts", "1", "--size", "8", "--ledger", str(ledger))
    assert result.exit_code == ExitCode.CONFIG_ERROR
    assert "cannot open ledger" in result.output and str(ledger) in result.output


def test_autotune_logs_probes_caches_and_run_reuses_the_profile(isolated_env, caplog):
    result = invoke("autotune", "--target-ms", "15")
    assert result.exit_code == 0, result.output
    profile = json.loads(result.output.strip().splitlines()[-1])
    path = Path(profile["path"])
    assert path.parent == isolated_env["cache"] and path.exists()
    assert profile["m"] == profile["n"] == profile["k"] and profile["m"] % 64 == 0
    cached = invoke("autotune", "--target-ms", "15")
    assert json.loads(cached.output.strip().splitlines()[-1])["m"] == profile["m"]
    run = invoke("run", "--attempts", "1", "--target-ms", "15")
    assert run.exit_code == 0
    assert "using cached profile" in run.output and "-> " not in run.output.split("using cached profile")[0]


def test_autotune_log_lines_follow_the_seed_format(caplog):
    import logging
    import re

    from tops_job.compute.autotune import autotune
    from tops_job.compute.numpy_backend import NumpyBackend

    backend = NumpyBackend()
    logger = logging.getLogger("tops_job.autotune")
    logger.addHandler(caplog.handler)  # the CLI's logger does not propagate to the root
    try:
        with caplog.at_level(logging.INFO, logger="tops_job.autotune"):
            profile = autotune(backend, 10, start=64, step=64)
    finally:
        logger.removeHandler(caplog.handler)
        backend.close()
    probes = [r.getMessage() for r in caplog.records if "->" in r.getMessage()]
    assert probes and all(re.fullmatch(r"\[autotune\] m,n,k=\((\d+),\1,\1\) -> \d+ ms \(\|diff\|=\d+\)", p) for p in probes)
    assert f"[autotune] chosen m,n,k=({profile.m},{profile.m},{profile.m})" in caplog.text


@pytest.mark.parametrize("content", ["{not json", '{"m": 0}', json.dumps({"version": 99}), ""])
def test_corrupt_profile_cache_is_rebuilt_with_a_warning(isolated_env, content):
    first = invoke("autotune", "--target-ms", "10")
    path = Path(json.loads(first.output.strip().splitlines()[-1])["path"])
    path.write_text(content)
    again = invoke("autotune", "--target-ms", "10")
    assert again.exit_code == 0
    assert "rebuilding" in again.output
    assert json.loads(path.read_text())["m"] >= 64


def test_profile_for_another_device_is_rebuilt(isolated_env):
    first = invoke("autotune", "--target-ms", "10")
    path = Path(json.loads(first.output.strip().splitlines()[-1])["path"])
    data = json.loads(path.read_text())
    data["device"] = "some other cpu"
    path.write_text(json.dumps(data))
    again = invoke("autotune", "--target-ms", "10")
    assert "was made for" in again.output and json.loads(path.read_text())["device"] != "some other cpu"


def test_autotuned_size_run_receipts_verify(tmp_path):
    """The default 300 ms target: the shape the job really runs at."""
    out = tmp_path / "receipts.jsonl"
    result = invoke("run", "--attempts", "2", "--receipts-out", str(out))
    assert result.exit_code == 0, result.output
    receipts = read_jsonl(out)
    assert receipts[0]["m"] >= 512 and len(receipts) == 2
    verified = invoke("verify", "--full", str(out))
    assert verified.exit_code == 0, verified.output


def test_spec_key_signs_receipts_that_verify(monkeypatch, tmp_path):
    monkeypatch.setenv("WORKER_SK_HEX", TEST_KEY["secret_key_hex"])
    monkeypatch.setenv("DEVICE_DID", TEST_KEY["did"])
    out = tmp_path / "r.jsonl"
    assert invoke("run", "--attempts", "1", "--size", "16", "--receipts-out", str(out)).exit_code == 0
    receipt = read_jsonl(out)[0]
    assert receipt["pubkey"] == TEST_KEY["pubkey_hex"] and receipt["did"] == TEST_KEY["did"]


def test_progress_line_counts_attempts_and_deliveries():
    import io

    from tops_job.observability.events import AttemptEvent, ReceiptEvent, RunInfo
    from tops_job.observability.progress import CLEAR_LINE, TerminalProgress

    stream = io.StringIO()
    progress = TerminalProgress(stream)
    progress.on_run_start(RunInfo(run_id="r", did="d", pubkey="p", backend="numpy", device="cpu", dtype="float32",
                                  attempts=4))
    progress.on_attempt(AttemptEvent(attempt=0, ok=True, elapsed_ns=10**9, ops=2 * 10**11))
    progress.on_attempt(AttemptEvent(attempt=1, ok=False, error_class="gpu"))
    progress.on_receipt(ReceiptEvent(digest="00", outcome="accepted"))
    assert progress.line() == "[run] attempt 2/4 (1 failed) · 200 GFLOP/s · 1 delivered"
    assert stream.getvalue().count(CLEAR_LINE) == 3
    progress.on_run_end({})
    assert stream.getvalue().endswith(CLEAR_LINE)


def test_no_progress_line_when_stderr_is_not_a_terminal():
    result = invoke("run", "--attempts", "2", "--size", "8")
    assert result.exit_code == 0 and "[run] attempt" not in result.output and "\033[K" not in result.output


def test_a_full_disk_under_receipts_out_still_summarises_and_exits_6(isolated_env):
    """--receipts-out on a full disk (/dev/full) ends the run with STORAGE_ERROR (a retry
    elsewhere can succeed), the summary written, and the receipt already safe in the ledger."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    result = invoke("run", "--attempts", "3", "--size", "8", "--receipts-out", "/dev/full")
    assert result.exit_code == ExitCode.STORAGE_ERROR, result.output
    summary = json.loads(next((isolated_env["data"] / "summaries").glob("*.json")).read_text())
    assert summary["exit_code"] == 6 and "No space left" in summary["error"]["message"]
    assert summary["errors_by_class"] == {"storage": 1}
    assert len(read_jsonl(isolated_env["data"] / "ledger.jsonl")) == 1  # enqueued before the sink failed


def test_an_unwritable_summary_is_logged_and_the_run_still_ends(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = invoke("run", "--attempts", "1", "--size", "8", "--summary", str(blocker / "summary.json"))
    assert result.exit_code == 0, result.output  # the receipts were delivered; only the report failed
    assert "cannot write" in result.output and "[summary] written to" not in result.output


def test_verify_skips_a_partial_last_line_with_a_warning(tmp_path):
    lines = (VECTORS_DIR / "valid.jsonl").read_text().splitlines()[:2]
    path = tmp_path / "receipts.jsonl"
    path.write_text(lines[0] + "\n" + lines[1] + "\n" + lines[1][:300])  # cut short by a full disk
    result = invoke("verify", str(path))
    assert result.exit_code == 0, result.output
    assert "partial last line" in result.output and "2 valid, 0 invalid" in result.output


def test_a_cpu_profile_is_kept_per_cpu_count(tmp_path, caplog):
    """The same CPU model with fewer CPUs (a CPU limit, a smaller node) gets a profile of its own;
    neither overwrites the other in a shared cache, and a file claiming other CPUs is rebuilt."""
    from tops_job.compute.autotune import ProfileStore, resolve_profile
    from tops_job.compute.numpy_backend import NumpyBackend

    store = ProfileStore(tmp_path)
    one, two = NumpyBackend(threads=1), NumpyBackend(threads=2)
    try:
        tuned_one, cached = resolve_profile(one, 10, store)
        assert not cached and tuned_one.cpus == 1 and tuned_one.key.endswith("-1cpu-float32-10ms")
        tuned_two, cached = resolve_profile(two, 10, store)
        assert not cached and tuned_two.cpus == 2 and tuned_two.key != tuned_one.key
        assert resolve_profile(one, 10, store) == (tuned_one, True)
        assert resolve_profile(two, 10, store) == (tuned_two, True)
        path = Path(store.path_for(tuned_one.key))
        path.write_text(json.dumps({**json.loads(path.read_text()), "cpus": 64}))
        rebuilt, cached = resolve_profile(one, 10, store)
        assert not cached and rebuilt.cpus == 1 and "was made for {'cpus': 64}" in caplog.text
    finally:
        one.close()
        two.close()
