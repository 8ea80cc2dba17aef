"""`aggregator serve` without --db keeps its database under TOPS_JOB_DATA_DIR, the volume a
container with a read-only root can write (the images set it to /var/lib/tops-job)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys


def test_default_database_under_data_dir(isolated_env):
    data = isolated_env["data"]
    env = {**os.environ, "HOME": str(data.parent / "home")}  # the user data dir must not be used
    proc = subprocess.Popen([sys.executable, "-m", "tops_job.cli", "aggregator", "serve", "--port", "0"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert "serving on http://" in line, line
    assert f"db {data / 'aggregator.sqlite3'}," in line
    assert (data / "aggregator.sqlite3").is_file()
    assert not (data.parent / "home").exists()
