"""The direct lane (sshpar/_lane.py): blocking calls to idle engines reached as plain sockets
(the local transport) are written and read by the calling thread itself. Same answers as
through the IO thread, and the same guarantees when the call cannot finish on the lane:
interrupted, the engine killed, the client closed under it."""

from __future__ import annotations

import os

import numpy
import pytest

import sshpar as p
from tests.helpers import interactive

from .conftest import IN_LANE, WAIT, ctrl_c_while_waiting, hold, in_thread

_FNS = interactive("""
    def pid_and(value):
        import os
        return os.getpid(), value

    def shout(text):
        import sys
        print(text)
        print("to stderr", file=sys.stderr)
        return len(text)

    def fail(text):
        raise ValueError(text)

    def kill_me():
        import os, signal
        os.kill(os.getpid(), signal.SIGKILL)
""")


def _lane_in_use(rc: p.Client, eid: int) -> bool:
    """Whether the engine serves a second connection from us (the lane) besides the channel."""
    return rc.engine_status()[eid]["clients"] == 2


def test_blocking_calls_go_by_the_lane_and_answer_as_the_channel_does(clusters):
    rc = clusters.local(engines=2)
    pids = [rc.engine_info[i].pid for i in (0, 1)]
    assert rc[0].apply_sync(_FNS["pid_and"], "x") == (pids[0], "x")
    assert _lane_in_use(rc, 0) and not _lane_in_use(rc, 1)
    assert rc[:].apply_sync(_FNS["pid_and"], 1) == [(pids[0], 1), (pids[1], 1)]
    assert _lane_in_use(rc, 1)

    with pytest.raises(p.RemoteError) as info:
        rc[0].apply_sync(_FNS["fail"], "from the lane")
    assert info.value.ename == "ValueError" and "from the lane" in str(info.value)

    ar = rc[0].apply_async(_FNS["shout"], "hello")    # through the channel, for comparison
    assert ar.get(WAIT) == 5
    assert rc[0].apply_sync(_FNS["shout"], "hello") == 5
    lane_ar = rc.get_result(rc.history[-1])
    assert (lane_ar.stdout, lane_ar.stderr) == (ar.stdout, ar.stderr) == ("hello\n",
                                                                           "to stderr\n")

    rc[:].execute("x = 41 + 1", block=True)
    assert rc[:].pull("x", block=True) == [42, 42]


def test_a_large_array_goes_both_ways_and_its_result_is_released_at_once(clusters):
    rc = clusters.local(engines=1)
    e0 = rc[0]
    a = numpy.random.default_rng(7).random(1 << 20)      # 8 MiB
    e0.push({"a": a}, block=True)
    back = e0.pull("a", block=True)
    assert numpy.array_equal(back, a) and back.flags.writeable
    assert _lane_in_use(rc, 0)
    # the engine keeps a result until it is acknowledged: a large one at once, not later
    assert rc.engine_status()[0]["unacked"] == 0


def test_ctrl_c_during_a_lane_call_keeps_the_task_and_its_result(clusters, box):
    rc = clusters.local(engines=1)
    rc[0].apply_sync(_FNS["pid_and"], 0)                 # the lane is open
    job = box("job")
    with pytest.raises(KeyboardInterrupt) as info, ctrl_c_while_waiting(job, IN_LANE):
        rc[0].apply_sync(hold, str(job), 42)              # only Ctrl-C can end this wait
    msg_id = rc.history[-1]
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert msg_id in notes and "rc.get_result" in notes
    assert job.started and not job.done

    job.release()
    assert rc.get_result(msg_id, block=True, timeout=WAIT) == 42
    assert job.runs == 1
    assert rc[0].apply_sync(_FNS["pid_and"], 1) == (rc.engine_info[0].pid, 1)


def test_an_engine_killed_during_a_lane_call_fails_that_call_only(clusters):
    rc = clusters.local(engines=2)
    victim = rc.engine_info[0].pid
    rc[0].apply_sync(_FNS["pid_and"], 0)                 # the lane is open
    with pytest.raises(p.EngineError) as info:
        rc[0].apply_sync(_FNS["kill_me"])
    assert info.value.engine_id == 0 and "SIGKILL" in str(info.value)
    assert rc[1].apply_sync(_FNS["pid_and"], 1) == (rc.engine_info[1].pid, 1)
    with pytest.raises(ProcessLookupError):
        os.kill(victim, 0)


def test_closing_the_client_ends_a_lane_call_in_another_thread(clusters, box):
    rc = clusters.local(engines=1)
    rc[0].apply_sync(_FNS["pid_and"], 0)
    job = box("job")
    caller, outcome = in_thread(rc[0].apply_sync, hold, str(job), "late")
    job.wait_started()
    rc.close()
    caller.join(WAIT)
    assert not caller.is_alive(), "the lane call outlived its client"
    job.release()
    assert len(outcome) == 1 and isinstance(outcome[0], p.EngineError), outcome


def test_closing_the_client_fails_what_it_still_waits_for(clusters, box):
    """The same through the IO thread: a waiter gets an error, not an endless wait."""
    rc = clusters.local(engines=1)
    job = box("job")
    ar = rc[0].apply_async(hold, str(job), "late")
    job.wait_started()
    rc.close()
    with pytest.raises(p.EngineError, match="get_result"):
        ar.get(WAIT)
    job.release()


def test_an_interrupt_reaches_the_task_of_a_lane_call(clusters, box):
    rc = clusters.local(engines=1)
    rc[0].apply_sync(_FNS["pid_and"], 0)
    job = box("job")
    caller, outcome = in_thread(rc[0].apply_sync, hold, str(job), "late")
    job.wait_started()
    rc[0].interrupt()
    caller.join(WAIT)
    assert not caller.is_alive()
    assert isinstance(outcome[0], p.RemoteError) and outcome[0].ename == "KeyboardInterrupt"
