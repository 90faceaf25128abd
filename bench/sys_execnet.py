"""execnet over ssh: ``ssh=ALIAS//ssh_config=FILE//python=PY`` gateways.

execnet sends only basic types, so a call is a cloudpickled ``(f, args, kwargs)`` as bytes
over a channel to a small loop running on the gateway (the same work as raw-ssh's), and an
array moves as ``pickle.dumps(arr, 5)`` bytes into that loop's namespace. Note that execnet
runs ``ssh -C``: compression is on (the arrays here are random, so it only costs).
"""

from __future__ import annotations

import contextlib
import pickle
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import cloudpickle
import tasks
from harness import (
    CpuMeter,
    Env,
    bounded,
    measure_bulk,
    measure_latency,
    median,
    ssh_clients,
    sshd_pids,
)

# Runs on the gateway: calls, and a namespace to push to and pull from.
SERVER = """
import pickle
ns = {}
for msg in channel:
    op = msg[0]
    if op == "call":
        f, args, kwargs = pickle.loads(msg[1])
        channel.send(pickle.dumps(f(*args, **kwargs), 5))
    elif op == "push":
        ns[msg[1]] = pickle.loads(msg[2])
        channel.send(None)
    elif op == "pull":
        channel.send(pickle.dumps(ns.pop(msg[1]), 5))
    elif op == "pid":
        import os
        channel.send(os.getpid())
"""


def _spec(env: Env, host: int = 0) -> str:
    return f"ssh={env.hosts[host].alias}//ssh_config={env.ssh_config}//python={env.python}"


@contextlib.contextmanager
def gateways(env: Env, hosts: list[int]) -> Iterator[list[Any]]:
    """Gateways to these hosts (one each, repeats allowed), made concurrently."""
    import execnet

    group = execnet.Group()
    try:
        with ThreadPoolExecutor(len(hosts)) as ex:
            gws = list(ex.map(lambda h: group.makegateway(_spec(env, h)), hosts))
        yield gws
    finally:
        bounded(lambda: group.terminate(timeout=10), 20, "execnet terminate")


class Loop:
    """The SERVER loop on one gateway."""

    def __init__(self, gw: Any) -> None:
        self.ch = gw.remote_exec(SERVER)
        self.ch.send(("pid",))
        self.pid = self.ch.receive(30)

    def send(self, f: Any, *args: Any) -> None:
        self.ch.send(("call", cloudpickle.dumps((f, args, {}))))

    def recv(self) -> Any:
        return pickle.loads(self.ch.receive(60))

    def call(self, f: Any, *args: Any) -> Any:
        self.send(f, *args)
        return self.recv()


def _timed_start(env: Env, hosts: list[int]) -> dict:
    import execnet

    group = execnet.Group()
    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(len(hosts)) as ex:
            gws = list(ex.map(lambda h: group.makegateway(_spec(env, h)), hosts))
        chans = [gw.remote_exec("channel.send(None)") for gw in gws]
        for ch in chans:
            ch.receive(30)
        t1 = time.perf_counter()
    finally:
        bounded(lambda: group.terminate(timeout=10), 20, "execnet terminate")
    return {"seconds": t1 - t0}


def start(env: Env, p: dict) -> dict:
    return _timed_start(env, [0] * p["engines"])


def start4(env: Env, p: dict) -> dict:
    return _timed_start(env, [h for h in range(len(env.hosts)) for _ in range(p["engines"])])


def apply(env: Env, p: dict) -> dict:
    with gateways(env, [0]) as (gw,):
        loop = Loop(gw)
        out = measure_latency(lambda: loop.call(tasks.noop), p["calls"], p["warmup"])
        meter = CpuMeter({"ssh_client": ssh_clients, "sshd": sshd_pids(env),
                          "engines": lambda: [loop.pid]})
        meter.start()
        for _ in range(p["calls"]):
            loop.call(tasks.noop)
        out["cpu_us_per_call"] = meter.stop(p["calls"])
    return out


def tiny(env: Env, p: dict) -> dict:
    n = p["tasks"]
    with gateways(env, [0, 0]) as gws:
        loops = [Loop(gw) for gw in gws]
        for loop in loops:
            loop.call(tasks.inc, 0)
        meter = CpuMeter({"ssh_client": ssh_clients, "sshd": sshd_pids(env),
                          "engines": lambda: [loop.pid for loop in loops]})
        meter.start()
        t0 = time.perf_counter()
        for i in range(n):
            loops[i & 1].send(tasks.inc, i)
        got = [loops[i & 1].recv() for i in range(n)]
        elapsed = time.perf_counter() - t0
        cpu = meter.stop(n)
        assert got[:3] == [1, 2, 3]
    return {"tasks": n, "seconds": elapsed, "tasks_per_s": n / elapsed, "cpu_us_per_task": cpu}


def bulk(env: Env, p: dict) -> dict:
    with gateways(env, [0]) as (gw,):
        loop = Loop(gw)

        def push(arr: Any) -> None:
            loop.ch.send(("push", "a", pickle.dumps(arr, 5)))
            loop.ch.receive(60)

        def pull() -> Any:
            loop.ch.send(("pull", "a"))
            return pickle.loads(loop.ch.receive(60))

        def warmup() -> None:
            push(tasks.make_array(1 << 20))
            pull()

        out = measure_bulk(push, pull, p["nbytes"], warmup=warmup)
    return out


def map(env: Env, p: dict) -> dict:  # noqa: A001 - the workload's name
    items = list(range(p["items"]))
    half = (len(items) + 1) // 2
    with gateways(env, [0, 0]) as gws:
        loops = [Loop(gw) for gw in gws]
        for loop in loops:
            loop.call(tasks.map_chunk, tasks.double, [1])
        times = []
        for _ in range(p["rounds"]):
            t0 = time.perf_counter()
            for k, loop in enumerate(loops):
                loop.send(tasks.map_chunk, tasks.double, items[k * half:(k + 1) * half])
            out = loops[0].recv() + loops[1].recv()
            times.append(time.perf_counter() - t0)
            assert out[:3] == [0, 2, 4] and len(out) == len(items)
    t = median(times)
    return {"items": len(items), "seconds": t, "items_per_s": len(items) / t}
