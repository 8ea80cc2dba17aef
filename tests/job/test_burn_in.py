"""`tops-job selftest`: the burn-in table on the CPU and on the emulated GPU (with NVML),
and exit 5 naming the stage when the device corrupts one word."""

from __future__ import annotations

from click.testing import CliRunner

from tests.support import fake_cupy, fake_nvml
from tops_job.cli import cli
from tops_job.errors import ExitCode


def invoke(*args):
    return CliRunner().invoke(cli, ["selftest", *args], catch_exceptions=False)


def test_cpu_burn_in_passes_every_dtype(isolated_env):
    result = invoke("--backend", "numpy", "-n", "3", "--size", "32")
    assert result.exit_code == ExitCode.OK, result.output
    lines = [line for line in result.output.splitlines() if not line.startswith("[")]  # log lines aside
    assert lines[0].split()[:4] == ["device", "dtype", "check", "result"]
    rows = [line for line in lines if " pass " in line]
    assert len(rows) == 4  # self-test and self-audit for float32 and float64
    assert "3 receipts of (32,32,32) verified on the CPU" in result.output
    assert lines[-1].startswith("PASS")


def test_gpu_burn_in_on_the_emulated_device_reads_nvml_health(isolated_env, monkeypatch):
    device = fake_cupy.install(monkeypatch)
    nvml = fake_nvml.install(monkeypatch)
    result = invoke("--backend", "cupy", "--dtype", "int8", "--dtype", "bfloat16", "-n", "2", "--size", "64")
    assert result.exit_code == ExitCode.OK, result.output
    assert result.output.count(" pass ") == 6 and "no ECC, row remapping or Xid events" in result.output
    assert device.pci_bus_id in result.output and nvml.uuid in result.output


def test_a_corrupting_gpu_fails_with_exit_5_and_the_stage(isolated_env, monkeypatch):
    device = fake_cupy.install(monkeypatch)
    fake_nvml.install(monkeypatch)

    def flip_one(target):
        target.reshape(-1)[5] += 1
    device.faults["gemm"] = flip_one
    result = invoke("--backend", "cupy", "--dtype", "float32", "-n", "2", "--size", "64")
    assert result.exit_code == ExitCode.DEVICE_ERROR, result.output
    assert "FAIL" in result.output and "product differ: 1 of 9600 values of C differ" in result.output
    assert result.output.splitlines()[-1].startswith("FAIL")


def test_a_dtype_the_backend_lacks_is_a_config_error(isolated_env):
    result = CliRunner().invoke(cli, ["selftest", "--backend", "numpy", "--dtype", "int8"])
    assert result.exit_code == ExitCode.CONFIG_ERROR and "TOPS_JOB_DTYPE" in result.output
