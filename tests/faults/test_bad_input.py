"""Bad input and heavy load, over real SSH: a result the client cannot unpickle, a task that
prints without end, 50,000 queued tasks, a gigabyte of arrays. Each ends in a clear error or a
correct result, with memory on the client and the engine that does not grow with the work.

Frame-level bad input (garbage, forged, replayed, oversized frames) is covered by
tests/engine/test_daemon.py and tests/unit/test_wire.py.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest

import sshpar as p
from sshpar._engine.executor import OUTPUT_LIMIT
from tests.helpers import interactive, vm_rss, wait_until

from .conftest import WAIT

pytestmark = pytest.mark.ssh

MiB = 1 << 20
_MARKER = f"[sshpar: output truncated at {OUTPUT_LIMIT} bytes]"

_FNS = interactive("""
    def install_engine_only_module(directory):
        '''A module only the engine can import (as if installed only on the cluster).'''
        import os, sys
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "engine_only_mod.py"), "w") as f:
            f.write("class Thing:\\n    def __init__(self, n):\\n        self.n = n\\n")
        sys.path.insert(0, directory)
        import engine_only_mod
        return engine_only_mod.__file__

    def make_thing(n):
        import engine_only_mod
        return engine_only_mod.Thing(n)

    def print_forever(progress):
        '''Print until interrupted; every 8 MiB, note in ``progress`` how much so far.'''
        import os, sys
        line = "x" * 1023 + "\\n"
        written = 0
        while True:
            for _ in range(8192):
                sys.stdout.write(line)
            written += 8192 * len(line)
            with open(progress + ".tmp", "w") as f:
                f.write(str(written))
            os.replace(progress + ".tmp", progress)
