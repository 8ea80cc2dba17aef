"""With an attacker who can write in a shared directory: no file the worker writes is
opened through a symlink, every directory it creates is 0700 whatever the umask, and a key
file must be the user's own regular file, mode 0600."""

from __future__ import annotations

import json
import os
import stat
import subprocess

import pytest

from tests.support import CLI, TEST_SECRET
from tests.support.peers import worker_env
from tops_job.errors import ConfigError
from tops_job.keys import read_key_file


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.mark.parametrize("flag", ["--ledger", "--receipts-out"])
def test_a_symlinked_ledger_or_receipts_file_is_refused_not_followed(tmp_path, flag):
    victim = tmp_path / "victim.txt"
    victim.write_text("the victim's data\n")
    link = tmp_path / "shared" / "receipts.jsonl"
    link.parent.mkdir()
    link.symlink_to(victim)
    result = subprocess.run([*CLI, "run", "--size", "16", "--attempts", "2", flag, str(link)],
                            env=worker_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr[-2000:]  # a path that cannot work as given
    assert "symbolic link" in result.stderr
    assert victim.read_text() == "the victim's data\n"


def test_directories_are_created_0700_under_umask_000(tmp_path):
    """Under umask 000 the config directory holding worker.key was created 0777."""
    root = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k != "WORKER_SK_HEX"}
    env.update(TOPS_JOB_CONFIG_DIR=str(root / "config" / "tops-job"), TOPS_JOB_DATA_DIR=str(root / "data" / "tops-job"),
               TOPS_JOB_CACHE_DIR=str(root / "cache" / "tops-job"))
    result = subprocess.run([*CLI, "run", "--attempts", "1", "--size", "16"], env=env, capture_output=True,
                            text=True, timeout=60, umask=0)
    assert result.returncode == 0, result.stderr[-2000:]
    created = [p for p in root.rglob("*") if p.is_dir()]
    assert root / "config" / "tops-job" in created and root / "data" / "tops-job" / "summaries" in created
    assert {str(p): oct(_mode(p)) for p in created if _mode(p) != 0o700} == {}
    assert _mode(root / "config" / "tops-job" / "worker.key") == 0o600


def test_a_key_file_must_be_the_users_own_regular_file_mode_0600(tmp_path):
    key = tmp_path / "worker.key"
    key.write_text(TEST_SECRET + "\n")
    key.chmod(0o600)
    assert read_key_file(key, "TOPS_JOB_KEY_FILE").hex() == TEST_SECRET

    link = tmp_path / "link.key"
    link.symlink_to(key)
    with pytest.raises(ConfigError, match="symbolic link"):
        read_key_file(link, "TOPS_JOB_KEY_FILE")

    key.chmod(0o640)
    with pytest.raises(ConfigError, match="group or others"):
        read_key_file(key, "TOPS_JOB_KEY_FILE")
    key.chmod(0o600)

    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    os.chown(key, 65534, 65534)
    with pytest.raises(ConfigError, match="belongs to uid 65534"):
        read_key_file(key, "TOPS_JOB_KEY_FILE")


def test_receipts_out_dash_is_standard_output(tmp_path):
    """/dev/stdout is itself a symlink (to /proc/self/fd/1), so `-` says standard output."""
    result = subprocess.run([*CLI, "run", "--size", "16", "--attempts", "2", "--receipts-out", "-"],
                            env=worker_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [json.loads(line)["attempt"] for line in result.stdout.splitlines()] == [0, 1]
