"""Real engine daemons on this machine, started the way the client starts them, minus SSH.

The engine bundle is written to a file and its launcher run with one JSON line on stdin, as
``sshpar._bootstrap.launch`` does over an SSH exec channel. Every engine pid a test starts is
recorded; teardown SIGKILLs any still running (after checking the pid still runs our bundle)
and asserts it is gone.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sshpar._bootstrap import build_bundle

LAUNCH_TIMEOUT = 60.0
EXIT_TIMEOUT = 15.0
_POLL = 0.02


@dataclass(frozen=True)
class Engine:
    uuid: str
    pid: int
    socket: str
    log: str
    key: bytes

    def log_text(self) -> str:
        try:
            return Path(self.log).read_text(errors="replace")
        except OSError:
            return "<no log>"


@dataclass(frozen=True)
class Launch:
    engines: list[Engine]
    doc: dict[str, Any]
    workdir: Path
    key: bytes


def process_state(pid: int) -> str | None:
    """The pid's state letter from /proc (R, S, Z...), or None when it no longer exists."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rpartition(")")[2].split()[0]


def has_exited(pid: int) -> bool:
    return process_state(pid) in (None, "Z")  # a zombie has exited; only its parent can reap it


def wait_for_exit(pid: int, timeout: float) -> bool:
    """Wait (at most ``timeout`` s) for ``pid`` to exit; True when it has."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except (AttributeError, OSError):  # no pidfd here: watch /proc instead
        return wait_until(lambda: has_exited(pid), timeout)
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        return bool(ready) or has_exited(pid)
    finally:
        os.close(fd)


def wait_until(predicate: Any, timeout: float) -> bool:
    """Poll ``predicate`` (a cheap check of observable state) until true or ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL)


class EngineLauncher:
    """Starts engines with the bundle's launcher and kills whatever is left at the end."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.bundle = base / build_bundle().name
        if not self.bundle.exists():
            self.bundle.write_bytes(build_bundle().data)
        self.pids: list[int] = []
        self._count = 0

    def run_launcher(self, request: dict[str, Any],
                     version: str | None = None) -> subprocess.CompletedProcess[str]:
        version = version or "{}.{}".format(*sys.version_info[:2])
        return subprocess.run(
            [sys.executable, str(self.bundle), "launch", version],
            input=json.dumps(request) + "\n", capture_output=True, text=True,
            timeout=LAUNCH_TIMEOUT, check=False)

    def launch(self, *, engines: int = 1, idle_timeout: float = 0, cluster: str = "t",
               workdir: Path | None = None) -> Launch:
        self._count += 1
        workdir = workdir or self.base / f"w{self._count}"
        key = os.urandom(32)
        proc = self.run_launcher({"key": key.hex(), "cluster": cluster, "engines": engines,
                                  "workdir": str(workdir), "idle_timeout": idle_timeout})
        ready = [ln for ln in proc.stdout.splitlines() if ln.startswith("SSHPAR-READY ")]
        assert proc.returncode == 0 and len(ready) == 1, (
            f"launcher failed (exit {proc.returncode})\nstdout: {proc.stdout}\n"
            f"stderr: {proc.stderr}")
        doc = json.loads(ready[0][len("SSHPAR-READY "):])
        started = [Engine(e["uuid"], e["pid"], e["socket"], e["log"], key)
                   for e in doc["engines"]]
        self.pids.extend(e.pid for e in started)
        return Launch(started, doc, workdir, key)

    def _runs_our_bundle(self, pid: int) -> bool:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        return str(self.bundle).encode() in cmdline

    def cleanup(self) -> None:
        left = []
        for pid in self.pids:
            if has_exited(pid) or not self._runs_our_bundle(pid):
                continue
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            if not wait_for_exit(pid, EXIT_TIMEOUT):
                left.append(pid)
        self.pids.clear()
        assert not left, f"engine processes survived SIGKILL: {left}"


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[EngineLauncher]:
    """Start engines of this test's own; all killed (and checked gone) at teardown."""
    la = EngineLauncher(tmp_path)
    try:
        yield la
    finally:
        la.cleanup()


@pytest.fixture(scope="module")
def module_launcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineLauncher]:
    la = EngineLauncher(tmp_path_factory.mktemp("engines"))
    try:
        yield la
    finally:
        la.cleanup()


@pytest.fixture(scope="module")
def shared_launch(module_launcher: EngineLauncher) -> Launch:
    """One engine (idle_timeout 0) shared by the tests of a module that do not stop it."""
    return module_launcher.launch(engines=1, idle_timeout=0)


@pytest.fixture
def engine(shared_launch: Launch) -> Engine:
    eng = shared_launch.engines[0]
    assert not has_exited(eng.pid), f"the shared engine died:\n{eng.log_text()}"
    return eng
