"""The outbox as a directory on the instance's disk or a mounted volume (TOPS_JOB_OUTBOX_DIR)."""

from __future__ import annotations

from tops_job import hookimpl
from tops_job.delivery.backend import LocalOutbox


@hookimpl(trylast=True)
def tops_job_outbox(config):
    return LocalOutbox(config.outbox)
