"""The receipt object (spec §6): building one, and checking its fields strictly (§8.1)."""

from __future__ import annotations

import json
import re
from typing import Any

from .errors import ReceiptInvalid

SCHEMA = "tops-receipt/1"
MAX_SAFE_INT = 2**53 - 1
MAX_K = 262144
DEFAULT_MIN_OPENS = 16
MAX_OPENS = 256

_HEX = {32: re.compile(r"[0-9a-f]{64}"), 33: re.compile(r"[0-9a-f]{66}"), 65: re.compile(r"[0-9a-f]{130}")}
_RUN_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_PRINTABLE = re.compile(r"[\x20-\x7e]*")

# field -> (kind, required). kind: "int", "str", "hexN", "object", "array".
FIELDS: dict[str, tuple[str, bool]] = {
    "schema": ("str", True),
    "did": ("str", True),
    "pubkey": ("hex33", True),
    "run_id": ("str", True),
    "attempt": ("int", True),
    "nonce": ("hex32", True),
    "challenge": ("hex32", False),
    "m": ("int", True),
    "n": ("int", True),
    "k": ("int", True),
    "tile": ("int", True),
    "opens": ("int", True),
    "dtype": ("str", True),
    "backend": ("str", True),
    "device": ("str", True),
    "elapsed_ns": ("int", True),
    "ops": ("int", True),
    "started_ms": ("int", True),
    "root": ("hex32", True),
    "telemetry": ("object", False),
    "openings": ("array", True),
    "sig": ("hex65", True),
}


def build_body(*, did: str, pubkey: bytes, run_id: str, attempt: int, nonce: bytes,
               challenge: bytes | None, m: int, n: int, k: int, tile: int, opens: int,
               dtype: str, backend: str, device: str, elapsed_ns: int, started_ms: int,
               root: bytes, telemetry: dict[str, int] | None = None) -> dict[str, Any]:
    """The signed body of a receipt, from values already computed."""
    body: dict[str, Any] = {
        "schema": SCHEMA, "did": did, "pubkey": pubkey.hex(), "run_id": run_id,
        "attempt": attempt, "nonce": nonce.hex(), "m": m, "n": n, "k": k, "tile": tile,
        "opens": opens, "dtype": dtype, "backend": backend, "device": device,
        "elapsed_ns": max(1, int(elapsed_ns)), "ops": 2 * m * n * k,
        "started_ms": started_ms, "root": root.hex(),
    }
    if challenge is not None:
        body["challenge"] = challenge.hex()
    if telemetry:
        body["telemetry"] = {name: int(value) for name, value in telemetry.items()}
    return body


def printable(value: str) -> bool:
    return _PRINTABLE.fullmatch(value) is not None


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key in object")
    return obj


def parse_json(text: str | bytes) -> Any:
    """Strict JSON: no NaN/Infinity, no duplicate keys; floats stay floats so the schema
    check can reject them. Raises ReceiptInvalid("malformed_json", …)."""
    try:
        return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicate_keys)
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:
        raise ReceiptInvalid("malformed_json", str(exc)[:200]) from None


def _is_int(value: Any) -> bool:
    return type(value) is int and 0 <= value <= MAX_SAFE_INT


def check_fields(receipt: Any, *, min_opens: int = DEFAULT_MIN_OPENS) -> None:
    """Spec §8.1: exactly the fields of §6, each of its type and range, and the arithmetic
    relations between them. Raises ReceiptInvalid with a stable code."""
    if not isinstance(receipt, dict):
        raise ReceiptInvalid("not_an_object", "a receipt is a JSON object")
    unknown = sorted(set(receipt) - set(FIELDS))
    if unknown:
        raise ReceiptInvalid("unknown_field", f"unknown field {unknown[0]!r}")
    for name, (kind, required) in FIELDS.items():
        if name not in receipt:
            if required:
                raise ReceiptInvalid("missing_field", f"missing field {name!r}")
            continue
        value = receipt[name]
        if kind == "int":
            if not _is_int(value):
                raise ReceiptInvalid("bad_type", f"{name} must be an integer in [0, 2^53)")
        elif kind == "str" or kind.startswith("hex"):
            if not isinstance(value, str):
                raise ReceiptInvalid("bad_type", f"{name} must be a string")
            if not printable(value):
                raise ReceiptInvalid("bad_string", f"{name} has a character outside printable ASCII")
            if kind.startswith("hex") and not _HEX[int(kind[3:])].fullmatch(value):
                raise ReceiptInvalid("bad_hex", f"{name} must be {int(kind[3:])} bytes of lowercase hex")
        elif kind == "object":
            if not isinstance(value, dict):
                raise ReceiptInvalid("bad_type", f"{name} must be an object")
            for key, reading in value.items():
                if not printable(key) or not _is_int(reading):
                    raise ReceiptInvalid("bad_type", f"{name} maps printable strings to integers")
        elif kind == "array" and not isinstance(value, list):
            raise ReceiptInvalid("bad_type", f"{name} must be an array")
    r = receipt
    if r["schema"] != SCHEMA:
        raise ReceiptInvalid("bad_schema", f"schema must be {SCHEMA!r}")
    if not _RUN_ID.fullmatch(r["run_id"]):
        raise ReceiptInvalid("bad_run_id", "run_id must be 1..64 of [A-Za-z0-9._-]")
    if min(r["m"], r["n"], r["k"]) < 1 or r["k"] > MAX_K:
        raise ReceiptInvalid("bad_shape", f"m, n, k must be positive and k at most {MAX_K}")
    if r["ops"] != 2 * r["m"] * r["n"] * r["k"]:
        raise ReceiptInvalid("ops_mismatch", "ops must equal 2*m*n*k")
    if not 1 <= r["tile"] <= r["n"]:
        raise ReceiptInvalid("bad_tile", "tile must be in 1..n")
    if not 1 <= r["opens"] <= MAX_OPENS:
        raise ReceiptInvalid("bad_opens", f"opens must be in 1..{MAX_OPENS}")
    if r["opens"] < min_opens:
        raise ReceiptInvalid("too_few_opens", f"opens {r['opens']} is below the minimum {min_opens}")
    if r["elapsed_ns"] < 1:
        raise ReceiptInvalid("bad_elapsed", "elapsed_ns must be at least 1")
