"""serve.py's inline lane over real sockets: cheap requests run on the poll thread, a costly
one is handed to a pool thread with its body intact, and neither holds up the other."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing, contextmanager
from typing import Any
from urllib.parse import parse_qs

import pytest
import requests

from tops_job.aggregator import guard, serve


def lanes_app(gate: guard.VerifyGate) -> Any:
    """POST /work?cost=N&sleep=S takes the gate at cost N, sleeps S s, and says where it ran;
    GET /big?size=N answers N bytes; GET /entered lists the tags of every start of /work."""
    entered: list[str] = []

    def answer(start_response: Any, value: Any) -> list[bytes]:
        data = json.dumps(value).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
        return [data]

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        query = {name: values[0] for name, values in parse_qs(environ.get("QUERY_STRING", "")).items()}
        if environ["PATH_INFO"] == "/big":
            size, chunk = int(query["size"]), b"x" * 65536
            start_response("200 OK", [("Content-Length", str(size))])
            return (chunk for _ in range(size // len(chunk)))
        if environ["PATH_INFO"] == "/entered":
            return answer(start_response, entered)
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        entered.append(query.get("tag", ""))
        token = gate.acquire(int(query.get("cost", "1")))  # raises RunInThread on the poll thread when costly
        if token is None:  # no slot, or no costly turn, in time
            data = json.dumps({"tag": query.get("tag", ""), "busy": True}).encode()
            start_response("503 Service Unavailable", [("Content-Type", "application/json"),
                                                       ("Content-Length", str(len(data)))])
            return [data]
        try:
            time.sleep(float(query.get("sleep", "0")))
        finally:
            gate.release(token)
        return answer(start_response, {"tag": query.get("tag", ""), "poll_thread": guard.on_poll_thread(),
                                       "token": token, "body_sha256": hashlib.sha256(body).hexdigest(),
                                       "body_len": len(body)})

    return app


def recording_app(path: str) -> Any:
    """POST /record?tag=T&sleep=S holds the thread S s (as a verification would), then records
    T through the group commit on a real SQLite file; GET /transactions: how many write
    transactions the store has run."""
    from tests.support.transactions import count_transactions
    from tops_job.aggregator.group_commit import GroupCommitStore
    from tops_job.aggregator.store_pg import open_store

    opened = open_store(path)
    transactions = count_transactions(opened)
    store = GroupCommitStore(opened)

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        query = {name: values[0] for name, values in parse_qs(environ.get("QUERY_STRING", "")).items()}
        if environ["PATH_INFO"] == "/transactions":
            value: Any = len(transactions)
        else:
            time.sleep(float(query.get("sleep", "0")))
            store.group_write(lambda conn: conn.execute("INSERT INTO v2_runs (run_id, pubkey) VALUES (?, 'x')",
                                                        (query["tag"],)))
            value = {"tag": query["tag"], "poll_thread": guard.on_poll_thread()}
        data = json.dumps(value).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
        return [data]

    return app


def counting_sends_app() -> Any:
    """lanes_app, keeping in the server's process what each send() of its connections sent:
    GET /sends lists them."""
    sends: list[str] = []
    own_send = serve.GuardedChannel.send

    def send(self: Any, data: bytes, do_close: bool = True) -> Any:
        sent = own_send(self, data, do_close)
        sends.append(bytes(data[:sent]).decode("latin-1"))
        return sent

    serve.GuardedChannel.send = send  # type: ignore[method-assign]  # the forked server's own class
    lanes = lanes_app(guard.VerifyGate(2, inline_cost=1000))

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if environ["PATH_INFO"] == "/sends":
            data = json.dumps(sends).encode()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
            return [data]
        return lanes(environ, start_response)

    return app


def _serve(sock: socket.socket, inline: bool, inline_cost: int, high_watermark: int | None,
           app: Callable[[], Any] | None = None, costly_on_poll: bool = False, slot_wait_s: float | None = None) -> None:
    if slot_wait_s is not None:
        serve.SLOT_WAIT_S = slot_wait_s  # this forked server's own module
    served = app() if app is not None else lanes_app(guard.VerifyGate(2, inline_cost=inline_cost))
    server = serve.make_server(served, sock, threads=4, limit=200,
                               header_timeout=5.0, body_timeout=5.0, idle_timeout=30, max_request_body_size=1 << 22,
                               inline=inline, costly_on_poll=costly_on_poll)
    if high_watermark is not None:
        server.adj.outbuf_high_watermark = high_watermark
    server.run()


@contextmanager
def serving(*, inline: bool = True, inline_cost: int = 1000, high_watermark: int | None = None,
            app: Callable[[], Any] | None = None, costly_on_poll: bool = False,
            slot_wait_s: float | None = None) -> Iterator[str]:
    """A server in a process of its own, as in production (forked: it shares this one's code);
    `app` makes its WSGI app there (lanes_app by default)."""
    sock = serve.bind("127.0.0.1", 0)
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    child = multiprocessing.get_context("fork").Process(target=_serve, args=(sock, inline, inline_cost, high_watermark,
                                                                             app, costly_on_poll, slot_wait_s),
                                                        daemon=True)
    child.start()
    sock.close()  # the child's now
    try:
        yield base
    finally:
        child.terminate()
        child.join(10)
        assert child.exitcode is not None


def _entered(base: str) -> list[str]:
    return list(requests.get(f"{base}/entered", timeout=10).json())


def test_cheap_requests_run_on_the_poll_thread_and_costly_ones_on_a_pool_thread_with_their_body(tmp_path):
    body = bytes(range(256)) * 1200  # 300 KB: read once on the poll thread, then again on the pool thread
    with serving() as base:
        cheap = requests.post(f"{base}/work?cost=10&tag=cheap", data=body, timeout=10).json()
        costly = requests.post(f"{base}/work?cost=5000&tag=costly", data=body, timeout=10).json()
        unknown = requests.post(f"{base}/work?cost=1000&tag=edge", data=b"", timeout=10).json()
        entered = _entered(base)
    assert cheap["poll_thread"] is True and cheap["token"] == "inline"
    assert costly["poll_thread"] is False and costly["token"] == "slot"
    assert unknown["poll_thread"] is True  # at the inline cost itself: still inline
    expected = hashlib.sha256(body).hexdigest()
    assert cheap["body_sha256"] == costly["body_sha256"] == expected and costly["body_len"] == len(body)
    assert entered == ["cheap", "costly", "costly", "edge"]  # the costly one started over on its thread


def test_a_costly_request_on_a_thread_does_not_hold_up_cheap_ones():
    with serving() as base:
        slow: dict[str, Any] = {}

        def post_costly() -> None:
            slow["answer"] = requests.post(f"{base}/work?cost=5000&sleep=1.5&tag=slow", timeout=10).json()

        background = threading.Thread(target=post_costly)
        background.start()
        time.sleep(0.2)
        began = time.monotonic()
        session = requests.Session()
        answers = [session.post(f"{base}/work?cost=1&tag=quick{i}", timeout=10).json() for i in range(20)]
        cheap_seconds = time.monotonic() - began
        background.join()
    assert all(answer["poll_thread"] for answer in answers)
    assert cheap_seconds < 1.0, f"20 cheap requests took {cheap_seconds:.2f} s beside a 1.5 s costly one"
    assert slow["answer"]["poll_thread"] is False


def test_a_connection_whose_request_needed_a_thread_sends_the_next_to_one_directly():
    """The poll thread parses a costly request once only to hand it over; after that the
    connection's requests go to a thread until one of them turns out cheap."""
    with serving() as base:
        session = requests.Session()  # one keep-alive connection
        where = [session.post(f"{base}/work?cost={cost}&tag={tag}", timeout=10).json()["poll_thread"]
                 for cost, tag in ((5000, "a"), (5000, "b"), (1, "c"), (1, "d"))]
        entered = _entered(base)
    assert where == [False, False, False, True]
    assert entered == ["a", "a", "b", "c", "d"]  # only the first was started on the poll thread


def test_with_costly_on_poll_a_costly_request_runs_in_the_poll_threads_costly_turn_with_its_body():
    """A worker per core: the costly request is parsed in the cheap turn, raises RunInThread,
    and runs again from the start in its own turn on the poll thread; the connection's next
    costly request goes to that turn at once, and a cheap one takes it back to the cheap turn."""
    body = bytes(range(256)) * 1200
    with serving(costly_on_poll=True) as base:
        session = requests.Session()
        answers = [session.post(f"{base}/work?cost={cost}&tag={tag}", data=body, timeout=10).json()
                   for cost, tag in ((5000, "a"), (5000, "b"), (1, "c"), (1, "d"))]
        entered = _entered(base)
    assert [answer["poll_thread"] for answer in answers] == [True] * 4
    assert [answer["token"] for answer in answers] == ["inline"] * 4  # no slot: the poll thread is the lane
    assert {answer["body_sha256"] for answer in answers} == {hashlib.sha256(body).hexdigest()}
    assert entered == ["a", "a", "b", "c", "d"]


def test_with_costly_on_poll_a_cheap_request_waits_behind_one_costly_request_at_most():
    """Three costly requests of 0.6 s each arrive together: they run one a turn, and the cheap
    requests sent meanwhile on an open connection are answered between them, not after all
    three."""
    with serving(costly_on_poll=True) as base:
        costly: dict[str, Any] = {}

        def post_costly(tag: str) -> None:
            costly[tag] = requests.post(f"{base}/work?cost=5000&sleep=0.6&tag={tag}", timeout=20).json()

        posters = [threading.Thread(target=post_costly, args=(f"slow{i}",)) for i in range(3)]
        for poster in posters:
            poster.start()
        session, waits = requests.Session(), []
        session.post(f"{base}/work?cost=1&tag=connect", timeout=10)  # an open connection, as a worker's
        time.sleep(0.2)
        began = time.monotonic()
        while time.monotonic() - began < 1.6:
            sent = time.monotonic()
            assert session.post(f"{base}/work?cost=1&tag=quick", timeout=10).json()["poll_thread"] is True
            waits.append(time.monotonic() - sent)
        for poster in posters:
            poster.join()
    assert sorted(costly) == ["slow0", "slow1", "slow2"] and all(a["poll_thread"] for a in costly.values())
    assert max(waits) < 0.6 + 0.3, f"a cheap request waited {max(waits):.2f} s: behind more than one costly one"
    assert len(waits) >= 3  # answered between the costly ones, not only after the last


def test_with_costly_on_poll_a_costly_request_that_waited_past_the_slot_wait_is_answered_busy():
    """As a thread's wait for a verification slot is bounded, so is a costly request's wait for
    its turn: past it, 503 without running the work. Three costly requests arrive while a
    fourth runs (0.8 s each, a wait of 0.3 s allowed): one runs next, the two behind it have
    waited 0.8 s by their turn."""
    with serving(costly_on_poll=True, slot_wait_s=0.3) as base:
        answers: dict[str, requests.Response] = {}
        seconds: dict[str, float] = {}

        def post_costly(tag: str) -> None:
            began = time.monotonic()
            answers[tag] = requests.post(f"{base}/work?cost=5000&sleep=0.8&tag={tag}", timeout=20)
            seconds[tag] = time.monotonic() - began

        first = threading.Thread(target=post_costly, args=("first",))
        first.start()
        time.sleep(0.3)  # running its turn now
        behind = [threading.Thread(target=post_costly, args=(f"c{i}",)) for i in range(3)]
        for poster in behind:
            poster.start()
        for poster in [first, *behind]:
            poster.join()
    assert answers["first"].status_code == 200
    statuses = sorted(answers[f"c{i}"].status_code for i in range(3))
    assert statuses == [200, 503, 503], statuses
    for tag, answer in answers.items():
        if answer.status_code == 503:
            assert answer.json()["busy"] is True
            # Refused at its turn, 1.3 s after it was sent; run, it would have taken 2.1 s.
            assert seconds[tag] < 1.8, seconds


def _read_answers(conn: socket.socket, count: int) -> list[dict[str, Any]]:
    data, answers = b"", []
    conn.settimeout(10)
    while len(answers) < count:
        chunk = conn.recv(65536)
        assert chunk, f"the connection closed after {len(answers)} answers"
        data += chunk
        while b"\r\n\r\n" in data:
            head, rest = data.split(b"\r\n\r\n", 1)
            length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            if len(rest) < length:
                break
            answers.append(json.loads(rest[:length]))
            data = rest[length:]
    return answers


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "threads"])
def test_pipelined_requests_on_one_connection_are_answered_in_order(inline):
    """Three requests in one write, the middle one costly: it goes to a thread, and the third
    waits for it (answers keep the requests' order on a connection), then follows it to a
    thread as any request after a costly one on its connection does."""
    with serving(inline=inline) as base:
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.sendall(b"".join(
                f"POST /work?cost={cost}&tag={tag}&sleep=0.2 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc".encode()
                for cost, tag in ((1, "first"), (5000, "second"), (1, "third"))))
            answers = _read_answers(conn, 3)
    assert [answer["tag"] for answer in answers] == ["first", "second", "third"]
    assert [answer["poll_thread"] for answer in answers] == ([True, False, False] if inline else [False] * 3)


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "threads"])
def test_each_answer_leaves_whole_in_one_send(inline):
    """Its header and its body in one send() (waitress alone sends each as it is written: two
    segments, and the client woken twice), from the poll thread and from a pool thread's
    request alike: a cheap one, and one over the inline cost."""
    with serving(inline=inline, app=counting_sends_app) as base, requests.Session() as session:
        answers = [session.post(f"{base}/work?cost={cost}&tag=t{cost}", data=b"abc", timeout=10).json()
                   for cost in (1, 5000, 1)]
        sends = session.get(f"{base}/sends", timeout=10).json()
    assert [answer["poll_thread"] for answer in answers] == ([True, False, False] if inline else [False] * 3)
    assert len(sends) == len(answers), sends
    for sent, answer in zip(sends, answers):
        head, body = sent.split("\r\n\r\n", 1)
        assert head.startswith("HTTP/1.1 200 OK\r\n") and f"Content-Length: {len(body)}" in head, sent
        assert json.loads(body) == answer


