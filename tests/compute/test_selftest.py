"""The known-answer self-test: passes on healthy backends (NumPy, the emulated GPU on every
dtype), and names the stage when one value of C, one leaf hash, one tree node or one input
word is corrupted on the emulated device."""

from __future__ import annotations

import pytest

from tests.support import fake_cupy
from tops_job.compute import selftest
from tops_job.compute.cuda_kernels import GPU_DTYPES
from tops_job.compute.numpy_backend import NumpyBackend
from tops_job.errors import DeviceError, ExitCode


@pytest.fixture
def device(monkeypatch):
    return fake_cupy.install(monkeypatch)


def gpu_backend(dtype="float32"):
    from tops_job.compute.cupy_backend import CupyBackend

    return CupyBackend(dtype, telemetry=False)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_numpy_backend_passes_and_reports_its_cost(dtype):
    backend = NumpyBackend(dtype, threads=1)
    try:
        result = selftest.check(backend)
    finally:
        backend.close()
    assert result.ok and result.checked == list(selftest.STAGES)
    assert 0 < result.seconds < 5


@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_emulated_gpu_passes_on_every_dtype(device, dtype):
    backend = gpu_backend(dtype)
    try:
        result = selftest.check(backend)
    finally:
        backend.close()
    assert result.ok, result.detail
    # The device as an operator finds it: PCI bus id and UUID (from CUDA; NVML's where present).
    assert result.device == f"{device.name} {device.pci_bus_id} GPU-10111213-1415-1617-1819-1a1b1c1d1e1f"


def corrupt_one_word(target):
    """A fault hook: one word of what the stage wrote comes out wrong (every launch, as a
    defective unit would)."""
    flat = target.reshape(-1)
    flat[3] = flat[3] + 1 if flat.dtype.kind == "f" else flat[3] ^ 1


@pytest.mark.parametrize("fault,stage", [("fill", "inputs"), ("gemm", "product"),
                                         ("leaf", "leaf hashes"), ("level", "tree")])
@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_one_corrupted_word_is_caught_and_its_stage_named(device, fault, stage, dtype):
    device.faults[fault] = corrupt_one_word
    backend = gpu_backend(dtype)
    try:
        with pytest.raises(selftest.SelfTestFailed) as err:
            selftest.check(backend)
    finally:
        backend.close()
    failed = err.value.result
    assert failed.stage == stage and not failed.ok
    assert isinstance(err.value, DeviceError) and err.value.exit_code == ExitCode.DEVICE_ERROR
    assert f"{stage} differ" in str(err.value) and "GPU-" in str(err.value)
    if stage == "product":
        assert "1 of 9600 values of C differ" in failed.detail


def test_a_corrupted_product_on_the_cpu_backend_is_caught():
    class FlakyCpu(NumpyBackend):
        def multiply(self):
            elapsed = super().multiply()
            self.c[5, 7] += 2.0
            return elapsed

    backend = FlakyCpu("float32", threads=1)
    try:
        result = selftest.run_selftest(backend)
    finally:
        backend.close()
    assert not result.ok and result.stage == "product" and "(5, 7)" in result.detail
