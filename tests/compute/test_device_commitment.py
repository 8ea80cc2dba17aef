"""Host-side parts of the GPU backend, on the CPU: tree layout and path extraction against
merkle.py, DeviceCommitment end to end with the emulated kernels, the cuBLAS row-major
mapping, shape and dtype validation."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support import gpu_emulator as emu
from tops_job.compute import create_backend
from tops_job.compute.base import Shape
from tops_job.compute.cuda_kernels import GEMM_TYPES
from tops_job.compute.cupy_backend import check_shape, gemm_arguments
from tops_job.compute.device_commitment import (
    DeviceCommitment,
    audit_path_from_levels,
    level_offsets,
    level_sizes,
    node_buffer_words,
    path_positions,
)
from tops_job.errors import ConfigError, DeviceError
from tops_job.spec.commitment import HostCommitment, make_openings
from tops_job.spec.merkle import MerkleTree, leaf_hash, mth, root_from_path


@given(st.integers(1, 5000))
def test_level_sizes_match_merkle_tree(count):
    tree = MerkleTree([bytes(32)] * count) if count <= 600 else None
    sizes = level_sizes(count)
    assert sizes[0] == count and sizes[-1] == 1
    assert all(b == (a + 1) // 2 for a, b in zip(sizes, sizes[1:]))
    if tree is not None:
        assert sizes == [len(level) for level in tree.levels]
    offsets = level_offsets(sizes)
    assert offsets[0] == 0 and offsets[-1] == sum(sizes) and len(offsets) == len(sizes) + 1


@settings(max_examples=60)
@given(st.integers(1, 300), st.data())
def test_audit_path_from_levels_equals_merkle_tree(count, data):
    leaves = [leaf_hash(i.to_bytes(4, "little")) for i in range(count)]
    tree = MerkleTree(leaves)
    index = data.draw(st.integers(0, count - 1))
    path = audit_path_from_levels(tree.levels, index)
    assert path == tree.audit_path(index)
    assert root_from_path(leaves[index], index, count, path) == mth([i.to_bytes(4, "little") for i in range(count)])


def test_path_positions_skip_carried_nodes_and_reject_bad_leaves():
    # 5 leaves: leaf 4 is carried up twice, then paired with the root of leaves 0..3.
    assert path_positions(4, level_sizes(5)) == [(2, 0)]
    assert path_positions(0, level_sizes(5)) == [(0, 1), (1, 1), (2, 1)]
    assert path_positions(0, [1]) == []
    with pytest.raises(IndexError):
        path_positions(5, level_sizes(5))


def test_node_buffer_words_counts_every_level():
    # 3×10 product, tile 4: 3 tiles a row, 9 leaves → 9+5+3+2+1 = 20 nodes of 8 words.
    assert node_buffer_words(3, 10, 4) == 20 * 8


@pytest.mark.skipif(emu.compiler() is None, reason="g++ not installed")
@pytest.mark.parametrize("c_dtype", [np.float32, np.int32])
@pytest.mark.parametrize("m,n,tile", [(1, 1, 1), (6, 40, 7), (3, 512, 256), (17, 33, 33)])
def test_device_commitment_with_emulated_kernels_equals_host(c_dtype, m, n, tile):
    rng = np.random.default_rng(m * n)
    c = rng.integers(-64 * 1000, 64 * 1000, size=(m, n)).astype(c_dtype)
    host = HostCommitment(c, tile, np.empty((m, n), np.int32))
    leaf_kernel, level_kernel = emu.commit_kernels_on_cpu(np.dtype(c_dtype).name)
    nodes = emu.FakeCupy.empty(node_buffer_words(m, n, tile) + 8, np.uint32)
    device = DeviceCommitment(emu.FakeCupy, c.view(emu.HostArray), tile, nodes, leaf_kernel, level_kernel)
    assert level_kernel.launches == len(level_sizes(host.leaf_count)) - 1
    assert device.root == host.root and device.leaf_count == host.leaf_count
    nonce = bytes(range(32))
    assert make_openings(device, nonce, 40) == make_openings(host, nonce, 40)
    opening = make_openings(device, nonce, 1)[0]
    assert base64.b64decode(opening["values"]) == host.leaf_data(opening["leaf"])
    # tops-receipt/2 keeps the leaf hashes to open after C is gone
    assert device.leaf_hash_bytes() == b"".join(host.tree.levels[0])


def test_device_commitment_rejects_a_small_node_buffer_and_bad_tiles():
    c = np.zeros((4, 8), np.float32).view(emu.HostArray)
    small = emu.FakeCupy.empty(8, np.uint32)
    with pytest.raises(ValueError, match="node buffer"):
        DeviceCommitment(emu.FakeCupy, c, 2, small, None, None)
    with pytest.raises(ValueError, match="tile"):
        DeviceCommitment(emu.FakeCupy, c, 9, small, None, None)


# ---- cuBLAS layout -----------------------------------------------------------------------------

def column_major_gemm(args: dict, x_buf: np.ndarray, y_buf: np.ndarray) -> np.ndarray:
    """What cuBLAS computes: the column-major M×N result (as a flat buffer with ldc) of
    op(X)·op(Y), with X and Y read column-major from flat buffers — cuBLAS semantics in NumPy."""
    M, N, K = args["m"], args["n"], args["k"]

    def read(buf, rows, cols, ld):  # a column-major rows×cols matrix with leading dimension ld
        return np.stack([buf[j * ld: j * ld + rows] for j in range(cols)], axis=1)

    x = read(x_buf, K, M, args["lda"]).T if args["transa"] == 1 else read(x_buf, M, K, args["lda"])
    y = read(y_buf, N, K, args["ldb"]).T if args["transb"] == 1 else read(y_buf, K, N, args["ldb"])
    result = x @ y  # M×N
    out = np.zeros(args["ldc"] * N)
    for j in range(N):
        out[j * args["ldc"]: j * args["ldc"] + M] = result[:, j]
    return out


@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (3, 5, 7), (8, 2, 4), (6, 9, 3)])
def test_gemm_arguments_give_the_row_major_product(m, n, k):
    rng = np.random.default_rng(m + 10 * n + 100 * k)
    a = rng.integers(-8, 8, (m, k)).astype(np.float64)
    bt = rng.integers(-8, 8, (n, k)).astype(np.float64)
    args = gemm_arguments(Shape(m, n, k))
    # backend: X = the Bt buffer, Y = the A buffer, C's buffer read back row-major m×n.
    c_flat = column_major_gemm(args, bt.reshape(-1), a.reshape(-1))
    np.testing.assert_array_equal(c_flat.reshape(m, n), a @ bt.T)
    assert (args["transa"], args["transb"]) == (1, 0)  # "TN": what integer GEMM requires


def test_int8_needs_multiples_of_four():
    check_shape("int8", Shape(3, 8, 12))
    with pytest.raises(ConfigError, match="multiples of 4") as err:
        check_shape("int8", Shape(8, 8, 10))
    assert err.value.variable == "TOPS_JOB_SIZE"
    check_shape("bfloat16", Shape(3, 5, 7))


def test_every_gpu_dtype_accumulates_exactly():
    # Spec §3: products of nibbles summed in the accumulator must stay exact up to k = 262144.
    for gemm in GEMM_TYPES.values():
        assert gemm.product in ("float32", "int32")
        assert gemm.cuda_out in (0, 10)  # CUDA_R_32F, CUDA_R_32I
    assert 64 * 262144 <= 2**24


def test_unknown_gpu_dtype_is_a_config_error_naming_the_variable():
    from tops_job.compute.cupy_backend import CupyBackend

    with pytest.raises(ConfigError) as err:
        CupyBackend("float64")
    assert "TOPS_JOB_DTYPE" in str(err.value) and "bfloat16" in str(err.value)


def test_cupy_backend_without_gpu_is_a_device_error():
    from tops_job.compute import gpu_available

    if gpu_available():
        pytest.skip("a GPU is present")
    with pytest.raises(DeviceError, match="CUDA device"):
        create_backend("cupy", "bfloat16")


@pytest.mark.skipif(emu.compiler() is None, reason="g++ not installed")
def test_leaf_data_converts_like_the_leaf_kernel_one_rounding_rule():
    # An exact product is all integers; a faulty one need not be. The opened values must be
    # the values the leaf kernel hashed (round to nearest even), or a path would not verify.
    c = np.array([[2.5, -2.5, 3.5, 1.49, -0.51, 7.0, 1e3 + 0.5, -3.0]], np.float32)
    leaf_kernel, level_kernel = emu.commit_kernels_on_cpu("float32")
    nodes = emu.FakeCupy.empty(node_buffer_words(1, 8, 4) + 8, np.uint32)
    device = DeviceCommitment(emu.FakeCupy, c.view(emu.HostArray), 4, nodes, leaf_kernel, level_kernel)
    for leaf in range(2):
        data = device.leaf_data(leaf)
        assert root_from_path(leaf_hash(data), leaf, 2, device.audit_path(leaf)) == device.root
    assert np.frombuffer(device.leaf_data(0), "<i4").tolist() == [2, -2, 4, 1]
