"""Direct lanes over SSH (sshpar/_transport/openssh.py): blocking calls go through an
``ssh -L`` forwarder of the system's OpenSSH client, started on the first blocking call.
It checks host keys as strictly as the main connection, keeps its sockets private, loses no
call when it dies, and does not outlive its client."""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy
import pytest

from tests.helpers import alive, interactive, processes_naming, wait_gone, wait_until

from .conftest import TASK_SOURCE, WAIT, hold, in_thread

pytestmark = pytest.mark.ssh

_FNS = interactive("""
    def pid_and(value):
        import os
        return os.getpid(), value
""")
pid_and = _FNS["pid_and"]


def _argv(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


def _forwarders(workdir: Path) -> list[int]:
    """The OpenSSH forwarders reaching engines in ``workdir`` (their -L names the sockets)."""
    return [pid for pid in processes_naming(workdir) if _argv(pid)[:2] == ["ssh", "-T"]]


def _local_sockets(fw: int) -> Path:
    """The directory of a forwarder's local sockets (from its first -L)."""
    argv = _argv(fw)
    return Path(argv[argv.index("-L") + 1].split(":")[0]).parent


def _lane_in_use(rc, eid: int = 0) -> bool:
    """Make a blocking call; then whether the engine serves our lane besides the channel."""
    assert rc[eid].apply_sync(pid_and, eid) == (rc.engine_info[eid].pid, eid)
    return rc.engine_status()[eid]["clients"] == 2


def _wait_for_lane(rc, eid: int = 0) -> None:
    wait_until(lambda: _lane_in_use(rc, eid), WAIT, "blocking calls to take the OpenSSH lane")


def test_blocking_calls_go_through_openssh_with_strict_host_keys(sshd, clusters):
    started = clusters.start(sshd, engines=2)
    rc, workdir = started.rc, started.workdir
    _wait_for_lane(rc, 0)
    [fw] = _forwarders(workdir)                           # one per host, for every engine
    argv = _argv(fw)
    for option in ("BatchMode=yes", "StrictHostKeyChecking=yes",
                   f"UserKnownHostsFile={sshd.known_hosts_path}"):
        assert option in argv
    forwards = [argv[i + 1] for i, a in enumerate(argv) if a == "-L"]
    assert len(forwards) == 2
    local = Path(forwards[0].split(":")[0])
    assert local.parent == _local_sockets(fw)
    assert stat.S_IMODE(local.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(local.stat().st_mode) == 0o600
    secret = rc._cluster.key.hex()
    assert secret not in " ".join(argv)
    assert secret not in Path(f"/proc/{fw}/environ").read_bytes().decode(errors="replace")

    _wait_for_lane(rc, 1)
    pids = [rc.engine_info[i].pid for i in (0, 1)]
    assert rc[:].apply_sync(pid_and, 2) == [(pids[0], 2), (pids[1], 2)]
    a = numpy.random.default_rng(3).random(1 << 20)       # 8 MiB each way
    rc[0].push({"a": a}, block=True)
    assert numpy.array_equal(rc[0].pull("a", block=True), a)
    assert rc.engine_status()[0]["unacked"] == 0

    rc.close()
    wait_gone([fw])
    assert not local.parent.exists()


def test_a_host_key_mismatch_keeps_blocking_calls_on_the_main_connection(
        sshd, clusters, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="sshpar.transport")
    known = tmp_path / "known_hosts"
    known.write_text(sshd.known_hosts_path.read_text())
    hosts = sshd.hosts_yaml(tmp_path / "hosts.yaml", workdir=clusters.private_workdir(),
                            extra={"known_hosts": str(known)})
    rc = clusters.client(hosts)
    workdir = Path(rc.spec.hosts[0].workdir)
    clusters.workdirs.append(workdir)
    # Another key for the same host: as if someone now sat between us and it.
    _, blob, *_ = Path(f"{sshd.client_key_path}.pub").read_text().split()
    known.write_text(f"[{sshd.host}]:{sshd.port} ssh-ed25519 {blob}\n")

    def refused() -> bool:
        assert not _lane_in_use(rc)
        return any("Host key verification failed" in r.getMessage() for r in caplog.records)

    wait_until(refused, WAIT, "the forwarder to refuse the changed host key")
    assert not _forwarders(workdir)
    for i in range(5):                                    # the main connection serves on
        assert rc[0].apply_sync(pid_and, i) == (rc.engine_info[0].pid, i)


def test_a_killed_forwarder_loses_no_call(sshd, clusters, box):
    started = clusters.start(sshd, engines=1)
    rc = started.rc
    _wait_for_lane(rc)
    [fw] = _forwarders(started.workdir)
    job = box("job")
    caller, outcome = in_thread(rc[0].apply_sync, hold, str(job), 7)
    job.wait_started()
    os.kill(fw, signal.SIGKILL)
    job.release()
    caller.join(WAIT)
    assert not caller.is_alive() and outcome == [7]
    assert job.runs == 1
    assert rc[0].apply_sync(pid_and, 8) == (rc.engine_info[0].pid, 8)


_CLIENT = textwrap.dedent("""
    import json, sys
    import sshpar as p
    ns = {"__name__": "__main__"}
    exec(sys.stdin.read(), ns)
    rc = p.Client(hosts=sys.argv[1])
    for _ in range(20000):                       # bounded: until the lane is in use
        rc[0].apply_sync(ns["count_run"], sys.argv[2])
        if rc.engine_status()[0]["clients"] == 2:
            break
    print(json.dumps({"engine": rc.engine_info[0].pid}), flush=True)
    sys.stdin.close()
    import threading
    threading.Event().wait()  # until killed
""")


def test_a_killed_client_takes_its_forwarder_along(sshd, clusters, box):
    hosts, workdir = clusters.hosts(sshd, engines=1)
    proc = subprocess.Popen([sys.executable, "-c", _CLIENT, str(hosts), str(box("runs"))],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(TASK_SOURCE)
        proc.stdin.close()
        engine = json.loads(proc.stdout.readline())["engine"]
        [fw] = _forwarders(workdir)
        sockets = _local_sockets(fw)
    finally:
        proc.kill()
        proc.wait(WAIT)
    wait_gone([fw])                                       # its stdin closed with the client
    assert alive(engine)                                  # engines carry on, as ever
    assert sockets.exists()                               # nobody was left to remove it...
    rc = clusters.client(hosts)                           # ...until the next forwarder starts
    _wait_for_lane(rc)
    assert not sockets.exists()
