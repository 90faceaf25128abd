"""A real OpenSSH sshd on a free loopback port, with throwaway keys, for the tests.

Test helper only: imports the stdlib and PyYAML, never sshpar (the package may be mid-edit while
its tests run). `start_sshd` generates an ed25519 host key and an ed25519 user key authorized for
the current user, starts `/usr/sbin/sshd -D` on 127.0.0.1, and returns once the server has sent
its SSH banner. The conftest fixtures wrap it; fault tests use `stop`, `restart` and `sshd_pids`.

>>> server = start_sshd(tmp_path)              # doctest: +SKIP
>>> server.hosts_yaml(tmp_path / "hosts.yaml")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

SSHD = Path("/usr/sbin/sshd")  # sshd re-execs itself, so it must be started by absolute path
SSH_KEYGEN = "ssh-keygen"
PRIVSEP_DIR = Path("/run/sshd")
READY_TIMEOUT = 10.0  # seconds for a started sshd to send its banner
STOP_TIMEOUT = 5.0  # seconds for sshd to exit after SIGTERM before SIGKILL
START_ATTEMPTS = 5  # fresh ports to try when the chosen one was taken meanwhile

# Our defaults, by keyword. sshd keeps the FIRST value it reads for most keywords (and rejects a
# second `Subsystem sftp`), so `extra_config` cannot override by appending: `_config_text` puts
# the extra lines first and drops the defaults they name.
_DEFAULTS: dict[str, str] = {
    "StrictModes": "no",
    "UsePAM": "no",
    "PasswordAuthentication": "no",
    "KbdInteractiveAuthentication": "no",
    "PubkeyAuthentication": "yes",
    "PermitRootLogin": "prohibit-password",
    "AllowStreamLocalForwarding": "yes",
    "AllowTcpForwarding": "yes",
    "Subsystem": "sftp internal-sftp",
    "LogLevel": "VERBOSE",
    "MaxSessions": "64",
    "MaxStartups": "100:30:200",
    # bash sources ~/.bashrc for commands run by sshd unless SHLVL says it is nested. This
    # machine's .bashrc runs `pyenv init`, whose rehash lock made concurrent sessions wait up
    # to 60 s (and a session killed mid-rehash leaves the lock behind). Tests must not
    # depend on the account's shell start-up files.
    "SetEnv": "SHLVL=1",
}


class SSHDError(RuntimeError):
    """sshd is missing, would not start, or would not stop."""


@dataclass(kw_only=True)
class SSHServer:
    """One running sshd and the files a client needs to reach it."""

    port: int
    host: str = "127.0.0.1"
    workdir: Path  # holds the keys, sshd_config, authorized_keys, pid file and sshd.log
    host_key_path: Path  # ed25519
    host_pubkey: str  # "ssh-ed25519 AAAA..."
    client_key_path: Path  # ed25519, authorized for `user`
    known_hosts_path: Path  # "[127.0.0.1]:PORT ssh-ed25519 AAAA..."
    user: str  # the current user
    proc: subprocess.Popen[bytes]  # the listener; replaced by restart()
    config_path: Path
    log_path: Path
    wrap: tuple[str, ...] = ()  # a command prefix sshd runs under (e.g. `unshare -m ...`)

    def log(self) -> str:
        """The sshd log so far (LogLevel VERBOSE), for assertions and failure messages."""
        return _read(self.log_path)

    def sshd_pids(self) -> list[int]:
        """The listener pid, then the sshd processes serving connections (empty once stopped).

        Each connection has a privileged child of the listener and, after authentication, an
        unprivileged `sshd: user@notty` child of that one; both are listed. Commands the sessions
        run (shells, engines) are not.
        """
        if self.proc.poll() is not None:
            return []
        return [self.proc.pid, *_sshd_descendants(self.proc.pid)]

    def stop(self, *, connections: bool = True) -> None:
        """Stop the listener and wait; idempotent.

        A listener that dies leaves established connections running (that is how sshd keeps
        your session alive across `systemctl restart ssh`), so by default their sshd processes
        are terminated too and clients see the connection drop. `connections=False` keeps them.
        """
        if self.proc.poll() is None and connections:
            # Connections first, while the listener is alive to reap them (zombies included,
            # so we wait for that): orphans go to PID 1, and some containers' PID 1 reaps late
            # or never, leaving `[sshd] <defunct>` entries behind.
            _terminate(_sshd_descendants(self.proc.pid, zombies=True))
            # A client may have logged in again while those ended (sshd-tested clients
            # reconnect within milliseconds). Freeze the listener so that it accepts no more,
            # have it stop when it wakes, and end what it accepted meanwhile.
            os.kill(self.proc.pid, signal.SIGSTOP)
            os.kill(self.proc.pid, signal.SIGTERM)
            late = _sshd_descendants(self.proc.pid, zombies=True)
            for pid in late:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            os.kill(self.proc.pid, signal.SIGCONT)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)
            _terminate(late)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)

    def restart(self, *, connections: bool = True) -> None:
        """Stop, then start again on the same port with the same keys and config."""
        self.stop(connections=connections)
        self.proc = _spawn_ready(self.config_path, self.log_path, self.port, self.wrap, self.host)

    def hosts_yaml(
        self,
        path: Path,
        *,
        engines: int = 1,
        python: str = sys.executable,
        workdir: Path | None = None,
        extra: dict[str, Any] | None = None,
        name: str | None = None,
    ) -> Path:
        """Write a hosts file with one host, this server; `extra` adds or replaces defaults.

        The cluster `name` defaults to one unique to this file, so clusters never collide."""
        if name is None:
            name = "t-" + hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:10]
        defaults: dict[str, Any] = {
            "engines": engines,
            "python": python,
            "workdir": str(workdir if workdir is not None else self.workdir / "sshpar"),
            "user": self.user,
            "port": self.port,
            "identity_file": str(self.client_key_path),
            "known_hosts": str(self.known_hosts_path),
            **(extra or {}),
        }
        doc = {"name": name, "defaults": defaults, "hosts": [{"host": self.host}]}
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path


def start_sshd(
    base_dir: Path,
    *,
    extra_config: str = "",
    port: int | None = None,
    wrap: tuple[str, ...] = (),
    listen: str = "127.0.0.1",
) -> SSHServer:
    """Generate keys and config in `base_dir`, start sshd, and wait until it sends its banner.

    Args:
        base_dir: an empty, private directory (keys, config, pid file and log go here).
        extra_config: sshd_config lines; they take precedence over the defaults, and
            `Match` blocks in them are placed last, as sshd requires.
        port: listen here; by default a free port is picked (and re-picked if taken).
        wrap: a command prefix that ends by exec-ing its arguments (sshd's argv is appended),
            e.g. to run sshd in a private mount namespace; it must keep sshd's pid.
        listen: the IPv4 address sshd listens on (and the known_hosts line names); another
            one than loopback needs a `wrap` that puts sshd where that address exists, e.g.
            `("ip", "netns", "exec", NAME)`. With `port` unset, the port is picked free on
            this side, which a fresh network namespace also has free.

    Raises:
        SSHDError: sshd is not installed, or did not become ready (the message has its log).
    """
    if not os.access(SSHD, os.X_OK):
        raise SSHDError(
            f"{SSHD} not found: the integration tests need Debian's openssh-server — "
            "run ./scripts/test (it installs it) or `apt-get install openssh-server`"
        )
    _ensure_privsep_dir()
    base_dir = Path(base_dir).resolve()
    base_dir.mkdir(parents=True, exist_ok=True)
    host_key = base_dir / "ssh_host_ed25519_key"
    client_key = base_dir / "id_ed25519"
    _keygen(host_key)
    _keygen(client_key)
    host_pubkey = _pubkey(host_key)
    (base_dir / "authorized_keys").write_text(_pubkey(client_key) + "\n")
    user = pwd.getpwuid(os.getuid()).pw_name
    config = base_dir / "sshd_config"
    log = base_dir / "sshd.log"
    known_hosts = base_dir / "known_hosts"

    for attempt in range(1 if port is not None else START_ATTEMPTS):
        chosen = port if port is not None else _free_port()
        config.write_text(_config_text(base_dir, chosen, host_key, extra_config, user, listen))
        try:
            proc = _spawn_ready(config, log, chosen, wrap, listen)
        except _PortTaken:
            if port is not None or attempt == START_ATTEMPTS - 1:
                raise SSHDError(f"port {chosen} is in use:\n{_read(log)}") from None
            continue
        break
    known_hosts.write_text(f"[{listen}]:{chosen} {host_pubkey}\n")
    return SSHServer(
        port=chosen,
        host=listen,
        workdir=base_dir,
        host_key_path=host_key,
        host_pubkey=host_pubkey,
        client_key_path=client_key,
        known_hosts_path=known_hosts,
        user=user,
        proc=proc,
        config_path=config,
        log_path=log,
        wrap=tuple(wrap),
    )


class _PortTaken(Exception):
    pass


def _ensure_privsep_dir() -> None:
    # sshd refuses to start without its privilege separation directory; Debian creates it
    # from the ssh service unit, which is not running in CI.
    if not PRIVSEP_DIR.is_dir():
        try:
            PRIVSEP_DIR.mkdir(mode=0o755, parents=True)
            PRIVSEP_DIR.chmod(0o755)
        except PermissionError:
            pass  # not root: sshd will say what it needs, and the log is in the error


def _keygen(path: Path) -> None:
    subprocess.run(
        [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
        capture_output=True,
    )


def _pubkey(key: Path) -> str:
    kind, blob, *_ = Path(f"{key}.pub").read_text().split()
    return f"{kind} {blob}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _account_locked(user: str) -> bool:
    # Without PAM, sshd refuses every login to an account whose password hash starts with "!"
    # ("User root not allowed because account is locked"), even with a valid key. Some fresh
    # machines have root locked that way; there we let PAM decide instead, which allows keys.
    try:
        with open("/etc/shadow") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name == user:
                    return rest.startswith("!")
    except OSError:
        pass
    return False


def _config_text(
    base: Path, port: int, host_key: Path, extra: str, user: str, listen: str = "127.0.0.1"
) -> str:
    lines = extra.splitlines()
    match_at = next(
        (i for i, ln in enumerate(lines) if ln.strip().lower().startswith("match ")), len(lines)
    )
    extra_global, extra_match = lines[:match_at], lines[match_at:]
    overridden = {ln.split()[0].lower() for ln in extra_global if ln.strip() and ln[:1] != "#"}
    defaults = dict(_DEFAULTS)
    if _account_locked(user):
        defaults["UsePAM"] = "yes"
    return "\n".join(
        [
            "# written by tests/sshd.py",
            f"Port {port}",
            f"ListenAddress {listen}",
            f"HostKey {host_key}",
            f"PidFile {base / 'sshd.pid'}",
            f"AuthorizedKeysFile {base / 'authorized_keys'}",
            *extra_global,
            *(f"{k} {v}" for k, v in defaults.items() if k.lower() not in overridden),
            *extra_match,
            "",
        ]
    )


def _pdeathsig_prefix() -> list[str]:
    # If pytest dies without tearing down (SIGKILL, a CI timeout), the kernel sends sshd SIGTERM,
    # so no listener outlives the run. setpriv (util-linux) sets it and execs sshd, keeping the
    # pid; a preexec_fn could do the same but may deadlock when the tests run threads.
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []


def _spawn_ready(
    config: Path, log: Path, port: int, wrap: tuple[str, ...] = (), listen: str = "127.0.0.1"
) -> subprocess.Popen[bytes]:
    """Start sshd and return it once it sends "SSH-2.0"; raise _PortTaken or SSHDError."""
    start = log.stat().st_size if log.exists() else 0
    pidfile = config.parent / "sshd.pid"
    # stderr goes to the log too, for what fails before sshd opens it (exec errors).
    with open(log, "ab") as stderr:
        proc = subprocess.Popen(
            [*_pdeathsig_prefix(), *wrap, str(SSHD), "-D", "-e", "-f", str(config), "-E", str(log)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        if proc.poll() is not None:
            text = _read(log)[start:]
            if "Address already in use" in text:
                raise _PortTaken()
            raise SSHDError(
                f"sshd exited with status {proc.returncode} while starting on port {port}; "
                f"config {config}, log {log}:\n{text}"
            )
        # sshd writes its pid file only after binding, so this proves the banner is ours and
        # not from whoever else may have taken the port since we picked it.
        if _read(pidfile).strip() == str(proc.pid) and _banner(port, listen):
            # Let the child that served our probe exit, so sshd_pids() starts out as [listener].
            while _sshd_descendants(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.005)
            return proc
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise SSHDError(
                f"sshd did not send its banner on {listen}:{port} within {READY_TIMEOUT} s; "
                f"config {config}, log {log}:\n{_read(log)[start:]}"
            )
        time.sleep(0.01)


def _banner(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            return s.recv(64).startswith(b"SSH-2.0")
    except OSError:
        return False


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return _children_by_scan(pid)
    return [int(p) for p in text.split()]


def _children_by_scan(pid: int) -> list[int]:
    # /proc/PID/task/TID/children needs CONFIG_PROC_CHILDREN; fall back to reading every stat.
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None and stat[1] == pid:
                found.append(int(entry.name))
    return found


def _stat(pid: int) -> tuple[str, int, str] | None:
    """(comm, ppid, state) of a live process, or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm is in parentheses and may itself contain ") ", so split at the last one.
    comm = text[text.index("(") + 1 : text.rindex(")")]
    state, ppid = text[text.rindex(")") + 2 :].split()[:2]
    return comm, int(ppid), state


def _sshd_descendants(pid: int, *, zombies: bool = False) -> list[int]:
    found: list[int] = []
    todo = _children(pid)
    while todo:
        child = todo.pop(0)
        stat = _stat(child)
        if stat is not None and stat[0].startswith("sshd") and (zombies or stat[2] != "Z"):
            found.append(child)
            todo.extend(_children(child))
    return found


def _alive(pid: int) -> bool:
    """True until the process is gone, or is a zombie nobody will reap (orphaned to PID 1)."""
    stat = _stat(pid)
    return stat is not None and not (stat[2] == "Z" and stat[1] == 1)


def _terminate(pids: list[int]) -> None:
    """SIGTERM processes that are not our children, wait until reaped, then SIGKILL stragglers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + STOP_TIMEOUT
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.01)
        pids = [p for p in pids if _alive(p)]
        if not pids:
            return
    raise SSHDError(f"sshd processes {pids} survived SIGKILL")
