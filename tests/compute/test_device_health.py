"""NVML device health: counters read around the run, changes per attempt in the receipt's
telemetry, flagged attempts audited, and the changes in the summary (emulated GPU + a
pynvml stand-in)."""

from __future__ import annotations

from tests.support import fake_cupy, fake_nvml
from tops_job.compute import device_health
from tops_job.compute.base import Shape
from tops_job.compute.device_health import DeviceHealth


def test_readings_changes_and_xid_events():
    nvml = fake_nvml.FakeNvml()
    health = DeviceHealth(nvml, ("dev", 0))
    assert nvml.registered == device_health.NVML_EVENT_TYPE_XID_CRITICAL_ERROR
    before = health.read()
    assert before == {"ecc_corrected": 0, "ecc_uncorrected": 0, "retired_pages_sbe": 0, "retired_pages_dbe": 0,
                      "retired_pages_pending": 0, "remapped_rows_correctable": 0, "remapped_rows_uncorrectable": 0,
                      "remapped_rows_pending": 0, "remapped_rows_failure": 0, "xid_events": 0, "xid_last": 0}
    nvml.ecc[0] += 5
    assert not device_health.is_bad(device_health.changes(before, health.read()))  # corrected: not bad
    nvml.ecc[1] += 1
    nvml.remapped[1] += 2
    nvml.xids += [79, 48]
    delta = device_health.changes(before, health.read())
    assert delta == {"ecc_corrected": 5, "ecc_uncorrected": 1, "remapped_rows_uncorrectable": 2,
                     "xid_events": 2, "xid_last": 48}
    assert device_health.is_bad(delta)


def test_a_card_without_the_counters_reads_nothing():
    class Bare:
        def nvmlEventSetCreate(self):
            raise RuntimeError("not supported")

    assert DeviceHealth(Bare(), None).read() == {}


def signed(backend, attempt):
    from tops_job.job.attempt import Identity, run_attempt
    from tops_job.spec.signing import LocalKeySigner

    identity = Identity(did="did:peaq:0xhealth", signer=LocalKeySigner(bytes(range(1, 33))))
    return run_attempt(backend, Shape(16, 32, 16), identity, run_id="health", attempt=attempt, tile=8, opens=16)


def test_ecc_errors_during_an_attempt_are_in_its_receipt_flag_it_for_audit_and_reach_the_summary(monkeypatch):
    from tops_job.compute.cupy_backend import CupyBackend
    from tops_job.job.device_guard import DeviceGuard

    device = fake_cupy.install(monkeypatch)
    nvml = fake_nvml.install(monkeypatch)
    backend = CupyBackend("bfloat16")
    guard = DeviceGuard(backend, selftest=True, audit_every=1000)
    try:
        assert nvml.bus_ids == [device.pci_bus_id]  # NVML's handle found by PCI bus id
        assert backend.device_uuid == nvml.uuid
        guard.start()
        held = []
        for attempt in range(3):
            if attempt == 2:
                nvml.ecc[1] += 3
                nvml.xids.append(79)
            result = signed(backend, attempt)
            if guard.take(attempt, result):
                held.append(attempt)
        settled = guard.settled() + guard.finish()
    finally:
        backend.close()
    telemetry = result.receipt["telemetry"]
    assert telemetry["ecc_uncorrected_new"] == 3 and telemetry["xid_events_new"] == 1 and telemetry["xid_last"] == 79
    assert guard.flagged == 1 and guard.audited == 2  # attempt 0 (sample) and attempt 2 (flagged)
    assert held == [0, 2]  # the sample and the flagged attempt; attempt 1 went out at once
    assert guard.failure is None and sorted(a.attempt for a in settled) == [0, 2] and all(a.ok for a in settled)
    section = guard.section()
    assert section["health"]["changes"] == {"ecc_uncorrected": 3, "xid_events": 1, "xid_last": 79}
    assert nvml.uuid in section["device"] and device.pci_bus_id in section["device"]
