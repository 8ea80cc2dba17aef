"""The default signer: the worker's own secp256k1 key (WORKER_SK_HEX, key file, generated).

Registered `trylast`, so any signer plugin that answers wins. The key is resolved here,
not when the configuration is loaded, so a worker that signs through a plugin (KMS) never
reads, needs or generates a local key.
"""

from __future__ import annotations

import os

from tops_job import hookimpl
from tops_job.keys import resolve_key
from tops_job.spec.signing import LocalKeySigner


@hookimpl(trylast=True)
def tops_job_signer(config):
    if config.key is None:
        config.key = resolve_key(dict(os.environ), config.config_dir)
    return LocalKeySigner(config.key.secret)
