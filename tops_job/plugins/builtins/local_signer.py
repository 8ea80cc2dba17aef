"""The default signer: the worker's own secp256k1 key (WORKER_SK_HEX, key file, generated).

Registered `trylast`, so any signer plugin that answers wins. The key is resolved here,
not when the configuration is loaded, so a worker that signs through a plugin (KMS) never
reads, needs or generates a local key.
"""

from __future__ import annotations

from tops_job import hookimpl
from tops_job.config import Config
from tops_job.spec.signing import LocalKeySigner


@hookimpl(trylast=True)
def tops_job_signer(config: Config) -> LocalKeySigner:
    return LocalKeySigner(config.key.secret)  # resolved (or generated) on first use
