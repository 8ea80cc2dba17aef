"""tops-receipt/2 writes per second: concurrent request threads each recording a commitment,
then its verdict, as `/v2/exchange` does, in transactions of their own against the server's
group commit (group_commit.py), on the same database file in the same run.

    python benchmarks/v2_store_bench.py --dir /var/tmp --threads 16 --seconds 3

Every write is durable before it returns (SQLite synchronous=FULL), so with one transaction a
write the file's fsync bounds the writes per second whatever the cores; --dir picks the disk.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tops_job.aggregator.group_commit import GroupCommitStore  # noqa: E402
from tops_job.aggregator.store_pg import open_store  # noqa: E402
from tops_job.aggregator.v2_store import ACCEPTED, V2Store  # noqa: E402


def fsync_ms(directory: str) -> float:
    fd, path = tempfile.mkstemp(dir=directory)
    try:
        began = time.perf_counter()
        for _ in range(100):
            os.write(fd, b"x" * 4096)
            os.fsync(fd)
        return (time.perf_counter() - began) * 10
    finally:
        os.close(fd)
        os.unlink(path)


def attempts_per_second(directory: str, threads: int, seconds: float, grouped: bool) -> float:
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        opened = open_store(f"{tmp}/agg.sqlite3")
        store: Any = GroupCommitStore(opened) if grouped else opened
        v2 = V2Store(store)
        done = [0] * threads
        deadline = time.monotonic() + seconds

        def worker(index: int) -> None:
            n = 0
            while time.monotonic() < deadline:
                digest = f"{index:08x}{n:056x}"
                v2.add_commitment(digest=digest, pubkey="02" + "ab" * 32, did=f"did:bench:{index}", nonce=digest,
                                  run_id=f"run-{index}", attempt=n, ops=1 << 30, challenge="c" * 64, s=64,
                                  leaves=list(range(64)), now_ms=1, ttl_ms=1 << 40, commitment="{}")
                assert v2.set_verdict(digest, ACCEPTED, now_ms=2, clock_epoch="boot:x", clock_ms=3) == ACCEPTED
                n += 1
            done[index] = n

        began = time.monotonic()
        pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
        elapsed = time.monotonic() - began
        store.close()
        return sum(done) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the database file is made")
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    print(f"fsync of 4 KiB in {args.dir}: {fsync_ms(args.dir):.2f} ms; {args.threads} threads, {args.seconds:g} s each")
    own = attempts_per_second(args.dir, args.threads, args.seconds, grouped=False)
    grouped = attempts_per_second(args.dir, args.threads, args.seconds, grouped=True)
    print("| writes | attempts/s (commitment + verdict) | ratio |")
    print("|---|---|---|")
    print(f"| a transaction each | {own:.0f} | 1.00 |")
    print(f"| group commit | {grouped:.0f} | {grouped / own:.2f} |")


if __name__ == "__main__":
    main()
