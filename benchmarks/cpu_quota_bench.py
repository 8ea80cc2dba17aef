"""The CPU backend under a CPU quota: threads counted from the quota vs one per CPU of the affinity.

    podman run --rm --cpus 1 -v "$PWD/benchmarks:/b:ro" --entrypoint /opt/tops-job/bin/python \\
        IMAGE /b/cpu_quota_bench.py [--side 3072] [--attempts 10] [--rounds 3]

Run it where a cgroup CPU quota is below the CPUs the process may run on (a container with
`--cpus`, a Kubernetes CPU limit); elsewhere both rows are the same configuration. Each row
runs in a fresh process, because BLAS's pool is set once per process, and the two alternate
round by round. The "affinity" row is what the worker did before it read the quota: a thread,
a helper and a BLAS thread per CPU of the affinity mask, throttled by the kernel together.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

_CHILD = """
import json, statistics, sys, time
from tops_job.compute.base import Shape
from tops_job.compute.numpy_backend import NumpyBackend
threads, side, attempts = int(sys.argv[1]) or None, int(sys.argv[2]), int(sys.argv[3])
backend = NumpyBackend(threads=threads)
backend.prepare(Shape(side, side, side))
walls, products = [], []
for i in range(attempts + 2):
    start = time.perf_counter()
    backend.generate_inputs(2 * i + 1, 2 * i + 2)
    products.append(backend.multiply() / 1e6)
    backend.commit(min(backend.default_tile, side))
    walls.append((time.perf_counter() - start) * 1000)
backend.close()
walls, products = walls[2:], products[2:]  # the first two warm the pages and BLAS up
print(json.dumps({"threads": backend.threads, "attempt_ms": statistics.median(walls),
                  "product_ms": statistics.median(products), "product_max_ms": max(products)}))
"""


def run(threads: int, side: int, attempts: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(threads), str(side), str(attempts)],
                         capture_output=True, text=True, check=True, timeout=1800)
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=3072, help="m = n = k (3072: about 300 ms on one core)")
    parser.add_argument("--attempts", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from tops_job.cpus import cgroup_cpu_quota, usable_cpus

    affinity = len(os.sched_getaffinity(0))
    print(f"affinity {affinity} CPUs, cgroup quota {cgroup_cpu_quota()} CPUs, usable_cpus() {usable_cpus()}")
    rows: dict[str, list[dict]] = {"counted from the quota": [], "one per CPU of the affinity": []}
    for _ in range(args.rounds):
        rows["counted from the quota"].append(run(0, args.side, args.attempts))
        rows["one per CPU of the affinity"].append(run(affinity, args.side, args.attempts))
    print(f"\n{args.side}³, {args.attempts} attempts a run, {args.rounds} runs each (medians of a run; max: its slowest product)")
    print("| threads | attempt ms | product ms | slowest product ms |")
    print("|---|---|---|---|")
    for name, runs in rows.items():
        cells = [", ".join(f"{r[field]:.0f}" for r in runs) for field in ("attempt_ms", "product_ms", "product_max_ms")]
        print(f"| {name} ({runs[0]['threads']}) | " + " | ".join(cells) + " |")
    counted, per_cpu = (statistics.median(r["attempt_ms"] for r in rows[name]) for name in rows)
    print(f"\nattempt time, counted / one per CPU: {counted / per_cpu:.2f}")


if __name__ == "__main__":
    main()
