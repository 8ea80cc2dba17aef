"""An emulated CUDA device behind the CuPy API, so `CupyBackend` runs end to end on the CPU.

The kernels are the very CUDA C of tops_job.compute.cuda_kernels, compiled with g++ and run
over an emulated grid (gpu_emulator); cuBLAS's gemmEx is NumPy with cuBLAS's column-major
semantics. What makes this more than a NumPy shim is that it models what a card does and a
NumPy stand-in would hide:

- **Stream ordering.** Every launch, GEMM, event record and gather is queued on a stream and
  runs only when that stream is synchronised (Event.synchronize, Stream.synchronize, .get()).
  A non-blocking stream never waits for the null stream, so work queued on the wrong stream
  reads stale memory, as it would on a card.
- **cuBLAS binds its handle to the current stream on every call**, as CuPy's gemmEx does
  (`_setStream(handle)`), so a GEMM issued outside `with stream:` lands on the null stream.
- **Device time.** Each stream has a clock; a GEMM advances it by ops / `gemm_tflops`, a
  kernel by a few microseconds. Events read the clock of the stream they were recorded on.
- **Faults.** `device.faults[stage] = fn` corrupts device memory after a stage ("fill",
  "gemm", "leaf", "level"); `device.compile_error` makes NVRTC refuse the kernels.

Install with `install(monkeypatch)` (a pytest fixture helper), which returns the device.
"""

from __future__ import annotations

import ctypes
import itertools
import sys
import types
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import as_strided

from tests.support import gpu_emulator as emu
from tops_job.compute import cuda_kernels

KERNEL_NS = 5_000  # emulated device time of one kernel launch or gather
_HARNESSES = {"tops_fill": ("emu_fill", emu._HARNESS), "tops_leaf_hash": ("emu_leaf", emu._COMMIT_HARNESS),
              "tops_merkle_level": ("emu_level", emu._COMMIT_HARNESS)}
_STAGE = {"tops_fill": "fill", "tops_leaf_hash": "leaf", "tops_merkle_level": "level"}
_CUDA_TYPES = {cuda_kernels.CUDA_R_32F: np.float32, cuda_kernels.CUDA_R_16F: np.float16,
               cuda_kernels.CUDA_R_16BF: np.uint16, cuda_kernels.CUDA_R_8I: np.int8, cuda_kernels.CUDA_R_32I: np.int32}


class CompileException(Exception):
    """cupy.cuda.compiler.CompileException's stand-in."""


class OutOfMemoryError(MemoryError):
    pass


class EmulatedDevice:
    """The card: its name, memory, GEMM speed, the allocations (for pointer look-ups), faults."""

    def __init__(self, name: str = "NVIDIA H200 (emulated)", gemm_tflops: float = 40.0,
                 memory_bytes: int = 1 << 30, pci_bus_id: str = "0000:17:00.0"):
        self.name, self.gemm_tflops, self.memory_bytes = name, gemm_tflops, memory_bytes
        self.pci_bus_id = pci_bus_id
        self.uuid_bytes = bytes(range(0x10, 0x20))
        self.allocations: dict[int, np.ndarray] = {}
        self.faults: dict[str, Callable[[Any], None]] = {}
        self.compile_error: str | None = None
        self.streams: list[Stream] = []
        self.current: list[Stream] = []
        self.null = Stream(self, null=True)
        self.gemm_calls: list[int] = []  # the stream (ptr) each GEMM ran on
        self.transfers = 0  # device-to-host copies (.get())

    @property
    def current_stream(self) -> Stream:
        return self.current[-1] if self.current else self.null

    def fault(self, stage: str, target: Any) -> None:
        hook = self.faults.get(stage)
        if hook is not None:
            hook(target)

    def array_at(self, ptr: int, dtype, count: int) -> np.ndarray:
        """A NumPy view of `count` elements of device memory from address `ptr`."""
        for base_ptr, base in self.allocations.items():
            if base_ptr <= ptr < base_ptr + base.nbytes:
                offset = ptr - base_ptr
                nbytes = count * np.dtype(dtype).itemsize
                if offset + nbytes > base.nbytes:
                    raise ValueError(f"{nbytes} bytes from {ptr:#x} run past the allocation")
                return base[offset:offset + nbytes].view(dtype)
        raise ValueError(f"address {ptr:#x} is not device memory")


