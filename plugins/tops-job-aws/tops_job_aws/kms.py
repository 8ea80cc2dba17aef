"""Receipt signatures from an AWS KMS key (spec §7); the private key never leaves KMS.

KMS signs the 32-byte digest itself (MessageType=DIGEST, ECDSA_SHA_256: no second hash)
and answers DER. The spec wants r || s || v with low-S, so the DER pair is normalised and
the recovery id found by recovering the key's public key (tops_job.signing.recoverable_from_rs).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_der_public_key

from tops_job import ConfigError, SignatureError, recoverable_from_rs

from .settings import KMS_KEY_ID, client

log = logging.getLogger("tops_job_aws.kms")

KEY_SPEC = "ECC_SECG_P256K1"
SIGNING_ALGORITHM = "ECDSA_SHA_256"


def _error_text(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and "Error" in response:
        error = response["Error"]
        return f"{error.get('Code', '?')}: {error.get('Message', '')}".rstrip(": ")
    return f"{type(exc).__name__}: {exc}"


def compressed_public_key(spki_der: bytes) -> bytes:
    """The 33-byte compressed point from a DER SubjectPublicKeyInfo (GetPublicKey)."""
    try:
        key = load_der_public_key(spki_der)
    except ValueError as exc:
        raise SignatureError(f"KMS returned an unreadable public key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256K1):
        raise SignatureError("KMS public key is not on secp256k1")
    return key.public_bytes(Encoding.X962, PublicFormat.CompressedPoint)


class KmsSigner:
    """A tops_job.signing.Signer backed by one KMS key."""

    name = "kms"

    def __init__(self, key_id: str, kms: Any):
        self.key_id = key_id
        self._kms = kms
        self._public: bytes | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_environment(cls, key_id: str) -> KmsSigner:
        region = key_id.split(":")[3] if key_id.startswith("arn:") and key_id.count(":") >= 5 else None
        return cls(key_id, client("kms", region=region or None))  # a key is called in its own region

    @property
    def public_key(self) -> bytes:
        """Fetched once with GetPublicKey; the key's spec and usage are checked."""
        with self._lock:
            if self._public is None:
                self._public = self._fetch_public_key()
            return self._public

    def _fetch_public_key(self) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response = self._kms.get_public_key(KeyId=self.key_id)
        except (BotoCoreError, ClientError) as exc:
            raise SignatureError(f"KMS GetPublicKey for {self.key_id} failed: {_error_text(exc)}") from exc
        spec = response.get("KeySpec") or response.get("CustomerMasterKeySpec")
        if spec != KEY_SPEC:
            raise ConfigError(KMS_KEY_ID, f"KMS key {self.key_id} has key spec {spec}; tops-receipt/1 needs {KEY_SPEC}")
        if response.get("KeyUsage", "SIGN_VERIFY") != "SIGN_VERIFY":
            raise ConfigError(KMS_KEY_ID, f"KMS key {self.key_id} has usage {response.get('KeyUsage')}; needs SIGN_VERIFY")
        public = compressed_public_key(response["PublicKey"])
        log.info("[kms] signing with KMS key %s (public key %s)", response.get("KeyId", self.key_id), public.hex())
        return public

    def sign_digest(self, digest: bytes) -> bytes:
        """65 bytes r || s || v over `digest` (32 bytes), low-S. KMS failures (after the
        SDK's retries) raise SignatureError."""
        from botocore.exceptions import BotoCoreError, ClientError

        if len(digest) != 32:
            raise SignatureError(f"digest must be 32 bytes, got {len(digest)}")
        public = self.public_key
        try:
            response = self._kms.sign(KeyId=self.key_id, Message=digest, MessageType="DIGEST",
                                      SigningAlgorithm=SIGNING_ALGORITHM)
        except (BotoCoreError, ClientError) as exc:
            raise SignatureError(f"KMS Sign with {self.key_id} failed: {_error_text(exc)}") from exc
        try:
            r, s = decode_dss_signature(response["Signature"])
        except (KeyError, ValueError) as exc:
            raise SignatureError(f"KMS returned an unreadable signature: {exc}") from None
        return recoverable_from_rs(r, s, digest, public)
