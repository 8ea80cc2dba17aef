"""How the aggregator serves: waitress on poll(), guarded, in one process or several.

Waitress with `select()` dies on the first file descriptor ≥ 1024 and lets a client hold a
connection open forever by sending a header line now and then. Here:

- poll() (no descriptor ceiling), connections accepted in batches, and a connection limit computed from RLIMIT_NOFILE (raised
  to its hard limit first) so the process never runs out of descriptors;
- near the limit, the least recently active connections not being served are closed to
  make room, rather than honest clients waiting behind them;
- a request must deliver its headers within `header_timeout` and its body within
  `body_timeout` of its first byte, however slowly it trickles; an idle keep-alive
  connection is closed after `idle_timeout`.

The inline lane (`inline`, the default): a complete request runs on the poll thread itself,
between its turns, and its answer is sent at once. Waitress would hand each request to a
thread of its pool and wake the poll thread to send the answer; in a process serving
CPU-bound Python, those hand-overs of the GIL cost a tops-receipt/2 attempt more CPU than
anything but the verification (benchmarks/RESULTS.md, seventh round). A request whose
verification would hold the loop, over the gate's `inline_cost` (guard.VerifyGate), raises
RunInThread before any work that counts and runs again from the start in the costly lane:
- on a thread of the pool, within the gate's slots (`costly_on_poll` false): the poll thread
  keeps reading, answering and running cheap requests meanwhile. That is how one worker
  process uses several cores (NumPy releases the GIL in the product check);
- or on the poll thread, one costly request a turn of the loop after the turn's cheap ones
  (`costly_on_poll`, for a worker per core): a cheap request waits behind one costly
  verification at most, and the costly ones run one at a time, as a core can. On a thread
  beside the poll thread, with every core already serving a worker, the checks at the cost
  cap took 1.2-1.5 times as long as alone (benchmarks/RESULTS.md, seventeenth round). One
  that waited past guard.SLOT_WAIT_S for its turn is answered 503, as a thread's wait for a
  slot would be.
Each request of a turn runs in a greenlet, and parks at its write until the turn's writes are
committed together (turn_commit.py): one commit for the exchanges of a turn, not one each.

Several processes (`workers`): the parent binds the port once (SO_REUSEPORT, not listening:
it holds the port), opens the database (and migrates it) to fail fast, then forks workers
that each listen on the port with a socket of their own, so the kernel spreads connections
evenly over them (one shared socket let whichever worker woke first take a whole burst of
keep-alive connections) — verification is CPU-bound Python, so threads of one process share
one core through the GIL while processes use every core. A worker that dies is replaced. Pre-fork over gunicorn:
the parent keeps the `serving on` line and exit codes the tests and operators rely on, the
guards above live in one server class, and nothing new is installed.
"""

from __future__ import annotations

import collections
import functools
import gc
import heapq
import logging
import os
import resource
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from waitress import wasyncore
from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.server import TcpWSGIServer
from waitress.task import ThreadedTaskDispatcher

from tops_job.aggregator.guard import (
    SLOT_WAIT_S,
    RunInThread,
    costly_turn_here,
    on_poll_thread,
    serve_inline_here,
    took_costly_lane,
)
from tops_job.aggregator.turn_commit import Turn
from tops_job.cpus import cap_blas_threads
from tops_job.heap import keep_freed_memory

log = logging.getLogger("tops_job.aggregator")

ACCEPT_BATCH = 256
FD_RESERVE = 64  # descriptors kept for the database, logs, the trigger pipe and the listener
ANSWER_BUFFER = 1 << 16  # an answer up to this size is sent in one send() (make_server)


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard one where allowed; the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def connection_limit(requested: int | None, threads: int) -> int:
    """The most connections one process may hold: what was asked, and safely under the
    descriptor limit whatever was asked."""
    ceiling = max(16, raise_fd_limit() - FD_RESERVE - 2 * threads)
    return min(requested, ceiling) if requested else ceiling


class GuardedChannel(HTTPChannel):
    request_began = 0.0  # monotonic time the first byte of the request being read arrived
    costly_next = False  # its last request was over the inline cost: the next goes to the costly lane at once

    def received(self, data: bytes) -> bool:
        if self.request is None and data:
            self.request_began = time.monotonic()
        return bool(super().received(data))

    def service(self) -> None:
        if not on_poll_thread():  # on the poll thread RunInThread propagates to GuardedServer._serve_inline
            took_costly_lane(reset=True)
        super().service()

    def write_soon(self, data: bytes) -> int:
        if not on_poll_thread():
            # A connection whose request needed a thread (a GPU worker's attempts at the cost
            # cap) most likely sends another such: the next goes to a thread directly, not
            # first to the poll thread to be parsed and handed over. Set before the answer
            # can reach the client, which may send its next request at once.
            self.costly_next = took_costly_lane()
        return int(super().write_soon(data))

    def _flush_outbufs_below_high_watermark(self) -> None:
        # A pool thread waits here for the poll thread to send a large answer; on the poll
        # thread that wait would never end. Its answer is sent when its request returns.
        if not on_poll_thread():
            super()._flush_outbufs_below_high_watermark()


