"""tops-job-aws: AWS KMS signer, S3 outbox, S3 profile cache and S3 summary upload.

The hook implementations below are the plugin's whole surface; boto3 is imported only
when a setting turns a part on, so an idle plugin costs nothing at start-up.
"""

from __future__ import annotations

import os
from typing import Any

from tops_job import hookimpl

from .settings import KMS_KEY_ID, S3_OUTBOX_LEASE_S, S3_OUTBOX_URL, S3_PROFILE_URL, S3_SUMMARY_URL, parse_s3_url


@hookimpl
def tops_job_signer(config: Any) -> Any:
    key_id = os.environ.get(KMS_KEY_ID, "").strip()
    if not key_id:
        return None
    from .kms import KmsSigner

    return KmsSigner.from_environment(key_id)


@hookimpl
def tops_job_outbox(config: Any) -> Any:
    url = os.environ.get(S3_OUTBOX_URL, "").strip()
    if not url:
        return None
    from .s3_outbox import S3Outbox
    from .settings import client, outbox_lease_s

    bucket, prefix = parse_s3_url(S3_OUTBOX_URL, url)
    return S3Outbox(bucket, prefix, client("s3"), outbox_lease_s(os.environ.get(S3_OUTBOX_LEASE_S, "")))


@hookimpl
def tops_job_profile_store(config: Any) -> Any:
    url = os.environ.get(S3_PROFILE_URL, "").strip()
    if not url:
        return None
    from .s3 import S3ProfileStore

    bucket, prefix = parse_s3_url(S3_PROFILE_URL, url)
    return S3ProfileStore.from_environment(bucket, prefix)


@hookimpl
def tops_job_run_finished(summary: dict[str, Any], config: Any) -> None:
    url = os.environ.get(S3_SUMMARY_URL, "").strip()
    if not url:
        return
    from .s3 import upload_summary

    upload_summary(summary, *parse_s3_url(S3_SUMMARY_URL, url))


@hookimpl
def tops_job_register_commands(cli: Any) -> None:
    from .cli import aws

    cli.add_command(aws)
