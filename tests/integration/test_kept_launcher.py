"""The kept launcher: a start leaves its launcher behind, and the next start with the same
settings has it fork the engines (no shell, no interpreter start). See docs/clusters.md."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import sshpar as p
from sshpar import _bootstrap
from sshpar.config import load_hosts
from tests.helpers import (
    engine_processes,
    interactive,
    kept_launchers,
    stop_kept_launchers,
    wait_gone,
)
from tests.sshd import SSHServer

pytestmark = pytest.mark.ssh


_env = interactive("""
    def env(name):
        import os
        return os.environ.get(name, "")
""")["env"]


class Starts:
    """Starts and shuts down clients on one host and workdir; stops the kept launchers."""

    def __init__(self, server: SSHServer, base: Path, transport: str) -> None:
        self.server, self.base, self.transport = server, base, transport
        self.workdir = base / "w"

    def client(self, **extra: Any) -> tuple[Any, Any]:
        """A started client and its host's launch report."""
        defaults = {"keep_launcher": 60, **extra}
        if self.transport == "local":
            defaults["transport"] = "local"
        hosts = self.server.hosts_yaml(self.base / "hosts.yaml", engines=2,
                                       workdir=self.workdir, extra=defaults)
        rc = p.Client(hosts=hosts, timeout=60)
        return rc, rc._cluster.hosts[0].report

    @staticmethod
    def shutdown(rc: Any) -> None:
        pids = [info.pid for info in rc.engine_info.values()]
        rc.shutdown()
        wait_gone(pids)


@pytest.fixture(params=["ssh", "local"])
def starts(request: pytest.FixtureRequest, sshd_session: SSHServer,
           tmp_path: Path) -> Iterator[Starts]:
    runner = Starts(sshd_session, tmp_path, request.param)
    yield runner
    stop_kept_launchers(tmp_path)


@pytest.fixture
def local_starts(sshd_session: SSHServer, tmp_path: Path) -> Iterator[Starts]:
    runner = Starts(sshd_session, tmp_path, "local")
    yield runner
    stop_kept_launchers(tmp_path)


def test_the_next_start_forks_its_engines_from_the_kept_launcher(starts: Starts) -> None:
    rc, first = starts.client(env={"SSHPAR_TEST_MARK": "kept"})
    assert not first.by_kept_launcher
    assert first.launcher is not None and first.launcher_pid is not None
    assert kept_launchers(starts.base) == {first.launcher_pid: first.launcher}
    run_dir = os.path.dirname(first.launcher)
    assert stat.S_IMODE(os.stat(run_dir).st_mode) == 0o700
    assert rc[:].apply_sync(_env, "SSHPAR_TEST_MARK") == ["kept", "kept"]
    starts.shutdown(rc)
    assert kept_launchers(starts.base) == {first.launcher_pid: first.launcher}  # still there

    rc, second = starts.client(env={"SSHPAR_TEST_MARK": "kept"})
    assert second.by_kept_launcher
    assert second.launcher == first.launcher
    assert rc.ids == [0, 1]
    assert {e.pid for e in second.engines}.isdisjoint(e.pid for e in first.engines)
    # engines forked by it run tasks, in the environment the hosts file asks for
    assert rc[:].apply_sync(_env, "SSHPAR_TEST_MARK") == ["kept", "kept"]
    assert rc[:].apply_sync(pow, 2, 10) == [1024, 1024]
    starts.shutdown(rc)


def test_other_settings_start_a_launcher_of_their_own(starts: Starts) -> None:
    rc, first = starts.client(env={"SSHPAR_TEST_MARK": "one"})
    starts.shutdown(rc)
    rc, second = starts.client(env={"SSHPAR_TEST_MARK": "two"})
    assert not second.by_kept_launcher
    assert second.launcher != first.launcher
    assert rc[:].apply_sync(_env, "SSHPAR_TEST_MARK") == ["two", "two"]
    starts.shutdown(rc)
    assert set(kept_launchers(starts.base)) == {first.launcher_pid, second.launcher_pid}


