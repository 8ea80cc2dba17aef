"""The local ledger: receipts verified in-process and appended as JSON lines.

Used when no AGGREGATOR_URL is set, so a lone machine still checks every receipt it makes.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from tops_job.appendlog import AppendLog
from tops_job.delivery.outcomes import Outcome, SubmitResult
from tops_job.errors import ReceiptInvalid
from tops_job.spec.v2 import Verified as VerifiedV2
from tops_job.spec.v2 import verify_fs_receipt
from tops_job.spec.verify import Verified, verify_receipt


class LedgerSubmitter:
    name = "ledger"

    def __init__(self, path: Path, *, min_opens: int = 16):
        self.path = path
        self.min_opens = min_opens
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        self._log = AppendLog(path, what="ledger")  # all-or-nothing appends, no symlinks followed

    def submit(self, receipt: dict[str, Any], digest: bytes) -> SubmitResult:
        try:
            verified: Verified | VerifiedV2
            if receipt.get("schema") == "tops-receipt/2":  # fiat-shamir: grinding-bounded, and says so
                verified = verify_fs_receipt(receipt)
            else:
                verified = verify_receipt(receipt, min_opens=self.min_opens)
        except ReceiptInvalid as exc:
            return SubmitResult(Outcome.REJECTED, status=422, error=exc.code,
                                response={"ok": False, "error": exc.code, "detail": exc.detail})
        key = verified.digest.hex()
        with self._lock:
            if key in self._seen:
                return SubmitResult(Outcome.DUPLICATE, status=200, response=verified.response(duplicate=True))
            entry = {"digest_hex": key, "verified_ms": int(time.time() * 1000), "receipt": receipt}
            self._log.append(json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n")  # StorageError
            self._seen.add(key)
        return SubmitResult(Outcome.ACCEPTED, status=200, response=verified.response())

    def close(self) -> None:
        self._log.close()
