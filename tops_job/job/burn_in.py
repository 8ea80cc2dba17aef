"""`tops-job selftest`: the start-up self-test, a self-audit of N attempts and the NVML health
read, per dtype, as one pass/fail table, for operators' burn-in of new nodes.

Every receipt made here is verified on the CPU (audit every attempt) and then thrown away:
the key is ephemeral and nothing is delivered. Exit codes as `run`: 0 all passed, 5 a device
check failed, 2 a setting is wrong.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from tops_job.compute import create_backend, device_health
from tops_job.compute.base import Shape
from tops_job.compute.selftest import SelfTestFailed
from tops_job.errors import DeviceError, ExitCode
from tops_job.job.attempt import Identity, run_attempt
from tops_job.job.device_guard import DeviceGuard
from tops_job.spec.identity import default_did
from tops_job.spec.signing import LocalKeySigner


@dataclass
class CheckRow:
    device: str
    dtype: str
    check: str  # "self-test", "self-audit", "health"
    ok: bool
    detail: str
    seconds: float


@dataclass
class BurnInReport:
    rows: list[CheckRow]

    @property
    def ok(self) -> bool:
        return all(row.ok for row in self.rows)

    @property
    def exit_code(self) -> ExitCode:
        return ExitCode.OK if self.ok else ExitCode.DEVICE_ERROR

    def table(self) -> str:
        head = ("device", "dtype", "check", "result", "time", "detail")
        body = [(r.device, r.dtype, r.check, "pass" if r.ok else "FAIL", f"{r.seconds * 1e3:.0f} ms", r.detail)
                for r in self.rows]
        widths = [max(len(str(line[i])) for line in [head, *body]) for i in range(len(head) - 1)]
        lines = []
        for line in [head, *body]:
            lines.append("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)) + "  " + line[-1])
        verdict = "PASS: every check passed" if self.ok else "FAIL: this device computes wrongly; do not run jobs on it"
        return "\n".join([*lines, verdict])


def burn_in(backend_name: str, dtypes: list[str], *, attempts: int, size: Shape, tile: int | None = None,
            strict_device: bool = False) -> BurnInReport:
    rows: list[CheckRow] = []
    identity = _ephemeral_identity()
    for dtype in dtypes:
        backend = create_backend(backend_name, dtype, strict_device=strict_device)
        guard = DeviceGuard(backend, selftest=True, audit_every=1)
        device = guard.device
        try:
            began = time.perf_counter()
            try:
                guard.start()
            except SelfTestFailed as exc:
                rows.append(CheckRow(device, dtype, "self-test", False, f"{exc.result.stage} differ: {exc.result.detail}",
                                     exc.result.seconds))
                continue
            result = guard.selftest_result
            assert result is not None
            fallback = getattr(backend, "fallback", None)
            rows.append(CheckRow(device, dtype, "self-test", True,
                                 "inputs, product, leaf hashes, tree, openings equal the CPU's"
                                 + (f" (host fallback: {fallback})" if fallback else ""), result.seconds))
            began = time.perf_counter()
            shape_tile = min(tile or backend.default_tile, size.n)
            try:
                for attempt in range(attempts):
                    signed = run_attempt(backend, size, identity, run_id="selftest", attempt=attempt,
                                         tile=shape_tile, opens=16)
                    guard.take(attempt, signed)
                    if guard.failure is not None:
                        break
            except DeviceError as exc:
                guard.finish()
                rows.append(CheckRow(device, dtype, "self-audit", False, f"attempt failed: {exc}",
                                     time.perf_counter() - began))
                continue
            guard.finish()
            failure = guard.failure
            rows.append(CheckRow(device, dtype, "self-audit", failure is None,
                                 f"{guard.audited} receipts of {size} verified on the CPU" if failure is None
                                 else f"attempt {failure.attempt}: {failure.error}", time.perf_counter() - began))
            if guard.health is not None:
                delta = device_health.changes(guard.health_before, guard.health_after)
                rows.append(CheckRow(device, dtype, "health", not device_health.is_bad(delta),
                                     f"NVML counters moved: {delta}" if delta else "no ECC, row remapping or Xid events",
                                     0.0))
        finally:
            backend.close()
    return BurnInReport(rows)


def _ephemeral_identity() -> Identity:
    while True:  # a random 32-byte string is a valid secp256k1 scalar but for ~2^-128 of them
        try:
            signer = LocalKeySigner(os.urandom(32))
            break
        except Exception:
            continue
    return Identity(did=default_did(signer.public_key), signer=signer)
