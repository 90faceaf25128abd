"""Faults between the client and its hosts, over real SSH: a connection cut, sshd restarted,
the client killed, a host down at start. The client reconnects with backoff and collects
what was computed meanwhile; every task runs exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

import sshpar as p
from tests.helpers import alive, engine_processes, wait_until

from .conftest import TASK_SOURCE, WAIT, count_run, hold

pytestmark = pytest.mark.ssh


def _connections(server) -> set[int]:
    """The sshd processes serving connections (not the listener)."""
    return set(server.sshd_pids()[1:])


def test_cut_connection_mid_task_reconnects_and_collects_the_result_once(
        sshd, clusters, box):
    rc = clusters.start(sshd, engines=2, heartbeat_interval=0.5).rc
    first, second = box("first"), box("second")
    ar = rc[0].apply_async(hold, str(first), "first")
    other = rc[1].apply_async(hold, str(second), "second")
    first.wait_started()
    second.wait_started()

    cut = _connections(sshd)
    assert cut, "the client has no SSH connection to cut"
    for pid in cut:
        os.kill(pid, signal.SIGKILL)
    first.release()                      # computed while the connection is down (or back)
    wait_until(lambda: _connections(sshd) - cut, WAIT, "the client to reconnect")

    assert ar.get(WAIT) == "first"
    second.release()
    assert other.get(WAIT) == "second"
    assert (first.runs, second.runs) == (1, 1)             # exactly once
    assert rc.ids == [0, 1]
    assert rc[:].apply_sync(count_run, str(box("after")), 1) == [1, 1]


def test_sshd_restart_reconnects_resends_what_never_arrived_and_runs_each_task_once(
        sshd, clusters, box):
    rc = clusters.start(sshd, engines=1, heartbeat_interval=0.5).rc
    before = box("before")
    ar = rc[0].apply_async(hold, str(before), "computed while away")
    before.wait_started()

    sshd.stop()                                         # listener and connections
    wait_until(lambda: rc.engine_status(timeout=1)[0]["state"] == "reconnecting", WAIT,
               "the client to notice the lost connection")
    late = box("late")
    sent_while_down = rc[0].apply_async(count_run, str(late), "sent while down")
    before.release()
    wait_until(lambda: before.done, WAIT, "the task to finish while no client is connected")
    assert late.runs == 0                               # it waits for the host

    sshd.restart()
    assert ar.get(WAIT) == "computed while away"
    assert sent_while_down.get(WAIT) == "sent while down"
    assert (before.runs, late.runs) == (1, 1)
    assert rc.ids == [0]
    assert rc.engine_status()[0]["state"] == "idle"


_KILLED_CLIENT = textwrap.dedent("""
    import json, sys
    import sshpar as p
    hosts, box = sys.argv[1], sys.argv[2]
    ns = {"__name__": "__main__"}
    exec(sys.stdin.read(), ns)
    rc = p.Client(hosts=hosts)
    ar = rc[0].apply_async(ns["hold"], box, "computed for a dead client")
    print(json.dumps({"msg_id": ar.msg_ids[0], "pid": rc.engine_info[0].pid}), flush=True)
    sys.stdin.close()
    import threading
    threading.Event().wait()  # until killed
""")

def test_killed_client_leaves_engines_running_and_a_new_client_fetches_the_result(
        sshd, clusters, box):
    hosts, _ = clusters.hosts(sshd, engines=1)
    job = box("job")
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_CLIENT, str(hosts), str(job)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(TASK_SOURCE)
        proc.stdin.close()
        started = json.loads(proc.stdout.readline())
        job.wait_started()
    finally:
        proc.kill()
        proc.wait(WAIT)
    assert alive(started["pid"])                        # engines carry on

    job.release()
    wait_until(lambda: job.done, WAIT, "the task to finish with no client")
    rc = clusters.client(hosts)                         # reuses the running cluster
    assert rc.engine_info[0].pid == started["pid"]
    assert rc.get_result(started["msg_id"]).get(WAIT) == "computed for a dead client"
    assert job.runs == 1


def test_host_down_at_start_is_a_per_host_error_and_allow_partial_starts_the_rest(
        sshd_factory, clusters):
    up, down = sshd_factory(), sshd_factory(listen="127.0.0.2")  # a host entry of its own
    down.stop()
    hosts, workdir = clusters.hosts(up, down, engines=1)

    with pytest.raises(p.StartError) as info:
        clusters.client(hosts)
    err = info.value
    down_label = f"{down.user}@{down.host}:{down.port}"
    assert list(err.errors) == [down_label]
    assert isinstance(err.errors[down_label], p.HostUnreachableError)
    assert str(down.port) in str(err)
    wait_until(lambda: not engine_processes(workdir), WAIT,
               "the good host's engines to be stopped after the failed start")

    rc = clusters.client(hosts, allow_partial=True)
    assert rc.ids == [0]
    assert rc.engine_info[0].host == f"{up.user}@{up.host}:{up.port}"
    assert list(rc.start_errors) == [down_label]
    assert isinstance(rc.start_errors[down_label], p.HostUnreachableError)
    assert rc[0].apply_sync(pow, 2, 5) == 32


def test_cold_start_over_a_link_that_delivers_in_bursts(sshd, clusters, bursty_link,
                                                       tmp_path):
    link = bursty_link(sshd, window=0.25)
    hosts, _ = clusters.hosts(sshd, engines=1)
    doc = hosts.read_text()
    doc = doc.replace(f"port: {sshd.port}", f"port: {link.port}")
    doc = doc.replace(str(sshd.known_hosts_path), str(link.known_hosts(tmp_path / "kh")))
    hosts.write_text(doc)
    rc = clusters.client(hosts)                         # a cold host: the bundle is uploaded
    assert rc[0].apply_sync(pow, 2, 6) == 64
