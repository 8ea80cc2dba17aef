"""A moto server on 127.0.0.1 (a real HTTP endpoint speaking the KMS and S3 APIs), and an
environment that points boto3 at it and nowhere else.

MOTO GAP PATCH (test harness only, see `_patch_moto_kms_digest`): moto 5 ignores
`MessageType=DIGEST` on kms:Sign and hashes the message again, which AWS does not do.
The plugin sends DIGEST, as it must; the emulator is corrected in-process so it signs the
digest as given. test_aws_kms.py::test_moto_still_ignores_digest fails once moto fixes
this, so the patch can then be deleted.

MOTO GAP PATCH 2 (`_patch_moto_s3_atomic_conditions`): moto 5 checks `If-None-Match: *` and
`If-Match` on PutObject/DeleteObject and then stores in a separate step, without a lock, and
its server is threaded: two racing conditional writes can both succeed there, which S3 never
allows (one gets 412, or 409 ConditionalRequestConflict). The harness serialises moto's S3
object requests so the emulator has S3's documented atomicity; the outbox's exactly-once
tests depend on it.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REGION = "us-east-1"
_digest_request = threading.local()


def _patch_moto_kms_digest() -> None:
    """MOTO GAP PATCH: make kms:Sign honour MessageType=DIGEST (ECDSA over the given
    32-byte digest, no second hash), with AWS's length check. Everything else (key
    state, usage and algorithm checks) still runs through moto's own code."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
    from moto.kms import responses, utils
    from moto.kms.exceptions import ValidationException

    if getattr(responses.KmsResponse.sign, "_tops_job_digest_patch", False):
        return
    original_response_sign = responses.KmsResponse.sign
    original_key_sign = utils.ECDSAPrivateKey.sign

    def response_sign(self: Any) -> str:
        if self._get_param("MessageType") != "DIGEST":
            return original_response_sign(self)
        message = self._get_param("Message")
        if len(message) != 32 or self._get_param("SigningAlgorithm") != "ECDSA_SHA_256":
            raise ValidationException("Digest is invalid length for algorithm " + str(self._get_param("SigningAlgorithm")))
        _digest_request.active = True
        try:
            return original_response_sign(self)
        finally:
            _digest_request.active = False

    def key_sign(self: Any, message: bytes, signing_algorithm: str) -> bytes:
        if getattr(_digest_request, "active", False):
            utils.validate_signing_algorithm(signing_algorithm, self.valid_signing_algorithms)
            return self.private_key.sign(message, ec.ECDSA(Prehashed(hashes.SHA256())))
        return original_key_sign(self, message, signing_algorithm)

    response_sign._tops_job_digest_patch = True  # type: ignore[attr-defined]
    responses.KmsResponse.sign = response_sign
    utils.ECDSAPrivateKey.sign = key_sign


def _patch_moto_s3_atomic_conditions() -> None:
    """MOTO GAP PATCH 2: one S3 object request at a time in the emulator, so a conditional
    write's check and its store are one step, as on S3."""
    from moto.s3 import responses

    if getattr(responses.S3Response.key_response, "_tops_job_atomic_patch", False):
        return
    original = responses.S3Response.key_response
    lock = threading.Lock()

    def key_response(self: Any, request: Any, full_url: str, headers: Any) -> Any:
        with lock:
            return original(self, request, full_url, headers)

    key_response._tops_job_atomic_patch = True  # type: ignore[attr-defined]
    responses.S3Response.key_response = key_response


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    _patch_moto_kms_digest()
    _patch_moto_s3_atomic_conditions()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws_env(moto_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Only the moto server's endpoint and fake credentials; none of the caller's AWS or
    tops-job settings; private data, cache and config directories."""
    for name in list(os.environ):
        if name.startswith(("AWS_", "TOPS_JOB_")) or name in ("WORKER_SK_HEX", "AGGREGATOR_URL", "DEVICE_DID"):
            monkeypatch.delenv(name, raising=False)
    env = {
        "AWS_ENDPOINT_URL": moto_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": REGION,
        "AWS_CONFIG_FILE": str(tmp_path / "aws-config-none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "aws-credentials-none"),
        "NO_PROXY": "127.0.0.1,localhost",
        "TOPS_JOB_DATA_DIR": str(tmp_path / "data"),
        "TOPS_JOB_CACHE_DIR": str(tmp_path / "cache"),
        "TOPS_JOB_CONFIG_DIR": str(tmp_path / "config"),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def kms(aws_env: dict[str, str]) -> Any:
    import boto3

    return boto3.client("kms", region_name=REGION, endpoint_url=aws_env["AWS_ENDPOINT_URL"])


@pytest.fixture
def s3(aws_env: dict[str, str]) -> Any:
    import boto3

    return boto3.client("s3", region_name=REGION, endpoint_url=aws_env["AWS_ENDPOINT_URL"])


@pytest.fixture
def kms_key(kms: Any) -> str:
    """A new secp256k1 signing key in the emulator; its ARN."""
    return kms.create_key(KeySpec="ECC_SECG_P256K1", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["Arn"]


@pytest.fixture
def bucket(s3: Any, request: pytest.FixtureRequest) -> str:
    name = "tops-job-" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40].strip("-")
    s3.create_bucket(Bucket=name)
    return name
