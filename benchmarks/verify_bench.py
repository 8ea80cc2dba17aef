"""`tops-job verify` over a file of receipts against the raw library in a plain process.

    python benchmarks/aggregator_bench.py --make 300 --shape 16,3392,3392 --tile 3392 --out big.jsonl
    python benchmarks/verify_bench.py big.jsonl --rounds 3

Each round runs, in fresh processes one after the other: the CLI (`tops-job verify FILE`),
and a plain loop of `parse_json` + `verify_any` over the same lines with the C library's
allocator defaults (what a program using the library gets). Printed: CPU seconds (user and
system) of each, and the CLI's time over the raw loop's. Interpreter start and imports are
measured apart (`verify` of the file's first line) and subtracted from both.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

RAW_LOOP = """
import sys
from tops_job.spec.any_receipt import verify_any
from tops_job.spec.v2 import parse_json
for line in open(sys.argv[1], encoding="utf-8"):
    if line.strip():
        verify_any(parse_json(line))
"""


def _child_cpu(command: list[str]) -> tuple[float, float]:
    """(user, system) CPU seconds of `command`, run to completion."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("receipts", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    lines = [line for line in args.receipts.read_text().splitlines() if line.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        first = Path(tmp) / "first.jsonl"
        first.write_text(lines[0] + "\n")
        cli = [sys.executable, "-m", "tops_job.cli", "verify"]
        raw = [sys.executable, "-c", RAW_LOOP]
        rows = []
        for _ in range(args.rounds):
            start_cli, start_raw = sum(_child_cpu(cli + [str(first)])), sum(_child_cpu(raw + [str(first)]))
            cli_user, cli_sys = _child_cpu(cli + [str(args.receipts)])
            raw_user, raw_sys = _child_cpu(raw + [str(args.receipts)])
            rows.append((cli_user, cli_sys, raw_user, raw_sys,
                         (cli_user + cli_sys - start_cli) / (raw_user + raw_sys - start_raw)))
    size = sum(map(len, lines)) // len(lines)
    print(f"{len(lines)} receipts of {size} bytes; CPU seconds (user + system), start-up subtracted in the ratio")
    print("| round | tops-job verify | raw library loop | verify / raw |")
    print("|---|---|---|---|")
    for i, (cu, cs, ru, rs, ratio) in enumerate(rows):
        print(f"| {i} | {cu:.2f} + {cs:.2f} | {ru:.2f} + {rs:.2f} | {ratio:.2f} |")
    print(f"median verify / raw: {statistics.median(r[4] for r in rows):.2f}")


if __name__ == "__main__":
    main()
