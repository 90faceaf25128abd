"""Starts engine daemons on this host and reports them: run once per host by the client.

Layer: engine. Shipped to engines; stdlib only.

Protocol with the client (over the SSH exec channel): argv carries nothing secret; stdin
carries one JSON line (cluster key, engine count, settings); stdout gets one line
``SSHPAR-READY <json>`` once every engine has bound its socket, or ``SSHPAR-ERROR <json>``.
Engines detach into their own session with stdio on log files, so they outlive this SSH
session and nothing they print can block. Nannies are forked from the launcher, engines from
their nanny: one interpreter start per host, not two per engine.
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


def runtime_dir(workdir: str, cluster: str) -> str:
    path = os.path.join(workdir, "run", cluster)
    if len(path) + 22 > _SOCKET_PATH_MAX:
        base = private_dir(os.path.join("/tmp", f"sshpar-{os.getuid()}"))
        path = os.path.join(base, cluster[:24])
    else:
        private_dir(os.path.join(workdir, "run"))
    return private_dir(path)


def main(argv: list[str]) -> None:
    os.umask(0o077)
    conf = json.loads(sys.stdin.readline())
    workdir = os.path.abspath(os.path.expanduser(conf["workdir"]))
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
    sys.stdout.write("SSHPAR-READY " + json.dumps({
        "engines": engines,
        "python": list(sys.version_info[:3]),
        "executable": sys.executable,
        "hostname": socket.gethostname(),
        "cpus": os.cpu_count(),
        "runtime_dir": run_dir,
    }) + "\n")
    sys.stdout.flush()
    # Done: the client waits for this process to end. Tearing down an interpreter that has
    # imported the engine's modules took ~17 ms; there is nothing left to clean up.
    os._exit(0)


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