""")


# -- results the client cannot unpickle --------------------------------------------------------

def test_result_of_an_engine_only_class_is_a_serialization_error_naming_the_type(
        sshd, clusters, tmp_path):
    rc = clusters.start(sshd, engines=1).rc
    e0 = rc[0]
    e0.block = True
    e0.apply(_FNS["install_engine_only_module"], str(tmp_path / "engine-site"))

    ar = e0.apply_async(_FNS["make_thing"], 3)
    with pytest.raises(p.SerializationError) as info:
        ar.get(WAIT)
    text = str(info.value)
    assert "engine_only_mod.Thing" in text
    assert "engine 0" in text and "importable on the client" in text
    assert ar.metadata["status"] == "ok"               # it ran; only the transfer back failed
    e0.execute("import engine_only_mod\nn = engine_only_mod.Thing(4).n")
    assert e0["n"] == 4                                # the class is fine on the engine
    assert e0.apply(pow, 2, 3) == 8                    # the engine and channel are fine


def test_class_defined_by_execute_travels_back_by_value(sshd, clusters):
    # The engine namespace is __main__, so cloudpickle sends classes defined there by value:
    # the client can rebuild them (this case is not a SerializationError).
    rc = clusters.start(sshd, engines=1).rc
    e0 = rc[0]
    e0.block = True
    e0.execute("class Point:\n    def __init__(self, x):\n        self.x = x\npt = Point(7)")
    pt = e0.pull("pt")
    assert type(pt).__name__ == "Point" and pt.x == 7


# -- output without end ------------------------------------------------------------------------

def _printed(progress: Path) -> int:
    try:
        return int(progress.read_text())
    except FileNotFoundError:
        return 0


def test_endless_output_is_truncated_and_marked_and_memory_stays_bounded(
        sshd, clusters, tmp_path):
    rc = clusters.start(sshd, engines=1).rc
    engine_pid = rc.engine_info[0].pid
    client_before, engine_before = vm_rss(os.getpid()), vm_rss(engine_pid)
    progress = tmp_path / "printed"
    ar = rc[0].apply_async(_FNS["print_forever"], str(progress))
    wait_until(lambda: _MARKER in ar.stdout, WAIT, "the live output to reach its limit")
    # It keeps printing; wait until it has printed 16 times what is kept.
    wait_until(lambda: _printed(progress) >= 16 * OUTPUT_LIMIT, WAIT,
               "the task to print far past the limit")
    client_during, engine_during = vm_rss(os.getpid()), vm_rss(engine_pid)

    rc[0].interrupt()
    with pytest.raises(p.RemoteError) as info:
        ar.get(WAIT)
    assert info.value.ename == "KeyboardInterrupt"
    out = ar.stdout
    assert out.endswith(_MARKER + "\n")
    assert len(out) <= OUTPUT_LIMIT + len(_MARKER) + 2
    assert len(out) > OUTPUT_LIMIT // 2
    assert ar.metadata["stdout"] == out
    # What is kept is bounded by the limit, however much is printed (a few copies of the
    # kept text may be alive at once: the parts, the joined result, the frame).
    assert engine_during - engine_before < 4 * OUTPUT_LIMIT + 32 * MiB
    assert client_during - client_before < 4 * OUTPUT_LIMIT + 32 * MiB
    assert rc[0].apply_sync(pow, 3, 3) == 27


# -- many tasks, much data ---------------------------------------------------------------------

def _batch(view, n: int) -> None:
    ars = [view.apply_async(pow, 2, i % 64) for i in range(n)]
    for i, ar in enumerate(ars):
        assert ar.get(WAIT) == 2 ** (i % 64)
    del ars
    gc.collect()


def test_fifty_thousand_queued_tiny_tasks_complete_with_flat_memory(sshd, clusters):
    rc = clusters.start(sshd, engines=1).rc
    view = rc[0]
    engine_pid = rc.engine_info[0].pid
    # The first batch sets the high-water mark of 50,000 queued tasks (about 2 KiB each on
    # the engine while queued, 4 KiB on the client while pending); the second must not add to
    # it: nothing of a finished task stays behind.
    _batch(view, 50_000)
    client0, engine0 = vm_rss(os.getpid()), vm_rss(engine_pid)
    _batch(view, 50_000)
    client1, engine1 = vm_rss(os.getpid()), vm_rss(engine_pid)
    assert engine1 - engine0 < 100 * MiB, f"engine RSS grew {(engine1 - engine0) / MiB:.0f} MiB"
    assert client1 - client0 < 100 * MiB, f"client RSS grew {(client1 - client0) / MiB:.0f} MiB"
    status = rc.engine_status()[0]
    assert status["queued"] == 0 and status["done"] >= 100_000
    wait_until(lambda: rc.engine_status()[0]["unacked"] == 0, WAIT,
               "the engine to forget every acknowledged result")


def test_a_gigabyte_of_arrays_moves_with_flat_memory(sshd, clusters):
    np = pytest.importorskip("numpy")
    rc = clusters.start(sshd, engines=1).rc
    e0 = rc[0]
    e0.block = True
    engine_pid = rc.engine_info[0].pid
    n = 64 * MiB // 8

    def round_trip(i: int) -> None:
        a = np.full(n, float(i))
        e0.push({"a": a})
        b = e0.pull("a")
        assert b.shape == (n,) and b[0] == b[-1] == float(i) and b.flags.writeable
        del a, b

    round_trip(0)                         # warm-up: the engine now holds one array (a)
    gc.collect()
    client0, engine0 = vm_rss(os.getpid()), vm_rss(engine_pid)
    client_growth, engine_growth = [], []
    for i in range(1, 9):                 # 8 x (64 MiB out + 64 MiB back) = 1 GiB
        round_trip(i)
        gc.collect()                      # the client's side; the engine gets no help
        client_growth.append(vm_rss(os.getpid()) - client0)
        engine_growth.append(vm_rss(engine_pid) - engine0)
    # After each round trip either side holds at most the current array: nothing of an
    # earlier transfer may stay resident (a leaked array would add 64 MiB).
    assert max(client_growth) < 32 * MiB, [g // MiB for g in client_growth]
    assert max(engine_growth) < 32 * MiB, [g // MiB for g in engine_growth]
