"""sshpar, over SSH (the benchmark's own sshd, asyncssh backend) and with the local transport.

The system name (``p["system"]``) picks the transport: ``sshpar-ssh`` or ``sshpar-local``.
Engines run ``env.python`` (the bench venv's), idle_timeout 120 s (so nothing can outlive a
killed run for long), each start in a cluster of its own name.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import profiling
import tasks
import yaml
from harness import (
    CpuMeter,
    Env,
    bounded,
    burst,
    cpu_loop_count,
    measure_bulk,
    measure_latency,
    median,
    note,
    sshd_pids,
)

IDLE_TIMEOUT = 120


def _ssh(p: dict) -> bool:
    return p["system"] == "sshpar-ssh"


def _hosts_file(env: Env, p: dict, *, engines: int, workdirs: list[Path]) -> Any:
    """A hosts file (ssh) or a ClusterSpec (local) for ``len(workdirs)`` hosts."""
    from sshpar.config import local_cluster

    name = f"bench-{uuid.uuid4().hex[:10]}"
    if not _ssh(p):
        return local_cluster(engines, name=name, python=env.python, workdir=str(workdirs[0]),
                             idle_timeout=IDLE_TIMEOUT)
    hosts = []
    for k, wd in enumerate(workdirs):
        h = env.hosts[k]
        hosts.append({"host": h.ip, "port": h.port, "user": h.user, "identity_file": h.key,
                      "known_hosts": h.known_hosts, "workdir": str(wd)})
    doc = {"name": name,
           "defaults": {"engines": engines, "python": env.python, "idle_timeout": IDLE_TIMEOUT},
           "hosts": hosts}
    path = env.scratch("sshpar-hosts") / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(path)


def _shutdown(rc: Any) -> None:
    bounded(rc.shutdown, 30, "sshpar shutdown")


@contextlib.contextmanager
def cluster(env: Env, p: dict, engines: int = 2) -> Iterator[Any]:
    import sshpar

    wd = env.scratch(p["system"], "work")
    rc = sshpar.Client(hosts=_hosts_file(env, p, engines=engines, workdirs=[wd]), timeout=60)
    try:
        if len(rc.ids) != engines:
            raise RuntimeError(f"{len(rc.ids)} engines started, {engines} asked for")
        _wait_for_lanes(rc)
        yield rc
    finally:
        _shutdown(rc)


def _wait_for_lanes(rc: Any, bound: float = 10.0) -> None:
    """Warm-up: blocking calls until each engine serves a direct lane (over SSH the first
    one starts the OpenSSH forwarder, ready ~0.2 s later), so that steady-state figures are
    measured; bounded, and not fatal (the figures then say what users get without one)."""
    deadline = time.monotonic() + bound
    for eid in rc.ids:
        while time.monotonic() < deadline:
            rc[eid].apply_sync(tasks.noop)
            if rc.engine_status()[eid]["clients"] >= 2:
                break


def _io_loop(rc: Any) -> Any:
    """The client's asyncio loop (an internal; None if it moved), for profiling its thread."""
    return getattr(getattr(rc, "_io", None), "loop", None)


def _engine_pids(rc: Any) -> list[int]:
    return [info.pid for info in rc.engine_info.values()]


def _groups(env: Env, p: dict, rc: Any) -> dict:
    groups = {"engines": lambda: _engine_pids(rc)}
    if _ssh(p):
        groups["sshd"] = sshd_pids(env)
    return groups


# -- workloads --------------------------------------------------------------------------------
def _timed_start(env: Env, p: dict, workdirs: list[Path]) -> dict:
    import sshpar

    engines = p["engines"]
    spec = _hosts_file(env, p, engines=engines, workdirs=workdirs)
    marks: dict[str, float] = {}

    def progress(host: str, phase: str) -> None:  # the last host to reach each phase
        marks[phase.split(":")[0]] = time.perf_counter()

    t0 = time.perf_counter()
    rc = sshpar.Client(hosts=spec, timeout=60, on_progress=progress)
    try:
        t_client = time.perf_counter()
        rc[:].apply_sync(tasks.noop)
        t1 = time.perf_counter()
        n = len(rc.ids)
    finally:
        _shutdown(rc)
    if n != engines * len(workdirs):
        raise RuntimeError(f"{n} engines started, {engines * len(workdirs)} asked for")
    out = {"seconds": t1 - t0, "client_s": t_client - t0, "first_task_s": t1 - t_client}
    if "starting engines" in marks:  # connected (ssh) / ready to launch (local)
        out["connect_s"] = marks["starting engines"] - t0
    if "ready" in marks:
        out["launch_s"] = marks["ready"] - marks.get("starting engines", t0)
        out["channels_s"] = t_client - marks["ready"]
    return out


