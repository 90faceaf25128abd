"""Shared fixtures: real OpenSSH sshd servers on loopback (see tests/sshd.py)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import stop_kept_launchers
from tests.sshd import SSHServer, start_sshd


@pytest.fixture(scope="session", autouse=True)
def sshpar_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Cluster files go to a private SSHPAR_HOME, never the user's ~/.sshpar."""
    home = tmp_path_factory.mktemp("sshpar-home")
    saved = os.environ.get("SSHPAR_HOME")
    os.environ["SSHPAR_HOME"] = str(home)
    yield home
    stop_kept_launchers(tmp_path_factory.getbasetemp())
    if saved is None:
        os.environ.pop("SSHPAR_HOME", None)
    else:
        os.environ["SSHPAR_HOME"] = saved


@pytest.fixture(scope="session")
def sshd_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHServer]:
    """One sshd for the whole run; for tests that do not stop, restart or reconfigure it."""
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


@pytest.fixture
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHServer]:
    """An sshd of this test's own, free to stop, restart or break."""
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


@pytest.fixture
def sshd_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., SSHServer]]:
    """Start more servers: `sshd_factory(extra_config=..., port=..., wrap=..., listen=...)`;
    all stopped at teardown."""
    servers: list[SSHServer] = []

    def start(
        *,
        extra_config: str = "",
        port: int | None = None,
        wrap: tuple[str, ...] = (),
        listen: str = "127.0.0.1",
    ) -> SSHServer:
        servers.append(
            start_sshd(
                tmp_path_factory.mktemp("sshd"),
                extra_config=extra_config,
                port=port,
                wrap=wrap,
                listen=listen,
            )
        )
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def hosts_file(sshd_session: SSHServer, tmp_path: Path) -> Path:
    """A hosts.yaml for the session sshd, one engine, workdir inside this test's tmp_path."""
    return sshd_session.hosts_yaml(tmp_path / "hosts.yaml", workdir=tmp_path / "work")
