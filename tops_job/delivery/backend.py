"""Where undelivered receipts live: the outbox backend a run uses (hook `tops_job_outbox`).

A backend holds two stores, both durable before a write returns, so a receipt survives the
death of the run (kill -9, a lost instance) until the aggregator has answered for it:

- `receipts()`: self-contained receipts (tops-receipt/1, and /2 in Fiat–Shamir mode),
  delivered by `OutboxDelivery` (`ReceiptStore`);
- `exchanges()`: tops-receipt/2 challenge-mode attempts (commitment, challenge, openings,
  verdict), delivered by `ExchangeDelivery` (`ExchangeStore`).

The built-in backend is the local directory (`LocalOutbox`: `delivery/outbox.py` and
`delivery/exchange_outbox.py`, ownership by kernel locks). A backend for storage that outlives
the instance (the AWS plugin's S3 outbox) keeps the same promises with its own means:
each receipt stored once (never overwritten), one sender per entry at a time, a dead run's
entries taken over by a later run, rejected entries and the aggregator's answers kept beside
them. `location` names the store in logs, the summary and `tops-job outbox`.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

# An exchange attempt's states (ExchangeStore.state, .pending, .recover)
AWAITING_CHALLENGE, CHALLENGED, AWAITING_VERDICT = "awaiting_challenge", "challenged", "awaiting_verdict"


def parse_entry(data: bytes) -> dict[str, Any] | None:
    """The receipt in an outbox entry's bytes, or None when they are not one (any store
    reads its entries back through this, so all accept and refuse the same)."""
    from tops_job.spec.any_receipt import digest_of_any
    from tops_job.spec.receipt import parse_json

    try:
        receipt = parse_json(data)
    except Exception:
        return None
    if not isinstance(receipt, dict) or "sig" not in receipt or "nonce" not in receipt:
        return None
    try:
        digest_of_any(receipt)
    except (TypeError, ValueError, KeyError, AttributeError):  # v2's header needs its fields
        return None
    return receipt


class Claim(Protocol):
    """This run's hold on one entry while it sends it; `release` gives it up."""

    digest: str

    def release(self) -> None: ...


@runtime_checkable
class ReceiptStore(Protocol):
    """Signed, self-contained receipts until the aggregator answers (see delivery/outbox.py
    for the directory version's exact semantics, which every store keeps)."""

    location: str  # e.g. "/data/outbox" or "s3://bucket/prefix"
    rejected_location: str
    withheld_location: str
    problems: Counter  # what was found wrong with the store, and how often (for the summary)
    quarantined: int

    def problem(self, what: str, detail: str) -> None: ...

    # ownership of earlier runs' entries
    def acquire(self) -> bool:
        """Become the run that drains earlier runs' entries (non-blocking); False when another
        live run is. Per-entry `claim`s keep runs apart in any case."""
    def release(self) -> None:
        """Give up what `acquire` took and anything else this run holds (leases, threads)."""
    def recover(self) -> list[str]:
        """Tidy what a dead run left and return the digests waiting, oldest first. Receipts a
        dead run held for its self-audit become ordinary entries. Call after `acquire`."""
    def claim(self, digest: str) -> Claim | str:
        """Hold entry `digest` for sending: a Claim, or why not: "gone" (delivered, rejected or
        moved by another run), "busy" (another live run is sending it), "unreadable"."""

    # entries
    def put(self, receipt: dict[str, Any], digest: bytes) -> Any:
        """Store `receipt` durably; never overwrites an entry. Raises StorageError."""
    def put_held(self, receipt: dict[str, Any], digest: bytes) -> Any:
        """`put`, but out of every sender's sight until `unhold` (the self-audit's hold)."""
    def unhold(self, digest: str) -> None: ...
    def withhold(self, digest: str, reason: str) -> None:
        """The held receipt failed the self-audit: kept with `reason`, never sent."""
    def load(self, digest: str) -> dict[str, Any] | None: ...
    def holds(self, digest: str) -> bool: ...
    def count(self) -> int: ...
    def note_answer(self, digest: str, answer: dict[str, Any]) -> None:
        """Keep the last answer that left `digest` waiting (shown by `tops-job outbox`)."""
    def remove(self, digest: str) -> bool:
        """Delivered: the entry goes. False (logged) when it cannot: it stays, and the next
        send of it is answered duplicate."""
    def reject(self, digest: str, answer: dict[str, Any]) -> bool:
        """A final answer: the receipt and the answer are kept apart, never sent again."""


@runtime_checkable
class ExchangeStore(Protocol):
    """tops-receipt/2 challenge-mode attempts, from signing to verdict (see
    delivery/exchange_outbox.py for the states and the write order every store keeps)."""

    location: str
    withheld_location: str
    done_location: str  # where verdicts are kept

    def acquire(self) -> bool: ...
    def release(self) -> None: ...
    def recover(self) -> dict[str, str]:
        """Tidy after a crash and return digest -> state of the attempts this run resumes:
        those no live run owns, oldest first."""
    def put(self, commitment: dict[str, Any], digest: str, leaf_hashes: bytes | None, *, held: bool = False) -> None: ...
    def put_challenge(self, digest: str, challenge: dict[str, Any]) -> None: ...
    def put_opened(self, digest: str, opened: dict[str, Any]) -> None: ...
    def unhold(self, digest: str) -> None: ...
    def withhold(self, digest: str, reason: str) -> None: ...
    def drop_challenge(self, digest: str) -> None: ...
    def finish(self, digest: str, verdict: str, answer: dict[str, Any]) -> None: ...
    def load(self, digest: str, kind: str) -> dict[str, Any] | None: ...
    def leaf_hashes(self, digest: str) -> list[bytes] | None: ...
    def state(self, digest: str) -> str | None: ...
    def verdict(self, digest: str) -> dict[str, Any] | None: ...
    def pending(self) -> dict[str, str]: ...


@runtime_checkable
class OutboxBackend(Protocol):
    """What the `tops_job_outbox` hook returns."""

    location: str

    def receipts(self) -> ReceiptStore: ...
    def exchanges(self) -> ExchangeStore: ...
    def waiting(self) -> int:
        """Receipts waiting, without taking or creating anything (a run without an
        aggregator reports them; see delivery/protocol.InlineDelivery)."""
    def inventory(self) -> dict[str, Any]:
        """What `tops-job outbox` lists: {"outbox": location, "pending": [{"digest", "run_id",
        "attempt", "did", "age_s", "last_answer"}], "rejected": [{"digest", "run_id", "attempt",
        "did", "answer"}], "quarantined": [names], "held_for_self_audit": n, "withheld":
        [{"digest", "run_id", "attempt", "did", "reason"}]}. Reads only, creates nothing."""


class LocalOutbox:
    """The built-in backend: one directory (`TOPS_JOB_OUTBOX_DIR`, --outbox) on the
    instance's disk or a mounted volume."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.location = str(self.path)

    def receipts(self) -> ReceiptStore:
        from tops_job.delivery.outbox import Outbox

        return Outbox(self.path)

    def exchanges(self) -> ExchangeStore:
        from tops_job.delivery.exchange_outbox import ExchangeOutbox

        return ExchangeOutbox(self.path)

    def waiting(self) -> int:
        from tops_job.delivery.outbox import Outbox

        return Outbox.count_in(self.path)

    def inventory(self) -> dict[str, Any]:
        from tops_job.delivery.drain import list_outbox

        return list_outbox(self.path)
