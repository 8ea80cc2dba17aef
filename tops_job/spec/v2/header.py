"""The signed commitment of tops-receipt/2 (spec §3, §6): its fields checked strictly, its
digest, and the values every verifier computes from it (nonce, seed, ops, cost)."""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Mapping
from typing import Any

from ..errors import ReceiptInvalid
from .encoding import PUBKEY, SIG, canonical_bytes, hex32, is_int, is_printable, tag

SCHEMA = "tops-receipt/2"
CHALLENGE, FIAT_SHAMIR = "challenge", "fiat-shamir"
MODES = (CHALLENGE, FIAT_SHAMIR)

K_MIN = 256
K_MAX = 262144
MN_MAX = 131072
TILE_MAX = 256
S_DEFAULT = 64
S_MIN = 32
S_MAX = 256
S_FS = 256
G_FS = 1 << 16
COST_CAP = 1 << 26
DID_MAX = 128
TELEMETRY_MAX = 16

_DID = re.compile(r"[\x21-\x7e]{1,128}")
_RUN_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_DTYPE = re.compile(r"[a-z0-9_]{1,16}")
_BACKEND = re.compile(r"[a-z0-9_.-]{1,32}")
_DEVICE = re.compile(r"[\x21-\x7e]([\x20-\x7e]{0,62}[\x21-\x7e])?")
_TELEMETRY_KEY = re.compile(r"[a-z0-9_]{1,32}")

# Header fields: name -> (kind, required). kinds: str, int, hex32, pubkey, object.
HEADER_FIELDS: dict[str, tuple[str, bool]] = {
    "schema": ("str", True), "mode": ("str", True), "did": ("str", True), "pubkey": ("pubkey", True),
    "run_id": ("str", True), "attempt": ("int", True), "nonce": ("hex32", True), "challenge": ("hex32", False),
    "m": ("int", True), "n": ("int", True), "k": ("int", True), "tile": ("int", True),
    "dtype": ("str", True), "backend": ("str", True), "device": ("str", True),
    "elapsed_ns": ("int", True), "started_ms": ("int", True), "root": ("hex32", True),
    "telemetry": ("object", False),
}
UNSIGNED = ("sig", "openings")


