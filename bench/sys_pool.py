"""concurrent.futures.ProcessPoolExecutor: the no-network baseline (fork, pickle by reference).

No namespace to push to: the bulk workload uses one worker and a worker-global (tasks.store /
tasks.fetch). ``map`` uses ``chunksize = ceil(n / 2)``: one chunk per worker, as sshpar and
ipyparallel split a map (the default chunksize of 1 would measure something else).
"""

from __future__ import annotations

import concurrent.futures as cf
import math
import multiprocessing
import time
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

_BARRIER: Any = None


def _init(barrier: Any) -> None:
    global _BARRIER
    _BARRIER = barrier


def _arrive() -> int:
    """Returns only once every worker runs it: proof that each has run a task."""
    import os

    _BARRIER.wait(30)
    return os.getpid()


def _close(pool: cf.ProcessPoolExecutor) -> None:
    bounded(lambda: pool.shutdown(wait=True, cancel_futures=True), 20, "pool shutdown")


def _workers(pool: cf.ProcessPoolExecutor) -> list[int]:
    return list(pool._processes or {})  # the pool's own record of its workers' pids


def start(env: Env, p: dict) -> dict:
    n = p["engines"]
    ctx = multiprocessing.get_context()
    barrier = ctx.Barrier(n)
    t0 = time.perf_counter()
    pool = cf.ProcessPoolExecutor(n, mp_context=ctx, initializer=_init, initargs=(barrier,))
    try:
        pids = {f.result() for f in [pool.submit(_arrive) for _ in range(n)]}
        t1 = time.perf_counter()
    finally:
        _close(pool)
    assert len(pids) == n
    return {"seconds": t1 - t0}


def apply(env: Env, p: dict) -> dict:
    pool = cf.ProcessPoolExecutor(2)
    try:
        out = measure_latency(lambda: pool.submit(tasks.noop).result(), p["calls"], p["warmup"])
        n = cpu_loop_count(out, p["calls"])
        meter = CpuMeter({"engines": lambda: _workers(pool)})
        meter.start()
        for _ in range(n):
            pool.submit(tasks.noop).result()
        out["cpu_us_per_call"] = meter.stop(n)
    finally:
        _close(pool)
    return out


def tiny(env: Env, p: dict) -> dict:
    pool = cf.ProcessPoolExecutor(2)
    try:
        def submit(i: int) -> cf.Future:
            return pool.submit(tasks.inc, i)

        def wait_all(fs: list[cf.Future]) -> list:
            return [f.result() for f in fs]

        burst(submit, wait_all, 500, budget=p["budget"])
        meter = CpuMeter({"engines": lambda: _workers(pool)})
        meter.start()
        out = burst(submit, wait_all, p["tasks"], budget=p["budget"])
        out["cpu_us_per_task"] = meter.stop(out["tasks"])
    finally:
        _close(pool)
    return out


def bulk(env: Env, p: dict) -> dict:
    pool = cf.ProcessPoolExecutor(1)
    try:
        def warmup() -> None:
            pool.submit(tasks.store, "a", tasks.make_array(1 << 20)).result()
            pool.submit(tasks.fetch, "a").result()

        out = measure_bulk(lambda arr: pool.submit(tasks.store, "a", arr).result(),
                           lambda: pool.submit(tasks.fetch, "a").result(), p["nbytes"],
                           warmup=warmup)
    finally:
        _close(pool)
    return out


def map(env: Env, p: dict) -> dict:  # noqa: A001 - the workload's name
    items = list(range(p["items"]))
    chunk = math.ceil(len(items) / 2)
    pool = cf.ProcessPoolExecutor(2)
    try:
        list(pool.map(tasks.double, items[:1000], chunksize=500))
        times = []
        for _ in range(p["rounds"]):
            t0 = time.perf_counter()
            out = list(pool.map(tasks.double, items, chunksize=chunk))
            times.append(time.perf_counter() - t0)
            assert out[:3] == [0, 2, 4] and len(out) == len(items)
    finally:
        _close(pool)
    t = median(times)
    return {"items": len(items), "seconds": t, "items_per_s": len(items) / t}
