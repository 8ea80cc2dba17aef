"""Canonical receipt bytes and the digest that is signed (spec §6, §7)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

# Fields that are not part of the signed body.
UNSIGNED_FIELDS = frozenset({"openings", "sig"})


def body_of(receipt: Mapping[str, Any]) -> dict[str, Any]:
    """The signed part of a receipt: every field except `openings` and `sig`."""
    return {key: value for key, value in receipt.items() if key not in UNSIGNED_FIELDS}


def canonical_bytes(body: Mapping[str, Any]) -> bytes:
    """Spec §7 canonical form. Under §6's restrictions (printable ASCII strings, integers
    only) this is exactly RFC 8785 and what json.dumps gives with sorted keys and no spaces."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def digest_of(receipt: Mapping[str, Any]) -> bytes:
    """SHA-256 of the canonical body: the 32 bytes that are signed."""
    return hashlib.sha256(canonical_bytes(body_of(receipt))).digest()


def receipt_line(receipt: Mapping[str, Any]) -> str:
    """A receipt as one JSON line (for --receipts-out, the ledger and WORKER_DEBUG_RECEIPT)."""
    return json.dumps(receipt, sort_keys=True, separators=(",", ":"))
