"""Only the cluster's owner can run code on its engines, over real SSH and real processes.

Host keys are checked on every hop; the cluster key never shows in a command line, an
environment, a log, or a file another user can read; another local user of the engine host
can neither reach an engine's socket nor talk to it if they could; a recorded session replayed
to an engine runs nothing. (Wrong and unknown host keys of a direct host, an unknown jump
host key and `known_hosts: none` are in tests/integration/test_connect.py; forged, replayed and
cross-connection frames on one engine in tests/engine/test_daemon.py.)
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import stat
import subprocess
import threading
from pathlib import Path

import pytest

import sshpar as p
from sshpar._bootstrap import build_bundle
from sshpar._wire import CLIENT_PROOF_SIZE, HELLO
from tests.helpers import engine_pids, socket_paths, wait_until

from .conftest import WAIT, Relay, cluster_key, count_run

pytestmark = pytest.mark.ssh


# -- host keys, on every hop -------------------------------------------------------------------

def _wrong_key_line(tmp_path: Path, server) -> str:
    other = tmp_path / f"impostor-{server.port}"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)],
                   check=True, capture_output=True, timeout=30)
    kind, blob = Path(f"{other}.pub").read_text().split()[:2]
    return f"[{server.host}]:{server.port} {kind} {blob}\n"


@pytest.mark.parametrize("impostor", ["jump", "target"])
def test_a_host_key_that_does_not_match_is_refused_on_every_proxy_jump_hop(
        sshd_factory, clusters, tmp_path, impostor):
    jump, target = sshd_factory(), sshd_factory()
    auth = target.workdir / "authorized_keys"
    auth.write_text(auth.read_text() + Path(f"{jump.client_key_path}.pub").read_text())
    lines = {"jump": jump.known_hosts_path.read_text(),
             "target": target.known_hosts_path.read_text()}
    lines[impostor] = _wrong_key_line(tmp_path, jump if impostor == "jump" else target)
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(lines["jump"] + lines["target"])
    hosts, workdir = clusters.hosts(target, engines=1,
                                    proxy_jump=f"{jump.user}@{jump.host}:{jump.port}")
    doc = hosts.read_text().replace(str(target.known_hosts_path), str(known_hosts))
    doc = doc.replace(str(target.client_key_path), str(jump.client_key_path))
    hosts.write_text(doc)

    with pytest.raises(p.HostKeyError) as info:
        clusters.client(hosts)
    refused = jump if impostor == "jump" else target
    assert f":{refused.port}" in str(info.value)
    assert "known_hosts" in str(info.value)
    assert not any(workdir.iterdir())                   # nothing ran on the target


# -- the cluster key never leaks ---------------------------------------------------------------

class ProcessWatch:
    """Samples /proc while running: the command line and environment of every process whose
    command line names ``mark`` (engines, nannies, launchers and the shells that start them)."""

    def __init__(self, mark: str) -> None:
        self.mark = mark.encode()
        self.seen: dict[int, tuple[bytes, bytes]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ProcessWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(WAIT)
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(0.002):  # a sampling interval, not a synchronisation
            self.sample()

    def sample(self) -> None:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
                if self.mark in cmdline:
                    self.seen[int(entry.name)] = (cmdline, (entry / "environ").read_bytes())
            except OSError:
                pass  # gone meanwhile

    def roles(self) -> set[str]:
        found = set()
        for cmdline, _ in self.seen.values():
            argv = cmdline.split(b"\0")
            for role in (b"launch", b"nanny", b"engine"):
                if role in argv:
                    found.add(role.decode())
        return found


def _parent(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    raise AssertionError(f"no PPid for {pid}")


def _forms(key: bytes) -> list[bytes]:
    """Every spelling of the key worth looking for."""
    return [key, key.hex().encode(), key.hex().upper().encode(), base64.b64encode(key),
            base64.urlsafe_b64encode(key)]


def _contains_key(data: bytes, key: bytes) -> bool:
    return any(form in data for form in _forms(key))


def test_cluster_key_is_in_no_command_line_environment_or_log(sshd, clusters, tmp_path):
    hosts, workdir = clusters.hosts(sshd, engines=2)
    with ProcessWatch(str(workdir)) as watch:
        rc = clusters.client(hosts)
        key = cluster_key(rc)
        rc[:].apply_sync(pow, 2, 2)
        with pytest.raises(p.CompositeError):
            rc[:].execute("1/0", block=True)           # an error, so the logs say more
        crashed = rc.engine_info[0].pid
        os.kill(crashed, signal.SIGKILL)
        wait_until(lambda: rc.ids == [1], WAIT, "the client to see the engine die")
        rc.restart_engine(0)                            # a second launch: the key again
        assert rc[0].apply_sync(pow, 2, 3) == 8
        engines = {crashed, *engine_pids(rc)}
        nannies = {_parent(pid) for pid in engine_pids(rc)}
    # Nannies and engines are forks of the launcher, so they carry its command line.
    assert watch.roles() == {"launch"}, watch.roles()
    assert engines | nannies <= set(watch.seen), (engines, nannies, set(watch.seen))
    for pid, (cmdline, environ) in watch.seen.items():
        shown = cmdline.replace(b"\0", b" ")[:200]
        assert not _contains_key(cmdline, key), f"key in the command line of {pid}: {shown}"
        assert not _contains_key(environ, key), f"key in the environment of {pid}: {shown}"
    logs = sorted((workdir / "logs").glob("*.log"))
    assert logs
    for log in logs:
        assert not _contains_key(log.read_bytes(), key), f"key in {log}"
    assert not _contains_key(sshd.log_path.read_bytes(), key)


def test_every_file_holding_the_cluster_key_is_private(sshd, clusters):
    workdir = clusters.open_workdir()
    rc = clusters.start(sshd, engines=2, workdir=workdir).rc
    key = cluster_key(rc)
    rc[:].apply_sync(pow, 2, 2)
    run_dir = Path(socket_paths(rc)[0]).parent
    home = Path(os.environ["SSHPAR_HOME"])
    holders = []
    for top in (workdir, home, run_dir):
        for path in [top, *top.rglob("*")]:
            st = path.lstat()
            if stat.S_ISDIR(st.st_mode) or not stat.S_ISREG(st.st_mode):
                continue
            if _contains_key(path.read_bytes(), key):
                holders.append(path)
                assert stat.S_IMODE(st.st_mode) == 0o600, f"{path} is {oct(st.st_mode)}"
                parent = stat.S_IMODE(path.parent.stat().st_mode)
                assert parent == 0o700, f"{path.parent} is {oct(parent)}"
    # The client's cluster file holds it; the engine side keeps it in memory only.
    assert holders == [home / "clusters" / f"{rc.spec.name}.json"], holders


# -- another user of the engine host -----------------------------------------------------------

_CONNECT = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(20)
try:
    s.connect(sys.argv[1])
except OSError as exc:
    print(json.dumps({"connected": False, "error": type(exc).__name__, "errno": exc.errno}))
    sys.exit(0)
data = b""
try:
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
except OSError as exc:
    print(json.dumps({"connected": True, "received": len(data), "error": type(exc).__name__}))
    sys.exit(0)
print(json.dumps({"connected": True, "received": len(data), "error": None}))
"""


