"""The commitment built on the device (spec §4, §5): leaf hashes and every tree level stay in
device memory; only the root, the opened leaves' data and their audit paths come back.

Layout: all levels in one flat buffer of 32-byte nodes (8 uint32 SHA-256 state words each),
level 0 (the L leaves) first, then each parent level; `level_sizes` and `level_offsets` say
where each level starts. The pure functions here (sizes, offsets, path positions, path from
level arrays) are what both the device and the tests use; they are checked against
`merkle.MerkleTree` on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tops_job.compute.cuda_kernels import THREADS_PER_BLOCK, blocks_for
from tops_job.spec.commitment import leaf_columns, tiles_per_row

NODE_WORDS = 8  # a SHA-256 digest as 8 uint32 state words (big-endian digest bytes)


def level_sizes(leaf_count: int) -> list[int]:
    """Nodes per level, leaves first, root last: each level pairs left to right and carries
    an unpaired last node up (spec §4), so level l+1 has ceil(size_l / 2) nodes."""
    if leaf_count < 1:
        raise ValueError("a Merkle tree needs at least one leaf")
    sizes = [leaf_count]
    while sizes[-1] > 1:
        sizes.append((sizes[-1] + 1) // 2)
    return sizes


def level_offsets(sizes: Sequence[int]) -> list[int]:
    """Index of each level's first node in the flat node buffer; the last entry is the total."""
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    return offsets


def path_positions(index: int, sizes: Sequence[int]) -> list[tuple[int, int]]:
    """(level, node) of each audit-path node of leaf `index`, nearest sibling first (RFC 6962
    §2.1.1). A node carried up without a sibling contributes nothing on that level."""
    if not 0 <= index < sizes[0]:
        raise IndexError(f"leaf {index} outside a tree of {sizes[0]}")
    positions = []
    for level, size in enumerate(sizes[:-1]):
        sibling = index ^ 1
        if sibling < size:
            positions.append((level, sibling))
        index >>= 1
    return positions


def audit_path_from_levels(levels: Sequence[Sequence[bytes]], index: int) -> list[bytes]:
    """The audit path of leaf `index` read from per-level node arrays (leaves first)."""
    return [levels[level][node] for level, node in path_positions(index, [len(lv) for lv in levels])]


def digest_from_words(words) -> bytes:
    """32 digest bytes from 8 SHA-256 state words (an array or sequence of uint32)."""
    return b"".join(int(w).to_bytes(4, "big") for w in words)


