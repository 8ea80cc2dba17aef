"""GPU backend: inputs generated on the device, cuBLAS GEMM through CuPy, commitment on the
device, CUDA-event timing of the product alone, NVML telemetry during it.

Imported only when a GPU is requested; CuPy is the optional extra `tops-job[gpu]`.

Everything that scales with m·n stays on the device: A and Bt are written by one kernel
thread per SplitMix64 word (cuda_kernels.FILL_SOURCE), C is hashed leaf by leaf and level by
level into a device buffer (device_commitment.DeviceCommitment); the host receives the
32-byte root, then the opened leaves and their paths.

All device work of an attempt is queued on one non-blocking stream, in order: fill A, fill
Bt, [event start] GEMM [event end], leaf hashes, tree levels. The two events bracket the
GEMM alone, so `elapsed_ns` is the product's device time however the other stages are
queued. generate_inputs() returns without waiting: the host goes on while the device fills.
Work for other attempts is deliberately not run concurrently with the GEMM: cuBLAS fills
every SM, so a concurrent kernel would slow the product and inflate `elapsed_ns`.
"""

from __future__ import annotations

import logging

import numpy as np

from tops_job.compute.base import Shape, device_name
from tops_job.compute.cuda_kernels import (
    GEMM_TYPES,
    GPU_DTYPES,
    THREADS_PER_BLOCK,
    blocks_for,
    build_commit_kernels,
    build_fill_kernel,
)
from tops_job.compute.device_commitment import DeviceCommitment, node_buffer_words
from tops_job.compute.device_health import DeviceHealth, changes
from tops_job.compute.host_fallback import HostPath
from tops_job.compute.nvml import NvmlSampler
from tops_job.errors import ConfigError, DeviceError
from tops_job.spec.commitment import HostCommitment
from tops_job.spec.inputs import ELEMENTS_PER_WORD, padded_size
from tops_job.spec.receipt import MAX_K

log = logging.getLogger("tops_job.gpu")

__all__ = ["CupyBackend", "GPU_DTYPES", "gemm_arguments", "check_shape"]

CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
CUBLAS_GEMM_DEFAULT = -1
CUBLAS_POINTER_MODE_HOST = 0
KEEP_SHARE = 0.25  # of the free device memory at start, for kept challenge-mode trees


def check_shape(dtype: str, shape: Shape) -> None:
    """Raise ConfigError when cuBLAS cannot multiply `shape` in `dtype`."""
    gemm = GEMM_TYPES[dtype]
    if gemm.k_multiple > 1 and (shape.k % gemm.k_multiple or shape.n % gemm.k_multiple):
        raise ConfigError("TOPS_JOB_SIZE", f"dtype {dtype} needs k and n multiples of {gemm.k_multiple} "
                          f"(cuBLAS integer GEMM); got {shape}")
    if shape.k > MAX_K:
        raise ConfigError("TOPS_JOB_SIZE", f"k must be at most {MAX_K} (spec §3: sums stay exact); got {shape}")
    if max(shape.m, shape.n, shape.k) >= 1 << 31:
        raise ConfigError("TOPS_JOB_SIZE", f"{shape} exceeds cuBLAS's 32-bit dimensions")


def gemm_arguments(shape: Shape) -> dict[str, int]:
    """cuBLAS (column-major) arguments for C = A·Btᵀ with all three matrices row-major.

    A row-major r×c matrix is, read column-major, its c×r transpose with leading dimension c.
    So the buffers hold, column-major: A as Aᵀ (k×m, ld k), Bt as Btᵀ (k×n, ld k), and the
    row-major C (m×n) we want is column-major Cᵀ (n×m, ld n). Since Cᵀ = (A·Btᵀ)ᵀ = Bt·Aᵀ,
    cuBLAS computes Cᵀ = op(X)·op(Y) with X = the Bt buffer transposed (OP_T: (Btᵀ)ᵀ = Bt,
    n×k) and Y = the A buffer as is (OP_N: Aᵀ, k×m): gemm(T, N, M=n, N=m, K=k, X=Bt, ldx=k,
    Y=A, ldy=k, C, ldc=n). This is the "TN" layout that cuBLAS's integer GEMM requires.
    """
    m, n, k = shape.m, shape.n, shape.k
    return {"transa": CUBLAS_OP_T, "transb": CUBLAS_OP_N, "m": n, "n": m, "k": k,
            "lda": k, "ldb": k, "ldc": n}


