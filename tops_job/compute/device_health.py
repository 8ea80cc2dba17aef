"""Device health from NVML: ECC error counters, retired pages, remapped rows and Xid events.

What operators run DCGM diagnostics for, read around the run: `read()` before and after,
`changes(before, after)` for the summary and metrics, and `poll()` after each attempt for the
receipt's telemetry and to flag the attempt for the self-audit. Every reading is optional:
a card or driver without a counter simply leaves it out. All values are ints.

Readings (keys):
- ecc_corrected, ecc_uncorrected: volatile ECC error counts since the driver loaded
- retired_pages_sbe, retired_pages_dbe, retired_pages_pending: page retirement (pre-Hopper)
- remapped_rows_correctable, remapped_rows_uncorrectable, remapped_rows_pending,
  remapped_rows_failure: row remapping (A100 and later)
- xid_events: critical Xid events seen (counted by `poll`), xid_last: the last Xid code
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("tops_job.device")

NVML_MEMORY_ERROR_TYPE_CORRECTED, NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 0, 1
NVML_VOLATILE_ECC = 0
NVML_PAGE_RETIREMENT_CAUSE_SBE, NVML_PAGE_RETIREMENT_CAUSE_DBE = 0, 1
NVML_EVENT_TYPE_XID_CRITICAL_ERROR = 0x8
# Changes in these mean the card's memory or the card itself is failing: an attempt during
# which one moves is audited, and the summary warns.
BAD_CHANGES = ("ecc_uncorrected", "retired_pages_dbe", "remapped_rows_uncorrectable", "remapped_rows_failure",
               "xid_events")


class DeviceHealth:
    def __init__(self, nvml: Any, handle: Any):
        self._nvml, self._handle = nvml, handle
        self.xid_events = 0
        self.xid_last = 0
        self._events = None
        try:
            self._events = nvml.nvmlEventSetCreate()
            nvml.nvmlDeviceRegisterEvents(handle, NVML_EVENT_TYPE_XID_CRITICAL_ERROR, self._events)
        except Exception:  # not supported (some virtualised GPUs): no Xid readings
            self._events = None

    def _call(self, name: str, *args: Any) -> Any:
        fn = getattr(self._nvml, name, None)
        if fn is None:
            return None
        try:
            return fn(self._handle, *args)
        except Exception:
            return None

    def read(self) -> dict[str, int]:
        """The counters now (Xid events polled first)."""
        self.poll_xids()
        out: dict[str, int] = {}
        for key, kind in (("ecc_corrected", NVML_MEMORY_ERROR_TYPE_CORRECTED),
                          ("ecc_uncorrected", NVML_MEMORY_ERROR_TYPE_UNCORRECTED)):
            value = self._call("nvmlDeviceGetTotalEccErrors", kind, NVML_VOLATILE_ECC)
            if value is not None:
                out[key] = int(value)
        for key, cause in (("retired_pages_sbe", NVML_PAGE_RETIREMENT_CAUSE_SBE),
                           ("retired_pages_dbe", NVML_PAGE_RETIREMENT_CAUSE_DBE)):
            pages = self._call("nvmlDeviceGetRetiredPages", cause)
            if pages is not None:
                out[key] = len(pages)
        pending = self._call("nvmlDeviceGetRetiredPagesPendingStatus")
        if pending is not None:
            out["retired_pages_pending"] = int(pending)
        rows = self._call("nvmlDeviceGetRemappedRows")
        if rows is not None and len(rows) >= 4:
            for key, value in zip(("remapped_rows_correctable", "remapped_rows_uncorrectable",
                                   "remapped_rows_pending", "remapped_rows_failure"), rows):
                out[key] = int(value)
        if self._events is not None:
            out["xid_events"], out["xid_last"] = self.xid_events, self.xid_last
        return out

    def poll_xids(self) -> int:
        """Count the critical Xid events waiting (never blocks); returns how many were new."""
        if self._events is None:
            return 0
        new = 0
        while True:
            try:
                data = self._nvml.nvmlEventSetWait_v2(self._events, 0)
            except Exception:  # NVMLError_Timeout: none waiting
                return new
            new += 1
            self.xid_events += 1
            self.xid_last = int(getattr(data, "eventData", 0) or 0)
            log.error("[device] Xid %d reported by the driver", self.xid_last)

    def close(self) -> None:
        if self._events is not None:
            try:
                self._nvml.nvmlEventSetFree(self._events)
            except Exception:
                pass
            self._events = None


def changes(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Counters that moved between two readings (after − before; pending/failure flags as is)."""
    out = {}
    for key, value in after.items():
        if key == "xid_last":
            continue
        delta = value - before.get(key, 0)
        if delta:
            out[key] = delta
    if out.get("xid_events"):
        out["xid_last"] = after.get("xid_last", 0)
    return out


def is_bad(delta: dict[str, int]) -> bool:
    """True when a change means failing memory or a faulting card."""
    return any(delta.get(key, 0) > 0 for key in BAD_CHANGES)