class DeviceCommitment:
    """Commitment over a device product `c` (m×n CuPy array, float32 or int32).

    `nodes` is a flat device buffer (uint32) of at least level_offsets(level_sizes(L))[-1] * 8
    words, reused across attempts: this object reads it until the next commitment overwrites
    it. `leaf_kernel` and `level_kernel` come from cuda_kernels.build_commit_kernels; all work
    is queued on `stream`, and the constructor returns once the root is on the host.
    """

    def __init__(self, cp, c, tile: int, nodes, leaf_kernel, level_kernel, stream=None):
        m, n = c.shape
        if not 1 <= tile <= n:
            raise ValueError(f"tile {tile} outside 1..{n}")
        if not c.flags.c_contiguous:
            raise ValueError("the product must be C-contiguous")
        self._cp, self._c, self.tile, self.n = cp, c, tile, n
        tpr = tiles_per_row(n, tile)
        self.leaf_count = m * tpr
        self.sizes = level_sizes(self.leaf_count)
        self.offsets = level_offsets(self.sizes)
        if nodes.size < self.offsets[-1] * NODE_WORDS:
            raise ValueError("node buffer too small for this tree")
        self._nodes = nodes
        u64 = _u64
        stream = stream or cp.cuda.get_current_stream()
        self._stream = stream
        self._opened: dict[int, tuple[bytes, list[bytes]]] = {}
        with stream:
            leaf_kernel((blocks_for(self.leaf_count),), (THREADS_PER_BLOCK,),
                        (c, u64(m), u64(n), u64(tile), u64(tpr), nodes))
            for level, size in enumerate(self.sizes[:-1]):
                lo, hi = self.offsets[level], self.offsets[level + 1]
                level_kernel((blocks_for((size + 1) // 2),), (THREADS_PER_BLOCK,),
                             (nodes[lo * NODE_WORDS:], u64(size), nodes[hi * NODE_WORDS:]))
            root_lo = self.offsets[-2] * NODE_WORDS
            root_words = nodes[root_lo:root_lo + NODE_WORDS].get(stream=stream)
        self.root = digest_from_words(root_words)

    # Every read below is ordered on the commitment's stream: a read on another stream (the
    # null stream by default) would not wait for the kernels above.

    def prefetch(self, leaves: Sequence[int]) -> None:
        """Fetch the data and audit paths of `leaves` in two gathers and two transfers in
        all (instead of about three synchronised transfers per leaf)."""
        wanted = sorted({leaf for leaf in leaves if leaf not in self._opened})
        if not wanted:
            return
        spans = [leaf_columns(leaf, self.n, self.tile) for leaf in wanted]
        elements = np.concatenate([np.arange(row * self.n + lo, row * self.n + hi, dtype=np.int64)
                                   for row, lo, hi in spans])
        with self._stream:
            values = self._c.reshape(-1)[self._cp.asarray(elements)].get(stream=self._stream)
        paths = self.audit_paths(wanted)
        at_value = 0
        for leaf, (_row, lo, hi) in zip(wanted, spans):
            self._opened[leaf] = (_leaf_bytes(values[at_value:at_value + hi - lo]), paths[leaf])
            at_value += hi - lo

    @property
    def tree_bytes(self) -> int:
        """Device memory of the node buffer this commitment reads."""
        return int(self._nodes.nbytes)

    def audit_paths(self, leaves: Sequence[int], stream=None) -> dict[int, list[bytes]]:
        """The audit paths of `leaves`, gathered from the tree in one transfer, read on
        `stream` (default: the commitment's). Reads the tree only, never C, so it holds for a
        kept tree (CupyBackend.commit(keep=True)) after C is overwritten by later attempts;
        another stream may read it because the constructor waited for the tree's kernels."""
        wanted = sorted(set(leaves))
        positions = [path_positions(leaf, self.sizes) for leaf in wanted]
        nodes = np.asarray([self.offsets[level] + node for path in positions for level, node in path], np.int64)
        stream = stream or self._stream
        words = np.empty((0, NODE_WORDS), np.uint32)
        if nodes.size:
            with stream:
                words = (self._nodes[: self.offsets[-1] * NODE_WORDS].reshape(-1, NODE_WORDS)
                         [self._cp.asarray(nodes)].get(stream=stream))
        out, at = {}, 0
        for leaf, path in zip(wanted, positions):
            out[leaf] = [digest_from_words(w) for w in words[at:at + len(path)]]
            at += len(path)
        return out

    def leaf_data(self, leaf: int) -> bytes:
        if leaf not in self._opened:
            self.prefetch([leaf])
        return self._opened[leaf][0]

    def leaf_hash_bytes(self) -> bytes:
        """Every leaf hash, 32 bytes each in leaf order: what a tops-receipt/2 worker keeps to
        open this commitment after C is gone (the tile values are recomputed from the seed)."""
        return self.leaf_hashes().astype(">u4").tobytes()

    def audit_path(self, leaf: int) -> list[bytes]:
        if leaf not in self._opened:
            self.prefetch([leaf])
        return list(self._opened[leaf][1])

    def leaf_hashes(self):
        """All leaf digests as an (L, 8) uint32 host array (the self-test compares them)."""
        with self._stream:
            return self._nodes[: self.leaf_count * NODE_WORDS].get(stream=self._stream).reshape(-1, NODE_WORDS)

    def levels(self) -> list[list[bytes]]:
        """Every tree level as digests, leaves first (the self-test compares them)."""
        with self._stream:
            words = self._nodes[: self.offsets[-1] * NODE_WORDS].get(stream=self._stream).reshape(-1, NODE_WORDS)
        return [[digest_from_words(w) for w in words[lo:hi]] for lo, hi in zip(self.offsets, self.offsets[1:])]


def _leaf_bytes(values) -> bytes:
    """A leaf's int32 little-endian bytes, converted as the leaf kernel does: float values
    round to nearest (exact products are integers; the one rule matters only for a faulty C)."""
    if values.dtype.kind == "f":
        values = np.rint(values)
    return values.astype("<i4").tobytes()


def _u64(value: int):
    return np.uint64(value)


def node_buffer_words(m: int, n: int, tile: int) -> int:
    """uint32 words of the node buffer for an m×n product cut in `tile`-wide leaves."""
    return level_offsets(level_sizes(m * tiles_per_row(n, tile)))[-1] * NODE_WORDS
