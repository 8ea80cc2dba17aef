"""Both images, built with podman from the shipped Dockerfile and Containerfile.gpu on a
debootstrapped stand-in base (no registry is reachable here), then run as a user would:
the image's own user, a read-only root, volumes, tini as PID 1, SIGTERM, a pod with the
reference aggregator, an arbitrary UID, and the GPU image on a machine without a GPU.

Skipped, saying why, where podman cannot run; in CI on Debian as root (scripts/test.sh
installs podman, runc and debootstrap) they must run, and fail instead of skipping.
The bases stay in the engine's storage between sessions (TOPS_JOB_REBUILD_BASE=1 makes them
again); the images are rebuilt every session, from the layer cache where nothing changed.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import urllib.parse
import uuid
from datetime import datetime
from pathlib import Path

import pytest

from tests.support import REPO_ROOT
from tests.support.net import wait_for
from tests.support.podman import TAG, Podman, build, build_args, build_both, project_version, start_podman, steps

pytestmark = pytest.mark.timeout(3600)
CPU, GPU = TAG.format("cpu"), TAG.format("gpu")
CPU_SIZE_LIMIT = 300 * 10**6
LOCKS = REPO_ROOT / "infra" / "images"


@pytest.fixture(scope="session")
def podman(tmp_path_factory) -> Podman:
    return start_podman(tmp_path_factory.mktemp("podman"))


@pytest.fixture(scope="session")
def build_logs(podman) -> dict[str, str]:
    return build_both(podman)


@pytest.fixture
def names(podman):
    """Unique names for this test's containers, pods and volumes; removed afterwards."""
    prefix = f"tops-job-test-{uuid.uuid4().hex[:8]}"
    yield lambda what: f"{prefix}-{what}"
    for name in podman("ps", "-a", "--format", "{{.Names}}").stdout.split():
        if name.startswith(prefix):
            podman("rm", "-f", "-v", name, check=False)  # -v: and its anonymous volumes
    for name in podman("pod", "ls", "--format", "{{.Name}}").stdout.split():
        if name.startswith(prefix):
            podman("pod", "rm", "-f", name, check=False)
    for volume in podman("volume", "ls", "--format", "{{.Name}}").stdout.split():
        if volume.startswith(prefix):
            podman("volume", "rm", "-f", volume, check=False)


def report(request, line: str) -> None:
    """A line in pytest's output, even when it captures the tests' output."""
    with request.getfixturevalue("capsys").disabled():
        print(f"\n[images] {line}")


