"""Known-answer self-test of a backend: one small attempt on the device, compared bit for bit
with the CPU implementation (spec inputs, a float64 product, hashlib leaves, merkle.py).

Run before the first timed attempt of every run (and by `tops-job selftest`). A device that
miscompiled a kernel, takes a different cuBLAS path or corrupts memory fails here, with the
first stage that differed named, instead of after thousands of receipts at the aggregator.

Stages, in the order they are compared (the first that differs is the one reported; a wrong
product also changes every hash after it):

- inputs: A and Bt as the device holds them against spec §2's generator
- product: C against the exact float64 product of the same inputs
- leaf hashes: the device's leaf digests against hashlib over the CPU product's leaves
- tree: every parent level and the root against merkle.py
- openings: the receipt's openings (values and audit paths) against the CPU commitment's
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tops_job.compute.base import Backend, Shape
from tops_job.errors import DeviceError
from tops_job.spec.commitment import HostCommitment, make_openings
from tops_job.spec.inputs import fill_elements, padded_size

STAGES = ("inputs", "product", "leaf hashes", "tree", "openings")
# Small but not trivial: a partial last tile (200 = 12·16 + 8), odd tree levels, int8's
# multiples of four, a few milliseconds of hashing on the host.
SHAPE = Shape(48, 200, 68)
TILE = 16
OPENS = 16
KEY_A, KEY_B = 0x7F4A7C15_9E3779B9, 0x0123456789ABCDEF
NONCE = bytes(range(32))


@dataclass
class SelfTestResult:
    device: str  # model, plus bus id / UUID where known
    dtype: str
    ok: bool
    stage: str | None = None  # the first stage that differed
    detail: str = ""
    seconds: float = 0.0
    checked: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"device": self.device, "dtype": self.dtype, "ok": self.ok, "stage": self.stage,
                "detail": self.detail, "seconds": round(self.seconds, 4)}


class SelfTestFailed(DeviceError):
    """The device's results differ from the CPU's: exit 5, never a receipt."""

    def __init__(self, result: SelfTestResult):
        super().__init__(f"self-test failed on {result.device} ({result.dtype}): {result.stage} differ "
                         f"from the CPU: {result.detail}")
        self.result = result


def device_label(backend: Backend) -> str:
    """The device as operators find it: model, PCI bus id and UUID where the backend knows them."""
    parts = [backend.device_model]
    for attr in ("pci_bus_id", "device_uuid"):
        value = getattr(backend, attr, "")
        if value:
            parts.append(str(value))
    return " ".join(parts)


def run_selftest(backend: Backend, shape: Shape = SHAPE, tile: int = TILE) -> SelfTestResult:
    """Run the known-answer test on `backend`; never raises for a mismatch (see `check`)."""
    started = time.perf_counter()
    result = SelfTestResult(device=device_label(backend), dtype=backend.dtype, ok=True)
    # The device's side first, and completely: nothing is read back before the commitment,
    # as in a real attempt (an early host read would order work that the attempt does not).
    backend.prepare(shape)
    backend.generate_inputs(KEY_A, KEY_B)
    backend.multiply()
    commitment = backend.commit(tile)
    openings = make_openings(commitment, NONCE, OPENS)

    a, bt = _cpu_matrix(KEY_A, shape.m, shape.k), _cpu_matrix(KEY_B, shape.n, shape.k)
    c = a @ bt.T  # float64: exact, |Σ| ≤ 64·k
    reference = HostCommitment(c, tile, np.empty((shape.m, shape.n), np.int32))
    buffers: Any = backend  # a, bt, c: the buffers every backend keeps (not in the Backend protocol)
    comparisons = (
        ("inputs", lambda: _first_difference("A", _host(backend, buffers.a, True), a)
         or _first_difference("Bt", _host(backend, buffers.bt, True), bt)),
        ("product", lambda: _first_difference("C", _host(backend, buffers.c), c)),
        ("leaf hashes", lambda: _first_digest_difference("leaf", _levels(commitment)[0], reference.tree.levels[0])),
        ("tree", lambda: _tree_difference(_levels(commitment), reference.tree.levels, commitment.root, reference.root)),
        ("openings", lambda: _openings_difference(openings, make_openings(reference, NONCE, OPENS))),
    )
    for stage, compare in comparisons:
        detail = compare()
        result.checked.append(stage)
        if detail:
            result.ok, result.stage, result.detail = False, stage, detail
            break
    result.seconds = time.perf_counter() - started
    return result


def check(backend: Backend, **kwargs: Any) -> SelfTestResult:
    """run_selftest, raising SelfTestFailed (a DeviceError: exit 5) on a mismatch."""
    result = run_selftest(backend, **kwargs)
    if not result.ok:
        raise SelfTestFailed(result)
    return result


# ---- helpers ---------------------------------------------------------------------------------

def _cpu_matrix(key: int, rows: int, cols: int) -> np.ndarray:
    out = np.empty(padded_size(rows * cols), np.float32)
    fill_elements(key, out)
    return out[: rows * cols].reshape(rows, cols).astype(np.float64)


def _host(backend: Backend, array: Any, inputs: bool = False) -> np.ndarray:
    """A device or host array's element values as float64 (bfloat16 inputs travel as uint16)."""
    values = array.get() if hasattr(array, "get") else np.asarray(array)
    if inputs and backend.dtype == "bfloat16":
        from tops_job.compute.cuda_kernels import bf16_to_float32

        values = bf16_to_float32(values)
    return np.asarray(values).astype(np.float64)


def _first_difference(name: str, got: np.ndarray, want: np.ndarray) -> str:
    if got.shape != want.shape:
        return f"{name} has shape {got.shape}, expected {want.shape}"
    differ = np.argwhere(got != want)
    if not differ.size:
        return ""
    where = tuple(int(i) for i in differ[0])
    return (f"{len(differ)} of {got.size} values of {name} differ; first at {where}: "
            f"{got[where]!r}, expected {want[where]!r}")


def _levels(commitment: Any) -> list[list[bytes]]:
    if hasattr(commitment, "levels"):
        return commitment.levels()
    return commitment.tree.levels


def _first_digest_difference(name: str, got: list[bytes], want: list[bytes]) -> str:
    if len(got) != len(want):
        return f"{len(got)} {name} digests, expected {len(want)}"
    bad = [i for i, (g, w) in enumerate(zip(got, want)) if g != w]
    if not bad:
        return ""
    return f"{len(bad)} of {len(want)} {name} digests differ; first {name} {bad[0]}: {got[bad[0]].hex()[:16]}…, " \
           f"expected {want[bad[0]].hex()[:16]}…"


def _tree_difference(got: list[list[bytes]], want: list[list[bytes]], root: bytes, want_root: bytes) -> str:
    if len(got) != len(want):
        return f"{len(got)} tree levels, expected {len(want)}"
    for level in range(1, len(want)):
        detail = _first_digest_difference(f"level-{level} node", got[level], want[level])
        if detail:
            return detail
    if root != want_root:
        return f"root {root.hex()}, expected {want_root.hex()}"
    return ""


def _openings_difference(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> str:
    for j, (g, w) in enumerate(zip(got, want)):
        if g != w:
            which = next(key for key in ("leaf", "values", "path") if g.get(key) != w.get(key))
            return f"opening {j} (leaf {w['leaf']}) differs in {which}"
    return "" if len(got) == len(want) else f"{len(got)} openings, expected {len(want)}"
