"""ipyparallel, local cluster: ``Cluster(n=2).start_and_connect_sync()`` (controller and
engines as local processes, ZeroMQ over loopback TCP). ``use_cloudpickle()`` so functions go
by value, as for every other system."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import tasks
from harness import (
    CpuMeter,
    Env,
    bounded,
    burst,
    cpu_loop_count,
    measure_bulk,
    measure_latency,
    median,
)


def _stop(cluster: Any, rc: Any) -> None:
    if rc is not None:
        bounded(rc.close, 10, "ipyparallel client close")
    bounded(cluster.stop_cluster_sync, 40, "ipcluster stop")


@contextlib.contextmanager
def cluster(env: Env, n: int = 2) -> Iterator[Any]:
    import ipyparallel as ipp

    c = ipp.Cluster(n=n, log_level=logging.WARNING)
    rc = None
    try:
        rc = c.start_and_connect_sync()
        rc.wait_for_engines(n, timeout=60)
        rc[:].use_cloudpickle()
        yield rc
    finally:
        _stop(c, rc)


def _engine_pids(rc: Any) -> list[int]:
    return list(rc[:].apply_sync(tasks.getpid))


def start(env: Env, p: dict) -> dict:
    import ipyparallel as ipp

    n = p["engines"]
    t0 = time.perf_counter()
    c = ipp.Cluster(n=n, log_level=logging.WARNING)
    rc = None
    try:
        rc = c.start_and_connect_sync()
        rc.wait_for_engines(n, timeout=60)
        # A stdlib function (pickled by reference): use_cloudpickle() would be one more
        # round trip before the first task, and by-value functions need it.
        rc[:].apply_sync(os.getpid)
        t1 = time.perf_counter()
    finally:
        _stop(c, rc)
    return {"seconds": t1 - t0}


def apply(env: Env, p: dict) -> dict:
    with cluster(env) as rc:
        e0 = rc[0]
        out = measure_latency(lambda: e0.apply_sync(tasks.noop), p["calls"], p["warmup"])
        pids = _engine_pids(rc)
        n = cpu_loop_count(out, p["calls"])
        meter = CpuMeter({"engines": lambda: pids})
        meter.start()
        for _ in range(n):
            e0.apply_sync(tasks.noop)
        out["cpu_us_per_call"] = meter.stop(n)
    return out


def tiny(env: Env, p: dict) -> dict:
    with cluster(env) as rc:
        views = [rc[0], rc[1]]

        def submit(i: int) -> Any:
            return views[i & 1].apply_async(tasks.inc, i)

        def wait_all(ars: list) -> list:
            return [ar.get() for ar in ars]

        burst(submit, wait_all, 500, budget=p["budget"])
        pids = _engine_pids(rc)
        meter = CpuMeter({"engines": lambda: pids})
        meter.start()
        out = burst(submit, wait_all, p["tasks"], budget=p["budget"])
        out["cpu_us_per_task"] = meter.stop(out["tasks"])
    return out


def bulk(env: Env, p: dict) -> dict:
    with cluster(env) as rc:
        e0 = rc[0]

        def warmup() -> None:
            e0.push({"a": tasks.make_array(1 << 20)}, block=True)
            e0.pull("a", block=True)

        out = measure_bulk(lambda arr: e0.push({"a": arr}, block=True),
                           lambda: e0.pull("a", block=True), p["nbytes"], warmup=warmup)
    return out


def map(env: Env, p: dict) -> dict:  # noqa: A001 - the workload's name
    items = list(range(p["items"]))
    with cluster(env) as rc:
        view = rc[:]
        view.map_sync(tasks.double, items[:1000])
        times = []
        for _ in range(p["rounds"]):
            t0 = time.perf_counter()
            out = view.map_sync(tasks.double, items)
            times.append(time.perf_counter() - t0)
            assert out[:3] == [0, 2, 4] and len(out) == len(items)
    t = median(times)
    return {"items": len(items), "seconds": t, "items_per_s": len(items) / t}
