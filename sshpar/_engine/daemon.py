"""The engine daemon: a Unix socket server (IO thread) feeding a task loop (main thread).

Layer: engine. Shipped to engines; stdlib, cloudpickle and the shipped sshpar modules only.

Threads: the main thread runs tasks in order, so SIGINT interrupts the running task; an IO
thread runs an asyncio loop that accepts clients, checks every frame, queues tasks and sends
results and live output. Results stay in ``results`` until a client acknowledges them, so a
client that went away can fetch them later.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import queue
import signal
import socket
import struct
import sys
import threading
import time
from typing import Any

from .. import _wire
from ..errors import ProtocolError
from . import ops
from .executor import Executor, Task, TaskTimeout

log = logging.getLogger("sshpar.engine")

HANDSHAKE_TIMEOUT = 10.0


class Connection:
    """One connected client, as the IO thread sees it."""

    def __init__(self, sender: _wire.FrameSender, writer: Any) -> None:
        self.sender = sender
        self.writer = writer
        self.open = True

    def send(self, kind: _wire.Kind, meta: dict, payload: list | tuple = (), *,
             defer: bool = False) -> None:
        if self.open:
            try:
                self.sender.send(kind, meta, payload, defer=defer)
            except Exception as exc:  # noqa: BLE001 - a dead client must not stop the engine
                log.info("client connection lost while sending: %s", exc)
                self.open = False

    def flush(self) -> None:
        if self.open:
            try:
                self.sender.flush_small()
            except Exception as exc:  # noqa: BLE001
                log.info("client connection lost while sending: %s", exc)
                self.open = False


class Daemon:
    def __init__(self, conf: dict, key: bytes, sock: socket.socket) -> None:
        self.conf = conf
        self.key = key
        self.sock = sock
        self.uuid = conf["uuid"]
        self.socket_path = conf["socket"]
        self.idle_timeout = float(conf.get("idle_timeout") or 0)
        self.executor = Executor()
        ops.EXECUTOR = self.executor
        self.tasks: queue.Queue[Task | None] = queue.Queue()
        self.results: dict[str, Task] = {}           # finished, not yet acknowledged
        self.queued: dict[str, Task] = {}            # received, not yet finished
        self.conns: set[Connection] = set()
        self.loop = asyncio.new_event_loop()
        self._outbox: collections.deque[tuple[str, Task]] = collections.deque()
        self._wakeup_pending = False
        self._idle_handle: asyncio.TimerHandle | None = None
        self._stopping = False
        self.started_at = time.time()
        self.done_count = 0
        self.lock = threading.Lock()

    # -- main thread ----------------------------------------------------------------------
    def serve(self) -> None:
        io = threading.Thread(target=self._io_main, name="sshpar-engine-io", daemon=True)
        io.start()
        signal.signal(signal.SIGTERM, lambda *_: self._exit(0))
        signal.signal(signal.SIGINT, self._on_sigint)
        try:
            while True:
                task = self.tasks.get()
                if task is None:
                    break
                with self.lock:  # abort() and the start of a task exclude each other
                    if task.aborted:
                        continue
                    self.executor.current = task
                limit = task.meta.get("timeout")
                if limit:
                    self.loop.call_soon_threadsafe(self._arm_timeout, task, float(limit))
                self.executor.run(task)
                self._post("result", task)
        finally:
            self._exit(0)

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

    def _interrupt(self, task: Task, *, timeout: bool = False, tries: int = 100) -> None:
        ex = self.executor
        if ex.current is not task:
            return
        if not ex.in_user_code:  # still unpickling: try again in a moment (bounded)
            if tries > 0:
                self.loop.call_later(0.01, lambda: self._interrupt(task, timeout=timeout,
                                                                   tries=tries - 1))
            return
        if timeout:
            ex.timeout_hit = task.msg_id
        os.kill(os.getpid(), signal.SIGINT)

    def _arm_timeout(self, task: Task, limit: float) -> None:
        self.loop.call_later(limit, lambda: self._interrupt(task, timeout=True))

    def _exit(self, code: int) -> None:
        self._remove_socket()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    def _remove_socket(self) -> None:
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass

    def _post(self, what: str, task: Task) -> None:
        # Called from the main thread: hand work to the IO thread, waking it once per burst.
        self._outbox.append((what, task))
        if not self._wakeup_pending:
            self._wakeup_pending = True
            try:
                self.loop.call_soon_threadsafe(self._drain_outbox)
            except RuntimeError:  # loop closed: we are exiting
                pass

    # -- IO thread ------------------------------------------------------------------------
    def _io_main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start_server())
        self._arm_idle()
        self.loop.run_forever()

    async def _start_server(self) -> None:
        self.server = await asyncio.start_unix_server(self._handle, sock=self.sock,
                                                      limit=1 << 20)

    def _drain_outbox(self) -> None:
        self._wakeup_pending = False
        touched = set()
        while self._outbox:
            what, task = self._outbox.popleft()
            if task.owner is not None:
                touched.add(task.owner)
            if what == "result":
                self.queued.pop(task.msg_id, None)
                self.results[task.msg_id] = task
                self.done_count += 1
                self._send_output(task)
                self._send_result(task, task.owner)
            else:
                self._send_output(task)
        for conn in touched:  # everything of this burst in one write per client
            conn.flush()

    def _send_output(self, task: Task) -> None:
        conn = task.owner
        if conn is None or not conn.open:
            return
        for stream in (task.stdout, task.stderr):
            text, nxt = stream.take(task.sent[stream.name])
            if text:
                task.sent[stream.name] = nxt
                conn.send(_wire.Kind.OUTPUT, {"msg_id": task.msg_id, "name": stream.name,
                                              "text": text}, defer=True)

    def _send_result(self, task: Task, conn: Connection | None) -> None:
        if conn is not None and conn.open:
            conn.send(_wire.Kind.RESULT, task.result_meta(), task.result, defer=True)

    def _on_output(self, task: Task) -> None:
        self._post("output", task)

    def _arm_idle(self) -> None:
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None
        if self.idle_timeout > 0 and not self.conns:
            self._idle_handle = self.loop.call_later(self.idle_timeout, self._idle_exit)

    def _idle_exit(self) -> None:
        self._idle_handle = None
        if self.queued:  # work in progress keeps the engine alive; check again later
            self._arm_idle()
            return
        if not self.conns:
            log.info("no client for %.0f s: exiting", self.idle_timeout)
            if self.results:
                log.warning("discarding %d result(s) no client fetched: %s",
                            len(self.results), ", ".join(list(self.results)[:20]))
            self._remove_socket()
            os._exit(0)

    def _peer_ok(self, writer: asyncio.StreamWriter) -> bool:
        sock = writer.get_extra_info("socket")
        if sock is None or not hasattr(socket, "SO_PEERCRED"):
            return True
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        if uid != os.getuid():
            log.warning("refused a connection from uid %d (engine runs as uid %d)",
                        uid, os.getuid())
            return False
        return True

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._peer_ok(writer):
            writer.close()
            return
        try:
            codec = await asyncio.wait_for(
                _wire.server_handshake(reader, writer, self.key), HANDSHAKE_TIMEOUT)
        except (ProtocolError, asyncio.IncompleteReadError, asyncio.TimeoutError,
                ConnectionError) as exc:
            log.warning("handshake refused: %s", exc)
            writer.close()
            return
        conn = Connection(_wire.FrameSender(codec, writer), writer)
        self.conns.add(conn)
        self._arm_idle()
        conn.send(_wire.Kind.REPLY, {"op": "hello", **self.info()})
        parser = _wire.FrameParser(codec)
        try:
            while True:
                for frame in await _wire.read_frames(reader, parser):
                    self._dispatch(frame, conn)
        except (asyncio.IncompleteReadError, ConnectionError, EOFError):
            pass
        except ProtocolError as exc:
            log.warning("dropped a client: %s", exc)
        finally:
            conn.open = False
            self.conns.discard(conn)
            for task in self.queued.values():
                if task.owner is conn:
                    task.owner = None
            writer.close()
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

    def _dispatch(self, frame: _wire.Frame, conn: Connection) -> None:
        meta = frame.meta
        if frame.kind is _wire.Kind.TASK:
            msg_id = meta.get("msg_id")
            if not isinstance(msg_id, str) or not frame.payload:
                raise ProtocolError("TASK frame without a msg_id or payload")
            acks = meta.get("ack", [])
            if not isinstance(acks, list):
                raise ProtocolError("TASK frame with malformed acks")
            for acked in acks:
                self.results.pop(acked, None)
            task = Task(msg_id, meta, frame.payload, conn, self._on_output)
            task.queued_at = time.time()
            self.queued[msg_id] = task
            self.tasks.put(task)
        elif frame.kind is _wire.Kind.CONTROL:
            self._control(meta, conn)
        else:
            raise ProtocolError(f"unexpected {frame.kind.name} frame from a client")

    def _control(self, meta: dict, conn: Connection) -> None:
        op = meta.get("op")
        ids = meta.get("msg_ids", [])
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ProtocolError(f"CONTROL {op!r} with malformed msg_ids")
        if op == "ack":
            for msg_id in meta.get("msg_ids", ()):
                self.results.pop(msg_id, None)
        elif op == "shutdown":
            conn.send(_wire.Kind.REPLY, {"op": "shutdown", "req": meta.get("req")})
            self.loop.create_task(self._shutdown(conn))
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
        elif op == "abort":
            aborted = []
            with self.lock:
                for task in list(self.queued.values()):
                    if task is self.executor.current or task.aborted:
                        continue
                    if (msg := task.msg_id) in ids or (not ids and task.owner is conn):
                        task.aborted = True
                        task.status = "aborted"
                        aborted.append(msg)
            for msg in aborted:
                task = self.queued.pop(msg)
                self.results[msg] = task
                self._send_result(task, task.owner)
                if task.owner is not None:
                    task.owner.flush()
            conn.send(_wire.Kind.REPLY, {"op": op, "req": meta.get("req"),
                                         "aborted": aborted})
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

    async def _shutdown(self, conn: Connection) -> None:
        try:
            await asyncio.wait_for(conn.sender.flush(), 5)
        except Exception:  # noqa: BLE001 - we are exiting either way
            pass
        self._remove_socket()
        os._exit(0)


def main() -> None:
    """Entry point of one engine process, spawned by the launcher.

    stdin carries one JSON line (config and key, never argv or environment); fd ``ready_fd``
    receives one JSON line once the socket is bound.
    """
    os.umask(0o077)
    line = sys.stdin.buffer.readline()
    conf = json.loads(line)
    key = bytes.fromhex(conf.pop("key"))
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s engine[%(process)d] %(levelname)s %(message)s")
    path = conf["socket"]
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(64)
    daemon = Daemon(conf, key, sock)
    ready_fd = int(conf["ready_fd"])
    if ready_fd >= 0:  # the first start of this engine: tell the launcher we are up
        os.write(ready_fd, (json.dumps(daemon.info()) + "\n").encode())
        os.close(ready_fd)
    daemon.serve()
