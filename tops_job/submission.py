"""The submitter seam: where a signed receipt goes, and what came back."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Protocol


class Outcome(str, enum.Enum):
    ACCEPTED = "accepted"  # verified and counted
    DUPLICATE = "duplicate"  # accepted before (a retry); counted once
    REJECTED = "rejected"  # final: invalid, replayed, too large; resending cannot help
    TRANSIENT = "transient"  # not delivered this time; retry later
    PENDING = "pending"  # still in the outbox at the end of the run


@dataclass
class SubmitResult:
    outcome: Outcome
    status: int | None = None  # HTTP status where there was one
    response: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # stable error code or transport error
    retry_after: float | None = None  # seconds the aggregator asked us to wait

    @property
    def delivered(self) -> bool:
        return self.outcome in (Outcome.ACCEPTED, Outcome.DUPLICATE)


class Submitter(Protocol):
    """Sends one receipt. Plugins register more through `tops_job_register_submitters`."""

    name: str

    def submit(self, receipt: dict[str, Any], digest: bytes) -> SubmitResult:
        """Deliver `receipt` (whose body hashes to `digest`); never raises for a delivery failure."""

    def close(self) -> None:
        """Release connections and files."""
