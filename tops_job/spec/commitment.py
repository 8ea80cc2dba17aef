"""Commitment to C and its openings (spec §4, §5).

`HostCommitment` commits a product held in host memory (the NumPy backend). A device backend
keeps C and the tree on the device and returns only the root and the opened leaves, through
the same `Commitment` protocol.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from typing import Any, Protocol

import numpy as np

from .merkle import MerkleTree, leaf_hash

OPEN_TAG = b"tops-receipt/1:open\x00"
ROWS_PER_BLOCK = 32  # rows converted to int32 then hashed while still in cache


class Commitment(Protocol):
    root: bytes
    leaf_count: int

    def leaf_data(self, leaf: int) -> bytes:
        """The leaf's tile as int32 little-endian bytes."""

    def audit_path(self, leaf: int) -> list[bytes]:
        """RFC 6962 audit path of the leaf, nearest sibling first."""


def tiles_per_row(n: int, tile: int) -> int:
    return -(-n // tile)


def leaf_columns(leaf: int, n: int, tile: int) -> tuple[int, int, int]:
    """(row, first column, end column) of leaf `leaf`."""
    row, t = divmod(leaf, tiles_per_row(n, tile))
    return row, t * tile, min(n, (t + 1) * tile)


def opening_indices(root: bytes, nonce: bytes, opens: int, leaf_count: int) -> list[int]:
    """ℓ_j = u64le⁻¹(H("tops-receipt/1:open" || 0x00 || root || nonce || u32le(j))[0:8]) mod L."""
    prefix = OPEN_TAG + root + nonce
    return [
        struct.unpack("<Q", hashlib.sha256(prefix + struct.pack("<I", j)).digest()[:8])[0] % leaf_count
        for j in range(opens)
    ]


def make_openings(commitment: Commitment, nonce: bytes, opens: int) -> list[dict[str, Any]]:
    """The receipt's `openings` array."""
    cache: dict[int, dict[str, Any]] = {}
    openings = []
    leaves = opening_indices(commitment.root, nonce, opens, commitment.leaf_count)
    prefetch = getattr(commitment, "prefetch", None)  # a device commitment batches its transfers
    if prefetch is not None:
        prefetch(leaves)
    for leaf in leaves:
        if leaf not in cache:
            cache[leaf] = {
                "leaf": leaf,
                "values": base64.b64encode(commitment.leaf_data(leaf)).decode("ascii"),
                "path": [node.hex() for node in commitment.audit_path(leaf)],
            }
        openings.append(dict(cache[leaf]))
    return openings


def commit_rows(product: np.ndarray, scratch: np.ndarray, lo: int, hi: int, tile: int) -> bytes:
    """Convert rows lo..hi-1 of `product` to int32 into `scratch` and return their leaf
    hashes, concatenated 32 bytes each, in leaf order. Works a cache-sized block at a time:
    the conversion and the hashing read the same rows while they are still in cache."""
    n = product.shape[1]
    tpr = tiles_per_row(n, tile)
    width = tile * 4
    out = bytearray()
    for block in range(lo, hi, ROWS_PER_BLOCK):
        block_hi = min(hi, block + ROWS_PER_BLOCK)
        np.copyto(scratch[block:block_hi], product[block:block_hi], casting="unsafe")
        for row in range(block, block_hi):
            row_bytes = memoryview(scratch[row]).cast("B")
            for t in range(tpr):
                out += leaf_hash(row_bytes[t * width : (t + 1) * width])
    return bytes(out)


def split_hashes(blob: bytes) -> list[bytes]:
    """32-byte hashes from their concatenation."""
    return [blob[i : i + 32] for i in range(0, len(blob), 32)]


class HostCommitment:
    """Commitment over a product in host memory.

    `product` is m×n with integral values (any float or int dtype); `scratch` is an m×n int32
    buffer reused across attempts that ends up holding C as int32 (the leaves' data).
    `leaf_hashes`, when given, were already computed into `scratch` by `commit_rows` (the
    NumPy backend spreads that over processes); else they are computed here.
    """

    def __init__(self, product: np.ndarray, tile: int, scratch: np.ndarray,
                 leaf_hashes: list[bytes] | None = None):
        m, n = product.shape
        if not 1 <= tile <= n:
            raise ValueError(f"tile {tile} outside 1..{n}")
        self.tile, self.n = tile, n
        self.values = scratch
        self.leaf_count = m * tiles_per_row(n, tile)
        if leaf_hashes is None:
            leaf_hashes = split_hashes(commit_rows(product, scratch, 0, m, tile))
        if len(leaf_hashes) != self.leaf_count:
            raise ValueError(f"{len(leaf_hashes)} leaf hashes for {self.leaf_count} leaves")
        self.tree = MerkleTree(leaf_hashes)
        self.root = self.tree.root

    def leaf_data(self, leaf: int) -> bytes:
        row, lo, hi = leaf_columns(leaf, self.n, self.tile)
        return self.values[row, lo:hi].astype("<i4", copy=False).tobytes()

    def audit_path(self, leaf: int) -> list[bytes]:
        return self.tree.audit_path(leaf)
