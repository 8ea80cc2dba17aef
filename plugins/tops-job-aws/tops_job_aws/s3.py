"""S3: an autotune profile cache shared by a fleet, and run summaries uploaded at the end."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from typing import Any

from tops_job import Profile, profile_from_json

from .s3_errors import missing
from .settings import client

log = logging.getLogger("tops_job_aws.s3")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


class S3ProfileStore:
    """tops_job.autotune.ProfileCache in s3://bucket/prefix/profile-<key>.json.

    Like the directory store, a cache problem is a warning and never an error: an
    unreadable or unreachable profile means this worker tunes again (and tries to save)."""

    def __init__(self, bucket: str, prefix: str, s3: Any):
        self.bucket = bucket
        self.prefix = prefix
        self._s3 = s3

    @classmethod
    def from_environment(cls, bucket: str, prefix: str) -> S3ProfileStore:
        return cls(bucket, prefix, client("s3"))

    def _key(self, key: str) -> str:
        return _join(self.prefix, f"profile-{key}.json")

    def path_for(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def load(self, key: str, expect: dict) -> Profile | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            body = self._s3.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except ClientError as exc:
            if not missing(exc):
                log.warning("[autotune] cannot read cached profile %s: %s", self.path_for(key), exc)
            return None
        except BotoCoreError as exc:
            log.warning("[autotune] cannot read cached profile %s: %s", self.path_for(key), exc)
            return None
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            log.warning("[autotune] cached profile %s is unreadable (%s); rebuilding it", self.path_for(key), exc)
            return None
        return profile_from_json(text, expect, self.path_for(key))

    def save(self, profile: Profile) -> str:
        from botocore.exceptions import BotoCoreError, ClientError

        url = self.path_for(profile.key)
        body = (json.dumps(asdict(profile), indent=2, sort_keys=True) + "\n").encode("utf-8")
        try:
            self._s3.put_object(Bucket=self.bucket, Key=self._key(profile.key), Body=body,
                                ContentType="application/json")
        except (BotoCoreError, ClientError) as exc:
            log.warning("[autotune] cannot cache profile in %s: %s", url, exc)
        return url


def upload_summary(summary: dict[str, Any], bucket: str, prefix: str, s3: Any = None) -> str:
    """Put the run summary at s3://bucket/prefix/<run id>.json; raises on failure (the
    run counts it in plugin_failures)."""
    key = _join(prefix, f"{summary['run_id']}.json")
    body = (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode("utf-8")
    (s3 or client("s3")).put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/json")
    url = f"s3://{bucket}/{key}"
    log.info("[summary] uploaded to %s", url)
    return url
