"""Challenge-mode commitments whose Merkle tree stays on the GPU until their challenge comes
back (docs/spec/receipt-v2.md §9.2).

A GPU worker's tree is large: at an H200's autotuned 19968³ (tile 51) it has 7.8 million
leaves. Copying the leaf hashes to the host, writing them to the outbox and rebuilding the
tree from them in Python to open took 0.7 s, 250 MB of disk and 4 s of CPU an attempt, with
products of 0.3 s. A kept tree costs none of that: the opening reads the s audit paths from
the device, and the tile values are recomputed from the seed on the CPU at (tile + 1)·k per
leaf, as the verifier does.

Nothing of the tree is on disk: after a crash, or when a tree was let go to bound device
memory, the outbox's signed header is enough, because C is a function of the seed. The run
recomputes the commitment on its backend (`JobRun.recommit`) and checks the header's root.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tops_job.spec.v2 import header_of
from tops_job.spec.v2.header import leaf_count
from tops_job.spec.v2.openings import make_openings, recomputed_leaf_data

log = logging.getLogger("tops_job.exchange")

KEEP_MAX = 8  # trees kept at once; the oldest is let go beyond (its opening then recomputes)


class KeptTree:
    """One commitment's tree on the device and its signed header: opens any leaves."""

    def __init__(self, header: Mapping[str, Any], commitment: Any, stream: Any = None):
        self.header = header_of(header)
        if commitment.root.hex() != self.header["root"]:
            raise ValueError("the device's tree does not give the header's root")
        if commitment.leaf_count != leaf_count(self.header):
            raise ValueError(f"{commitment.leaf_count} leaves for the header's {leaf_count(self.header)}")
        self._commitment = commitment
        self._stream = stream
        self._values: dict[int, bytes] = {}
        self._paths: dict[int, list[bytes]] = {}

    @property
    def leaf_count(self) -> int:
        return self._commitment.leaf_count

    @property
    def nbytes(self) -> int:
        """Device memory the kept tree holds."""
        return int(getattr(self._commitment, "tree_bytes", 0))

    def prefetch(self, leaves: Sequence[int]) -> None:
        """Values recomputed from the seed in one pass, paths read from the device in one
        transfer (make_openings calls this first)."""
        wanted = sorted({leaf for leaf in leaves if leaf not in self._values})
        if not wanted:
            return
        self._values.update(recomputed_leaf_data(self.header, wanted))
        self._paths.update(self._commitment.audit_paths(wanted, stream=self._stream))

    def leaf_data(self, leaf: int) -> bytes:
        self.prefetch([leaf])
        return self._values[leaf]

    def audit_path(self, leaf: int) -> list[bytes]:
        self.prefetch([leaf])
        return list(self._paths[leaf])

    def open(self, leaves: Sequence[int]) -> list[dict[str, Any]]:
        return make_openings(self, leaves)


class KeptTrees:
    """The run's kept trees by digest (hex): at most `limit` of them and `limit_bytes` of
    device memory (None: no byte bound), beyond which the oldest are let go. Thread-safe: the
    attempt loop puts, the exchange's senders take."""

    def __init__(self, limit: int = KEEP_MAX, limit_bytes: int | None = None):
        self.limit = max(1, limit)
        self.limit_bytes = limit_bytes
        self._trees: OrderedDict[str, KeptTree] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.let_go = 0  # trees dropped to stay under the limit (their openings recompute)

    def put(self, digest: str, tree: KeptTree) -> None:
        with self._lock:
            self._trees[digest] = tree
            self._bytes += tree.nbytes
            while len(self._trees) > 1 and (len(self._trees) > self.limit or self._over_bytes()):
                old, gone = self._trees.popitem(last=False)
                self._bytes -= gone.nbytes
                self.let_go += 1
                log.info("[exchange] %s: its tree was let go to keep at most %d trees, %s MB, on the device; "
                         "its opening will recompute the product", old[:16], self.limit,
                         "any" if self.limit_bytes is None else self.limit_bytes >> 20)

    def _over_bytes(self) -> bool:
        return self.limit_bytes is not None and self._bytes > self.limit_bytes

    def take(self, digest: str) -> KeptTree | None:
        with self._lock:
            tree = self._trees.pop(digest, None)
            if tree is not None:
                self._bytes -= tree.nbytes
            return tree

    def discard(self, digest: str) -> None:
        self.take(digest)

    def __len__(self) -> int:
        with self._lock:
            return len(self._trees)


Recommit = Callable[[Mapping[str, Any]], "KeptTree | None"]  # a signed commitment -> its tree recomputed, or None
