"""`sshpar check`: probe each host of a hosts file and say whether engines can run there.

Layer: bootstrap (beside _bootstrap). Imports config, errors, _transport and _bootstrap's
shell prelude; never prints (the CLI draws the table from the returned records).

Per host, in order, each step only if the previous ones allow it: connect (reachable,
authenticated, host key known), the remote Python (path, version, same minor as ours),
streamlocal forwarding (a throwaway listener on a Unix socket in a private temp dir), and
round-trip times. A refused forwarding is a warning: sshpar then relays through an exec channel.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import shlex
import statistics
import sys
import time
from typing import Any

from . import _bootstrap
from ._transport import ForwardingRefused, Transport, make_transport
from .config import ClusterSpec, HostSpec
from .errors import (
    AuthenticationError,
    ConnectTimeoutError,
    HostError,
    HostKeyError,
    HostUnreachableError,
    PythonVersionError,
    SshparError,
)

#: At most this many hosts are probed at once.
CONCURRENCY = 16
COMMAND_TIMEOUT = 30.0
#: Seconds the remote listener waits for our connection before it removes itself.
LISTENER_TIMEOUT = 30
ECHOES = 5
COMMANDS = 3
#: A trivial remote command slower than this (ms) is worth a warning.
SLOW_COMMAND_MS = 1000.0

_CONNECT_KINDS: tuple[tuple[type[HostError], str], ...] = (
    (HostKeyError, "host key"),
    (AuthenticationError, "auth failed"),
    (ConnectTimeoutError, "timeout"),
    (HostUnreachableError, "unreachable"),
)

_PYTHON_INFO = "import sys; print(sys.executable); print(sys.version.split()[0])"

# Binds a socket in a fresh 0700 temp dir, prints its path, answers one connection with
# "ok", and cleans up when that happens, when stdin closes (we are done) or after a timeout.
_LISTENER = f"""\
import os, select, socket, sys, tempfile
d = tempfile.mkdtemp(prefix="sshpar-check-")
p = os.path.join(d, "probe.sock")
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.bind(p)
    s.listen(1)
    print(p, flush=True)
    ready = select.select([s, sys.stdin], [], [], {LISTENER_TIMEOUT})[0]
    if s in ready:
        c = s.accept()[0]
        c.sendall(b"ok\\n")
        c.close()
finally:
    s.close()
    if os.path.exists(p):
        os.unlink(p)
    os.rmdir(d)
