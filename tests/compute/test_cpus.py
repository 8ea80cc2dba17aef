"""usable_cpus: the affinity mask capped by a cgroup CPU quota, read from cgroup trees laid out
as the kernel lays them out (v2, v1, a container's view of either), and from files that are
missing, malformed or hostile. The quota a real container gets is checked in
tests/infra/test_images_built.py (`podman run --cpus 1`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tops_job.cpus import cgroup_cpu_quota, usable_cpus

AFFINITY = len(os.sched_getaffinity(0))


def _tree(tmp_path: Path, own: str, files: dict[str, str | bytes]) -> tuple[Path, Path]:
    """A /proc/self/cgroup holding `own`, and a /sys/fs/cgroup holding `files` (path: content)."""
    root = tmp_path / "cgroup"
    root.mkdir()
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(own)
    return proc, root


def test_v2_the_tightest_quota_on_the_path_wins(tmp_path):
    proc, root = _tree(tmp_path, "0::/kubepods/pod1/ctr\n", {
        "kubepods/cpu.max": "max 100000\n",
        "kubepods/pod1/cpu.max": "250000 100000\n",
        "kubepods/pod1/ctr/cpu.max": "max 100000\n",
        "other/cpu.max": "10000 100000\n",  # not this process's cgroup
    })
    assert cgroup_cpu_quota(proc, root) == 2.5
    assert usable_cpus(proc, root) == min(AFFINITY, 3)


def test_v2_inside_a_container_reads_its_own_root(tmp_path):
    # The host's path does not exist in the container's view; its /sys/fs/cgroup is its cgroup.
    proc, root = _tree(tmp_path, "0::/machine.slice/libpod-abc.scope\n", {"cpu.max": "50000 100000\n"})
    assert cgroup_cpu_quota(proc, root) == 0.5
    assert usable_cpus(proc, root) == 1  # half a CPU is still one to run on


def test_v1_and_hybrid_layouts(tmp_path):
    own = "12:memory:/docker/x\n4:cpu,cpuacct:/docker/x\n0::/docker/x\n"
    proc, root = _tree(tmp_path, own, {
        "cpu,cpuacct/docker/x/cpu.cfs_quota_us": "150000\n",
        "cpu,cpuacct/docker/x/cpu.cfs_period_us": "100000\n",
        "cpu,cpuacct/docker/cpu.cfs_quota_us": "-1\n",
        "cpu,cpuacct/docker/cpu.cfs_period_us": "100000\n",
        "unified/docker/x/cgroup.procs": "1\n",  # the v2 half of a hybrid layout, no cpu controller
    })
    assert cgroup_cpu_quota(proc, root) == 1.5
    assert usable_cpus(proc, root) == min(AFFINITY, 2)


def test_no_quota_means_the_affinity_mask(tmp_path):
    proc, root = _tree(tmp_path, "0::/user.slice\n1:cpu:/user.slice\n", {
        "user.slice/cpu.max": "max 100000\n",
        "cpu/user.slice/cpu.cfs_quota_us": "-1\n", "cpu/user.slice/cpu.cfs_period_us": "100000\n",
    })
    assert cgroup_cpu_quota(proc, root) is None
    assert usable_cpus(proc, root) == AFFINITY
    assert usable_cpus(tmp_path / "no-such-file", tmp_path / "no-such-dir") == AFFINITY


@pytest.mark.parametrize("content", [
    "", "max", "abc 100000", "100000", "100000 0", "0 100000", "-5 100000", "1 2 3", "１２ 100000",
    "99999999999999999999999999 1", b"\xff\xfe 100000", "100000 100000" + " " * 5000, b"\x00" * 70000,
])
def test_a_cpu_max_that_is_not_understood_sets_no_limit(tmp_path, content):
    proc, root = _tree(tmp_path, "0::/\n", {"cpu.max": content})
    assert cgroup_cpu_quota(proc, root) is None
    assert usable_cpus(proc, root) == AFFINITY


@pytest.mark.parametrize("quota, period", [("abc", "100000"), ("150000", "0"), ("150000", ""), ("", "")])
def test_v1_files_that_are_not_understood_set_no_limit(tmp_path, quota, period):
    proc, root = _tree(tmp_path, "3:cpu:/\n", {"cpu/cpu.cfs_quota_us": quota, "cpu/cpu.cfs_period_us": period})
    assert cgroup_cpu_quota(proc, root) is None


@pytest.mark.parametrize("own", [
    "0::/../../outside\n",  # a path climbing out of the cgroup root is not followed
    b"\xff\xfe:\x00::/\n" + b"x" * 100000,
    "garbage without colons\n0:\n::\n",
])
def test_a_proc_cgroup_that_is_not_understood_reads_only_inside_the_root(tmp_path, own):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "cpu.max").write_text("10000 100000\n")  # would give 0.1 CPU if it were read
    root = tmp_path / "cgroup"
    root.mkdir()
    proc = tmp_path / "proc-self-cgroup"
    proc.write_bytes(own.encode() if isinstance(own, str) else own)
    assert cgroup_cpu_quota(proc, root) is None


def test_a_directory_in_place_of_a_file_sets_no_limit(tmp_path):
    proc, root = _tree(tmp_path, "0::/\n", {"cpu.max/inside": "x"})
    assert cgroup_cpu_quota(proc, root) is None


def test_cap_blas_threads_lowers_a_pool_and_never_raises_one():
    # Started at 3 threads by the environment, whatever this machine's core count.
    script = ("import json\n"
              "from threadpoolctl import threadpool_info\n"
              "from tops_job.cpus import cap_blas_threads\n"
              "def counts(): return [i['num_threads'] for i in threadpool_info() if i['user_api'] == 'blas']\n"
              "cap_blas_threads(2); lowered = counts()\n"
              "cap_blas_threads(5); print(json.dumps([lowered, counts()]))\n")
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "3", "OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, check=True)
    lowered, after = json.loads(out.stdout)
    assert lowered and all(n == 2 for n in lowered), out.stdout
    assert after == lowered, "a cap above the pool must not raise it"
