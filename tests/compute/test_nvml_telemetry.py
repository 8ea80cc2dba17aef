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


# ---- review fixes ------------------------------------------------------------------------------

def test_a_power_capped_gemm_at_lower_clocks_is_not_throttled():
    # Large GEMMs run against the power cap at ~1.3 GHz of 1.98: normal, not a throttled run.
    capped = [Sample(1300, 700_000, 60, nvml.REASON_SW_POWER_CAP)] * 3
    assert summarize(capped, 1980)["throttled"] == 0
    assert summarize([Sample(1300, 700_000, 60, 0)] * 3, 1980)["throttled"] == 1  # slow without a cap: flagged


class FieldValue(types.SimpleNamespace):
    pass


class HopperNvml(FakeNvml):
    """Power: the 1-second average differs from the instantaneous field (Hopper)."""

    def nvmlDeviceGetPowerUsage(self, handle):
        return 111_000

    def nvmlDeviceGetFieldValues(self, handle, fields):
        assert fields == [nvml.NVML_FI_DEV_POWER_INSTANT]
        return [FieldValue(nvmlReturn=0, value=types.SimpleNamespace(uiVal=690_000))]


def test_power_is_the_instantaneous_field_where_the_driver_has_it():
    sampler = NvmlSampler(HopperNvml([1800]), ("dev", 0))
    assert sampler.sample().power_mw == 690_000
    assert NvmlSampler(FakeNvml([1800]), ("dev", 0)).sample().power_mw == 650_000  # older drivers: the average


def test_samples_taken_outside_the_product_are_left_out():
    fake = FakeNvml([300, 1800])  # idle clock at start(), then the product's
    sampler = NvmlSampler(fake, ("dev", 0), interval_s=0.001)
    real_clock = fake.nvmlDeviceGetClockInfo
    # Once stop() is called the product is over: the card is back at its idle clock.
    fake.nvmlDeviceGetClockInfo = lambda h, kind: 250 if sampler._stop.is_set() else real_clock(h, kind)
    sampler.start()
    import time

    time.sleep(0.03)
    out = sampler.stop()
    assert out["sm_clock_min_mhz"] == 1800 and out["sm_clock_max_mhz"] == 1980
    assert out["samples"] >= 1
