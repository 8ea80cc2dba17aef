"""Start-up validation: each bad variable exits 2 with its name, and secrets stay secret."""

from __future__ import annotations

import os
import stat

import pytest
from click.testing import CliRunner

from tests.support import TEST_KEY
from tops_job.cli import cli
from tops_job.config import load_config
from tops_job.errors import ConfigError, ExitCode

SECRET = TEST_KEY["secret_key_hex"]

BAD_VALUES = [
    ("WORKER_SK_HEX", "xyz", "64 hexadecimal"),
    ("WORKER_SK_HEX", "ab" * 31, "64 hexadecimal"),
    ("WORKER_SK_HEX", "00" * 32, "not a valid secp256k1"),
    ("WORKER_SK_HEX", "ff" * 32, "not a valid secp256k1"),
    ("AGGREGATOR_URL", "localhost:8081/verify", "http(s) URL"),
    ("AGGREGATOR_URL", "ftp://host/verify", "http(s) URL"),
    ("DEVICE_DID", "did with spaces", "printable"),
    ("AUTOTUNE_TARGET_MS", "fast", "not an integer"),
    ("AUTOTUNE_TARGET_MS", "0", "outside"),
    ("MAX_RETRIES", "-1", "outside"),
    ("MAX_RETRIES", "3.5", "not an integer"),
    ("RATE_LIMIT_PER_SECOND", "0", "outside"),
    ("RATE_LIMIT_PER_SECOND", "ten", "not a number"),
    ("METRICS_ENABLED", "maybe", "not a boolean"),
    ("WORKER_DEBUG_RECEIPT", "2", "not a boolean"),
    ("TOPS_JOB_BACKEND", "tpu", "not one of"),
    ("TOPS_JOB_DTYPE", "int4", "not one of"),
    ("TOPS_JOB_SIZE", "12,x", "N or M,N,K"),
    ("TOPS_JOB_SIZE", "0", "positive"),
    ("TOPS_JOB_OPENS", "300", "outside"),
    ("TOPS_JOB_ATTEMPTS", "0", "outside"),
    ("TOPS_JOB_RUN_ID", "bad/id", "A-Za-z0-9"),
    ("TOPS_JOB_HEALTH_PORT", "70000", "outside"),
    ("TOPS_JOB_DRAIN_TIMEOUT", "-5", "outside"),
]


