"""CupyBackend end to end on the emulated device (tests/support/fake_cupy.py): the real backend
code, the real kernels (g++), cuBLAS semantics in NumPy, and a stream model in which work on
the wrong stream reads stale memory, so stream-ordering bugs fail here on the CPU."""

from __future__ import annotations

import numpy as np
import pytest

from tests.support import fake_cupy
from tests.support.device_checks import selftest_and_self_audit_pass
from tops_job.compute.base import Shape
from tops_job.compute.cuda_kernels import GPU_DTYPES
from tops_job.compute.peaks import datasheet_tflops
from tops_job.spec.commitment import HostCommitment, make_openings
from tops_job.spec.inputs import fill_elements, padded_size


@pytest.fixture
def device(monkeypatch):
    return fake_cupy.install(monkeypatch)


def make_backend(dtype="float32"):
    from tops_job.compute.cupy_backend import CupyBackend

    return CupyBackend(dtype, telemetry=False)


def committed(backend, shape: Shape, tile: int):
    """`backend`'s commitment of the product of inputs 1 and 2 at `shape`."""
    backend.prepare(shape)
    backend.generate_inputs(1, 2)
    backend.multiply()
    return backend.commit(tile)


def cpu_matrix(key: int, rows: int, cols: int) -> np.ndarray:
    out = np.empty(padded_size(rows * cols), np.float32)
    fill_elements(key, out)
    return out[: rows * cols].reshape(rows, cols)


@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_root_and_openings_equal_the_cpu_with_commit_before_any_host_read(device, dtype):
    # Commit first, then read C: a host read of C on the null stream before commit() would
    # wait for the GEMM and hide a GEMM queued on the wrong stream.
    shape = Shape(24, 40, 36)
    backend = make_backend(dtype)
    try:
        backend.prepare(shape)
        backend.generate_inputs(11, 12)
        backend.multiply()
        device_commitment = backend.commit(8)
        nonce = bytes(range(32))
        device_openings = make_openings(device_commitment, nonce, 16)
        a, bt = cpu_matrix(11, shape.m, shape.k), cpu_matrix(12, shape.n, shape.k)
        c = (a.astype(np.float64) @ bt.T.astype(np.float64)).astype(np.float32)
        host = HostCommitment(c, 8, np.empty((shape.m, shape.n), np.int32))
        assert device_commitment.root == host.root
        assert device_openings == make_openings(host, nonce, 16)
    finally:
        backend.close()


def test_every_device_operation_runs_on_the_backend_stream(device):
    backend = make_backend()
    try:
        commitment = committed(backend, Shape(16, 16, 16), 4)
        make_openings(commitment, bytes(32), 4)
        assert device.gemm_calls and set(device.gemm_calls) == {backend._stream.ptr}
        assert not device.null.queue  # nothing was ever left for the null stream
    finally:
        backend.close()


def test_openings_are_fetched_in_two_transfers(device):
    backend = make_backend()
    try:
        commitment = committed(backend, Shape(32, 64, 8), 8)
        before = device.transfers
        openings = make_openings(commitment, bytes(range(32)), 16)
        assert len({o["leaf"] for o in openings}) > 8
        assert device.transfers - before == 2  # leaf values, then path nodes
    finally:
        backend.close()


def test_v2_fiat_shamir_openings_are_fetched_in_two_transfers(device):
    # 256 leaves opened one at a time were 512 synchronised transfers: 175 ms an attempt on
    # an H200 at 19968² (tops-receipt/2 without an aggregator), more than half the product.
    from tops_job.spec.v2 import S_FS, fs_leaves
    from tops_job.spec.v2 import make_openings as make_v2_openings

    backend = make_backend()
    try:
        commitment = committed(backend, Shape(32, 64, 8), 8)
        leaves = fs_leaves(bytes(range(32)), commitment.leaf_count)
        before = device.transfers
        openings = make_v2_openings(commitment, leaves)
        assert device.transfers - before == 2  # leaf values, then path nodes
        host = HostCommitment(backend.c.get(), 8, np.empty((32, 64), np.int32))
        assert len(openings) == S_FS and openings == make_v2_openings(host, leaves)
    finally:
        backend.close()


