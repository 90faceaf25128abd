"""dask.distributed: LocalCluster (``dask-local``) and SSHCluster (``dask-ssh``).

Two workers of one thread each (nanny processes), dashboard off, everything on loopback.
SSHCluster launches the scheduler and workers over asyncssh (its ``connect_options``) with the
bench venv's python; the scheduler and workers then talk plain TCP, not through SSH.
``map`` is ``dask.bag.from_sequence(items, npartitions=2).map(f)``: one chunk per worker, as
sshpar splits a map (``client.map`` would make one task per item).
"""

from __future__ import annotations

import contextlib
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


def _make(env: Env, p: dict, hosts: list[int], n: int) -> Any:
    from dask.distributed import LocalCluster, SSHCluster

    if p["system"] == "dask-local":
        return LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                            host="127.0.0.1", dashboard_address=None)
    addrs = [env.hosts[h].ip for h in [0, *hosts]]  # the first runs the scheduler
    connect = [{"port": env.hosts[h].port, "username": env.hosts[h].user,
                "client_keys": [env.hosts[h].key], "known_hosts": env.hosts[h].known_hosts}
               for h in [0, *hosts]]
    return SSHCluster(addrs, connect_options=connect,
                      worker_options={"n_workers": n, "nthreads": 1, "host": "127.0.0.1"},
                      scheduler_options={"host": "127.0.0.1", "port": 0,
                                         "dashboard": False},
                      # dask pickles importable functions by reference: its workers need
                      # the client's code on their path, as a user's would have it
                      remote_python=f"env PYTHONPATH={env.bench} {env.python}")


def _close(client: Any, cluster: Any) -> None:
    if client is not None:
        bounded(client.close, 20, "dask client close")
    if cluster is not None:
        bounded(cluster.close, 40, "dask cluster close")


@contextlib.contextmanager
def cluster(env: Env, p: dict, n: int = 2) -> Iterator[Any]:
    from dask.distributed import Client

    c = client = None
    try:
        c = _make(env, p, [0], n)
        client = Client(c)
        client.wait_for_workers(n, timeout=60)
        yield client
    finally:
        _close(client, c)


def _timed_start(env: Env, p: dict, hosts: list[int]) -> dict:
    from dask.distributed import Client

    n = p["engines"]
    c = client = None
    try:
        t0 = time.perf_counter()
        c = _make(env, p, hosts, n)
        client = Client(c)
        client.wait_for_workers(n * len(hosts), timeout=60)
        client.run(tasks.noop)  # on every worker
        t1 = time.perf_counter()
    finally:
        _close(client, c)
    return {"seconds": t1 - t0}


def start(env: Env, p: dict) -> dict:
    return _timed_start(env, p, [0])


def start4(env: Env, p: dict) -> dict:
    return _timed_start(env, p, list(range(len(env.hosts))))


def _worker_pids(client: Any) -> list[int]:
    return list(client.run(tasks.getpid).values())


def apply(env: Env, p: dict) -> dict:
    with cluster(env, p) as client:
        w0 = sorted(client.scheduler_info()["workers"])[0]

        def call() -> None:
            client.submit(tasks.noop, pure=False, workers=[w0]).result()

        out = measure_latency(call, p["calls"], p["warmup"])
        pids = _worker_pids(client)
        n = cpu_loop_count(out, p["calls"])
        meter = CpuMeter({"engines": lambda: pids})
        meter.start()
        for _ in range(n):
            call()
        out["cpu_us_per_call"] = meter.stop(n)
    return out


def tiny(env: Env, p: dict) -> dict:
    with cluster(env, p) as client:
        def submit(i: int) -> Any:
            return client.submit(tasks.inc, i, pure=False)

        burst(submit, client.gather, 500, budget=p["budget"])
        pids = _worker_pids(client)
        meter = CpuMeter({"engines": lambda: pids})
        meter.start()
        out = burst(submit, client.gather, p["tasks"], budget=p["budget"])
        out["cpu_us_per_task"] = meter.stop(out["tasks"])
    return out


def bulk(env: Env, p: dict) -> dict:
    with cluster(env, p) as client:
        w0 = sorted(client.scheduler_info()["workers"])[0]
        held: dict[str, Any] = {}

        def push(arr: Any) -> None:
            held["a"] = client.scatter(arr, workers=[w0], direct=True, hash=False)

        def pull() -> Any:
            return client.gather(held.pop("a"), direct=True)

        def warmup() -> None:
            push(tasks.make_array(1 << 20))
            pull()

        out = measure_bulk(push, pull, p["nbytes"], warmup=warmup)
    return out


def map(env: Env, p: dict) -> dict:  # noqa: A001 - the workload's name
    import dask.bag as db

    items = list(range(p["items"]))
    with cluster(env, p):
        db.from_sequence(items[:1000], npartitions=2).map(tasks.double).compute()
        times = []
        for _ in range(p["rounds"]):
            t0 = time.perf_counter()
            out = db.from_sequence(items, npartitions=2).map(tasks.double).compute()
            times.append(time.perf_counter() - t0)
            assert out[:3] == [0, 2, 4] and len(out) == len(items)
    t = median(times)
    return {"items": len(items), "seconds": t, "items_per_s": len(items) / t}
