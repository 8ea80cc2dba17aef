"""Autotune profiles cached as JSON in the user cache directory."""

from __future__ import annotations

from tops_job import hookimpl
from tops_job.compute.autotune import ProfileStore


@hookimpl(trylast=True)
def tops_job_profile_store(config):
    return ProfileStore(config.cache_dir)