def test_product_time_is_the_gemm_and_below_the_datasheet_peak(device):
    shape = Shape(64, 64, 64)
    backend = make_backend()
    try:
        backend.prepare(shape)
        backend.generate_inputs(1, 2)
        elapsed_ns = backend.multiply()
        backend.commit(16)
        tflops = shape.ops / (elapsed_ns * 1e-9) / 1e12
        peak = datasheet_tflops(backend.device_model, "float32")
        assert peak is not None and tflops <= peak, f"{tflops:.0f} TFLOP/s exceeds the {peak} peak"
        expected_ns = shape.ops / (device.gemm_tflops * 1e12) * 1e9
        assert elapsed_ns >= 0.9 * expected_ns
        stages = backend.device_stages_ns()
        assert stages["product"] >= 0.9 * expected_ns and stages["commitment"] > 0
    finally:
        backend.close()


def test_max_k_is_enforced(device):
    from tops_job.errors import ConfigError
    from tops_job.spec.receipt import MAX_K

    backend = make_backend()
    try:
        with pytest.raises(ConfigError, match="TOPS_JOB_SIZE.*at most"):
            backend.prepare(Shape(4, 4, MAX_K + 4))
    finally:
        backend.close()


# ---- kernels that NVRTC cannot build -----------------------------------------------------------

def signed_attempt(backend, attempt=0):
    from tops_job.job.attempt import Identity, run_attempt
    from tops_job.spec.signing import LocalKeySigner

    identity = Identity(did="did:peaq:0xemulated", signer=LocalKeySigner(bytes(range(1, 33))))
    return run_attempt(backend, Shape(32, 48, 24), identity, run_id="emulated", attempt=attempt, tile=8, opens=16)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_a_kernel_build_that_raises_takes_the_host_path_and_receipts_still_verify(device, dtype, caplog):
    from tops_job.compute import selftest
    from tops_job.spec.verify import verify_receipt

    device.compile_error = "nvrtc: error: identifier \"__byte_perm\" is undefined"
    backend = make_backend(dtype)
    try:
        assert backend.fallback and "NVRTC cannot build" in backend.fallback
        assert sum("host from a copy of C" in r.getMessage() for r in caplog.records) == 1  # said once
        for attempt in range(2):
            verify_receipt(signed_attempt(backend, attempt).receipt, full=True)
        assert set(device.gemm_calls) == {backend._stream.ptr}  # the product is still the device's
        assert selftest.check(backend).ok
    finally:
        backend.close()


def test_strict_device_fails_instead(device):
    from tops_job.errors import DeviceError

    device.compile_error = "nvrtc: error"
    from tops_job.compute.cupy_backend import CupyBackend

    with pytest.raises(DeviceError, match="strict-device"):
        CupyBackend("float32", telemetry=False, strict_device=True)


def test_an_emulated_gpu_receipt_verifies(device):
    from tops_job.spec.verify import verify_receipt

    backend = make_backend("float16")
    try:
        receipt = signed_attempt(backend).receipt
    finally:
        backend.close()
    assert receipt["backend"] == "cupy" and receipt["dtype"] == "float16"
    verify_receipt(receipt, full=True)


def test_the_selftest_and_the_self_audit_pass_on_the_emulated_card(device):
    backend = make_backend("bfloat16")
    try:
        selftest_and_self_audit_pass(backend, Shape(64, 96, 48))
    finally:
        backend.close()


def test_autotune_sees_the_real_product_time(monkeypatch):
    # With the GEMM outside the events (the null-stream bug) every probe reads ~0 ms and
    # autotune runs to the largest side; with it inside, it lands near the target.
    from tops_job.compute.autotune import autotune

    device = fake_cupy.install(monkeypatch, fake_cupy.EmulatedDevice(gemm_tflops=0.05))
    backend = make_backend()
    try:
        profile = autotune(backend, 2, start=128, step=64, max_side=2048)
    finally:
        backend.close()
    expected_side = (2e-3 * device.gemm_tflops * 1e12 / 2) ** (1 / 3)  # ≈ 368
    assert abs(profile.m - expected_side) <= 64, profile.probes
    assert 1.0 <= profile.measured_ms <= 4.0
