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


def kept_tree_opens_after_later_attempts(backend, shape: Shape) -> None:
    """tops-receipt/2's challenge mode on `backend`: an attempt's tree stays on the device
    (no leaf hashes copied back) and opens correctly, as the verifier checks it, after two
    later attempts overwrote C and the inputs."""
    import os
    import random

    from tops_job.delivery.kept_trees import KeptTree
    from tops_job.job.attempt import Identity
    from tops_job.job.attempt_v2 import run_commit_attempt, v2_tile
    from tops_job.spec.signing import LocalKeySigner
    from tops_job.spec.v2 import CHALLENGE, header_of
    from tops_job.spec.v2.openings import check_openings

    identity = Identity(did="did:peaq:0xkept", signer=LocalKeySigner(bytes(range(1, 33))))
    tile = v2_tile(64, shape.k, shape.n, CHALLENGE)

    def commit(attempt: int):
        return run_commit_attempt(backend, shape, identity, run_id="kept", attempt=attempt, tile=tile,
                                  mode=CHALLENGE, challenge=os.urandom(32))

    first = commit(0)
    assert first.leaf_hashes is None and isinstance(first.kept, KeptTree)
    later = [commit(attempt) for attempt in (1, 2)]
    leaves = random.Random(7).choices(range(first.kept.leaf_count), k=64)
    check_openings(header_of(first.receipt), leaves, first.kept.open(leaves))  # the verifier's own check
    for result in later:
        check_openings(header_of(result.receipt), leaves[:8], result.kept.open(leaves[:8]))