class Stream:
    _ids = itertools.count(1)

    def __init__(self, device: EmulatedDevice, null: bool = False, non_blocking: bool = False):
        self.device = device
        self.ptr = 0 if null else next(self._ids) * 0x1000
        self.non_blocking = non_blocking
        self.queue: list[Callable[[], None]] = []
        self.clock_ns = 0

    def enqueue(self, op: Callable[[], None], cost_ns: int = KERNEL_NS) -> None:
        def timed() -> None:
            op()
            self.clock_ns += cost_ns
        self.queue.append(timed)

    def synchronize(self) -> None:
        while self.queue:
            self.queue.pop(0)()

    def __enter__(self) -> Stream:
        self.device.current.append(self)
        return self

    def __exit__(self, *exc) -> bool:
        self.device.current.pop()
        return False


class Event:
    def __init__(self, device: EmulatedDevice):
        self.device = device
        self.stream: Stream | None = None
        self.time_ns: int | None = None

    def record(self, stream: Stream | None = None) -> None:
        stream = stream or self.device.current_stream
        self.stream, self.time_ns = stream, None

        def mark() -> None:
            self.time_ns = stream.clock_ns
        stream.queue.append(mark)

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()


class _Data:
    def __init__(self, ptr: int):
        self.ptr = ptr


class DeviceArray(np.ndarray):
    """Device memory: a NumPy array whose reads go through the stream queues (.get())."""

    device: EmulatedDevice | None = None

    def __array_finalize__(self, obj) -> None:
        self.device = getattr(obj, "device", None)

    @property
    def data(self):  # cupy's MemoryPointer: .ptr
        return _Data(self.ctypes.data)

    def get(self, stream: Stream | None = None) -> np.ndarray:
        """Copy to the host, ordered on `stream` (default: the current stream), as CuPy does."""
        (stream or self.device.current_stream).synchronize()
        self.device.transfers += 1
        return np.array(self).view(np.ndarray)

    def set(self, host: np.ndarray, stream: Stream | None = None) -> None:
        """Copy from the host, ordered on `stream` (default: the current stream)."""
        snapshot = np.array(host, copy=True)

        def copy() -> None:
            np.ndarray.__setitem__(self, Ellipsis, snapshot.reshape(self.shape))
        (stream or self.device.current_stream).enqueue(copy)

    def __getitem__(self, key):
        if _fancy(key):  # a gather kernel on the current stream: it waits for that stream only
            self.device.current_stream.synchronize()
        return super().__getitem__(key)


def _fancy(key) -> bool:
    keys = key if isinstance(key, tuple) else (key,)
    return any(isinstance(k, (np.ndarray, list)) for k in keys)


class RawKernel:
    """A CuPy RawKernel whose launches are queued on the current stream and run, when that
    stream is synchronised, as the g++-compiled kernel over the whole grid."""

    def __init__(self, device: EmulatedDevice, code: str, name: str, options=()):
        if device.compile_error:
            raise CompileException(device.compile_error)
        entry, harness = _HARNESSES[name]
        source = code.replace("#define TJ_CUDA 1\n", "")
        self._kernel = emu.RawKernelOnCpu(source, entry, harness)
        self.device, self.name = device, name
        self.launches = 0

    def compile(self, log_stream=None) -> None:
        return None

    def __call__(self, grid, block, args, **kwargs) -> None:
        stream = self.device.current_stream
        self.launches += 1

        def launch() -> None:
            self._kernel(grid, block, args)
            target = args[-1]
            self.device.fault(_STAGE[self.name], target)
        stream.enqueue(launch)


class RawModule:
    def __init__(self, device: EmulatedDevice, code: str, options=()):
        if device.compile_error:
            raise CompileException(device.compile_error)
        self.device, self.code, self.options = device, code, options

    def compile(self, log_stream=None) -> None:
        return None

    def get_function(self, name: str) -> RawKernel:
        return RawKernel(self.device, self.code, name, self.options)


class Handle:
    def __init__(self):
        self.stream_ptr = 0
        self.pointer_mode = 0