class LaneDispatcher(ThreadedTaskDispatcher):
    """Waitress's thread pool, and before it the poll thread's own queues: a request
    (`add_task`, called when one is complete or its channel's previous one is answered) waits
    in `ready` for the poll thread, unless its connection's last request was costly;
    `to_costly_lane` hands one to the pool, or with `costly_on_poll` to the poll thread's
    `costly` queue (each with the monotonic time it joined)."""

    def __init__(self, costly_on_poll: bool = False) -> None:
        super().__init__()
        self.costly_on_poll = costly_on_poll
        self.ready: collections.deque[GuardedChannel] = collections.deque()
        self.costly: collections.deque[tuple[float, GuardedChannel]] = collections.deque()

    def add_task(self, task: Any) -> None:
        if task.costly_next:
            self.to_costly_lane(task)
        else:
            self.ready.append(task)  # from a pool thread too: the channel's service() then wakes the loop

    def to_costly_lane(self, channel: GuardedChannel) -> None:
        if self.costly_on_poll:
            self.costly.append((time.monotonic(), channel))
        else:
            super().add_task(channel)

    def shutdown(self, cancel_pending: bool = True, timeout: int = 5) -> bool:
        self.ready.clear()
        self.costly.clear()
        return bool(super().shutdown(cancel_pending, timeout))


