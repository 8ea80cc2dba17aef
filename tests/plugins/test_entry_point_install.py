"""A plugin installed with pip into a fresh virtual environment is picked up by a real
`tops-job run` through its entry point, with no registration step."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import site
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

PLUGIN_SOURCE = textwrap.dedent('''
    """tops-job-hello: a tiny plugin made by the test suite."""
    import json
    import os

    from tops_job import hookimpl
    from tops_job.observability.events import Reporter


    class Counter(Reporter):
        name = "hello-counter"
        attempts = 0

        def on_attempt(self, event):
            Counter.attempts += 1


    @hookimpl
    def tops_job_register_reporters(register, config):
        register(Counter())


    @hookimpl
    def tops_job_run_finished(summary, config):
        with open(os.environ["HELLO_OUT"], "w") as handle:
            json.dump({"run_id": summary["run_id"], "attempts_seen": Counter.attempts,
                       "accepted": summary["receipts"]["accepted"]}, handle)
''')


def build_wheel(directory: Path) -> Path:
    """tops_job_hello-0.1.0-py3-none-any.whl, written by hand (a wheel is a zip with a
    dist-info): no build backend or network is needed to install it."""
    dist_info = "tops_job_hello-0.1.0.dist-info"
    files = {
        "tops_job_hello/__init__.py": PLUGIN_SOURCE,
        f"{dist_info}/METADATA": "Metadata-Version: 2.1\nName: tops-job-hello\nVersion: 0.1.0\nRequires-Dist: tops-job\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: tops-job-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{dist_info}/entry_points.txt": "[tops_job]\nhello = tops_job_hello\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    record.append(f"{dist_info}/RECORD,,")
    path = directory / "tops_job_hello-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
        archive.writestr(f"{dist_info}/RECORD", "\n".join(record) + "\n")
    return path


def venv_site_packages(python: Path) -> Path:
    text = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    return Path(text)


def test_pip_installed_entry_point_plugin_is_used_by_a_real_run(tmp_path, isolated_env):
    with pytest.raises(ImportError):
        import tops_job_hello  # noqa: F401  (only the venv below has it)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    # The new venv sees this environment's packages (tops-job, editable or not, and its
    # dependencies) through a .pth that adds our site directories, their own .pth files
    # included. `--system-site-packages` would give it the *base* interpreter's packages,
    # which lack tops-job whenever the suite itself runs in a virtualenv.
    parent_sites = [path for path in site.getsitepackages() + [site.getusersitepackages()] if Path(path).is_dir()]
    (venv_site_packages(python) / "zz_parent_env.pth").write_text(
        f"import site; list(map(site.addsitedir, {parent_sites!r}))\n")
    wheel = build_wheel(tmp_path)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-index",
                    "--no-deps", "--no-build-isolation", "--disable-pip-version-check", str(wheel)], check=True)

    env = {**os.environ, "HELLO_OUT": str(tmp_path / "hello.json")}
    listed = subprocess.run([str(python), "-m", "tops_job.cli", "plugins"], env=env,
                            capture_output=True, text=True, check=True)
    (row,) = [row for row in json.loads(listed.stdout) if row["name"] == "hello"]
    assert row == {"name": "hello", "status": "loaded", "builtin": False, "package": "tops-job-hello",
                   "version": "0.1.0", "hooks": ["tops_job_register_reporters", "tops_job_run_finished"]}

    run = subprocess.run([str(python), "-m", "tops_job.cli", "run", "--size", "16", "--attempts", "2"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "hello.json").read_text())["attempts_seen"] == 2
    assert json.loads((tmp_path / "hello.json").read_text())["accepted"] == 2

    blocked = subprocess.run([str(python), "-m", "tops_job.cli", "run", "--size", "16", "--attempts", "1"],
                             env={**env, "TOPS_JOB_DISABLE_PLUGINS": "hello", "HELLO_OUT": str(tmp_path / "no.json")},
                             capture_output=True, text=True, timeout=120)
    assert blocked.returncode == 0, blocked.stderr
    assert not (tmp_path / "no.json").exists()
