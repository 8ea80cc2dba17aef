"""The GPU backend's CUDA kernels, run on the CPU (g++ emulation) and compiled for Hopper
(nvcc): inputs bit-identical to inputs.py, leaf hashes and tree levels equal to hashlib and
merkle.py, so the device root equals HostCommitment's."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest

from tests.support import gpu_emulator as emu
from tops_job.compute import cuda_kernels
from tops_job.compute.device_commitment import audit_path_from_levels, digest_from_words, level_sizes
from tops_job.spec.commitment import HostCommitment
from tops_job.spec.inputs import fill_elements, padded_size
from tops_job.spec.merkle import MerkleTree, leaf_hash, root_from_path

needs_gxx = pytest.mark.skipif(emu.compiler() is None, reason="g++ not installed")
needs_nvcc = pytest.mark.skipif(emu.nvcc() is None, reason="nvcc not installed")


def cpu_elements(key: int, count: int) -> np.ndarray:
    out = np.empty(padded_size(count), np.float32)
    fill_elements(key, out)
    return out[:count]


def as_values(dtype: str, stored: np.ndarray) -> np.ndarray:
    """Device storage → the element values as float64."""
    if dtype == "bfloat16":
        return cuda_kernels.bf16_to_float32(stored).astype(np.float64)
    return stored.astype(np.float64)


# ---- inputs ----------------------------------------------------------------------------------

@needs_gxx
@pytest.mark.parametrize("dtype", cuda_kernels.GPU_DTYPES)
@pytest.mark.parametrize("count", [1, 15, 16, 17, 1000, 4099])
def test_fill_kernel_matches_cpu_generator(dtype, count):
    key = 0x0123456789ABCDEF ^ count
    device = emu.fill(dtype, key, count)
    assert device.dtype == np.dtype(cuda_kernels.GEMM_TYPES[dtype].storage)
    np.testing.assert_array_equal(as_values(dtype, device), cpu_elements(key, count).astype(np.float64))


@needs_gxx
@pytest.mark.parametrize("dtype", cuda_kernels.GPU_DTYPES)
def test_fill_kernel_writes_every_storage_pattern(dtype):
    # 4096 elements hit each nibble many times; the bit patterns are the host reference's.
    key = 1234567
    device = emu.fill(dtype, key, 4096)
    nibbles = (cpu_elements(key, 4096) + 8).astype(np.int64)
    bits = np.asarray(cuda_kernels.element_bits(dtype))
    np.testing.assert_array_equal(device.view(f"u{device.itemsize}").astype(np.int64), bits[nibbles])
    assert set(nibbles.tolist()) == set(range(16))


def test_element_bits_are_the_dtype_values():
    np.testing.assert_array_equal(np.array(cuda_kernels.element_bits("float16"), np.uint16).view(np.float16),
                                  np.arange(-8, 8))
    np.testing.assert_array_equal(cuda_kernels.bf16_to_float32(cuda_kernels.element_bits("bfloat16")), np.arange(-8, 8))
    assert cuda_kernels.element_bits("int8")[0] == 0xF8 and cuda_kernels.element_bits("float32")[8] == 0


def test_bf16_packing_round_trips_and_rejects_inexact_values():
    values = np.array([-8, -1, 0, 1, 7, 64 * 262144, -3.5], np.float32)
    np.testing.assert_array_equal(cuda_kernels.bf16_to_float32(cuda_kernels.bf16_bits(values)), values)
    with pytest.raises(ValueError, match="bfloat16"):
        cuda_kernels.bf16_bits(np.array([1 + 2**-10], np.float32))


# ---- commitment ------------------------------------------------------------------------------

def product(m: int, n: int, k: int, seed: int, dtype=np.float32) -> np.ndarray:
    a = cpu_elements(seed, m * k).reshape(m, k)
    bt = cpu_elements(seed + 1, n * k).reshape(n, k)
    return (a.astype(np.float64) @ bt.T.astype(np.float64)).astype(dtype)


@needs_gxx
@pytest.mark.parametrize("c_dtype", [np.float32, np.int32])
@pytest.mark.parametrize("m,n,k,tile", [(1, 1, 1, 1), (3, 7, 5, 3), (5, 33, 40, 8), (9, 64, 17, 64),
                                        (4, 100, 300, 13), (2, 300, 9, 256)])
def test_leaf_kernel_equals_hashlib(c_dtype, m, n, k, tile):
    c = product(m, n, k, seed=m * 1000 + n, dtype=c_dtype)
    digests = emu.leaf_hashes(c, tile)
    as_int = c.astype("<i4")
    expected = [leaf_hash(as_int[row, lo:lo + tile].tobytes()) for row in range(m) for lo in range(0, n, tile)]
    assert [digest_from_words(w) for w in digests] == expected


@needs_gxx
def test_leaf_kernel_hashes_every_padding_length():
    # Message lengths 1 + 4w for w = 1..40 cross every SHA-256 block boundary case.
    c = (np.arange(40, dtype=np.int64) * 2654435761 % 2**32 - 2**31).astype(np.int32)[None, :]
    for tile in range(1, 41):
        digests = emu.leaf_hashes(c[:, :tile].copy(), tile)
        assert digest_from_words(digests[0]) == hashlib.sha256(b"\x00" + c[0, :tile].astype("<i4").tobytes()).digest()


@needs_gxx
@pytest.mark.parametrize("count", [1, 2, 3, 5, 8, 13, 100])
def test_level_kernel_equals_merkle_levels(count):
    leaves = [bytes([i % 251]) * (i % 7 + 1) for i in range(count)]
    tree = MerkleTree([leaf_hash(d) for d in leaves])
    level = np.array([np.frombuffer(h, ">u4") for h in tree.levels[0]], dtype=np.uint32).reshape(count, 8)
    for expected in tree.levels[1:]:
        level = emu.merkle_level(level)
        assert [digest_from_words(w) for w in level] == expected


@needs_gxx
@pytest.mark.parametrize("c_dtype", [np.float32, np.int32])
@pytest.mark.parametrize("m,n,k,tile", [(7, 50, 32, 16), (16, 64, 8, 64), (11, 97, 12, 10)])
def test_device_root_and_paths_equal_host_commitment(c_dtype, m, n, k, tile):
    c = product(m, n, k, seed=99 + m, dtype=c_dtype)
    host = HostCommitment(c, tile, np.empty((m, n), np.int32))
    levels = [emu.leaf_hashes(c, tile)]
    while levels[-1].shape[0] > 1:
        levels.append(emu.merkle_level(levels[-1], c.dtype.name))
    assert [lv.shape[0] for lv in levels] == level_sizes(host.leaf_count)
    as_bytes = [[digest_from_words(w) for w in lv] for lv in levels]
    assert as_bytes[-1][0] == host.root
    for leaf in range(host.leaf_count):
        path = audit_path_from_levels(as_bytes, leaf)
        assert path == host.audit_path(leaf)
        assert root_from_path(leaf_hash(host.leaf_data(leaf)), leaf, host.leaf_count, path) == host.root


@needs_gxx
def test_negative_float_products_convert_like_numpy():
    c = np.array([[-0.0, -1.0, -512.0, 16777216.0, -16777216.0, 3.0]], np.float32)
    digests = emu.leaf_hashes(c, 6)
    assert digest_from_words(digests[0]) == leaf_hash(c.astype("<i4").tobytes())


# ---- the CUDA build ------------------------------------------------------------------------

@needs_nvcc
@pytest.mark.parametrize("source", [*(f"fill:{d}" for d in cuda_kernels.GPU_DTYPES), "commit:float32", "commit:int32"])
def test_kernels_compile_for_hopper_without_spills(source):
    kind, arg = source.split(":")
    text = cuda_kernels.fill_source(arg) if kind == "fill" else cuda_kernels.commit_source(arg)
    report = emu.compile_ptx(text)
    # Register arrays indexed at run time would land in local memory: none may.
    frames = [int(x) for x in re.findall(r"(\d+) bytes stack frame", report)]
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill stores", report)]
    assert frames and max(frames) == 0 and max(spills) == 0, report


def test_sources_have_no_host_includes_for_nvrtc():
    # NVRTC has no host headers: the CUDA side of the prelude must include nothing.
    for text in [cuda_kernels.fill_source("float16"), cuda_kernels.commit_source("float32")]:
        cuda_part = text.split("#else")[0]
        assert "#include" not in cuda_part
