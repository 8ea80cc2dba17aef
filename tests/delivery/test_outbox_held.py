"""The outbox's held/ place (receipts the self-audit holds): a dead run's are recovered into
the sending path, a live run's are left alone, and withheld ones never come back."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.support.peers import signed_receipts
from tops_job.delivery.outbox import Outbox
from tops_job.spec.canonical import digest_of


def test_recover_sends_a_dead_runs_held_receipts_and_leaves_a_live_runs(tmp_path, caplog):
    dead, live, failed = signed_receipts(3, run_id="held")
    box = Outbox(tmp_path / "outbox")
    for receipt in (dead, live, failed):
        box.put_held(receipt, digest_of(receipt))
    box.withhold(digest_of(failed).hex(), "self-audit: wrong_product")
    assert box.count() == 0 and len(list(box.held_dir.iterdir())) == 2  # durable, out of the sending path

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for receipt, pid in ((dead, int(gone.stdout)), (live, sleeper.pid)):
            digest = digest_of(receipt).hex()
            os.replace(box.held_dir / f"{digest}.{os.getpid()}.json", box.held_dir / f"{digest}.{pid}.json")
        with caplog.at_level("WARNING", logger="tops_job.outbox"):
            waiting = Outbox(tmp_path / "outbox").recover()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert waiting == [digest_of(dead).hex()]
    assert "never audited" in caplog.text
    assert [p.name.split(".")[0] for p in box.held_dir.iterdir()] == [digest_of(live).hex()]
    assert (box.withheld_dir / f"{digest_of(failed).hex()}.json").exists()
    assert "wrong_product" in (box.withheld_dir / f"{digest_of(failed).hex()}.reason.json").read_text()
    assert not list((tmp_path / "outbox" / "quarantine").glob("*"))  # held/ and withheld/ belong there
