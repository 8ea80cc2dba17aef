"""Aggregator throughput for tops-receipt/2 challenge mode (the workers' default): attempts
accepted per second through `/v2/exchange`, against the verification alone.

    python benchmarks/aggregator_v2_bench.py --k 2816 --workers 1,2
    python benchmarks/aggregator_v2_bench.py --k 2816 --workers 1,2 --repeat 4   # the table's medians
    python benchmarks/aggregator_v2_bench.py --k 16384 --tile 63      # at the cost cap, as a GPU's
    python benchmarks/aggregator_v2_bench.py --threads-check          # 2 threads of a process / 1, beside 2 processes / 1
    python benchmarks/aggregator_v2_bench.py --in-process             # the app's exchange without HTTP / the verification alone

A GPU worker's attempts cost the verifier as much as it takes: its autotuned k is in the tens
of thousands, and a worker narrows its tile until s·(tile+1)·k is under the cost cap (2^26),
which at k = 16384 leaves 63 columns. k = 2816 with the default tile of 64 is what a worker
on this machine's CPU sends, a sixth of the cap.

Each client is one worker run: it takes a run challenge, then sends its attempts as a worker
does, each commitment riding with the openings of the one before ({"commit": c_i,
"open": [o_{i-1}]}), and the last openings alone. An attempt counts when its verdict is
`accepted`. One thread drives every run's connection (a selector): with a thread per run,
the clients took 0.17–0.21 ms of CPU an attempt on the server's cores, against 0.13–0.19.
Attempts have m = 16 rows: the verification of an opened set costs s·(tile+1)·k whatever
m and n are, so a short C keeps making them cheap while the aggregator does the work of the
autotuned shape's k. The verification alone (`check_commitment` and `check_opened` on the
first 200 attempts, their leaves drawn as the aggregator draws them) runs in as many
processes as the server has workers, with the server's process settings
(`serve.tune_process`), kept for the whole run.

The server's windows (3 s) alternate with the verification alone's (1 s), both ends alone's.
This machine's speed drifts by a tenth or more within a minute, and windows taken minutes
apart (the verification alone before and after the server's, as earlier rounds did) carried
that drift into the ratio; interleaved, both see the same. Between windows the clients hold
their next request and the server is idle. The windows end when the first run has sent its
last attempt, so every run is sending throughout: after it, fewer connections than workers'
threads may be left, unevenly spread over the workers (SO_REUSEPORT hashes each keep-alive
connection to one worker), and the tail would measure that spread.

`--in-process` leaves HTTP and the clients out: the app (the same WSGI stack a worker serves,
its store on a SQLite file, writes committed as in the server) takes each exchange in this
process, one at a time, and each opened set the app has just judged is verified again alone
at once, so that both see the same drift of this machine's speed. What is left between them
is the app's own work an exchange (the parse, the reads, the leaves, the commit).

The server counts its own CPU in the checks (`tops_job_aggregator_verify_cpu_seconds_total`,
read from /metrics at each window's ends). Their share of the server's CPU says how much of
it the serving around them takes; the checks inside against the verification alone say
whether the product check itself runs slower in the server. The clients' CPU (this process:
joining each exchange from openings encoded beforehand, reading the answers) is reported
too, because on a 2-core machine it is taken from the cores the server would use.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import selectors
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from aggregator_bench import _request, _started, split_answer, tree_cpu  # noqa: E402

from tops_job.spec.v2 import S_DEFAULT as S  # noqa: E402  (the aggregator's default openings per commitment)


class Wire:
    """One attempt as the load generator sends it: its commitment, and every leaf's opening
    already encoded, so that answering a challenge joins 64 strings instead of encoding an
    opened set. The clients share two cores with the server; the less they compute, the less
    they take from it and the less they disturb its caches."""

    def __init__(self, made: Any):
        self.commitment_json = json.dumps(made.commitment, separators=(",", ":"))
        self.digest = made.digest.hex()
        leaves = range(len(made.data))
        self.openings = [json.dumps(opening, separators=(",", ":")) for opening in made.opened(list(leaves))["openings"]]

    def opened_json(self, leaves: list[int]) -> str:
        """The opened set for `leaves` as `Made.opened` encodes it (one entry per drawn leaf)."""
        return f'{{"digest":"{self.digest}","openings":[{",".join(self.openings[leaf] for leaf in leaves)}]}}'


def exchange_body(attempt: Wire | None, opened_json: str | None) -> str:
    """An exchange as a worker sends it: an attempt's commitment with the opened set of the one
    before, either alone (the run's first commitment, its last opened set)."""
    items = ([f'"commit":{attempt.commitment_json}'] if attempt else []) + ([f'"open":[{opened_json}]'] if opened_json else [])
    return "{" + ",".join(items) + "}"


def _make(args: tuple[bytes, str, str, int, int, int, int]) -> list[Wire]:
    """`count` attempts of one run, encoded for the wire."""
    from tests.spec.v2_helpers import make

    challenge, did, run_id, first, count, k, tile = args
    return [Wire(make(m=16, n=1024, k=k, tile=tile, challenge=challenge, did=did, run_id=run_id, attempt=first + i))
            for i in range(count)]


Items = list[tuple[dict[str, Any], list[int], dict[str, Any]]]  # (commitment, leaves, opened set)


def _verify_loop(items: Items, seconds: float, start: int = 0) -> int:
    """Attempts verified in `seconds` on this thread."""
    from tops_job.spec.v2 import check_commitment, check_opened

    done, wall = 0, time.perf_counter()
    while time.perf_counter() - wall < seconds:
        commitment, leaves, opened = items[(start + done) % len(items)]
        check_opened(check_commitment(commitment, s=S), leaves, opened)
        done += 1
    return done


def _threads_for(args: tuple[Items, float]) -> tuple[int, int]:
    """Attempts verified in `seconds` on one thread, then on two threads of this process at once."""
    from tops_job.aggregator.serve import tune_process

    tune_process()
    items, seconds = args
    alone_ = _verify_loop(items, seconds)
    counts = [0, 0]

    def thread(index: int) -> None:
        counts[index] = _verify_loop(items, seconds, start=index * len(items) // 2)

    threads = [threading.Thread(target=thread, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return alone_, sum(counts)


def threads_check(k: int, tile: int, seconds: float = 4.0) -> None:
    """Two verifications on two threads of one process against one, beside two processes
    against one: what a worker's --verify-slots can get from its threads. Any part of the
    product check that keeps the GIL shows here as threads scaling less than processes."""
    wires = _make((os.urandom(32), "did:bench:threads", "threads", 0, 40, k, tile))
    samples = _samples(wires)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        one, two = pool.submit(_threads_for, (samples, seconds)).result()
    procs_one, procs_two = (_alone_per_s(samples, procs, seconds) for procs in (1, 2))
    print(f"k = {k}, tile {tile}: the verification alone, 2 threads of one process / 1 thread: {two / one:.2f}×"
          f" ({one / seconds:.0f} and {two / seconds:.0f} attempts/s); 2 processes / 1: {procs_two / procs_one:.2f}×"
          f" ({procs_one:.0f} and {procs_two:.0f} attempts/s)", flush=True)


def in_process(k: int, tile: int, attempts: int, rounds: int) -> None:
    """The app's exchange in this process against the verification alone, round by round."""
    import io
    import statistics

    from tests.spec.v2_helpers import WORKER_SECRET
    from tops_job.aggregator import guard
    from tops_job.aggregator.group_commit import GroupCommitStore
    from tops_job.aggregator.metrics import AggregatorMetrics
    from tops_job.aggregator.serve import tune_process
    from tops_job.aggregator.service import Settings, build_app, open_store
    from tops_job.spec.signing import LocalKeySigner
    from tops_job.spec.v2 import check_commitment, check_opened

    tune_process()
    pubkey = LocalKeySigner(WORKER_SECRET).public_key.hex()
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(db=f"{tmp}/agg.sqlite3")
        store = GroupCommitStore(open_store(settings.db))
        app, gate = build_app(settings, store, AggregatorMetrics())
        if k * (tile + 1) * S <= gate.inline_cost:
            guard.serve_inline_here()  # as a worker's poll thread runs it; costlier ones run on a thread anyway

        def call(method: str, path: str, body: bytes = b"", query: str = "") -> dict[str, Any]:
            status: list[str] = []
            environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query,
                       "CONTENT_TYPE": "application/json", "CONTENT_LENGTH": str(len(body)),
                       "wsgi.input": io.BytesIO(body), "REMOTE_ADDR": "127.0.0.1", "SERVER_NAME": "bench",
                       "SERVER_PORT": "1", "wsgi.url_scheme": "http", "SERVER_PROTOCOL": "HTTP/1.1"}
            answer = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
            if not status[0].startswith("200"):
                raise RuntimeError(f"{path} answered {status[0]}: {answer[:200]!r}")
            return dict(json.loads(answer))

        ratios = []
        try:
            for round_ in range(rounds):
                did = f"did:bench:in-process-{round_}"
                challenge = call("GET", "/v2/challenge", query=f"did={did}&pubkey={pubkey}")["challenge"]
                wires = _make((bytes.fromhex(challenge), did, f"in-process-{round_}", 0, attempts, k, tile))
                previous: tuple[Wire, list[int], str] | None = None
                accepted, app_cpu, alone_cpu = 0, 0.0, 0.0
                for wire in [*wires, None]:
                    body = exchange_body(wire, previous[2] if previous else None)
                    started = time.process_time()  # the process's: a write handed to the writer thread counts
                    answer = call("POST", "/v2/exchange", body.encode())
                    app_cpu += time.process_time() - started
                    accepted += sum(o.get("verdict") == "accepted" for o in answer.get("open", []))
                    if previous is not None:
                        # The opened set the app has just verified, verified again alone at once:
                        # this machine's speed drifts within a second, and pairs see the same drift.
                        commitment, opened = json.loads(previous[0].commitment_json), json.loads(previous[2])
                        started = time.process_time()
                        check_opened(check_commitment(commitment, s=S), previous[1], opened)
                        alone_cpu += time.process_time() - started
                    if wire is not None:
                        leaves = answer["commit"]["challenge"]["leaves"]
                        previous = (wire, leaves, wire.opened_json(leaves))
                if accepted != attempts:
                    raise RuntimeError(f"{accepted} of {attempts} attempts accepted")
                alone_ms = alone_cpu / attempts * 1e3
                app_ms = app_cpu / attempts * 1e3
                ratios.append(alone_ms / app_ms)
                print(f"round {round_}: the app {app_ms:.2f} ms of CPU an attempt, the verification alone"
                      f" {alone_ms:.2f} ms: {app_ms - alone_ms:.2f} ms of the app's own, {ratios[-1]:.2f} of it",
                      flush=True)
        finally:
            store.close()
    print(f"k = {k}, tile {tile}: the verification alone / the app's exchange without HTTP, median of {rounds}:"
          f" {statistics.median(ratios):.2f} (range {min(ratios):.2f}-{max(ratios):.2f})")


def _samples(wires: list[Wire]) -> Items:
    """(commitment, leaves, opened set) for the verification alone, leaves drawn as the
    aggregator draws them (its own key here)."""
    from tops_job.spec.v2 import challenge_leaves, check_commitment

    key, out = os.urandom(32), []
    for wire in wires:
        commitment = json.loads(wire.commitment_json)
        committed = check_commitment(commitment, s=S)
        leaves = challenge_leaves(key, committed.digest, S, committed.leaf_count)
        out.append((commitment, leaves, json.loads(wire.opened_json(leaves))))
    return out


def verify_cpu(host: str, port: int) -> float:
    """The server's CPU seconds in the checks themselves so far (its /metrics, all workers)."""
    import requests

    text = requests.get(f"http://{host}:{port}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith('tops_job_aggregator_verify_cpu_seconds_total{protocol="v2"}'))


_HELD: Items = []


def _hold(items: Items) -> None:
    """A process of the verification alone: the server's process settings, and the samples."""
    from tops_job.aggregator.serve import tune_process

    tune_process()
    _HELD[:] = items


def _verify_held(seconds: float) -> tuple[int, float]:
    cpu = time.process_time()
    done = _verify_loop(_HELD, seconds, start=int.from_bytes(os.urandom(2), "little"))
    return done, time.process_time() - cpu


class Alone:
    """The verification alone in as many processes as the server has workers, kept for the
    whole run and measured in windows between the server's."""

    def __init__(self, items: Items, procs: int):
        self.procs = procs
        self.pool = ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_hold, initargs=(items,))
        list(self.pool.map(_verify_held, [0.3] * procs))  # imports, first allocations
        self.done, self.cpu, self.wall = 0, 0.0, 0.0

    def window(self, seconds: float) -> None:
        results = list(self.pool.map(_verify_held, [seconds] * self.procs))
        self.done += sum(done for done, _ in results)
        self.cpu += sum(cpu for _, cpu in results)
        self.wall += seconds

    def close(self) -> None:
        self.pool.shutdown()


def _alone_per_s(items: Items, procs: int, seconds: float) -> float:
    """The verification alone in `procs` processes at once: attempts per wall second, all together."""
    kept = Alone(items, procs)
    try:
        kept.window(seconds)
    finally:
        kept.close()
    return kept.done / kept.wall


class _Run:
    """One worker run on its keep-alive connection: its attempts, and the opened set it sends next."""

    def __init__(self, index: int, attempts: list[Wire], sock: Any):
        self.index, self.attempts, self.sock = index, attempts, sock
        self.sent = 0  # requests sent: each attempt's commitment, then the last opened set alone
        self.current: Wire | None = None
        self.previous: str | None = None  # the opened set that rides with the next request
        self.finished = False
        self.watching = 0  # the selector events registered for this socket (0: none)
        self.out = memoryview(b"")
        self.buffer = bytearray()

    def next_body(self) -> bytes:
        self.current = self.attempts[self.sent] if self.sent < len(self.attempts) else None
        self.sent += 1
        return exchange_body(self.current, self.previous).encode()

    def answer(self) -> dict[str, Any] | None:
        """The answer, once all of it has been read."""
        whole = split_answer(self.buffer)
        if whole is None:
            return None
        status, body = whole
        if status != 200:
            raise RuntimeError(f"/v2/exchange answered {status}: {body[:200]!r}")
        answer = dict(json.loads(body))
        if self.current is None:
            self.finished = True
        else:
            self.previous = self.current.opened_json(answer["commit"]["challenge"]["leaves"])
        return answer


class Clients:
    """The worker runs, all driven by one thread, each on a keep-alive connection sending its
    exchanges one after another. One thread, not one a run: 32 threads, each woken by its
    answer and taking the GIL from the others, spent 0.17-0.21 ms of CPU an attempt on the
    server's cores, against 0.13-0.19 for one. `pause` returns once no request is in flight
    (the server is then idle) and holds each run before its next request until `resume`."""

    def __init__(self, host: str, port: int, made: list[list[Wire]]):
        self.host, self.port = host, port
        self.selector = selectors.DefaultSelector()
        self.accepted = [0] * len(made)
        self.first_done = threading.Event()  # a run has had its last answer
        self.error: BaseException | None = None
        self._cond = threading.Condition()
        self._open, self._in_flight = False, 0
        self._held = [_Run(index, attempts, socket.create_connection((host, port))) for index, attempts in enumerate(made)]
        for run_ in self._held:
            run_.sock.setblocking(False)
        self._left = len(self._held)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def pause(self) -> None:
        with self._cond:
            self._open = False
            while self._in_flight:
                self._cond.wait()

    def resume(self) -> None:
        with self._cond:
            self._open = True
        self._wake_w.send(b"x")

    def join(self) -> None:
        self.thread.join()
        self.selector.close()
        self._wake_r.close()
        self._wake_w.close()
        if self.error is not None:
            raise self.error

    def _loop(self) -> None:
        try:
            while self._left:
                for key, _ in self.selector.select():
                    run_ = key.data
                    if run_ is None:
                        self._wake_r.recv(4096)
                        self._send_held()
                    elif run_.out:
                        self._send(run_)
                    else:
                        self._receive(run_)
        except BaseException as exc:  # raised again by join(); the main thread must not wait forever
            self.error = exc
            self.first_done.set()
            with self._cond:
                self._in_flight = 0
                self._cond.notify_all()

    def _send_held(self) -> None:
        with self._cond:
            if not self._open:
                return
            held, self._held = self._held, []
            self._in_flight += len(held)
        for run_ in held:
            self._start(run_)

    def _start(self, run_: _Run) -> None:
        run_.out = memoryview(_request(self.host, self.port, run_.next_body(), "/v2/exchange"))
        self._send(run_)

    def _send(self, run_: _Run) -> None:
        try:
            run_.out = run_.out[run_.sock.send(run_.out):]
        except BlockingIOError:
            pass
        self._watch(run_, selectors.EVENT_WRITE if run_.out else selectors.EVENT_READ)

    def _watch(self, run_: _Run, events: int) -> None:
        if not run_.watching:
            self.selector.register(run_.sock, events, run_)
        elif run_.watching != events:
            self.selector.modify(run_.sock, events, run_)
        run_.watching = events

    def _receive(self, run_: _Run) -> None:
        chunk = run_.sock.recv(262144)
        if not chunk:
            raise ConnectionError("the server closed a run's connection")
        run_.buffer += chunk
        answer = run_.answer()
        if answer is None:
            return
        self.accepted[run_.index] += sum(o.get("verdict") == "accepted" for o in answer.get("open", []))
        with self._cond:
            self._in_flight -= 1
            go_on = self._open and not run_.finished
            if go_on:
                self._in_flight += 1
            elif not run_.finished:
                self._held.append(run_)
            if not self._in_flight:
                self._cond.notify_all()
        if run_.finished:
            self.selector.unregister(run_.sock)
            run_.sock.close()
            self._left -= 1
            self.first_done.set()
        elif go_on:
            self._start(run_)


def run(workers: int, clients: int, attempts: int, k: int, tile: int, extra: tuple[str, ...] = (),
        window_s: float = 3.0, alone_s: float = 1.0, each_window: bool = False) -> dict[str, float]:
    """One server run; prints its numbers and returns its attempts/s, with the verification
    alone's attempts/s in as many processes."""
    import requests

    from tests.spec.v2_helpers import WORKER_SECRET
    from tops_job.spec.signing import LocalKeySigner

    pubkey = LocalKeySigner(WORKER_SECRET).public_key.hex()
    with tempfile.TemporaryDirectory() as tmp:
        server, host, port = _started([sys.executable, "-m", "tops_job.cli", "aggregator", "serve", "--port", "0",
                                       "--db", f"{tmp}/agg.sqlite3", "--accept", "v2", "--workers", str(workers), *extra])
        alone_ = None
        try:
            runs = []
            for c in range(clients):
                did = f"did:bench:{c}"
                answer = requests.get(f"http://{host}:{port}/v2/challenge", params={"did": did, "pubkey": pubkey}, timeout=10)
                answer.raise_for_status()
                runs.append((bytes.fromhex(answer.json()["challenge"]), did, f"bench-{os.getpid()}-{c}", 0, attempts, k, tile))
            with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
                made = list(pool.map(_make, runs))
            alone_ = Alone(_samples([attempt for run_ in made for attempt in run_][:200]), workers)
            driven = Clients(host, port, made)

            def snapshot(starting: bool) -> dict[str, float]:
                # The clients are held: no request is in flight. The /metrics read is the
                # server's work too, and is kept out of the window at both ends.
                checks = verify_cpu(host, port) if starting else 0.0
                taken = {"wall": time.perf_counter(), "cpu": tree_cpu(server.pid), "clients_cpu": time.process_time(),
                         "done": sum(driven.accepted)}
                return {**taken, "verify_cpu": checks if starting else verify_cpu(host, port)}

            # The server's windows alternate with the verification alone's, both ends alone's:
            # this machine's speed drifts by a tenth or more within a minute, and interleaved
            # windows see the same drift. They end when the first run has sent its last
            # attempt: until then every run is sending. Between windows the clients hold their
            # next request, so the server is idle while the verification alone runs.
            steady = dict.fromkeys(("wall", "cpu", "clients_cpu", "done", "verify_cpu"), 0.0)
            windows = 0
            alone_.window(alone_s)
            while not driven.first_done.is_set():
                before = snapshot(starting=True)
                driven.resume()
                driven.first_done.wait(window_s)
                driven.pause()
                after = snapshot(starting=False)
                for key in steady:
                    steady[key] += after[key] - before[key]
                windows += 1
                alone_done, alone_cpu = alone_.done, alone_.cpu
                alone_.window(alone_s)
                if each_window:
                    done = after["done"] - before["done"]
                    print(f"  window {windows}: the server {(after['cpu'] - before['cpu']) / done * 1e3:.2f} ms of CPU"
                          f" an attempt, its checks {(after['verify_cpu'] - before['verify_cpu']) / done * 1e3:.2f},"
                          f" {done:.0f} attempts in {after['wall'] - before['wall']:.1f}s; then the verification"
                          f" alone {(alone_.cpu - alone_cpu) / (alone_.done - alone_done) * 1e3:.2f} ms", flush=True)
            driven.resume()
            driven.join()
        finally:
            server.terminate()
            server.wait(15)
            if alone_ is not None:
                alone_.close()
    done, wall, cpu, inside = steady["done"], steady["wall"], steady["cpu"], steady["verify_cpu"]
    alone_cpu_ms = alone_.cpu / alone_.done * 1e3
    alone_per_s = alone_.done / alone_.wall
    print(f"v2, {workers} worker(s), {clients} runs × {attempts} attempts (k = {k}, tile {tile}, s = {S}), {windows}"
          f" windows: {done:.0f} accepted in {wall:.1f}s = {done / wall:.0f} attempts/s; server CPU {cpu:.1f}s ="
          f" {cpu / done * 1e3:.2f} ms an attempt, {cpu / wall:.2f} cores; the verification alone"
          f" {alone_cpu_ms:.2f} ms in the windows between ({alone_cpu_ms / (cpu / done * 1e3):.2f} of it per core);"
          f" the clients' CPU {steady['clients_cpu'] / done * 1e3:.2f} ms an attempt", flush=True)
    # The server's own count of its CPU in the checks (tops_job_aggregator_verify_cpu_seconds_total):
    # against the server's CPU in the same windows, the share of the serving around them.
    print(f"  inside the server: the checks {inside / done * 1e3:.2f} ms of CPU an attempt, {inside / cpu:.2f} of"
          f" the server's CPU; {inside / done * 1e3 / alone_cpu_ms:.2f}× the verification alone's", flush=True)
    print(f"  the verification alone in {workers} process(es): {alone_per_s:.0f} attempts/s", flush=True)
    return {"server": done / wall, "alone": alone_per_s, "per_core": alone_cpu_ms / (cpu / done * 1e3),
            "cores": cpu / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=2816, help="inner dimension (this machine's autotune: 2816)")
    parser.add_argument("--tile", type=int, default=64)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--clients", type=int, default=32, help="concurrent worker runs")
    parser.add_argument("--window", type=float, default=3.0, help="seconds of each server window")
    parser.add_argument("--alone-window", type=float, default=1.0,
                        help="seconds of each window of the verification alone, between the server's")
    parser.add_argument("--each-window", action="store_true", help="print each pair of windows too")
    parser.add_argument("--attempts", type=int, default=200, help="attempts per run")
    parser.add_argument("--server-args", default="", help="more `aggregator serve` options, e.g. '--verify-slots 1'")
    parser.add_argument("--threads-check", action="store_true",
                        help="only compare the verification alone on 2 threads of one process with 2 processes")
    parser.add_argument("--in-process", action="store_true",
                        help="only the app's exchange without HTTP against the verification alone, in this process")
    parser.add_argument("--rounds", type=int, default=5, help="--in-process: rounds of --attempts each")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the --workers list this many times; the table ends with each column's median")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error(f"--repeat takes a count of 1 or more, not {args.repeat}")
    if args.in_process:
        in_process(args.k, args.tile, args.attempts, args.rounds)
        return
    if args.threads_check:
        threads_check(args.k, args.tile)
        return
    rounds = []
    for _ in range(args.repeat):
        results = {workers: run(workers, args.clients, args.attempts, args.k, args.tile, tuple(args.server_args.split()),
                                args.window, args.alone_window, args.each_window)
                   for workers in (int(w) for w in args.workers.split(","))}
        if 1 in results:
            for workers, result in results.items():
                if workers > 1:
                    # The verification alone bounds what more processes can give: on a machine whose
                    # cores share a cache and memory bandwidth it does not scale by `workers` either.
                    print(f"{workers} workers / 1: the server {result['server'] / results[1]['server']:.2f}×;"
                          f" the verification alone {result['alone'] / results[1]['alone']:.2f}×")
        rounds.append(results)
    print_table(rounds)


def print_table(rounds: list[dict[int, dict[str, float]]]) -> None:
    """Each run's ratios against the verification alone, and their medians: this machine's speed
    drifts from one run to the next, so one run says little about a target near its spread."""
    import statistics

    rows = [(index, workers, result) for index, results in enumerate(rounds, 1) for workers, result in results.items()]
    print("\n| run | workers | attempts/s | the verification alone's | of its rate | per server core | server cores |")
    print("|---|---|---|---|---|---|---|")
    for index, workers, result in rows:
        print(f"| {index} | {workers} | {result['server']:.0f} | {result['alone']:.0f} |"
              f" {result['server'] / result['alone']:.3f} | {result['per_core']:.3f} | {result['cores']:.2f} |")
    if len(rounds) > 1:
        for workers in rounds[0]:
            results = [r[workers] for r in rounds]
            print(f"| median | {workers} | {statistics.median(r['server'] for r in results):.0f} |"
                  f" {statistics.median(r['alone'] for r in results):.0f} |"
                  f" {statistics.median(r['server'] / r['alone'] for r in results):.3f} |"
                  f" {statistics.median(r['per_core'] for r in results):.3f} |"
                  f" {statistics.median(r['cores'] for r in results):.2f} |")


if __name__ == "__main__":
    main()
