"""The local transport: the same engines as subprocesses on this machine, no SSH.

Layer: transport.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Sequence

from ..errors import ConnectTimeoutError
from .base import CommandResult, PushReader, StreamReader, StreamWriter, Transport

_SHELL = shutil.which("bash") or "/bin/sh"


class LocalTransport(Transport):
    on_this_machine = True

    def __init__(self, spec) -> None:  # type: ignore[no-untyped-def]
        super().__init__(spec)
        self._open = False
        self._procs: list[asyncio.subprocess.Process] = []

    async def connect(self) -> None:
        self._open = True

    @property
    def is_connected(self) -> bool:
        return self._open

    async def run(self, command: str, *, input: bytes = b"", timeout: float) -> CommandResult:
        proc = await asyncio.create_subprocess_exec(
            _SHELL, "-c", command, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            start_new_session=True)
        try:
            out, err = await asyncio.wait_for(proc.communicate(input), timeout)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise ConnectTimeoutError(
                self.label, f"command did not finish within {timeout:g} s") from None
        status = proc.returncode if proc.returncode is not None and proc.returncode >= 0 else None
        return CommandResult(status, out, err)

    async def open_unix(self, path: str) -> tuple[StreamReader, StreamWriter]:
        loop = asyncio.get_running_loop()
        reader = PushReader(limit=1 << 20, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        transport, _ = await loop.create_unix_connection(lambda: protocol, path)
        return reader, asyncio.StreamWriter(transport, protocol, reader, loop)

    def local_path(self, path: str, siblings: Sequence[str] = ()) -> str | None:
        return path

    async def open_exec(self, command: str) -> tuple[StreamReader, StreamWriter]:
        proc = await asyncio.create_subprocess_exec(
            _SHELL, "-c", command, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, limit=1 << 20)
        self._procs.append(proc)
        return proc.stdout, proc.stdin  # type: ignore[return-value]

    async def close(self) -> None:
        self._open = False
        for proc in self._procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        self._procs.clear()

