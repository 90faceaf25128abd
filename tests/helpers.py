"""Small test helpers: find engine processes and wait (bounded) for them to go."""

from __future__ import annotations

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