def locked_pins(name: str) -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (LOCKS / name).read_text().splitlines():
        if line.startswith("-r "):
            pins |= locked_pins(line.split()[1])
        elif match := re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line):
            pins[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(2)
    return pins


def installed(podman: Podman, image: str) -> dict[str, str]:
    script = ("import importlib.metadata as m, json, re; print(json.dumps({re.sub(r'[-_.]+', '-', "
              "d.metadata['Name']).lower(): d.version for d in m.distributions()}))")
    result = podman("run", "--rm", "--network", "none", "--entrypoint", "/opt/tops-job/bin/python", image, "-c", script)
    return json.loads(result.stdout)


def run_job(podman: Podman, *args: str, check: bool = True) -> tuple[int, str]:
    result = podman("run", "--rm", "--network", "none", "--read-only", *args, check=False, timeout=600)
    if check:
        assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.returncode, result.stdout + result.stderr


def summaries(data: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((data / "summaries").glob("*.json"))]


def outbox(data: Path) -> list[Path]:
    return sorted((data / "outbox").glob("*.json"))


# ---------------------------------------------------------------------------------------


def test_both_images_build_and_report_sizes(podman, build_logs, request):
    sizes = {name: podman.inspect(TAG.format(name))["Size"] for name in ("cpu", "gpu")}
    timings = ", ".join(f"{what} {seconds:.0f}s" for what, seconds in podman.timings.items())
    report(request, "sizes: " + ", ".join(f"{name} {size / 1e6:.0f} MB" for name, size in sizes.items())
           + f" (GPU without CUDA libraries); {timings}")
    assert sizes["cpu"] < CPU_SIZE_LIMIT, f"CPU image is {sizes['cpu'] / 1e6:.0f} MB"


@pytest.mark.parametrize("image", [CPU, GPU])
def test_version_as_the_images_user(podman, build_logs, image):
    config = podman.inspect(image)["Config"]
    assert config["User"] == "10001:0"
    assert config["Entrypoint"][0] == "/usr/bin/tini"
    result = podman("run", "--rm", "--network", "none", "--read-only", image, "--version")
    assert result.stdout.strip() == f"tops-job, version {project_version()}"


@pytest.mark.parametrize("image,lock", [(CPU, "requirements.lock"), (GPU, "requirements-gpu.lock")])
def test_images_hold_exactly_the_locked_dependencies(podman, build_logs, image, lock):
    found = installed(podman, image)
    assert found.pop("tops-job") == project_version()
    assert found == locked_pins(lock)


@pytest.mark.parametrize("image", [CPU, GPU])
def test_labels(podman, build_logs, image):
    labels = podman.inspect(image)["Config"]["Labels"]
    prefix = "org.opencontainers.image."
    for key in ("source", "documentation"):
        url = urllib.parse.urlparse(labels[prefix + key])
        assert url.scheme == "https" and url.netloc, (key, labels[prefix + key])
    expected = build_args()
    assert datetime.fromisoformat(labels[prefix + "created"]) == datetime.fromisoformat(expected["CREATED"])
    assert labels[prefix + "revision"] == expected["REVISION"]
    assert labels[prefix + "version"] == project_version()


def test_a_cpu_quota_sizes_the_worker_and_the_aggregator(podman, build_logs, names):
    # Half a CPU on a machine of any size: the real cgroup files of a container, not the host's count.
    script = ("import json; from threadpoolctl import threadpool_info; from tops_job.cpus import cgroup_cpu_quota, "
              "usable_cpus; from tops_job.compute.numpy_backend import NumpyBackend; backend = NumpyBackend(); "
              "print(json.dumps([cgroup_cpu_quota(), usable_cpus(), backend.threads, "
              "[i['num_threads'] for i in threadpool_info() if i['user_api'] == 'blas']]))")
    result = podman("run", "--rm", "--network", "none", "--read-only", "--cpus", "0.5",
                    "--entrypoint", "/opt/tops-job/bin/python", CPU, "-c", script)
    assert json.loads(result.stdout) == [0.5, 1, 1, [1]], result.stdout
    aggregator = names("aggregator")
    podman("run", "-d", "--name", aggregator, "--network", "none", "--read-only", "--cpus", "0.5", CPU,
           "aggregator", "serve", "--workers", "0", "--port", "0", "--db", "/tmp/aggregator.sqlite3")

    def serving_line() -> str | None:
        logs = podman("logs", aggregator, check=False)
        return next((line for line in (logs.stdout + logs.stderr).splitlines() if "serving on" in line), None)

    line = wait_for(serving_line, 60, "the aggregator's first line")
    assert line is not None and ", 1 worker," in line, line


def test_short_run_read_only_root_as_the_images_user(podman, build_logs, names):
    data, cache = names("data"), names("cache")
    run_job(podman, "-v", f"{data}:/var/lib/tops-job", "-v", f"{cache}:/var/cache/tops-job",
            CPU, "run", "--attempts", "3", "--size", "128")
    root = podman.mountpoint(data)
    (summary,) = summaries(root)
    assert summary["exit_code"] == 0 and summary["receipts"]["accepted"] == 3
    key = root / "config" / "worker.key"
    assert key.stat().st_uid == 10001 and key.stat().st_mode & 0o077 == 0
    assert {p.stat().st_uid for p in root.rglob("*")} == {10001}


def test_sigterm_keeps_every_receipt_and_a_pod_drains_them(podman, build_logs, names):
    data, cache = names("data"), names("cache")
    volumes = ["-v", f"{data}:/var/lib/tops-job", "-v", f"{cache}:/var/cache/tops-job"]
    worker = names("worker")
    # Nothing listens on the aggregator's port: every receipt waits in the outbox. (tops-receipt/1:
    # a v2 commitment needs the aggregator's run challenge first, so a v2 worker would wait.)
    podman("run", "-d", "--name", worker, "--network", "none", "--read-only", *volumes,
           "-e", "AGGREGATOR_URL=http://127.0.0.1:9/verify", "-e", "TOPS_JOB_PROTOCOL=v1", CPU, "run", "--attempts", "100000", "--size", "256")
    root = podman.mountpoint(data)
    wait_for(lambda: (root / "outbox").is_dir() and len(outbox(root)) >= 3, 120, "receipts in the outbox", 0.1)
    pid1 = podman("exec", worker, "cat", "/proc/1/cmdline").stdout.split("\0")
    assert pid1[:3] == ["/usr/bin/tini", "-g", "--"], pid1
    podman("kill", "--signal", "TERM", worker)
    assert podman("wait", worker, timeout=120).stdout.strip() == "143", podman("logs", worker).stderr[-3000:]
    (stopped,) = summaries(root)
    waiting = len(outbox(root))
    assert stopped["exit_code"] == 143
    assert waiting == stopped["attempts"]["ok"] == stopped["receipts"]["pending"] >= 3

    # Later, in a pod: the reference aggregator (same image, its database on its own volume
    # under TOPS_JOB_DATA_DIR, read-only root) and a run that sends the outbox first.
    pod, aggregator, aggregator_data = names("pod"), names("aggregator"), names("aggregator-data")
    podman("pod", "create", "--name", pod, "--network", "none")
    podman("run", "-d", "--pod", pod, "--name", aggregator, "--read-only",
           "-v", f"{aggregator_data}:/var/lib/tops-job", CPU, "aggregator", "serve", "--port", "8081", "--accept", "both")
    health = ("import json, urllib.request; "
              "print(json.load(urllib.request.urlopen('http://127.0.0.1:8081/health'))['receipts'])")

    def accepted() -> int | None:
        result = podman("exec", aggregator, "python", "-c", health, check=False)
        return int(result.stdout) if result.returncode == 0 else None

    assert wait_for(lambda: accepted() is not None, 60, "the aggregator") is not None
    podman("run", "--rm", "--pod", pod, "--read-only", *volumes, "-e", "AGGREGATOR_URL=http://127.0.0.1:8081/verify",
           "-e", "RATE_LIMIT_PER_SECOND=1000", "-e", "TOPS_JOB_PROTOCOL=v1", CPU, "run", "--attempts", "1", "--size", "128", timeout=600)
    assert outbox(root) == []
    assert summaries(root)[-1]["exit_code"] == 0
    assert accepted() == waiting + 1
    assert (podman.mountpoint(aggregator_data) / "aggregator.sqlite3").is_file()


@pytest.mark.parametrize("image", [CPU, GPU])
def test_any_uid_with_group_0(podman, build_logs, names, image):
    """OpenShift's restricted SCC and `--user N`: an arbitrary UID, group 0, no passwd entry."""
    data = names("data")
    uid = 1000740000
    run_job(podman, "--user", str(uid), "-v", f"{data}:/var/lib/tops-job",
            image, "run", "--attempts", "2", "--size", "64", "--backend", "numpy")
    root = podman.mountpoint(data)
    assert summaries(root)[0]["receipts"]["accepted"] == 2
    assert (root / "config" / "worker.key").stat().st_uid == uid


def test_gpu_image_without_a_gpu(podman, build_logs):
    code, output = run_job(podman, GPU, "run", "--attempts", "1", "--size", "64", "--backend", "cupy", check=False)
    assert code == 5, output[-3000:]
    code, output = run_job(podman, GPU, "run", "--attempts", "1", "--size", "64", "--backend", "numpy", check=False)
    assert code == 0, output[-3000:]


def test_a_new_revision_or_source_edit_reuses_the_layers(podman, build_logs, tmp_path, request):
    """A new revision changes only the labels (every layer is the cache's); a source edit
    rebuilds the project's wheel but not the locked dependencies."""
    base = podman.inspect(CPU)
    started = time.monotonic()
    log = build(podman, "cpu", TAG.format("cpu-next"), REVISION="0123456789abcdef", CREATED="2030-01-01T00:00:00Z")
    revision_seconds = time.monotonic() - started
    again = podman.inspect(TAG.format("cpu-next"))
    assert again["RootFS"]["Layers"] == base["RootFS"]["Layers"]
    assert again["Config"]["Labels"]["org.opencontainers.image.revision"] == "0123456789abcdef"
    for instruction, cached in steps(log):
        if instruction.startswith(("RUN", "COPY")):
            assert cached, f"a new revision re-ran: {instruction}"

    context = tmp_path / "context"
    shutil.copytree(REPO_ROOT, context, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "build"))
    with open(context / "tops_job" / "__init__.py", "a") as handle:
        handle.write(f"\n# an edit {uuid.uuid4().hex}\n")  # new to the cache every session
    started = time.monotonic()
    log = build(podman, "cpu", TAG.format("cpu-edited"), context=context)
    edit_seconds = time.monotonic() - started
    runs = {instruction: cached for instruction, cached in steps(log) if instruction.startswith("RUN")}
    (dependencies,) = [cached for instruction, cached in runs.items() if "--require-hashes" in instruction]
    (project,) = [cached for instruction, cached in runs.items() if "--no-deps ." in instruction]
    assert dependencies, "an edit to the source re-downloaded the locked dependencies"
    assert not project, "the project's wheel must be rebuilt from the edited source"
    report(request, f"CPU rebuild: new revision {revision_seconds:.0f}s, source edit {edit_seconds:.0f}s")
    podman("rmi", TAG.format("cpu-next"), TAG.format("cpu-edited"), check=False)
    # The layers the edited build made (not those it took from the cache) are of no use
    # to a later session.
    lines = log.splitlines()
    made = [line[4:] for previous, line in zip([""] + lines, lines)
            if re.fullmatch(r"--> [0-9a-f]{11,}", line) and not previous.startswith("--> Using cache")]
    for image in reversed(made):
        podman("rmi", image, check=False)
