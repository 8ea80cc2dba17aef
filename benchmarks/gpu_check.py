"""Device check for the CuPy backend, in one call of at most 8 minutes on one GPU.

1. Correctness: for every GPU dtype and a few small shapes, the known-answer self-test
   (compute/selftest.py): device inputs, product, leaf hashes, tree and openings equal the
   CPU implementation's, compared only after the commitment (as an attempt reads them), the
   first differing stage named. One dtype's failure does not stop the others.
2. Speed: for every dtype, at the shape whose product takes about --target-ms (side capped),
   raw cuBLAS (back-to-back gemmEx calls on the backend's buffers and stream; cupy.matmul
   only for float32, where its output type is ours) against tops-job's product (elapsed_ns)
   and whole attempt (inputs → product → commitment → openings → receipt → signature),
   per-stage costs, receipts/s and NVML telemetry. Every receipt made there is spot-checked
   on the CPU (opened leaves recomputed: the only place the 64-bit index paths run), and a
   product faster than the card's datasheet peak fails the check (a timing that brackets
   nothing, not a fast card).

    python3 benchmarks/gpu_check.py [--dtypes float32,tf32,float16,bfloat16,int8]
                                    [--target-ms 300] [--attempts 6] [--out DIR]

Prints a table; with --out (default $OUT when set) also writes gpu_check.json and
gpu_check.md there, rewritten after every dtype so a timeout keeps what was measured.
Exits 2 with a clear message where CuPy or a CUDA device is missing, 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

BUDGET_S = 300  # default --budget-s; gpu_check.sh passes what its call leaves for this stage
MAX_SIDE = 16384  # pick_shape's cap: 16384³ float32 is ~0.1 s on an H200, and its buffers fit
SMALL_SHAPES = [(1, 1, 4), (37, 52, 20), (128, 256, 64), (300, 260, 1028), (512, 1024, 4096)]


def fail(message: str, code: int = 2) -> None:
    print(f"gpu_check: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def need_gpu():
    try:
        import cupy as cp
    except Exception as exc:  # ImportError, or a CuPy built for another CUDA
        fail(f"CuPy is not importable ({exc}); this check needs a CUDA GPU and CuPy "
             "(pip install 'tops-job[gpu]')")
    try:
        count = cp.cuda.runtime.getDeviceCount()
    except Exception as exc:
        fail(f"no CUDA GPU present ({exc})")
    if count < 1:
        fail("no CUDA GPU present")
    return cp


def attempt_runner():
    """run_attempt (the path `tops-job run` takes) when its dependencies import; else a
    stand-in with the same stages that skips only the signature, and says so."""
    try:
        from tops_job.job.attempt import Identity, run_attempt
        from tops_job.spec.signing import LocalKeySigner

        identity = Identity(did="did:peaq:0xgpucheck", signer=LocalKeySigner(bytes(range(1, 33))))

        def run(backend, shape, attempt, tile, opens):
            return run_attempt(backend, shape, identity, run_id="gpu-check", attempt=attempt, tile=tile, opens=opens)
        return run, "run_attempt"
    except ImportError as exc:
        missing = str(exc)

    from types import SimpleNamespace as Result

    from tops_job.spec.canonical import digest_of
    from tops_job.spec.commitment import make_openings
    from tops_job.spec.inputs import attempt_seed, matrix_key
    from tops_job.spec.receipt import build_body

    def run(backend, shape, attempt, tile, opens):
        t0 = time.perf_counter_ns()
        nonce = os.urandom(32)
        backend.prepare(shape)
        seed = attempt_seed("did:peaq:0xgpucheck", nonce)
        backend.generate_inputs(matrix_key(seed, "A"), matrix_key(seed, "B"))
        t1 = time.perf_counter_ns()
        elapsed = backend.multiply()
        t2 = time.perf_counter_ns()
        commitment = backend.commit(tile)
        openings = make_openings(commitment, nonce, opens)
        t3 = time.perf_counter_ns()
        body = build_body(did="did:peaq:0xgpucheck", pubkey=b"\x02" + bytes(32), run_id="gpu-check",
                          attempt=attempt, nonce=nonce, challenge=None, m=shape.m, n=shape.n, k=shape.k,
                          tile=tile, opens=opens, dtype=backend.dtype, backend=backend.name,
                          device=backend.device_model, elapsed_ns=elapsed, started_ms=int(time.time() * 1000),
                          root=commitment.root, telemetry=backend.telemetry())
        digest_of(body)
        t4 = time.perf_counter_ns()
        return Result(receipt=dict(body, openings=openings), elapsed_ns=elapsed, wall_ns=t4 - t0,
                      stages_ns={"inputs": t1 - t0, "product": t2 - t1, "commitment": t3 - t2, "signing": t4 - t3})
    return run, f"stand-in without signature ({missing})"


# ---- 1. correctness --------------------------------------------------------------------------

def check_roots(cp, dtypes, log, deadline: float) -> int:
    from tops_job.compute.base import Shape
    from tops_job.compute.cupy_backend import CupyBackend
    from tops_job.compute.selftest import run_selftest

    failures = 0
    for dtype in dtypes:
        try:  # one dtype's DeviceError (or a kernel that will not build) must not stop the others
            backend = CupyBackend(dtype)
        except Exception as exc:
            log(f"  {dtype:9s} FAILED to start: {type(exc).__name__}: {exc}")
            failures += 1
            continue
        try:
            for m, n, k in SMALL_SHAPES:
                if time.monotonic() > deadline:
                    log(f"  {dtype:9s} remaining shapes skipped: past the budget")
                    break
                shape = Shape(m, n, k)
                if dtype == "int8" and (k % 4 or n % 4):
                    continue
                for tile in sorted({1, min(7, n), n, min(256, n)}):
                    try:
                        result = run_selftest(backend, shape, tile)
                        ok, what = result.ok, ("ok" if result.ok else f"{result.stage} DIFFER: {result.detail}")
                    except Exception as exc:
                        ok, what = False, f"FAILED: {type(exc).__name__}: {exc}"
                    failures += not ok
                    if not ok or tile == min(256, n):
                        log(f"  {dtype:9s} {str(shape):22s} tile {tile:4d}  {what}")
        finally:
            backend.close()
    return failures


def spot_check(receipt: dict, signed: bool) -> str:
    """'' when the receipt's opened leaves recompute on the CPU (sampled columns, as the
    aggregator does) and their paths lead to the root; else what failed."""
    import random

    from tops_job.spec import verify

    try:
        if signed:
            verify.verify_receipt(receipt)
        else:  # the stand-in signs nothing: check the openings alone
            verify._check_openings(receipt, bytes.fromhex(receipt["nonce"]), full=False, rng=random.Random())
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


# ---- 2. speed ----------------------------------------------------------------------------------

def pick_shape(backend, target_ms: float, max_side: int = MAX_SIDE):
    """Square side, a multiple of 256 up to `max_side`, whose product takes about target_ms."""
    from tops_job.compute.base import Shape

    side, ms = min(4096, max_side), 0.0
    for _ in range(3):
        backend.prepare(Shape(side, side, side))
        backend.generate_inputs(1, 2)
        backend.multiply()
        ms = min(backend.multiply() for _ in range(2)) / 1e6
        budget = min(max_side, int((backend.memory_budget_bytes / 16) ** 0.5) // 256 * 256)
        nxt = max(256, min(budget, int(round(side * (target_ms / max(ms, 1e-3)) ** (1 / 3) / 256)) * 256))
        if abs(nxt - side) <= 256:
            break
        side = nxt
    return Shape(side, side, side)


def raw_rates(cp, backend, reps: int = 8) -> dict:
    """TFLOP/s of gemmEx calls on the backend's buffers and stream and, for float32 only, of
    cupy.matmul (for float16 CuPy's matmul writes a float16 C, which is not the product we
    time: no like-for-like comparison). Each call is timed alone between two events and the
    median taken, as the product is (multiply(): one call between two events)."""
    shape = backend.shape
    ops = 2 * shape.m * shape.n * shape.k
    stream = backend._stream

    def median_tflops(call) -> float:
        call()  # warm: the library picks and loads its kernel
        times = []
        for _ in range(reps):
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record(stream)
            call()
            end.record(stream)
            end.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, end) * 1e-3)
        return ops / statistics.median(times) / 1e12

    out = {"gemmex_tflops": median_tflops(backend._gemm_call)}
    if backend.dtype == "float32":
        a, bt = backend.a, backend.bt
        with stream:
            c = cp.matmul(a, bt.T)

            def matmul() -> None:
                cp.matmul(a, bt.T, out=c)
            out["matmul_tflops"] = median_tflops(matmul)
        del c
    return out


def measure_dtype(cp, dtype, target_ms, attempts, run, log, deadline: float, signed: bool,
                  max_side: int = MAX_SIDE) -> dict:
    from tops_job.compute.cupy_backend import CupyBackend
    from tops_job.compute.peaks import datasheet_tflops

    backend = CupyBackend(dtype)
    try:
        shape = pick_shape(backend, target_ms, max_side)
        backend.prepare(shape)
        backend.generate_inputs(3, 4)
        backend.multiply()
        raw = raw_rates(cp, backend)
        tile = backend.default_tile
        run(backend, shape, 0, tile, 16)  # warm-up: kernels compiled, tree buffer allocated
        results, device_stages, telemetry = [], [], []
        t0 = time.perf_counter()
        for attempt in range(1, attempts + 1):
            if attempt > 2 and time.monotonic() > deadline:
                break
            results.append(run(backend, shape, attempt, tile, 16))
            device_stages.append(backend.device_stages_ns())
            telemetry.append(backend.telemetry())
        attempts = len(results)
        # 2 receipts spot-checked on the CPU: the large-shape (64-bit index) paths.
        checks = [spot_check(r.receipt, signed) for r in results[:2]]
        span_s = time.perf_counter() - t0
        ops = shape.ops
        elapsed = [r.elapsed_ns for r in results]
        wall = [r.wall_ns for r in results]
        product_tflops = ops / (statistics.median(elapsed) * 1e-9) / 1e12
        row = {
            "dtype": dtype, "shape": [shape.m, shape.n, shape.k], "tile": tile,
            **{k: round(v, 1) for k, v in raw.items()},
            "product_tflops": round(product_tflops, 1),
            "attempt_tflops": round(ops / (statistics.median(wall) * 1e-9) / 1e12, 1),
            "product_vs_raw": round(product_tflops / raw["gemmex_tflops"], 3),
            "duty": round(sum(elapsed) / sum(wall), 3),
            "receipts_per_s": round(attempts / span_s, 2),
            "product_ms": round(statistics.median(elapsed) / 1e6, 1),
            "stages_ms": {s: round(statistics.median(r.stages_ns[s] for r in results) / 1e6, 2) for s in results[0].stages_ns},
            "device_stages_ms": {s: round(statistics.median(d[s] for d in device_stages) / 1e6, 2) for s in device_stages[0]},
            "receipt_bytes": len(json.dumps(results[-1].receipt)),
            "telemetry": telemetry[-1],
            "throttled_attempts": sum(t.get("throttled", 0) for t in telemetry),
            "receipts_checked": len(checks),
            "receipt_failures": [c for c in checks if c],
            "datasheet_tflops": datasheet_tflops(backend.device_model, dtype),
        }
        peak = row["datasheet_tflops"]
        row["faster_than_peak"] = bool(peak and product_tflops > peak * 1.02)
        log(f"  {dtype:9s} {shape} product {row['product_ms']} ms, {row['product_tflops']} TFLOP/s "
            f"({row['product_vs_raw']:.3f} of raw gemmEx), duty {row['duty']}, receipts "
            f"{'ok' if not row['receipt_failures'] else 'FAIL: ' + row['receipt_failures'][0]}"
            + (f"; FASTER THAN THE {peak} TFLOP/s DATASHEET PEAK: timing is broken" if row["faster_than_peak"] else ""))
        return row
    finally:
        backend.close()


def table(rows) -> str:
    head = ("| dtype | m=n=k | raw cupy.matmul TFLOP/s | raw gemmEx TFLOP/s | tops-job product TFLOP/s | product/raw "
            "| whole attempt TFLOP/s | duty | receipts/s | inputs / product / commit+open / sign ms (host) "
            "| inputs / product / commit ms (device) | throttled |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        s, d = r["stages_ms"], r["device_stages_ms"]
        lines.append(
            f"| {r['dtype']} | {r['shape'][0]} | {r.get('matmul_tflops', '–')} | {r['gemmex_tflops']} | {r['product_tflops']} "
            f"| {r['product_vs_raw']} | {r['attempt_tflops']} | {r['duty']} | {r['receipts_per_s']} "
            f"| {s.get('inputs')} / {s.get('product')} / {s.get('commitment')} / {s.get('signing')} "
            f"| {d['inputs']} / {d['product']} / {d['commitment']} | {r['throttled_attempts']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from tops_job.compute.cuda_kernels import GPU_DTYPES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", default=",".join(GPU_DTYPES))
    parser.add_argument("--target-ms", type=float, default=300.0)
    parser.add_argument("--attempts", type=int, default=6)
    parser.add_argument("--out", default=os.environ.get("OUT"))
    parser.add_argument("--skip-correctness", action="store_true")
    parser.add_argument("--max-side", type=int, default=MAX_SIDE, help="cap on the speed shapes' side")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S,
                        help="stop starting new work after this many seconds (a third for correctness)")
    args = parser.parse_args(argv)
    dtypes = [d for d in args.dtypes.split(",") if d]
    unknown = set(dtypes) - set(GPU_DTYPES)
    if unknown:
        fail(f"unknown dtypes {sorted(unknown)}; choose from {', '.join(GPU_DTYPES)}")
    cp = need_gpu()
    began = time.monotonic()
    props = cp.cuda.runtime.getDeviceProperties(0)
    device = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    log = lambda text: print(text, flush=True)  # noqa: E731
    log(f"gpu_check: {device}, CuPy {cp.__version__}, CUDA runtime {cp.cuda.runtime.runtimeGetVersion()}, "
        f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    deadline = began + args.budget_s
    out = Path(args.out) if args.out else None
    meta = {"device": device, "cupy": cp.__version__, "date_utc": time.strftime("%Y-%m-%d")}
    rows: list[dict] = []

    def save(note: str = "") -> None:
        """Rewritten after each dtype: a timeout keeps what was measured."""
        if out is None:
            return
        out.mkdir(parents=True, exist_ok=True)
        text = table(rows)
        (out / "gpu_check.json").write_text(json.dumps({"meta": meta, "rows": rows, "note": note}, indent=2) + "\n")
        (out / "gpu_check.md").write_text(f"{meta['date_utc']}, {device}, CuPy {cp.__version__}\n\n{text}\n")

    failures = 0
    if not args.skip_correctness:
        log("1. self-test (inputs, product, leaf hashes, tree, openings) against the CPU implementation")
        failures = check_roots(cp, dtypes, log, began + args.budget_s / 3)
        log(f"   {'all equal' if not failures else f'{failures} MISMATCHES'} ({time.monotonic() - began:.0f} s)")
        meta["correctness_failures"] = failures
        save("correctness done")
    run, how = attempt_runner()
    meta["attempt_path"] = how
    log(f"2. speed at about {args.target_ms:g} ms per product; whole attempt via {how}")
    for dtype in dtypes:
        if time.monotonic() > deadline:
            log(f"  {dtype}: skipped, past the {args.budget_s:g} s budget")
            continue
        try:
            row = measure_dtype(cp, dtype, args.target_ms, args.attempts, run, log, deadline,
                                signed=how == "run_attempt", max_side=args.max_side)
            rows.append(row)
            failures += bool(row["receipt_failures"]) + row["faster_than_peak"]
        except Exception as exc:  # report and go on with the next dtype
            log(f"  {dtype}: FAILED: {type(exc).__name__}: {exc}")
            failures += 1
        save(f"after {dtype}")
    print("\n" + table(rows), flush=True)
    save("complete")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
