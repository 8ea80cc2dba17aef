"""One commit for the writes of the requests a poll thread serves in one turn.

A worker's poll thread runs its ready requests one after another (serve.py's inline lane),
and what an exchange records must be committed before its answer leaves. Committed one by
one, every exchange paid a commit of its own: an fsync, and with the 16 KiB pages each
modified page again in the WAL (0.28 ms of CPU an exchange on its own, 0.11 ms in
transactions of four: benchmarks/RESULTS.md, eleventh round), and the database's write turn,
which a server's worker processes share, taken once an exchange.

Here each request runs in a greenlet of the poll thread, and its write parks it
(GroupCommitStore.group_write calls `park`): the loop goes on to the next ready request.
Once every request of the turn has answered or parked, or the first parked has waited
`max_hold_s`, one transaction runs the parked writes in the order they parked; after its
commit each request resumes with its own outcome (or the storage error, a 503) and sends its
answer. So:
- no answer leaves before what it reports is committed;
- the writes run after the turn's verifications, not during them: no transaction, and no
  write turn of the database, is held open while a request verifies;
- a parked write is seen by other requests once committed, as with concurrent requests on
  threads; each write checks the record again when it runs (v2_store.py);
- a request that writes nothing (a read, a refusal) answers at once.

greenlet rather than a thread per request: the parked requests and the loop share one thread,
so a switch costs about a microsecond and no hand-over of the GIL, which is what the inline
lane exists to avoid.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

import greenlet

MAX_HOLD_S = 0.02  # the longest an answer waits for others' verifications before its commit
MAX_PARKED = 64


class ParkedWriter(Protocol):
    def write_parked(self, writes: list[Callable[[Any], Any]]) -> list[tuple[Any, BaseException | None]]:
        """Each write's (outcome, error), all run and committed together where they can be."""


MAX_IDLE = 64  # request greenlets a turn keeps for the next requests


class _Finished:
    """What a request greenlet hands back when its request has returned (`error`: what it raised)."""

    __slots__ = ("error",)

    def __init__(self, error: Exception | None):
        self.error = error


_PARKED = object()  # what a request greenlet hands back when its request parks at a write


class _Request(greenlet.greenlet):
    """A greenlet that runs a Turn's requests, one after another (current_turn finds the turn
    from here). Kept between requests: a new greenlet for each one cost a Python data stack
    mapped and unmapped, and its setting up and tearing down."""

    def __init__(self, turn: Turn):
        super().__init__(self._serve_each)
        self.turn = turn

    def _serve_each(self, run: Callable[[], None]) -> _Finished:
        while True:
            try:
                run()
                finished = _Finished(None)
            except Exception as exc:  # handed to whoever switched here last, and raised there
                finished = _Finished(exc)
            if len(self.turn._idle) >= MAX_IDLE:
                return finished  # this greenlet ends
            self.turn._idle.append(self)
            run = self.parent.switch(finished)


def current_turn() -> Turn | None:
    """The turn whose request is running on this thread now, if any."""
    return getattr(greenlet.getcurrent(), "turn", None)


class Turn:
    def __init__(self, max_hold_s: float = MAX_HOLD_S, max_parked: int = MAX_PARKED):
        self.max_hold_s = max_hold_s
        self.max_parked = max_parked
        self._parked: list[tuple[ParkedWriter, Callable[[Any], Any], greenlet.greenlet]] = []
        self._first_parked = 0.0
        self._idle: list[_Request] = []  # request greenlets between requests

    def serve(self, run: Callable[[], None]) -> None:
        """Runs `run()` in a request greenlet until it returns or parks at a write; what it
        raises is raised here (or, after a park, from `commit`)."""
        request = self._idle.pop() if self._idle else _Request(self)
        request.parent = greenlet.getcurrent()
        self._handed_back(request.switch(run))

    @staticmethod
    def _handed_back(result: Any) -> None:
        if result is not _PARKED and result.error is not None:
            raise result.error

    @property
    def due(self) -> bool:
        """Whether the parked writes should be committed before another request is served."""
        return bool(self._parked) and (len(self._parked) >= self.max_parked
                                       or time.monotonic() - self._first_parked >= self.max_hold_s)

    def park(self, writer: ParkedWriter, write: Callable[[Any], Any]) -> Any:
        """From a request of this turn: `write(conn)`'s outcome once committed (`writer`
        runs it); the loop serves other requests meanwhile."""
        current = greenlet.getcurrent()
        if not self._parked:
            self._first_parked = time.monotonic()
        self._parked.append((writer, write, current))
        return current.parent.switch(_PARKED)

    def commit(self) -> None:
        """Runs the parked writes, committed, and resumes each request with its outcome; a
        request that parks again is in the next round of this loop."""
        while self._parked:
            parked, self._parked = self._parked, []
            by_writer: dict[ParkedWriter, list[int]] = {}  # a writer's parked writes, by index
            for index, (writer, _, _) in enumerate(parked):
                by_writer.setdefault(writer, []).append(index)
            results: list[tuple[Any, BaseException | None]] = [(None, None)] * len(parked)
            for writer, indexes in by_writer.items():
                for index, result in zip(indexes, writer.write_parked([parked[i][1] for i in indexes])):
                    results[index] = result
            for (_, _, request), (outcome, error) in zip(parked, results):
                self._handed_back(request.switch(outcome) if error is None else request.throw(error))
