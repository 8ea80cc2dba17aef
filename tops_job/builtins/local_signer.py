"""The default signer: the worker's own secp256k1 key (WORKER_SK_HEX, key file, generated)."""

from __future__ import annotations

from .. import hookimpl
from ..signing import LocalKeySigner


@hookimpl(trylast=True)
def tops_job_signer(config):
    if config.key is None:
        return None
    return LocalKeySigner(config.key.secret)
