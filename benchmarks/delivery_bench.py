"""Does a slow aggregator slow the attempts? Attempts/s of `tops-job run` delivering to the
reference aggregator directly against the same run through a proxy that adds latency in front
of it (the background sender should hide it: target ratio ≥ 0.97), and, for scale, with no
aggregator at all (local ledger, which verifies every receipt in the attempt loop).

With tops-receipt/2 (the default) each attempt is a commitment; its challenge comes back on
the answer and the openings ride with a later commitment, so no round trip is waited for.

    python benchmarks/delivery_bench.py --size 1024 --attempts 30 --latency 0.2

Attempts/s is taken from the receipts' own start times (first to last attempt), so the end
of run drain is not counted against the compute loop.
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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

CLI = [sys.executable, "-m", "tops_job.cli"]


def latency_proxy(upstream: str, latency: float) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _relay(self, answer: requests.Response) -> None:
            self.send_response(answer.status_code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer.content)))
            self.end_headers()
            self.wfile.write(answer.content)

        def do_GET(self):
            time.sleep(latency)
            self._relay(requests.get(upstream + self.path, timeout=30))

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            time.sleep(latency)
            self._relay(requests.post(upstream + self.path, data=body, timeout=30,
                                      headers={"Content-Type": "application/json"}))

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def attempts_per_second(receipts: Path) -> tuple[float, int]:
    started = sorted(json.loads(line)["started_ms"] for line in receipts.read_text().splitlines() if line.strip())
    return (len(started) - 1) / ((started[-1] - started[0]) / 1000), len(started)


def run(tmp: Path, name: str, args: argparse.Namespace, url: str | None) -> dict:
    env = dict(os.environ, TOPS_JOB_DATA_DIR=str(tmp / "data"), TOPS_JOB_CONFIG_DIR=str(tmp / "config"),
               TOPS_JOB_CACHE_DIR=str(tmp / "cache"), TOPS_JOB_OUTBOX_DIR=str(tmp / f"outbox-{name}"))
    env.pop("AGGREGATOR_URL", None)
    env["TOPS_JOB_PROTOCOL"] = args.protocol
    command = [*CLI, "run", "--size", str(args.size), "--attempts", str(args.attempts),
               "--receipts-out", str(tmp / f"{name}.jsonl"), "--summary", str(tmp / f"{name}.json"),
               "--drain-timeout", "120"]
    if url:
        command += ["--aggregator-url", url]
    began = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - began
    if result.returncode != 0:
        raise SystemExit(f"{name}: exit {result.returncode}\n{result.stderr[-2000:]}")
    rate, count = attempts_per_second(tmp / f"{name}.jsonl")
    summary = json.loads((tmp / f"{name}.json").read_text())
    print(f"{name:>22}: {rate:6.2f} attempts/s over {count} attempts (wall {wall:.1f}s incl. drain; "
          f"receipts {summary['receipts']})")
    return {"rate": rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--attempts", type=int, default=30)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--rounds", type=int, default=2, help="alternate the setups this many times")
    parser.add_argument("--protocol", choices=["v1", "v2"], default="v2")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        server = subprocess.Popen([*CLI, "aggregator", "serve", "--port", "0", "--db", str(tmp / "agg.sqlite3"),
                                   "--accept", "both"],
                                  stderr=subprocess.PIPE, text=True)
        try:
            base = server.stderr.readline().split("serving on ", 1)[1].split()[0]
            threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()
            proxy = latency_proxy(base, args.latency)
            url = f"http://127.0.0.1:{proxy.server_address[1]}/verify"
            ledger, direct, slow = [], [], []
            for round_ in range(args.rounds):
                ledger.append(run(tmp, f"no-aggregator-{round_}", args, None)["rate"])
                direct.append(run(tmp, f"0ms-aggregator-{round_}", args, base + "/verify")["rate"])
                slow.append(run(tmp, f"{int(args.latency * 1000)}ms-aggregator-{round_}", args, url)["rate"])
            a, d, b = (sum(x) / len(x) for x in (ledger, direct, slow))
            ms = int(args.latency * 1000)
            print(f"mean ({args.protocol}): no aggregator {a:.2f}/s, aggregator {d:.2f}/s, {ms} ms aggregator "
                  f"{b:.2f}/s; ratio {ms} ms / 0 ms {b / d:.3f}, {ms} ms / no aggregator {b / a:.3f}")
        finally:
            server.terminate()
            server.wait(10)


if __name__ == "__main__":
    main()
