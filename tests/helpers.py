"""Small test helpers: find engine processes and wait (bounded) for them to go."""

from __future__ import annotations

import contextlib
import os
import signal
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


def kept_launchers(root) -> dict[int, str]:
    """The kept launchers of workdirs under ``root``: pid -> the socket it listens on (a
    process running a bundle under ``root`` that holds a listening launcher-*.sock)."""
    listening = {}
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and int(fields[3], 16) & 0x10000 and \
                Path(fields[7]).name.startswith("launcher-"):
            listening[f"socket:[{fields[6]}]"] = fields[7]
    found = {}
    for pid in processes_naming(root):
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target in listening:
                        found[pid] = listening[target]
    return found


def engine_processes(root) -> list[int]:
    """The engines and nannies of workdirs under ``root``: processes running a bundle there
    that are not kept launchers (which idle on by design, see keep_launcher)."""
    kept = kept_launchers(root)
    return [pid for pid in processes_naming(root) if pid not in kept]


def stop_kept_launchers(root) -> None:
    """End the kept launchers of workdirs under ``root`` (they would idle on for a minute)."""
    pids = list(kept_launchers(root))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    wait_gone(pids)


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
