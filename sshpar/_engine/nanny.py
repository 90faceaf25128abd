"""Watches one engine process: starts it, records how it exited, restarts it on request.

Layer: engine. Shipped to engines; stdlib only.

The nanny is the engine's parent, so it alone can know the exit status; it writes it to
``<runtime dir>/<uuid>.exit`` (JSON) where a client that lost the engine reads why. With
``restart: on-failure`` it starts a fresh engine (same id, socket and key; an empty
namespace) after a crash, up to ``restart_limit`` times. It keeps the key in memory only.

Engines are forked from the nanny, which has imported the engine's modules but never runs
user code: a start (and a restart) costs a fork, not a new interpreter.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from typing import Any


def beside(socket_path: str, ext: str) -> str:
    """The file beside an engine's socket with ``ext`` in place of ``.sock``."""
    stem = socket_path[: -len(".sock")] if socket_path.endswith(".sock") else socket_path
    return stem + ext


def exit_path(socket_path: str) -> str:
    return beside(socket_path, ".exit")


def describe(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exited with status {returncode}"


def main() -> None:
    """Entry point of a nanny run as its own process: one JSON line on stdin."""
    conf = json.loads(sys.stdin.readline())
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    run(conf)


def run(conf: dict) -> None:
    """Start the engine, record how it ended, restart it under ``restart: on-failure``."""
    from . import daemon  # the engine's modules, imported once: each engine is a fork of us

    os.umask(0o077)
    policy = conf.get("restart", "no")
    limit = int(conf.get("restart_limit", 0))
    ready_fd = conf.pop("ready_fd")
    stopping = {"now": False}
    child: dict[str, Any] = {"pid": None}

    def on_term(signum: int, _frame: Any) -> None:
        stopping["now"] = True
        if child["pid"] is not None:
            try:
                os.kill(child["pid"], signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    restarts = 0
    while True:
        engine_conf = dict(conf, ready_fd=ready_fd if ready_fd is not None else -1,
                           restarts=restarts)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the engine
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                daemon.run(engine_conf)
            except BaseException:  # noqa: BLE001 - into the log, then a failure status
                traceback.print_exc()
            finally:
                os._exit(code)
        child["pid"] = pid
        if ready_fd is not None:
            os.close(ready_fd)  # only the engine holds it: its death shows as EOF at once
            ready_fd = None
        _, status = os.waitpid(pid, 0)
        returncode = os.waitstatus_to_exitcode(status)
        child["pid"] = None
        # A dead engine's socket file must not look alive to a client (or a restart).
        try:
            os.unlink(conf["socket"])
        except FileNotFoundError:
            pass
        record = {"pid": pid, "returncode": returncode, "reason": describe(returncode),
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
