"""What every system's workload functions share: the run's environment, timing, RSS, CPU.

A workload function is ``f(env: Env, p: dict) -> dict`` of figures; it runs in a fresh worker
process (``worker.py``) so that peers do not share a process and the client's peak RSS is its
own. Figures are plain numbers (seconds, ms, per second, MiB); lists are kept as samples.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MiB = 1 << 20
MB = 1_000_000


@dataclasses.dataclass
class SshHost:
    """One of the benchmark's own sshd servers, as a client reaches it."""

    alias: str  # the Host name in the ssh_config file
    ip: str  # a loopback address the server listens on
    port: int
    user: str
    key: str  # the client's private key
    known_hosts: str  # "[ip]:port key" for this server
    pid: int  # the sshd listener


@dataclasses.dataclass
class Env:
    """The run's environment, handed to every worker as JSON."""

    run_id: str
    repo: str  # the repository root
    bench: str  # bench/
    tmp: str  # this run's scratch directory (removed at the end)
    python: str  # bench/.venv/bin/python: the remote interpreter for every system
    ssh_config: str  # an ssh_config with Host entries for every server
    hosts: list[SshHost]
    quick: bool

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Env:
        doc = json.loads(Path(path).read_text())
        doc["hosts"] = [SshHost(**h) for h in doc["hosts"]]
        return cls(**doc)

    def ssh(self, host: int = 0) -> list[str]:
        """The argv prefix of a plain OpenSSH client to server ``host``."""
        return ["ssh", "-F", self.ssh_config, self.hosts[host].alias]

    def scratch(self, *parts: str) -> Path:
        path = Path(self.tmp, *parts)
        path.mkdir(parents=True, exist_ok=True)
        return path


