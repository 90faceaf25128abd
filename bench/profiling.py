"""Where the time goes: cProfile of the client's threads, py-spy samples of client and engines.

``profile(loop_fn, ...)`` runs ``loop_fn`` twice:

1. under cProfile, in the calling (main) thread and in sshpar's IO thread (a profiler can only
   watch the thread that enables it, so one is enabled from inside the asyncio loop). cProfile
   slows Python code several-fold: read its *proportions*, not its times.
2. repeatedly for a few seconds while py-spy samples this process (all threads) and the
   engines, without stopping them (``--nonblocking``). Idle samples (waiting in select, on a
   lock) are left out, so the shares are of CPU time. Skipped if py-spy is not installed.
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

TOP = 15


def profile(loop_fn: Callable[[], Any], *, units: int, io_loop: Any = None,
            engine_pids: list[int] | None = None, quick: bool = False) -> dict[str, Any]:
    """Profile ``loop_fn`` (which does ``units`` calls or tasks): see the module's doc."""
    out: dict[str, Any] = {"cprofile": _cprofile(loop_fn, io_loop, units)}
    pyspy = Path(sys.executable).parent / "py-spy"
    if pyspy.exists():
        try:
            out["pyspy"] = _pyspy(str(pyspy), loop_fn, engine_pids or [], 2 if quick else 4)
        except Exception as exc:  # noqa: BLE001 - a profile is optional
            out["pyspy_error"] = f"{type(exc).__name__}: {exc}"
    else:
        out["pyspy_error"] = "py-spy is not installed in the bench venv"
    return out


# -- cProfile ---------------------------------------------------------------------------------
def _cprofile(loop_fn: Callable[[], Any], io_loop: Any, units: int) -> dict[str, Any]:
    main = cProfile.Profile()
    io_prof = cProfile.Profile() if io_loop is not None else None

    def in_loop(action: Callable[[], Any]) -> None:
        done = threading.Event()

        def switch() -> None:
            action()
            done.set()

        io_loop.call_soon_threadsafe(switch)
        if not done.wait(10):
            raise RuntimeError("the IO loop did not run the profiler switch")

    if io_prof is not None:
        in_loop(io_prof.enable)
    t0 = time.perf_counter()
    main.enable()
    try:
        loop_fn()
    finally:
        main.disable()
        wall = time.perf_counter() - t0
        if io_prof is not None:
            in_loop(io_prof.disable)
    out: dict[str, Any] = {"wall_s_under_cprofile": f"{wall:.3f}", "units": units,
                           "main_thread": _stats_text(main, "cumulative"),
                           "main_thread_tottime": _stats_text(main, "tottime"),
                           "per_unit": {"main": _per_unit(main, units)}}
    if io_prof is not None:
        out["io_thread"] = _stats_text(io_prof, "cumulative")
        out["io_thread_tottime"] = _stats_text(io_prof, "tottime")
        out["per_unit"]["io"] = _per_unit(io_prof, units)
    return out


# System calls and waits worth counting per call/task: each one a chance to lose the GIL or
# the CPU. Their cProfile times include waiting for the GIL to come back. Socket sends and
# receives made by asyncio's self-pipe (how another thread wakes the loop) are told apart
# from the rest (the SSH connection, or an engine's socket) by their caller.
_COUNTED = {
    "socket send": "<method 'send' of '_socket.socket' objects>",
    "socket recv": "<method 'recv' of '_socket.socket' objects>",
    "epoll wait": "<method 'poll' of 'select.epoll' objects>",
    "lock wait": "<method 'acquire' of '_thread.lock' objects>",
    "lock release": "<method 'release' of '_thread.lock' objects>",
    "os.urandom": "<built-in method posix.urandom>",
}
_SELF_PIPE = {"_write_to_self": "loop wake-up send", "_read_from_self": "loop wake-up recv"}


