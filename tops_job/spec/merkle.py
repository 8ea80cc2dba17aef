"""RFC 6962 Merkle trees: root, audit paths, and the RFC 9162 path check (spec §4, §5)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

_sha256 = hashlib.sha256


def leaf_hash(data: bytes | memoryview) -> bytes:
    """MTH({d}) = H(0x00 || d)."""
    h = _sha256(b"\x00")
    h.update(data)
    return h.digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """H(0x01 || left || right)."""
    return _sha256(b"\x01" + left + right).digest()


class MerkleTree:
    """All levels of an RFC 6962 tree, built by pairing each level left to right and carrying
    an unpaired last node up unchanged (spec §4: the same root as the recursive MTH)."""

    def __init__(self, leaf_hashes: Sequence[bytes]):
        if not leaf_hashes:
            raise ValueError("a Merkle tree needs at least one leaf")
        levels = [list(leaf_hashes)]
        while len(levels[-1]) > 1:
            level = levels[-1]
            parents = [_sha256(b"\x01" + level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)]
            if len(level) % 2:
                parents.append(level[-1])
            levels.append(parents)
        self.levels = levels

    @property
    def size(self) -> int:
        return len(self.levels[0])

    @property
    def root(self) -> bytes:
        return self.levels[-1][0]

    def audit_path(self, index: int) -> list[bytes]:
        """RFC 6962 §2.1.1 PATH(index), nearest sibling first. A carried node has no sibling
        on that level and contributes nothing, as in the recursive definition."""
        if not 0 <= index < self.size:
            raise IndexError(f"leaf {index} outside a tree of {self.size}")
        path = []
        for level in self.levels[:-1]:
            sibling = index ^ 1
            if sibling < len(level):
                path.append(level[sibling])
            index >>= 1
        return path


def mth(leaves: Sequence[bytes]) -> bytes:
    """The recursive Merkle Tree Hash of RFC 6962 §2.1, for tests and small trees."""
    if len(leaves) == 1:
        return leaf_hash(leaves[0])
    split = 1 << ((len(leaves) - 1).bit_length() - 1)
    return node_hash(mth(leaves[:split]), mth(leaves[split:]))


def root_from_path(leaf: bytes, index: int, size: int, path: Sequence[bytes]) -> bytes | None:
    """RFC 9162 §2.1.3.2: the root that `path` proves for leaf hash `leaf` at `index` in a
    tree of `size` leaves, or None when the path has the wrong length for that position."""
    if not 0 <= index < size:
        return None
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            return None
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return r if sn == 0 else None