def header_of(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The signed part: every field except `sig` and `openings`."""
    return {name: value for name, value in obj.items() if name not in UNSIGNED}


def digest_of(header: Mapping[str, Any]) -> bytes:
    """digest = H(T("body") || canonical(header)) (§6)."""
    return hashlib.sha256(tag("body") + canonical_bytes(header_of(header))).digest()


def nonce_from_challenge(challenge: bytes, pubkey: bytes, attempt: int) -> bytes:
    """nonce = H(T("nonce") || challenge || pubkey || u64le(attempt)) (§3)."""
    return hashlib.sha256(tag("nonce") + challenge + pubkey + struct.pack("<Q", attempt)).digest()


def attempt_seed(pubkey: bytes, did: str, nonce: bytes) -> bytes:
    """seed = H(T("seed") || pubkey || u8(len(did)) || did || nonce) (§3)."""
    raw = did.encode("ascii")
    if len(pubkey) != 33 or not 1 <= len(raw) <= DID_MAX or len(nonce) != 32:
        raise ValueError("seed needs a 33-byte pubkey, a did of 1..128 bytes and a 32-byte nonce")
    return hashlib.sha256(tag("seed") + pubkey + bytes([len(raw)]) + raw + nonce).digest()


def seed_of(header: Mapping[str, Any]) -> bytes:
    """The attempt seed of a checked header: attempt_seed of its pubkey, did and nonce."""
    return attempt_seed(bytes.fromhex(header["pubkey"]), header["did"], bytes.fromhex(header["nonce"]))


def ops_of(header: Mapping[str, Any]) -> int:
    """ops = 2*m*n*k, computed, never read from the worker (§6)."""
    return 2 * int(header["m"]) * int(header["n"]) * int(header["k"])


def tiles_per_row(n: int, tile: int) -> int:
    return -(-n // tile)


def leaf_count(header: Mapping[str, Any]) -> int:
    return int(header["m"]) * tiles_per_row(int(header["n"]), int(header["tile"]))


def leaf_columns(leaf: int, n: int, tile: int) -> tuple[int, int, int]:
    """(row, first column, end column) of leaf `leaf` (§5)."""
    row, t = divmod(leaf, tiles_per_row(n, tile))
    return row, t * tile, min(n, (t + 1) * tile)


def cost_of(header: Mapping[str, Any], s: int) -> int:
    """cost = s * (tile + 1) * k, from the header and s alone (§8 step 7)."""
    return s * (int(header["tile"]) + 1) * int(header["k"])


def check_cost(header: Mapping[str, Any], s: int, cap: int = COST_CAP) -> int:
    cost = cost_of(header, s)
    if cost > cap:
        raise ReceiptInvalid("cost_over_cap", f"verification cost {cost} = s*(tile+1)*k is over the cap {cap}")
    return cost


def max_tile_for(k: int, s: int, cap: int = COST_CAP) -> int:
    """The widest tile whose receipts stay under `cap` with `s` openings (0: none does)."""
    return max(0, min(TILE_MAX, cap // (s * k) - 1))


def check_header(obj: Any, *, extra: tuple[str, ...] = ("sig",)) -> dict[str, Any]:
    """§6 and §8 steps 1–3: exactly the header fields plus `extra`, each of its type, pattern
    and range; returns the header (without `extra`). Raises ReceiptInvalid."""
    if not isinstance(obj, dict):
        raise ReceiptInvalid("not_an_object", "a commitment is a JSON object")
    allowed = set(HEADER_FIELDS) | set(extra)
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise ReceiptInvalid("unknown_field", f"unknown field {unknown[0]!r}")
    for name in [*HEADER_FIELDS, *extra]:
        required = HEADER_FIELDS[name][1] if name in HEADER_FIELDS else True
        if required and name not in obj:
            raise ReceiptInvalid("missing_field", f"missing field {name!r}")
    for name, (kind, _required) in HEADER_FIELDS.items():
        if name in obj:
            _check_kind(name, kind, obj[name])
    h = obj
    if h["schema"] != SCHEMA:
        raise ReceiptInvalid("bad_schema", f"schema must be {SCHEMA!r}")
    if h["mode"] not in MODES:
        raise ReceiptInvalid("bad_mode", f"mode must be one of {', '.join(MODES)}")
    if not _DID.fullmatch(h["did"]):
        raise ReceiptInvalid("bad_did", "did must be 1..128 printable ASCII characters without spaces")
    if not _RUN_ID.fullmatch(h["run_id"]):
        raise ReceiptInvalid("bad_run_id", "run_id must be 1..64 of [A-Za-z0-9._-]")
    for name, pattern, rule in (("dtype", _DTYPE, "1..16 of [a-z0-9_]"), ("backend", _BACKEND, "1..32 of [a-z0-9_.-]"),
                                ("device", _DEVICE, "1..64 printable characters, no space at either end")):
        if not pattern.fullmatch(h[name]):
            raise ReceiptInvalid("bad_string", f"{name} must be {rule}")
    if "telemetry" in h:
        readings = h["telemetry"]
        if len(readings) > TELEMETRY_MAX or not all(
                isinstance(key, str) and _TELEMETRY_KEY.fullmatch(key) and is_int(value) for key, value in readings.items()):
            raise ReceiptInvalid("bad_telemetry", f"telemetry maps up to {TELEMETRY_MAX} [a-z0-9_]{{1,32}} keys to integers")
    if not (1 <= h["m"] <= MN_MAX and 1 <= h["n"] <= MN_MAX and K_MIN <= h["k"] <= K_MAX):
        raise ReceiptInvalid("bad_shape", f"need 1 <= m, n <= {MN_MAX} and {K_MIN} <= k <= {K_MAX}")
    if not 1 <= h["tile"] <= min(h["n"], TILE_MAX):
        raise ReceiptInvalid("bad_tile", f"tile must be in 1..min(n, {TILE_MAX})")
    if h["elapsed_ns"] < 1:
        raise ReceiptInvalid("bad_elapsed", "elapsed_ns must be at least 1")
    if h["mode"] == CHALLENGE and "challenge" not in h:
        raise ReceiptInvalid("challenge_required", "a challenge-mode commitment names its run challenge")
    if "challenge" in h:
        expected = nonce_from_challenge(bytes.fromhex(h["challenge"]), bytes.fromhex(h["pubkey"]), h["attempt"])
        if expected.hex() != h["nonce"]:
            raise ReceiptInvalid("challenge_mismatch", "nonce does not follow from the challenge, pubkey and attempt")
    if "sig" in extra and (not isinstance(obj["sig"], str) or not SIG.fullmatch(obj["sig"])):
        raise ReceiptInvalid("bad_hex", "sig must be exactly 130 characters of [0-9a-f]")
    return header_of(obj)


def _check_kind(name: str, kind: str, value: Any) -> None:
    if kind == "int":
        if not is_int(value):
            raise ReceiptInvalid("bad_type", f"{name} must be an integer in [0, 2^53)")
    elif kind == "object":
        if not isinstance(value, dict):
            raise ReceiptInvalid("bad_type", f"{name} must be an object")
    else:
        if not isinstance(value, str):
            raise ReceiptInvalid("bad_type", f"{name} must be a string")
        if not is_printable(value):
            raise ReceiptInvalid("bad_string", f"{name} has a character outside printable ASCII")
        if kind == "hex32":
            hex32(value, name)
        elif kind == "pubkey" and not PUBKEY.fullmatch(value):
            raise ReceiptInvalid("bad_hex", f"{name} must be exactly 0[23] and 64 characters of [0-9a-f]")


def build_header(*, mode: str, did: str, pubkey: bytes, run_id: str, attempt: int, nonce: bytes,
                 challenge: bytes | None, m: int, n: int, k: int, tile: int, dtype: str, backend: str,
                 device: str, elapsed_ns: int, started_ms: int, root: bytes,
                 telemetry: Mapping[str, int] | None = None) -> dict[str, Any]:
    """The signed header of a commitment, from values already computed (not checked here)."""
    header: dict[str, Any] = {
        "schema": SCHEMA, "mode": mode, "did": did, "pubkey": pubkey.hex(), "run_id": run_id,
        "attempt": attempt, "nonce": nonce.hex(), "m": m, "n": n, "k": k, "tile": tile,
        "dtype": dtype, "backend": backend, "device": device, "elapsed_ns": max(1, int(elapsed_ns)),
        "started_ms": started_ms, "root": root.hex(),
    }
    if challenge is not None:
        header["challenge"] = challenge.hex()
    if telemetry:
        header["telemetry"] = {name: int(value) for name, value in list(telemetry.items())[:TELEMETRY_MAX]}
    return header