def make_cublas(device: EmulatedDevice) -> types.ModuleType:
    """The thin cuBLAS wrapper CuPy exposes (cupy_backends.cuda.libs.cublas)."""
    module = types.ModuleType("cupy_backends.cuda.libs.cublas")
    streams = lambda: {s.ptr: s for s in [device.null, *device.streams]}  # noqa: E731

    def create() -> Handle:
        return Handle()

    def setStream(handle: Handle, ptr: int) -> None:  # noqa: N802
        handle.stream_ptr = ptr

    def getStream(handle: Handle) -> int:  # noqa: N802
        return handle.stream_ptr

    def setPointerMode(handle: Handle, mode: int) -> None:  # noqa: N802
        handle.pointer_mode = mode

    def destroy(handle: Handle) -> None:
        return None

    def gemmEx(handle, transa, transb, m, n, k, alpha, a, atype, lda, b, btype, ldb, beta, c, ctype, ldc,  # noqa: N802
               compute_type, algo) -> None:
        # CuPy: `_setStream(handle)` binds the handle to the *current* stream on every call.
        handle.stream_ptr = device.current_stream.ptr
        stream = streams()[handle.stream_ptr]
        scalar = np.int32 if compute_type == cuda_kernels.CUBLAS_COMPUTE_32I else np.float32
        alpha_v = np.frombuffer((ctypes.c_char * 4).from_address(alpha), scalar)[0]
        beta_v = np.frombuffer((ctypes.c_char * 4).from_address(beta), scalar)[0]

        def gemm() -> None:
            x = _colmajor(device, a, atype, k if transa else m, m if transa else k, lda)
            y = _colmajor(device, b, btype, n if transb else k, k if transb else n, ldb)
            op_x = x.T if transa else x
            op_y = y.T if transb else y
            out = _colmajor(device, c, ctype, m, n, ldc, writable=True)
            result = float(alpha_v) * (op_x @ op_y) + (float(beta_v) * out if beta_v else 0)
            out[...] = result.astype(out.dtype)
            device.gemm_calls.append(stream.ptr)
            device.fault("gemm", device.array_at(c, out.dtype, ldc * (n - 1) + m))
        stream.enqueue(gemm, cost_ns=int(2 * m * n * k / (device.gemm_tflops * 1e12) * 1e9) + 1)

    for fn in (create, setStream, getStream, setPointerMode, destroy, gemmEx):
        setattr(module, fn.__name__, fn)
    return module


def _colmajor(device: EmulatedDevice, ptr: int, cuda_type: int, rows: int, cols: int, ld: int,
              writable: bool = False) -> np.ndarray:
    """The column-major rows×cols matrix with leading dimension `ld` at `ptr` (float64 values
    for reading; the raw typed view when writable)."""
    dtype = np.dtype(_CUDA_TYPES[cuda_type])
    flat = device.array_at(ptr, dtype, ld * (cols - 1) + rows)
    view = as_strided(flat, shape=(rows, cols), strides=(dtype.itemsize, ld * dtype.itemsize), writeable=writable)
    if writable:
        return view
    if cuda_type == cuda_kernels.CUDA_R_16BF:
        return cuda_kernels.bf16_to_float32(view).astype(np.float64)
    return view.astype(np.float64)


class MemoryPool:
    def free_all_blocks(self) -> None:
        return None


