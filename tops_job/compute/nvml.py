"""NVML telemetry during the product: SM clock, power, temperature, throttle reasons.

`nvidia-ml-py` (module `pynvml`) is imported lazily; without it, or without a driver that
answers, the sampler is absent and the receipt has no `telemetry`. A background thread polls
every `interval_s` between start() and stop(); stop() returns the readings summarised as
string → int, the receipt's `telemetry` object:

- sm_clock_mhz: mean SM clock; sm_clock_min_mhz; sm_clock_max_mhz: the device's maximum
- power_mw: mean board power; power_max_mw (the instantaneous field where the driver has it:
  on Hopper nvmlDeviceGetPowerUsage is a one-second average, longer than many products)
- temp_c: highest GPU temperature
- throttle_reasons: OR of NVML's clock-event reason bits seen
- power_capped: 1 when the software power cap held the clocks (normal for large GEMMs)
- throttled: 1 when thermal or hardware slowdown was seen, or the mean SM clock was below
  `clock_ratio` of the maximum without the power cap to explain it (a large GEMM at the
  power cap runs well below the maximum clock: that is normal): the summary counts these
- samples: readings taken while the product ran (the readings at start() and stop() are
  outside it and count only when the product was too short for any other)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

# nvmlClocksEventReasons bits (nvml.h)
REASON_SW_POWER_CAP = 0x4
REASON_HW_SLOWDOWN = 0x8
REASON_SW_THERMAL = 0x20
REASON_HW_THERMAL = 0x40
REASON_HW_POWER_BRAKE = 0x80
SLOWDOWN_REASONS = REASON_HW_SLOWDOWN | REASON_SW_THERMAL | REASON_HW_THERMAL | REASON_HW_POWER_BRAKE
THROTTLE_CLOCK_RATIO = 0.75
NVML_CLOCK_SM = 1
NVML_TEMPERATURE_GPU = 0
NVML_FI_DEV_POWER_INSTANT = 186  # nvml.h: instantaneous power (mW), driver 535+


@dataclass(frozen=True)
class Sample:
    sm_clock_mhz: int
    power_mw: int
    temp_c: int
    reasons: int


def summarize(samples: list[Sample], max_clock_mhz: int, clock_ratio: float = THROTTLE_CLOCK_RATIO) -> dict[str, int]:
    """The telemetry object for `samples` (empty when there are none)."""
    if not samples:
        return {}
    clocks = [s.sm_clock_mhz for s in samples]
    powers = [s.power_mw for s in samples]
    reasons = 0
    for s in samples:
        reasons |= s.reasons
    mean_clock = round(sum(clocks) / len(clocks))
    slow_clock = (max_clock_mhz > 0 and mean_clock < clock_ratio * max_clock_mhz
                  and not reasons & REASON_SW_POWER_CAP)
    return {
        "sm_clock_mhz": mean_clock,
        "sm_clock_min_mhz": min(clocks),
        "sm_clock_max_mhz": max(0, int(max_clock_mhz)),
        "power_mw": round(sum(powers) / len(powers)),
        "power_max_mw": max(powers),
        "temp_c": max(s.temp_c for s in samples),
        "throttle_reasons": reasons,
        "power_capped": int(bool(reasons & REASON_SW_POWER_CAP)),
        "throttled": int(bool(reasons & SLOWDOWN_REASONS) or slow_clock),
        "samples": len(samples),
    }


def load_nvml() -> Any | None:
    """pynvml, initialised, or None when the package or the driver is missing."""
    try:
        import pynvml
    except Exception:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:
        return None
    return pynvml


class NvmlSampler:
    """Polls one device's readings on a thread while the product runs."""

    def __init__(self, nvml: Any, handle: Any, interval_s: float = 0.01, clock_ratio: float = THROTTLE_CLOCK_RATIO):
        self._nvml, self._handle = nvml, handle
        self.interval_s, self.clock_ratio = interval_s, clock_ratio
        self._reasons_fn = (getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
                            or getattr(nvml, "nvmlDeviceGetCurrentClocksThrottleReasons", None))
        self.max_clock_mhz = self._call(nvml.nvmlDeviceGetMaxClockInfo, handle, NVML_CLOCK_SM) or 0
        uuid = self._call(nvml.nvmlDeviceGetUUID, handle)
        self.uuid = (uuid.decode() if isinstance(uuid, bytes) else str(uuid or ""))[:64]
        self._samples: list[Sample] = []
        self._edges: list[Sample] = []
        self._no_instant_power = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def for_cuda_device(cls, device_index: int, **kwargs) -> NvmlSampler | None:
        """The sampler for CUDA device `device_index`, matched by PCI bus id (CUDA and NVML
        number devices differently under CUDA_VISIBLE_DEVICES), or None without NVML."""
        nvml = load_nvml()
        if nvml is None:
            return None
        try:
            import cupy

            bus_id = cupy.cuda.runtime.deviceGetPCIBusId(device_index)
            try:  # nvidia-ml-py 12+ takes str; older releases want bytes
                handle = nvml.nvmlDeviceGetHandleByPciBusId(bus_id)
            except Exception:
                handle = nvml.nvmlDeviceGetHandleByPciBusId(bus_id.encode() if isinstance(bus_id, str) else bus_id)
        except Exception:
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(device_index)
            except Exception:
                return None
        return cls(nvml, handle, **kwargs)

    @staticmethod
    def _call(fn, *args):
        try:
            return fn(*args)
        except Exception:
            return None

    @property
    def nvml(self) -> Any:
        return self._nvml

    @property
    def handle(self) -> Any:
        return self._handle

    def sample(self) -> Sample | None:
        nvml, h = self._nvml, self._handle
        clock = self._call(nvml.nvmlDeviceGetClockInfo, h, NVML_CLOCK_SM)
        if clock is None:
            return None
        power = self._instant_power() or self._call(nvml.nvmlDeviceGetPowerUsage, h) or 0
        temp = self._call(nvml.nvmlDeviceGetTemperature, h, NVML_TEMPERATURE_GPU) or 0
        reasons = (self._call(self._reasons_fn, h) if self._reasons_fn else 0) or 0
        return Sample(int(clock), int(power), int(temp), int(reasons))

    def _instant_power(self) -> int | None:
        fn = getattr(self._nvml, "nvmlDeviceGetFieldValues", None)
        if fn is None or self._no_instant_power:
            return None
        try:
            value = fn(self._handle, [NVML_FI_DEV_POWER_INSTANT])[0]
            if getattr(value, "nvmlReturn", 1) == 0:
                return int(value.value.uiVal)
        except Exception:
            pass
        self._no_instant_power = True  # not on this driver: ask once
        return None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            reading = self.sample()
            if reading is not None and not self._stop.is_set():  # taken while the product ran
                self._samples.append(reading)

    def start(self) -> None:
        self._samples = []
        self._stop.clear()
        self._edges = [s for s in (self.sample(),) if s is not None]
        self._thread = threading.Thread(target=self._run, name="tops-nvml", daemon=True)
        self._thread.start()

    def stop(self) -> dict[str, int]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if not self._samples:  # a product shorter than the interval: the edges are all there is
            last = self.sample()
            self._samples = self._edges + ([last] if last is not None else [])
        return summarize(self._samples, self.max_clock_mhz, self.clock_ratio)

    def close(self) -> None:
        if self._thread is not None:
            self.stop()
        try:
            self._nvml.nvmlShutdown()
        except Exception:
            pass