# -- statistics ------------------------------------------------------------------------------
def percentile(sorted_samples: list[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank of an already sorted list."""
    if not sorted_samples:
        return float("nan")
    k = max(0, min(len(sorted_samples) - 1, math.ceil(q / 100 * len(sorted_samples)) - 1))
    return sorted_samples[k]


def latency_figures(seconds: list[float]) -> dict[str, Any]:
    s = sorted(seconds)
    ms = 1e3
    return {"calls": len(s), "p50_ms": percentile(s, 50) * ms, "p90_ms": percentile(s, 90) * ms,
            "p99_ms": percentile(s, 99) * ms, "max_ms": s[-1] * ms,
            "mean_ms": statistics.fmean(s) * ms}


def measure_latency(call: Callable[[], Any], n: int, warmup: int) -> dict[str, Any]:
    """Call ``call()`` ``warmup`` times, then ``n`` timed times; percentiles in ms."""
    for _ in range(warmup):
        call()
    samples = []
    clock = time.perf_counter
    for _ in range(n):
        t0 = clock()
        call()
        samples.append(clock() - t0)
    return latency_figures(samples)


def burst(submit: Callable[[int], Any], wait_all: Callable[[list[Any]], list[Any]], n: int, *,
          budget: float, chunk: int = 500) -> dict[str, Any]:
    """Submit tasks ``submit(i)`` for i < n, then ``wait_all`` their handles; tasks/s.

    Submitting stops early once ``budget`` seconds have passed (for systems whose cost per
    task grows with the tasks outstanding); the figures then say how many ran.
    """
    t0 = time.perf_counter()
    handles: list[Any] = []
    for start in range(0, n, chunk):
        handles.extend(submit(i) for i in range(start, min(n, start + chunk)))
        if time.perf_counter() - t0 > budget:
            break
    got = wait_all(handles)
    elapsed = time.perf_counter() - t0
    if got[:3] != [1, 2, 3] or len(got) != len(handles):
        raise AssertionError("wrong results")
    out: dict[str, Any] = {"tasks": len(handles), "seconds": elapsed,
                           "tasks_per_s": len(handles) / elapsed}
    if len(handles) < n:
        out["note"] = (f"stopped submitting after {budget:g} s: {len(handles):,} of {n:,} "
                       "tasks")
    return out


def cpu_loop_count(latency: dict[str, Any], calls: int, seconds: float = 8.0) -> int:
    """How many calls the CPU-per-call loop makes: ``calls``, or fewer if that would take
    more than ``seconds`` at the measured mean latency."""
    return max(100, min(calls, int(seconds / (latency["mean_ms"] / 1e3))))


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# -- memory and CPU --------------------------------------------------------------------------
def rss_mib() -> float:
    """This process's resident set size now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MiB


def peak_rss_mib() -> float:
    """This process's peak resident set size so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """user + system CPU of a live process (0 if it is gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (breadth first)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop(0)
        try:
            kids = [int(k) for k in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            kids = []
        out.extend(kids)
        todo.extend(kids)
    return out


class CpuMeter:
    """CPU seconds spent by groups of processes between ``start()`` and ``stop()``.

    ``groups`` maps a name to a function returning the pids to count (asked at both ends, so
    processes that come and go in between are missed: use it on steady loops). The client is
    this process (``resource``, all threads). 10 ms resolution: measure a second or more.
    """

    def __init__(self, groups: dict[str, Callable[[], list[int]]]) -> None:
        self.groups = groups
        self._t0: dict[str, float] = {}
        self._wall = 0.0

    def _now(self) -> dict[str, float]:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        out = {"client": ru.ru_utime + ru.ru_stime}
        for name, pids in self.groups.items():
            out[name] = sum(cpu_seconds(p) for p in pids())
        return out

    def start(self) -> None:
        self._t0 = self._now()
        self._wall = time.perf_counter()

    def stop(self, per: int) -> dict[str, float]:
        """CPU microseconds per unit of work (``per`` units), and the wall time per unit."""
        wall = time.perf_counter() - self._wall
        now = self._now()
        out = {name: (now[name] - self._t0[name]) / per * 1e6 for name in now}
        out["wall"] = wall / per * 1e6
        return {k: round(v, 1) for k, v in out.items()}


def ssh_clients() -> list[int]:
    """The OpenSSH client processes this process started (directly or not)."""
    out = []
    for p in descendants(os.getpid()):
        try:
            if Path(f"/proc/{p}/comm").read_text().strip() == "ssh":
                out.append(p)
        except OSError:
            pass
    return out


def sshd_pids(env: Env, host: int = 0) -> Callable[[], list[int]]:
    """The sshd processes serving connections to server ``host`` (not the commands run)."""
    def pids() -> list[int]:
        out = []
        for p in descendants(env.hosts[host].pid):
            try:
                if Path(f"/proc/{p}/comm").read_text().startswith("sshd"):
                    out.append(p)
            except OSError:
                pass
        return out
    return pids


# -- bulk ------------------------------------------------------------------------------------
def measure_bulk(push: Callable[[Any], Any], pull: Callable[[], Any], nbytes: int, *,
                 warmup: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Push an array of ``nbytes``, drop it here, pull it back; MB/s each way and client RSS.

    The client's peak RSS is read with ``getrusage`` in this fresh process; ``rss_delta_mib``
    is the peak over the RSS just before the array was made (the array itself is 1.0x).
    """
    import gc

    import tasks

    if warmup is not None:
        warmup()
    gc.collect()
    base = rss_mib()
    arr = tasks.make_array(nbytes)
    t0 = time.perf_counter()
    push(arr)
    t_push = time.perf_counter() - t0
    del arr
    gc.collect()
    t0 = time.perf_counter()
    back = pull()
    t_pull = time.perf_counter() - t0
    peak = peak_rss_mib()
    ok = tasks.same_array(back, nbytes)
    if not ok:
        raise AssertionError("the pulled array differs from the one pushed")
    return {"array_mib": nbytes / MiB, "push_s": t_push, "pull_s": t_pull,
            "push_MBps": nbytes / MB / t_push, "pull_MBps": nbytes / MB / t_pull,
            "rss_base_mib": base, "rss_peak_mib": peak, "rss_delta_mib": peak - base,
            "rss_ratio": (peak - base) / (nbytes / MiB)}


# -- bounded teardown ------------------------------------------------------------------------
def bounded(fn: Callable[[], Any], seconds: float, what: str) -> None:
    """Run ``fn`` in a thread for at most ``seconds``; a hang is reported, not waited for.

    Whatever it leaves running is killed by the orchestrator's sweep after the worker exits.
    """
    err: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - reported below
            err.append(exc)

    t = threading.Thread(target=target, daemon=True, name=f"teardown {what}")
    t.start()
    t.join(seconds)
    if t.is_alive():
        note(f"{what} did not finish within {seconds:g} s; left to the sweep")
    elif err:
        note(f"{what} failed: {type(err[0]).__name__}: {err[0]}")


def note(text: str) -> None:
    """A line for the worker's log (stderr), which the orchestrator keeps."""
    import sys

    print(f"bench: {text}", file=sys.stderr, flush=True)
