"""Aggregator throughput: receipts verified per second through HTTP with 1 and N worker
processes, against the verification alone.

    python benchmarks/aggregator_bench.py --make 3000 --shape 16,1024,1024 --tile 1024 --out r.jsonl
    python benchmarks/aggregator_bench.py r.jsonl --workers 1,2 --seconds 4
    python benchmarks/aggregator_bench.py r.jsonl --decompose      # where a receipt's CPU goes

An aggregator answers a resend of an accepted receipt from its store without verifying it
again, so every receipt is posted once per server (a fresh database each): every request
costs one full verification. `--make` signs receipts with the spec's test key (in parallel,
one process per core). The clients are plain keep-alive sockets with prepared requests, so
they take little of the CPU the server is measured on. Per core = receipts / CPU seconds of
the server's processes.

The verification alone runs in child processes, as many as the server's workers, twice: with
the libraries' defaults (what a plain `verify_receipt` loop gets) and with the server's
process settings (`serve.tune_process`: glibc keeps freed memory, which alone halves a 300 KB
receipt's verification here, and BLAS runs on one thread). The second is the like-for-like
baseline.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu(pid: int) -> float:
    """CPU seconds of a server and its worker processes."""
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout.split()
    total = cpu_seconds(pid)
    for child in children:
        try:
            total += cpu_seconds(int(child))
        except (OSError, ValueError):
            pass
    return total


def _make(args: tuple[int, int, tuple[int, int, int], int]) -> list[str]:
    first, count, shape, tile = args
    from tests.support.load import make_receipts
    from tops_job.compute.base import Shape
    from tops_job.spec.canonical import receipt_line

    return [receipt_line(r) for r in make_receipts(count, run_id=f"bench-{os.getpid()}", shape=Shape(*shape), tile=tile,
                                                   first_attempt=first)]


def make(count: int, shape: tuple[int, int, int], tile: int, out: Path) -> None:
    procs = os.cpu_count() or 1
    per = -(-count // procs)
    with ProcessPoolExecutor(procs) as pool:
        lines = [line for chunk in pool.map(_make, [(i * per, per, shape, tile) for i in range(procs)]) for line in chunk]
    out.write_text("\n".join(lines[:count]) + "\n")
    print(f"wrote {min(count, len(lines))} receipts of shape {shape}, tile {tile} to {out}")


def _verify_for(args: tuple[list[str], float]) -> tuple[int, float]:
    """(receipts verified, CPU seconds of this process, its BLAS threads included)."""
    from tops_job.spec.verify import verify_receipt

    lines, seconds = args
    receipts = [json.loads(line) for line in lines]
    done, wall, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - wall < seconds:
        verify_receipt(receipts[done % len(receipts)])
        done += 1
    return done, time.process_time() - cpu


def _init_child(server_settings: bool) -> None:
    if server_settings:
        from tops_job.aggregator.serve import tune_process

        tune_process()


def alone_in_processes(lines: list[str], procs: int, seconds: float, *, server_settings: bool) -> tuple[float, float]:
    """(receipts/s wall, receipts per CPU-second) of the verification alone in `procs` fresh
    processes at once (spawned, so nothing of this process's heap comes along), with the C
    libraries' defaults or the server's process settings."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(procs, mp_context=context, initializer=_init_child, initargs=(server_settings,)) as pool:
        list(pool.map(_verify_for, [(lines[:4], 0.2)] * procs))  # warm: imports, first calls
        began = time.perf_counter()
        results = list(pool.map(_verify_for, [(lines, seconds)] * procs))
        wall = time.perf_counter() - began
    done, cpu = sum(r[0] for r in results), sum(r[1] for r in results)
    return done / wall, done / cpu


def _request(host: str, port: int, body: bytes, path: str = "/verify") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def split_answer(buffer: bytearray) -> tuple[int, bytes] | None:
    """The first whole answer in `buffer` (status, body), taken out of it; None until all of
    it has arrived."""
    head_end = buffer.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    head = bytes(buffer[:head_end])
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
    end = head_end + 4 + length
    if len(buffer) < end:
        return None
    body = bytes(buffer[head_end + 4:end])
    del buffer[:end]
    return int(head.split(b" ", 2)[1]), body


def _read_answer(sock: socket.socket, buffer: bytearray) -> tuple[int, bytes]:
    while (answer := split_answer(buffer)) is None:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buffer += chunk
    return answer


def _drive(server: subprocess.Popen, host: str, port: int, bodies: list[bytes], clients: int, seconds: float,
           counted: bytes = b'"duplicate":false', again: bool = False) -> dict[str, float]:
    """Post each body once (`again`: round and round) from `clients` keep-alive connections
    for `seconds`; a 200 whose answer holds `counted` counts. Throughput and the server's CPU
    (its worker processes too)."""
    requests_ = [_request(host, port, body) for body in bodies]
    lock = threading.Lock()
    cursor = itertools.cycle(range(len(requests_))) if again else iter(range(len(requests_)))
    counts, errors = [0] * clients, [0] * clients
    stop = threading.Event()

    def client(index: int) -> None:
        sock = socket.create_connection((host, port))
        buffer = bytearray()
        while not stop.is_set():
            with lock:
                i = next(cursor, None)
            if i is None:
                return
            sock.sendall(requests_[i])
            status, body = _read_answer(sock, buffer)
            if status == 200 and counted in body:
                counts[index] += 1
            else:
                errors[index] += 1
        sock.close()

    cpu0, wall0, mine0 = tree_cpu(server.pid), time.perf_counter(), time.process_time()
    pool = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in pool:
        thread.start()
    stop.wait(seconds)
    stop.set()
    for thread in pool:
        thread.join()
    wall, cpu = time.perf_counter() - wall0, tree_cpu(server.pid) - cpu0
    clients_cpu = time.process_time() - mine0
    total = sum(counts)
    if total >= len(bodies) and not again:
        print(f"  note: all {len(bodies)} receipts were used before {seconds}s; make more for a longer window")
    return {"receipts": total, "wall": wall, "per_s": total / wall, "cpu": cpu, "per_core": total / cpu,
            "errors": sum(errors), "clients_cpu": clients_cpu}


def _started(command: list[str]) -> tuple[subprocess.Popen, str, int]:
    """A server subprocess that prints `serving on http://HOST:PORT` on stderr first."""
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert server.stderr is not None
    stderr = server.stderr
    line = stderr.readline()
    if "serving on " not in line:
        server.kill()
        raise RuntimeError(f"the server did not start: {line!r}")
    base = line.split("serving on ", 1)[1].split()[0]
    host, port = base.removeprefix("http://").rsplit(":", 1)
    threading.Thread(target=lambda: [None for _ in stderr], daemon=True).start()
    time.sleep(1.0)  # the workers start
    return server, host, int(port)


def through_http(bodies: list[bytes], workers: int, clients: int, seconds: float, threads: int,
                 db: str | None = None, extra: tuple[str, ...] = ()) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        server, host, port = _started([sys.executable, "-m", "tops_job.cli", "aggregator", "serve", "--port", "0",
                                       "--db", db or f"{tmp}/agg.sqlite3", "--accept", "both", "--threads", str(threads),
                                       "--workers", str(workers), *extra])
        try:
            return _drive(server, host, port, bodies, clients, seconds)
        finally:
            server.terminate()
            server.wait(15)


# ---- --decompose: where one receipt's CPU goes

def serve_body_reader(threads: int) -> None:
    """The aggregator's HTTP server (serve.make_server, its options, its process settings)
    around an app that reads the body and answers a fixed 200: what HTTP alone costs."""
    from tops_job.aggregator import serve

    serve.tune_process()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        answer = b'{"ok":true,"duplicate":false}'
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(answer)))])
        return [answer]

    sock = serve.bind("127.0.0.1", 0)
    server = serve.make_server(app, sock, threads=threads, limit=serve.connection_limit(None, threads), header_timeout=10.0,
                               body_timeout=30.0, idle_timeout=60, max_request_body_size=1 << 24)
    print(f"serving on http://127.0.0.1:{sock.getsockname()[1]}", file=sys.stderr, flush=True)
    server.run()


