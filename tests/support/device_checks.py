"""Checks run on both the real GPU (tests/compute/test_gpu_backend.py, skipped without one)
and the emulated device (test_gpu_emulated.py, every CI run): a GPU-only test that CI never
runs drifts from the code it calls, so each such check also runs here on the emulator."""

from __future__ import annotations

from tops_job.compute.base import Shape


def selftest_and_self_audit_pass(backend, shape: Shape) -> None:
    """The device guard's known-answer self-test passes on `backend`, and three receipts made
    on it, each held for audit (audit_every=1), verify on the CPU and are released."""
    from tops_job.compute import selftest
    from tops_job.job.attempt import Identity, run_attempt
    from tops_job.job.device_guard import DeviceGuard
    from tops_job.spec.signing import LocalKeySigner

    guard = DeviceGuard(backend, selftest=True, audit_every=1)
    guard.start()
    assert guard.selftest_result.ok and guard.selftest_result.checked == list(selftest.STAGES)
    identity = Identity(did="did:peaq:0xgpu", signer=LocalKeySigner(bytes(range(1, 33))))
    held, settled, digests = [], [], []
    for attempt in range(3):
        result = run_attempt(backend, shape, identity, run_id="gpu-audit", attempt=attempt,
                             tile=min(backend.default_tile, shape.n), opens=16)
        digests.append(result.digest)
        if guard.take(attempt, result):
            held.append(attempt)
        settled += guard.settled()
    settled += guard.finish()
    assert held == [0, 1, 2]
    assert guard.failure is None and guard.audited == 3
    assert sorted(s.attempt for s in settled) == [0, 1, 2] and all(s.ok for s in settled)
    assert {s.digest for s in settled} == set(digests)
    assert backend.pci_bus_id and backend.pci_bus_id in guard.device