@pytest.mark.parametrize("variable,value,message", BAD_VALUES, ids=[f"{v}={x[:10]}" for v, x, _ in BAD_VALUES])
def test_bad_variable_exits_2_naming_it(variable, value, message, monkeypatch):
    monkeypatch.setenv(variable, value)
    args = ["run"]
    if variable != "TOPS_JOB_ATTEMPTS":
        args += ["--attempts", "1"]
    if variable != "TOPS_JOB_SIZE":
        args += ["--size", "8"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == ExitCode.CONFIG_ERROR, result.output
    assert variable in result.output and message in result.output
    if variable == "WORKER_SK_HEX":
        assert value not in result.output


def test_flag_wins_over_environment_which_wins_over_default(monkeypatch):
    monkeypatch.setenv("MAX_RETRIES", "7")
    monkeypatch.setenv("AUTOTUNE_TARGET_MS", "250")
    config = load_config({"target_ms": 100}, need_key=False)
    assert (config.max_retries, config.target_ms, config.rate_limit_per_second) == (7, 100, 10.0)


def test_seed_variables_are_read(monkeypatch):
    env = {"WORKER_SK_HEX": SECRET, "AGGREGATOR_URL": "http://localhost:8081/verify", "DEVICE_DID": "did:peaq:DEVICE123",
           "METRICS_ENABLED": "1", "WORKER_DEBUG_RECEIPT": "true", "AUTOTUNE_TARGET_MS": "300", "MAX_RETRIES": "3",
           "RATE_LIMIT_PER_SECOND": "10"}
    config = load_config({}, environ={**os.environ, **env})
    assert config.key.secret.hex() == SECRET and config.key.origin == "WORKER_SK_HEX"
    assert config.aggregator_url == env["AGGREGATOR_URL"] and config.device_did == "did:peaq:DEVICE123"
    assert config.metrics_enabled and config.debug_receipt and config.max_retries == 3
    assert SECRET not in repr(config) and SECRET not in str(config.public_dict())
    lines = "\n".join(config.describe("did:peaq:DEVICE123", TEST_KEY["pubkey_hex"]))
    assert lines.startswith("[config] Loaded configuration:") and "Rate limit: 10/s" in lines and SECRET not in lines


def test_key_file_readable_by_others_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "worker.key"
    path.write_text(SECRET + "\n")
    os.chmod(path, 0o644)
    monkeypatch.setenv("TOPS_JOB_KEY_FILE", str(path))
    with pytest.raises(ConfigError) as info:
        load_config({})
    assert info.value.variable == "TOPS_JOB_KEY_FILE" and "chmod 600" in str(info.value)
    os.chmod(path, 0o600)
    assert load_config({}).key.secret.hex() == SECRET


def test_generated_key_is_created_once_with_mode_0600(isolated_env):
    first = load_config({})
    second = load_config({})
    assert first.key.generated and not second.key.generated
    assert first.key.secret == second.key.secret
    key_file = isolated_env["config"] / "worker.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


def test_default_did_is_the_keys_eth_address(monkeypatch):
    monkeypatch.setenv("WORKER_SK_HEX", (1).to_bytes(32, "big").hex())
    result = CliRunner().invoke(cli, ["keys", "show"])
    assert result.exit_code == 0, result.output
    # Secret key 1 is the generator point; its address is well known.
    assert "did:peaq:0x7E5F4552091A69125d5DfCb7b8C2659029395Bdf" in result.output


def test_concurrent_first_runs_agree_on_one_generated_key(isolated_env):
    """Workers started together (run --devices, a fleet on one node) race to generate the
    key; each must read a whole key, and all the same one."""
    import subprocess
    import sys
    import time

    start_at = time.time() + 2.0  # all imports done, then all at once
    code = ("import time; from tops_job.config import load_config\n"
            f"while time.time() < {start_at}: pass\n"
            "print(load_config({}).key.secret.hex())")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(6)]
    outputs = [proc.communicate(timeout=60) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), [err for _, err in outputs]
    assert len({out.strip() for out, _ in outputs}) == 1
    assert not [p for p in isolated_env["config"].iterdir() if p.name.startswith(".key-")]


def test_config_is_frozen_so_a_plugin_cannot_change_it():
    import dataclasses

    config = load_config({"attempts": 3}, environ={"WORKER_SK_HEX": SECRET}, need_key=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.attempts = 4  # type: ignore[misc]
    assert config.attempts == 3 and config.key_if_resolved() is None
    assert config.key.origin == "WORKER_SK_HEX" and config.key_if_resolved() is config.key
    assert SECRET not in repr(config) and "secret" not in config.public_dict()


def test_unknown_setting_names_are_a_bug_not_ignored():
    with pytest.raises(TypeError, match="no settings named"):
        load_config({"atempts": 3}, environ={}, need_key=False)


def test_log_format_is_validated_and_names_its_variable():
    result = CliRunner().invoke(cli, ["plugins"], env={"TOPS_JOB_LOG_FORMAT": "yaml"})
    assert result.exit_code == ExitCode.CONFIG_ERROR
    assert "TOPS_JOB_LOG_FORMAT" in result.output and "'yaml'" in result.output


def test_plugin_settings_parse_names_and_the_trace_switch():
    from tops_job.config import plugin_settings

    settings = plugin_settings({"TOPS_JOB_DISABLE_PLUGINS": " a, b ,,", "TOPS_JOB_TRACE_PLUGINS": "yes"})
    assert settings.disabled == {"a", "b"} and settings.only is None and settings.trace
    assert plugin_settings({"TOPS_JOB_LOAD_PLUGINS": ""}).only == frozenset()