def _stages(lines: list[str], keep_openings: bool = False) -> dict[str, float]:
    """CPU milliseconds per receipt, in this (fresh, spawned) process with the server's
    process settings: the JSON parse, the verification, and the aggregator's WSGI app
    called directly on one thread (its store's commit thread apart)."""
    import io

    from tops_job.aggregator.group_commit import GroupCommitStore
    from tops_job.aggregator.metrics import AggregatorMetrics
    from tops_job.aggregator.serve import tune_process
    from tops_job.aggregator.service import Settings, build_app, open_store
    from tops_job.spec.receipt import parse_json
    from tops_job.spec.verify import verify_receipt

    tune_process()
    half = len(lines) // 2
    began = time.process_time()
    receipts = [parse_json(line) for line in lines[:half]]
    parse_ms = (time.process_time() - began) / half * 1e3
    for receipt in receipts[:10]:
        verify_receipt(receipt)
    began = time.process_time()
    for receipt in receipts:
        verify_receipt(receipt)
    verify_ms = (time.process_time() - began) / half * 1e3
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(db=f"{tmp}/agg.sqlite3", accept="both", keep_openings=keep_openings)
        store = GroupCommitStore(open_store(settings.db))
        app, _gate = build_app(settings, store, AggregatorMetrics())

        def post(line: str) -> None:
            body = line.encode()
            statuses: list[str] = []
            environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/verify", "CONTENT_TYPE": "application/json",
                       "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body), "REMOTE_ADDR": "127.0.0.1"}
            b"".join(app(environ, lambda status, headers: statuses.append(status)))
            if not statuses[0].startswith("200"):
                raise RuntimeError(f"the app answered {statuses[0]}")

        for line in lines[half:half + 10]:
            post(line)
        rest = lines[half + 10:]
        process, thread = time.process_time(), time.thread_time()
        for line in rest:
            post(line)
        app_ms = (time.process_time() - process) / len(rest) * 1e3
        request_thread_ms = (time.thread_time() - thread) / len(rest) * 1e3
        store.close()
    return {"parse": parse_ms, "verify": verify_ms, "app": app_ms, "app_request_thread": request_thread_ms}


