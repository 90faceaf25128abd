"""Watches one engine process: starts it, records how it exited, restarts it on request.

Layer: engine. Shipped to engines; stdlib only.

The nanny is the engine's parent, so it alone can know the exit status; it writes it to
``<runtime dir>/<uuid>.exit`` (JSON) where a client that lost the engine reads why. With
``restart: on-failure`` it starts a fresh engine (same id, socket and key; an empty
namespace) after a crash, up to ``restart_limit`` times. It keeps the key in memory only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any


def exit_path(socket_path: str) -> str:
    return socket_path[: -len(".sock")] + ".exit" if socket_path.endswith(".sock") \
        else socket_path + ".exit"


def describe(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exited with status {returncode}"


def main() -> None:
    os.umask(0o077)
    conf = json.loads(sys.stdin.readline())
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    bundle = conf.pop("bundle")
    policy = conf.get("restart", "no")
    limit = int(conf.get("restart_limit", 0))
    ready_fd = conf.pop("ready_fd")
    stopping = {"now": False}
    child: dict[str, Any] = {"proc": None}

    def on_term(signum: int, _frame: Any) -> None:
        stopping["now"] = True
        proc = child["proc"]
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    restarts = 0
    while True:
        fds = (ready_fd,) if ready_fd is not None else ()
        with open(conf["log"], "ab") as log:
            proc = subprocess.Popen([sys.executable, bundle, "engine"], stdin=subprocess.PIPE,
                                    stdout=log, stderr=subprocess.STDOUT, pass_fds=fds,
                                    close_fds=True)
        child["proc"] = proc
        engine_conf = dict(conf, ready_fd=ready_fd if ready_fd is not None else -1,
                           restarts=restarts)
        assert proc.stdin is not None
        try:
            proc.stdin.write((json.dumps(engine_conf) + "\n").encode())
            proc.stdin.close()
        except BrokenPipeError:
            pass
        if ready_fd is not None:
            os.close(ready_fd)  # only the engine holds it: its death shows as EOF at once
            ready_fd = None
        while True:
            try:
                returncode = proc.wait()
                break
            except InterruptedError:
                continue
        # A dead engine's socket file must not look alive to a client (or a restart).
        try:
            os.unlink(conf["socket"])
        except FileNotFoundError:
            pass
        record = {"pid": proc.pid, "returncode": returncode, "reason": describe(returncode),
                  "time": time.time(), "restarts": restarts}
        again = (returncode != 0 and policy == "on-failure" and restarts < limit
                 and not stopping["now"])
        record["restarting"] = again
        _write_json(exit_path(conf["socket"]), record)
        if not again:
            break
        restarts += 1


def _write_json(path: str, doc: dict) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)
