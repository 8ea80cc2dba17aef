"""secp256k1 signatures in the spec §7 form: r || s || v over the digest itself, low-S."""

from __future__ import annotations

from typing import Protocol

import coincurve

from .errors import SignatureError

# Order of the secp256k1 group.
CURVE_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
HALF_ORDER = CURVE_ORDER // 2


class Signer(Protocol):
    """Signs receipt digests. Plugins return one from the `tops_job_signer` hook."""

    name: str

    @property
    def public_key(self) -> bytes:
        """The 33-byte compressed public key."""

    def sign_digest(self, digest: bytes) -> bytes:
        """65 bytes r || s || v: low-S, v the recovery id, over `digest` without hashing again."""


class LocalKeySigner:
    """Signs with a secret key held in this process (RFC 6979 nonces via libsecp256k1)."""

    name = "local-key"

    def __init__(self, secret: bytes):
        try:
            self._key = coincurve.PrivateKey(secret)
        except Exception as exc:  # coincurve raises ValueError/TypeError for bad scalars
            raise SignatureError(f"secret key is not a valid secp256k1 scalar: {exc}") from None
        self._public = self._key.public_key.format(compressed=True)

    @property
    def public_key(self) -> bytes:
        return self._public

    def sign_digest(self, digest: bytes) -> bytes:
        # libsecp256k1 returns r || s || recid with s already low-S.
        return self._key.sign_recoverable(digest, hasher=None)


def is_low_s(sig: bytes) -> bool:
    return 0 < int.from_bytes(sig[32:64], "big") <= HALF_ORDER


def recover_public_key(digest: bytes, sig: bytes) -> bytes | None:
    """The compressed key that produced `sig` over `digest`, or None if it recovers nothing."""
    if len(sig) != 65 or sig[64] not in (0, 1):
        return None
    try:
        key = coincurve.PublicKey.from_signature_and_message(sig, digest, hasher=None)
    except Exception:
        return None
    return key.format(compressed=True)


def recoverable_from_rs(r: int, s: int, digest: bytes, public_key: bytes) -> bytes:
    """Spec §7 form from a plain (r, s) signature, as a DER signer (AWS KMS) returns it:
    normalise s to low-S, then find v by recovering the key with each id."""
    if not (0 < r < CURVE_ORDER and 0 < s < CURVE_ORDER):
        raise SignatureError("signature scalars out of range")
    if s > HALF_ORDER:
        s = CURVE_ORDER - s
    rs = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    for v in (0, 1):
        candidate = rs + bytes([v])
        if recover_public_key(digest, candidate) == public_key:
            return candidate
    raise SignatureError("signature does not recover to the signer's public key")
