"""Faults of one engine, over real SSH: killed, hung, interrupted, too slow, crashing again and
again, and the user pressing Ctrl-C while waiting. Each fault reaches only the work it touches,
as a specific error, and loses no computed result."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

import sshpar as p
from tests.helpers import alive, interactive, processes_naming, wait_until

from .conftest import WAIT, ctrl_c_while_waiting, hold

pytestmark = pytest.mark.ssh

_FNS = interactive("""
    def sleep_long():
        import time
        time.sleep(120)
        return "slept"

    def pid_and(value):
        import os
        return os.getpid(), value
""")
sleep_long = _FNS["sleep_long"]
pid_and = _FNS["pid_and"]


def _kill(pid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    os.kill(pid, sig)


# -- an engine killed mid-task -----------------------------------------------------------------

def test_sigkilled_engine_fails_only_its_task_and_can_be_replaced(sshd, clusters, box):
    rc = clusters.start(sshd, engines=2).rc
    victim, other = rc.engine_info[0], rc.engine_info[1]
    job = box("job")
    ar = rc[0].apply_async(hold, str(job), "never")
    job.wait_started()
    survivor = rc[1].apply_async(pid_and, "fine")

    _kill(victim.pid)
    with pytest.raises(p.EngineError) as info:
        ar.get(WAIT)
    err = info.value
    assert err.engine_id == 0
    assert err.host == victim.host
    assert "SIGKILL" in str(err) and "SIGKILL" in err.reason
    assert "engine 0" in str(err)

    assert survivor.get(WAIT) == (other.pid, "fine")
    assert rc[1].apply_sync(pid_and, 2) == (other.pid, 2)   # the other engine keeps working
    wait_until(lambda: rc.ids == [1], WAIT, "rc.ids to drop the dead engine")
    assert rc.engine_status()[0]["state"] == "lost"
    with pytest.raises(p.NoEnginesError, match="engine 0 is lost"):
        rc[0].apply_sync(pid_and, 0)

    rc.restart_engine(0)
    assert rc.ids == [0, 1]
    new_pid, value = rc[0].apply_sync(pid_and, "again")
    assert value == "again"
    assert new_pid == rc.engine_info[0].pid and new_pid not in (victim.pid, other.pid)
    assert rc[:].apply_sync(pid_and, 1) == [(new_pid, 1), (other.pid, 1)]


# -- an engine that hangs ----------------------------------------------------------------------

def test_stopped_engine_is_unresponsive_and_blocks_nothing_else(sshd, clusters):
    rc = clusters.start(sshd, engines=2, heartbeat_interval=0.3).rc
    frozen, other = rc.engine_info[0], rc.engine_info[1]
    ar = rc[0].apply_async(pid_and, "late")
    assert ar.get(WAIT) == (frozen.pid, "late")

    _kill(frozen.pid, signal.SIGSTOP)
    try:
        ar = rc[0].apply_async(pid_and, "after")
        wait_until(lambda: rc.engine_status(timeout=1)[0]["state"] == "unresponsive", WAIT,
                   "the heartbeat to mark the stopped engine unresponsive")
        with pytest.raises(p.TimeoutError) as info:
            ar.get(0.2)
        assert isinstance(info.value, TimeoutError)
        status = rc.engine_status(timeout=5)
        assert status[1]["state"] == "idle"              # the other engine answers
        assert rc[1].apply_sync(pid_and, "meanwhile") == (other.pid, "meanwhile")
        assert 0 in rc.ids                                # unresponsive is not lost
    finally:
        _kill(frozen.pid, signal.SIGCONT)
    assert ar.get(WAIT) == (frozen.pid, "after")        # nothing was lost
    wait_until(lambda: rc.engine_status(timeout=5)[0]["state"] == "idle", WAIT,
               "the engine to answer heartbeats again")


# -- the user interrupts, aborts ---------------------------------------------------------------

def test_interrupt_raises_keyboardinterrupt_in_the_task_and_the_engine_survives(
        sshd, clusters, box):
    rc = clusters.start(sshd, engines=2).rc
    pid0 = rc.engine_info[0].pid
    job = box("job")
    ar = rc[0].apply_async(hold, str(job), "never")
    other = rc[1].apply_async(hold, str(box("other")), "kept")
    job.wait_started()
    box("other").wait_started()

    rc[0].interrupt()
    with pytest.raises(p.RemoteError) as info:
        ar.get(WAIT)
    assert info.value.ename == "KeyboardInterrupt"
    assert not isinstance(info.value, KeyboardInterrupt)   # never mistaken for a local Ctrl-C
    assert not job.done
    assert rc[0].apply_sync(pid_and, "alive") == (pid0, "alive")
    assert not other.ready()                              # engine 1 was not interrupted
    box("other").release()
    assert other.get(WAIT) == "kept"


def test_abort_drops_queued_tasks_which_raise_task_aborted(sshd, clusters, box):
    rc = clusters.start(sshd, engines=1).rc
    view = rc[0]
    first = box("first")
    running = view.apply_async(hold, str(first), "ran")
    first.wait_started()
    queued = [view.apply_async(hold, str(box(f"q{i}")), i) for i in range(3)]
    one_more = view.apply_async(hold, str(box("single")), "single")

    one_more.abort()
    with pytest.raises(p.TaskAborted):
        one_more.get(WAIT)
    view.abort()
    for ar in queued:
        with pytest.raises(p.TaskAborted):
            ar.get(WAIT)
        assert ar.metadata["status"] == "aborted"
    first.release()
    assert running.get(WAIT) == "ran"                   # the running task is not stopped
    assert all(box(f"q{i}").runs == 0 for i in range(3))
    assert box("single").runs == 0
    assert view.apply_sync(pid_and, "next") == (rc.engine_info[0].pid, "next")


# -- a task that runs too long -----------------------------------------------------------------

def test_time_limit_interrupts_the_task_and_raises_timeout_error(sshd, clusters):
    rc = clusters.start(sshd, engines=1).rc
    view = rc[0]
    view.set_flags(timeout=0.5)
    ar = view.apply_async(sleep_long)
    with pytest.raises(p.TimeoutError) as info:
        ar.get(WAIT)
    err = info.value
    assert isinstance(err, TimeoutError)
    assert "time limit of 0.5 s" in str(err)
    assert ar.ready() and not ar.successful()
    view.set_flags(timeout=None)
    assert view.apply_sync(pid_and, "survived") == (rc.engine_info[0].pid, "survived")


# -- an engine that crashes again and again ----------------------------------------------------

#: How long a nanny's restart may take to be noticed and reopened (a generous bound).
RESTART_WAIT = 20.0


def test_restart_on_failure_brings_the_engine_back_until_the_limit(sshd, clusters, box,
                                                                    tmp_path):
    # Engines that take a moment to start (a big site-packages, a network home...), made
    # here with a sitecustomize every Python on the host imports: it makes the window between
    # the nanny's exit record and the new engine's socket wide enough to hit every time.
    site = tmp_path / "slow-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import time\ntime.sleep(0.5)\n")
    started = clusters.start(sshd, engines=1, restart="on-failure", restart_limit=2,
                             env={"PYTHONPATH": str(site)})
    rc = started.rc
    view = rc[0]
    view.block = True
    pids = [rc.engine_info[0].pid]
    for attempt in range(3):
        view["mark"] = attempt
        job = box(f"crash{attempt}")
        ar = view.apply_async(hold, str(job), "never")
        job.wait_started()
        _kill(pids[-1])
        with pytest.raises(p.EngineError) as info:
            ar.get(WAIT)                                # the lost task still fails
        assert info.value.engine_id == 0 and "SIGKILL" in str(info.value)
        if attempt == 2:
            break
        wait_until(lambda: rc.ids == [0] and rc.engine_info[0].pid not in pids, RESTART_WAIT,
                   "the nanny to restart the engine and the client to reopen it")
        pids.append(rc.engine_info[0].pid)
        assert view.apply(pid_and, "back") == (pids[-1], "back")   # same id, new process
        with pytest.raises(p.RemoteError, match="mark"):
            view["mark"]                                           # an empty namespace
        relays = [pid for pid in processes_naming(started.workdir)
                  if b"relay" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
        assert not relays, "the host fell back to relaying although it allows forwarding"
    # restart_limit 2 spent: it stays lost
    wait_until(lambda: not any(alive(pid) for pid in pids), WAIT, "the last engine to exit")
    assert rc.ids == []
    assert rc.engine_status()[0]["state"] == "lost"


# -- Ctrl-C while waiting ----------------------------------------------------------------------

def test_ctrl_c_in_a_blocking_get_returns_and_keeps_the_task(sshd, clusters, box):
    rc = clusters.start(sshd, engines=1).rc
    job = box("job")
    ar = rc[0].apply_async(hold, str(job), 42)
    job.wait_started()
    msg_id = ar.msg_ids[0]

    with pytest.raises(KeyboardInterrupt) as info, ctrl_c_while_waiting(job):
        ar.get()                        # no timeout: only the Ctrl-C can end this wait
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert msg_id in notes and "rc.get_result" in notes
    assert not ar.ready()

    job.release()
    fetched = rc.get_result(msg_id)
    assert fetched.get(WAIT) == 42
    assert rc.get_result(msg_id, block=True, timeout=WAIT) == 42
    assert job.runs == 1


def test_ctrl_c_then_abort_drops_the_queued_task(sshd, clusters, box):
    rc = clusters.start(sshd, engines=1).rc
    first = box("first")
    running = rc[0].apply_async(hold, str(first), "first")
    first.wait_started()
    queued = rc[0].apply_async(hold, str(box("queued")), "queued")

    with pytest.raises(KeyboardInterrupt) as info, ctrl_c_while_waiting(first):
        queued.get()
    assert "ar.abort()" in "\n".join(getattr(info.value, "__notes__", []))
    queued.abort()
    with pytest.raises(p.TaskAborted):
        queued.get(WAIT)
    first.release()
    assert running.get(WAIT) == "first"
    assert box("queued").runs == 0
