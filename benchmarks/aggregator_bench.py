"""Aggregator throughput: receipts verified per second per core, through the HTTP server
with concurrent clients, and the verification alone in-process.

    tops-job run --size 2816 --attempts 20 --receipts-out r.jsonl   # autotuned-size CPU receipts
    python benchmarks/aggregator_bench.py r.jsonl --clients 4 --seconds 15

The receipts are sent round and round: the first send of each is accepted, later ones are
answered `duplicate: true` after the same full verification, so every request costs one
verification. Per core = requests / CPU seconds the server process used.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def in_process(receipts: list[dict], seconds: float) -> float:
    from tops_job.spec.verify import verify_receipt

    done, began = 0, time.process_time()
    wall = time.perf_counter()
    while time.perf_counter() - wall < seconds:
        verify_receipt(receipts[done % len(receipts)])
        done += 1
    return done / (time.process_time() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("receipts", type=Path)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--threads", type=int, default=4, help="server threads")
    args = parser.parse_args()
    lines = [line for line in args.receipts.read_text().splitlines() if line.strip()]
    receipts = [json.loads(line) for line in lines]
    bodies = [line.encode() for line in lines]
    shape = {k: receipts[0][k] for k in ("m", "n", "k", "tile", "opens")}
    print(f"{len(bodies)} receipts, shape {shape}, {sum(map(len, bodies)) // len(bodies)} bytes each")

    print(f"verification in-process: {in_process(receipts, min(args.seconds, 5.0)):.0f} receipts/s per core")

    with tempfile.TemporaryDirectory() as tmp:
        server = subprocess.Popen([sys.executable, "-m", "tops_job.cli", "aggregator", "serve", "--port", "0",
                                   "--db", f"{tmp}/agg.sqlite3", "--threads", str(args.threads)],
                                  stderr=subprocess.PIPE, text=True)
        try:
            line = server.stderr.readline()
            base = line.split("serving on ", 1)[1].split()[0]
            threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()
            counts = [0] * args.clients
            errors = [0] * args.clients
            stop = threading.Event()

            def client(index: int) -> None:
                session = requests.Session()
                i = index
                while not stop.is_set():
                    answer = session.post(f"{base}/verify", data=bodies[i % len(bodies)],
                                          headers={"Content-Type": "application/json"}, timeout=60)
                    if answer.status_code == 200:
                        counts[index] += 1
                    else:
                        errors[index] += 1
                    i += 1

            cpu0, wall0 = cpu_seconds(server.pid), time.perf_counter()
            threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
            for thread in threads:
                thread.start()
            time.sleep(args.seconds)
            stop.set()
            for thread in threads:
                thread.join()
            wall, cpu = time.perf_counter() - wall0, cpu_seconds(server.pid) - cpu0
            total = sum(counts)
            print(f"HTTP, {args.clients} clients, {args.threads} server threads: {total} verified in {wall:.1f}s = "
                  f"{total / wall:.0f} receipts/s; server CPU {cpu:.1f}s = {total / cpu:.0f} receipts/s per core"
                  f" ({sum(errors)} errors)")
        finally:
            server.terminate()
            server.wait(10)


if __name__ == "__main__":
    main()
