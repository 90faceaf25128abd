"""A network partition: one host's sshd runs in a network namespace of its own, reached over a
veth pair, and the link is cut mid-task (as root). The heartbeat notices; pending work on that
host fails with EngineError only after `lost_after`; other hosts never notice; a link that
returns within the grace period loses nothing."""

from __future__ import annotations

import pytest

import sshpar as p
from tests.helpers import wait_until

from .conftest import WAIT, hold

pytestmark = pytest.mark.ssh


def _two_hosts(netns_factory, sshd_factory, clusters, **settings):
    """Engine 0 on a host behind a link we can cut, engine 1 on plain loopback."""
    ns = netns_factory()
    far = sshd_factory(wrap=ns.wrap, listen=ns.inner_addr)
    near = sshd_factory()
    started = clusters.start(far, near, engines=1, heartbeat_interval=0.5, connect_timeout=2,
                             **settings)
    rc = started.rc
    assert [rc.engine_info[i].host for i in rc.ids] == [
        f"{far.user}@{ns.inner_addr}:{far.port}", f"{near.user}@127.0.0.1:{near.port}"]
    return ns, rc


def _state(rc, engine_id: int) -> str:
    return rc.engine_status(timeout=1)[engine_id]["state"]


def test_partition_fails_pending_work_after_the_grace_period_and_only_there(
        netns_factory, sshd_factory, clusters, box):
    ns, rc = _two_hosts(netns_factory, sshd_factory, clusters, lost_after=4)
    far_job, near_job = box("far"), box("near")
    far = rc[0].apply_async(hold, str(far_job), "far")
    near = rc[1].apply_async(hold, str(near_job), "near")
    far_job.wait_started()
    near_job.wait_started()

    ns.cut()
    try:
        wait_until(lambda: _state(rc, 0) in ("unresponsive", "reconnecting"), WAIT,
                   "the heartbeat to notice the partition")
        assert _state(rc, 1) == "busy"                   # the other host is unaffected
        with pytest.raises(p.EngineError) as info:
            far.get(WAIT)
        err = info.value
        assert err.engine_id == 0
        assert err.host == rc.engine_info[0].host
        assert "unreachable for 4 s" in str(err)
        assert rc.ids == [1]
        with pytest.raises(p.NoEnginesError):
            rc[0].apply_sync(pow, 2, 2)
        near_job.release()
        assert near.get(WAIT) == "near"                  # work elsewhere carries on
        assert rc[1].apply_sync(pow, 2, 10) == 1024
    finally:
        ns.heal()
    assert far_job.runs == near_job.runs == 1


def test_link_back_within_the_grace_period_loses_nothing(
        netns_factory, sshd_factory, clusters, box):
    ns, rc = _two_hosts(netns_factory, sshd_factory, clusters, lost_after=60)
    far_job, near_job = box("far"), box("near")
    far = rc[0].apply_async(hold, str(far_job), "far")
    near = rc[1].apply_async(hold, str(near_job), "near")
    far_job.wait_started()

    ns.cut()
    try:
        wait_until(lambda: _state(rc, 0) == "reconnecting", WAIT,
                   "the client to notice the partition and start reconnecting")
        far_job.release()
        wait_until(lambda: far_job.done, WAIT, "the task to finish behind the partition")
        near_job.release()
        assert near.get(WAIT) == "near"
        assert rc.ids == [0, 1]                          # not lost: still within the grace
    finally:
        ns.heal()
    assert far.get(WAIT) == "far"
    assert far_job.runs == 1
    wait_until(lambda: _state(rc, 0) == "idle", WAIT, "the far engine to be back")
    assert rc[:].apply_sync(pow, 3, 2) == [9, 9]
