"""The engine daemon: one thread runs tasks and serves the socket; a sentry covers long tasks.

Layer: engine. Shipped to engines; stdlib, cloudpickle and the shipped sshpar modules only.

The main thread drives the reactor (``reactor.py``) and runs each task inline as it comes,
so a round trip costs no thread hand-off. It gives up ``io_lock`` while a task runs; once a
task has run for ``SENTRY_POLL`` seconds, the sentry thread takes the lock and serves the
socket until the task ends: heartbeats, interrupts, aborts, live output, new clients. The
sentry also enforces time limits. SIGINT is raised only inside user code (the task being
interrupted). Results stay in ``results`` until a client acknowledges them, so a client that
went away can fetch them later.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

from .. import _wire
from ..errors import ProtocolError
from . import ops
from .executor import Executor, Task, TaskTimeout
from .nanny import beside
from .reactor import Conn, Reactor

log = logging.getLogger("sshpar.engine")

#: How long a task runs before the sentry takes over the socket (and how often it looks).
SENTRY_POLL = 0.02
#: The sentry sleeps until the next task after this long without one.
SENTRY_NAP = 1.0
#: Deferred results are written at the latest this late while tasks keep coming (seconds).
RESULT_DELAY = 0.002
#: While tasks are queued, the socket is looked at between two of them at least this often.
POLL_GAP = 0.0005
#: After a task whose client asked (``spin`` in its meta), the engine looks for the next one
#: this long before it sleeps (seconds).
SPIN = 200e-6
#: A result this large (bytes) for a task marked ``move_large`` is fetched over the client's
#: main connection instead (see _lane.py).
MOVE_LARGE = 1 << 20
#: An interrupt that finds the task outside user code (still unpickling) is retried this long.
INTERRUPT_RETRY = 2.0


class Daemon:
    def __init__(self, conf: dict, key: bytes, sock: socket.socket) -> None:
        self.conf = conf
        self.uuid = conf["uuid"]
        self.socket_path = conf["socket"]
        self.idle_timeout = float(conf.get("idle_timeout") or 0)
        self.executor = Executor()
        ops.EXECUTOR = self.executor
        self.ready: collections.deque[Task] = collections.deque()  # received, not started
        self.queued: dict[str, Task] = {}            # received, not yet finished
        self.results: dict[str, Task] = {}           # finished, not yet acknowledged
        self.reactor = Reactor(sock, key, on_connect=self._on_connect,
                               on_frame=self._dispatch, on_close=self._on_close)
        self.io_lock = threading.Lock()
        self.started_at = time.time()
        self.done_count = 0
        self._spin_until = 0.0
        self._idle_deadline: float | None = None
        # shared with the sentry
        self.busy: Task | None = None
        self.busy_since = 0.0
        self.runs = 0
        self._sentry_serving = False
        self._sentry_asleep = False
        self._sentry_bell = threading.Event()
        self._interrupt_due: tuple[Task, bool, float] | None = None

    @property
    def conns(self) -> set[Conn]:
        return self.reactor.conns

    # -- main thread ----------------------------------------------------------------------
    def serve(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self._exit(0))
        signal.signal(signal.SIGINT, self._on_sigint)
        # The kernel may hand a signal to another thread (the sentry, a handshake): Python
        # then only sets a flag that the main thread reads when it next runs Python code,
        # and idle in epoll_wait that is never (a SIGTERM went unanswered). A signal also
        # writes a byte to the reactor's wake-up socket, so the main thread wakes and runs
        # the handler.
        signal.set_wakeup_fd(self.reactor.wake_fileno(), warn_on_full_buffer=False)
        self.io_lock.acquire()
        threading.Thread(target=self._sentry, name="sshpar-sentry", daemon=True).start()
        self._arm_idle()
        reactor = self.reactor
        polled = 0.0
        try:
            while True:
                if self.ready:
                    # Between queued tasks, look at the socket every POLL_GAP: control frames
                    # (an abort of the next task) and new work, without a syscall per task.
                    now = time.monotonic()
                    if now - polled >= POLL_GAP:
                        reactor.poll(0)
                        reactor.flush_due(RESULT_DELAY)
                        polled = now
                    if self.ready:
                        self._run(self.ready.popleft())
                else:
                    reactor.flush_due(0)
                    # Just answered: the next call of a client's loop is likely on its way.
                    # Look for it without sleeping for a moment: waking a sleeping process
                    # costs tens of microseconds on a virtual machine, as much as a call.
                    while time.monotonic() < self._spin_until and not self.ready:
                        reactor.poll(0)
                    if self.ready:
                        continue
                    reactor.poll(self._wait_time())
                    polled = time.monotonic()  # what just came in needs no second look
                    self._check_idle()
        finally:
            self._exit(0)

    def _run(self, task: Task) -> None:
        ex = self.executor
        ex.current = task
        self.busy_since = time.monotonic()
        self.busy = task
        self.runs += 1
        if self._sentry_asleep:
            self._sentry_asleep = False
            self._sentry_bell.set()
        self.io_lock.release()
        try:
            ex.run(task)
        finally:
            self.busy = None  # before looking at _sentry_serving: see _sentry_serve
            if self._sentry_serving:
                self.reactor.wake()
            self.io_lock.acquire()
        self._send_output(task)
        # Nothing else to run: the answer goes now (bookkeeping after); else it may wait a
        # moment for the next results, to go out together.
        self._send_result(task, task.owner, first=True, now=not self.ready)
        self.queued.pop(task.msg_id, None)
        self.results[task.msg_id] = task
        self.done_count += 1
        # Only a client on this machine asks for it (a direct lane, see _lane.py): through
        # SSH the next call comes later, and spinning would take CPU from sshd and the client.
        self._spin_until = time.monotonic() + SPIN if task.meta.get("spin") else 0.0

    def _on_sigint(self, signum: int, frame: Any) -> None:
        # Interrupts are aimed at the running task: raise only inside user code, never
        # between tasks or while the engine itself is at work.
        ex = self.executor
        task = ex.current
        if task is None or not ex.in_user_code:
            return
        if ex.timeout_hit == task.msg_id:
            raise TaskTimeout(f"time limit of {task.meta.get('timeout'):g} s exceeded")
        raise KeyboardInterrupt

    def _interrupt(self, task: Task, *, timeout: bool = False) -> None:
        ex = self.executor
        if ex.current is not task:
            return
        if not ex.in_user_code:  # still unpickling: the sentry tries again (bounded)
            if self._interrupt_due is None:
                self._interrupt_due = (task, timeout, time.monotonic() + INTERRUPT_RETRY)
            return
        self._interrupt_due = None
        if timeout:
            ex.timeout_hit = task.msg_id
        os.kill(os.getpid(), signal.SIGINT)

    def _exit(self, code: int) -> None:
        self._remove_socket()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - e.g. a SIGTERM in the middle of a log write
                pass  # ("reentrant call"): whatever happens, the engine must exit
        os._exit(code)

    def _remove_socket(self) -> None:
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass

    # -- the sentry thread ----------------------------------------------------------------
    def _sentry(self) -> None:
        seen, quiet_since = -1, time.monotonic()
        while True:
            task, now = self.busy, time.monotonic()
            if task is None:
                if self.runs != seen:
                    seen, quiet_since = self.runs, now
                elif now - quiet_since >= SENTRY_NAP:  # no work for a while: sleep until some
                    self._sentry_asleep = True
                    if self.busy is None and self.runs == seen:
                        self._sentry_bell.wait()
                    self._sentry_bell.clear()
                    self._sentry_asleep = False
                    continue
                time.sleep(SENTRY_POLL)
                continue
            self._watch(task, now)
            elapsed = now - self.busy_since
            if elapsed < SENTRY_POLL:
                time.sleep(min(SENTRY_POLL - elapsed, self._limit_left(task, now)))
            elif self.io_lock.acquire(timeout=SENTRY_POLL):
                try:
                    self._sentry_serve(task)
                finally:
                    self.io_lock.release()

    def _sentry_serve(self, task: Task) -> None:
        """Serve the socket while ``task`` runs. The main thread clears ``busy`` before it
        looks at ``_sentry_serving``, and we set that before looking at ``busy``: so either
        we see the task end, or the main thread sees us and wakes the reactor."""
        self._sentry_serving = True
        try:
            while self.busy is task:
                now = time.monotonic()
                self._watch(task, now)
                self._send_output(task)
                self.reactor.flush_due(0)
                self.reactor.poll(min(SENTRY_POLL, self._limit_left(task, now)))
        finally:
            self._sentry_serving = False

    def _limit_left(self, task: Task, now: float) -> float:
        limit = task.meta.get("timeout")
        if not limit or self.executor.timeout_hit == task.msg_id:
            return SENTRY_POLL
        return max(0.0, self.busy_since + float(limit) - now)

    def _watch(self, task: Task, now: float) -> None:
        """Time limits, and interrupts waiting for the task to reach user code."""
        due = self._interrupt_due
        if due is not None:
            if due[0] is not task or now > due[2]:
                self._interrupt_due = None
            else:
                self._interrupt(task, timeout=due[1])
        limit = task.meta.get("timeout")
        if (limit and self.executor.timeout_hit != task.msg_id
                and now - self.busy_since >= float(limit)):
            self._interrupt(task, timeout=True)

    # -- connections (io_lock holder) -----------------------------------------------------
    def _send_output(self, task: Task) -> None:
        conn = task.owner
        if conn is None or not conn.open:
            return
        for stream in (task.stdout, task.stderr):
            if stream is None or len(stream.parts) == task.sent[stream.name]:
                continue  # nothing written, or nothing new
            text, nxt = stream.take(task.sent[stream.name])
            if text:
                task.sent[stream.name] = nxt
                conn.send(_wire.Kind.OUTPUT, {"msg_id": task.msg_id, "name": stream.name,
                                              "text": text}, defer=True)

    def _send_result(self, task: Task, conn: Conn | None, *, first: bool = False,
                     now: bool = False) -> None:
        if conn is None or not conn.open:
            return
        if (first and task.meta.get("move_large")
                and _wire.payload_size(task.result) >= MOVE_LARGE):
            # The client asked for large results on its main connection (a direct lane
            # through an SSH forwarder): say so here; it fetches the result there.
            meta, payload = {"msg_id": task.msg_id, "status": "moved"}, []
        else:
            meta, payload = task.result_meta(), task.result
        if now:
            conn.send(_wire.Kind.RESULT, meta, payload)
        else:
            conn.send_result(meta, payload)

    def _arm_idle(self) -> None:
        self._idle_deadline = None
        if self.idle_timeout > 0 and not self.conns:
            self._idle_deadline = time.monotonic() + self.idle_timeout

    def _wait_time(self) -> float | None:
        if self._idle_deadline is None:
            return None
        return max(0.0, self._idle_deadline - time.monotonic())

    def _check_idle(self) -> None:
        if self._idle_deadline is None or time.monotonic() < self._idle_deadline:
            return
        if self.queued:  # work in progress keeps the engine alive; check again later
            self._arm_idle()
            return
        log.info("no client for %.0f s: exiting", self.idle_timeout)
        if self.results:
            log.warning("discarding %d result(s) no client fetched: %s",
                        len(self.results), ", ".join(list(self.results)[:20]))
        self._exit(0)

    def _on_connect(self, conn: Conn) -> None:
        self._arm_idle()
        conn.send(_wire.Kind.REPLY, {"op": "hello", **self.info()})

    def _on_close(self, conn: Conn) -> None:
        for task in self.queued.values():
            if task.owner is conn:
                task.owner = None
        self._arm_idle()

    def info(self) -> dict:
        return {
            "uuid": self.uuid,
            "pid": os.getpid(),
            "python": list(sys.version_info[:3]),
            "executable": sys.executable,
            "hostname": socket.gethostname(),
            "time": time.time(),
            "started": self.started_at,
            "queued": len(self.queued),
            "busy": self.executor.current is not None,
            "done": self.done_count,
            "unacked": len(self.results),
            "clients": len(self.conns),
        }

    def _dispatch(self, frame: _wire.Frame, conn: Conn) -> None:
        meta = frame.meta
        if frame.kind is _wire.Kind.TASK:
            acks = meta.get("ack")
            if acks is not None:
                if not isinstance(acks, list) or not all(isinstance(a, str) for a in acks):
                    raise ProtocolError("TASK frame with malformed acks")
                for acked in acks:
                    self.results.pop(acked, None)
            for task_meta, payload in _wire.items(meta, frame.payload):
                self._queue_task(task_meta, payload, conn)
        elif frame.kind is _wire.Kind.CONTROL:
            self._control(meta, conn)
        else:
            raise ProtocolError(f"unexpected {frame.kind.name} frame from a client")

    def _queue_task(self, meta: dict, payload: list, conn: Conn) -> None:
        msg_id = meta.get("msg_id")
        if not isinstance(msg_id, str) or not payload:
            raise ProtocolError("TASK without a msg_id or payload")
        ref, keep = meta.get("fn"), meta.get("fn_keep")
        if ref is not None:  # a function sent earlier on this stream
            if not isinstance(ref, bytes) or ref not in conn.functions:
                raise ProtocolError("TASK refers to a function never sent on this connection")
            payload = [conn.functions[ref], *payload[1:]]
        elif keep is not None:
            if (not isinstance(keep, bytes) or len(conn.functions) >= _wire.FUNCTIONS_KEPT
                    or _wire.buffer_size(payload[0]) > _wire.FUNCTION_KEEP_MAX
                    or _wire.function_digest(payload[0]) != keep):
                raise ProtocolError("TASK with a malformed fn_keep")
            conn.functions[keep] = payload[0]
        task = Task(msg_id, meta, payload, conn, ref or keep)
        task.queued_at = time.time()
        self.queued[msg_id] = task
        self.ready.append(task)

    def _control(self, meta: dict, conn: Conn) -> None:
        op = meta.get("op")
        ids = meta.get("msg_ids", [])
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ProtocolError(f"CONTROL {op!r} with malformed msg_ids")
        if op == "ack":
            for msg_id in meta.get("msg_ids", ()):
                self.results.pop(msg_id, None)
        elif op == "shutdown":
            conn.send(_wire.Kind.REPLY, {"op": "shutdown", "req": meta.get("req")})
            conn.flush_blocking(5.0)
            self._exit(0)
        elif op == "ping":
            conn.send(_wire.Kind.REPLY, {"op": "ping"})
        elif op == "interrupt":
            task = self.executor.current
            hit = task is not None and (not ids or task.msg_id in ids)
            if hit:
                assert task is not None
                self._interrupt(task)
            conn.send(_wire.Kind.REPLY, {"op": op, "req": meta.get("req"),
                                         "interrupted": task.msg_id if hit and task else None})
        elif op == "abort":  # tasks not started yet; the running one is left to interrupt
            aborted = [t for t in self.ready
                       if t.msg_id in ids or (not ids and t.owner is conn)]
            for task in aborted:
                task.aborted = True
                task.status = "aborted"
                self.queued.pop(task.msg_id, None)
                self.results[task.msg_id] = task
                self._send_result(task, task.owner)
            if aborted:
                self.ready = collections.deque(t for t in self.ready if not t.aborted)
            conn.send(_wire.Kind.REPLY, {"op": op, "req": meta.get("req"),
                                         "aborted": [t.msg_id for t in aborted]})
        elif op == "info":
            conn.send(_wire.Kind.REPLY, {"op": "info", "req": meta.get("req"), **self.info()})
        elif op == "fetch":
            found = {}
            for msg_id in meta.get("msg_ids", ()):
                if msg_id in self.results:
                    task = self.results[msg_id]
                    task.owner = conn
                    self._send_result(task, conn)
                    found[msg_id] = "done"
                elif msg_id in self.queued:
                    task = self.queued[msg_id]
                    task.owner = conn           # its result now goes to this client
                    task.sent = {"stdout": 0, "stderr": 0}
                    self._send_output(task)
                    found[msg_id] = "pending"
                else:
                    found[msg_id] = "unknown"
            conn.send(_wire.Kind.REPLY, {"op": "fetch", "req": meta.get("req"),
                                         "found": found})
        else:
            conn.send(_wire.Kind.REPLY, {"op": op, "req": meta.get("req"),
                                         "error": f"unknown control operation {op!r}"})


def main() -> None:
    """Entry point of an engine run as its own process (``bundle.pyz engine``): stdin carries
    one JSON line (config and key, never argv or environment)."""
    conf = json.loads(sys.stdin.buffer.readline())
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    run(conf)


def run(conf: dict) -> None:
    """Bind the engine's socket and serve until told to exit (never returns). The nanny calls
    this in a forked child; fd ``ready_fd`` receives one JSON line once the socket is bound."""
    os.umask(0o077)
    key = bytes.fromhex(conf.pop("key"))
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s engine[%(process)d] %(levelname)s %(message)s")
    path = conf["socket"]
    # Bound and listening under another name, then renamed into place: whoever finds the
    # socket file can connect to it (a client reopening a restarted engine relies on that).
    staged = beside(path, ".bind")
    try:
        os.unlink(staged)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(staged)
    os.chmod(staged, 0o600)
    sock.listen(64)
    os.replace(staged, path)
    daemon = Daemon(conf, key, sock)
    ready_fd = int(conf["ready_fd"])
    if ready_fd >= 0:  # the first start of this engine: tell the launcher we are up
        os.write(ready_fd, (json.dumps(daemon.info()) + "\n").encode())
        os.close(ready_fd)
    daemon.serve()
