"""NVML telemetry: summaries of readings, the sampler against a fake pynvml, absence → none."""

from __future__ import annotations

import sys
import types

from tops_job.compute import nvml
from tops_job.compute.nvml import NvmlSampler, Sample, summarize


def test_summary_of_a_power_capped_but_unthrottled_product():
    samples = [Sample(1755, 690_000, 61, nvml.REASON_SW_POWER_CAP), Sample(1785, 700_000, 63, 0)]
    out = summarize(samples, max_clock_mhz=1980)
    assert out == {"sm_clock_mhz": 1770, "sm_clock_min_mhz": 1755, "sm_clock_max_mhz": 1980,
                   "power_mw": 695_000, "power_max_mw": 700_000, "temp_c": 63,
                   "throttle_reasons": 4, "power_capped": 1, "throttled": 0, "samples": 2}
    assert all(isinstance(v, int) for v in out.values())


def test_thermal_slowdown_or_low_clock_flags_the_run():
    assert summarize([Sample(1900, 1, 90, nvml.REASON_HW_THERMAL)], 1980)["throttled"] == 1
    assert summarize([Sample(1000, 1, 50, 0)], 1980)["throttled"] == 1
    assert summarize([Sample(1000, 1, 50, 0)], 1980, clock_ratio=0.5)["throttled"] == 0
    assert summarize([], 1980) == {}


class FakeNvml(types.SimpleNamespace):
    def __init__(self, clocks):
        super().__init__()
        self.clocks = list(clocks)
        self.shut = False

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        self.shut = True

    def nvmlDeviceGetHandleByIndex(self, index):
        return ("dev", index)

    def nvmlDeviceGetMaxClockInfo(self, handle, kind):
        return 1980

    def nvmlDeviceGetUUID(self, handle):
        return "GPU-12345678-abcd-ef01-2345-6789abcdef01"

    def nvmlDeviceGetClockInfo(self, handle, kind):
        return self.clocks.pop(0) if len(self.clocks) > 1 else self.clocks[0]

    def nvmlDeviceGetPowerUsage(self, handle):
        return 650_000

    def nvmlDeviceGetTemperature(self, handle, kind):
        return 55

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle):
        raise RuntimeError("not supported")  # a reading that fails counts as no reasons


def test_sampler_polls_between_start_and_stop():
    fake = FakeNvml([1800, 1700])
    sampler = NvmlSampler(fake, ("dev", 0), interval_s=0.001)
    assert sampler.uuid.startswith("GPU-") and sampler.max_clock_mhz == 1980
    sampler.start()
    import time

    time.sleep(0.03)
    out = sampler.stop()
    assert out["samples"] >= 3 and out["sm_clock_min_mhz"] == 1700 and out["throttle_reasons"] == 0
    assert out["power_mw"] == 650_000 and out["throttled"] == 0
    sampler.close()
    assert fake.shut


def test_without_nvidia_ml_py_there_is_no_sampler(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml → ImportError
    assert nvml.load_nvml() is None
    assert NvmlSampler.for_cuda_device(0) is None
