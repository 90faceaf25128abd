"""Fixtures for the fault and security suite: clusters that are always cleaned up, tasks that
hold until released, network namespaces and a throwaway second user.

Everything a test starts is found again at teardown by path (engines, nannies and launchers
all name their workdir's bundle on the command line), SIGCONTed and SIGKILLed if still
running, so a failing test leaves no process behind; namespaces, veth pairs and users are
removed even when the test fails.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

import sshpar as p
from sshpar.config import local_cluster
from tests.helpers import interactive, processes_naming, wait_gone, wait_until

#: Bound on every wait for a result or a state in this suite. Generous: only a hang gets near.
WAIT = 30.0


#: Source of the tasks below, also fed to client processes the tests start.
TASK_SOURCE = textwrap.dedent("""
    def hold(box, value=None):
        '''Note the run in box/runs, say so in box/started, wait for box/go, return value.'''
        import os, time
        with open(os.path.join(box, "runs"), "a") as f:
            f.write(f"{os.getpid()}\\n")
        open(os.path.join(box, "started"), "w").close()
        deadline = time.monotonic() + 120
        while not os.path.exists(os.path.join(box, "go")) and time.monotonic() < deadline:
            time.sleep(0.01)
        open(os.path.join(box, "done"), "w").close()
        return value

    def count_run(box, value=None):
        '''Note the run in box/runs and return value at once.'''
        import os
        with open(os.path.join(box, "runs"), "a") as f:
            f.write(f"{os.getpid()}\\n")
        return value
""")
_TASKS = interactive(TASK_SOURCE)
hold = _TASKS["hold"]
count_run = _TASKS["count_run"]


class Box:
    """A directory a held task reports into: ``started``, ``done``, ``runs``; ``release()``
    lets it return."""

    def __init__(self, path: Path) -> None:
        path.mkdir(parents=True)
        self.path = path

    def __str__(self) -> str:
        return str(self.path)

    def release(self) -> None:
        (self.path / "go").touch()

    @property
    def started(self) -> bool:
        return (self.path / "started").exists()

    @property
    def done(self) -> bool:
        return (self.path / "done").exists()

    @property
    def runs(self) -> int:
        """How many times a task ran with this box."""
        try:
            return len((self.path / "runs").read_text().splitlines())
        except FileNotFoundError:
            return 0

    def wait_started(self) -> None:
        wait_until(lambda: self.started, WAIT, f"the task of {self.path.name} to start")


@pytest.fixture
def box(tmp_path: Path) -> Callable[[str], Box]:
    made: dict[str, Box] = {}

    def make(name: str = "box") -> Box:
        """The box called ``name`` (made on first use)."""
        if name not in made:
            made[name] = Box(tmp_path / "boxes" / name)
        return made[name]

    yield make
    for b in made.values():  # never leave a task waiting for its release
        b.release()


def cluster_key(rc: p.Client) -> bytes:
    """The key the cluster file of ``rc`` holds (what must never leak)."""
    import json

    path = Path(os.environ["SSHPAR_HOME"]) / "clusters" / f"{rc.spec.name}.json"
    return bytes.fromhex(json.loads(path.read_text())["key"])


def write_hosts(path: Path, servers: list, *, workdir: Path, engines: int = 1,
                **settings: Any) -> Path:
    """A hosts file for one or more fixture sshds, each its own host entry with its own
    port, key and known_hosts; ``settings`` go under ``defaults:``."""
    first = servers[0]
    first.hosts_yaml(path, engines=engines, workdir=workdir, extra=settings)
    doc = yaml.safe_load(path.read_text())
    for key in ("port", "identity_file", "known_hosts"):
        doc["defaults"].pop(key)
    doc["hosts"] = [{"host": s.host, "port": s.port, "identity_file": str(s.client_key_path),
                     "known_hosts": str(s.known_hosts_path)} for s in servers]
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@dataclass
class Started:
    rc: p.Client
    hosts: Path
    workdir: Path


class Clusters:
    """Starts clients on fixture sshds; at teardown shuts them down and kills what is left."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.clients: list[p.Client] = []
        self.workdirs: list[Path] = []
        self._remove: list[Path] = []
        self._n = 0

    def hosts(self, *servers: Any, engines: int = 1, workdir: Path | None = None,
              **settings: Any) -> tuple[Path, Path]:
        self._n += 1
        workdir = workdir or self.private_workdir()
        self.workdirs.append(workdir)
        path = write_hosts(self.base / f"hosts{self._n}.yaml", list(servers), workdir=workdir,
                           engines=engines, **settings)
        return path, workdir

    def start(self, *servers: Any, engines: int = 1, workdir: Path | None = None,
              allow_partial: bool = False, **settings: Any) -> Started:
        path, workdir = self.hosts(*servers, engines=engines, workdir=workdir, **settings)
        return Started(self.client(path, allow_partial=allow_partial), path, workdir)

    def local(self, engines: int = 1) -> p.Client:
        """A Client of engines on this machine (local transport, no SSH)."""
        workdir = self.private_workdir()
        self.workdirs.append(workdir)
        self._n += 1
        spec = local_cluster(engines, name=f"faults-{os.getpid()}-{self._n}",
                               workdir=str(workdir))
        return self.client(spec)  # type: ignore[arg-type]

    def client(self, hosts: Path, **kwargs: Any) -> p.Client:
        """A Client of ``hosts``, shut down at teardown."""
        rc = p.Client(hosts=hosts, **kwargs)
        self.clients.append(rc)
        return rc

    def private_workdir(self) -> Path:
        """A short workdir (0700), so sockets fit in it rather than in the /tmp/sshpar-<uid>
        fallback every other test shares; removed at teardown once its engines are gone."""
        path = Path(tempfile.mkdtemp(prefix="sshpar-f-"))
        self._remove.append(path)
        return path

    def open_workdir(self) -> Path:
        """A short workdir others may traverse (0711), outside pytest's private (0700) tmp
        tree; removed at teardown once its engines are gone."""
        path = self.private_workdir()
        path.chmod(0o711)
        return path

    def cleanup(self) -> None:
        for rc in reversed(self.clients):
            with contextlib.suppress(Exception):
                rc.shutdown()
        left = [pid for w in self.workdirs for pid in processes_naming(w)]
        for pid in left:
            for sig in (signal.SIGCONT, signal.SIGKILL):  # a stopped engine too
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        wait_gone(left)
        for path in self._remove:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def clusters(tmp_path: Path) -> Iterator[Clusters]:
    c = Clusters(tmp_path)
    try:
        yield c
    finally:
        c.cleanup()


