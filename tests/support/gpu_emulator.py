"""Runs the GPU backend's CUDA C kernels on the CPU: the very source strings of
tops_job.compute.cuda_kernels, compiled as host C++ with g++ (their portability prelude maps
the CUDA intrinsics to builtins) and launched over an emulated grid, one call per thread.

Every launch runs a few threads past the last item, so the kernels' bounds checks are
exercised too.
"""

from __future__ import annotations

import ctypes
import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from tops_job.compute import cuda_kernels

EXTRA_THREADS = 37  # launched past the end, as a real grid's last block does
_CACHE: dict[str, ctypes.CDLL] = {}

_HARNESS = r"""
unsigned long long tj_thread;
extern "C" void emu_fill(u64 key, u64 words, u32* out, u64 threads) {
    for (tj_thread = 0; tj_thread < threads; ++tj_thread) tops_fill(key, words, out);
}
"""
_COMMIT_HARNESS = r"""
unsigned long long tj_thread;
extern "C" void emu_leaf(const C_T* c, u64 m, u64 n, u64 tile, u64 tpr, u32* nodes, u64 threads) {
    for (tj_thread = 0; tj_thread < threads; ++tj_thread) tops_leaf_hash(c, m, n, tile, tpr, nodes);
}
extern "C" void emu_level(const u32* level, u64 count, u32* parents, u64 threads) {
    for (tj_thread = 0; tj_thread < threads; ++tj_thread) tops_merkle_level(level, count, parents);
}
"""


def compiler() -> str | None:
    return shutil.which("g++")


def _build(source: str) -> ctypes.CDLL:
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    if digest in _CACHE:
        return _CACHE[digest]
    workdir = Path(tempfile.mkdtemp(prefix="tops-emu-"))
    src, lib = workdir / "kernels.cpp", workdir / "kernels.so"
    src.write_text(source)
    subprocess.run([compiler(), "-std=c++14", "-O2", "-Wall", "-Werror", "-Wno-unknown-pragmas",
                    "-shared", "-fPIC", "-o", str(lib), str(src)], check=True, capture_output=True, text=True)
    _CACHE[digest] = ctypes.CDLL(str(lib))
    return _CACHE[digest]


def _ptr(array: np.ndarray) -> ctypes.c_void_p:
    assert array.flags.c_contiguous
    return ctypes.c_void_p(array.ctypes.data)


U64 = ctypes.c_uint64


def fill(dtype: str, key: int, elements: int, guard_words: int = 4) -> np.ndarray:
    """Elements 0..elements-1 as the device fill kernel writes them (storage dtype), after
    checking that nothing was written past the padded buffer."""
    gemm = cuda_kernels.GEMM_TYPES[dtype]
    lib = _build(cuda_kernels.fill_source(dtype, cuda=False) + _HARNESS)
    words = -(-elements // 16)
    total_u32 = words * 4 * gemm.element_bytes
    sentinel = np.uint32(0xDEADBEEF)
    out = np.full(total_u32 + guard_words, sentinel, dtype=np.uint32)
    lib.emu_fill(U64(key), U64(words), _ptr(out), U64(words + EXTRA_THREADS))
    assert np.all(out[total_u32:] == sentinel), "fill kernel wrote past its buffer"
    return out[:total_u32].view(gemm.storage)[:elements]


def leaf_hashes(c: np.ndarray, tile: int) -> np.ndarray:
    """(L, 8) uint32 leaf digests of the m×n product `c` (float32 or int32)."""
    lib = _build(cuda_kernels.commit_source(c.dtype.name, cuda=False) + _COMMIT_HARNESS)
    m, n = c.shape
    tpr = -(-n // tile)
    count = m * tpr
    nodes = np.full((count + 1) * 8, 0xDEADBEEF, dtype=np.uint32)
    lib.emu_leaf(_ptr(np.ascontiguousarray(c)), U64(m), U64(n), U64(tile), U64(tpr), _ptr(nodes),
                 U64(count + EXTRA_THREADS))
    assert np.all(nodes[count * 8:] == 0xDEADBEEF), "leaf kernel wrote past its leaves"
    return nodes[: count * 8].reshape(count, 8)


def merkle_level(level: np.ndarray, product: str = "float32") -> np.ndarray:
    """The parent level ((count+1)//2, 8) of a level (count, 8) of digests."""
    lib = _build(cuda_kernels.commit_source(product, cuda=False) + _COMMIT_HARNESS)
    count = level.shape[0]
    parents_n = (count + 1) // 2
    parents = np.full((parents_n + 1) * 8, 0xDEADBEEF, dtype=np.uint32)
    lib.emu_level(_ptr(np.ascontiguousarray(level, dtype=np.uint32)), U64(count), _ptr(parents),
                  U64(parents_n + EXTRA_THREADS))
    assert np.all(parents[parents_n * 8:] == 0xDEADBEEF), "level kernel wrote past its parents"
    return parents[: parents_n * 8].reshape(parents_n, 8)


def nvcc() -> str | None:
    return shutil.which("nvcc")


def compile_ptx(source: str, arch: str = "sm_90") -> str:
    """PTX of `source` (with TJ_CUDA) from nvcc, raising with the compiler's message."""
    workdir = Path(tempfile.mkdtemp(prefix="tops-nvcc-"))
    src = workdir / "kernels.cu"
    src.write_text(source)
    result = subprocess.run([nvcc(), "-std=c++14", f"-arch={arch}", "-cubin", "-Xptxas", "-v",
                             "-o", str(workdir / "k.cubin"), str(src)], capture_output=True, text=True)
    if result.returncode:
        raise AssertionError(result.stderr)
    return result.stderr


class RawKernelOnCpu:
    """A stand-in for a CuPy RawKernel that runs the emulated kernel over the whole grid
    (grid × block threads, as a launch would), with NumPy arrays for device arrays."""

    def __init__(self, source: str, entry: str, harness: str):
        self._lib = _build(source + harness)
        self._entry = entry
        self.launches = 0

    def __call__(self, grid, block, args):
        threads = int(np.prod(grid)) * int(np.prod(block))
        converted = [_ptr(a) if isinstance(a, np.ndarray) else U64(int(a)) for a in args]
        getattr(self._lib, self._entry)(*converted, U64(threads))
        self.launches += 1


def commit_kernels_on_cpu(product: str) -> tuple[RawKernelOnCpu, RawKernelOnCpu]:
    source = cuda_kernels.commit_source(product, cuda=False)
    return (RawKernelOnCpu(source, "emu_leaf", _COMMIT_HARNESS),
            RawKernelOnCpu(source, "emu_level", _COMMIT_HARNESS))


class HostArray(np.ndarray):
    """A NumPy array with CuPy's .get(), so device-side code can run on host arrays."""

    def get(self, stream=None):
        return np.array(self)


class _Stream:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class FakeCupy:
    """The few CuPy names DeviceCommitment uses, backed by NumPy."""

    int64 = np.int64
    uint32 = np.uint32

    class cuda:  # noqa: N801 (mirrors cupy.cuda)
        @staticmethod
        def get_current_stream():
            return _Stream()

    @staticmethod
    def asarray(values, dtype=None):
        return np.asarray(values, dtype=dtype).view(HostArray)

    @staticmethod
    def empty(size, dtype):
        return np.empty(size, dtype).view(HostArray)
