"""RFC 6962 trees: roots against the recursive definition and the RFC's own test tree,
audit paths checked with the RFC 9162 algorithm."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tops_job.spec.commitment import HostCommitment, leaf_columns, opening_indices
from tops_job.spec.merkle import MerkleTree, leaf_hash, mth, root_from_path

# The eight leaves and roots of the reference tree used by Certificate Transparency
# implementations for RFC 6962 (certificate-transparency-go merkle tests).
RFC_LEAVES = [bytes.fromhex(h) for h in ["", "00", "10", "2021", "3031", "40414243", "5051525354555657",
                                          "606162636465666768696a6b6c6d6e6f"]]
RFC_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]


@pytest.mark.parametrize("size", range(1, 9))
def test_rfc6962_reference_roots(size):
    leaves = RFC_LEAVES[:size]
    assert MerkleTree([leaf_hash(x) for x in leaves]).root.hex() == RFC_ROOTS[size - 1]
    assert mth(leaves).hex() == RFC_ROOTS[size - 1]


def test_rfc6962_reference_audit_paths():
    # PATH(0, D[8]) and PATH(5, D[8]) from the same reference suite.
    tree = MerkleTree([leaf_hash(x) for x in RFC_LEAVES])
    assert [p.hex() for p in tree.audit_path(0)] == [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ]
    assert [p.hex() for p in tree.audit_path(5)] == [
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=12), min_size=1, max_size=70))
def test_level_tree_equals_recursive_mth_and_paths_verify(leaves):
    tree = MerkleTree([leaf_hash(x) for x in leaves])
    assert tree.root == mth(leaves)
    for index, data in enumerate(leaves):
        path = tree.audit_path(index)
        assert root_from_path(leaf_hash(data), index, len(leaves), path) == tree.root
        if path:  # a shortened or altered path proves nothing
            assert root_from_path(leaf_hash(data), index, len(leaves), path[:-1]) != tree.root
            assert root_from_path(leaf_hash(data + b"x"), index, len(leaves), path) != tree.root


def test_root_from_path_rejects_out_of_range_index():
    assert root_from_path(b"\0" * 32, 3, 3, []) is None


@pytest.mark.parametrize("tile", [1, 3, 7, 10])
def test_host_commitment_leaves_are_int32_tiles_in_row_order(tile):
    product = np.arange(-35, 35, dtype=np.float32).reshape(7, 10) * 1000
    commitment = HostCommitment(product, tile, np.empty((7, 10), np.int32))
    tpr = -(-10 // tile)
    leaves = [product[i, t * tile:(t + 1) * tile].astype("<i4").tobytes() for i in range(7) for t in range(tpr)]
    assert commitment.root == mth(leaves)
    assert commitment.leaf_count == 7 * tpr
    for leaf in (0, len(leaves) - 1):
        assert commitment.leaf_data(leaf) == leaves[leaf]
        assert leaf_columns(leaf, 10, tile)[0] == leaf // tpr


@pytest.mark.parametrize("tile", [64, 257, 1000])
def test_commitment_in_helper_processes_equals_in_process(tile):
    """The NumPy backend's helper processes hash bands of rows in shared memory; the root
    must be the one a single process computes."""
    from tops_job.compute.host_workers import SharedRows, close_helpers

    rng = np.random.default_rng(tile)
    shape = (1100, 1000)  # above the size where helpers start
    shared = SharedRows.create(shape, np.float32, helpers=1)
    assert shared is not None, "memfd and helper processes work on Linux"
    try:
        shared.product.array[...] = rng.integers(-5000, 5000, size=shape)
        single = HostCommitment(shared.product.array, tile, np.empty(shape, np.int32))
        helped = HostCommitment(shared.product.array, tile, shared.scratch.array, leaf_hashes=shared.commit(tile))
        assert helped.root == single.root
        assert helped.leaf_data(5) == single.leaf_data(5)
        shared.product.array[7, 3] += 1  # the helper sees the parent's writes
        assert HostCommitment(shared.product.array, tile, shared.scratch.array,
                              leaf_hashes=shared.commit(tile)).root != single.root
    finally:
        shared.release()
        close_helpers(shared.helpers)


def test_opening_indices_are_deterministic_and_in_range():
    first = opening_indices(b"r" * 32, b"n" * 32, 16, 1000)
    assert first == opening_indices(b"r" * 32, b"n" * 32, 16, 1000)
    assert all(0 <= leaf < 1000 for leaf in first)
    assert first != opening_indices(b"s" * 32, b"n" * 32, 16, 1000)