class GuardedServer(TcpWSGIServer):
    channel_class = GuardedChannel
    header_timeout = 10.0
    body_timeout = 30.0
    on_maintenance: Callable[[GuardedServer], None] | None = None
    shed_count = 0
    slow_closed = 0
    accepted = False  # a connection was accepted since the costly turn last looked

    def __init__(self, *args: Any, **kwargs: Any):
        # Waitress closes the trigger pipe without a lock against a pull: a pool thread that
        # answers after the server closed (a verification outliving the pool's shutdown) would
        # write to the pipe's old descriptor number, which the next file opened may hold.
        self._trigger_lock = threading.Lock()
        self._trigger_closed = False
        super().__init__(*args, **kwargs)

    def maintenance(self, now: float) -> None:
        super().maintenance(now)  # idle keep-alive connections (channel_timeout)
        mono = time.monotonic()
        for channel in list(self.active_channels.values()):
            request = getattr(channel, "request", None)
            if request is None or channel.requests or channel.will_close:
                continue
            limit = self.header_timeout if not request.headers_finished else self.header_timeout + self.body_timeout
            if mono - channel.request_began > limit:
                channel.will_close = True
                self.slow_closed += 1
        if self.on_maintenance is not None:
            self.on_maintenance(self)

    def handle_accept(self) -> None:
        """Accept every waiting connection (up to a batch), not one per loop: each turn of the
        loop visits every open connection, so one accept a turn drains a backlog of thousands
        of connections slowly, and an honest client waits behind it."""
        for _ in range(ACCEPT_BATCH):
            if len(self._map) >= self.adj.connection_limit:
                return
            try:
                accepted = self.accept()
                if accepted is None:
                    return
                conn, addr = accepted
                self.set_socket_options(conn)
            except OSError:
                return
            self.channel_class(self, conn, self.fix_addr(addr), self.adj, map=self._map)
            self.accepted = True

    def readable(self) -> bool:
        if self.accepting:
            self._shed()
        return bool(super().readable())

    def pull_trigger(self) -> None:
        if on_poll_thread():  # the poll thread needs no waking by itself
            return
        with self._trigger_lock:
            if not self._trigger_closed:
                super().pull_trigger()

    def close(self) -> None:
        with self._trigger_lock:
            self._trigger_closed = True
            super().close()

    def run(self) -> None:
        if not isinstance(self.task_dispatcher, LaneDispatcher):
            super().run()
            return
        serve_inline_here()
        ready, costly = self.task_dispatcher.ready, self.task_dispatcher.costly
        turn = Turn()
        try:
            while self._map:
                wasyncore.poll2(0.0 if ready or costly else self.adj.asyncore_loop_timeout, self._map)
                self._serve_ready(turn, ready)
                if costly:  # one a turn: the cheap requests of the next turn wait behind this one only
                    if self.accepted:
                        # A new connection's request is read a poll after its accept: read it
                        # now, so that it does not wait behind this costly request too.
                        self.accepted = False
                        wasyncore.poll2(0.0, self._map)
                        self._serve_ready(turn, ready)
                    queued_at, channel = costly.popleft()
                    costly_turn_here("busy" if time.monotonic() - queued_at > SLOT_WAIT_S else "run")
                    try:
                        turn.serve(functools.partial(self._serve_inline, channel, costly_turn=True))
                    finally:
                        costly_turn_here(None)  # unused when the request took no verification
                turn.commit()  # every answer of the turn is sent before the sockets are read again
        except (SystemExit, KeyboardInterrupt):
            self.task_dispatcher.shutdown()

    def _serve_ready(self, turn: Turn, ready: collections.deque[GuardedChannel]) -> None:
        for _ in range(len(ready)):  # those ready now; the next turn reads the sockets first
            turn.serve(functools.partial(self._serve_inline, ready.popleft()))
            if turn.due:
                turn.commit()

    def _serve_inline(self, channel: GuardedChannel, costly_turn: bool = False) -> None:
        """Runs the channel's next request here and sends its answer; to the costly lane when
        it raises RunInThread (nothing was written: its body is read again from the start).
        In its costly turn, whether it was costly decides where the connection's next goes."""
        if not channel.requests:  # cancelled since it was queued
            return
        try:
            channel.service()
        except RunInThread:
            channel.requests[0].get_body_stream().seek(0)
            self.task_dispatcher.to_costly_lane(channel)
            return
        except Exception:  # waitress's own failures, outside the app: that connection ends, the loop goes on
            log.exception("serving a request on the poll thread failed; closing its connection")
            channel.will_close = True
        finally:
            if costly_turn:
                channel.costly_next = took_costly_lane(reset=True)
        if channel.connected and (channel.total_outbufs_len or channel.will_close or channel.close_when_flushed):
            channel.handle_write()

    def _shed(self) -> None:
        """Near the limit, close the least recently active connections that are not being
        served, so that new clients are accepted at once instead of queueing behind them
        (least recent first: a client that just connected and is sending is the newest)."""
        limit = self.adj.connection_limit
        soft = limit - max(8, limit // 10)
        excess = len(self._map) - soft - sum(1 for c in self.active_channels.values() if c.will_close)
        if excess <= 0:
            return
        candidates = (c for c in self.active_channels.values()
                      if not c.requests and not c.will_close and not c.total_outbufs_len)
        for channel in heapq.nsmallest(excess, candidates, key=lambda c: c.last_activity):
            channel.will_close = True
            self.shed_count += 1


def bind(host: str, port: int, backlog: int = 2048, *, shared: bool = False, listen: bool = True) -> socket.socket:
    """A TCP socket on (host, port). `shared`: SO_REUSEPORT, so each worker can listen on
    the port with its own socket and the kernel spreads connections over them; the parent
    keeps one bound but not listening (it holds the port, and takes no connections)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if shared:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    if listen:
        sock.listen(backlog)
    sock.setblocking(False)
    return sock


def quiet_queue_warnings() -> None:
    """waitress warns "Task queue depth is N" whenever every thread is busy: with bounded
    verification slots that is the expected state under load, not news for the log."""
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)


def make_server(app: Any, sock: socket.socket, *, threads: int, limit: int, header_timeout: float, body_timeout: float,
                idle_timeout: int, max_request_body_size: int, inline: bool = True,
                costly_on_poll: bool = False) -> GuardedServer:
    quiet_queue_warnings()
    adj = Adjustments(sockets=[sock], threads=threads, connection_limit=limit, channel_timeout=idle_timeout,
                      cleanup_interval=1, asyncore_use_poll=True, max_request_body_size=max_request_body_size,
                      recv_bytes=65536,  # a 100-300 KB receipt in a few reads, not dozens of loop turns
                      backlog=2048, ident="tops-job-aggregator", clear_untrusted_proxy_headers=True)
    # Waitress sends what a channel has buffered as soon as it holds `send_bytes`, 1 by default:
    # an answer's header and its body went out in two send()s, two segments that woke the
    # client twice. Buffered up to this much, an answer leaves whole in one send() when its
    # request returns (the inline lane's handle_write, or the poll loop that service() wakes).
    adj.send_bytes = ANSWER_BUFFER
    dispatcher = None
    if inline:
        dispatcher = LaneDispatcher(costly_on_poll)
        dispatcher.set_thread_count(threads)
    server = GuardedServer(app, map={}, _start=True, _sock=sock, adj=adj, dispatcher=dispatcher,
                           sockinfo=(sock.family, sock.type, sock.proto, sock.getsockname()), bind_socket=False)
    server.header_timeout = header_timeout
    server.body_timeout = body_timeout
    return server


def _serve_forever(server: GuardedServer) -> None:
    def on_signal(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_signal)  # also as PID 1, where TERM is otherwise ignored
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.run()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        server.close()


Built = tuple[Any, Callable[[], None], Callable[[Any], None]]  # (WSGI app, close, once-a-second tick)


def run(build: Callable[[], Built], sock: socket.socket, *, workers: int,
        server_options: dict[str, Any], on_worker_exit: Callable[[int], None] | None = None) -> int:
    """Serve until TERM or INT. `build()` makes (WSGI app, close, tick) in the process that
    serves it (after the fork: database connections never cross one). Returns the exit status."""
    if workers <= 1:
        _serve_built(build, sock, server_options)
        return 0
    return _prefork(build, sock, workers, server_options, on_worker_exit)


def one_blas_thread() -> None:
    """Run this process's BLAS on one thread. A server's parallelism is its requests and worker
    processes; BLAS's own pool (a thread per core) multiplies with them. Two workers on two
    cores ran each opened set's small products on four threads that spun waiting for one
    another: 95 ms of CPU per tops-receipt/2 attempt instead of 16, and `503 busy` once slots
    waited 5 s (benchmarks/RESULTS.md). cap_blas_threads imports NumPy first (a process that
    tuned itself before importing NumPy used to keep a BLAS thread per core)."""
    cap_blas_threads(1)


def tune_process() -> None:
    """The settings of a process that serves verification (each worker, after the fork)."""
    # A thread waiting for the GIL (the poll loop, a cheap verification) gets it after 1 ms
    # instead of 5 behind a costly verification's Python-level work.
    sys.setswitchinterval(0.001)
    keep_freed_memory()
    one_blas_thread()


def _serve_built(build: Callable[[], Built], sock: socket.socket, server_options: dict[str, Any]) -> None:
    tune_process()
    app, close, tick = build()
    # What is built by now (modules, the app) lives as long as the process. Frozen, it is out
    # of the collector's sight: a busy worker's full collection, every five seconds or so,
    # walked 35,000 objects that are never garbage (16-19 ms each, benchmarks/RESULTS.md).
    gc.freeze()
    try:
        server = make_server(app, sock, **server_options)
        server.on_maintenance = tick
        _serve_forever(server)
    finally:
        close()


def _prefork(build: Callable[[], Built], sock: socket.socket, workers: int,
             server_options: dict[str, Any], on_worker_exit: Callable[[int], None] | None) -> int:
    children: dict[int, float] = {}  # pid -> start time
    stopping = False
    quick_deaths = 0

    def spawn() -> None:
        sys.stderr.flush()
        stop_signals = {signal.SIGTERM, signal.SIGINT}
        signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)  # none may land between fork and the handlers
        pid = os.fork()
        if pid != 0:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)
        if pid == 0:  # the worker
            status = 0
            try:
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                # Until it serves, a TERM or INT ends the worker at once (not the parent's
                # handler, which would swallow it and leave a worker nobody stops).
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)
                host, port = sock.getsockname()[:2]
                own = bind(host, port, shared=True)  # this worker's queue of the port's connections
                sock.close()
                _serve_built(build, own, server_options)
            except BaseException:
                log.exception("aggregator worker %d failed", os.getpid())
                status = 1
            finally:
                sys.stderr.flush()
                os._exit(status)
        children[pid] = time.monotonic()

    def on_stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    for _ in range(workers):
        spawn()
    status = 0
    while children:
        try:
            pid, code = os.wait()
        except InterruptedError:
            continue
        except ChildProcessError:
            break
        started = children.pop(pid, None)
        if started is None:
            continue
        if on_worker_exit is not None:
            on_worker_exit(pid)
        if stopping:
            continue
        log.error("aggregator worker %d exited (status %d); starting another", pid, os.waitstatus_to_exitcode(code))
        quick_deaths = quick_deaths + 1 if time.monotonic() - started < 2.0 else 0
        if quick_deaths >= 5:
            log.error("aggregator workers keep dying at start; stopping")
            on_stop(signal.SIGTERM, None)
            status = 1
            continue
        spawn()
    sock.close()
    return status
