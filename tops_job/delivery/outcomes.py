"""The submitter seam: where a signed receipt goes, and what came back."""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger("tops_job.sender")


class Outcome(str, enum.Enum):
    ACCEPTED = "accepted"  # verified and counted
    DUPLICATE = "duplicate"  # accepted before (a retry); counted once
    REJECTED = "rejected"  # final: invalid, replayed, too large; resending cannot help
    TRANSIENT = "transient"  # not delivered this time; retry later
    PENDING = "pending"  # still in the outbox at the end of the run

    @property
    def delivered(self) -> bool:
        """The aggregator holds the receipt."""
        return self in (Outcome.ACCEPTED, Outcome.DUPLICATE)


# What a run reports for each receipt, in the order summaries and dashboards list them
# (TRANSIENT is only ever an intermediate state).
REPORTED_OUTCOMES = (Outcome.ACCEPTED, Outcome.DUPLICATE, Outcome.REJECTED, Outcome.PENDING)
DELIVERED_OUTCOMES = (Outcome.ACCEPTED, Outcome.DUPLICATE)


@dataclass
class SubmitResult:
    outcome: Outcome
    status: int | None = None  # HTTP status where there was one
    response: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # stable error code or transport error
    retry_after: float | None = None  # seconds the aggregator asked us to wait

    @property
    def delivered(self) -> bool:
        return self.outcome.delivered


class Submitter(Protocol):
    """Sends one receipt. Plugins register more through `tops_job_register_submitters`."""

    name: str

    def submit(self, receipt: dict[str, Any], digest: bytes) -> SubmitResult:
        """Deliver `receipt` (whose body hashes to `digest`); never raises for a delivery failure."""

    def close(self) -> None:
        """Release connections and files."""


UNCONFIRMED = "unconfirmed_answer"


def confirmed(result: SubmitResult, digest: bytes) -> SubmitResult:
    """An aggregator's answer counts as a delivery only when it names `digest` and says the
    proof and the signature verified (spec §9: `digest_hex`, `proof_ok`, `sig_ok`). Anything
    else, such as a stub, a webhook sink or a misrouted ingress answering `200 {"ok": true}`,
    keeps the receipt in the outbox (error UNCONFIRMED, the sender parks it with the answer).
    Submitters that talk to an aggregator call this on their 200s."""
    if not result.delivered:
        return result
    answer = result.response if isinstance(result.response, dict) else {}
    missing = [name for name, want in (("digest_hex", digest.hex()), ("proof_ok", True), ("sig_ok", True))
               if answer.get(name) != want]
    if not missing:
        return result
    log.warning("[sender] receipt %s: an answer without %s is no delivery; it stays in the outbox",
                digest.hex()[:16], " and ".join(f"{name}={'<this digest>' if name == 'digest_hex' else 'true'}"
                                                 for name in missing))
    return SubmitResult(Outcome.TRANSIENT, status=result.status, response=answer, error=UNCONFIRMED)