def test_a_dead_kept_launcher_costs_only_the_launch_command(starts: Starts) -> None:
    rc, first = starts.client()
    starts.shutdown(rc)
    os.kill(first.launcher_pid, signal.SIGKILL)  # its socket file stays behind
    wait_gone([first.launcher_pid])

    rc, second = starts.client()
    assert not second.by_kept_launcher
    assert second.launcher == first.launcher                 # the stale file replaced
    assert second.launcher_pid not in (None, first.launcher_pid)
    assert rc[:].apply_sync(pow, 3, 2) == [9, 9]
    starts.shutdown(rc)
    rc, third = starts.client()
    assert third.by_kept_launcher
    starts.shutdown(rc)


def test_a_kept_launcher_whose_bundle_is_removed_exits_and_the_start_goes_on(
        starts: Starts) -> None:
    rc, first = starts.client()
    starts.shutdown(rc)
    for bundle in (starts.workdir / "bundles").glob("*.pyz"):
        bundle.unlink()

    rc, second = starts.client()                             # uploads the bundle again
    assert not second.by_kept_launcher
    wait_gone([first.launcher_pid])
    assert rc[:].apply_sync(pow, 2, 3) == [8, 8]
    starts.shutdown(rc)


def test_a_kept_launcher_exits_after_keep_launcher_seconds_without_a_start(
        starts: Starts) -> None:
    rc, first = starts.client(keep_launcher=0.5)
    starts.shutdown(rc)
    wait_gone([first.launcher_pid])
    assert not os.path.exists(first.launcher)                # and removes its socket


def test_keep_launcher_0_leaves_nothing_behind(starts: Starts) -> None:
    rc, first = starts.client(keep_launcher=0)
    assert first.launcher is None and not first.by_kept_launcher
    starts.shutdown(rc)
    assert kept_launchers(starts.base) == {}


def test_a_connection_without_a_request_or_with_garbage_launches_nothing(
        local_starts: Starts) -> None:
    starts = local_starts
    rc, first = starts.client()
    starts.shutdown(rc)
    for request in (b"", b"not json\n"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(first.launcher)
            s.sendall(request)
            s.shutdown(socket.SHUT_WR)
            assert s.recv(4096) == b""                      # no report, no engines
    assert engine_processes(starts.base) == []
    rc, second = starts.client()                             # and it still serves
    assert second.by_kept_launcher
    starts.shutdown(rc)


def test_a_kept_launcher_that_fails_the_start_costs_only_the_launch_command(
        local_starts: Starts, tmp_path: Path) -> None:
    """Whatever a kept launcher says went wrong, a fresh launcher gets to try (here a
    stand-in at the remembered path answers as a launcher whose engines failed)."""
    starts = local_starts
    hosts = starts.server.hosts_yaml(starts.base / "hosts.yaml", engines=2,
                                     workdir=starts.workdir,
                                     extra={"transport": "local", "keep_launcher": 60})
    spec = load_hosts(str(hosts)).hosts[0]
    version = "{}.{}".format(*sys.version_info[:2])
    name = _bootstrap.launcher_id(spec, _bootstrap.build_bundle(), version)
    stand_in = str(tmp_path / "stand-in.sock")
    _bootstrap._KeptLaunchers(f"{spec.label} {name}").remember(stand_in)
    asked = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(stand_in)
        server.listen(1)
        server.settimeout(30)

        def answer() -> None:
            conn, _ = server.accept()
            with conn:
                asked.append(conn.recv(65536))
                conn.sendall(b'SSHPAR-ERROR {"kind": "engine", "message": "it broke"}\n')

        thread = threading.Thread(target=answer)
        thread.start()
        rc = p.Client(hosts=hosts, timeout=60)
        thread.join(30)
    report = rc._cluster.hosts[0].report
    assert asked and json.loads(asked[0])["engines"] == 2      # it was asked first
    assert not report.by_kept_launcher and report.launcher != stand_in
    assert rc[:].apply_sync(pow, 2, 5) == [32, 32]
    starts.shutdown(rc)
