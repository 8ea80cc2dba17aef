"""Self-audit cost: the duty cycle (product time / whole-attempt time) of CPU-backend attempts
with the background self-audit verifying every Nth receipt, against the same attempts without.

    python benchmarks/selfaudit_bench.py [--size 1536] [--attempts 20] [--trials 4] [--every 10]

Runs the attempts as `tops-job run` does (run_attempt, then DeviceGuard.take), alternating
audit off / audit on per trial so that drift in the machine's speed hits both alike, and
prints a table of the duty cycles and their ratio. Target (issue 15): ratio ≥ 0.98. Also
prints the start-up self-test's cost against a 100-attempt run (target: under 1 %).
"""

from __future__ import annotations

import argparse
import statistics
import time

from tops_job.compute.base import Shape
from tops_job.compute.numpy_backend import NumpyBackend
from tops_job.job.attempt import Identity, run_attempt
from tops_job.job.device_guard import DeviceGuard
from tops_job.spec.signing import LocalKeySigner

IDENTITY = Identity(did="did:peaq:0xbench", signer=LocalKeySigner(bytes(range(1, 33))))


def one_run(backend: NumpyBackend, shape: Shape, attempts: int, every: int) -> dict:
    guard = DeviceGuard(backend, selftest=False, audit_every=every)
    guard.start()
    product = wall = 0
    duties = []
    began = time.perf_counter()
    for attempt in range(attempts):
        result = run_attempt(backend, shape, IDENTITY, run_id="bench", attempt=attempt,
                             tile=min(backend.default_tile, shape.n), opens=16)
        guard.take(attempt, result)
        product += result.elapsed_ns
        wall += result.wall_ns
        duties.append(result.elapsed_ns / result.wall_ns)
    loop_s = time.perf_counter() - began
    guard.finish()
    assert guard.failure is None
    return {"duty": product / wall, "median_duty": statistics.median(duties), "loop_s": loop_s,
            "audited": guard.audited, "audit_cpu_s": guard.audit_s}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1536)
    parser.add_argument("--attempts", type=int, default=20)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--every", type=int, default=10)
    args = parser.parse_args(argv)
    shape = Shape(args.size, args.size, args.size)
    backend = NumpyBackend("float32")
    try:
        one_run(backend, shape, 3, 0)  # warm-up: buffers, helpers, BLAS threads
        rows = []
        for trial in range(args.trials):  # alternate the order: drift hits both sides alike
            if trial % 2:
                on = one_run(backend, shape, args.attempts, args.every)
                off = one_run(backend, shape, args.attempts, 0)
            else:
                off = one_run(backend, shape, args.attempts, 0)
                on = one_run(backend, shape, args.attempts, args.every)
            rows.append((trial, off, on))
        from tops_job.compute import selftest

        test = selftest.check(backend)
        attempt_s = statistics.median(r[1]["loop_s"] for r in rows) / args.attempts
    finally:
        backend.close()
    print(f"CPU backend, {backend.threads} threads, {shape}, {args.attempts} attempts per run, "
          f"audit every {args.every}th receipt\n")
    print("| trial | duty, no audit | duty, audit | ratio | median attempt duty off / on | ratio of medians "
          "| receipts audited | audit s (background) | loop s off / on |")
    print("|---|---|---|---|---|---|---|---|---|")
    for trial, off, on in rows:
        print(f"| {trial} | {off['duty']:.4f} | {on['duty']:.4f} | {on['duty'] / off['duty']:.4f} "
              f"| {off['median_duty']:.4f} / {on['median_duty']:.4f} | {on['median_duty'] / off['median_duty']:.4f} "
              f"| {on['audited']} | {on['audit_cpu_s']:.3f} | {off['loop_s']:.2f} / {on['loop_s']:.2f} |")
    ratio = sum(on["duty"] for _, _, on in rows) / sum(off["duty"] for _, off, _ in rows)
    median_ratio = statistics.median(on["median_duty"] for _, _, on in rows) / statistics.median(
        off["median_duty"] for _, off, _ in rows)
    audit_share = sum(on["audit_cpu_s"] for _, _, on in rows) / sum(on["loop_s"] for _, _, on in rows)
    print(f"\nduty ratio (audit / no audit) over all trials: {ratio:.4f}; of per-attempt medians: {median_ratio:.4f} "
          f"(target ≥ 0.98); background audit time = {audit_share * 100:.2f} % of the audited loops' wall time")
    print(f"start-up self-test: {test.seconds * 1e3:.1f} ms = {test.seconds / (100 * attempt_s) * 100:.2f} % "
          f"of a 100-attempt run at {attempt_s * 1e3:.0f} ms per attempt (target < 1 %)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
