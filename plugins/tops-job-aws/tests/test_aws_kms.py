"""The KMS signer against a moto server: spec §7 signatures, key checks, failures, retries."""

from __future__ import annotations

import inspect
import os

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_der_public_key

from tops_job.errors import ConfigError, SignatureError
from tops_job.spec.signing import HALF_ORDER, is_low_s, recover_public_key
from tops_job_aws.kms import KmsSigner


def test_moto_still_ignores_digest():
    """Canary for the MOTO GAP PATCH in conftest.py: when moto learns MessageType=DIGEST,
    this fails and the patch should go."""
    from moto.kms import utils
    from moto.kms.models import KmsBackend

    assert "message_type" not in inspect.signature(KmsBackend.sign).parameters
    key = utils.ECDSAPrivateKey("ECC_SECG_P256K1")
    digest = os.urandom(32)
    der = key.sign(digest, "ECDSA_SHA_256")  # outside a DIGEST request: moto's own behaviour
    with pytest.raises(InvalidSignature):
        key.private_key.public_key().verify(der, digest, ec.ECDSA(Prehashed(hashes.SHA256())))


def test_signatures_are_spec_form_low_s_and_recover_the_kms_key(kms, kms_key):
    signer = KmsSigner.from_environment(kms_key)
    spki = kms.get_public_key(KeyId=kms_key)["PublicKey"]
    expected = load_der_public_key(spki).public_bytes(Encoding.X962, PublicFormat.CompressedPoint)
    assert signer.public_key == expected and len(expected) == 33

    raw_s: list[int] = []
    signer._kms.meta.events.register(
        "after-call.kms.Sign", lambda parsed, **_: raw_s.append(decode_dss_signature(parsed["Signature"])[1]))
    verifier = load_der_public_key(spki)
    for _ in range(16):
        digest = os.urandom(32)
        sig = signer.sign_digest(digest)
        assert len(sig) == 65 and sig[64] in (0, 1)
        assert is_low_s(sig)
        assert recover_public_key(digest, sig) == expected
        # KMS signed the digest itself (no second hash): an independent ECDSA check.
        r, s = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:64], "big")
        from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

        verifier.verify(encode_dss_signature(r, s), digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    assert len(raw_s) == 16
    assert any(s > HALF_ORDER for s in raw_s), "KMS gave no high-S signature in 16: normalisation untested"


def test_client_uses_standard_retry_mode_and_retries_throttling(kms_key):
    from botocore.awsrequest import AWSResponse

    signer = KmsSigner.from_environment(kms_key)
    assert signer._kms.meta.config.retries["mode"] == "standard"
    signer.public_key
    calls = {"n": 0}

    class Raw:
        def stream(self, **_):
            yield b'{"__type":"ThrottlingException","message":"Rate exceeded"}'

    def throttle_twice(request, **_):
        calls["n"] += 1
        if calls["n"] <= 2:
            return AWSResponse(request.url, 400, {"Content-Type": "application/x-amz-json-1.1"}, Raw())
        return None  # send for real

    signer._kms.meta.events.register("before-send.kms.Sign", throttle_twice)
    digest = os.urandom(32)
    assert recover_public_key(digest, signer.sign_digest(digest)) == signer.public_key
    assert calls["n"] == 3


@pytest.mark.parametrize("value", ["many", "0"])
def test_bad_aws_max_attempts_is_a_config_error_naming_it(kms_key, monkeypatch, value):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", value)
    with pytest.raises(ConfigError, match="AWS_MAX_ATTEMPTS"):
        KmsSigner.from_environment(kms_key)


def test_kms_failure_is_a_signature_error(kms_key):
    from botocore.awsrequest import AWSResponse

    with pytest.raises(SignatureError, match="GetPublicKey .* failed: NotFoundException"):
        KmsSigner.from_environment(kms_key.replace(kms_key[-12:], "000000000000")).public_key

    # A key disabled after start-up: AWS answers Sign with KMSInvalidStateException. moto
    # does not enforce key state, so that answer is injected at the HTTP layer.
    signer = KmsSigner.from_environment(kms_key)
    signer.public_key

    class Raw:
        def stream(self, **_):
            yield b'{"__type":"KMSInvalidStateException","message":"key is disabled"}'

    signer._kms.meta.events.register(
        "before-send.kms.Sign",
        lambda request, **_: AWSResponse(request.url, 400, {"Content-Type": "application/x-amz-json-1.1"}, Raw()))
    with pytest.raises(SignatureError, match="KMS Sign .* failed: KMSInvalidStateException: key is disabled"):
        signer.sign_digest(os.urandom(32))


def test_unreachable_kms_is_a_signature_error(kms_key, monkeypatch):
    import socket

    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(SignatureError, match="GetPublicKey"):
        KmsSigner.from_environment(kms_key).public_key


def test_a_key_of_another_curve_is_refused(kms):
    key = kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["Arn"]
    with pytest.raises(ConfigError, match="TOPS_JOB_KMS_KEY_ID.*ECC_NIST_P256.*ECC_SECG_P256K1"):
        KmsSigner.from_environment(key).public_key


def test_region_comes_from_the_key_arn_when_unset(kms_key, monkeypatch):
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    signer = KmsSigner.from_environment(kms_key)
    assert signer._kms.meta.region_name == kms_key.split(":")[3]
    with pytest.raises(ConfigError, match="AWS_REGION"):
        KmsSigner.from_environment("alias/no-region")


def test_a_key_arn_is_used_in_its_own_region(aws_env, monkeypatch):
    """KMS keys are regional: a key ARN from another region than AWS_REGION must be
    called in the ARN's region, or KMS answers NotFound."""
    import boto3

    other = boto3.client("kms", region_name="eu-west-1", endpoint_url=aws_env["AWS_ENDPOINT_URL"])
    arn = other.create_key(KeySpec="ECC_SECG_P256K1", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["Arn"]
    assert arn.split(":")[3] == "eu-west-1" and os.environ["AWS_REGION"] == "us-east-1"
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    signer = KmsSigner.from_environment(arn)
    digest = os.urandom(32)
    assert recover_public_key(digest, signer.sign_digest(digest)) == signer.public_key
    assert signer._kms.meta.region_name == "eu-west-1"


def test_signer_hook_answers_only_when_configured(kms_key, monkeypatch):
    from tops_job.config import load_config
    from tops_job.job.build import build_identity
    from tops_job.plugins.manager import get_plugin_manager

    pm = get_plugin_manager({"TOPS_JOB_LOAD_PLUGINS": "aws"})
    assert "aws" in pm.load_report.loaded
    config = load_config({}, need_key=False)
    assert build_identity(config, pm).signer.name == "local-key"
    monkeypatch.setenv("TOPS_JOB_KMS_KEY_ID", kms_key)
    config = load_config({}, need_key=False)
    identity = build_identity(config, pm, signer_name="kms")
    assert identity.signer.name == "kms"
    assert config.key_if_resolved() is None  # no local key was read or generated
