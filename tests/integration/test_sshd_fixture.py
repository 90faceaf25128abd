"""The sshd fixture is a real OpenSSH server: keys, host key checks, streamlocal, stop/restart."""

from __future__ import annotations

import asyncio
import socket
import subprocess
from pathlib import Path

import asyncssh
import paramiko
import pytest
import yaml

from tests.sshd import SSHServer, start_sshd

pytestmark = pytest.mark.ssh


async def _connect(
    server: SSHServer, known_hosts: Path | None = None
) -> asyncssh.SSHClientConnection:
    # config=None and agent_path=None: use only the fixture's files, never ~/.ssh or an agent.
    return await asyncssh.connect(
        server.host,
        server.port,
        username=server.user,
        client_keys=[str(server.client_key_path)],
        known_hosts=str(known_hosts or server.known_hosts_path),
        config=None,
        agent_path=None,
        connect_timeout=10,
    )


async def _echo_hi(server: SSHServer) -> str:
    async with await _connect(server) as conn:
        result = await conn.run("echo hi", check=True, timeout=10)
    return str(result.stdout)


def test_asyncssh_runs_a_command(sshd_session: SSHServer) -> None:
    assert asyncio.run(_echo_hi(sshd_session)) == "hi\n"


def test_paramiko_runs_a_command(sshd_session: SSHServer) -> None:
    client = paramiko.SSHClient()
    client.load_host_keys(str(sshd_session.known_hosts_path))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        client.connect(
            sshd_session.host,
            port=sshd_session.port,
            username=sshd_session.user,
            key_filename=str(sshd_session.client_key_path),
            look_for_keys=False,
            allow_agent=False,
            timeout=10,
        )
        _, stdout, _ = client.exec_command("echo hi", timeout=10)
        assert stdout.read() == b"hi\n"
    finally:
        client.close()


def test_wrong_host_key_is_refused(sshd_session: SSHServer, tmp_path: Path) -> None:
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    kind, blob, *_ = Path(f"{other}.pub").read_text().split()
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"[127.0.0.1]:{sshd_session.port} {kind} {blob}\n")

    with pytest.raises(asyncssh.HostKeyNotVerifiable):
        asyncio.run(_connect(sshd_session, known_hosts=wrong))


def test_direct_streamlocal_reaches_a_unix_socket(sshd_session: SSHServer, tmp_path: Path) -> None:
    path = str(tmp_path / "echo.sock")

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.read(1024))
        await writer.drain()
        writer.close()

    async def main() -> bytes:
        server = await asyncio.start_unix_server(echo, path)
        async with server, await _connect(sshd_session) as conn:
            reader, writer = await conn.open_unix_connection(path)
            writer.write(b"ping through sshd")
            data = await asyncio.wait_for(reader.read(), 10)
            writer.close()
        return bytes(data)

    assert asyncio.run(main()) == b"ping through sshd"


def test_sshd_pids_lists_connection_processes(sshd: SSHServer) -> None:
    assert sshd.sshd_pids() == [sshd.proc.pid]

    async def main() -> list[int]:
        async with await _connect(sshd) as conn:
            await conn.run("true", check=True, timeout=10)
            pids = sshd.sshd_pids()
        return pids

    during = asyncio.run(main())
    assert during[0] == sshd.proc.pid and len(during) >= 2  # [priv] and user@notty


def test_stop_drops_connections_and_refuses_new_ones(sshd: SSHServer) -> None:
    async def main() -> None:
        async with await _connect(sshd) as conn:
            await asyncio.to_thread(sshd.stop)
            with pytest.raises((asyncssh.Error, OSError)):
                await conn.run("true", check=True, timeout=10)

    asyncio.run(main())
    assert sshd.proc.returncode is not None and sshd.sshd_pids() == []
    sshd.stop()  # idempotent
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((sshd.host, sshd.port), timeout=5).close()


def test_restart_serves_the_same_port_and_host_key(sshd: SSHServer) -> None:
    first = sshd.proc.pid
    sshd.restart()
    assert sshd.proc.pid != first and sshd.proc.poll() is None
    assert asyncio.run(_echo_hi(sshd)) == "hi\n"  # the old known_hosts line still matches


def test_extra_config_overrides_a_default(tmp_path: Path) -> None:
    server = start_sshd(tmp_path, extra_config="AllowStreamLocalForwarding no\n")
    try:

        async def main() -> None:
            async with await _connect(server) as conn:
                with pytest.raises(asyncssh.ChannelOpenError):
                    await conn.open_unix_connection(str(tmp_path / "none.sock"))

        asyncio.run(main())
    finally:
        server.stop()


def test_hosts_file_describes_the_server(hosts_file: Path, sshd_session: SSHServer) -> None:
    doc = yaml.safe_load(hosts_file.read_text())
    assert doc["hosts"] == [{"host": "127.0.0.1"}]
    assert doc["defaults"]["port"] == sshd_session.port
    assert doc["defaults"]["identity_file"] == str(sshd_session.client_key_path)
    assert doc["defaults"]["known_hosts"] == str(sshd_session.known_hosts_path)
    assert Path(doc["defaults"]["workdir"]).parent == hosts_file.parent