class CupyBackend:
    name = "cupy"
    # 256 int32 columns per leaf: 1 KiB, 17 SHA-256 blocks per thread; a 16-opening receipt
    # carries about 22 KB of leaf data.
    default_tile = 256
    tuned_cpus = 0  # the product's speed is the device's, whatever the host's CPUs

    def __init__(self, dtype: str = "float32", device_index: int = 0, *, telemetry: bool = True,
                 strict_device: bool = False):
        if dtype not in GEMM_TYPES:
            raise ConfigError("TOPS_JOB_DTYPE", f"{dtype!r} is not available on the GPU backend; use one of {', '.join(GPU_DTYPES)}")
        import cupy as cp

        try:  # CuPy 13 and 14 keep the thin cuBLAS wrapper here (gemmEx, setStream, ...)
            from cupy_backends.cuda.libs import cublas
        except ImportError:  # older CuPy
            from cupy.cuda import cublas
        self._cp, self._cublas = cp, cublas
        self.dtype = dtype
        self.device_index = device_index
        self._gemm = GEMM_TYPES[dtype]
        try:
            self._device = cp.cuda.Device(device_index)
            self._device.use()
            props = cp.cuda.runtime.getDeviceProperties(device_index)
            self._stream = cp.cuda.Stream(non_blocking=True)
            self._handle = cublas.create()
            cublas.setStream(self._handle, self._stream.ptr)
            cublas.setPointerMode(self._handle, CUBLAS_POINTER_MODE_HOST)
            free, _total = cp.cuda.runtime.memGetInfo()
        except Exception as exc:
            raise DeviceError(f"CUDA device {device_index} is unusable: {exc}") from None
        try:
            self.pci_bus_id = str(cp.cuda.runtime.deviceGetPCIBusId(device_index))
        except Exception:
            self.pci_bus_id = ""
        name = props["name"]
        self.device_model = device_name(name, "cuda")
        self.device_uuid = _uuid_text(props.get("uuid"))
        # Autotune's bound: a side whose buffers (about 16 bytes per C element) fit in memory.
        self.memory_budget_bytes = int(free * 0.85)
        # Challenge-mode trees kept on the device until their challenges come back: at most
        # this much of them (delivery/kept_trees.py lets the oldest go beyond it). A bfloat16
        # tree at an H200's autotuned ~50k side is about 8 GB.
        self.keep_budget_bytes = int(free * KEEP_SHARE)
        # alpha = 1, beta = 0 in the compute type, read through host pointers.
        scalar = np.int32 if self._gemm.compute == 72 else np.float32
        self._alpha, self._beta = np.ones(1, scalar), np.zeros(1, scalar)
        # The device kernels, compiled now (NVRTC) so a failure shows before the first attempt.
        # Where they cannot be built, inputs and commitment run on the host from a copy of C
        # (host_fallback.py), said once, with its cost in the summary; --strict-device: fail.
        self.fallback: str | None = None
        self._host: HostPath | None = None
        try:
            self._fill = _compiled(build_fill_kernel(cp, dtype))
            self._leaf_kernel, self._level_kernel = (_compiled(k) for k in build_commit_kernels(cp, self._gemm.product))
        except Exception as exc:
            reason = f"NVRTC cannot build the device kernels for {dtype}: {type(exc).__name__}: {str(exc)[:300]}"
            if strict_device:
                raise DeviceError(f"{reason} (--strict-device: no host fallback)") from None
            self.fallback = reason
            self._host = HostPath(dtype)
            log.warning("[gpu] %s; inputs and commitment run on the host from a copy of C, which lowers the "
                        "duty cycle (see the summary); --strict-device makes this an error", reason)
        self._sampler = NvmlSampler.for_cuda_device(device_index) if telemetry else None
        self.health: DeviceHealth | None = None
        self._health_last: dict[str, int] = {}
        if self._sampler is not None:
            if self._sampler.uuid:
                self.device_uuid = self._sampler.uuid
            self.health = DeviceHealth(self._sampler.nvml, self._sampler.handle)
            self._health_last = self.health.read()
        self._events = {name: cp.cuda.Event() for name in
                        ("inputs_start", "inputs_end", "start", "end", "commit_start", "commit_end")}
        self._last_telemetry: dict[str, int] = {}
        self._nodes = None
        self._nodes_key: tuple | None = None
        self._read_stream = None
        self._warm = False
        self.shape: Shape | None = None

    # ---- attempt stages --------------------------------------------------------------------

    def prepare(self, shape: Shape) -> None:
        if shape == self.shape:
            return
        check_shape(self.dtype, shape)
        cp = self._cp
        storage = self._gemm.storage
        self.shape = None
        self.a = self.bt = self.c = None
        self._nodes, self._nodes_key = None, None
        cp.get_default_memory_pool().free_all_blocks()
        try:
            self._a_flat = cp.empty(padded_size(shape.m * shape.k), storage)
            self._bt_flat = cp.empty(padded_size(shape.n * shape.k), storage)
            self.c = cp.empty((shape.m, shape.n), self._gemm.product)
        except cp.cuda.memory.OutOfMemoryError as exc:
            raise DeviceError(f"{shape} does not fit on {self.device_model}: {exc}") from None
        self.a = self._a_flat[: shape.m * shape.k].reshape(shape.m, shape.k)
        self.bt = self._bt_flat[: shape.n * shape.k].reshape(shape.n, shape.k)
        self._args = gemm_arguments(shape)
        self._warm = False
        self.shape = shape

    def generate_inputs(self, key_a: int, key_b: int) -> None:
        ev = self._events
        with self._stream:
            ev["inputs_start"].record(self._stream)
            if self._host is not None:
                self._host.fill(self._cp, self._stream, key_a, self._a_flat)
                self._host.fill(self._cp, self._stream, key_b, self._bt_flat)
                ev["inputs_end"].record(self._stream)
                return
            for key, flat in ((key_a, self._a_flat), (key_b, self._bt_flat)):
                words = flat.size // ELEMENTS_PER_WORD
                self._fill((blocks_for(words),), (THREADS_PER_BLOCK,), (np.uint64(key), np.uint64(words), flat))
            ev["inputs_end"].record(self._stream)

    def multiply(self) -> int:
        cp, ev = self._cp, self._events
        if not self._warm:  # first product of a shape: cuBLAS picks and loads its kernel
            self._gemm_call()
            self._warm = True
        sampler = self._sampler
        ev["inputs_end"].synchronize()  # so telemetry brackets the product, not the fill
        if sampler is not None:
            sampler.start()
        ev["start"].record(self._stream)
        self._gemm_call()
        ev["end"].record(self._stream)
        ev["end"].synchronize()
        if sampler is not None:
            self._last_telemetry = sampler.stop()
        return max(1, int(round(cp.cuda.get_elapsed_time(ev["start"], ev["end"]) * 1e6)))

    def _gemm_call(self) -> None:
        g, a = self._gemm, self._args
        assert self.a is not None and self.bt is not None and self.c is not None, "multiply() before prepare()"
        # CuPy's gemmEx binds the handle to the *current* stream on every call: outside this
        # `with`, the GEMM would run on the legacy null stream, unordered with the fill and
        # the commitment kernels on ours, and the events would bracket nothing.
        try:
            with self._stream:
                self._cublas.gemmEx(
                    self._handle, a["transa"], a["transb"], a["m"], a["n"], a["k"],
                    self._alpha.ctypes.data, self.bt.data.ptr, g.cuda_in, a["lda"],
                    self.a.data.ptr, g.cuda_in, a["ldb"],
                    self._beta.ctypes.data, self.c.data.ptr, g.cuda_out, a["ldc"],
                    g.compute, CUBLAS_GEMM_DEFAULT)
        except Exception as exc:
            raise DeviceError(f"cuBLAS GEMM ({self.dtype}, {self.shape}) failed: {exc}") from None

    @property
    def keeps_trees(self) -> bool:
        """Whether commit(keep=True) leaves the tree on the device (not on the host path)."""
        return self._host is None

    def commit(self, tile: int, *, keep: bool = False) -> DeviceCommitment | HostCommitment:
        """The commitment of the last product. keep=True (tops-receipt/2's challenge mode):
        the tree goes into a buffer of its own that the commitment holds, so it outlives
        the next attempts until the challenge comes back and its audit paths are read
        (DeviceCommitment.audit_paths on `read_stream`); the shared buffer is reused
        otherwise. CuPy's pool hands a freed tree's memory to the next one."""
        shape = self.shape
        assert shape is not None, "commit() before prepare()"
        if keep and self._host is None:
            words = node_buffer_words(shape.m, shape.n, tile)
            try:
                nodes = self._cp.empty(words, self._cp.uint32)
            except self._cp.cuda.memory.OutOfMemoryError:
                self._cp.get_default_memory_pool().free_all_blocks()  # the pool's cached blocks back, once
                try:
                    nodes = self._cp.empty(words, self._cp.uint32)
                except self._cp.cuda.memory.OutOfMemoryError as exc:
                    raise DeviceError(f"no room to keep the commitment tree of {shape} / tile {tile}: {exc}") from None
            return self._device_commitment(tile, nodes)
        key = (shape, tile)
        if self._nodes_key != key:
            self._nodes = None
            try:
                self._nodes = self._cp.empty(node_buffer_words(shape.m, shape.n, tile), self._cp.uint32)
            except self._cp.cuda.memory.OutOfMemoryError as exc:
                raise DeviceError(f"no room for the commitment tree of {shape} / tile {tile}: {exc}") from None
            self._nodes_key = key
        if self._host is not None:
            ev = self._events
            ev["commit_start"].record(self._stream)
            host_commitment = self._host.commit(self.c, self._stream, tile)
            ev["commit_end"].record(self._stream)
            return host_commitment
        return self._device_commitment(tile, self._nodes)

    def _device_commitment(self, tile: int, nodes) -> DeviceCommitment:
        ev = self._events
        ev["commit_start"].record(self._stream)
        commitment = DeviceCommitment(self._cp, self.c, tile, nodes, self._leaf_kernel,
                                      self._level_kernel, self._stream)
        ev["commit_end"].record(self._stream)
        return commitment

    @property
    def read_stream(self):
        """The stream kept trees are read on: not the attempts', so an opening never waits
        behind a running product."""
        if self._read_stream is None:
            self._read_stream = self._cp.cuda.Stream(non_blocking=True)
        return self._read_stream

    # ---- readings --------------------------------------------------------------------------

    def telemetry(self) -> dict[str, int]:
        readings = dict(self._last_telemetry)
        if readings:
            readings["device_index"] = self.device_index
        if self.health is not None:  # what moved since the last attempt: ECC, rows, Xid
            now = self.health.read()
            for key, delta in changes(self._health_last, now).items():
                readings[f"{key}_new" if key != "xid_last" else key] = delta
            self._health_last = now
        return readings

    def device_stages_ns(self) -> dict[str, int]:
        """Device time of the last attempt's stages (CUDA events): inputs, product, commitment."""
        ev, cp = self._events, self._cp
        ev["commit_end"].synchronize()
        span = lambda a, b: int(round(cp.cuda.get_elapsed_time(ev[a], ev[b]) * 1e6))  # noqa: E731
        return {"inputs": span("inputs_start", "inputs_end"), "product": span("start", "end"),
                "commitment": span("commit_start", "commit_end")}

    def close(self) -> None:
        try:
            self._stream.synchronize()
            self._cublas.destroy(self._handle)
        except Exception:
            pass
        self.a = self.bt = self.c = self._nodes = None
        self._a_flat = self._bt_flat = None
        self._cp.get_default_memory_pool().free_all_blocks()
        if self.health is not None:
            self.health.close()
        if self._sampler is not None:
            self._sampler.close()


def _compiled(kernel):
    """`kernel`, compiled now where CuPy can (RawKernel/RawFunction.compile), so that NVRTC
    errors surface here rather than at the first launch."""
    compile_now = getattr(kernel, "compile", None)
    if compile_now is not None:
        compile_now()
    return kernel


def _uuid_text(raw) -> str:
    """'GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx' from CUDA's 16 UUID bytes ('' if absent)."""
    if raw is None:
        return ""
    data = bytes(raw) if not isinstance(raw, str) else raw.encode("latin-1")
    if len(data) != 16:
        return ""
    h = data.hex()
    return f"GPU-{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"