def in_thread(fn: Callable[..., Any], *args: Any) -> tuple[threading.Thread, list]:
    """Start ``fn(*args)`` in a thread; the list gets what it returned or raised."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - the outcome is what is tested
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


# -- Ctrl-C while the main thread waits --------------------------------------------------------

def _blocked_in(ident: int, place: tuple[str, str], leaf: str) -> bool:
    """Whether thread ``ident`` is blocked in a call named ``leaf`` made inside ``place``
    (file name, function name)."""
    frame = sys._current_frames().get(ident)
    calls = []
    while frame is not None:
        calls.append((os.path.basename(frame.f_code.co_filename), frame.f_code.co_name))
        frame = frame.f_back
    return bool(calls) and calls[0][1] == leaf and place in calls


#: Where a blocking wait sleeps: in AsyncResult.get (through the IO thread), or in a direct
#: lane's receive (the calling thread reading the engine itself; it sleeps in poll, a C call).
IN_GET = (("asyncresult.py", "get"), "wait")
IN_LANE = (("_lane.py", "receive"), "receive")


@contextlib.contextmanager
def ctrl_c_while_waiting(held: Box, where: tuple[tuple[str, str], str] = IN_GET
                         ) -> Iterator[None]:
    """Send SIGINT to the main thread (as a terminal's Ctrl-C does) once it is blocked
    waiting ``where``.

    The task the main thread waits for is held until ``held`` is released, so its wait can
    only end by the interrupt; a watchdog releases it after WAIT seconds so that a wait the
    interrupt fails to end ends anyway (and the test fails) instead of hanging.
    """
    main = threading.main_thread().ident
    assert main is not None and main == threading.get_ident()
    sent = threading.Event()
    stop = threading.Event()

    def interrupt() -> None:
        deadline = time.monotonic() + WAIT
        while not stop.is_set() and time.monotonic() < deadline:
            if _blocked_in(main, *where):
                signal.pthread_kill(main, signal.SIGINT)
                sent.set()
                return
            stop.wait(0.005)  # polling the main thread's stack, not a synchronisation

    presser = threading.Thread(target=interrupt, daemon=True)
    watchdog = threading.Timer(WAIT, held.release)
    presser.start()
    watchdog.start()
    try:
        yield
    finally:
        stop.set()
        watchdog.cancel()
        presser.join(WAIT)
        assert sent.is_set(), "Ctrl-C was never pressed: the main thread did not wait"
        assert not held.done, "the wait ended only when the watchdog released the task"


# -- a link that delivers in bursts ------------------------------------------------------------

class Relay:
    """A man in the middle: accepts on ``listener``, connects each client to a fresh
    upstream, and relays both ways in a thread per connection. Subclasses change what
    passes through by overriding the hooks; ``threads`` lets a test wait for sessions to end.
    """

    def __init__(self, listener: socket.socket, connect: Callable[[], socket.socket]) -> None:
        self._listener = listener
        self._connect = connect
        self._stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    # hooks --------------------------------------------------------------------------------
    def opened(self) -> Any:
        """Per-connection state, passed to the other hooks."""
        return None

    def from_client(self, data: bytes, state: Any) -> None:
        """Seen on its way to the upstream."""

    def to_client(self, client: socket.socket, data: bytes, state: Any) -> None:
        client.sendall(data)

    def tick(self, client: socket.socket, state: Any) -> float:
        """Called at least every 50 ms; returns how long the relay may wait next."""
        return 0.05

    def closing(self, client: socket.socket, state: Any) -> None:
        """The upstream or the client hung up."""

    # the relay ----------------------------------------------------------------------------
    def _accept(self) -> None:
        self._listener.settimeout(0.05)
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = self._connect()
            t = threading.Thread(target=self._pump, args=(client, upstream, self.opened()),
                                 daemon=True)
            t.start()
            self.threads.append(t)

    def _pump(self, client: socket.socket, upstream: socket.socket, state: Any) -> None:
        sel = selectors.DefaultSelector()
        sel.register(client, selectors.EVENT_READ)
        sel.register(upstream, selectors.EVENT_READ)
        try:
            wait = 0.05
            while not self._stop.is_set():
                for key, _ in sel.select(wait):
                    data = key.fileobj.recv(1 << 16)
                    if not data:
                        self.closing(client, state)
                        return
                    if key.fileobj is client:
                        self.from_client(data, state)
                        upstream.sendall(data)
                    else:
                        self.to_client(client, data, state)
                wait = self.tick(client, state)
        except OSError:
            return
        finally:
            sel.close()
            client.close()
            upstream.close()

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        self._accepter.join(WAIT)
        for t in self.threads:
            t.join(WAIT)


class BurstyLink(Relay):
    """A TCP proxy in front of an sshd that holds what the server sends and delivers it in
    bursts, ``window`` seconds after the first byte of each (as a congested or batching link
    does): replies that the server sent one after another reach the client together."""

    def __init__(self, server: Any, window: float) -> None:
        self.server, self.window = server, window
        listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = listener.getsockname()[1]
        super().__init__(listener, lambda: socket.create_connection((server.host, server.port)))

    def known_hosts(self, path: Path) -> Path:
        path.write_text(f"[127.0.0.1]:{self.port} {self.server.host_pubkey}\n")
        return path

    def opened(self) -> dict:
        return {"held": bytearray(), "due": None}

    def to_client(self, client: socket.socket, data: bytes, state: dict) -> None:
        state["held"] += data
        state["due"] = state["due"] or time.monotonic() + self.window

    def tick(self, client: socket.socket, state: dict) -> float:
        due = state["due"]
        if due is None:
            return 0.05
        if time.monotonic() >= due:
            client.sendall(state["held"])
            state["held"].clear()
            state["due"] = None
            return 0.05
        return max(0.0, min(0.05, due - time.monotonic()))

    def closing(self, client: socket.socket, state: dict) -> None:
        client.sendall(state["held"])


@pytest.fixture
def bursty_link() -> Iterator[Callable[..., BurstyLink]]:
    links: list[BurstyLink] = []

    def make(server: Any, window: float) -> BurstyLink:
        links.append(BurstyLink(server, window))
        return links[-1]

    yield make
    for link in links:
        link.close()


# -- network namespaces ------------------------------------------------------------------------

@dataclass
class Netns:
    """A network namespace joined to this one by a veth pair on a private /30."""

    name: str
    outer: str          # veth end here
    inner: str          # veth end inside the namespace
    outer_addr: str
    inner_addr: str

    @property
    def wrap(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.name)

    def cut(self) -> None:
        """Partition: the namespace's end of the link goes down. Packets to it are dropped at
        the veth (our route stays, marked linkdown), so nothing leaks to another route."""
        _ip("netns", "exec", self.name, "ip", "link", "set", self.inner, "down")

    def heal(self) -> None:
        _ip("netns", "exec", self.name, "ip", "link", "set", self.inner, "up")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def netns_factory() -> Iterator[Callable[[], Netns]]:
    """Make network namespaces (root only); every namespace and veth is removed at teardown."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    made: list[Netns] = []

    def make() -> Netns:
        index = len(made)
        tag = secrets.token_hex(3)
        ns = Netns(name=f"sshpar-t-{tag}", outer=f"spA{tag}", inner=f"spB{tag}",
                   outer_addr=f"10.231.{7 + index}.1", inner_addr=f"10.231.{7 + index}.2")
        made.append(ns)
        _ip("netns", "add", ns.name)
        _ip("link", "add", ns.outer, "type", "veth", "peer", "name", ns.inner)
        _ip("link", "set", ns.inner, "netns", ns.name)
        _ip("addr", "add", f"{ns.outer_addr}/30", "dev", ns.outer)
        _ip("link", "set", ns.outer, "up")
        inside = ("netns", "exec", ns.name, "ip")
        _ip(*inside, "addr", "add", f"{ns.inner_addr}/30", "dev", ns.inner)
        _ip(*inside, "link", "set", ns.inner, "up")
        _ip(*inside, "link", "set", "lo", "up")
        return ns

    try:
        yield make
    finally:
        for ns in made:
            for cmd in (["link", "del", ns.outer], ["netns", "del", ns.name]):
                subprocess.run(["ip", *cmd], check=False, capture_output=True, timeout=30)
        left = subprocess.run(["ip", "netns", "list"], check=False, capture_output=True,
                              text=True, timeout=30).stdout
        assert not any(ns.name in left for ns in made), left


# -- another local user ------------------------------------------------------------------------

@dataclass
class OtherUser:
    name: str
    uid: int
    gid: int

    def python(self, code: str, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``code`` with the system Python as this user (no groups, no capabilities)."""
        return subprocess.run(
            ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups",
             "--inh-caps=-all", "/usr/bin/python3", "-I", "-c", code, *args],
            capture_output=True, text=True, timeout=60, cwd="/", check=False)


def _kill_processes_of(uid: int) -> None:
    """SIGKILL, by pid, what the throwaway user still runs (only what this suite started)."""
    pids = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and entry.stat().st_uid == uid:
                pids.append(int(entry.name))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_gone(pids)


@pytest.fixture
def other_user() -> Iterator[OtherUser]:
    """A throwaway local user (removed at teardown, with anything it still runs)."""
    if os.geteuid() != 0:
        pytest.skip("creating a second local user needs root")
    name = f"sshpt{secrets.token_hex(3)}"
    subprocess.run(["useradd", "--no-create-home", "--home-dir", "/nonexistent",
                    "--shell", "/usr/sbin/nologin", "--user-group", name],
                   check=True, capture_output=True, timeout=30)
    pw = pwd.getpwnam(name)
    try:
        yield OtherUser(name, pw.pw_uid, pw.pw_gid)
    finally:
        _kill_processes_of(pw.pw_uid)
        subprocess.run(["userdel", name], check=False, capture_output=True, timeout=30)
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            raise AssertionError(f"user {name} was not removed")
