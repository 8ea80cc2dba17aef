"""The S3 profile cache and summary upload against a moto server."""

from __future__ import annotations

import json
import logging

import pytest

from tops_job.compute.autotune import Profile
from tops_job.errors import ConfigError
from tops_job_aws.s3 import S3ProfileStore, upload_summary
from tops_job_aws.settings import parse_s3_url

PROFILE = Profile(backend="numpy", device="cpu x", dtype="float32", target_ms=300, m=640, n=640, k=640, measured_ms=301.5)
EXPECT = {"backend": "numpy", "device": "cpu x", "dtype": "float32", "target_ms": 300}


def test_parse_s3_url():
    assert parse_s3_url("V", "s3://bucket/a/b/") == ("bucket", "a/b")
    assert parse_s3_url("V", "s3://bucket") == ("bucket", "")
    for bad in ("https://bucket/x", "s3:///x", "bucket/x", "s3://b/x?y=1"):
        with pytest.raises(ConfigError, match="^V: "):
            parse_s3_url("V", bad)


def test_profile_round_trip_shared_through_the_bucket(s3, bucket):
    writer = S3ProfileStore.from_environment(bucket, "fleet/profiles")
    reader = S3ProfileStore.from_environment(bucket, "fleet/profiles")  # another worker
    assert reader.load(PROFILE.key, EXPECT) is None
    url = writer.save(PROFILE)
    assert url == f"s3://{bucket}/fleet/profiles/profile-{PROFILE.key}.json" == reader.path_for(PROFILE.key)
    stored = json.loads(s3.get_object(Bucket=bucket, Key=url.split("/", 3)[3])["Body"].read())
    assert stored["m"] == 640
    assert reader.load(PROFILE.key, EXPECT) == PROFILE
    assert reader.load(PROFILE.key, dict(EXPECT, device="other")) is None  # made for another device


def test_corrupt_or_unreachable_cache_is_a_warning(s3, bucket, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("tops_job"), "propagate", True)  # a CLI run in this process turns it off
    store = S3ProfileStore.from_environment(bucket, "")
    s3.put_object(Bucket=bucket, Key=f"profile-{PROFILE.key}.json", Body=b"{not json")
    with caplog.at_level(logging.WARNING):
        assert store.load(PROFILE.key, EXPECT) is None
        missing = S3ProfileStore.from_environment("no-such-bucket-here", "p")
        assert missing.load(PROFILE.key, EXPECT) is None
        assert missing.save(PROFILE).startswith("s3://no-such-bucket-here/p/")
    messages = " ".join(record.getMessage() for record in caplog.records)
    assert "unreadable" in messages and "cannot cache profile" in messages and "NoSuchBucket" in messages


def test_hook_profile_store_and_run_finished_through_the_plugin_manager(s3, bucket, monkeypatch):
    from tops_job.config import load_config
    from tops_job.plugins.manager import call_each, first_result, get_plugin_manager

    monkeypatch.setenv("TOPS_JOB_S3_PROFILE_URL", f"s3://{bucket}/profiles")
    monkeypatch.setenv("TOPS_JOB_S3_SUMMARY_URL", f"s3://{bucket}/summaries/")
    pm = get_plugin_manager({"TOPS_JOB_LOAD_PLUGINS": "aws"})
    config = load_config({}, need_key=False)
    store = first_result(pm, "tops_job_profile_store", config=config)
    assert isinstance(store, S3ProfileStore) and store.path_for("k") == f"s3://{bucket}/profiles/profile-k.json"
    call_each(pm, "tops_job_run_finished", summary={"run_id": "r-1", "exit_code": 0}, config=config)
    uploaded = json.loads(s3.get_object(Bucket=bucket, Key="summaries/r-1.json")["Body"].read())
    assert uploaded == {"run_id": "r-1", "exit_code": 0}
    assert not pm.hook_failures

    monkeypatch.setenv("TOPS_JOB_S3_PROFILE_URL", "https://not-s3/")
    with pytest.raises(ConfigError, match="TOPS_JOB_S3_PROFILE_URL"):
        first_result(pm, "tops_job_profile_store", config=config)


def test_upload_summary_failure_raises_for_the_run_to_count(bucket):
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError, match="NoSuchBucket"):
        upload_summary({"run_id": "r"}, "no-such-bucket-here", "")
