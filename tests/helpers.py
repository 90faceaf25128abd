"""Small test helpers: find engine processes and wait (bounded) for them to go."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

GONE_TIMEOUT = 15.0


def engine_pids(client) -> list[int]:
    return [info.pid for info in client.engine_info.values()]


def socket_paths(client) -> list[str]:
    return [ch.socket_path for ch in client._cluster.engines.values()]


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    for line in status.splitlines():
        if line.startswith("State:"):
            return "Z" not in line.split()[1]
    return True


def wait_gone(pids, timeout: float = GONE_TIMEOUT) -> None:
    """Wait until every pid has exited; fail the test if one outlives ``timeout``."""
    deadline = time.monotonic() + timeout
    left = [p for p in pids if alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = [p for p in left if alive(p)]
    assert not left, f"processes still running after {timeout} s: {left}"


def wait_until(predicate, timeout: float = GONE_TIMEOUT, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def processes_naming(path) -> list[int]:
    """Live processes (not zombies) whose command line names ``path`` (or a path below it):
    the engines, nannies and launchers of a workdir, which all run its bundle."""
    mark = str(path).encode()
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and mark in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            pass  # gone meanwhile
    return [pid for pid in found if alive(pid)]


def vm_rss(pid: int) -> int:
    """Resident set size of a process in bytes, from /proc/PID/status (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def interactive(source: str, **names) -> dict:
    """Define functions as if typed at an IPython prompt (module ``__main__``), so that
    cloudpickle sends them by value, as it would a user's."""
    import textwrap

    ns = {"__name__": "__main__", **names}
    exec(textwrap.dedent(source), ns)
    return ns


@contextlib.contextmanager
def running_client(server, base: Path, *, engines: int = 2, **extra):
    """A Client on ``server``'s host, shut down at the end with its engines confirmed gone."""
    import sshpar

    hosts = server.hosts_yaml(base / "hosts.yaml", engines=engines, workdir=base / "w",
                              extra=extra or None)
    client = sshpar.Client(hosts=hosts)
    try:
        yield client
    finally:
        pids = engine_pids(client)
        client.shutdown()
        wait_gone(pids)
