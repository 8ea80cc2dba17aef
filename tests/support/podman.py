"""Podman for the image tests: a usable engine or a skip that says why, the stand-in bases
(infra/images/standin_base.py) and the two images built from the shipped files unchanged.

Everything runs as root with this session's own containers.conf (CONTAINERS_CONF), which
sets what these machines need and changes nothing for anyone else:
- runtime runc: crun refuses hosts with hybrid cgroups ("cgroups in hybrid mode not supported");
- default_ulimits at the host's hard limits: podman's defaults would raise them, which a
  sandbox refuses;
- cgroupfs and file events: no systemd is needed.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support import INFRA, REPO_ROOT

BASES = {"python": "localhost/tops-job-base:python", "cuda": "localhost/tops-job-base:cuda"}
IMAGES = {"cpu": ("Dockerfile", "PYTHON_IMAGE", "python"), "gpu": ("Containerfile.gpu", "CUDA_IMAGE", "cuda")}
TAG = "localhost/tops-job-test:{}"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def must_run_here() -> bool:
    """CI on a Debian machine as root: scripts/test.sh installed podman, so it must work."""
    return os.environ.get("CI", "").lower() == "true" and os.geteuid() == 0 and shutil.which("apt-get") is not None


def unavailable(reason: str):
    if must_run_here():
        pytest.fail(f"podman must run in CI on Debian as root, but: {reason}", pytrace=False)
    pytest.skip(reason)


def containers_conf(directory: Path) -> Path:
    def limit(which: int, cap: int) -> int:
        soft, hard = resource.getrlimit(which)
        return cap if hard == resource.RLIM_INFINITY else min(hard, cap)

    nofile, nproc = limit(resource.RLIMIT_NOFILE, 65536), limit(resource.RLIMIT_NPROC, 32768)
    lines = ["[containers]", f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]',
             "[engine]", 'cgroup_manager = "cgroupfs"', 'events_logger = "file"']
    if shutil.which("runc"):
        lines.append('runtime = "runc"')
    path = directory / "containers.conf"
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Podman:
    env: dict[str, str]
    timings: dict[str, float] = field(default_factory=dict)

    def __call__(self, *args: str, check: bool = True, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
        result = subprocess.run(["podman", *args], env=self.env, capture_output=True, text=True, timeout=timeout,
                                **kwargs)
        if check and result.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} exited {result.returncode}\n"
                                 f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
        return result

    def inspect(self, image: str) -> dict:
        return json.loads(self("image", "inspect", image).stdout)[0]

    def exists(self, image: str) -> bool:
        return self("image", "exists", image, check=False).returncode == 0

    def mountpoint(self, volume: str) -> Path:
        return Path(self("volume", "inspect", "--format", "{{.Mountpoint}}", volume).stdout.strip())


def start_podman(directory: Path) -> Podman:
    if not shutil.which("podman"):
        unavailable("podman not found; install it with: apt-get install podman runc catatonit")
    if os.geteuid() != 0:
        unavailable("the image tests run podman as root (rootless needs subuid ranges and a user session)")
    env = {**os.environ, "CONTAINERS_CONF": str(containers_conf(directory))}
    podman = Podman(env)
    info = podman("info", "--format", "{{.Host.OCIRuntime.Name}}", check=False, timeout=120)
    if info.returncode != 0:
        unavailable(f"podman cannot start here: {info.stderr.strip()[-500:]}")
    return podman


def ensure_base(podman: Podman, kind: str) -> str:
    """The debootstrapped stand-in, made once and kept in the engine's storage;
    TOPS_JOB_REBUILD_BASE=1 makes it again."""
    tag = BASES[kind]
    if podman.exists(tag) and os.environ.get("TOPS_JOB_REBUILD_BASE") != "1":
        return tag
    for tool, package in (("debootstrap", "debootstrap"), ("gpg", "gpg"), ("dpkg-deb", "dpkg")):
        if not shutil.which(tool):
            unavailable(f"{tool} not found; install it with: apt-get install {package}")
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(INFRA / "images" / "standin_base.py"), kind, tag],
                            env=podman.env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, f"stand-in base {kind}:\n{result.stdout}\n{result.stderr}"
    podman.timings[f"base {kind}"] = time.monotonic() - started
    return tag


def git(*args: str) -> str:
    result = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else ""


def project_version() -> str:
    return re.search(r'^version\s*=\s*"([^"]+)"', (REPO_ROOT / "pyproject.toml").read_text(), re.M).group(1)


def build_args(revision: str | None = None) -> dict[str, str]:
    return {"VERSION": project_version(),
            "REVISION": revision or git("rev-parse", "HEAD") or "unknown",
            "CREATED": git("log", "-1", "--format=%cI") or "1970-01-01T00:00:00Z"}


def revision_labels(values: dict[str, str]) -> dict[str, str]:
    """The labels that change with the build arguments, as the shipped files write them."""
    source = values.get("SOURCE", "https://example.invalid/tops-job")
    return {"org.opencontainers.image.version": values["VERSION"],
            "org.opencontainers.image.revision": values["REVISION"],
            "org.opencontainers.image.created": values["CREATED"],
            "org.opencontainers.image.documentation": f"{source}/blob/{values['REVISION']}/README.md#images"}


def build(podman: Podman, name: str, tag: str, context: Path = REPO_ROOT, **args: str) -> str:
    """`podman build` of a shipped file, unchanged; the base is only a build argument.
    The host's CA bundle is mounted read-only over the same path for the RUN steps (apt and
    pip inside trust what the host trusts, e.g. a re-signing proxy); it is in no layer.
    --network host: the build's downloads need the network, and a private network
    namespace would need the host's firewall tools. Returns the build log."""
    containerfile, base_arg, base_kind = IMAGES[name]
    command = ["build", "--format", "docker", "--network", "host", "-f", str(context / containerfile), "-t", tag,
               "--build-arg", f"{base_arg}={BASES[base_kind]}"]
    if HOST_CA_BUNDLE.is_file():
        command += ["-v", f"{HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro"]
    values = {**build_args(), **args}
    for key, value in values.items():
        command += ["--build-arg", f"{key}={value}"]
    # podman 4.x (buildah 1.28) keys a cached LABEL step on its text, not on the build
    # arguments in it, so a rebuild with a new REVISION alone would keep the old labels.
    # --label adds a LABEL step whose text holds the values: the same values, kept right.
    for key, value in revision_labels(values).items():
        command += ["--label", f"{key}={value}"]
    started = time.monotonic()
    result = podman(*command, str(context), timeout=1500)
    podman.timings.setdefault(f"build {name}", time.monotonic() - started)
    return result.stdout + result.stderr


def build_both(podman: Podman) -> dict[str, str]:
    """Both bases, then both images, two at a time (most of it waits on downloads)."""
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda kind: ensure_base(podman, kind), BASES))
        logs = dict(zip(IMAGES, pool.map(lambda name: build(podman, name, TAG.format(name)), IMAGES)))
    return logs


def steps(log: str) -> list[tuple[str, bool]]:
    """(instruction, taken from the cache?) for each step of a build log."""
    found: list[tuple[str, bool]] = []
    for line in log.splitlines():
        step = re.match(r"^\[\d+/\d+\] STEP \d+/\d+: (.*)$", line) or re.match(r"^STEP \d+/\d+: (.*)$", line)
        if step:
            found.append((step.group(1), False))
        elif line.startswith("--> Using cache") and found:
            found[-1] = (found[-1][0], True)
    return found
