"""The raw limits: what plain OpenSSH (and plain asyncssh) do with no library on top.

- connect: ``ssh host true`` (and ``ssh host python -c pass``, the floor of any Python engine)
- round trip: a persistent ``ssh host python raw_server.py``; each call is a cloudpickled
  ``(f, args, kwargs)`` frame one way and a pickled result the other
- throughput: ``ssh host 'cat > /dev/null'`` up, ``ssh host cat FILE`` down

The ssh_config uses the same key exchange and cipher as sshpar's asyncssh transport
(curve25519-sha256, aes128-gcm), so the comparison is of software, not of algorithms. The
asyncssh figures (``asyncssh_*``) use one asyncssh connection with those algorithms and a pty
keeper session, as sshpar does: the ceiling of the library sshpar is built on.
"""

from __future__ import annotations

import asyncio
import fcntl
import io
import os
import pickle
import struct
import subprocess
import time
from typing import Any

import cloudpickle
import tasks
from harness import (
    MB,
    CpuMeter,
    Env,
    MiB,
    latency_figures,
    measure_bulk,
    measure_latency,
    sshd_pids,
)

_LEN = struct.Struct("<Q")


class RawPipe:
    """``ssh host python raw_server.py``: cloudpickled calls over the ssh pipe."""

    def __init__(self, env: Env, host: int = 0) -> None:
        server = os.path.join(env.bench, "raw_server.py")
        self.proc = subprocess.Popen([*env.ssh(host), env.python, server], bufsize=0,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.w = self.proc.stdin
        self.r = io.BufferedReader(self.proc.stdout, 1 << 16)  # type: ignore[arg-type,type-var]
        line = self.r.readline()
        if not line.endswith(b"\n"):
            raise RuntimeError("raw_server did not start (see the worker log)")
        self.remote_pid = int(line)

    def send(self, f: Any, *args: Any) -> None:
        body = cloudpickle.dumps((f, args, {}))
        _write_all(self.w, _LEN.pack(len(body)) + body)

    def send_many(self, f: Any, args_list: list[tuple]) -> None:
        """Several calls in one write."""
        frames = []
        for args in args_list:
            body = cloudpickle.dumps((f, args, {}))
            frames += [_LEN.pack(len(body)), body]
        _write_all(self.w, b"".join(frames))

    def recv(self) -> Any:
        (n,) = _LEN.unpack(_read_exact(self.r, 8))
        return pickle.loads(_read_exact(self.r, n))

    def call(self, f: Any, *args: Any) -> Any:
        self.send(f, *args)
        return self.recv()

    def close(self) -> None:
        self.w.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _write_all(w: Any, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[w.write(view):]


def _read_exact(r: Any, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = r.readinto(view[got:])
        if not k:
            raise EOFError("the ssh pipe closed")
        got += k
    return buf


def _big_pipe(f: Any) -> None:
    """A 1 MiB pipe buffer (Linux F_SETPIPE_SZ): fewer wake-ups between ssh and us, which
    is worth ~50% on the download here. Best effort."""
    try:
        fcntl.fcntl(f.fileno(), 1031, 1 << 20)
    except OSError:
        pass


def _ssh_time(argv_list: list[list[str]]) -> float:
    """Seconds for all these commands, started at once, to exit (each must exit 0)."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen(argv, stdin=subprocess.DEVNULL) for argv in argv_list]
    for argv, proc in zip(argv_list, procs):
        if proc.wait(60) != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}")
    return time.perf_counter() - t0


# -- workloads --------------------------------------------------------------------------------
def start(env: Env, p: dict) -> dict:
    t_true = _ssh_time([[*env.ssh(0), "true"]])
    t_py = _ssh_time([[*env.ssh(0), env.python, "-c", "pass"]])
    return {"seconds": t_true, "ssh_python_s": t_py}


def start4(env: Env, p: dict) -> dict:
    return {"seconds": _ssh_time([[*env.ssh(h), "true"] for h in range(len(env.hosts))])}


def apply(env: Env, p: dict) -> dict:
    pipe = RawPipe(env)
    try:
        out = measure_latency(lambda: pipe.call(tasks.noop), p["calls"], p["warmup"])
        meter = CpuMeter({"ssh_client": lambda: [pipe.proc.pid], "sshd": sshd_pids(env),
                          "engines": lambda: [pipe.remote_pid]})
        n = p["calls"]
        meter.start()
        for _ in range(n):
            pipe.call(tasks.noop)
        out["cpu_us_per_call"] = meter.stop(n)
    finally:
        pipe.close()
    out.update({f"asyncssh_{k}": v for k, v in asyncio.run(_asyncssh_latency(env, p)).items()})
    out.update({f"iothread_{k}": v for k, v in _iothread_latency(env, p).items()})
    return out


def _iothread_latency(env: Env, p: dict) -> dict:
    """The floor of a client built like sshpar's, with nothing else: the caller hands a
    message to an asyncio loop in another thread, which writes it to a local echo process
    (no SSH) and hands the reply back through a Future."""
    import concurrent.futures
    import socket
    import threading

    mine, theirs = socket.socketpair()
    echo = subprocess.Popen(
        [env.python, "-c", "import socket, sys\n"
         "s = socket.socket(fileno=int(sys.argv[1]))\n"
         "while (d := s.recv(65536)):\n    s.sendall(d)\n", str(theirs.fileno())],
        pass_fds=(theirs.fileno(),))
    theirs.close()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    waiting: list[concurrent.futures.Future] = []

    class Echo(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            waiting.pop().set_result(data)

    async def connect() -> Echo:
        _, proto = await loop.create_unix_connection(Echo, sock=mine)
        return proto

    proto = asyncio.run_coroutine_threadsafe(connect(), loop).result(10)
    message = cloudpickle.dumps((tasks.noop, (), {}))

    def call() -> None:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        waiting.append(fut)
        loop.call_soon_threadsafe(proto.transport.write, message)
        fut.result(10)

    try:
        return measure_latency(call, p["calls"], p["warmup"])
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        mine.close()  # the echo process sees the end of its input and exits
        try:
            echo.wait(10)
        except subprocess.TimeoutExpired:
            echo.kill()
            echo.wait()


TINY_WINDOW = 256  # calls per write; two windows per pipe in flight


def _pipelined(pipes: list[RawPipe], n: int) -> list[list[Any]]:
    """Calls ``inc(i)`` alternating over the pipes, one thread: each round writes a window of
    calls to every pipe, then reads the previous round's replies (so the far ends never
    wait for us)."""
    ids = [list(range(k, n, len(pipes))) for k in range(len(pipes))]
    batches = [[ids_k[j:j + TINY_WINDOW] for j in range(0, len(ids_k), TINY_WINDOW)]
               for ids_k in ids]
    out: list[list[Any]] = [[] for _ in pipes]
    owed: list[list[int]] = [[] for _ in pipes]
    rounds = max(len(b) for b in batches)
    for r in range(rounds + 1):
        for k, pipe in enumerate(pipes):
            if r < len(batches[k]):
                pipe.send_many(tasks.inc, [(i,) for i in batches[k][r]])
                owed[k].append(len(batches[k][r]))
        if r:
            for k, pipe in enumerate(pipes):
                if owed[k]:
                    out[k].extend(pipe.recv() for _ in range(owed[k].pop(0)))
    return out


def tiny(env: Env, p: dict) -> dict:
    n = p["tasks"]
    pipes = [RawPipe(env), RawPipe(env)]
    try:
        _pipelined(pipes, 1000)  # warm-up
        meter = CpuMeter({"ssh_client": lambda: [pp.proc.pid for pp in pipes],
                          "sshd": sshd_pids(env),
                          "engines": lambda: [pp.remote_pid for pp in pipes]})
        meter.start()
        t0 = time.perf_counter()
        results = _pipelined(pipes, n)
        elapsed = time.perf_counter() - t0
        cpu = meter.stop(n)
        assert results[0][:2] == [1, 3] and len(results[0]) + len(results[1]) == n
    finally:
        for pipe in pipes:
            pipe.close()
    return {"tasks": n, "seconds": elapsed, "tasks_per_s": n / elapsed, "cpu_us_per_task": cpu}


def map(env: Env, p: dict) -> dict:  # noqa: A001 - the workload's name
    n = p["items"]
    items = list(range(n))
    pipes = [RawPipe(env), RawPipe(env)]
    try:
        for pipe in pipes:
            pipe.call(tasks.map_chunk, tasks.double, [1])
        t0 = time.perf_counter()
        half = (n + 1) // 2
        for k, pipe in enumerate(pipes):
            pipe.send(tasks.map_chunk, tasks.double, items[k * half:(k + 1) * half])
        out = pipes[0].recv() + pipes[1].recv()
        elapsed = time.perf_counter() - t0
        assert out[:3] == [0, 2, 4] and len(out) == n
    finally:
        for pipe in pipes:
            pipe.close()
    return {"items": n, "seconds": elapsed, "items_per_s": n / elapsed}


def bulk(env: Env, p: dict) -> dict:
    """OpenSSH's pipe each way, then asyncssh's (in the same fresh process: RSS is OpenSSH's
    and asyncssh's together, reported for completeness only)."""
    nbytes = p["nbytes"]
    src = os.path.join(env.scratch("raw"), f"array-{nbytes}.bin")
    tasks.make_array(nbytes).tofile(src)

    def push(arr: Any) -> None:
        proc = subprocess.Popen([*env.ssh(0), "echo ready; cat > /dev/null; echo done"],
                                bufsize=0, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert proc.stdin is not None and proc.stdout is not None
        _big_pipe(proc.stdin)
        if proc.stdout.readline() != b"ready\n":
            raise RuntimeError("ssh cat did not start")
        t0 = time.perf_counter()
        _write_all(proc.stdin, memoryview(arr).cast("B"))
        proc.stdin.close()
        if proc.stdout.readline() != b"done\n":
            raise RuntimeError("ssh cat did not finish")
        times["push"] = time.perf_counter() - t0
        proc.wait(10)

    def pull() -> Any:
        import numpy as np

        proc = subprocess.Popen([*env.ssh(0), f"echo ready; read go; cat {src}"], bufsize=0,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert proc.stdin is not None and proc.stdout is not None
        _big_pipe(proc.stdout)
        if proc.stdout.readline() != b"ready\n":
            raise RuntimeError("ssh cat did not start")
        t0 = time.perf_counter()
        proc.stdin.write(b"go\n")
        buf = _read_exact(proc.stdout, nbytes)
        times["pull"] = time.perf_counter() - t0
        proc.stdin.close()
        proc.wait(10)
        return np.frombuffer(buf, dtype=np.float64)

    times: dict[str, float] = {}
    out = measure_bulk(push, pull, nbytes)
    # The connection set-up is outside the timed part: only the bytes are timed.
    out.update(push_s=times["push"], pull_s=times["pull"], push_MBps=nbytes / MB / times["push"],
               pull_MBps=nbytes / MB / times["pull"])
    a = asyncio.run(_asyncssh_bulk(env, nbytes, src))
    out["asyncssh_push_MBps"] = a["push"]
    out["asyncssh_pull_MBps"] = a["pull"]
    return out


# -- plain asyncssh ---------------------------------------------------------------------------
async def _asyncssh_connect(env: Env) -> Any:
    import asyncssh

    h = env.hosts[0]
    conn = await asyncssh.connect(
        h.ip, port=h.port, username=h.user, client_keys=[h.key], known_hosts=h.known_hosts,
        kex_algs=["curve25519-sha256"], encryption_algs=["aes128-gcm@openssh.com"],
        compression_algs=None)
    # As sshpar does: a pty session makes sshd set TCP_NODELAY on the connection.
    keeper = await conn.create_process("exec cat >/dev/null", term_type="dumb", encoding=None)
    return conn, keeper


async def _asyncssh_latency(env: Env, p: dict) -> dict:
    conn, keeper = await _asyncssh_connect(env)
    try:
        server = os.path.join(env.bench, "raw_server.py")
        proc = await conn.create_process(f"{env.python} {server}", encoding=None)
        await proc.stdout.readline()

        async def call() -> Any:
            body = cloudpickle.dumps((tasks.noop, (), {}))
            proc.stdin.write(_LEN.pack(len(body)) + body)
            (n,) = _LEN.unpack(await proc.stdout.readexactly(8))
            return pickle.loads(await proc.stdout.readexactly(n))

        for _ in range(p["warmup"]):
            await call()
        samples = []
        for _ in range(p["calls"]):
            t0 = time.perf_counter()
            await call()
            samples.append(time.perf_counter() - t0)
        proc.stdin.write_eof()
        await proc.wait_closed()
        return latency_figures(samples)
    finally:
        keeper.close()
        conn.close()
        await conn.wait_closed()


async def _asyncssh_bulk(env: Env, nbytes: int, src: str) -> dict:
    conn, keeper = await _asyncssh_connect(env)
    data = memoryview(tasks.make_array(nbytes)).cast("B")
    try:
        proc = await conn.create_process("echo ready; cat > /dev/null; echo done", encoding=None)
        await proc.stdout.readline()
        t0 = time.perf_counter()
        for i in range(0, nbytes, MiB):
            proc.stdin.write(data[i:i + MiB])
            await proc.stdin.drain()
        proc.stdin.write_eof()
        await proc.stdout.readline()
        t_push = time.perf_counter() - t0
        await proc.wait_closed()

        proc = await conn.create_process(f"echo ready; read go; cat {src}", encoding=None)
        await proc.stdout.readline()
        t0 = time.perf_counter()
        proc.stdin.write(b"go\n")
        got = 0
        while got < nbytes:
            chunk = await proc.stdout.read(4 * MiB)
            if not chunk:
                break
            got += len(chunk)
        t_pull = time.perf_counter() - t0
        await proc.wait_closed()
        return {"push": nbytes / MB / t_push, "pull": nbytes / MB / t_pull}
    finally:
        keeper.close()
        conn.close()
        await conn.wait_closed()