def make_cupy(device: EmulatedDevice, cublas: types.ModuleType) -> types.ModuleType:
    cp = types.ModuleType("cupy")
    cp.__version__ = "emulated"
    cp.int64, cp.uint32, cp.int32, cp.float32 = np.int64, np.uint32, np.int32, np.float32
    pool = MemoryPool()

    def empty(shape, dtype=np.float32) -> DeviceArray:
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        used = sum(a.nbytes for a in device.allocations.values())
        if used + size > device.memory_bytes:
            raise OutOfMemoryError(f"out of memory allocating {size:,} bytes")
        # Uninitialised memory reads as garbage, not zeros: stale reads must not pass by luck.
        base = np.full(max(size, 1), 0xA5, np.uint8)
        device.allocations[base.ctypes.data] = base
        array = base[:size].view(dtype).reshape(shape).view(DeviceArray)
        array.device = device
        return array

    def asarray(values, dtype=None) -> DeviceArray:
        host = np.asarray(values, dtype=dtype)
        out = empty(host.shape, host.dtype)
        out[...] = host
        return out

    def matmul(a: DeviceArray, b: DeviceArray, out: DeviceArray | None = None) -> DeviceArray:
        """cupy.matmul: queued on the current stream; C in the inputs' dtype."""
        out = empty((a.shape[0], b.shape[1]), a.dtype) if out is None else out
        stream = device.current_stream

        def run() -> None:
            np.ndarray.__setitem__(out, Ellipsis, (np.asarray(a, np.float64) @ np.asarray(b, np.float64)).astype(out.dtype))
        stream.enqueue(run, cost_ns=int(2 * a.shape[0] * a.shape[1] * b.shape[1] / (device.gemm_tflops * 1e12) * 1e9) + 1)
        return out

    cp.empty, cp.asarray, cp.matmul = empty, asarray, matmul
    cp.get_default_memory_pool = lambda: pool
    cp.RawKernel = lambda code, name, options=(), **kw: RawKernel(device, code, name, options)
    cp.RawModule = lambda code, options=(), **kw: RawModule(device, code, options)

    cuda = types.ModuleType("cupy.cuda")
    cuda.is_available = lambda: True
    cuda.cublas = cublas
    cuda.Stream = lambda non_blocking=False: _new_stream(device, non_blocking)
    cuda.Stream.null = device.null
    cuda.Event = lambda *a, **kw: Event(device)
    cuda.get_current_stream = lambda: device.current_stream

    def get_elapsed_time(start: Event, end: Event) -> float:
        if start.time_ns is None or end.time_ns is None:
            raise RuntimeError("cudaErrorNotReady: an event has not completed")
        return (end.time_ns - start.time_ns) / 1e6

    cuda.get_elapsed_time = get_elapsed_time

    class Device:
        def __init__(self, index: int = 0):
            if index != 0:
                raise RuntimeError(f"cudaErrorInvalidDevice: device {index}")
            self.id = index

        def use(self) -> None:
            return None

        def synchronize(self) -> None:
            for stream in [device.null, *device.streams]:
                stream.synchronize()

    cuda.Device = Device
    runtime = types.ModuleType("cupy.cuda.runtime")
    runtime.getDeviceCount = lambda: 1
    runtime.getDeviceProperties = lambda index: {"name": device.name.encode(), "uuid": device.uuid_bytes}
    runtime.memGetInfo = lambda: (device.memory_bytes - sum(a.nbytes for a in device.allocations.values()),
                                  device.memory_bytes)
    runtime.deviceGetPCIBusId = lambda index: device.pci_bus_id
    runtime.runtimeGetVersion = lambda: 12040
    cuda.runtime = runtime
    memory = types.ModuleType("cupy.cuda.memory")
    memory.OutOfMemoryError = OutOfMemoryError
    cuda.memory = memory
    compiler = types.ModuleType("cupy.cuda.compiler")
    compiler.CompileException = CompileException
    cuda.compiler = compiler
    cp.cuda = cuda
    return cp


def _new_stream(device: EmulatedDevice, non_blocking: bool) -> Stream:
    stream = Stream(device, non_blocking=non_blocking)
    device.streams.append(stream)
    return stream


def install(monkeypatch, device: EmulatedDevice | None = None) -> EmulatedDevice:
    """Put the emulated CuPy in sys.modules (undone by `monkeypatch`) and return its device."""
    if emu.compiler() is None:
        import pytest

        pytest.skip("g++ not installed (Debian package g++): the emulated kernels need it")
    device = device or EmulatedDevice()
    cublas = make_cublas(device)
    cp = make_cupy(device, cublas)
    modules = {"cupy": cp, "cupy.cuda": cp.cuda, "cupy.cuda.runtime": cp.cuda.runtime,
               "cupy.cuda.memory": cp.cuda.memory, "cupy.cuda.compiler": cp.cuda.compiler,
               "cupy.cuda.cublas": cublas, "cupy_backends": types.ModuleType("cupy_backends"),
               "cupy_backends.cuda": types.ModuleType("cupy_backends.cuda"),
               "cupy_backends.cuda.libs": types.ModuleType("cupy_backends.cuda.libs"),
               "cupy_backends.cuda.libs.cublas": cublas}
    modules["cupy_backends.cuda.libs"].cublas = cublas
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return device
