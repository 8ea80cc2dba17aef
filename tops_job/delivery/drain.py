"""The outbox without a run: list what it holds, or deliver it (`tops-job outbox [send]`).

`send_outbox` is `run`'s delivery without attempts: after an outage, from cron, or on a
machine whose worker has stopped. It claims each entry like a run does, so it can run beside
live workers on the same outbox without sending anything twice, and it ends with `run`'s
exit codes (0 all delivered, 3 some still pending, 4 some rejected, 130/143 on a signal).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tops_job.delivery.outbox import is_entry_name, rejected_entries
from tops_job.delivery.protocol import DeliveryReport
from tops_job.errors import ExitCode


def list_outbox(path: Path) -> dict[str, Any]:
    """What `path` holds: pending entries (oldest first), rejected ones with the answers, how
    many a run's self-audit holds, and those that failed it (withheld, with the reason).
    Reads only; creates nothing."""
    pending = []
    now = time.time()
    if path.is_dir():
        for item in sorted(path.iterdir(), key=_mtime):
            if not is_entry_name(item.name) or not item.is_file() or item.is_symlink():
                continue
            digest = item.name[:-5]
            pending.append({"digest": digest, **_receipt_fields(item), "age_s": round(max(0.0, now - _mtime(item)), 1),
                            "last_answer": _answer(path / "answers" / f"{digest}.json")})
    rejected = [{"digest": digest, **_receipt_fields(path / "rejected" / f"{digest}.json"), "answer": answer}
                for digest, answer in rejected_entries(path / "rejected")]
    quarantined = sorted(p.name for p in (path / "quarantine").iterdir()) if (path / "quarantine").is_dir() else []
    held = sum(1 for _ in (path / "held").glob("*.json")) if (path / "held").is_dir() else 0
    withheld = [{"digest": item.name[:-5], **_receipt_fields(item),
                 "reason": (_answer(path / "withheld" / f"{item.name[:-5]}.reason.json") or {}).get("reason")}
                for item in sorted((path / "withheld").glob("*.json")) if is_entry_name(item.name)] \
        if (path / "withheld").is_dir() else []
    return {"outbox": str(path), "pending": pending, "rejected": rejected, "quarantined": quarantined,
            "held_for_self_audit": held, "withheld": withheld}


def _answer(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _mtime(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except OSError:
        return 0.0


def _receipt_fields(path: Path) -> dict[str, Any]:
    try:
        receipt = json.loads(path.read_text(encoding="utf-8"))
        return {"run_id": receipt.get("run_id"), "attempt": receipt.get("attempt"), "did": receipt.get("did")}
    except (OSError, ValueError, AttributeError):
        return {"unreadable": True}


def exit_code_for(report: DeliveryReport, stop_reason: str | None) -> ExitCode:
    """`run`'s exit codes, for a delivery without attempts."""
    if stop_reason == "SIGTERM":
        return ExitCode.TERMINATED
    if stop_reason == "SIGINT":
        return ExitCode.INTERRUPTED
    if report.rejected:
        return ExitCode.REJECTED
    if report.pending:
        return ExitCode.PENDING
    return ExitCode.OK


def send_outbox(config: Any, submitter: Any, stop: Any, on_receipt: Any = None,
                store: Any = None) -> tuple[ExitCode, DeliveryReport]:
    """Deliver what the outbox holds (`store`, a ReceiptStore; the directory
    TOPS_JOB_OUTBOX_DIR when None), within `config.drain_timeout` seconds."""
    from tops_job.delivery.sender import OutboxDelivery

    delivery = OutboxDelivery.from_config(config, submitter, on_receipt or (lambda event: None), stop=stop,
                                          store=store)
    delivery.start()
    report = delivery.finish(config.drain_timeout)
    return exit_code_for(report, stop.reason), report
