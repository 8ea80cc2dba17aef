"""The compute backend seam: what one attempt asks of a device."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from tops_job.spec.commitment import Commitment


@dataclass(frozen=True)
class Shape:
    m: int
    n: int
    k: int

    @property
    def ops(self) -> int:
        return 2 * self.m * self.n * self.k

    def __str__(self) -> str:
        return f"({self.m},{self.n},{self.k})"


def device_name(raw: str | bytes, fallback: str) -> str:
    """A device model as the receipt's `device` must be: printable ASCII (spec §6), bounded."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    return "".join(c for c in text if " " <= c <= "~").strip()[:128] or fallback


class Backend(Protocol):
    """One device. An attempt calls prepare (once per shape), generate_inputs, multiply,
    commit, in that order; buffers are reused across attempts."""

    name: str  # the receipt's `backend`
    device_model: str  # the receipt's `device`
    dtype: str  # the receipt's `dtype`
    default_tile: int  # leaf width that balances hashing speed and receipt size here

    @property
    def tuned_cpus(self) -> int:
        """The host CPUs the product runs on, when its speed depends on them (the CPU
        backend's threads); 0 where it does not (a GPU). Part of the autotune profile's identity."""

    def prepare(self, shape: Shape) -> None:
        """Allocate buffers for `shape` (no-op when already prepared for it)."""

    def generate_inputs(self, key_a: int, key_b: int) -> None:
        """Fill A and Bt per spec §2."""

    def multiply(self) -> int:
        """C = A·B; returns the product's device time in nanoseconds (product alone)."""

    def commit(self, tile: int) -> Commitment:
        """Commit to C (spec §4)."""

    def telemetry(self) -> dict[str, int]:
        """Readings taken during the last product (empty where the device has none)."""

    def close(self) -> None:
        """Release buffers and threads."""
