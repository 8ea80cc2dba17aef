"""Run statistics: counters and timings that the summary, metrics and dashboard read."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np


@dataclass
class RunStats:
    started: float = field(default_factory=time.time)  # wall clock, for the summary's started_at only
    started_monotonic: float = field(default_factory=time.monotonic)  # durations and rates: never steps
    attempts_ok: int = 0
    attempts_failed: int = 0
    attempts_by_error: Counter = field(default_factory=Counter)
    receipts: Counter = field(default_factory=Counter)  # by Outcome value
    product_ns: list[int] = field(default_factory=list)
    wall_ns: list[int] = field(default_factory=list)
    stage_ns: Counter = field(default_factory=Counter)
    ops: int = 0
    throttled: int = 0  # attempts whose device reported throttling during the product
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record_attempt(self, product_ns: int, wall_ns: int, stages: dict[str, int], ops: int,
                       throttled: bool = False) -> None:
        with self._lock:
            self.attempts_ok += 1
            self.throttled += int(throttled)
            self.product_ns.append(product_ns)
            self.wall_ns.append(wall_ns)
            self.stage_ns.update(stages)
            self.ops += ops

    def record_failure(self, error_class: str) -> None:
        with self._lock:
            self.attempts_failed += 1
            self.attempts_by_error[error_class] += 1

    def record_receipt(self, outcome: str) -> None:
        with self._lock:
            self.receipts[outcome] += 1

    @property
    def attempts(self) -> int:
        return self.attempts_ok + self.attempts_failed

    def timings(self) -> dict:
        """Product and attempt timing summary in milliseconds, and throughput."""
        with self._lock:
            product = np.array(self.product_ns, dtype=np.float64) / 1e6
            wall = np.array(self.wall_ns, dtype=np.float64) / 1e6
            stages = dict(self.stage_ns)
            ops = self.ops
        if not product.size:
            return {"product_ms": None, "attempt_ms": None, "stages_ms_mean": {}, "gflops_product": None,
                    "gflops_attempt": None, "duty_cycle": None}

        def dist(values: np.ndarray) -> dict:
            return {"mean": round(float(values.mean()), 3), "p50": round(float(np.percentile(values, 50)), 3),
                    "p95": round(float(np.percentile(values, 95)), 3), "min": round(float(values.min()), 3),
                    "max": round(float(values.max()), 3)}

        return {
            "product_ms": dist(product),
            "attempt_ms": dist(wall),
            "stages_ms_mean": {name: round(total / 1e6 / product.size, 3) for name, total in stages.items()},
            "gflops_product": round(ops / (product.sum() / 1e3) / 1e9, 3),
            "gflops_attempt": round(ops / (wall.sum() / 1e3) / 1e9, 3),
            "duty_cycle": round(float(product.sum() / wall.sum()), 4),
        }
