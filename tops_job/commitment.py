"""Commitment to C and its openings (spec §4, §5).

`HostCommitment` commits a product held in host memory (the NumPy backend). A device backend
keeps C and the tree on the device and returns only the root and the opened leaves, through
the same `Commitment` protocol.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from concurrent.futures import Executor
from typing import Protocol

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


def make_openings(commitment: Commitment, nonce: bytes, opens: int) -> list[dict]:
    """The receipt's `openings` array."""
    cache: dict[int, dict] = {}
    openings = []
    for leaf in opening_indices(commitment.root, nonce, opens, commitment.leaf_count):
        if leaf not in cache:
            cache[leaf] = {
                "leaf": leaf,
                "values": base64.b64encode(commitment.leaf_data(leaf)).decode("ascii"),
                "path": [node.hex() for node in commitment.audit_path(leaf)],
            }
        openings.append(dict(cache[leaf]))
    return openings


class HostCommitment:
    """Commitment over a product in host memory, built with `chunks` threads.

    `product` is m×n with integral values (any float or int dtype); `scratch` is an m×n int32
    buffer reused across attempts that ends up holding C as int32 (the leaves' data).
    """

    def __init__(self, product: np.ndarray, tile: int, scratch: np.ndarray,
                 executor: Executor | None = None, chunks: int = 1):
        m, n = product.shape
        if not 1 <= tile <= n:
            raise ValueError(f"tile {tile} outside 1..{n}")
        self.tile, self.n = tile, n
        self.values = scratch
        tpr = tiles_per_row(n, tile)
        self.leaf_count = m * tpr
        hashes: list[bytes] = [b""] * self.leaf_count
        bounds = [(lo, min(m, lo + ROWS_PER_BLOCK)) for lo in range(0, m, ROWS_PER_BLOCK)]

        def commit_rows(blocks: list[tuple[int, int]]) -> None:
            for lo, hi in blocks:
                np.copyto(scratch[lo:hi], product[lo:hi], casting="unsafe")
                for row in range(lo, hi):
                    row_bytes = memoryview(scratch[row]).cast("B")
                    base = row * tpr
                    for t in range(tpr):
                        hashes[base + t] = leaf_hash(row_bytes[t * tile * 4 : (t + 1) * tile * 4])

        if executor is None or chunks <= 1 or len(bounds) < 2 * chunks:
            commit_rows(bounds)
        else:
            # Interleave blocks so both threads finish together.
            futures = [executor.submit(commit_rows, bounds[c::chunks]) for c in range(chunks)]
            for future in futures:
                future.result()
        self.tree = MerkleTree(hashes)
        self.root = self.tree.root

    def leaf_data(self, leaf: int) -> bytes:
        row, lo, hi = leaf_columns(leaf, self.n, self.tile)
        return self.values[row, lo:hi].astype("<i4", copy=False).tobytes()

    def audit_path(self, leaf: int) -> list[bytes]:
        return self.tree.audit_path(leaf)
