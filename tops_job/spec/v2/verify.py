"""tops-receipt/2 verification (spec §8): the commitment when it arrives, the opened set
against the recorded challenge, and self-contained fiat-shamir receipts.

Everything here is deterministic in its inputs: the verdict on a digest is a function of the
bytes (and, in the challenge mode, of the verifier key), so posting again changes nothing.
A resource failure raises VerifierBusy, never ReceiptInvalid.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ReceiptInvalid
from ..signing import is_low_s, recover_public_key
from .header import CHALLENGE, COST_CAP, FIAT_SHAMIR, S_FS, S_MAX, S_MIN, check_cost, check_header, digest_of, header_of, leaf_count, ops_of
from .leaves import challenge_leaves, fs_leaves
from .openings import check_openings


class VerifierBusy(Exception):
    """Verification could not finish for lack of resources: transient (HTTP 503), no verdict."""

    code = "verifier_busy"


@dataclass(frozen=True)
class Committed:
    """A commitment that passed §8 steps 1–7: ready for a challenge."""

    header: dict[str, Any]
    digest: bytes
    pubkey: bytes
    leaf_count: int
    s: int

    @property
    def ops(self) -> int:
        return ops_of(self.header)


@dataclass(frozen=True)
class Verified:
    """What an accepted v2 receipt proved."""

    digest: bytes
    pubkey: bytes
    did: str
    run_id: str
    attempt: int
    nonce: str
    ops: int
    started_ms: int
    mode: str
    s: int

    @property
    def soundness(self) -> str:
        if self.mode == FIAT_SHAMIR:
            return f"grinding-bounded (fiat-shamir, s={self.s})"
        return f"(1-f)^{self.s}"

    def response(self, duplicate: bool = False) -> dict[str, Any]:
        return {"ok": True, "sig_ok": True, "proof_ok": True, "pubkey_hex": self.pubkey.hex(),
                "digest_hex": self.digest.hex(), "duplicate": duplicate, "ops": self.ops,
                "soundness": self.soundness}


def _signer(header: Mapping[str, Any], digest: bytes, sig_hex: str) -> bytes:
    sig = bytes.fromhex(sig_hex)  # pattern already checked by check_header
    if not is_low_s(sig):
        raise ReceiptInvalid("high_s", "signature s is not in 1..n/2")
    recovered = recover_public_key(digest, sig)
    if recovered is None:
        raise ReceiptInvalid("bad_signature", "the signature recovers no key")
    if recovered.hex() != header["pubkey"]:
        raise ReceiptInvalid("signer_mismatch", "the signature was not made by pubkey")
    return recovered


def check_commitment(obj: Any, *, s: int, cost_cap: int = COST_CAP, mode: str = CHALLENGE) -> Committed:
    """§8 steps 1–5 and 7 for a signed commitment that will be opened with `s` leaves."""
    if not S_MIN <= s <= S_MAX and not (mode == FIAT_SHAMIR and s == S_FS):
        raise ValueError(f"s must be in {S_MIN}..{S_MAX}")
    header = check_header(obj)
    if header["mode"] != mode:
        raise ReceiptInvalid("bad_mode", f"expected a {mode}-mode commitment, got {header['mode']}")
    digest = digest_of(header)
    pubkey = _signer(header, digest, obj["sig"])
    check_cost(header, s, cost_cap)
    return Committed(header=header, digest=digest, pubkey=pubkey, leaf_count=leaf_count(header), s=s)


def recorded_commitment(obj: Mapping[str, Any], *, s: int) -> Committed:
    """A commitment this verifier checked (check_commitment) and then kept in its own store,
    rebuilt for its opening. Its signature is not recovered again: that recovery is most of a
    check's cost, and what the store holds is only what passed it."""
    header = header_of(obj)
    return Committed(header=header, digest=digest_of(header), pubkey=bytes.fromhex(header["pubkey"]),
                     leaf_count=leaf_count(header), s=s)


def _verified(committed: Committed) -> Verified:
    h = committed.header
    return Verified(digest=committed.digest, pubkey=committed.pubkey, did=h["did"], run_id=h["run_id"],
                    attempt=h["attempt"], nonce=h["nonce"], ops=committed.ops, started_ms=h["started_ms"],
                    mode=h["mode"], s=committed.s)


def check_opened(committed: Committed, leaves: Sequence[int], opened: Any) -> Verified:
    """§8 steps 8–9: the opened set `{"digest", "openings"}` against the recorded leaves."""
    if not isinstance(opened, dict) or set(opened) != {"digest", "openings"}:
        raise ReceiptInvalid("bad_opening", "an opened set is exactly {digest, openings}")
    if opened["digest"] != committed.digest.hex():
        raise ReceiptInvalid("digest_mismatch", "the opened set names another digest")
    _run_checks(committed, leaves, opened["openings"])
    return _verified(committed)


def _run_checks(committed: Committed, leaves: Sequence[int], openings: Any) -> None:
    try:
        check_openings(committed.header, leaves, openings)
    except MemoryError:
        raise VerifierBusy("out of memory while recomputing the opened tiles") from None


def verify_challenge_transcript(commitment: Any, opened: Any, *, verifier_key: bytes, s: int,
                                cost_cap: int = COST_CAP) -> Verified:
    """A whole challenge-mode exchange checked offline, given the verifier's key (vectors, CLI)."""
    committed = check_commitment(commitment, s=s, cost_cap=cost_cap)
    leaves = challenge_leaves(verifier_key, committed.digest, s, committed.leaf_count)
    return check_opened(committed, leaves, opened)


def verify_fs_receipt(receipt: Any, *, cost_cap: int = COST_CAP) -> Verified:
    """A self-contained fiat-shamir receipt: header, sig and S_FS openings (§7.3)."""
    header = check_header(receipt, extra=("sig", "openings"))
    if header["mode"] != FIAT_SHAMIR:
        raise ReceiptInvalid("bad_mode", "a receipt with openings is a fiat-shamir receipt")
    digest = digest_of(header)
    pubkey = _signer(header, digest, receipt["sig"])
    check_cost(header, S_FS, cost_cap)
    committed = Committed(header=header, digest=digest, pubkey=pubkey, leaf_count=leaf_count(header), s=S_FS)
    _run_checks(committed, fs_leaves(digest, committed.leaf_count), receipt["openings"])
    return _verified(committed)
