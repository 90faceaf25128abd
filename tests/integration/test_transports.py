"""Transport conformance: every backend (asyncssh, paramiko, local) passes the same tests.

Then the paramiko backend end to end: a Client whose engines are reached through the relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, TypeVar

import numpy
import pytest
import yaml

import sshpar as p
from sshpar._transport import ForwardingRefused, Transport, make_transport
from sshpar.config import HostSpec
from tests.helpers import engine_pids, wait_gone
from tests.sshd import SSHServer

pytestmark = pytest.mark.ssh

BACKENDS = ["asyncssh", "paramiko", "local"]
SSH_BACKENDS = ["asyncssh", "paramiko"]
BOUND = 60.0  # seconds any one test's async part may take
T = TypeVar("T")


def _run(coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, BOUND)
    return asyncio.run(bounded())


def _spec(server: SSHServer, backend: str, **changes: Any) -> HostSpec:
    if backend == "local":
        return HostSpec(host="localhost", transport="local")
    fields: dict[str, Any] = {
        "host": server.host, "user": server.user, "port": server.port,
        "identity_file": (str(server.client_key_path),),
        "known_hosts": str(server.known_hosts_path), "backend": backend,
        "connect_timeout": 10.0, **changes}
    return HostSpec(**fields)


@pytest.fixture(params=BACKENDS)
def spec(request: pytest.FixtureRequest, sshd_session: SSHServer) -> HostSpec:
    return _spec(sshd_session, request.param)


@contextlib.asynccontextmanager
async def connected(spec: HostSpec) -> AsyncIterator[Transport]:
    transport = make_transport(spec)
    await transport.connect()
    try:
        yield transport
    finally:
        await transport.close()


# -- run() ---------------------------------------------------------------------------------------

def test_run_feeds_stdin_and_returns_output_and_status(spec: HostSpec) -> None:
    async def main() -> None:
        async with connected(spec) as t:
            r = await t.run("cat; echo oops >&2; exit 3", input=b"hello\n", timeout=20)
            assert (r.exit_status, r.stdout, r.stderr) == (3, b"hello\n", b"oops\n")
            big = os.urandom(3 << 20)
            r = await t.run("sha256sum", input=big, timeout=30)
            assert r.stdout.split()[0].decode() == hashlib.sha256(big).hexdigest()
            r = await t.run("true", timeout=20)
            assert (r.exit_status, r.stdout, r.stderr) == (0, b"", b"")
            r = await t.run("kill -9 $$", timeout=20)
            assert r.exit_status is None  # killed by a signal
    _run(main())


def test_run_that_outlasts_its_timeout_raises_and_the_transport_survives(spec: HostSpec) -> None:
    async def main() -> None:
        async with connected(spec) as t:
            with pytest.raises(p.ConnectTimeoutError) as info:
                await t.run("sleep 30", input=b"x" * (4 << 20), timeout=0.5)
            assert "0.5 s" in str(info.value)
            assert isinstance(info.value, TimeoutError)
            r = await t.run("echo still here", timeout=20)
            assert r.stdout == b"still here\n"
    _run(main())


# -- streams ----------------------------------------------------------------------------------

def test_open_exec_echoes_small_and_16_mib_messages(spec: HostSpec) -> None:
    async def main() -> None:
        async with connected(spec) as t:
            reader, writer = await t.open_exec("exec cat")
            for message in (b"x", b"hello", os.urandom(70_000)):
                writer.write(message)
                await writer.drain()
                assert await reader.readexactly(len(message)) == message
            writer.writelines([b"a", memoryview(b"bc"), bytearray(b"d")])
            await writer.drain()
            assert await reader.readexactly(4) == b"abcd"

            payload = numpy.random.default_rng(0).integers(0, 256, 16 << 20, "u1").tobytes()

            async def send() -> None:
                view = memoryview(payload)
                for start in range(0, len(view), 1 << 20):
                    writer.write(view[start:start + (1 << 20)])
                    await writer.drain()

            async def receive() -> bytes:
                got = bytearray()
                while len(got) < len(payload):
                    chunk = await reader.read(1 << 20)
                    assert chunk, f"EOF after {len(got)} bytes"
                    got += chunk
                return bytes(got)

            _, echoed = await asyncio.gather(send(), receive())
            assert echoed == payload
            assert not writer.is_closing()
            writer.close()
            assert writer.is_closing()
    _run(main())


def test_open_exec_reports_the_end_of_the_stream(spec: HostSpec) -> None:
    async def main() -> None:
        async with connected(spec) as t:
            reader, writer = await t.open_exec("echo done; echo noise >&2")
            assert await reader.read() == b"done\n"  # stderr is not mixed in
            with pytest.raises(asyncio.IncompleteReadError):
                await reader.readexactly(1)
            writer.close()
    _run(main())


def test_open_unix_reaches_a_socket_or_refuses(spec: HostSpec, tmp_path: Path) -> None:
    async def main() -> None:
        served = asyncio.Event()

        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()
            served.set()

        path = str(tmp_path / "echo.sock")
        server = await asyncio.start_unix_server(echo, path)
        async with server, connected(spec) as t:
            if spec.transport == "ssh" and spec.backend == "paramiko":
                assert not t.supports_unix_streams
                with pytest.raises(ForwardingRefused):
                    await t.open_unix(path)
                return
            assert t.supports_unix_streams
            reader, writer = await t.open_unix(path)
            writer.write(b"ping")
            await writer.drain()
            assert await reader.readexactly(4) == b"ping"
            writer.close()
            await asyncio.wait_for(served.wait(), 10)  # our close reached the server
    _run(main())


def test_a_socket_that_appears_while_its_absence_is_checked_is_reached_not_relayed(
        sshd_factory: Any, tmp_path: Path) -> None:
    # A restarting engine binds its socket just as the client looks: the channel open fails
    # (no socket yet), then the socket is there when the client checks why. That is not a
    # host refusing forwarding. The server's ForceCommand puts the socket in place exactly
    # when the check runs, so the window is hit every time.
    staged, path = tmp_path / "staged.sock", tmp_path / "engine.sock"
    script = tmp_path / "force.sh"
    script.write_text('case "$SSH_ORIGINAL_COMMAND" in\n'
                      f'  "test -S "*) mv {staged} {path} ;;\n'
                      'esac\n'
                      'exec /bin/sh -c "$SSH_ORIGINAL_COMMAND"\n')
    server = sshd_factory(extra_config=f"ForceCommand /bin/sh {script}\n")

    async def main() -> None:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(await reader.readexactly(4))
            await writer.drain()
            writer.close()

        listener = await asyncio.start_unix_server(echo, str(staged))
        async with listener, connected(_spec(server, "asyncssh")) as t:
            reader, writer = await t.open_unix(str(path))
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            writer.close()
    _run(main())
    assert path.exists() and not staged.exists()  # the check did run, and moved it


def test_close_is_idempotent_and_is_connected_follows(spec: HostSpec) -> None:
    async def main() -> None:
        t = make_transport(spec)
        await t.connect()
        assert t.is_connected
        reader, writer = await t.open_exec("exec cat")  # left open: close() must end it
        await t.close()
        assert not t.is_connected
        assert await asyncio.wait_for(reader.read(), 10) == b""
        assert writer.is_closing()
        await t.close()
        assert not t.is_connected
        if spec.transport == "ssh":
            with pytest.raises(p.HostUnreachableError):
                await t.run("true", timeout=5)
    _run(main())


# -- asyncssh: what it imports, and acknowledging reads until sshd turns Nagle off ----------------

def test_asyncssh_loads_without_the_parts_sshpar_skips_and_the_process_is_left_as_it_was() -> None:
    code = ("import ctypes.util, sys\n"
            "find = ctypes.util.find_library\n"
            "import sshpar._transport.asyncssh_backend\n"
            "assert ctypes.util.find_library is find\n"
            "assert 'cryptography.x509' not in sys.modules\n"
            "assert 'asyncssh.crypto.x509' not in sys.modules\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.stdout == "ok\n", out.stderr


@pytest.mark.parametrize("pty", [True, False])
def test_reads_are_acknowledged_at_once_until_sshd_grants_the_keepers_pty(
        pty: bool, sshd_session: SSHServer, sshd_factory: Any) -> None:
    server = sshd_session if pty else sshd_factory(extra_config="PermitTTY no\n")

    async def main() -> None:
        t = make_transport(_spec(server, "asyncssh"))
        await t.connect()
        try:
            conn = t._conn  # type: ignore[attr-defined]
            # Right after connecting: every read is acknowledged at once (an attribute of
            # this connection wraps its class's data_received).
            assert "data_received" in vars(conn)
            keeper = await asyncio.wait_for(t._keeper, 10)  # type: ignore[attr-defined]
            result = await t.run("echo hi", timeout=10)
            assert result.stdout == b"hi\n"
            if pty:  # sshd set TCP_NODELAY: the connection's own method again
                assert keeper is not None
                assert "data_received" not in vars(conn)
            else:  # no pty, so no TCP_NODELAY on sshd's side: keep acknowledging at once
                assert keeper is None
                assert "data_received" in vars(conn)
        finally:
            await t.close()
    _run(main())


# -- connection errors (SSH backends) -----------------------------------------------------------

@pytest.mark.parametrize("backend", SSH_BACKENDS)
def test_wrong_host_key_is_a_host_key_error(backend: str, sshd_session: SSHServer,
                                            tmp_path: Path) -> None:
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    known = tmp_path / "known_hosts"
    known.write_text(f"[{sshd_session.host}]:{sshd_session.port} "
                     f"{' '.join(Path(f'{other}.pub').read_text().split()[:2])}\n")
    with pytest.raises(p.HostKeyError) as info:
        _run(make_transport(_spec(sshd_session, backend, known_hosts=str(known))).connect())
    assert sshd_session.host in str(info.value)
    assert "known_hosts" in str(info.value)

    known.write_text("")  # not recorded at all
    with pytest.raises(p.HostKeyError):
        _run(make_transport(_spec(sshd_session, backend, known_hosts=str(known))).connect())


@pytest.mark.parametrize("backend", SSH_BACKENDS)
def test_closed_port_is_unreachable_and_names_host_and_port(backend: str,
                                                           sshd_session: SSHServer) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        with pytest.raises(p.HostUnreachableError) as info:
            _run(make_transport(_spec(sshd_session, backend, port=port)).connect())
    assert f"127.0.0.1:{port}" in str(info.value)
    assert "port" in str(info.value.hint)


@pytest.mark.parametrize("backend", SSH_BACKENDS)
def test_a_server_that_never_speaks_is_a_connect_timeout(backend: str,
                                                          sshd_session: SSHServer) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()  # the kernel accepts the connection; nobody sends a banner
        spec = _spec(sshd_session, backend, port=s.getsockname()[1], connect_timeout=1.0)
        with pytest.raises(p.ConnectTimeoutError) as info:
            _run(make_transport(spec).connect())
    assert "connect_timeout" in str(info.value)


@pytest.mark.parametrize("backend", SSH_BACKENDS)
def test_wrong_identity_file_is_an_authentication_error(backend: str, sshd_session: SSHServer,
                                                        tmp_path: Path) -> None:
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)],
                   check=True)
    spec = _spec(sshd_session, backend, identity_file=(str(stranger),))
    with pytest.raises(p.AuthenticationError) as info:
        _run(make_transport(spec).connect())
    assert "identity_file" in str(info.value)


@pytest.mark.parametrize("backend", SSH_BACKENDS)
def test_known_hosts_none_accepts_the_key_warns_and_records_nothing(
        backend: str, sshd_session: SSHServer, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    spec = _spec(sshd_session, backend, known_hosts="none")

    async def main() -> bytes:
        async with connected(spec) as t:
            return (await t.run("echo ok", timeout=20)).stdout
    with caplog.at_level(logging.WARNING, logger="sshpar.transport"):
        assert _run(main()) == b"ok\n"
    assert any("host key checking is OFF" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / ".ssh").exists()


# -- ~/.ssh/config and ProxyJump (SSH backends) --------------------------------------------------

@pytest.mark.parametrize("backend", SSH_BACKENDS)
def test_a_bare_alias_resolves_through_ssh_config_and_the_hosts_file_wins(
        backend: str, sshd_session: SSHServer, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    dot_ssh = tmp_path / ".ssh"
    dot_ssh.mkdir(mode=0o700)
    (dot_ssh / "config").write_text(
        f"Host sshpar-alias\n  HostName {sshd_session.host}\n  Port {sshd_session.port}\n"
        f"  User {sshd_session.user}\n  IdentityFile {sshd_session.client_key_path}\n"
        "Host sshpar-wrong-port\n  HostName 127.0.0.1\n  Port 1\n"
        f"  IdentityFile {sshd_session.client_key_path}\n")
    shutil.copy(sshd_session.known_hosts_path, dot_ssh / "known_hosts")  # the default file
    monkeypatch.setenv("HOME", str(tmp_path))

    async def main(spec: HostSpec) -> bytes:
        async with connected(spec) as t:
            return (await t.run("echo $USER", timeout=20)).stdout
    assert _run(main(HostSpec(host="sshpar-alias", backend=backend))) == \
        f"{sshd_session.user}\n".encode()
    spec = HostSpec(host="sshpar-wrong-port", port=sshd_session.port, backend=backend)
    assert _run(main(spec)) == f"{sshd_session.user}\n".encode()


@pytest.mark.parametrize("backend", SSH_BACKENDS)
def test_proxy_jump_goes_through_the_jump_host(backend: str, sshd: SSHServer) -> None:
    jump = f"{sshd.user}@{sshd.host}:{sshd.port}"  # the same server, reached through itself
    spec = _spec(sshd, backend, proxy_jump=jump)

    async def main() -> None:
        async with connected(spec) as t:
            assert (await t.run("echo via", timeout=20)).stdout == b"via\n"
    logins = sshd.log().count("Accepted publickey")
    _run(main())
    assert sshd.log().count("Accepted publickey") == logins + 2  # the jump host, then the target

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
        with pytest.raises(p.HostUnreachableError) as info:
            _run(make_transport(_spec(sshd, backend, proxy_jump=f"127.0.0.1:{closed}"))
                 .connect())
    assert f"127.0.0.1:{closed}" in str(info.value)


# -- paramiko end to end -----------------------------------------------------------------------

def test_client_over_paramiko_end_to_end(sshd_session: SSHServer, tmp_path: Path) -> None:
    hosts = sshd_session.hosts_yaml(tmp_path / "hosts.yaml", engines=2, workdir=tmp_path / "w",
                                    extra={"backend": "paramiko"})
    assert yaml.safe_load(hosts.read_text())["defaults"]["backend"] == "paramiko"
    rc = p.Client(hosts=hosts)
    pids = engine_pids(rc)
    try:
        dv = rc[:]
        dv.block = True
        assert len(pids) == 2 and os.getpid() not in pids

        def square(x: float) -> float:  # sent by value, like interactive code
            return x * x
        assert dv.apply(square, 3) == [9, 9]
        assert sorted(dv.apply(os.getpid)) == sorted(pids)

        array = numpy.random.default_rng(1).random(1 << 19)  # 4 MiB of float64
        dv.push({"a": array})
        for pulled in dv.pull("a"):
            numpy.testing.assert_array_equal(pulled, array)
        assert dv.apply(lambda x: float(x.sum()), p.Reference("a")) == [float(array.sum())] * 2

        with pytest.raises(p.CompositeError) as info:
            dv.execute("1 / 0")
        assert [e.ename for e in info.value.elist] == ["ZeroDivisionError"] * 2
        assert rc[0].apply_sync(square, 4) == 16  # still fine after the error
    finally:
        rc.shutdown()
    wait_gone(pids)
