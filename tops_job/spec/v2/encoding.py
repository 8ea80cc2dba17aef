"""Strict encodings of tops-receipt/2 (spec §2): UTF-8 JSON with integer literals only,
exact hex, canonical base64, canonical JSON, and the domain tags every hash starts with."""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from typing import Any, NoReturn

from ..errors import ReceiptInvalid

MAX_SAFE_INT = 2**53 - 1
MAX_DEPTH = 8
HEX32 = re.compile(r"[0-9a-f]{64}")
PUBKEY = re.compile(r"0[23][0-9a-f]{64}")
SIG = re.compile(r"[0-9a-f]{130}")
PRINTABLE = re.compile(r"[\x20-\x7e]*")
_BOM = b"\xef\xbb\xbf"


def tag(name: str) -> bytes:
    """T(name) = "tops-receipt/2:" || name || 0x00 (spec §0)."""
    return b"tops-receipt/2:" + name.encode("ascii") + b"\x00"


def decode_utf8(data: bytes) -> str:
    """§2.1: UTF-8 without a BOM, never auto-detected UTF-16/32."""
    if data.startswith(_BOM):
        raise ReceiptInvalid("not_utf8", "the body starts with a byte-order mark")
    try:
        return data.decode("utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        raise ReceiptInvalid("not_utf8", f"the body is not UTF-8 (byte {exc.start})") from None


def _no_float(text: str) -> NoReturn:
    raise ValueError(f"number {text[:20]!r} has a fraction or an exponent")


def _no_constant(text: str) -> NoReturn:
    raise ValueError(f"{text} is not JSON")


def _integer(text: str) -> int:
    if text.startswith("-"):
        raise ValueError(f"negative number {text[:20]!r}")
    if len(text) > 16:  # beyond 2^53 anyway: never convert a huge literal
        return MAX_SAFE_INT + 1
    return int(text)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key in object")
    return obj


def _too_deep(value: Any, limit: int) -> bool:
    """Whether containers nest deeper than `limit`. Level by level, holding only containers:
    an opened set's hundreds of strings are looked at once each and never queued."""
    level, depth = [value] if isinstance(value, (dict, list)) else [], 0
    while level:
        depth += 1
        if depth > limit:
            return True
        level = [child for item in level for child in (item.values() if isinstance(item, dict) else item)
                 if isinstance(child, (dict, list))]
    return False


def parse_json(data: bytes | str) -> Any:
    """§2.1–§2.2: strict UTF-8 JSON. Raises ReceiptInvalid("not_utf8" | "malformed_json")."""
    text = decode_utf8(data) if isinstance(data, (bytes, bytearray)) else data
    try:
        value = json.loads(text, parse_float=_no_float, parse_int=_integer, parse_constant=_no_constant,
                           object_pairs_hook=_no_duplicate_keys)
    except (ValueError, RecursionError) as exc:
        raise ReceiptInvalid("malformed_json", str(exc)[:200]) from None
    if _too_deep(value, MAX_DEPTH):
        raise ReceiptInvalid("malformed_json", f"nested deeper than {MAX_DEPTH}")
    return value


def canonical_bytes(header: Mapping[str, Any]) -> bytes:
    """§2.7: sorted keys, no whitespace; under §2's string rules this is RFC 8785."""
    return json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def is_int(value: Any) -> bool:
    return type(value) is int and 0 <= value <= MAX_SAFE_INT


def is_printable(value: str) -> bool:
    return PRINTABLE.fullmatch(value) is not None


def hex32(value: Any, name: str, code: str = "bad_hex") -> bytes:
    """32 bytes from exactly [0-9a-f]{64} (never bytes.fromhex alone: it skips whitespace)."""
    if not isinstance(value, str) or not HEX32.fullmatch(value):
        raise ReceiptInvalid(code, f"{name} must be exactly 64 characters of [0-9a-f]")
    return bytes.fromhex(value)


def canonical_base64(value: Any, what: str, size: int) -> bytes:
    """§2.6: standard padded base64 in its one canonical form, decoding to `size` bytes."""
    if not isinstance(value, str):
        raise ReceiptInvalid("bad_values", f"{what}: values must be a base64 string")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ReceiptInvalid("bad_values", f"{what}: values are not standard padded base64") from None
    if base64.b64encode(data).decode("ascii") != value:
        raise ReceiptInvalid("bad_values", f"{what}: values are not in canonical padded base64")
    if len(data) != size:
        raise ReceiptInvalid("bad_values", f"{what}: {len(data)} bytes of values, expected {size}")
    return data
