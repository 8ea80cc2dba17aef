"""tops-receipt/2's challenge mode on a GPU (the emulated device, tests/support/fake_cupy.py):
the commitment's tree stays on the device until its challenge comes back, nothing of it goes
to disk, and an attempt whose tree is gone (a crash, a tree let go) is opened from its
commitment recomputed on the backend."""

from __future__ import annotations

import json
import os
import random

import pytest

from tests.support import fake_cupy, invoke
from tests.support.device_checks import kept_tree_opens_after_later_attempts
from tests.support.peers import Aggregator, FaultProxy, signed_digests, worker_env
from tops_job.compute.base import Shape
from tops_job.delivery.kept_trees import KeptTree, KeptTrees
from tops_job.errors import ExitCode
from tops_job.job.attempt import Identity
from tops_job.job.attempt_v2 import run_commit_attempt
from tops_job.job.device_guard import audit_v2
from tops_job.spec.errors import ReceiptInvalid
from tops_job.spec.signing import LocalKeySigner
from tops_job.spec.v2 import CHALLENGE

SHAPE = Shape(48, 128, 256)  # tile 64: two leaves a row, 96 in all
IDENTITY = Identity(did="did:peaq:0xkept", signer=LocalKeySigner(bytes(range(1, 33))))


@pytest.fixture
def device(monkeypatch):
    return fake_cupy.install(monkeypatch)


@pytest.fixture
def backend(device):
    from tops_job.compute.cupy_backend import CupyBackend

    engine = CupyBackend("float32", telemetry=False)
    yield engine
    engine.close()


def commit(backend, attempt=0):
    return run_commit_attempt(backend, SHAPE, IDENTITY, run_id="kept", attempt=attempt, tile=64, mode=CHALLENGE,
                              challenge=os.urandom(32))


def test_the_tree_stays_on_the_device_and_opens_after_later_attempts_overwrote_c(backend):
    kept_tree_opens_after_later_attempts(backend, SHAPE)  # on the card too: tests/compute/test_gpu_backend.py


def test_a_kept_tree_is_opened_with_one_transfer(backend, device):
    tree = commit(backend, 0).kept
    leaves = random.Random(8).choices(range(tree.leaf_count), k=64)
    before = device.transfers
    tree.open(leaves)
    assert device.transfers - before == 1  # every audit path at once; the values come from the seed


def test_a_tree_from_another_commitment_is_refused(backend):
    first, second = commit(backend, 0), commit(backend, 1)
    with pytest.raises(ValueError, match="root"):
        KeptTree(first.receipt, second.kept._commitment)


class Sized:
    def __init__(self, nbytes):
        self.nbytes = nbytes


def test_kept_trees_are_bounded_by_count_and_the_oldest_is_let_go():
    trees = KeptTrees(limit=2)
    for name in "abc":
        trees.put(name, Sized(10))  # type: ignore[arg-type]
    assert len(trees) == 2 and trees.let_go == 1
    assert trees.take("a") is None and trees.take("b") is not None and trees.take("b") is None


def test_kept_trees_are_bounded_by_device_memory_but_the_newest_always_stays():
    # A bfloat16 tree at an H200's autotuned side is ~8 GB: eight of them would not fit beside
    # the product's buffers on an 80 GB card.
    trees = KeptTrees(limit=8, limit_bytes=250)
    for name in "abc":
        trees.put(name, Sized(100))  # type: ignore[arg-type]
    assert len(trees) == 2 and trees.let_go == 1 and trees.take("a") is None
    trees.put("huge", Sized(1000))  # over the budget alone: kept, every older one let go
    assert len(trees) == 1 and trees.let_go == 3 and trees.take("huge") is not None
    trees.put("d", Sized(100))
    assert len(trees) == 1  # what was taken no longer counts


def test_the_run_bounds_kept_trees_by_the_cards_memory(backend):
    tree = commit(backend, 0).kept
    assert tree.nbytes > 0
    assert 0 < backend.keep_budget_bytes < backend.memory_budget_bytes


def test_the_self_audit_opens_a_kept_tree_and_catches_a_wrong_product(backend, device):
    audit_v2(commit(backend, 0), leaves=16)

    def add_one(target):
        target += 1  # every value of C off by one: any opened leaf shows it
    device.faults["gemm"] = add_one
    wrong = commit(backend, 1)
    with pytest.raises(ReceiptInvalid):
        audit_v2(wrong, leaves=4)


def _run(tmp_path, url, name, attempts, dtype="float32"):
    env = worker_env(tmp_path, TOPS_JOB_DRAIN_TIMEOUT="3")
    env.pop("TOPS_JOB_PROTOCOL")  # the default: v2, the challenge mode with an aggregator
    return invoke("run", "--backend", "cupy", "--dtype", dtype, "--size", f"{SHAPE.m},{SHAPE.n},{SHAPE.k}",
                  "--attempts", str(attempts), "--aggregator-url", url, "--receipts-out", str(tmp_path / f"{name}.jsonl"),
                  "--summary", str(tmp_path / f"{name}.summary.json"), env=env)


def test_a_run_on_the_gpu_writes_no_leaf_hashes_and_recomputes_what_a_crash_lost(tmp_path, device):
    agg = Aggregator(tmp_path / "agg.sqlite3", accept="v2")
    proxy = FaultProxy(agg.base, default="503")  # run challenges pass; no commitment gets its challenge
    try:
        first = _run(tmp_path, proxy.url.rsplit("/", 1)[0], "first", 3)
        assert first.exit_code == ExitCode.PENDING, first.output[-3000:]
        outbox = tmp_path / "outbox" / "v2"
        assert len(list(outbox.glob("*.commit.json"))) == 3
        assert list(outbox.glob("*.leaves")) == []  # the trees were on the device only, and are gone now

        other = _run(tmp_path, agg.base, "other", 1, dtype="bfloat16")  # cannot recompute float32 attempts
        assert other.exit_code == ExitCode.PENDING, other.output[-3000:]
        assert "left pending for a run on its device" in other.output
        assert len(list(outbox.glob("*.commit.json"))) == 3

        again = _run(tmp_path, agg.base, "again", 1)  # a new run: the earlier trees must be recomputed
        assert again.exit_code == ExitCode.OK, again.output[-3000:]
        summary = json.loads((tmp_path / "again.summary.json").read_text())
        assert summary["delivery"]["recomputed_to_open"] == 3 and summary["receipts"]["accepted"] == 4
        signed = [*signed_digests(tmp_path / "first.jsonl"), *signed_digests(tmp_path / "other.jsonl"),
                  *signed_digests(tmp_path / "again.jsonl")]
        assert sorted(agg.v2_accepted()) == sorted(signed)
        assert list(outbox.glob("*.commit.json")) == []
    finally:
        proxy.close()
        agg.stop()
