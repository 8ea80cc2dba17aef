"""CPU backend: NumPy's BLAS for the product, all cores for inputs and hashing."""

from __future__ import annotations

import platform
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from tops_job.compute.base import Shape, device_name
from tops_job.compute.host_workers import Helper, SharedRows, close_helpers
from tops_job.cpus import cap_blas_threads, usable_cpus
from tops_job.errors import ConfigError
from tops_job.spec.commitment import HostCommitment
from tops_job.spec.inputs import fill_elements, padded_size

CPU_DTYPES = {"float32": np.float32, "float64": np.float64}


def cpu_model() -> str:
    """A printable name for the CPU (receipt `device`)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return device_name(line.split(":", 1)[1], "cpu")
    except OSError:
        pass
    return device_name(platform.processor() or platform.machine(), "cpu")


class NumpyBackend:
    name = "numpy"
    # Whole rows (up to 8192 columns): each leaf is a Python-level hash call, so fewer, longer
    # leaves cost less (3328² commits in 16 ms at tile 3328 vs 23 ms at 1024, 2 cores), at
    # the price of larger receipts (about 290 KB instead of 90 KB at 3328²; --tile to trade).
    default_tile = 8192

    def __init__(self, dtype: str = "float32", threads: int | None = None):
        if dtype not in CPU_DTYPES:
            raise ConfigError("TOPS_JOB_DTYPE", f"{dtype!r} is not a CPU dtype; use one of {', '.join(CPU_DTYPES)}")
        self.dtype = dtype
        self._np_dtype = CPU_DTYPES[dtype]
        self.device_model = cpu_model()
        self.threads = threads or usable_cpus()
        if threads is None:  # under a CPU quota, BLAS would start a thread per core it may run on
            cap_blas_threads(self.threads)
        self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="tops-cpu") if self.threads > 1 else None
        self._helpers: list[Helper] = []  # for the commitment, started with the first large shape
        self._shared: SharedRows | None = None
        self.shape: Shape | None = None

    @property
    def tuned_cpus(self) -> int:
        """The product's speed depends on the threads it runs on (Backend.tuned_cpus)."""
        return self.threads

    def prepare(self, shape: Shape) -> None:
        if shape == self.shape:
            return
        m, n, k = shape.m, shape.n, shape.k
        self._a_flat = np.empty(padded_size(m * k), self._np_dtype)
        self._bt_flat = np.empty(padded_size(n * k), self._np_dtype)
        self.a = self._a_flat[: m * k].reshape(m, k)
        self.bt = self._bt_flat[: n * k].reshape(n, k)
        if self._shared is not None:
            self._shared.release()
        self._shared = SharedRows.create((m, n), self._np_dtype, self._helpers or self.threads - 1)
        if self._shared is not None:
            self._helpers = self._shared.helpers
            self.c, self._c_int32 = self._shared.product.array, self._shared.scratch.array
        else:
            self.c = np.empty((m, n), self._np_dtype)
            self._c_int32 = np.empty((m, n), np.int32)
        assert self.c is not None and self._c_int32 is not None
        # Touch every page now so the first attempt does not pay for page faults.
        for buffer in (self._a_flat, self._bt_flat, self.c, self._c_int32):
            buffer.fill(0)
        self.shape = shape

    def generate_inputs(self, key_a: int, key_b: int) -> None:
        fill_elements(key_a, self._a_flat, self._executor, self.threads)
        fill_elements(key_b, self._bt_flat, self._executor, self.threads)

    def multiply(self) -> int:
        start = time.perf_counter_ns()
        np.matmul(self.a, self.bt.T, out=self.c)
        return time.perf_counter_ns() - start

    def commit(self, tile: int) -> HostCommitment:
        assert self.c is not None and self._c_int32 is not None, "commit() before prepare()"
        hashes = self._shared.commit(tile) if self._shared is not None else None
        return HostCommitment(self.c, tile, self._c_int32, leaf_hashes=hashes)

    def telemetry(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        if self._shared is not None:
            self.c = self._c_int32 = None
            self._shared.release()
            self._shared = None
        close_helpers(self._helpers)
        self._helpers = []
