"""The CuPy backend on a real GPU: inputs, roots and openings equal the CPU implementation's.
Skipped where CuPy or a CUDA device is missing."""

from __future__ import annotations

import numpy as np
import pytest

cp = pytest.importorskip("cupy")

from tests.support.device_checks import kept_tree_opens_after_later_attempts, selftest_and_self_audit_pass  # noqa: E402
from tops_job.compute.base import Shape  # noqa: E402
from tops_job.compute.cuda_kernels import GPU_DTYPES, bf16_to_float32  # noqa: E402
from tops_job.spec.commitment import HostCommitment, make_openings  # noqa: E402
from tops_job.spec.inputs import fill_elements, padded_size  # noqa: E402


def _has_device() -> bool:
    try:
        return cp.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _has_device(), reason="no CUDA GPU present")]

SHAPES = [Shape(1, 1, 4), Shape(37, 52, 20), Shape(128, 256, 64), Shape(300, 260, 1028)]


def cpu_matrix(key: int, rows: int, cols: int) -> np.ndarray:
    out = np.empty(padded_size(rows * cols), np.float32)
    fill_elements(key, out)
    return out[: rows * cols].reshape(rows, cols)


def host_values(backend, array) -> np.ndarray:
    values = array.get()
    return bf16_to_float32(values) if backend.dtype == "bfloat16" else values.astype(np.float32)


@pytest.fixture(params=GPU_DTYPES)
def backend(request):
    from tops_job.compute.cupy_backend import CupyBackend

    engine = CupyBackend(request.param)
    yield engine
    engine.close()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_inputs_product_and_root_equal_the_cpu(backend, shape):
    if backend.dtype == "int8" and (shape.k % 4 or shape.n % 4):
        pytest.skip("int8 needs k, n multiples of 4")
    backend.prepare(shape)
    key_a, key_b = 0x1234_5678_9ABC_DEF0, 42
    a, bt = cpu_matrix(key_a, shape.m, shape.k), cpu_matrix(key_b, shape.n, shape.k)
    c = (a.astype(np.float64) @ bt.T.astype(np.float64)).astype(np.float32)
    for tile in sorted({1, min(7, shape.n), shape.n, min(256, shape.n)}):
        # Commit FIRST, then read anything on the host: a host read of C on the null stream
        # waits for the GEMM and would hide a GEMM queued on the wrong stream.
        backend.generate_inputs(key_a, key_b)
        assert backend.multiply() >= 1
        device = backend.commit(tile)
        nonce = bytes(range(32))
        device_openings = make_openings(device, nonce, 16)
        host = HostCommitment(c, tile, np.empty((shape.m, shape.n), np.int32))
        assert device.root == host.root, (backend.dtype, shape, tile)
        assert device_openings == make_openings(host, nonce, 16)
    np.testing.assert_array_equal(host_values(backend, backend.a), a)
    np.testing.assert_array_equal(host_values(backend, backend.bt), bt)
    np.testing.assert_array_equal(backend.c.get().astype(np.float64), c)


def test_a_large_float32_product_commits_the_finished_product_at_a_believable_rate():
    # 8192³ takes milliseconds: long enough that commitment kernels racing the GEMM would
    # hash a partly written C, and a timing that brackets nothing would show an impossible rate.
    from tops_job.compute.cupy_backend import CupyBackend
    from tops_job.compute.peaks import datasheet_tflops

    engine = CupyBackend("float32")
    try:
        shape = Shape(8192, 8192, 8192)
        engine.prepare(shape)
        engine.generate_inputs(5, 6)
        elapsed = engine.multiply()
        device = engine.commit(engine.default_tile)
        nonce = bytes(range(32))
        openings = make_openings(device, nonce, 16)
        c = engine.c.get()
        host = HostCommitment(c, engine.default_tile, np.empty(c.shape, np.int32))
        assert device.root == host.root and openings == make_openings(host, nonce, 16)
        a_rows = cpu_matrix(5, 8192, 8192)[:4]  # spot rows of C against the CPU
        bt = cpu_matrix(6, 8192, 8192)
        np.testing.assert_array_equal(c[:4].astype(np.float64), a_rows.astype(np.float64) @ bt.T.astype(np.float64))
        tflops = shape.ops / (elapsed * 1e-9) / 1e12
        peak = datasheet_tflops(engine.device_model, "float32")
        assert elapsed > 1_000_000, f"an 8192³ product in {elapsed} ns is not a product"
        if peak is not None:
            assert tflops <= peak * 1.02, f"{tflops:.0f} TFLOP/s exceeds the datasheet's {peak}"
    finally:
        engine.close()


def test_stage_times_and_telemetry(backend):
    shape = Shape(512, 512, 512)
    backend.prepare(shape)
    backend.generate_inputs(1, 2)
    backend.multiply()
    backend.commit(backend.default_tile)
    stages = backend.device_stages_ns()
    assert set(stages) == {"inputs", "product", "commitment"} and min(stages.values()) > 0
    from tops_job.compute.peaks import datasheet_tflops

    peak = datasheet_tflops(backend.device_model, backend.dtype)
    if peak is not None:  # a product faster than the card can go is a timing that brackets nothing
        assert shape.ops / (stages["product"] * 1e-9) / 1e12 <= peak * 1.02
    readings = backend.telemetry()
    assert all(isinstance(v, int) for v in readings.values())
    if readings:  # NVML present
        assert readings["samples"] >= 1 and readings["sm_clock_mhz"] > 0


def test_a_gpu_receipt_verifies(backend):
    from tops_job.job.attempt import Identity, run_attempt
    from tops_job.spec.signing import LocalKeySigner
    from tops_job.spec.verify import verify_receipt

    identity = Identity(did="did:peaq:0xgpu", signer=LocalKeySigner(bytes(range(1, 33))))
    result = run_attempt(backend, Shape(256, 512, 256), identity, run_id="gpu-test", attempt=0,
                         tile=backend.default_tile, opens=16)
    assert result.receipt["dtype"] == backend.dtype and result.receipt["backend"] == "cupy"
    verify_receipt(result.receipt, full=True)


def test_the_selftest_and_the_self_audit_pass_on_the_card(backend):
    selftest_and_self_audit_pass(backend, Shape(1024, 2048, 512))


def test_a_challenge_mode_tree_stays_on_the_card_and_opens_after_later_attempts(backend):
    kept_tree_opens_after_later_attempts(backend, Shape(1024, 2048, 512))

