"""Aggregator throughput: receipts verified per second through HTTP with 1 and N worker
processes, against the verification alone in-process.

    python benchmarks/aggregator_bench.py --make 3000 --shape 16,1024,1024 --tile 1024 --out r.jsonl
    python benchmarks/aggregator_bench.py r.jsonl --workers 1,2 --clients 8 --seconds 4

An aggregator answers a resend of an accepted receipt from its store without verifying it
again, so every receipt is posted once per server (a fresh database each): every request
costs one full verification. `--make` signs receipts with the spec's test key (in parallel,
one process per core). The clients are plain keep-alive sockets with prepared requests, so
they take little of the CPU the server is measured on. Per core = receipts / CPU seconds of
the server's processes.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

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


def in_process(receipts: list[dict], seconds: float) -> float:
    from tops_job.spec.verify import verify_receipt

    done, began = 0, time.process_time()
    wall = time.perf_counter()
    while time.perf_counter() - wall < seconds:
        verify_receipt(receipts[done % len(receipts)])
        done += 1
    return done / (time.process_time() - began)


def _verify_for(args: tuple[list[dict], float]) -> tuple[int, float]:
    """(receipts verified, CPU seconds of this process, its BLAS threads included)."""
    from tops_job.spec.verify import verify_receipt

    receipts, seconds = args
    done, wall, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - wall < seconds:
        verify_receipt(receipts[done % len(receipts)])
        done += 1
    return done, time.process_time() - cpu


def alone_in_processes(receipts: list[dict], procs: int, seconds: float) -> tuple[float, float]:
    """(receipts/s wall, receipts per CPU-second) of the verification alone in `procs`
    processes at once: what this machine gives right now to CPU-bound work in that many
    processes, and the per-core baseline at the same concurrency as the HTTP run."""
    with ProcessPoolExecutor(procs) as pool:
        list(pool.map(_verify_for, [(receipts[:4], 0.2)] * procs))  # warm: imports, first calls
        began = time.perf_counter()
        results = list(pool.map(_verify_for, [(receipts, seconds)] * procs))
        wall = time.perf_counter() - began
    done, cpu = sum(r[0] for r in results), sum(r[1] for r in results)
    return done / wall, done / cpu


def _request(host: str, port: int, body: bytes) -> bytes:
    return (f"POST /verify HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def _read_answer(sock: socket.socket, buffer: bytearray) -> tuple[int, bytes]:
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buffer += chunk
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        rest += chunk
    buffer[:] = rest[length:]
    return status, rest[:length]


def through_http(bodies: list[bytes], workers: int, clients: int, seconds: float, threads: int,
                 db: str | None = None) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        server = subprocess.Popen([sys.executable, "-m", "tops_job.cli", "aggregator", "serve", "--port", "0",
                                   "--db", db or f"{tmp}/agg.sqlite3", "--accept", "both", "--threads", str(threads), "--workers", str(workers)],
                                  stderr=subprocess.PIPE, text=True, env=env)
        try:
            line = server.stderr.readline()
            base = line.split("serving on ", 1)[1].split()[0]
            host, port = base.removeprefix("http://").rsplit(":", 1)
            threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()
            time.sleep(1.0)  # the workers start
            requests_ = [_request(host, int(port), body) for body in bodies]
            lock = threading.Lock()
            cursor = iter(range(len(requests_)))
            counts, errors = [0] * clients, [0] * clients
            stop = threading.Event()

            def client(index: int) -> None:
                sock = socket.create_connection((host, int(port)))
                buffer = bytearray()
                while not stop.is_set():
                    with lock:
                        i = next(cursor, None)
                    if i is None:
                        return
                    sock.sendall(requests_[i])
                    status, body = _read_answer(sock, buffer)
                    if status == 200 and b'"duplicate":false' in body:
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
            if total >= len(bodies):
                print(f"  note: all {len(bodies)} receipts were used before {seconds}s; make more for a longer window")
            return {"receipts": total, "wall": wall, "per_s": total / wall, "cpu": cpu, "per_core": total / cpu,
                    "errors": sum(errors), "clients_cpu": clients_cpu}
        finally:
            server.terminate()
            server.wait(15)


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
    args = parser.parse_args()
    if args.make:
        m, n, k = (int(x) for x in args.shape.split(","))
        make(args.make, (m, n, k), args.tile, args.out)
        return
    if args.receipts is None:
        parser.error("give a receipts file (or --make N)")
    lines = [line for line in args.receipts.read_text().splitlines() if line.strip()]
    receipts = [json.loads(line) for line in lines[:200]]
    bodies = [line.encode() for line in lines]
    shape = {k: receipts[0][k] for k in ("m", "n", "k", "tile", "opens")}
    print(f"{len(bodies)} receipts, shape {shape}, {sum(map(len, bodies)) // len(bodies)} bytes each, {os.cpu_count()} cores")
    alone = in_process(receipts, min(args.seconds, 5.0))
    print(f"verification in-process: {alone:.0f} receipts/s per core")
    results = {}
    for workers in (int(w) for w in args.workers.split(",")):
        parallel, parallel_per_core = alone_in_processes(receipts, workers, min(args.seconds, 3.0))
        r = through_http(bodies, workers, args.clients, args.seconds, args.threads, args.db)
        results[workers] = r
        print(f"HTTP, {workers} worker(s), {args.clients} clients: {r['receipts']} verified in {r['wall']:.1f}s ="
              f" {r['per_s']:.0f} receipts/s; server CPU {r['cpu']:.1f}s = {r['per_core']:.0f} receipts/s per core"
              f" ({r['per_core'] / alone:.2f} of verification alone in-process, {r['per_core'] / parallel_per_core:.2f}"
              f" of it in {workers} process(es) just before: {parallel_per_core:.0f}/core; {r['errors']} errors);"
              f" verification alone in {workers} process(es): {parallel:.0f} receipts/s wall"
              f" (HTTP reaches {r['per_s'] / parallel:.2f} of it); the clients used {r['clients_cpu']:.1f} CPU-s")
    if 1 in results and len(results) > 1:
        for workers, r in results.items():
            if workers != 1:
                print(f"{workers} workers / 1 worker: {r['per_s'] / results[1]['per_s']:.2f}x receipts/s")


if __name__ == "__main__":
    main()