def test_an_answer_over_the_high_watermark_is_sent_from_the_poll_thread():
    """A pool thread writing a large answer waits for the poll thread to drain it below the
    high watermark; the poll thread itself has no one to wait for. A client that reads late
    fills the socket's buffers, and the rest of the answer must wait in the server's."""
    size = 32 << 20
    with serving(high_watermark=1 << 20) as base:
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.sendall(f"GET /big?size={size} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            time.sleep(0.5)  # the answer is written while nobody reads
            conn.settimeout(10)
            received = 0
            while received < size:
                chunk = conn.recv(1 << 20)
                assert chunk, f"the connection closed after {received} bytes"
                received += len(chunk)
    assert received >= size


def test_the_writes_of_requests_served_in_one_turn_share_one_commit_made_before_their_answers(tmp_path):
    """The first request holds the poll thread while seven more arrive; those seven are served
    in the next turn, park at their writes, and go out in one transaction (turn_commit.py)."""
    path = str(tmp_path / "agg.sqlite3")

    def record(conn: socket.socket, query: str) -> None:
        conn.sendall(f"POST /record?{query} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode())

    with serving(app=lambda: recording_app(path)) as base:
        port = int(base.rsplit(":", 1)[1])
        holder = socket.create_connection(("127.0.0.1", port))
        record(holder, "tag=first&sleep=1.0")
        time.sleep(0.3)  # the server is in the first request's sleep
        conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(7)]
        for i, conn in enumerate(conns):
            record(conn, f"tag=t{i}")
        first = _read_answers(holder, 1)[0]
        holder.close()
        answers = []
        for conn in conns:
            answers.append(_read_answers(conn, 1)[0])
            with closing(sqlite3.connect(path)) as reader:  # what the answer reports is committed when it arrives
                assert reader.execute("SELECT COUNT(*) FROM v2_runs WHERE run_id = ?",
                                      (answers[-1]["tag"],)).fetchone()[0] == 1
            conn.close()
        transactions = requests.get(f"{base}/transactions", timeout=10).json()
    assert first == {"tag": "first", "poll_thread": True}
    assert sorted(answer["tag"] for answer in answers) == [f"t{i}" for i in range(7)]
    assert all(answer["poll_thread"] for answer in answers)
    assert transactions == 2  # the first's, then one for the seven


def test_with_the_lane_off_every_request_runs_on_a_thread():
    with serving(inline=False) as base:
        answer = requests.post(f"{base}/work?cost=1&tag=cheap", timeout=10).json()
        entered = _entered(base)
    assert answer["poll_thread"] is False and entered == ["cheap"]


def test_on_a_poll_thread_the_gate_never_waits_for_a_slot():
    gate = guard.VerifyGate(1, wait_s=5.0, inline_cost=100)
    assert gate.acquire(10**9) == "slot"  # every slot taken, on an ordinary thread
    seen: dict[str, Any] = {}

    def on_poll_thread() -> None:
        guard.serve_inline_here()
        began = time.monotonic()
        seen["cheap"] = gate.acquire(100)
        seen["busy"] = gate.busy
        gate.release(seen["cheap"])
        for cost in (101, None):
            try:
                gate.acquire(cost)
            except guard.RunInThread:
                seen.setdefault("deferred", []).append(cost)
        seen["seconds"] = time.monotonic() - began

    thread = threading.Thread(target=on_poll_thread)
    thread.start()
    thread.join()
    assert seen["cheap"] == "inline" and seen["busy"] == 2 and seen["deferred"] == [101, None]
    assert seen["seconds"] < 1.0
    assert gate.busy == 1 and not guard.on_poll_thread()  # the mark is the poll thread's own


def test_a_failure_outside_the_app_on_the_poll_thread_ends_that_connection_not_the_loop(caplog):
    class Channel:
        requests: list[Any] = [object()]
        connected = False
        will_close = False
        served = 0

        def service(self) -> None:
            self.served += 1
            raise RuntimeError("a bug in the HTTP layer")

    sock = serve.bind("127.0.0.1", 0)
    server = serve.make_server(lanes_app(guard.VerifyGate(2)), sock, threads=1, limit=16, header_timeout=5.0,
                               body_timeout=5.0, idle_timeout=30, max_request_body_size=1024)
    try:
        broken, cancelled = Channel(), Channel()
        cancelled.requests = []
        server._serve_inline(broken)  # type: ignore[arg-type]
        server._serve_inline(cancelled)  # type: ignore[arg-type]
    finally:
        server.close()
        server.task_dispatcher.shutdown()
    assert broken.served == 1 and broken.will_close is True
    assert cancelled.served == 0 and cancelled.will_close is False
    assert "closing its connection" in caplog.text


@pytest.mark.parametrize("reused_as", ["read end", "write end"])
def test_a_thread_that_finishes_after_the_server_closed_writes_to_no_descriptor(reused_as):
    """A pool thread still verifying when the server stops (a costly request outlives the
    pool's 5 s shutdown) answers afterwards, and answering pulls the server's trigger. Once
    the trigger pipe is closed its descriptor numbers are free, and the next file opened
    takes them: the pull must write nowhere, not into that file (nor fail on it)."""
    sock = serve.bind("127.0.0.1", 0)
    server = serve.make_server(lanes_app(guard.VerifyGate(2)), sock, threads=1, limit=50, header_timeout=5.0,
                               body_timeout=5.0, idle_timeout=30, max_request_body_size=1 << 20)
    trigger_write_fd = server.trigger.trigger
    server.task_dispatcher.shutdown()
    server.close()
    read_end, write_end = os.pipe()  # the next file this process opens, at the trigger's old number
    os.dup2(read_end if reused_as == "read end" else write_end, trigger_write_fd)
    try:
        os.set_blocking(read_end, False)
        server.pull_trigger()  # as a pool thread does when it writes its answer: EBADF, or an "x" in that file
        with pytest.raises(BlockingIOError):
            os.read(read_end, 1)  # nothing was written into the file that took the number
    finally:
        for fd in {read_end, write_end, trigger_write_fd}:
            os.close(fd)


@pytest.mark.parametrize(("lane", "workers", "cpus", "on_poll"), [
    ("auto", 2, 2, True), ("auto", 4, 2, True), ("auto", 1, 2, False), ("auto", 1, 1, True),
    ("poll", 1, 8, True), ("thread", 8, 8, False),
])
def test_the_costly_lane_is_the_poll_thread_when_every_cpu_has_a_worker(monkeypatch, lane, workers, cpus, on_poll):
    from tops_job import cpus as cpus_module
    from tops_job.aggregator.service import Settings, costly_on_poll

    monkeypatch.setattr(cpus_module, "usable_cpus", lambda: cpus)
    assert costly_on_poll(Settings(db="x", workers=workers, costly_lane=lane)) is on_poll
