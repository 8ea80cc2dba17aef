"""The plugin's settings (environment variables) and its AWS clients."""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

from tops_job import ConfigError

from .s3_leases import MAX_LEASE_S

KMS_KEY_ID = "TOPS_JOB_KMS_KEY_ID"
S3_PROFILE_URL = "TOPS_JOB_S3_PROFILE_URL"
S3_SUMMARY_URL = "TOPS_JOB_S3_SUMMARY_URL"
S3_OUTBOX_URL = "TOPS_JOB_S3_OUTBOX_URL"
S3_OUTBOX_LEASE_S = "TOPS_JOB_S3_OUTBOX_LEASE_S"
DEFAULT_LEASE_S = 60.0
DEFAULT_MAX_ATTEMPTS = 5


def parse_s3_url(variable: str, text: str) -> tuple[str, str]:
    """s3://bucket[/prefix] -> (bucket, prefix without surrounding slashes)."""
    parts = urlsplit(text.strip())
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise ConfigError(variable, f"{text!r} is not an s3://bucket/prefix URL")
    return parts.netloc, parts.path.strip("/")


def outbox_lease_s(text: str) -> float:
    """TOPS_JOB_S3_OUTBOX_LEASE_S: seconds a run's lease lives without renewal (3 to 86400)."""
    if not text.strip():
        return DEFAULT_LEASE_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 3 <= value <= MAX_LEASE_S:
        raise ConfigError(S3_OUTBOX_LEASE_S, f"{text!r} is not a number of seconds from 3 to {MAX_LEASE_S:.0f}")
    return value


def _max_attempts(text: str) -> int:
    if not text:
        return DEFAULT_MAX_ATTEMPTS
    if not text.isdigit() or int(text) < 1:
        raise ConfigError("AWS_MAX_ATTEMPTS", f"{text!r} is not a whole number of attempts (1 or more)")
    return int(text)


def client(service: str, region: str | None = None) -> Any:
    """A boto3 client with the SDK's `standard` retry mode (throttling and transient
    errors retried with backoff) and bounded timeouts. Credentials and endpoint
    (AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_KMS, …) come from the usual SDK sources; so does
    the region unless `region` names one (a KMS key ARN's region: keys are regional)."""
    import boto3
    from botocore.config import Config

    max_attempts = _max_attempts(os.environ.get("AWS_MAX_ATTEMPTS", "").strip())
    session = boto3.session.Session()
    # boto3 reads AWS_DEFAULT_REGION (and profiles); AWS_REGION is what the other SDKs and
    # the container platforms set.
    region = region or session.region_name or os.environ.get("AWS_REGION")
    if region is None:
        raise ConfigError("AWS_REGION", f"no AWS region is configured for {service}; set AWS_REGION or AWS_DEFAULT_REGION")
    config = Config(retries={"mode": "standard", "max_attempts": max_attempts},
                    connect_timeout=5, read_timeout=20, user_agent_extra="tops-job-aws")
    return session.client(service, region_name=region, config=config)