def start(env: Env, p: dict) -> dict:
    # Cold: a fresh workdir (the bundle is uploaded). Warm: the workdir of the first cold rep.
    rep = p["rep"] if p["phase"] == "cold" else 0
    return _timed_start(env, p, [env.scratch(p["system"], "start", f"wd-{rep}")])


def start4(env: Env, p: dict) -> dict:
    rep = p["rep"] if p["phase"] == "cold" else 0
    workdirs = [env.scratch(p["system"], "start4", f"wd-{rep}-host{k}")
                for k in range(len(env.hosts))]
    return _timed_start(env, p, workdirs)


def apply(env: Env, p: dict) -> dict:
    with cluster(env, p) as rc:
        e0 = rc[0]

        def call() -> None:
            e0.apply_sync(tasks.noop)

        out = measure_latency(call, p["calls"], p["warmup"])
        n = cpu_loop_count(out, p["calls"])
        meter = CpuMeter(_groups(env, p, rc))
        meter.start()
        for _ in range(n):
            call()
        out["cpu_us_per_call"] = meter.stop(n)
        def calls() -> None:
            for _ in range(p["profile_calls"]):
                call()

        out["profile"] = profiling.profile(
            calls, units=p["profile_calls"], io_loop=_io_loop(rc),
            engine_pids=_engine_pids(rc)[:1], quick=env.quick)
    return out


def tiny(env: Env, p: dict) -> dict:
    with cluster(env, p) as rc:
        views = [rc[0], rc[1]]

        def submit(i: int) -> Any:
            return views[i & 1].apply_async(tasks.inc, i)

        def wait_all(ars: list) -> list:
            return [ar.get() for ar in ars]

        burst(submit, wait_all, 500, budget=p["budget"])  # warm-up
        meter = CpuMeter(_groups(env, p, rc))
        meter.start()
        out = burst(submit, wait_all, p["tasks"], budget=p["budget"])
        out["cpu_us_per_task"] = meter.stop(out["tasks"])

        def again() -> None:
            burst(submit, wait_all, p["profile_tasks"], budget=p["budget"])

        out["profile"] = profiling.profile(
            again, units=p["profile_tasks"], io_loop=_io_loop(rc),
            engine_pids=_engine_pids(rc), quick=env.quick)
    return out


def bulk(env: Env, p: dict) -> dict:
    with cluster(env, p) as rc:
        e0 = rc[0]

        def warmup() -> None:  # numpy imported on the engine, buffers allocated once
            e0.push({"a": tasks.make_array(1 << 20)}, block=True)
            e0.pull("a", block=True)
            # As for apply: the OpenSSH forwarder logs in at the third blocking call, and
            # that login's CPU (ssh and sshd) would otherwise land on the measured push.
            _wait_for_lanes(rc)

        def push(arr: Any) -> None:
            e0.push({"a": arr}, block=True)

        def pull() -> Any:
            return e0.pull("a", block=True)

        out = measure_bulk(push, pull, p["nbytes"], warmup=warmup)
        if p.get("rep", 0) == 0:  # where a pull's time goes (once: a profile takes seconds)

            def pulls() -> None:
                for _ in range(3):
                    pull()

            out["profile"] = profiling.profile(
                pulls, units=3, io_loop=_io_loop(rc), engine_pids=_engine_pids(rc)[:1],
                quick=env.quick)
        e0.execute("del a", block=True)
    return out


def map(env: Env, p: dict) -> dict:  # noqa: A001 - the workload's name
    with cluster(env, p) as rc:
        view = rc[:]
        items = list(range(p["items"]))
        view.map_sync(tasks.double, items[:1000])  # warm-up
        times = []
        for _ in range(p["rounds"]):
            t0 = time.perf_counter()
            out = view.map_sync(tasks.double, items)
            times.append(time.perf_counter() - t0)
            if out[:3] != [0, 2, 4] or len(out) != len(items):
                raise AssertionError("wrong results")
        t = median(times)
        note(f"map rounds: {times}")
    return {"items": len(items), "seconds": t, "items_per_s": len(items) / t}
