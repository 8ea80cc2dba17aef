"""CPU attempt benchmark: raw numpy.matmul vs tops-job attempts on the same shape, one process.

    python benchmarks/cpu_attempt_bench.py [--size N] [--attempts 8] [--tile T]

Prints raw GFLOP/s, run GFLOP/s over the product and over the whole attempt (duty cycle),
per-stage costs, and the cold start of `tops-job run --attempts 1` with a cached profile.
Targets (issue 2): whole-attempt ≥ 0.90 × raw at the 300 ms size; cold start ≤ 1.0 s.

OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE, where the machine sets them, pin an older kernel; run
with `env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE` to measure the kernel NumPy would pick.
Both sides of every ratio run under the same setting, in the same process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np  # noqa: E402  (after tops_job, see above)

from tops_job.compute.autotune import ProfileStore, resolve_profile
from tops_job.compute.base import Shape
from tops_job.compute.numpy_backend import NumpyBackend

# tops_job first, as the CLI does: importing it sets OPENBLAS_THREAD_TIMEOUT before NumPy
# loads OpenBLAS (see tops_job/__init__.py).
from tops_job.job.attempt import Identity, run_attempt
from tops_job.spec.signing import LocalKeySigner


def raw_matmul_seconds(shape: Shape, repeats: int) -> list[float]:
    """numpy.matmul alone, on inputs of the same values and layout as the job's."""
    rng = np.random.default_rng(0)
    a = rng.integers(-8, 8, size=(shape.m, shape.k)).astype(np.float32)
    bt = rng.integers(-8, 8, size=(shape.n, shape.k)).astype(np.float32)
    c = np.empty((shape.m, shape.n), np.float32)
    np.matmul(a, bt.T, out=c)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.matmul(a, bt.T, out=c)
        times.append(time.perf_counter() - start)
    return times


def cold_start(size: int, cache: Path, env: dict) -> float:
    """Whole process: `tops-job run --attempts 1` with the profile already cached."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "tops_job.cli", "run", "--attempts", "1"], env=env,
                       check=True, capture_output=True)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, help="square side (default: autotune to --target-ms)")
    parser.add_argument("--target-ms", type=int, default=300)
    parser.add_argument("--attempts", type=int, default=8)
    parser.add_argument("--tile", type=int)
    args = parser.parse_args()

    backend = NumpyBackend("float32")
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        if args.size:
            shape = Shape(args.size, args.size, args.size)
        else:
            profile, _ = resolve_profile(backend, args.target_ms, ProfileStore(cache))
            shape = profile.shape
        tile = min(args.tile or backend.default_tile, shape.n)
        identity = Identity("did:peaq:bench", LocalKeySigner(os.urandom(32)))
        run_attempt(backend, shape, identity, run_id="bench", attempt=0, tile=tile, opens=16)  # warm-up
        results = [run_attempt(backend, shape, identity, run_id="bench", attempt=i, tile=tile, opens=16)
                   for i in range(args.attempts)]
        raw = raw_matmul_seconds(shape, args.attempts)

        env = dict(os.environ, TOPS_JOB_CACHE_DIR=str(cache), TOPS_JOB_DATA_DIR=str(Path(tmp) / "data"),
                   TOPS_JOB_CONFIG_DIR=str(Path(tmp) / "config"))
        if args.size:  # cache a profile of this size so the cold start does no probing
            resolve_profile(backend, args.target_ms, ProfileStore(cache))
        cold = cold_start(shape.m, cache, env)
    backend.close()

    ops = shape.ops
    raw_gflops = ops / statistics.median(raw) / 1e9
    product_gflops = ops / statistics.median([r.elapsed_ns / 1e9 for r in results]) / 1e9
    attempt_gflops = ops / statistics.median([r.wall_ns / 1e9 for r in results]) / 1e9
    print(f"shape {shape}, tile {tile}, {args.attempts} attempts, {backend.threads} threads, "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}")
    print(f"{'measure':<34}{'GFLOP/s':>10}{'ratio to raw':>14}")
    print(f"{'raw numpy.matmul':<34}{raw_gflops:>10.1f}{1.0:>14.3f}")
    print(f"{'run, over the product':<34}{product_gflops:>10.1f}{product_gflops / raw_gflops:>14.3f}")
    print(f"{'run, over the whole attempt':<34}{attempt_gflops:>10.1f}{attempt_gflops / raw_gflops:>14.3f}")
    print()
    print(f"{'stage':<34}{'median ms':>10}{'share':>14}")
    wall = statistics.median([r.wall_ns for r in results]) / 1e6
    for stage in ("inputs", "product", "commitment", "signing"):
        ms = statistics.median([r.stages_ns[stage] for r in results]) / 1e6
        print(f"{stage:<34}{ms:>10.2f}{ms / wall:>14.3f}")
    print(f"{'whole attempt':<34}{wall:>10.2f}{1.0:>14.3f}")
    print()
    print(f"cold start (run --attempts 1, cached profile, whole process): {cold:.3f} s (target ≤ 1.0 s)")


if __name__ == "__main__":
    main()
