"""GPU backend: inputs generated on the device, cuBLAS through CuPy, CUDA-event timing.

Imported only when a GPU is requested; CuPy is the optional extra `tops-job[gpu]`.
"""

from __future__ import annotations

import numpy as np

from ..commitment import HostCommitment
from ..errors import ConfigError, DeviceError
from .base import Shape

GPU_DTYPES = ("float32", "float16")

# Element f of a matrix: nibble (f & 15) of SplitMix64 word f >> 4, minus 8 (spec §2).
_FILL_SOURCE = r"""
    unsigned long long f = (unsigned long long)i;
    unsigned long long z = key + ((f >> 4) + 1ull) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z = z ^ (z >> 31);
    out = (T)((int)((z >> (4 * (f & 15ull))) & 15ull) - 8);
"""


class CupyBackend:
    name = "cupy"
    default_tile = 256

    def __init__(self, dtype: str = "float32", device_index: int = 0):
        import cupy as cp

        if dtype not in GPU_DTYPES:
            raise ConfigError("TOPS_JOB_DTYPE", f"{dtype!r} is not available on the GPU backend; use one of {', '.join(GPU_DTYPES)}")
        self._cp = cp
        try:
            self._device = cp.cuda.Device(device_index)
            self._device.use()
            props = cp.cuda.runtime.getDeviceProperties(device_index)
        except Exception as exc:
            raise DeviceError(f"CUDA device {device_index} is unusable: {exc}") from None
        name = props["name"]
        self.device_model = (name.decode() if isinstance(name, bytes) else str(name))[:128]
        self.dtype = dtype
        self._cp_dtype = {"float32": cp.float32, "float16": cp.float16}[dtype]
        self._fill = cp.ElementwiseKernel("uint64 key", "T out", _FILL_SOURCE, "tops_job_fill")
        self.shape: Shape | None = None

    def prepare(self, shape: Shape) -> None:
        if shape == self.shape:
            return
        cp = self._cp
        self.a = cp.empty((shape.m, shape.k), self._cp_dtype)
        self.bt = cp.empty((shape.n, shape.k), self._cp_dtype)
        # float16 inputs accumulate in float32: the product is exact only there (spec §3).
        self.c = cp.empty((shape.m, shape.n), cp.float32)
        self._host_c = np.empty((shape.m, shape.n), np.int32)
        self._scratch = np.empty((shape.m, shape.n), np.int32)
        self.shape = shape

    def generate_inputs(self, key_a: int, key_b: int) -> None:
        self._fill(np.uint64(key_a), self.a)
        self._fill(np.uint64(key_b), self.bt)

    def multiply(self) -> int:
        cp = self._cp
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        if self._cp_dtype == cp.float32:
            cp.matmul(self.a, self.bt.T, out=self.c)
        else:
            self.c[...] = cp.matmul(self.a, self.bt.T, dtype=cp.float32)
        end.record()
        end.synchronize()
        return max(1, int(cp.cuda.get_elapsed_time(start, end) * 1e6))

    def commit(self, tile: int) -> HostCommitment:
        self._host_c[...] = self.c.astype(self._cp.int32).get()
        return HostCommitment(self._host_c, tile, self._scratch)

    def telemetry(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        self._cp.get_default_memory_pool().free_all_blocks()
