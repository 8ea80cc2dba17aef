"""Verify whatever a verifier is handed: a tops-receipt/1 receipt, a tops-receipt/2
fiat-shamir receipt, a v2 challenge-mode transcript (commitment, opened set and the
aggregator's key), or a lone v2 commitment (checked up to its signature and cost)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .canonical import digest_of as v1_digest_of
from .errors import ReceiptInvalid
from .receipt import DEFAULT_MIN_OPENS
from .v2 import COST_CAP, S_DEFAULT, check_commitment, verify_challenge_transcript, verify_fs_receipt
from .v2 import digest_of as v2_digest_of
from .verify import cost_of as v1_cost
from .verify import verify_receipt

TRANSCRIPT_KEYS = frozenset({"commitment", "opened", "verifier_key", "s"})


@dataclass(frozen=True)
class Outcome:
    schema: str
    digest: bytes
    did: str
    attempt: int
    soundness: str  # what acceptance proves, in words


def digest_of_any(receipt: Any) -> bytes:
    """The digest a receipt of either schema is signed over (and filed under): v2's tagged
    header digest for tops-receipt/2, v1's canonical body digest otherwise. Raises what the
    schema's own digest raises for a malformed value (TypeError, ValueError, KeyError)."""
    if isinstance(receipt, dict) and receipt.get("schema") == "tops-receipt/2":
        return v2_digest_of(receipt)
    return v1_digest_of(receipt)


def verify_any(value: Any, *, min_opens: int = DEFAULT_MIN_OPENS, full: bool = False,
               cost_cap: int = COST_CAP) -> Outcome:
    """Raises ReceiptInvalid; v2's VerifierBusy on a resource failure."""
    if isinstance(value, dict) and TRANSCRIPT_KEYS <= set(value):
        key, s = value["verifier_key"], value["s"]
        if not (isinstance(key, str) and len(key) >= 64 and type(s) is int):
            raise ReceiptInvalid("bad_type", "a transcript names verifier_key (hex) and s (int)")
        try:
            verifier_key = bytes.fromhex(key)
        except ValueError:
            raise ReceiptInvalid("bad_hex", "verifier_key is not hex") from None
        v = verify_challenge_transcript(value["commitment"], value["opened"], verifier_key=verifier_key, s=s,
                                        cost_cap=cost_cap)
        return Outcome("tops-receipt/2", v.digest, v.did, v.attempt, v.soundness)
    schema = value.get("schema") if isinstance(value, dict) else None
    if schema == "tops-receipt/2":
        if value.get("mode") == "challenge" and "openings" not in value:
            c = check_commitment(value, s=S_DEFAULT, cost_cap=cost_cap)
            return Outcome(schema, c.digest, c.header["did"], c.header["attempt"],
                           "commitment only: signature and header valid, not opened (needs the aggregator's challenge)")
        v = verify_fs_receipt(value, cost_cap=cost_cap)
        return Outcome(schema, v.digest, v.did, v.attempt, v.soundness)
    cost = v1_cost(value, full=full)
    if cost > cost_cap:
        raise ReceiptInvalid("cost_over_cap", f"verification cost {cost} is over the cap {cost_cap}")
    v1 = verify_receipt(value, min_opens=min_opens, full=full)
    opens = value["opens"]
    return Outcome("tops-receipt/1", v1.digest, v1.did, v1.attempt,
                   f"grinding-bounded (v1 fiat-shamir, opens={opens})")
