"""Receipts made by this worker: canonical bytes, signatures, and end-to-end verification."""

from __future__ import annotations

import base64
import json
import string

import coincurve
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support import TEST_KEY
from tops_job.compute.base import Shape
from tops_job.compute.numpy_backend import NumpyBackend
from tops_job.errors import ReceiptInvalid, SignatureError
from tops_job.job.attempt import Identity, run_attempt
from tops_job.spec.canonical import canonical_bytes, digest_of
from tops_job.spec.receipt import check_fields, parse_json
from tops_job.spec.signing import CURVE_ORDER, HALF_ORDER, LocalKeySigner, is_low_s, recover_public_key, recoverable_from_rs
from tops_job.spec.verify import verify_receipt

printable = st.text(alphabet=string.printable[:-5] + " ", max_size=20)
body_values = st.one_of(st.integers(0, 2**53 - 1), printable)


def _spec_canonical(value) -> str:
    """Spec §7 written out independently: sorted keys, no whitespace, strings with only
    '"' and '\\' escaped, integers in plain decimal."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{_spec_canonical(k)}:{_spec_canonical(v)}" for k, v in sorted(value.items())) + "}"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(printable, st.one_of(body_values, st.dictionaries(printable, st.integers(0, 2**53 - 1), max_size=3)),
                       max_size=12))
def test_canonical_bytes_follow_spec_and_round_trip(body):
    data = canonical_bytes(body)
    assert data == _spec_canonical(body).encode("ascii")
    assert json.loads(data) == body
    assert canonical_bytes(dict(reversed(list(body.items())))) == data


def test_signer_matches_spec_key():
    signer = LocalKeySigner(bytes.fromhex(TEST_KEY["secret_key_hex"]))
    assert signer.public_key.hex() == TEST_KEY["pubkey_hex"]
    digest = bytes(range(32))
    sig = signer.sign_digest(digest)
    assert len(sig) == 65 and sig[64] in (0, 1) and is_low_s(sig)
    assert recover_public_key(digest, sig) == signer.public_key
    assert sig == signer.sign_digest(digest), "RFC 6979 signatures are deterministic"


def test_recoverable_from_rs_normalises_high_s_and_finds_v():
    key = coincurve.PrivateKey(bytes.fromhex(TEST_KEY["secret_key_hex"]))
    digest = b"\x07" * 32
    sig = key.sign_recoverable(digest, hasher=None)
    r, s = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:64], "big")
    high = CURVE_ORDER - s
    assert high > HALF_ORDER
    assert recoverable_from_rs(r, high, digest, key.public_key.format()) == sig
    with pytest.raises(SignatureError):
        recoverable_from_rs(r, s, b"\x08" * 32, key.public_key.format())


def _attempt(shape: Shape, *, tile: int = 4, opens: int = 16, did: str = "did:peaq:test"):
    backend = NumpyBackend("float32")
    identity = Identity(did=did, signer=LocalKeySigner(bytes.fromhex(TEST_KEY["secret_key_hex"])))
    try:
        return run_attempt(backend, shape, identity, run_id="run-1", attempt=3, tile=tile, opens=opens)
    finally:
        backend.close()


@pytest.mark.parametrize("shape,tile", [(Shape(1, 1, 1), 1), (Shape(5, 7, 3), 3), (Shape(64, 48, 96), 16),
                                        (Shape(33, 100, 260), 100)])
def test_worker_receipts_verify_fully(shape, tile):
    result = _attempt(shape, tile=tile)
    verified = verify_receipt(result.receipt, full=True)
    assert verified.digest == result.digest == digest_of(result.receipt)
    r = result.receipt
    assert (r["m"], r["n"], r["k"], r["tile"], r["ops"]) == (shape.m, shape.n, shape.k, tile, shape.ops)
    assert r["backend"] == "numpy" and r["dtype"] == "float32" and r["elapsed_ns"] >= 1
    check_fields(parse_json(json.dumps(r)))


def test_any_tampering_is_rejected():
    receipt = _attempt(Shape(16, 16, 16)).receipt
    for field, value in [("elapsed_ns", receipt["elapsed_ns"] + 1), ("did", "did:peaq:other"),
                         ("attempt", 4), ("root", "00" * 32)]:
        with pytest.raises(ReceiptInvalid):
            verify_receipt(dict(receipt, **{field: value}))


def test_strict_json_rejects_duplicates_and_constants():
    for text in ['{"a":1,"a":2}', '{"a":NaN}', '[' * 100000, "{"]:
        with pytest.raises(ReceiptInvalid) as info:
            parse_json(text)
        assert info.value.code == "malformed_json"


def test_non_canonical_base64_is_rejected():
    """b64decode ignores the unused bits before '='; the verifier must not."""
    receipt = _attempt(Shape(4, 5, 5), tile=5).receipt  # 20-byte leaves: 27 characters and one '='
    opening = receipt["openings"][0]
    text = opening["values"]
    assert text.endswith("=") and not text.endswith("==")
    last = text[-2]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    twin = alphabet[alphabet.index(last) ^ 1]  # flips an unused low bit only
    assert base64.b64decode(text[:-2] + twin + "=") == base64.b64decode(text)
    tampered = json.loads(json.dumps(receipt))
    for entry in tampered["openings"]:
        if entry["leaf"] == opening["leaf"]:
            entry["values"] = text[:-2] + twin + "="
    with pytest.raises(ReceiptInvalid) as info:
        verify_receipt(tampered, full=True)
    assert info.value.code == "bad_values"


def test_failed_attempt_span_names_the_error_class():
    """Spans record errors with their class (GPU, Network, Signature, Validation, …)."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    import tops_job.job.attempt as attempt_module

    class BrokenSigner:
        name = "broken"
        public_key = bytes.fromhex(TEST_KEY["pubkey_hex"])

        def sign_digest(self, digest):
            raise RuntimeError("HSM unplugged")

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    original = attempt_module.tracer
    attempt_module.tracer = provider.get_tracer("test")
    backend = NumpyBackend("float32")
    try:
        with pytest.raises(SignatureError):
            run_attempt(backend, Shape(4, 4, 4), Identity("did:x", BrokenSigner()), run_id="r", attempt=0,
                        tile=4, opens=16)
    finally:
        attempt_module.tracer = original
        backend.close()
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "attempt"]
    assert span.attributes["error.type"] == "signature" and not span.status.is_ok
