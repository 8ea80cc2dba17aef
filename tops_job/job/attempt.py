"""One attempt: nonce → inputs → product → commitment → openings → receipt → signature."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace

from tops_job.compute.base import Backend, Shape
from tops_job.errors import LIBRARY_ERRORS, ErrorClass, SignatureError, error_class_of
from tops_job.spec.canonical import digest_of
from tops_job.spec.commitment import make_openings
from tops_job.spec.inputs import attempt_seed, matrix_key, nonce_from_challenge
from tops_job.spec.receipt import build_body
from tops_job.spec.signing import Signer

tracer = trace.get_tracer("tops_job.attempt")
STAGES = ("inputs", "product", "commitment", "signing")


@dataclass(frozen=True)
class Identity:
    """Who signs: the DID the receipts speak for and the signer holding its key."""

    did: str
    signer: Signer


@dataclass
class AttemptResult:
    receipt: dict[str, Any]
    digest: bytes
    elapsed_ns: int  # product alone, as measured on the device
    wall_ns: int  # the whole attempt
    stages_ns: dict[str, int] = field(default_factory=dict)

    @property
    def ops(self) -> int:
        return self.receipt["ops"]


def run_attempt(backend: Backend, shape: Shape, identity: Identity, *, run_id: str, attempt: int,
                tile: int, opens: int, challenge: bytes | None = None) -> AttemptResult:
    """Compute and sign one receipt. Raises DeviceError or SignatureError (classified)."""
    wall_start = time.perf_counter_ns()
    started_ms = time.time_ns() // 1_000_000
    nonce = nonce_from_challenge(challenge, attempt) if challenge else os.urandom(32)
    stages: dict[str, int] = {}
    with tracer.start_as_current_span("attempt", attributes={"tops_job.attempt": attempt}) as span, \
            _error_class_on(span):
        elapsed_ns, mark = compute_product(backend, shape, attempt_seed(identity.did, nonce), stages)
        with tracer.start_as_current_span("commitment"):
            commitment = backend.commit(tile)
            openings = make_openings(commitment, nonce, opens)
        mark = _lap(stages, "commitment", mark)
        with tracer.start_as_current_span("signing"):
            body = build_body(
                did=identity.did, pubkey=identity.signer.public_key, run_id=run_id, attempt=attempt,
                nonce=nonce, challenge=challenge, m=shape.m, n=shape.n, k=shape.k, tile=tile,
                opens=opens, dtype=backend.dtype, backend=backend.name, device=backend.device_model,
                elapsed_ns=elapsed_ns, started_ms=started_ms, root=commitment.root,
                telemetry=backend.telemetry(),
            )
            digest = digest_of(body)
            sig = sign(identity, digest)
        _lap(stages, "signing", mark)
        span.set_attribute("tops_job.digest", digest.hex())
        span.set_attribute("tops_job.elapsed_ns", elapsed_ns)
    receipt = dict(body, openings=openings, sig=sig.hex())
    return AttemptResult(receipt=receipt, digest=digest, elapsed_ns=elapsed_ns,
                         wall_ns=time.perf_counter_ns() - wall_start, stages_ns=stages)


def sign(identity: Identity, digest: bytes) -> bytes:
    """The signer's 65-byte signature of `digest`; any failure of a plugin signer is a
    SignatureError (classified, counted), never an internal error."""
    try:
        sig = identity.signer.sign_digest(digest)
    except SignatureError:
        raise
    except Exception as exc:  # a plugin signer's own failure is still a signature error
        raise SignatureError(f"signer {getattr(identity.signer, 'name', '?')} failed: {exc}") from exc
    if len(sig) != 65:
        raise SignatureError(f"signer returned {len(sig)} bytes, expected 65")
    return sig


@contextmanager
def _error_class_on(span: trace.Span) -> Iterator[None]:
    """A failed attempt's span says which class of error ended it (`error.type`)."""
    try:
        yield
    except LIBRARY_ERRORS as exc:
        span.set_attribute("error.type", error_class_of(exc).value)
        raise
    except Exception:
        span.set_attribute("error.type", ErrorClass.INTERNAL.value)
        raise


def compute_product(backend: Backend, shape: Shape, seed: bytes, stages: dict[str, int]) -> tuple[int, int]:
    """An attempt's first two stages (v1 and v2 alike), each a span timed into `stages`:
    "inputs" (A and B generated from the attempt's seed on the device) and "product".
    Returns the product's elapsed ns and when the product stage ended (perf_counter_ns),
    for the next lap."""
    mark = time.perf_counter_ns()
    with tracer.start_as_current_span("inputs"):
        backend.prepare(shape)
        backend.generate_inputs(matrix_key(seed, "A"), matrix_key(seed, "B"))
    mark = _lap(stages, "inputs", mark)
    with tracer.start_as_current_span("product"):
        elapsed_ns = backend.multiply()
    return elapsed_ns, _lap(stages, "product", mark)


def _lap(stages: dict[str, int], name: str, since: int) -> int:
    now = time.perf_counter_ns()
    stages[name] = now - since
    return now