def _as(user, path: str) -> dict:
    proc = user.python(_CONNECT, path)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _as_refused(user, sock: Path, log: Path, opened: list) -> None:
    """With ``opened`` directories traversable and ``sock`` writable for a moment, ``user``
    connects; the listener checks who connects (SO_PEERCRED), hangs up before saying
    anything, and logs the refusal in ``log``."""
    opened = [*opened, (sock, 0o666)]
    saved = [(path, stat.S_IMODE(path.stat().st_mode)) for path, _ in opened]
    try:
        for path, mode in opened:
            path.chmod(mode)
        result = _as(user, str(sock))
    finally:
        for path, mode in saved:
            path.chmod(mode)
    assert result["connected"] is True
    assert result["received"] == 0, f"{sock} answered a stranger"
    line = f"refused a connection from uid {user.uid}"
    wait_until(lambda: line in log.read_text(), WAIT, f"{log.name} to log the refusal")


def test_another_local_user_cannot_reach_or_use_an_engine(sshd, clusters, other_user):
    workdir = clusters.open_workdir()                   # others may traverse it (0711)
    rc = clusters.start(sshd, engines=1, workdir=workdir).rc
    sock = Path(socket_paths(rc)[0])
    run_dir = sock.parent
    assert run_dir.parent.parent == workdir, "the runtime dir fell back outside the workdir"
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    log = workdir / "logs" / f"engine-{rc.engine_info[0].uuid}.log"

    # (a) the 0700 runtime directory stops them before the socket
    assert _as(other_user, str(sock)) == {"connected": False, "error": "PermissionError",
                                          "errno": 13}

    # (a') were the directory traversable and the socket writable, the engine itself checks
    # who connects (SO_PEERCRED) and hangs up before saying anything
    _as_refused(other_user, sock, log, [(run_dir.parent, 0o711), (run_dir, 0o711)])
    assert rc[0].apply_sync(pow, 2, 9) == 512           # the owner is still served


