"""The job: resolve the profile, run the attempts, deliver the receipts, summarise.

This is the library's top: the CLI builds its collaborators (backend, signer, delivery,
reporters) and calls `JobRun.run()`; nothing here prints or exits.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from opentelemetry import trace

from tops_job.compute.autotune import ProfileCache, resolve_profile
from tops_job.compute.base import Backend, Shape
from tops_job.config import Config
from tops_job.delivery.kept_trees import KeptTree
from tops_job.delivery.outcomes import Outcome
from tops_job.delivery.protocol import Delivery, DeliveryReport
from tops_job.errors import LIBRARY_ERRORS, ConfigError, DeviceError, ErrorClass, ExitCode, TopsJobError, error_class_of, exit_code_of
from tops_job.job.attempt import Identity, compute_product, run_attempt
from tops_job.job.attempt_v2 import RunChallengeUnavailable, V2Attempts
from tops_job.job.device_guard import DeviceGuard, Settled
from tops_job.job.stats import RunStats
from tops_job.job.stop import StopSignal
from tops_job.job.summary import build_summary, write_summary
from tops_job.observability.events import AttemptEvent, ReceiptEvent, Reporters, RunInfo
from tops_job.observability.logs import current_attempt
from tops_job.spec.v2 import header_of
from tops_job.spec.v2.header import seed_of

log = logging.getLogger("tops_job.run")
tracer = trace.get_tracer("tops_job.run")

MAX_CONSECUTIVE_FAILURES = 3  # then the device or signer is taken as broken and the run ends


@dataclass
class RunResult:
    exit_code: ExitCode
    summary: dict[str, Any]
    summary_path: Any  # None when it could not be written (logged)
    error: Exception | None = None


ReceiptSink = Callable[[dict[str, Any]], None]


class JobRun:
    def __init__(self, config: Config, *, backend: Backend, identity: Identity,
                 make_delivery: Callable[[Callable[[ReceiptEvent], None]], Delivery],
                 reporters: Reporters, profile_store: ProfileCache | None,
                 stop: StopSignal | None = None, receipt_sinks: list[ReceiptSink] | None = None,
                 run_finished: Callable[[dict[str, Any]], None] | None = None,
                 challenge: Callable[[], bytes | None] | None = None, guard: DeviceGuard | None = None,
                 v2: V2Attempts | None = None):
        self.config = config
        self.v2 = v2  # tops-receipt/2 attempts (job/attempt_v2.py); None: v1
        self.backend = backend
        self.identity = identity
        self.reporters = reporters
        self.profile_store = profile_store
        self.stop = stop or StopSignal()
        self.receipt_sinks = receipt_sinks or []
        self.run_finished = run_finished
        self.challenge_source = challenge  # asked once, right before the first attempt (spec §1)
        self.stats = RunStats()
        # Self-test before the first attempt, self-audit of a sample of receipts (device_guard.py).
        self.guard = guard or DeviceGuard(backend, selftest=False, audit_every=0)
        self.guard.attach(self.stats.record_failure)
        # The backend is the attempt loop's, lent between two attempts to the exchange's
        # senders when one must recompute a commitment whose tree is gone (`recommit`).
        self._backend_lock = threading.Lock()
        self._turn_gate = threading.Lock()
        self._backend_closed = False
        self.delivery = make_delivery(self._on_receipt)
        kept = getattr(self.delivery, "kept", None)
        if kept is not None:  # the challenge mode's delivery: trees kept on this backend's device
            self.delivery.recommit = self.recommit  # type: ignore[attr-defined]
            kept.limit_bytes = getattr(backend, "keep_budget_bytes", None)
        self.reporters.on_delivery(self.delivery)

    def _on_receipt(self, event: ReceiptEvent) -> None:
        self.stats.record_receipt(event.outcome)
        self.reporters.on_receipt(event)

    def run(self) -> RunResult:
        config = self.config
        info = RunInfo(run_id=config.run_id, did=self.identity.did, pubkey=self.identity.signer.public_key.hex(),
                       backend=self.backend.name, device=self.backend.device_model, dtype=self.backend.dtype,
                       attempts=config.attempts, config=config.public_dict())
        fatal: Exception | None = None
        profile_info: dict[str, Any] | None = None
        delivery_report = DeliveryReport()
        with tracer.start_as_current_span("run", attributes={"tops_job.run_id": config.run_id}) as span:
            self.reporters.on_run_start(info)
            self.delivery.start()
            # A GPU's kept trees are opened during the drain, and a lost one recomputed on
            # the backend: it closes after the drain (the CPU backend's helpers, before).
            close_after_drain = getattr(self.backend, "keeps_trees", False)
            try:
                with self._backend_lock:
                    self.guard.start()
                    shape, profile_info = self._shape()
                self.reporters.on_profile(profile_info)
                fatal = self._attempts(shape)
            except LIBRARY_ERRORS as exc:
                fatal = exc
                self.stats.record_failure(error_class_of(exc).value)
            except Exception as exc:  # a bug: still drain, summarise and exit with a code
                log.exception("[run] internal error")
                fatal = TopsJobError(f"internal error: {exc!r}")
                self.stats.record_failure(ErrorClass.INTERNAL.value)
            finally:
                current_attempt.set(None)
                fatal = self._finish_guard(fatal)
                if not close_after_drain:
                    self._close_backend()  # helper processes and threads; the receipts are all signed
                with tracer.start_as_current_span("drain"):
                    delivery_report = self.delivery.finish(config.drain_timeout)
                if close_after_drain:
                    self._close_backend()
            if delivery_report.pending:
                self.stats.receipts[Outcome.PENDING.value] = delivery_report.pending
            exit_code = self._exit_code(fatal, delivery_report)
            span.set_attribute("tops_job.exit_code", int(exit_code))
            if fatal is not None:
                span.record_exception(fatal)
                span.set_attribute("tops_job.error_class", error_class_of(fatal).value)
        summary = build_summary(
            run_id=config.run_id, config=info.config,
            identity={"did": info.did, "pubkey": info.pubkey},
            device={"backend": info.backend, "model": info.device, "dtype": info.dtype},
            profile=profile_info, stats=self.stats,
            delivery={Outcome.PENDING.value: delivery_report.pending, **dict(delivery_report.counts), **delivery_report.detail},
            exit_code=exit_code, reporter_failures=self.reporters.failures, stop_reason=self.stop.reason,
        )
        summary["device_checks"] = self.guard.section()
        if fatal is not None:
            summary["error"] = {"class": error_class_of(fatal).value, "message": str(fatal)}
        try:
            path = write_summary(summary, config.summary)
        except OSError as exc:  # the reporters (health server, textfile) must still end the run
            log.error("[summary] cannot write %s: %s", config.summary, exc)
            path = None
        self.reporters.on_run_end(summary)
        if self.run_finished:
            self.run_finished(summary)
        return RunResult(exit_code=exit_code, summary=summary, summary_path=path, error=fatal)

    def _close_backend(self) -> None:
        with self._backend_lock:
            self._backend_closed = True
            self.backend.close()

    @contextmanager
    def _backend_turn(self) -> Iterator[None]:
        """The backend for a recomputation: taken ahead of the next attempt (the gate stops
        the attempt loop from taking the lock again first)."""
        with self._turn_gate:
            self._backend_lock.acquire()
        try:
            yield
        finally:
            self._backend_lock.release()

    def recommit(self, commitment: Mapping[str, Any]) -> KeptTree | None:
        """A tops-receipt/2 challenge-mode commitment recomputed on this run's backend from
        its seed (C is a function of the seed, spec §9.2), to open it when its tree is gone:
        after a crash, or let go to bound device memory. None where this backend keeps no
        trees or computes another dtype; ValueError when the recomputed root differs."""
        backend = self.backend
        if not getattr(backend, "keeps_trees", False) or commitment.get("dtype") != backend.dtype:
            return None
        header = header_of(commitment)
        with self._backend_turn():
            if self._backend_closed:
                return None
            try:
                shape = Shape(int(header["m"]), int(header["n"]), int(header["k"]))
                compute_product(backend, shape, seed_of(header), {})
                tree = backend.commit(int(header["tile"]), keep=True)  # type: ignore[call-arg]
            except (TopsJobError, KeyError, TypeError, ValueError) as exc:  # a shape this card cannot hold, say
                log.warning("[exchange] cannot recompute the commitment of attempt %s of run %s here: %s",
                            header.get("attempt"), header.get("run_id"), exc)
                return None
        log.info("[exchange] recomputed the commitment of attempt %s of run %s on %s to open it",
                 header.get("attempt"), header.get("run_id"), backend.device_model)
        return KeptTree(header, tree, getattr(backend, "read_stream", None))

    def _shape(self) -> tuple[Shape, dict[str, Any]]:
        if self.config.size:
            m, n, k = self.config.size
            shape = self.v2.fit(Shape(m, n, k)) if self.v2 else Shape(m, n, k)
            return shape, {"m": shape.m, "n": shape.n, "k": shape.k, "source": "--size"}
        if self.profile_store is None:  # build_job allows that only with a size
            raise ConfigError("TOPS_JOB_SIZE", "no profile store to autotune with: give --size")
        with tracer.start_as_current_span("autotune"):
            profile, cached = resolve_profile(self.backend, self.config.target_ms, self.profile_store,
                                              retune=self.config.retune)
        shape = self.v2.fit(profile.shape) if self.v2 else profile.shape
        return shape, {**asdict(profile), "k": shape.k, "source": "cache" if cached else "autotune"}

    def _attempts(self, shape: Shape) -> Exception | None:
        config = self.config
        v2 = self.v2
        tile = v2.tile(shape, config.tile) if v2 else min(config.tile or self.backend.default_tile, shape.n)
        challenge = self.challenge_source() if self.challenge_source and not self.stop.stopped and not v2 else None
        consecutive = 0
        for attempt in range(config.attempts):
            current_attempt.set(attempt)  # JSON log lines carry it
            if self.stop.stopped:
                log.info("[run] stop requested (%s): no new attempts", self.stop.reason)
                return None
            if self.guard.failure is not None:
                return self.guard.pending_failure()
            try:
                with self._turn_gate:  # a recomputation asked for goes first
                    pass
                with self._backend_lock:
                    result = self._run_attempt(shape, attempt, tile, challenge)
                if result is None:  # stopped while waiting for a run challenge (v2)
                    return None
            except RunChallengeUnavailable as exc:  # every later attempt would wait the same
                self._failed(attempt, error_class_of(exc), str(exc))
                return exc
            except LIBRARY_ERRORS as exc:
                self._failed(attempt, error_class_of(exc), str(exc))
                if isinstance(exc, DeviceError):
                    return exc
                consecutive += 1
                if consecutive >= MAX_CONSECUTIVE_FAILURES:
                    return exc
                continue
            except Exception as exc:  # a bug; keep the run's receipts and report it
                log.exception("[run] attempt %d failed", attempt)
                self._failed(attempt, ErrorClass.INTERNAL, repr(exc))
                consecutive += 1
                if consecutive >= MAX_CONSECUTIVE_FAILURES:
                    return TopsJobError(f"{consecutive} attempts in a row failed; last: {exc!r}")
                continue
            consecutive = 0
            # Durable first: the receipt is in the outbox before anything else can fail; one
            # held for the self-audit is stored too, but not sent until its audit settles.
            self._deliver(result, held=self.guard.take(attempt, result))
            self.stats.record_attempt(result.elapsed_ns, result.wall_ns, result.stages_ns, result.ops,
                                     throttled=bool(result.receipt.get("telemetry", {}).get("throttled")))
            self.reporters.on_attempt(AttemptEvent(
                attempt=attempt, ok=True, elapsed_ns=result.elapsed_ns, wall_ns=result.wall_ns,
                ops=result.ops, digest=result.digest.hex(), stages_ns=result.stages_ns))
            log.debug("[run] attempt %d: %s -> %.1f ms", attempt, shape, result.elapsed_ns / 1e6)
            self._settle(self.guard.settled())  # audits ended since: release or withhold
        return None

    def _finish_guard(self, fatal: Exception | None) -> Exception | None:
        """Release what the self-audit verified, withhold what failed it (never sent); a failed
        audit, or a failure while releasing, becomes the run's error unless it has one."""
        try:
            self._settle(self.guard.finish())
        except Exception as exc:
            if fatal is None:
                log.exception("[run] delivering the audited receipts failed")
                fatal = exc if isinstance(exc, LIBRARY_ERRORS) else TopsJobError(f"internal error: {exc!r}")
                self.stats.record_failure(error_class_of(fatal).value)
        return fatal or self.guard.pending_failure()

    def _deliver(self, result: Any, *, held: bool) -> None:
        """Into the outbox (held: kept there unsent until its audit settles), then out to
        --receipts-out and the other sinks: a receipt anyone outside has seen is durable."""
        hashes, kept = getattr(result, "leaf_hashes", None), getattr(result, "kept", None)
        if hashes is not None or kept is not None:  # v2 challenge mode: to open when the challenge comes back
            self.delivery.enqueue(result.receipt, result.digest, leaf_hashes=hashes,  # type: ignore[call-arg]
                                  held=held, kept=kept)
        else:
            self.delivery.enqueue(result.receipt, result.digest, held=held)
        for sink in self.receipt_sinks:
            sink(result.receipt)

    def _settle(self, audits: list[Settled]) -> None:
        """A verified held receipt goes on to be sent; one that failed is withheld (kept for
        inspection, never sent). One that cannot be moved stays held in the outbox, for the
        next run; the others are still settled, then the first error is raised."""
        first: Exception | None = None
        for audit in audits:
            try:
                if audit.ok:
                    self.delivery.release(audit.digest)
                else:
                    self.delivery.withhold(audit.digest, f"self-audit of attempt {audit.attempt} on "
                                                         f"{self.guard.device}: {audit.error}")
            except Exception as exc:
                first = first or exc
        if first is not None:
            raise first

    def _run_attempt(self, shape: Shape, attempt: int, tile: int, challenge: bytes | None) -> Any:
        """One attempt; retried once when a helper process died under it (it was replaced)."""
        from tops_job.compute.host_workers import HelperLost

        config = self.config
        for tries_left in (1, 0):
            try:
                if self.v2 is not None:  # tops-receipt/2: None when stopped waiting for a run challenge
                    return self.v2.attempt(self.backend, shape, self.identity, run_id=config.run_id,
                                           attempt=attempt, tile=tile)
                return run_attempt(self.backend, shape, self.identity, run_id=config.run_id,
                                   attempt=attempt, tile=tile, opens=config.opens, challenge=challenge)
            except HelperLost as exc:
                if not tries_left:
                    raise
                log.warning("[run] attempt %d: %s; retrying it once", attempt, exc)
        raise AssertionError("unreachable")

    def _failed(self, attempt: int, error_class: ErrorClass, message: str) -> None:
        log.warning("[run] attempt %d failed (%s): %s", attempt, error_class.value, message)
        self.stats.record_failure(error_class.value)
        trace.get_current_span().add_event("attempt.failed", {"tops_job.attempt": attempt, "error.type": error_class.value})
        self.reporters.on_attempt(AttemptEvent(attempt=attempt, ok=False, error_class=error_class.value, error=message))

    def _exit_code(self, fatal: Exception | None, delivery: DeliveryReport) -> ExitCode:
        if self.stop.reason == "SIGTERM":
            return ExitCode.TERMINATED
        if self.stop.reason == "SIGINT":
            return ExitCode.INTERRUPTED
        if fatal is not None:
            return exit_code_of(fatal)
        if delivery.rejected:
            return ExitCode.REJECTED
        if delivery.pending:
            return ExitCode.PENDING
        if self.stats.attempts_failed:
            return ExitCode.INTERNAL_ERROR
        return ExitCode.OK