"""


class Status(enum.Enum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"


@dataclasses.dataclass(frozen=True, slots=True)
class Probe:
    """One step of the check: its outcome, a short text for a table cell, the full message
    (with the fix) when something is wrong, and a machine-readable value."""

    name: str
    status: Status
    summary: str
    message: str = ""
    value: Any = None


@dataclasses.dataclass(frozen=True, slots=True)
class HostReport:
    """Every probe of one host, in order: connect, python, version, streamlocal, latency."""

    host: str
    probes: tuple[Probe, ...]

    @property
    def usable(self) -> bool:
        """Whether engines can run there (warnings allowed)."""
        return all(p.status is not Status.FAIL for p in self.probes)

    def probe(self, name: str) -> Probe:
        return next(p for p in self.probes if p.name == name)

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "usable": self.usable,
                "probes": {p.name: {"status": p.status.value, "summary": p.summary,
                                    "message": p.message, "value": p.value}
                           for p in self.probes}}


PROBES = ("connect", "python", "version", "streamlocal", "latency")


async def check_cluster(spec: ClusterSpec) -> list[HostReport]:
    """Probe every host of ``spec`` (at most CONCURRENCY at once); reports in file order."""
    sem = asyncio.Semaphore(CONCURRENCY)

    async def bounded(host: HostSpec) -> HostReport:
        async with sem:
            return await check_host(host)

    return list(await asyncio.gather(*(bounded(h) for h in spec.hosts)))


async def check_host(spec: HostSpec) -> HostReport:
    """Probe one host; never raises for a host problem (it becomes a FAIL probe)."""
    probes: list[Probe] = []
    transport = make_transport(spec)
    try:
        probes.append(await _connect(transport, spec))
        if probes[-1].status is Status.OK:
            probes += await _python(transport, spec)
        if probes[-1].status is Status.OK:
            probes.append(await _streamlocal(transport, spec))
            probes.append(await _latency(transport))
    finally:
        await transport.close()
    done = {p.name for p in probes}
    probes += [Probe(name, Status.SKIP, "-") for name in PROBES if name not in done]
    return HostReport(spec.label, tuple(probes))


def _failed(name: str, exc: BaseException, summary: str | None = None) -> Probe:
    return Probe(name, Status.FAIL, summary or "failed", str(exc), type(exc).__name__)


async def _connect(transport: Transport, spec: HostSpec) -> Probe:
    try:
        await asyncio.wait_for(transport.connect(), spec.connect_timeout + 5)
    except asyncio.TimeoutError:
        exc = ConnectTimeoutError(spec.label, f"no connection within {spec.connect_timeout:g} s")
        return _failed("connect", exc, "timeout")
    except HostError as exc:
        kind = next((k for cls, k in _CONNECT_KINDS if isinstance(exc, cls)), "failed")
        return _failed("connect", exc, kind)
    return Probe("connect", Status.OK, "local" if spec.transport == "local" else "ok")


async def _python(transport: Transport, spec: HostSpec) -> list[Probe]:
    cmd = _bootstrap.shell_prelude(spec) + f"exec {spec.python} -c {shlex.quote(_PYTHON_INFO)}"
    try:
        result = await transport.run(cmd, timeout=COMMAND_TIMEOUT)
    except SshparError as exc:
        return [_failed("python", exc)]
    lines = result.stdout.decode("utf-8", "replace").split()
    if result.exit_status != 0 or len(lines) < 2:
        last = (result.stderr_text.strip().splitlines() or [""])[-1]
        failure = HostError(spec.label, f"could not run {spec.python!r} (exit "
                            f"{result.exit_status}){': ' + last if last else ''}",
                            hint=f"set `python:` (or `setup:`) for {spec.host} in the hosts file")
        return [_failed("python", failure,
                        "not found" if result.exit_status == 127 else "failed")]
    executable, version = lines[-2], lines[-1]
    python = Probe("python", Status.OK, version,
                   value={"executable": executable, "version": version})
    ours = f"{sys.version_info[0]}.{sys.version_info[1]}"
    theirs = ".".join(version.split(".")[:2])
    if theirs == ours:
        return [python, Probe("version", Status.OK, "ok", value=True)]
    mismatch = PythonVersionError(
        spec.label, f"remote Python {version} differs from this client's "
        f"{sys.version.split()[0]} (minor versions must match)",
        hint=f"set `python:` for {spec.host} to a Python {ours} interpreter")
    return [python, Probe("version", Status.FAIL, f"{theirs}, need {ours}", str(mismatch), False)]


async def _streamlocal(transport: Transport, spec: HostSpec) -> Probe:
    if not transport.supports_unix_streams:
        return Probe("streamlocal", Status.WARN, "relay",
                     f"{spec.label}: the {spec.backend} backend cannot forward to Unix "
                     "sockets; engines are reached through a relay command", "unsupported")
    cmd = _bootstrap.shell_prelude(spec) + f"exec {spec.python} -c {shlex.quote(_LISTENER)}"
    try:
        reader, writer = await transport.open_exec(cmd)
    except Exception as exc:  # noqa: BLE001 - open_exec may leak a backend's own error
        return Probe("streamlocal", Status.WARN, "untested",
                     f"{spec.label}: could not start the test listener: {exc}")
    try:
        path = (await asyncio.wait_for(_read_line(reader), COMMAND_TIMEOUT)).strip()
        if not path:
            return Probe("streamlocal", Status.WARN, "untested",
                         f"{spec.label}: the test listener did not start", None)
        try:
            sock_reader, sock_writer = await asyncio.wait_for(
                transport.open_unix(path), COMMAND_TIMEOUT)
        except ForwardingRefused as exc:
            return Probe("streamlocal", Status.WARN, "refused",
                         f"{spec.label}: sshd refuses streamlocal forwarding ({exc}); "
                         "sshpar relays through an exec channel instead (slightly slower) — "
                         "`AllowStreamLocalForwarding yes` in sshd_config allows it",
                         "refused")
        try:
            reply = await asyncio.wait_for(sock_reader.readexactly(3), COMMAND_TIMEOUT)
        finally:
            sock_writer.close()
        if reply != b"ok\n":
            return Probe("streamlocal", Status.WARN, "odd reply",
                         f"{spec.label}: unexpected reply {reply!r} through the socket", None)
        return Probe("streamlocal", Status.OK, "allowed", value="allowed")
    except Exception as exc:  # noqa: BLE001 - a warning either way; say what happened
        return Probe("streamlocal", Status.WARN, "untested",
                     f"{spec.label}: could not test forwarding: {type(exc).__name__}: {exc}")
    finally:
        writer.close()


async def _read_line(reader: Any) -> str:
    data = b""
    while b"\n" not in data:
        chunk = await reader.read(4096)
        if not chunk:
            break
        data += chunk
    return data.decode("utf-8", "replace").partition("\n")[0]


async def _latency(transport: Transport) -> Probe:
    """Median echo round trip through an open exec stream (what a task's reply costs), and
    median time of a short command (what connecting work like a start costs)."""
    try:
        reader, writer = await transport.open_exec("exec cat")
        rtts = []
        try:
            for _ in range(ECHOES):
                t0 = time.perf_counter()
                writer.write(b"x")
                await writer.drain()
                await asyncio.wait_for(reader.readexactly(1), COMMAND_TIMEOUT)
                rtts.append(time.perf_counter() - t0)
        finally:
            writer.close()
        runs = []
        for _ in range(COMMANDS):
            t0 = time.perf_counter()
            await transport.run("true", timeout=COMMAND_TIMEOUT)
            runs.append(time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001 - a warning either way; say what happened
        return Probe("latency", Status.WARN, "unknown", f"could not measure: {exc}")
    rtt, cmd = statistics.median(rtts) * 1e3, statistics.median(runs) * 1e3
    value = {"rtt_ms": round(rtt, 3), "command_ms": round(cmd, 3)}
    if cmd > SLOW_COMMAND_MS:
        return Probe("latency", Status.WARN, f"{rtt:.2f} ms", (
            f"{transport.label}: running a command takes {cmd / 1e3:.1f} s, which every start "
            "pays; the remote shell's startup files (~/.bashrc runs for ssh commands) are "
            "the usual cause"), value)
    return Probe("latency", Status.OK, f"{rtt:.2f} ms", value=value)