def decompose(lines: list[str], bodies: list[bytes], clients: int, seconds: float, threads: int,
              extra: tuple[str, ...] = ()) -> None:
    import multiprocessing

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        stages = pool.submit(_stages, lines[:1200], "--keep-openings" in extra).result()
    echo, host, port = _started([sys.executable, str(Path(__file__).resolve()), "--serve-body-reader",
                                 "--threads", str(threads)])
    try:
        http = _drive(echo, host, port, bodies, clients, seconds, again=True)
    finally:
        echo.terminate()
        echo.wait(15)
    whole = through_http(bodies, 1, clients, seconds, threads, extra=extra)
    http_ms, whole_ms = http["cpu"] / http["receipts"] * 1e3, whole["cpu"] / whole["receipts"] * 1e3
    parts = stages["app"] + http_ms
    rows = [
        ("verification alone (verify_receipt, server's process settings)", stages["verify"]),
        ("parsing the body (parse_json)", stages["parse"]),
        ("the aggregator's app called in-process, one request at a time", stages["app"]),
        ("  of which the request's own thread (parse, checks, verification, answer)", stages["app_request_thread"]),
        ("  of which the store's commit thread (SQLite, fsync)", stages["app"] - stages["app_request_thread"]),
        (f"waitress ({threads} threads) around an app that only reads the body", http_ms),
        (f"the whole server through HTTP, 1 worker, {clients} clients", whole_ms),
        ("  beyond the app in-process plus HTTP (threads, the GIL, caches)", whole_ms - parts),
    ]
    print("\nCPU per receipt (ms):")
    for what, ms in rows:
        print(f"  {what:<78} {ms:6.2f}")
    print(f"  verification alone / whole server: {stages['verify'] / whole_ms:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("receipts", type=Path, nargs="?")
    parser.add_argument("--make", type=int, help="sign this many receipts into --out and exit")
    parser.add_argument("--shape", default="16,1024,1024", help="m,n,k for --make")
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=Path("receipts.jsonl"))
    parser.add_argument("--workers", default="1,2", help="worker counts to measure, comma-separated")
    parser.add_argument("--clients", type=int, default=32,
                        help="keep-alive connections (SO_REUSEPORT hashes each to one worker: few split unevenly)")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=8, help="server threads per worker")
    parser.add_argument("--db", help="a postgresql:// DSN of an empty database per run (default: a fresh SQLite file)")
    parser.add_argument("--server-args", default="", help="more `aggregator serve` options, e.g. '--keep-openings'")
    parser.add_argument("--decompose", action="store_true", help="where one receipt's CPU goes (1 worker), then exit")
    parser.add_argument("--serve-body-reader", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_body_reader:
        serve_body_reader(args.threads)
        return
    if args.make:
        m, n, k = (int(x) for x in args.shape.split(","))
        make(args.make, (m, n, k), args.tile, args.out)
        return
    if args.receipts is None:
        parser.error("give a receipts file (or --make N)")
    lines = [line for line in args.receipts.read_text().splitlines() if line.strip()]
    bodies = [line.encode() for line in lines]
    head = json.loads(lines[0])
    shape = {k: head[k] for k in ("m", "n", "k", "tile", "opens")}
    print(f"{len(bodies)} receipts, shape {shape}, {sum(map(len, bodies)) // len(bodies)} bytes each, {os.cpu_count()} cores")
    if args.decompose:
        decompose(lines, bodies, args.clients, args.seconds, args.threads, tuple(args.server_args.split()))
        return
    results = {}
    sample = lines[:200]
    for workers in (int(w) for w in args.workers.split(",")):
        seconds = min(args.seconds, 3.0)
        _, library = alone_in_processes(sample, workers, seconds, server_settings=False)
        wall, tuned = alone_in_processes(sample, workers, seconds, server_settings=True)
        print(f"verification alone in {workers} process(es): {library:.0f} receipts/s per core with the libraries'"
              f" defaults, {tuned:.0f} with the server's process settings ({wall:.0f} receipts/s wall)")
        r = through_http(bodies, workers, args.clients, args.seconds, args.threads, args.db, tuple(args.server_args.split()))
        results[workers] = r
        print(f"HTTP, {workers} worker(s), {args.clients} clients: {r['receipts']} verified in {r['wall']:.1f}s ="
              f" {r['per_s']:.0f} receipts/s; server CPU {r['cpu']:.1f}s = {r['per_core']:.0f} receipts/s per core,"
              f" {r['cpu'] / max(1, r['receipts']) * 1e3:.2f} ms each: {r['per_core'] / tuned:.2f} of the verification"
              f" alone with the server's process settings, {r['per_core'] / library:.2f} with the libraries' defaults;"
              f" {r['per_s'] / wall:.2f} of its wall throughput; {r['errors']} errors; the clients used"
              f" {r['clients_cpu']:.1f} CPU-s")
    if 1 in results and len(results) > 1:
        for workers, r in results.items():
            if workers != 1:
                print(f"{workers} workers / 1 worker: {r['per_s'] / results[1]['per_s']:.2f}x receipts/s")


if __name__ == "__main__":
    main()
