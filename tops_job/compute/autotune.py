"""Autotune: the square shape whose product takes closest to the target time, cached."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from tops_job.atomic import write_atomic
from tops_job.compute.base import Backend, Shape
from tops_job.files import private_dir

log = logging.getLogger("tops_job.autotune")

PROFILE_VERSION = 1


@dataclass
class Profile:
    backend: str
    device: str
    dtype: str
    target_ms: int
    m: int
    n: int
    k: int
    measured_ms: float
    probes: list[dict] = field(default_factory=list)
    created_ms: int = 0
    version: int = PROFILE_VERSION
    device_uuid: str = ""  # the GPU that was tuned (informational: same-model cards share a profile)
    # The CPU backend's threads: the same CPU model with fewer cores (a CPU limit, a smaller
    # node) needs a smaller shape for the same time. 0 on a GPU.
    cpus: int = 0

    @property
    def shape(self) -> Shape:
        return Shape(self.m, self.n, self.k)

    @property
    def key(self) -> str:
        return profile_key(self.backend, self.device, self.dtype, self.target_ms, self.cpus)


def profile_key(backend: str, device: str, dtype: str, target_ms: int, cpus: int = 0) -> str:
    """Cache key: backend, device model, CPUs where they set the speed, dtype and target
    (file-name safe). A shared cache (S3) then holds one profile per node size, instead of
    nodes of different sizes overwriting one another's."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower()[:60] or "device"
    return f"{backend}-{slug}{f'-{cpus}cpu' if cpus else ''}-{dtype}-{target_ms}ms"


def _identity(backend: Backend, target_ms: int) -> dict:
    """What a cached profile must match to be used for `backend` (Profile's field names)."""
    return {"backend": backend.name, "device": backend.device_model, "dtype": backend.dtype, "target_ms": target_ms,
            "cpus": backend.tuned_cpus}


class ProfileCache(Protocol):
    """Where profiles are cached: what the `tops_job_profile_store` hook returns.
    ProfileStore (a directory) is the built-in; a plugin may keep them elsewhere (S3)."""

    def path_for(self, key: str) -> Path | str:
        """Where the profile for `key` lives, for logs (a path or a URL)."""

    def load(self, key: str, expect: dict) -> Profile | None:
        """The cached profile, or None when missing, unreadable or not matching `expect`
        (check it with `profile_from_json`); never raises for a cache problem."""

    def save(self, profile: Profile) -> Path | str:
        """Cache `profile` (a failure is a warning, not an error); returns `path_for`."""


def profile_from_json(text: str, expect: dict, where: object) -> Profile | None:
    """A cached profile parsed and checked against `expect`, or None with a warning
    (the caller tunes again) when it is corrupt, of another version or another device."""
    try:
        profile = Profile(**json.loads(text))
        if profile.version != PROFILE_VERSION or min(profile.m, profile.n, profile.k) < 1:
            raise ValueError("unsupported profile version or shape")
    except (ValueError, TypeError) as exc:
        log.warning("[autotune] cached profile %s is unreadable (%s); rebuilding it", where, exc)
        return None
    mismatched = {name: getattr(profile, name) for name, value in expect.items() if getattr(profile, name) != value}
    if mismatched:
        log.warning("[autotune] cached profile %s was made for %s; rebuilding it", where, mismatched)
        return None
    return profile


class ProfileStore:
    """Profiles as JSON files in a cache directory, one per key, replaced atomically."""

    def __init__(self, directory: Path):
        self.directory = directory

    def path_for(self, key: str) -> Path:
        return self.directory / f"profile-{key}.json"

    def load(self, key: str, expect: dict) -> Profile | None:
        """The cached profile, or None (with a warning) when missing fields, corrupt or for
        another device: the caller rebuilds it."""
        path = self.path_for(key)
        if not path.exists():
            return None
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, ValueError) as exc:
            log.warning("[autotune] cached profile %s is unreadable (%s); rebuilding it", path, exc)
            return None
        return profile_from_json(text, expect, path)

    def save(self, profile: Profile) -> Path:
        path = self.path_for(profile.key)
        try:
            private_dir(self.directory)
            write_atomic(path, (json.dumps(asdict(profile), indent=2, sort_keys=True) + "\n").encode("utf-8"))
        except OSError as exc:  # a read-only cache is a warning: the next run tunes again
            log.warning("[autotune] cannot cache profile in %s: %s", self.directory, exc)
        return path


