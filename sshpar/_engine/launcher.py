"""Starts engine daemons on this host and reports them: run once per host by the client.

Layer: engine. Shipped to engines; stdlib only.

Protocol with the client (over the SSH exec channel): argv carries nothing secret; stdin
carries one JSON line (cluster key, engine count, settings); stdout gets one line
``SSHPAR-READY <json>`` once every engine has bound its socket, or ``SSHPAR-ERROR <json>``.
Engines detach into their own session with stdio on log files, so they outlive this SSH
session and nothing they print can block. Nannies are forked from the launcher, engines from
their nanny: one interpreter start per host, not two per engine.

A launcher asked to be kept (``keep_launcher`` seconds, and a ``launcher_id`` naming its
Python, environment, workdir and bundle) stays behind, detached, listening on a Unix socket
in a private directory: the next start with the same settings connects to it (the client's
SSH connection forwards the socket) instead of running a command, sends the same JSON line,
and gets the same report back from a fork that has everything imported already: no shell,
no interpreter start, no imports (~45 ms of a start, and its CPU). It exits after that many
seconds with no launch, or when its bundle is gone.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import sys
import time
import traceback
import uuid
from typing import Any

READY_TIMEOUT = 30.0
#: A kept launcher's client sends its request line within this long, at most this big.
REQUEST_TIMEOUT = 10.0
REQUEST_MAX = 1 << 20
_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes on Linux, 104 on macOS
_MAX_FD = os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 1024


def fail(kind: str, message: str, **extra: Any) -> None:
    sys.stdout.write("SSHPAR-ERROR " + json.dumps({"kind": kind, "message": message, **extra})
                     + "\n")
    sys.stdout.flush()
    sys.exit(3)


def private_dir(path: str) -> str:
    """Create ``path`` as a 0700 directory we own, or refuse one someone else could use."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if st.st_uid != os.getuid():
        fail("runtime", f"{path} is owned by uid {st.st_uid}, not us ({os.getuid()})")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def run_base(workdir: str, below: int) -> str:
    """The private directory sockets live under: ``workdir/run``, or ``/tmp/sshpar-<uid>``
    where ``below`` more characters under ``workdir/run`` would make a socket address too
    long."""
    base = os.path.join(workdir, "run")
    if len(base) + 1 + below > _SOCKET_PATH_MAX:
        return private_dir(os.path.join("/tmp", f"sshpar-{os.getuid()}"))
    return private_dir(base)


def runtime_dir(workdir: str, cluster: str) -> str:
    base = run_base(workdir, len(cluster) + 22)  # + "/<16 hex>.sock"
    in_workdir = base == os.path.join(workdir, "run")
    return private_dir(os.path.join(base, cluster if in_workdir else cluster[:24]))


def workdir_of(conf: dict) -> str:
    return os.path.abspath(os.path.expanduser(conf["workdir"]))


def report(doc: dict) -> None:
    """Tell the client the engines are up (one line on stdout, which it reads)."""
    sys.stdout.write("SSHPAR-READY " + json.dumps(doc) + "\n")
    sys.stdout.flush()


def main(argv: list[str]) -> None:
    os.umask(0o077)
    conf = json.loads(sys.stdin.readline())
    doc = launch(conf)
    kept = listen(conf)
    if kept is not None:
        path, listener = kept
        doc["launcher"] = {"socket": path,
                           "pid": keep(listener, path, conf) if listener else None}
    report(doc)
    # Done: the client waits for this process to end. Tearing down an interpreter that has
    # imported the engine's modules took ~17 ms; there is nothing left to clean up.
    os._exit(0)


def launch(conf: dict) -> dict:
    """Start the engines ``conf`` asks for and return the report (or ``fail``)."""
    workdir = workdir_of(conf)
    os.makedirs(workdir, mode=0o700, exist_ok=True)  # an existing one keeps its mode
    run_dir = runtime_dir(workdir, conf["cluster"])
    log_dir = private_dir(os.path.join(workdir, "logs"))
    count = conf.get("engines") or _cpus()
    # The engine's modules, imported once here: every nanny and engine is a fork of this.
    from . import daemon, nanny  # noqa: F401

    started = [spawn(nanny.run, conf, run_dir, log_dir) for _ in range(int(count))]
    deadline = time.monotonic() + READY_TIMEOUT
    try:
        engines = [wait_ready(pid, r, uid, sock, log, deadline)
                   for pid, r, uid, sock, log in started]
    except StartFailed as exc:
        # Leave nothing behind: stop every engine of this launch, started or not.
        for pid, *_ in started:
            try:
                os.killpg(pid, signal.SIGTERM)
            except OSError:
                pass
        fail(exc.kind, exc.message, log=exc.log)
    return {
        "engines": engines,
        "python": list(sys.version_info[:3]),
        "executable": sys.executable,
        "hostname": socket.gethostname(),
        "cpus": os.cpu_count(),
        "runtime_dir": run_dir,
    }


# -- the kept launcher ---------------------------------------------------------------------

def listen(conf: dict) -> tuple[str, socket.socket | None] | None:
    """The kept launcher's socket path and a listening socket for it, if ``conf`` asks to
    keep one; no socket if one already answers there (then that one serves)."""
    linger = conf.get("keep_launcher") or 0
    name = str(conf.get("launcher_id") or "")
    if not (linger > 0 and name.isalnum()):
        return None
    sock_name = f"launcher-{name}.sock"
    path = os.path.join(run_base(workdir_of(conf), len(sock_name)), sock_name)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            listener.bind(path)
        except OSError:
            if _answers(path):
                listener.close()
                return path, None
            os.unlink(path)  # a stale file: its launcher is gone
            listener.bind(path)
        os.chmod(path, 0o600)
        listener.listen(16)
    except OSError:
        listener.close()
        return None  # not kept: the launch itself goes on
    return path, listener


