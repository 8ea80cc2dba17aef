"""One tops-receipt/2 attempt (docs/spec/receipt-v2.md): nonce → inputs bound to the signer's
key → product → commitment → signed header. In the challenge mode it keeps the leaf hashes
(the tile values are recomputed when the challenge comes back); in the fiat-shamir mode it
opens the 256 chain-derived leaves at once."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace

from tops_job.compute.base import Backend, Shape
from tops_job.delivery.kept_trees import KeptTree
from tops_job.errors import ConfigError, ErrorClass, ExitCode, TopsJobError
from tops_job.job.attempt import Identity, _error_class_on, _lap, compute_product, sign
from tops_job.spec.v2 import (
    CHALLENGE,
    FIAT_SHAMIR,
    K_MIN,
    MN_MAX,
    S_DEFAULT,
    S_FS,
    TILE_MAX,
    attempt_seed,
    build_header,
    digest_of,
    fs_leaves,
    make_openings,
    max_tile_for,
    nonce_from_challenge,
)

tracer = trace.get_tracer("tops_job.attempt")
log = logging.getLogger("tops_job.run")

V2_DEFAULT_TILE = 64  # leaf width: cheap to hash, cheap to open (s*(tile+1)*k) for worker and verifier
RUN_CHALLENGE_MARGIN_MS = 300_000  # ask for a fresh run challenge this long before the current one expires


@dataclass
class CommitResult:
    receipt: dict[str, Any]  # the signed commitment (challenge) or the whole receipt (fiat-shamir)
    digest: bytes
    elapsed_ns: int
    wall_ns: int
    leaf_hashes: bytes | None = None  # 32 bytes a leaf, kept to open later (challenge mode, host tree)
    kept: KeptTree | None = None  # challenge mode on a GPU: the tree left on the device instead
    stages_ns: dict[str, int] = field(default_factory=dict)

    @property
    def ops(self) -> int:
        r = self.receipt
        return 2 * r["m"] * r["n"] * r["k"]


def v2_tile(requested: int, k: int, n: int, mode: str) -> int:
    """The widest tile ≤ requested that the spec allows and keeps verification under the cap."""
    s = S_FS if mode == FIAT_SHAMIR else S_DEFAULT
    return max(1, min(requested, n, TILE_MAX, max_tile_for(k, s)))


def leaf_hashes_of(commitment: Any) -> bytes:
    """Every leaf hash, 32 bytes each, in leaf order, from a host or device commitment."""
    if hasattr(commitment, "leaf_hash_bytes"):  # on a device: copied back once
        return bytes(commitment.leaf_hash_bytes())
    return b"".join(commitment.tree.levels[0])


def run_commit_attempt(backend: Backend, shape: Shape, identity: Identity, *, run_id: str, attempt: int, tile: int,
                       mode: str, challenge: bytes | None) -> CommitResult:
    wall_start = time.perf_counter_ns()
    started_ms = time.time_ns() // 1_000_000
    pubkey = identity.signer.public_key
    if mode == CHALLENGE and challenge is None:
        raise ValueError("the challenge mode needs a run challenge")
    nonce = nonce_from_challenge(challenge, pubkey, attempt) if challenge else os.urandom(32)
    stages: dict[str, int] = {}
    with tracer.start_as_current_span("attempt", attributes={"tops_job.attempt": attempt}) as span, \
            _error_class_on(span):
        elapsed_ns, mark = compute_product(backend, shape, attempt_seed(pubkey, identity.did, nonce), stages)
        keep = mode == CHALLENGE and getattr(backend, "keeps_trees", False)
        with tracer.start_as_current_span("commitment"):
            commitment = backend.commit(tile, keep=True) if keep else backend.commit(tile)  # type: ignore[call-arg]
            header = build_header(mode=mode, did=identity.did, pubkey=pubkey, run_id=run_id, attempt=attempt,
                                  nonce=nonce, challenge=challenge, m=shape.m, n=shape.n, k=shape.k, tile=tile,
                                  dtype=backend.dtype, backend=backend.name, device=backend.device_model,
                                  elapsed_ns=elapsed_ns, started_ms=started_ms, root=commitment.root,
                                  telemetry=backend.telemetry())
            digest = digest_of(header)
            openings = make_openings(commitment, fs_leaves(digest, commitment.leaf_count)) if mode == FIAT_SHAMIR else None
            kept = KeptTree(header, commitment, getattr(backend, "read_stream", None)) if keep else None
            hashes = leaf_hashes_of(commitment) if mode == CHALLENGE and not keep else None
        mark = _lap(stages, "commitment", mark)
        with tracer.start_as_current_span("signing"):
            sig = sign(identity, digest)
        _lap(stages, "signing", mark)
        span.set_attribute("tops_job.digest", digest.hex())
    receipt = dict(header, sig=sig.hex())
    if openings is not None:
        receipt["openings"] = openings
    return CommitResult(receipt=receipt, digest=digest, elapsed_ns=elapsed_ns,
                        wall_ns=time.perf_counter_ns() - wall_start, leaf_hashes=hashes, kept=kept,
                        stages_ns=stages)


class RunChallengeUnavailable(TopsJobError):
    """No run challenge could be had from the aggregator: nothing was computed, nothing is
    lost; run again later (exit 3, like receipts left pending)."""

    error_class = ErrorClass.NETWORK
    exit_code = ExitCode.PENDING


def _sleep(seconds: float) -> bool:
    time.sleep(seconds)
    return False


RunChallengeSource = Callable[[], "tuple[bytes, int] | None"]  # (challenge, expires_ms) or None


class V2Attempts:
    """The run's tops-receipt/2 attempts: the mode (challenge with an aggregator, fiat-shamir
    for the local ledger), the tile, and the run challenge, renewed before it expires. With
    no run challenge to be had, attempts wait for one (stop-aware): a challenge-mode
    commitment cannot exist without it."""

    def __init__(self, mode: str, run_challenge: RunChallengeSource | None = None, *,
                 wait: Callable[[float], bool] | None = None, give_up_s: float = 30.0):
        if mode == CHALLENGE and run_challenge is None:
            raise ValueError("the challenge mode needs a run challenge source")
        self.mode = mode
        self.run_challenge = run_challenge
        self.wait = wait or _sleep  # returns True when a stop was requested
        self.give_up_s = give_up_s  # without any run challenge for this long, the run ends
        self._current: tuple[bytes, int] | None = None

    def fit(self, shape: Shape) -> Shape:
        """The shape a v2 commitment may have: k raised to K_MIN (below it C has repeated rows
        and costs less than it claims, receipt-v2.md §13); m, n beyond MN_MAX are a config error."""
        if max(shape.m, shape.n) > MN_MAX:
            raise ConfigError("TOPS_JOB_SIZE", f"m and n are at most {MN_MAX} in tops-receipt/2")
        if shape.k < K_MIN:
            log.warning("[run] k=%d is below tops-receipt/2's minimum: using k=%d", shape.k, K_MIN)
            return Shape(shape.m, shape.n, K_MIN)
        return shape

    def tile(self, shape: Shape, requested: int | None) -> int:
        return v2_tile(requested or V2_DEFAULT_TILE, shape.k, shape.n, self.mode)

    def challenge(self) -> bytes | None:
        """The run challenge to use now (None in the fiat-shamir mode, or when stopped)."""
        if self.mode != CHALLENGE or self.run_challenge is None:
            return None
        delay, began = 0.5, time.monotonic()
        while self._current is None or self._current[1] - time.time() * 1000 < RUN_CHALLENGE_MARGIN_MS:
            fresh = self.run_challenge()
            if fresh is not None:
                self._current = fresh
                break
            if self._current is not None and self._current[1] > time.time() * 1000 + 1000:
                break  # keep using the current one while it lasts
            if time.monotonic() - began >= self.give_up_s:
                raise RunChallengeUnavailable(f"no run challenge from the aggregator in {self.give_up_s:g} s: "
                                              "tops-receipt/2 commitments need one (nothing computed, nothing lost)")
            log.warning("[challenge] no run challenge from the aggregator; retrying in %.1f s", delay)
            if self.wait(delay):
                return None
            delay = min(delay * 2, 10.0)
        return self._current[0]

    def attempt(self, backend: Backend, shape: Shape, identity: Identity, *, run_id: str, attempt: int,
                tile: int) -> CommitResult | None:
        challenge = self.challenge()
        if self.mode == CHALLENGE and challenge is None:
            return None  # stopped while waiting for a run challenge
        return run_commit_attempt(backend, shape, identity, run_id=run_id, attempt=attempt, tile=tile,
                                  mode=self.mode, challenge=challenge)
