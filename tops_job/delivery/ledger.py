"""The local ledger: receipts verified in-process and appended as JSON lines.

Used when no AGGREGATOR_URL is set, so a lone machine still checks every receipt it makes.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from tops_job.delivery.outcomes import Outcome, SubmitResult
from tops_job.errors import ReceiptInvalid, StorageError
from tops_job.spec.verify import verify_receipt


class LedgerSubmitter:
    name = "ledger"

    def __init__(self, path: Path, *, min_opens: int = 16):
        self.path = path
        self.min_opens = min_opens
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(path, "a", encoding="ascii")
        except OSError as exc:
            raise StorageError(f"cannot open ledger {path}: {exc.strerror or exc}", exc) from None

    def submit(self, receipt: dict[str, Any], digest: bytes) -> SubmitResult:
        try:
            verified = verify_receipt(receipt, min_opens=self.min_opens)
        except ReceiptInvalid as exc:
            return SubmitResult(Outcome.REJECTED, status=422, error=exc.code,
                                response={"ok": False, "error": exc.code, "detail": exc.detail})
        key = verified.digest.hex()
        with self._lock:
            if key in self._seen:
                return SubmitResult(Outcome.DUPLICATE, status=200, response=verified.response(duplicate=True))
            entry = {"digest_hex": key, "verified_ms": int(time.time() * 1000), "receipt": receipt}
            try:
                self._handle.write(json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n")
                self._handle.flush()
                os.fsync(self._handle.fileno())
            except OSError as exc:
                raise StorageError(f"cannot append to ledger {self.path}: {exc.strerror or exc}", exc) from None
            self._seen.add(key)
        return SubmitResult(Outcome.ACCEPTED, status=200, response=verified.response())

    def close(self) -> None:
        self._handle.close()
