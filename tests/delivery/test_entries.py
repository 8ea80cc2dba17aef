"""The per-receipt state table the sender drives: one state per receipt, never two."""

from __future__ import annotations

from tops_job.delivery.entries import Entries, State


def test_each_receipt_has_one_state_and_parked_ones_come_back_once():
    entries = Entries(cache_max=1)
    assert entries.add("a", receipt={"x": 1}) and entries.add("b", receipt={"x": 2}, earlier=True)
    assert not entries.add("a")  # known: not queued twice
    with entries.cond:
        first, second = entries.take(), entries.take()
        assert entries.take() is None
    assert (first.digest, second.digest) == ("a", "b") and first.state is second.state is State.IN_FLIGHT
    assert entries.receipt(first) == {"x": 1} and entries.receipt(second) is None  # the cache holds one
    assert not entries.mark_sent(first) and entries.mark_sent(first)
    entries.park(first, "max_retries", {"ok": False})
    entries.park(second, "unreadable")
    assert entries.reasons(State.PARKED) == {"max_retries": 1, "unreadable": 1} and entries.not_final() == 2
    assert entries.requeue(("max_retries", "breaker_open")) == 1
    assert entries.requeue(("max_retries",)) == 0  # already queued: not twice
    with entries.cond:
        again = entries.take()
        assert entries.take() is None
    assert again is first and again.sent  # a later round is a retry
    entries.finalize(again, "accepted")
    entries.park(again, "stopped")  # a final entry stays final
    assert again.state is State.FINAL and entries.reasons(State.FINAL) == {"accepted": 1}
    assert [e.digest for e in entries.open_entries()] == ["b"]
