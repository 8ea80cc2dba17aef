"""benchmarks/gpu_check.py on a machine without a GPU: it imports, fails loudly with exit 2,
and its attempt stand-in and table work with the CPU backend."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_a_gpu_it_exits_2_with_a_clear_message():
    from tops_job.compute import gpu_available

    if gpu_available():
        pytest.skip("a GPU is present")
    result = subprocess.run([sys.executable, str(SCRIPT), "--dtypes", "bfloat16"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "gpu_check:" in result.stderr and ("CuPy" in result.stderr or "no CUDA GPU" in result.stderr)


def test_unknown_dtype_is_rejected_before_touching_the_device():
    result = subprocess.run([sys.executable, str(SCRIPT), "--dtypes", "float64"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "unknown dtypes" in result.stderr


def test_attempt_stand_in_and_table_with_the_cpu_backend(monkeypatch):
    from tops_job.compute.base import Shape
    from tops_job.compute.numpy_backend import NumpyBackend
    from tops_job.spec.receipt import check_fields

    module = load()
    monkeypatch.setitem(sys.modules, "tops_job.job.attempt", None)  # as on an image without opentelemetry
    run, how = module.attempt_runner()
    assert how.startswith("stand-in")
    backend = NumpyBackend("float32", threads=1)
    try:
        result = run(backend, Shape(16, 32, 8), 0, 8, 16)
    finally:
        backend.close()
    assert set(result.stages_ns) == {"inputs", "product", "commitment", "signing"}
    assert len(result.receipt["openings"]) == 16 and result.elapsed_ns >= 1
    check_fields(dict(result.receipt, sig="00" * 65), min_opens=16)
    row = {"dtype": "bf16", "shape": [8192] * 3, "gemmex_tflops": 700.0, "product_tflops": 690.0,
           "product_vs_raw": 0.986, "attempt_tflops": 640.0, "duty": 0.93, "receipts_per_s": 3.1,
           "stages_ms": {"inputs": 1, "product": 300, "commitment": 20, "signing": 1},
           "device_stages_ms": {"inputs": 1, "product": 300, "commitment": 19}, "throttled_attempts": 0}
    lines = module.table([row]).splitlines()
    assert len(lines) == 3 and lines[0].count("|") == lines[1].count("|") == lines[2].count("|")


# ---- the whole check on the emulated device -----------------------------------------------------

QUICK_SHAPES = [(1, 1, 4), (37, 52, 20), (64, 96, 40)]


def test_the_check_runs_end_to_end_on_the_emulated_device(monkeypatch, tmp_path, capsys):
    from tests.support import fake_cupy

    fake_cupy.install(monkeypatch)
    module = load()
    monkeypatch.setattr(module, "SMALL_SHAPES", QUICK_SHAPES)
    code = module.main(["--dtypes", "float32,int8", "--target-ms", "1", "--attempts", "3",
                        "--max-side", "256", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    import json

    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["note"] == "complete" and report["meta"]["correctness_failures"] == 0
    assert [r["dtype"] for r in report["rows"]] == ["float32", "int8"]
    for row in report["rows"]:
        assert row["shape"] == [256, 256, 256] and row["receipts_checked"] == 2 and not row["receipt_failures"]
        assert row["product_tflops"] <= row["datasheet_tflops"] and not row["faster_than_peak"]
    assert "matmul_tflops" in report["rows"][0] and "matmul_tflops" not in report["rows"][1]


def test_a_failing_dtype_does_not_stop_the_others_and_an_impossible_rate_fails(monkeypatch, tmp_path, capsys):
    from tests.support import fake_cupy

    device = fake_cupy.install(monkeypatch)
    device.gemm_tflops = 5000.0  # faster than any card: what a timing that brackets nothing looks like
    module = load()
    monkeypatch.setattr(module, "SMALL_SHAPES", QUICK_SHAPES[:2])
    from tops_job.compute import cupy_backend

    original = cupy_backend.CupyBackend

    def picky(dtype, *args, **kwargs):
        if dtype == "float16":
            raise RuntimeError("cudaErrorIllegalAddress")
        return original(dtype, *args, **kwargs)
    monkeypatch.setattr(cupy_backend, "CupyBackend", picky)
    code = module.main(["--dtypes", "float16,bfloat16", "--target-ms", "1", "--attempts", "3",
                        "--max-side", "256", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 1
    assert "float16   FAILED to start: RuntimeError: cudaErrorIllegalAddress" in out
    assert "bfloat16" in out and "DATASHEET PEAK" in out
    import json

    rows = json.loads((tmp_path / "gpu_check.json").read_text())["rows"]
    assert [r["dtype"] for r in rows] == ["bfloat16"] and rows[0]["faster_than_peak"]
