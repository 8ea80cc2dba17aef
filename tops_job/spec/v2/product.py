"""Tiles of C recomputed from the seed (spec §4), for the verifier's product check and for
the worker that opens a commitment later without keeping C.

The work is done in k-chunks of bounded memory: each opened tile's rows of A and columns of Bt
are generated once per chunk, and the partial sums stay exact in float32 (|Σ| ≤ 64·k ≤ 2^24).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

from ..inputs import element_rows, matrix_key
from .header import leaf_columns

# Elements generated per chunk: 8 MiB of float32. Each chunk is written by the generation and
# read back by the tiles' products. Chunks of 16 MiB made the check 1.1-1.5 times as long (at
# the cost cap, k = 16384 and 64 tiles of 63 columns: 81 ms against 63 in one process, 97
# against 63 in each of two at once); 1 MiB ones cost more in calls than they saved (92 ms)
# (benchmarks/RESULTS.md, seventeenth round).
CHUNK_ELEMENTS = 1 << 21


def tile_values(seed: bytes, *, n: int, k: int, tile: int, leaves: Iterable[int],
                chunk_elements: int = CHUNK_ELEMENTS) -> dict[int, npt.NDArray[np.int32]]:
    """The data of each distinct leaf in `leaves`: C[i][lo..hi) as int32."""
    distinct = sorted(set(leaves))
    key_a, key_b = matrix_key(seed, "A"), matrix_key(seed, "B")
    rows_of: dict[int, list[int]] = {}  # first column -> the rows that open the tile starting there
    end_of: dict[int, int] = {}  # first column -> end column
    place: dict[int, tuple[int, int]] = {}  # leaf -> (its tile's first column, its row's index in rows_of)
    for leaf in distinct:
        row, lo, hi = leaf_columns(leaf, n, tile)
        rows = rows_of.setdefault(lo, [])
        place[leaf] = (lo, len(rows))
        rows.append(row)
        end_of[lo] = hi
    # A tile's rows are consecutive rows of `a` and its columns consecutive rows of `b`, so each
    # tile's product takes two slices, never a gathered copy. A row opened in several tiles is
    # generated once for each: at most a row of k per opened leaf, beside its tile's columns.
    a_rows = [row for rows in rows_of.values() for row in rows]
    b_columns = [column for lo in rows_of for column in range(lo, end_of[lo])]
    spans = []  # (first column, rows' slice of a, columns' slice of b)
    a_at = b_at = 0
    for lo, rows in rows_of.items():
        width = end_of[lo] - lo
        spans.append((lo, slice(a_at, a_at + len(rows)), slice(b_at, b_at + width)))
        a_at, b_at = a_at + len(rows), b_at + width
    sums = {lo: np.zeros((len(rows), end_of[lo] - lo), np.float32) for lo, rows in rows_of.items()}
    a_starts = np.array(a_rows, dtype=np.uint64) * np.uint64(k)
    b_starts = np.array(b_columns, dtype=np.uint64) * np.uint64(k)
    step = max(16, (chunk_elements // max(1, len(a_rows) + len(b_columns))) // 16 * 16)
    for c0 in range(0, k, step):
        length = min(step, k - c0)
        a = element_rows(key_a, a_starts + np.uint64(c0), length)
        b = element_rows(key_b, b_starts + np.uint64(c0), length)
        for lo, a_span, b_span in spans:
            # np.dot, not `@`: NumPy's matmul keeps the GIL through a product this small, and two
            # verifications in one process's threads then ran one at a time (1.1-1.3x one thread
            # on two cores; 1.6-2.2x with np.dot, which always releases it: benchmarks/RESULTS.md).
            sums[lo] += np.dot(a[a_span], b[b_span].T)
    return {leaf: sums[lo][index].astype(np.int32) for leaf, (lo, index) in place.items()}
