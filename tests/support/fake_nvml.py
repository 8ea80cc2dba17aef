"""A pynvml stand-in for one card: clocks, power, temperature, and the health counters
(ECC, retired pages, remapped rows) and Xid events a test can make move mid-run."""

from __future__ import annotations

import sys
import types


class NVMLError_Timeout(Exception):  # noqa: N801 (pynvml's name)
    pass


class FakeNvml(types.SimpleNamespace):
    def __init__(self, uuid: str = "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"):
        super().__init__()
        self.uuid = uuid
        self.ecc = {0: 0, 1: 0}  # corrected, uncorrected (volatile)
        self.retired = {0: [], 1: []}
        self.remapped = [0, 0, 0, 0]
        self.xids: list[int] = []
        self.registered = 0
        self.bus_ids: list[str] = []

    # lifecycle and identity
    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetHandleByPciBusId(self, bus_id):
        self.bus_ids.append(bus_id)
        return ("dev", bus_id)

    def nvmlDeviceGetHandleByIndex(self, index):
        return ("dev", index)

    def nvmlDeviceGetUUID(self, handle):
        return self.uuid

    # readings during the product
    def nvmlDeviceGetMaxClockInfo(self, handle, kind):
        return 1980

    def nvmlDeviceGetClockInfo(self, handle, kind):
        return 1755

    def nvmlDeviceGetPowerUsage(self, handle):
        return 600_000

    def nvmlDeviceGetTemperature(self, handle, kind):
        return 60

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle):
        return 0

    # health
    def nvmlDeviceGetTotalEccErrors(self, handle, error_type, counter_type):
        return self.ecc[error_type]

    def nvmlDeviceGetRetiredPages(self, handle, cause):
        return list(self.retired[cause])

    def nvmlDeviceGetRetiredPagesPendingStatus(self, handle):
        return 0

    def nvmlDeviceGetRemappedRows(self, handle):
        return tuple(self.remapped)

    def nvmlEventSetCreate(self):
        return "event-set"

    def nvmlDeviceRegisterEvents(self, handle, types_, event_set):
        self.registered = types_

    def nvmlEventSetWait_v2(self, event_set, timeout_ms):
        if not self.xids:
            raise NVMLError_Timeout()
        return types.SimpleNamespace(eventType=0x8, eventData=self.xids.pop(0))

    def nvmlEventSetFree(self, event_set):
        pass


def install(monkeypatch, nvml: FakeNvml | None = None) -> FakeNvml:
    nvml = nvml or FakeNvml()
    module = types.ModuleType("pynvml")
    for name in dir(nvml):
        if name.startswith("nvml"):
            setattr(module, name, getattr(nvml, name))
    monkeypatch.setitem(sys.modules, "pynvml", module)
    return nvml
