"""Direct lanes over SSH: the system's OpenSSH client forwards local sockets to the engines.

Layer: transport. Imports config only; used by the asyncssh backend.

asyncssh does its packet work in Python, in the client's one IO thread. For the blocking
calls that the direct lane serves (see ``_lane.py``), one ``ssh`` process per host forwards a
Unix socket in a private (0700) directory here to each engine's socket on the host
(``-L local:remote``: the same streamlocal forwarding the asyncssh channels use). The calling
thread then reads and writes a plain socket, and the encryption runs in C, in another process.

The forwarder starts at the third blocking call to the host (a one-off call is not worth
another login) and is used once it reports its sockets bound (until then calls go through
the channel, as they do if it fails; logged). It
logs in as the asyncssh connection does (port, user, identity files, ``~/.ssh/config``), with
no prompts (``BatchMode``) and the same known_hosts file, strictly checked: it is not used
with ``known_hosts: none`` or a ``proxy_jump``, or when the host sets ``openssh_lane: false``.
It exits when the client closes it, or, if the client dies, when its stdin closes (the
remote ``cat`` it runs then ends).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import threading

from ..config import HostSpec
from .base import ENCRYPTION_ALGS, KEX_ALGS

log = logging.getLogger("sshpar.transport")

#: The forwarder starts with this many blocking calls to the host (none for a one-off call).
START_AFTER = 3
#: What the forwarder prints (its LocalCommand) once it is logged in and its sockets bound.
READY = b"sshpar-forwarder-ready"
#: How long close() waits for the process to exit after SIGTERM (seconds).
STOP_TIMEOUT = 2.0


def usable(spec: HostSpec) -> bool:
    """Whether a forwarder may serve this host (see the module's doc)."""
    return (spec.openssh_lane and spec.known_hosts != "none" and not spec.proxy_jump
            and shutil.which("ssh") is not None)


def command(spec: HostSpec, forwards: dict[str, str]) -> list[str]:
    """The ``ssh`` command line forwarding each local path to its remote path (no secrets:
    paths and options only)."""
    argv = ["ssh", "-T", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", "ExitOnForwardFailure=yes", "-o", "ControlMaster=no",
            "-o", "ControlPath=none", "-o", "StreamLocalBindUnlink=yes",
            "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4",
            "-o", f"ConnectTimeout={max(1, round(spec.connect_timeout))}",
            "-o", "PermitLocalCommand=yes", "-o", f"LocalCommand=echo {READY.decode()}",
            # the algorithms the asyncssh connection prefers, for the same reasons
            "-o", f"KexAlgorithms={','.join(KEX_ALGS)}",
            "-o", f"Ciphers={','.join(ENCRYPTION_ALGS)}"]
    if spec.known_hosts is not None:
        argv += ["-o", f"UserKnownHostsFile={os.path.expanduser(spec.known_hosts)}"]
    if spec.port is not None:
        argv += ["-p", str(spec.port)]
    if spec.user is not None:
        argv += ["-l", spec.user]
    for key in spec.identity_file:
        argv += ["-i", os.path.expanduser(key)]
    if spec.identity_file:
        argv += ["-o", "IdentitiesOnly=yes"]
    for local, remote in forwards.items():
        argv += ["-L", f"{local}:{remote}"]
    return [*argv, "--", spec.host, "exec cat >/dev/null"]


_PREFIX = "sshpar-fw-"


def _sweep() -> None:
    """Remove the socket directories of forwarders whose client died without closing them
    (the forwarder itself exits with its client: see the module's doc). Ours only."""
    base = tempfile.gettempdir()
    try:
        entries = list(os.scandir(base))
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(_PREFIX):
            continue
        try:
            pid = int(entry.name[len(_PREFIX):].split("-", 1)[0])
            if entry.stat(follow_symlinks=False).st_uid != os.getuid() or _alive(pid):
                continue
        except (ValueError, OSError):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Forwarder:
    """One ``ssh -L`` process for one host. Thread-safe; never blocks a caller for long."""

    def __init__(self, spec: HostSpec, remotes: list[str]) -> None:
        self.spec = spec
        _sweep()
        self.dir = tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-")  # 0700
        self.paths = {remote: os.path.join(self.dir, f"{i}.sock")
                      for i, remote in enumerate(remotes)}
        self._errors = open(os.path.join(self.dir, "ssh.log"), "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            command(spec, {local: remote for remote, local in self.paths.items()}),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._errors,
            start_new_session=True)  # a Ctrl-C in the terminal is not for it
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        self._seen = b""
        self.ready = False
        self.failed = False
        self._lock = threading.Lock()

    def local_path(self, remote: str) -> str | None:
        """The local socket reaching ``remote``, once the forwarder is ready; else None."""
        if not self.ready:
            with self._lock:
                self._check()
            if not self.ready:
                return None
        return self.paths.get(remote)

    def _check(self) -> None:
        if self.ready or self.failed:
            return
        assert self.proc.stdout is not None
        try:
            data = os.read(self.proc.stdout.fileno(), 4096)
        except BlockingIOError:
            data = None
        if data:
            self._seen = (self._seen + data)[-256:]
            self.ready = READY in self._seen
        elif self.proc.poll() is not None or data == b"":
            self.failed = True
            log.info("%s: the OpenSSH forwarder for direct lanes exited (%s); blocking calls "
                     "go through the channel: %s", self.spec.label, self.proc.returncode,
                     self._log_tail())

    def _log_tail(self) -> str:
        try:
            with open(os.path.join(self.dir, "ssh.log"), "rb") as f:
                return f.read()[-500:].decode("utf-8", "replace").strip() or "no message"
        except OSError:
            return "no message"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
        self._errors.close()
        shutil.rmtree(self.dir, ignore_errors=True)
