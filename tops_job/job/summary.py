"""The run summary: one JSON document for machines, a few lines for people."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tops_job import __version__
from tops_job.atomic import write_atomic
from tops_job.delivery.outcomes import REPORTED_OUTCOMES
from tops_job.errors import ExitCode
from tops_job.files import private_dir
from tops_job.job.stats import RunStats


def build_summary(*, run_id: str, config: dict[str, Any], identity: dict[str, str], device: dict[str, Any],
                  profile: dict[str, Any] | None, stats: RunStats, delivery: dict[str, Any],
                  exit_code: ExitCode, reporter_failures: dict[str, int], stop_reason: str | None) -> dict[str, Any]:
    ended = time.time()
    timings = stats.timings()
    # The monotonic clock: a wall clock stepped back mid-run (NTP, a VM resume) must not
    # make the duration 0 and the rates astronomical.
    duration = max(time.monotonic() - stats.started_monotonic, 1e-9)
    return {
        "schema": "tops-job/summary/1",
        "version": __version__,
        "run_id": run_id,
        "started_at": _iso(stats.started),
        "ended_at": _iso(ended),
        "duration_s": round(duration, 3),
        "exit_code": int(exit_code),
        "exit_reason": exit_code.name,
        "stop_reason": stop_reason,
        "config": config,
        "identity": identity,
        "device": device,
        "profile": profile,
        "attempts": {
            "total": stats.attempts,
            "ok": stats.attempts_ok,
            "failed": stats.attempts_failed,
            "throttled": stats.throttled,  # GPU reported clock throttling during the product
            "by_error_class": dict(stats.attempts_by_error),
        },
        "receipts": {outcome.value: stats.receipts.get(outcome.value, 0) for outcome in REPORTED_OUTCOMES},
        # Every failure by class, the Rust worker's categories: attempts that failed, and sends
        # that failed (network: transient, retried or left in the outbox; validation: rejected).
        "errors_by_class": _merge_counts(stats.attempts_by_error, delivery.get("send_errors_by_class", {})),
        "timings": timings,
        "throughput": {
            "attempts_per_second": round(stats.attempts_ok / duration, 4),
            "ops_total": stats.ops,
            "gflops_run": round(stats.ops / duration / 1e9, 3),
        },
        "delivery": delivery,
        "plugin_failures": reporter_failures,
    }


def _merge_counts(*counts: dict[str, int]) -> dict[str, int]:
    merged: dict[str, int] = {}
    for count in counts:
        for name, value in count.items():
            merged[name] = merged.get(name, 0) + value
    return merged


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


def write_summary(summary: dict[str, Any], path: Path) -> Path:
    """Atomically, so a reader never sees half a summary."""
    private_dir(path.parent)
    return write_atomic(path, (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def human_lines(summary: dict[str, Any]) -> list[str]:
    """The short summary printed on stderr at the end of a run."""
    attempts, receipts, t = summary["attempts"], summary["receipts"], summary["timings"]
    lines = [
        f"[summary] run {summary['run_id']}: {summary['exit_reason'].lower()} (exit {summary['exit_code']})",
        f"  - attempts: {attempts['total']} ({attempts['ok']} ok, {attempts['failed']} failed"
        + (f": {attempts['by_error_class']}" if attempts["by_error_class"] else "") + ")",
        f"  - receipts: {receipts['accepted']} accepted, {receipts['duplicate']} duplicate, "
        f"{receipts['rejected']} rejected, {receipts['pending']} pending",
    ]
    if summary.get("errors_by_class"):
        lines.append("  - errors by class: " + ", ".join(f"{name} {count}" for name, count in
                                                         sorted(summary["errors_by_class"].items())))
    lines.extend(device_check_lines(summary.get("device_checks") or {}))
    if attempts.get("throttled"):
        lines.append(f"  - warning: {attempts['throttled']} attempts ran while the GPU was throttled")
    if t["product_ms"]:
        p = t["product_ms"]
        lines.append(f"  - product time: mean {p['mean']:.1f} ms, p50 {p['p50']:.1f} ms, p95 {p['p95']:.1f} ms")
        lines.append(f"  - achieved: {t['gflops_product']:.1f} GFLOP/s over the product, "
                     f"{t['gflops_attempt']:.1f} GFLOP/s over whole attempts (duty {t['duty_cycle']:.2f})")
    return lines


def device_check_lines(checks: dict[str, Any]) -> list[str]:
    """The self-test, self-audit, fallback and NVML health of the run, for people."""
    lines = []
    test = checks.get("selftest")
    if test:
        lines.append(f"  - self-test: {'passed' if test['ok'] else 'FAILED at ' + str(test['stage'])} "
                     f"({test['seconds'] * 1e3:.0f} ms)")
    audit = checks.get("self_audit") or {}
    if audit.get("every"):
        lines.append(f"  - self-audit: {audit['audited']} receipts verified on the CPU (1 in {audit['every']}, "
                     f"{audit['flagged']} flagged by NVML), {audit['seconds'] * 1e3:.0f} ms in the background")
    if audit.get("failure"):
        f = audit["failure"]
        lines.append(f"  - DEVICE UNTRUSTWORTHY: {f['device']}: attempt {f['attempt']} failed its self-audit: {f['error']}")
    if checks.get("fallback"):
        lines.append(f"  - warning: {checks['fallback']}; inputs and commitment ran on the host (see duty)")
    changes = (checks.get("health") or {}).get("changes")
    if changes:
        lines.append(f"  - warning: NVML health counters moved on {checks.get('device')}: {changes}")
    return lines