def _per_unit(prof: cProfile.Profile, units: int) -> dict[str, list[float]]:
    """For each counted call: [calls per unit, µs per unit under cProfile]."""
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    acc: dict[str, list[float]] = {}

    def add(label: str, calls: float, tt: float) -> None:
        row = acc.setdefault(label, [0.0, 0.0])
        row[0] += calls
        row[1] += tt

    for label, name in _COUNTED.items():
        for (_, _, fn), (_, nc, t, _, callers) in stats.items():
            if fn != name:
                continue
            for (_, _, caller), (_, c_nc, c_tt, _) in callers.items():
                add(_SELF_PIPE.get(caller, label), c_nc, c_tt)
            if not callers:
                add(label, nc, t)
    return {label: [round(calls / units, 3), round(tt / units * 1e6, 1)]
            for label, (calls, tt) in acc.items() if calls}


def _stats_text(prof: cProfile.Profile, key: str) -> str:
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats(key).print_stats(TOP)
    text = buf.getvalue()
    # Keep the table: from the column header on; shorten paths.
    start = text.find("   ncalls")
    head = re.search(r"(\d+) function calls.*? in ([\d.]+) seconds", text)
    summary = f"{head.group(1)} calls, {head.group(2)} s\n" if head else ""
    return summary + shorten(text[start:] if start >= 0 else text).rstrip()


# -- py-spy -----------------------------------------------------------------------------------
def _pyspy(pyspy: str, loop_fn: Callable[[], Any], engine_pids: list[int],
           seconds: int) -> dict[str, Any]:
    targets = {"client": os.getpid(), **{f"engine{i}": pid for i, pid in enumerate(engine_pids)}}
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    procs = {}
    for name, pid in targets.items():
        path = tmp / f"pyspy-{os.getpid()}-{name}.txt"
        procs[name] = (path, subprocess.Popen(
            [pyspy, "record", "--pid", str(pid), "--rate", "1000", "--duration", str(seconds),
             "--nonblocking", "--format", "raw", "--output", str(path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    time.sleep(0.3)  # let py-spy attach
    deadline = time.monotonic() + seconds + 20
    rounds = 0
    while any(p.poll() is None for _, p in procs.values()) and time.monotonic() < deadline:
        loop_fn()
        rounds += 1
    out: dict[str, Any] = {"seconds": seconds, "rounds": rounds}
    for name, (path, proc) in procs.items():
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate()
        if not path.exists():
            out[name] = {"error": err.decode(errors="replace").strip()[-300:]}
            continue
        out[name] = summarize_raw(path.read_text())
        path.unlink()
    return out


def summarize_raw(text: str) -> dict[str, Any]:
    """Top functions by self and by inclusive share of the (non-idle) samples."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    files: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_frame(f) for f in stack.split(";")]
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
        for f in {_file(f) for f in frames}:
            files[f] += n
    if not total:
        return {"samples": 0}

    def table(c: Counter[str]) -> list[list[Any]]:
        return [[round(100 * n / total, 1), name] for name, n in c.most_common(TOP)]

    return {"samples": total, "self": table(own), "inclusive": table(incl),
            "files": table(files)}


def _file(frame: str) -> str:
    """'f (sshpar/_wire.py)' -> 'sshpar/_wire.py'."""
    return frame[frame.rfind("(") + 1:-1] if frame.endswith(")") else frame


_FRAME = re.compile(r"^(.*) \((.*?)(?::\d+)?\)$")


def _frame(text: str) -> str:
    m = _FRAME.match(text.strip())
    if not m:
        return text.strip()
    return f"{m.group(1)} ({shorten(m.group(2))})"


def shorten(text: str) -> str:
    """Paths relative to what a reader knows: site-packages, the stdlib, the repo, the
    engine bundle."""
    text = re.sub(r"/[^\s():]*/site-packages/", "", text)
    text = re.sub(r"/[^\s():]*\.pyz/", "", text)
    text = re.sub(r"/[^\s():]*/lib/python3\.\d+/", "", text)
    text = re.sub(r"/[^\s():]*?/(sshpar|bench)/", r"\1/", text)
    return text
