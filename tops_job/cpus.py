"""How many CPUs this process may use: its affinity mask, capped by a cgroup CPU quota.

os.cpu_count() counts the machine's CPUs. A container limited to 2 (Kubernetes
`resources.limits.cpu`, `podman run --cpus`, systemd's CPUQuota) on a 64-core node still sees
64, and a process or a BLAS thread per CPU there makes the kernel throttle them all (CFS
bandwidth control): together they run for the quota's share of each period, then all stop,
some holding locks. A fractional quota counts up (1.5 CPUs: 2), as the JVM counts it.
The worker sizes its threads and BLAS by this count; `aggregator serve --workers 0` starts a
process per CPU counted here.

The quota is read from the cgroup files of this process's cgroup and of its ancestors
(cgroup v2 `cpu.max`; v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`), the tightest one winning.
Inside a container the path in /proc/self/cgroup is often the host's and does not exist under
the container's /sys/fs/cgroup, whose root is then the container's own cgroup: it is read
instead. A file that is missing, unreadable or not understood sets no limit.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

_MAX_FILE = 4096  # a cgroup file is a line; anything longer is not one


def _read(path: Path, limit: int = _MAX_FILE) -> str | None:
    """The file's text, or None when it is missing, unreadable or over `limit` bytes. Bytes
    that are not UTF-8 read as U+FFFD, which no number below accepts."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError:
        return None
    return data.decode("utf-8", errors="replace").strip() if len(data) <= limit else None


def _positive_int(text: str) -> int | None:
    return int(text) if text.isascii() and text.isdigit() and 0 < int(text) < 1 << 63 else None


def _v2_quota(directory: Path) -> float | None:
    """CPUs allowed by `cpu.max` ("QUOTA PERIOD", QUOTA "max" when unlimited)."""
    text = _read(directory / "cpu.max")
    fields = text.split() if text else []
    if len(fields) != 2:
        return None
    quota, period = _positive_int(fields[0]), _positive_int(fields[1])
    return quota / period if quota and period else None


def _v1_quota(directory: Path) -> float | None:
    """CPUs allowed by cpu.cfs_quota_us / cpu.cfs_period_us (quota -1 when unlimited)."""
    quota_text, period_text = _read(directory / "cpu.cfs_quota_us"), _read(directory / "cpu.cfs_period_us")
    quota = _positive_int(quota_text) if quota_text else None
    period = _positive_int(period_text) if period_text else None
    return quota / period if quota and period else None


def _own_cgroups(proc_cgroup: Path) -> tuple[str | None, str | None]:
    """(the v2 path, the v1 cpu controller's path) of this process, from /proc/self/cgroup."""
    v2 = v1 = None
    for line in (_read(proc_cgroup, 1 << 16) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3 or not parts[2].startswith("/"):
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def _directories(base: Path, path: str | None) -> list[Path]:
    """`base`/`path` and its ancestors up to `base`; `base` alone when that path is not there."""
    if not base.is_dir():
        return []
    parts = [p for p in (path or "").split("/") if p and p not in (".", "..")]
    own = base.joinpath(*parts)
    if not parts or not own.is_dir():
        return [base]
    return [base.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def cgroup_cpu_quota(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The tightest CPU quota (in CPUs, maybe fractional) on this process's cgroups, or None."""
    v2_path, v1_path = _own_cgroups(proc_cgroup)
    quotas = []
    for base in (root, root / "unified"):  # v2 alone, or the v2 half of a hybrid layout
        quotas += [_v2_quota(d) for d in _directories(base, v2_path)]
    for base in (root / "cpu", root / "cpu,cpuacct"):  # v1 (often one is a link to the other)
        quotas += [_v1_quota(d) for d in _directories(base, v1_path)]
    found = [q for q in quotas if q is not None]
    return min(found) if found else None


def cap_blas_threads(limit: int) -> None:
    """Lower each loaded BLAS's pool (OpenBLAS, MKL, BLIS: whichever NumPy loaded) to `limit`
    threads, never raising one: an OPENBLAS_NUM_THREADS the operator set stands. BLAS sizes its
    pool by the affinity mask, not the quota. The environment variables only work before NumPy
    is imported; threadpoolctl sets a loaded library's count at run time, and can only limit a
    library already loaded, so NumPy is imported first."""
    import numpy  # noqa: F401  (loads BLAS)
    from threadpoolctl import threadpool_info, threadpool_limits

    over = {info["prefix"]: limit for info in threadpool_info()
            if info["user_api"] == "blas" and info["num_threads"] > limit}
    if over:
        threadpool_limits(limits=over)


def usable_cpus(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may run on at once: its affinity, capped by its cgroup quota; at least 1."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux: no affinity and no cgroups
        return os.cpu_count() or 1
    quota = cgroup_cpu_quota(proc_cgroup, root)
    if quota is not None:
        count = min(count, math.ceil(quota))
    return max(1, count)