def _round(value: float, step: int) -> int:
    return max(step, int(round(value / step)) * step)


def measure_product_ms(backend: Backend, shape: Shape, repeats: int = 2) -> float:
    """Best of `repeats` products after one warm-up, in milliseconds."""
    backend.prepare(shape)
    backend.generate_inputs(1, 2)
    backend.multiply()
    return min(backend.multiply() for _ in range(repeats)) / 1e6


def autotune(backend: Backend, target_ms: int, *, start: int = 512, step: int = 64,
             max_side: int = 65536, max_bytes: int | None = None) -> Profile:
    """Probe square shapes, growing by at most 2× per probe (cube-root estimate), then one
    refinement from the closest probe; log each probe in the seed worker's format."""
    probes: dict[int, float] = {}

    def probe(side: int) -> float:
        ms = measure_product_ms(backend, Shape(side, side, side))
        probes[side] = ms
        log.info("[autotune] m,n,k=(%d,%d,%d) -> %d ms (|diff|=%d)", side, side, side, round(ms), round(abs(ms - target_ms)))
        return ms

    def fits(side: int) -> bool:
        return side <= max_side and (max_bytes is None or 16 * side * side <= max_bytes)

    side = _round(start, step)
    while True:
        ms = probe(side)
        if ms >= target_ms:
            break
        grow = min(2.0, (target_ms / max(ms, 0.01)) ** (1 / 3))
        nxt = max(side + step, _round(side * grow, step))
        if not fits(nxt):
            break
        side = nxt
    best = min(probes, key=lambda s: abs(probes[s] - target_ms))
    estimate = _round(best * (target_ms / max(probes[best], 0.01)) ** (1 / 3), step)
    if estimate not in probes and fits(estimate):
        probe(estimate)
        best = min(probes, key=lambda s: abs(probes[s] - target_ms))
    log.info("[autotune] chosen m,n,k=(%d,%d,%d)", best, best, best)
    return Profile(**_identity(backend, target_ms), m=best, n=best, k=best, measured_ms=round(probes[best], 3),
                   probes=[{"side": s, "ms": round(t, 3)} for s, t in sorted(probes.items())],
                   created_ms=int(time.time() * 1000), device_uuid=getattr(backend, "device_uuid", ""))


def resolve_profile(backend: Backend, target_ms: int, store: ProfileCache, *, retune: bool = False) -> tuple[Profile, bool]:
    """(profile, from_cache): the cached profile when its key matches, else a new one."""
    expect = _identity(backend, target_ms)
    key = profile_key(**expect)
    if not retune:
        cached = store.load(key, expect)
        if cached is not None:
            log.info("[autotune] using cached profile %s: m,n,k=(%d,%d,%d)", store.path_for(key), cached.m, cached.n, cached.k)
            return cached, True
    profile = autotune(backend, target_ms, **_search_limits(backend))
    path = store.save(profile)
    log.info("[autotune] profile cached at %s", path)
    return profile, False


def _search_limits(backend: Backend) -> dict:
    if backend.name == "numpy":
        try:
            available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            available = 8 << 30
        return {"start": 512, "step": 64, "max_bytes": available // 2}
    # Multiples of 256 (cuBLAS's tile sizes); sides whose buffers fit the device's free memory.
    return {"start": 4096, "step": 256, "max_bytes": getattr(backend, "memory_budget_bytes", None)}
