"""The v2 outbox: every attempt's commitment, challenge and openings on disk from signing to
verdict (docs/spec/receipt-v2.md §9.2).

Layout, beside the v1 entries, in `<outbox>/v2/`:

    <digest>.leaves            leaf hashes, 32 bytes each (challenge mode): what opening needs
    <digest>.held              the worker's self-audit holds it (the holding run's pid inside):
                               nothing of it is sent until the audit verifies it (the
                               marker goes); a dead run's marker goes at the next `recover`,
                               which logs that the attempt was never audited
    <digest>.commit.json       the signed commitment; its presence is the attempt's life
    <digest>.challenge.json    the aggregator's drawn leaves, once answered
    <digest>.opened.json       the opened set, once computed
    done/<digest>.json         a verdict (accepted, rejected, expired) with the answer
    withheld/<digest>.*        an attempt that failed the self-audit (commitment, leaves, and
                               reason.json): never sent
    .lock                      held (flock) by the run that drains this directory

Every file is written durably (temp file, fsync, rename, fsync the directory), and the
commitment last of the attempt's first two, so a commitment on disk always has its leaves.
A commitment leaves only after its verdict is written to `done/`: kill -9 anywhere and the
next run resends what is pending; the aggregator answers a resent commitment with the same
challenge and a resent opened set with the recorded verdict, so nothing is counted twice.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from tops_job.atomic import fsync_dir, write_atomic
from tops_job.delivery.backend import AWAITING_CHALLENGE, AWAITING_VERDICT, CHALLENGED
from tops_job.delivery.outbox import another_live_process
from tops_job.errors import StorageError

log = logging.getLogger("tops_job.outbox")

SIGNED, CHALLENGED, OPENED = AWAITING_CHALLENGE, CHALLENGED, AWAITING_VERDICT
_COMMIT = re.compile(r"([0-9a-f]{64})\.commit\.json")
_SIDE = re.compile(r"([0-9a-f]{64})\.(leaves|challenge\.json|opened\.json)")


class ExchangeOutbox:
    def __init__(self, outbox_root: Path):
        self.path = Path(outbox_root) / "v2"
        self.done_dir = self.path / "done"
        self.withheld_dir = self.path / "withheld"
        self.location, self.withheld_location = str(self.path), str(self.withheld_dir)
        self.done_location = str(self.done_dir)
        self._lock_handle: Any = None
        try:
            self.done_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create outbox {self.path} (TOPS_JOB_OUTBOX_DIR, --outbox): {exc.strerror or exc}",
                               exc) from None

    # ---- ownership

    def acquire(self) -> bool:
        handle = open(self.path / ".lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        self._lock_handle = handle
        return True

    def release(self) -> None:
        if self._lock_handle is not None:
            self._lock_handle.close()
            self._lock_handle = None

    # ---- writes

    def _write(self, name: str, data: bytes) -> None:
        try:
            write_atomic(self.path / name, data, sync_dir=True, tmp_prefix=f".tmp-{os.getpid()}-", tmp_suffix=".part")
        except OSError as exc:
            raise StorageError(f"cannot write {self.path / name}: {exc.strerror or exc}", exc) from None

    def put(self, commitment: dict[str, Any], digest: str, leaf_hashes: bytes | None, *, held: bool = False) -> None:
        """Durable before it returns: the held marker first, the leaf hashes, then the commitment."""
        if held:
            self._write(f"{digest}.held", f"{os.getpid()}\n".encode("ascii"))
        if leaf_hashes is not None:
            self._write(f"{digest}.leaves", leaf_hashes)
        self._write(f"{digest}.commit.json", _line(commitment))

    def put_challenge(self, digest: str, challenge: dict[str, Any]) -> None:
        self._write(f"{digest}.challenge.json", _line(challenge))

    def put_opened(self, digest: str, opened: dict[str, Any]) -> None:
        self._write(f"{digest}.opened.json", _line(opened))

    def unhold(self, digest: str) -> None:
        """The self-audit verified it: it may be sent."""
        _unlink(self.path / f"{digest}.held")
        fsync_dir(self.path)

    def withhold(self, digest: str, reason: str) -> None:
        """The self-audit failed it: its files move to withheld/, with `reason`; never sent."""
        try:
            self.withheld_dir.mkdir(exist_ok=True)
            write_atomic(self.withheld_dir / f"{digest}.reason.json", _line({"digest": digest, "reason": reason}),
                         sync_dir=True)
            for suffix in (".leaves", ".commit.json"):
                if (self.path / f"{digest}{suffix}").exists():
                    os.replace(self.path / f"{digest}{suffix}", self.withheld_dir / f"{digest}{suffix}")
            fsync_dir(self.withheld_dir)
            _unlink(self.path / f"{digest}.held")
            fsync_dir(self.path)
        except OSError as exc:
            raise StorageError(f"cannot move {digest} to {self.withheld_dir}: {exc.strerror or exc}", exc) from None
        log.warning("[outbox] v2 attempt %s withheld (%s): kept in %s, never sent", digest, reason, self.withheld_dir)

    def held_by_live_run(self, digest: str) -> bool:
        """Whether `digest` is held by a live run other than this process."""
        try:
            pid = int((self.path / f"{digest}.held").read_text(encoding="ascii").strip() or "0")
        except (OSError, ValueError):
            return False
        return another_live_process(pid)

    def drop_challenge(self, digest: str) -> None:
        """The aggregator does not know the commitment (a new database): it will draw again."""
        for suffix in (".opened.json", ".challenge.json"):
            _unlink(self.path / f"{digest}{suffix}")
        fsync_dir(self.path)

    def finish(self, digest: str, verdict: str, answer: dict[str, Any]) -> None:
        """Record the verdict, then forget the attempt's files (the commitment last)."""
        record = {"digest": digest, "verdict": verdict, "answer": answer}
        commitment = self.load(digest, "commit.json")
        if verdict != "accepted" and commitment is not None:
            record["commitment"] = commitment
        try:
            write_atomic(self.done_dir / f"{digest}.json", _line(record), sync_dir=True)
        except OSError as exc:
            raise StorageError(f"cannot write {self.done_dir}: {exc.strerror or exc}", exc) from None
        for suffix in (".opened.json", ".challenge.json", ".leaves", ".commit.json"):
            _unlink(self.path / f"{digest}{suffix}")
        fsync_dir(self.path)

    # ---- reads

    def load(self, digest: str, kind: str) -> dict[str, Any] | None:
        try:
            value = json.loads((self.path / f"{digest}.{kind}").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def leaf_hashes(self, digest: str) -> list[bytes] | None:
        try:
            blob = (self.path / f"{digest}.leaves").read_bytes()
        except OSError:
            return None
        if not blob or len(blob) % 32:
            return None
        return [blob[i: i + 32] for i in range(0, len(blob), 32)]

    def state(self, digest: str) -> str | None:
        if not (self.path / f"{digest}.commit.json").exists():
            return None
        if (self.path / f"{digest}.opened.json").exists():
            return OPENED
        if (self.path / f"{digest}.challenge.json").exists():
            return CHALLENGED
        return SIGNED

    def verdict(self, digest: str) -> dict[str, Any] | None:
        try:
            value = json.loads((self.done_dir / f"{digest}.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def pending(self) -> dict[str, str]:
        """digest -> state of every attempt without a verdict, oldest commitment first."""
        entries = []
        for entry in os.scandir(self.path):
            match = _COMMIT.fullmatch(entry.name)
            if match and not (self.path / f"{match.group(1)}.held").exists():
                entries.append((entry.stat().st_mtime_ns, match.group(1)))
        return {digest: self.state(digest) or SIGNED for _, digest in sorted(entries)}

    def recover(self) -> dict[str, str]:
        """Tidy after a crash (half-written temp files, side files whose commitment is gone)
        and return the pending attempts."""
        for entry in os.scandir(self.path):
            name = entry.name
            if name.startswith(".tmp-") and name.endswith(".part"):
                pid = name[5:].split("-", 1)[0]
                if not (pid.isdigit() and another_live_process(int(pid))):
                    _unlink(Path(entry.path))
                continue
            if name.endswith(".held") and not self.held_by_live_run(name[:-5]):
                if (self.path / f"{name[:-5]}.commit.json").exists():
                    log.warning("[outbox] v2 attempt %s was held for a self-audit that never ended (its run stopped); "
                                "it was never audited and is sent now", name[:-5])
                _unlink(Path(entry.path))
                continue
            match = _SIDE.fullmatch(name)
            if match and not (self.path / f"{match.group(1)}.commit.json").exists():
                _unlink(Path(entry.path))
            match = _COMMIT.fullmatch(name)
            if match and (self.done_dir / f"{match.group(1)}.json").exists():  # crashed inside finish()
                for suffix in (".opened.json", ".challenge.json", ".leaves", ".commit.json"):
                    _unlink(self.path / f"{match.group(1)}{suffix}")
        fsync_dir(self.path)
        return self.pending()


def _line(value: dict[str, Any]) -> bytes:
    return (json.dumps(value, sort_keys=True, separators=(",", ":")) + "\n").encode("utf-8")


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