def _answers(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def keep(listener: socket.socket, path: str, conf: dict) -> int:
    """Fork the kept launcher, detached like a nanny, logging next to the engines; its pid."""
    log_path = os.path.join(private_dir(os.path.join(workdir_of(conf), "logs")),
                            f"launcher-{conf['launcher_id']}.log")
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid != 0:
        listener.close()
        return pid
    conf.pop("key", None)  # this start's cluster key: each later start sends its own
    try:
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDONLY)
        log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.dup2(devnull, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        keep_fd = listener.fileno()
        os.closerange(3, keep_fd)
        os.closerange(keep_fd + 1, _MAX_FD)
        serve(listener, path, float(conf["keep_launcher"]))
    except BaseException:  # noqa: BLE001 - into the log
        traceback.print_exc()
    finally:
        os._exit(0)


def serve(listener: socket.socket, path: str, linger: float) -> None:
    """Fork one launch per connection until ``linger`` seconds pass with none, or the bundle
    this process runs from is gone (a client then falls back to the launch command)."""
    from .reactor import peer_uid  # imported already: the launch imported the engine

    bundle = os.path.abspath(sys.argv[0])
    bound = os.stat(path).st_ino
    _log(f"kept for {linger:g} s idle at {path}")
    try:
        while True:
            ready, _, _ = select.select([listener], [], [], linger)
            _reap()
            if not ready:
                _log("idle: exiting")
                return
            conn, _ = listener.accept()
            if not os.path.exists(bundle):
                conn.close()
                _log(f"{bundle} is gone: exiting")
                return
            try:
                uid: int | None = peer_uid(conn)
            except OSError:
                uid = None
            if uid != os.getuid():
                conn.close()
                _log(f"refused a connection from uid {uid} (runs as uid {os.getuid()})")
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:  # one launch, stdio on the connection, as if run by the command
                code = 0
                try:
                    listener.close()
                    line = _request(conn)
                    os.dup2(conn.fileno(), 1)
                    conn.close()
                    if line.strip():
                        report(launch(json.loads(line)))
                except SystemExit as exc:  # fail() has reported
                    code = exc.code if isinstance(exc.code, int) else 1
                except BaseException:  # noqa: BLE001 - into the log; the client falls back
                    traceback.print_exc()
                    code = 1
                finally:
                    os._exit(code)
            conn.close()
    finally:
        try:
            if os.stat(path).st_ino == bound:  # still ours, not a newer launcher's
                os.unlink(path)
        except OSError:
            pass


def _request(conn: socket.socket) -> bytes:
    """The one JSON line a client sends (empty if it sends none within REQUEST_TIMEOUT)."""
    conn.settimeout(REQUEST_TIMEOUT)
    data = b""
    try:
        while b"\n" not in data and len(data) < REQUEST_MAX:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError:
        return b""
    finally:
        conn.settimeout(None)
    return data.split(b"\n", 1)[0] if b"\n" in data else b""


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _log(message: str) -> None:
    sys.stderr.write(time.strftime("%Y-%m-%d %H:%M:%S ") + f"launcher: {message}\n")
    sys.stderr.flush()


def spawn(run_nanny: Any, conf: dict, run_dir: str, log_dir: str) -> tuple:
    """Fork one nanny (which forks its engine), detached in a session of its own with stdio on
    the engine's log; it holds only the write end of the readiness pipe."""
    engine_uuid = uuid.uuid4().hex[:16]
    sock = os.path.join(run_dir, f"{engine_uuid}.sock")
    log_path = os.path.join(log_dir, f"engine-{engine_uuid}.log")
    r, w = os.pipe()
    nanny_conf = {
        "uuid": engine_uuid,
        "socket": sock,
        "key": conf["key"],
        "cluster": conf["cluster"],
        "idle_timeout": conf.get("idle_timeout", 3600),
        "restart": conf.get("restart", "no"),
        "restart_limit": conf.get("restart_limit", 0),
        "ready_fd": w,
        "log": log_path,
    }
    log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the nanny: off the SSH session's stdio and process group
        code = 1
        try:
            os.setsid()
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.dup2(log_fd, 1)
            os.dup2(log_fd, 2)
            os.closerange(3, w)
            os.closerange(w + 1, _MAX_FD)
            run_nanny(nanny_conf)
            code = 0
        except BaseException:  # noqa: BLE001 - into the log, then a failure status
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(w)
    os.close(log_fd)
    return pid, r, engine_uuid, sock, log_path


def wait_ready(nanny_pid: int, r: int, engine_uuid: str, sock: str,
               log_path: str, deadline: float) -> dict:
    data = b""
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            raise StartFailed("timeout", f"engine {engine_uuid} did not report ready within "
                              f"{READY_TIMEOUT:.0f} s", _tail(log_path))
        ready, _, _ = select.select([r], [], [], left)
        if ready:
            chunk = os.read(r, 4096)
            if not chunk:
                raise StartFailed("engine", "engine exited during start", _tail(log_path))
            data += chunk
    os.close(r)
    info = json.loads(data)
    return {"uuid": engine_uuid, "pid": info["pid"], "nanny": nanny_pid, "socket": sock,
            "log": log_path, "started": info.get("started")}


class StartFailed(Exception):
    def __init__(self, kind: str, message: str, log: str) -> None:
        super().__init__(message)
        self.kind, self.message, self.log = kind, message, log


def _cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _tail(path: str, limit: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""