def test_another_local_user_cannot_reach_or_use_a_kept_launcher(sshd, clusters, other_user):
    workdir = clusters.open_workdir()
    started = clusters.start(sshd, engines=1, workdir=workdir, keep_launcher=60)
    sock = Path(started.rc._cluster.hosts[0].report.launcher)
    assert sock.parent == workdir / "run"
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    log = next((workdir / "logs").glob("launcher-*.log"))
    assert stat.S_IMODE(log.stat().st_mode) == 0o600

    assert _as(other_user, str(sock)) == {"connected": False, "error": "PermissionError",
                                          "errno": 13}
    _as_refused(other_user, sock, log, [(sock.parent, 0o711)])
    started.rc.shutdown()
    again = clusters.client(started.hosts)                 # the owner is still served
    assert again._cluster.hosts[0].report.by_kept_launcher
    assert again[0].apply_sync(pow, 2, 9) == 512


_PLANT = """
import os, sys, zipfile
workdir, name, marker = sys.argv[1:]
os.makedirs(os.path.join(workdir, "bundles"), mode=0o755)
with zipfile.ZipFile(os.path.join(workdir, "bundles", name), "w") as z:
    z.writestr("__main__.py", f"open({marker!r}, 'w').write(str(__import__('os').getuid()))")
"""


def test_a_bundle_planted_by_another_user_in_a_shared_workdir_is_not_run(
        sshd, clusters, other_user):
    workdir = clusters.open_workdir()
    workdir.chmod(0o1777)                               # shared, sticky: like /tmp
    marker = workdir / "planted-code-ran"
    name = build_bundle().name
    planted = other_user.python(_PLANT, str(workdir), name, str(marker))
    assert planted.returncode == 0, planted.stderr
    assert (workdir / "bundles").stat().st_uid == other_user.uid

    hosts, _ = clusters.hosts(sshd, engines=1, workdir=workdir)
    try:
        rc = clusters.client(hosts)
    except p.SshparError:
        pass                                            # refusing to start is fine
    else:
        assert rc[0].apply_sync(pow, 2, 2) == 4
    assert not marker.exists(), (
        f"the owner ran a bundle planted by uid {other_user.uid} (it ran as uid "
        f"{marker.read_text()})")


# -- a recorded session, replayed --------------------------------------------------------------

class Recorder(Relay):
    """A man in the middle on a Unix socket path: forwards each connection to ``target`` and
    records what the client sent."""

    def __init__(self, path: str, target: str) -> None:
        self.path, self.target = path, target
        self.sent: list[bytearray] = []
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(path)
        os.chmod(path, 0o600)
        server.listen(8)
        super().__init__(server, self._upstream)

    def _upstream(self) -> socket.socket:
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        upstream.connect(self.target)
        return upstream

    def opened(self) -> bytearray:
        record = bytearray()
        self.sent.append(record)
        return record

    def from_client(self, data: bytes, record: bytearray) -> None:
        record += data

    def close(self) -> None:
        super().close()
        os.unlink(self.path)


def _replay(path: str, data: bytes) -> bytes:
    """Connect as a client would, send ``data`` after the engine's greeting, and return what
    the engine sent after it (until it hangs up)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(WAIT)
        s.connect(path)
        hello = b""
        while len(hello) < HELLO.size:
            chunk = s.recv(HELLO.size - len(hello))
            assert chunk, "the engine hung up before its greeting"
            hello += chunk
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # it hung up while we were still sending: refused
        answer = b""
        try:
            while chunk := s.recv(1 << 16):
                answer += chunk
        except ConnectionResetError:
            pass
        return answer


def test_a_recorded_session_replayed_to_the_engine_is_refused_and_runs_nothing(
        sshd, clusters, box):
    first = clusters.start(sshd, engines=1)
    sock = socket_paths(first.rc)[0]
    uuid = first.rc.engine_info[0].uuid
    first.rc.close()                                    # the engine keeps running
    real = sock + ".real"
    os.rename(sock, real)                               # the engine still listens on it
    recorder = Recorder(sock, real)
    try:
        rc = clusters.client(first.hosts)               # attaches through the recorder
        ran = box("ran")
        assert rc[0].apply_sync(count_run, str(ran), "once") == "once"
        rc.close()
        wait_until(lambda: recorder.sent and all(not t.is_alive() for t in recorder.threads),
                   WAIT, "the recorded session to end")
    finally:
        recorder.close()
        os.rename(real, sock)
    (session,) = recorder.sent
    assert len(session) > CLIENT_PROOF_SIZE          # the handshake answer, then frames
    assert ran.runs == 1

    log = first.workdir / "logs" / f"engine-{uuid}.log"
    before = log.read_text().count("handshake refused")
    # The whole session as sent, and its frames alone (as if the handshake could be skipped).
    assert _replay(sock, bytes(session)) == b""
    assert _replay(sock, bytes(session[CLIENT_PROOF_SIZE:])) == b""
    wait_until(lambda: log.read_text().count("handshake refused") == before + 2, WAIT,
               "the engine to log both refusals")
    assert "client did not prove the cluster key" in log.read_text()

    rc = clusters.client(first.hosts)
    assert rc[0].apply_sync(pow, 2, 4) == 16            # still serving its owner
    assert ran.runs == 1                                # the replayed task never ran
