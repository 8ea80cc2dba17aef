"""Tiles of C recomputed from the seed (spec §4), for the verifier's product check and for
the worker that opens a commitment later without keeping C.

The work is done in k-chunks of bounded memory: each distinct row of A and of Bt is
generated once per chunk, and the partial sums stay exact in float32 (|Σ| ≤ 64·k ≤ 2^24).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

from ..inputs import element_rows, matrix_key
from .header import leaf_columns

CHUNK_ELEMENTS = 1 << 22  # elements generated per chunk: 16 MiB of float32


def tile_values(seed: bytes, *, n: int, k: int, tile: int, leaves: Iterable[int],
                chunk_elements: int = CHUNK_ELEMENTS) -> dict[int, npt.NDArray[np.int32]]:
    """The data of each distinct leaf in `leaves`: C[i][lo..hi) as int32."""
    distinct = sorted(set(leaves))
    key_a, key_b = matrix_key(seed, "A"), matrix_key(seed, "B")
    by_tile: dict[int, set[int]] = {}  # first column -> rows that open a tile starting there
    spans: dict[int, int] = {}  # first column -> end column
    for leaf in distinct:
        row, lo, hi = leaf_columns(leaf, n, tile)
        by_tile.setdefault(lo, set()).add(row)
        spans[lo] = hi
    rows = sorted({row for group in by_tile.values() for row in group})
    columns = sorted({c for lo, hi in spans.items() for c in range(lo, hi)})
    row_at = {row: index for index, row in enumerate(rows)}
    col_at = {col: index for index, col in enumerate(columns)}
    sums = {lo: np.zeros((len(group), spans[lo] - lo), np.float32) for lo, group in by_tile.items()}
    order = {lo: sorted(group) for lo, group in by_tile.items()}
    a_starts = np.array(rows, dtype=np.uint64) * np.uint64(k)
    b_starts = np.array(columns, dtype=np.uint64) * np.uint64(k)
    step = max(16, (chunk_elements // max(1, len(rows) + len(columns))) // 16 * 16)
    for c0 in range(0, k, step):
        length = min(step, k - c0)
        a = element_rows(key_a, a_starts + np.uint64(c0), length)
        b = element_rows(key_b, b_starts + np.uint64(c0), length)
        for lo, group in order.items():
            a_part = a[[row_at[row] for row in group]]
            b_part = b[col_at[lo]: col_at[lo] + spans[lo] - lo]
            sums[lo] += a_part @ b_part.T
    out: dict[int, npt.NDArray[np.int32]] = {}
    for leaf in distinct:
        row, lo, _hi = leaf_columns(leaf, n, tile)
        out[leaf] = sums[lo][order[lo].index(row)].astype(np.int32)
    return out
