"""Zero-install start of engines: ship the engine code as one zip, start daemons, find them.

Layer: bootstrap. Imports config, errors, _transport.

The bundle is a zipapp of the engine-side modules plus cloudpickle's pure-Python source,
built byte-for-byte reproducibly so its hash names it. It is uploaded once per host and
content hash; a warm start is then one SSH command.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import hashlib
import io
import json
import logging
import os
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import cloudpickle

from . import _clusterfile
from ._transport import CommandResult, ForwardingRefused, Transport
from .config import HostSpec
from .errors import BootstrapError, PythonVersionError, SshparError

log = logging.getLogger("sshpar.bootstrap")

_PKG = Path(__file__).resolve().parent
#: The modules engines run. They import only the stdlib and cloudpickle (a test checks).
ENGINE_MODULES = ("errors.py", "_wire.py", "_serialize.py", "_markers.py",
                  "_engine/__init__.py", "_engine/executor.py", "_engine/daemon.py",
                  "_engine/reactor.py", "_engine/launcher.py", "_engine/relay.py",
                  "_engine/ops.py", "_engine/nanny.py")
_STUB_INIT = b'"""sshpar, engine side: only the modules engines need."""\n'
_EPOCH = (2020, 1, 1, 0, 0, 0)
LAUNCH_TIMEOUT = 60.0
#: How long reaching a kept launcher may take before the launch command runs instead.
KEPT_TIMEOUT = 10.0


@dataclasses.dataclass(frozen=True)
class Bundle:
    data: bytes
    digest: str

    @property
    def name(self) -> str:
        return f"sshpar-{self.digest[:20]}.pyz"


@functools.lru_cache(maxsize=1)
def build_bundle() -> Bundle:
    """The engine zipapp, reproducible: sorted entries, fixed timestamps, and bytecode beside
    each module (a zip's modules are otherwise compiled at every engine start: about 40 ms of
    CPU each). Engines run this Python's minor version; one whose magic number differs falls
    back to the sources. Built once per sshpar version and Python, then kept in
    ``$SSHPAR_HOME/cache``."""
    files: dict[str, bytes] = {
        "__main__.py": (_PKG / "_engine" / "bundle_main.py").read_bytes(),
        "sshpar/__init__.py": _STUB_INIT,
    }
    for rel in ENGINE_MODULES:
        files[f"sshpar/{rel}"] = (_PKG / rel).read_bytes()
    cp_dir = Path(cloudpickle.__file__).resolve().parent
    for path in sorted(cp_dir.glob("*.py")):
        files[f"cloudpickle/{path.name}"] = path.read_bytes()
    key = hashlib.sha256(json.dumps(
        [_BUNDLE_FORMAT, sys.version, sorted((n, hashlib.sha256(b).hexdigest())
                                             for n, b in files.items())]).encode()).hexdigest()
    cached = _clusterfile.home() / "cache" / f"bundle-{key[:32]}.pyz"
    try:
        data = cached.read_bytes()
    except OSError:
        data = _zip({**files, **_bytecode(files)})
        _store(cached, data)
    return Bundle(data, hashlib.sha256(data).hexdigest())


#: Changes whenever the way bundles are built changes (part of the cache key).
_BUNDLE_FORMAT = 2

# Compiles in a fresh, isolated interpreter: marshal's output depends on the reference counts
# of the objects it writes, so bytecode made in a busy process differs from run to run, and
# the bundle (named by its hash) would be uploaded again and again.
_COMPILE = """
import base64, json, py_compile, sys, tempfile, os
out = {}
with tempfile.TemporaryDirectory() as tmp:
    src, pyc = os.path.join(tmp, "m.py"), os.path.join(tmp, "m.pyc")
    for name, text in sorted(json.load(sys.stdin).items()):
        with open(src, "w", encoding="utf-8") as f:
            f.write(text)
        py_compile.compile(src, cfile=pyc, dfile=name, doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
        with open(pyc, "rb") as f:
            out[name + "c"] = base64.b64encode(f.read()).decode()
json.dump(out, sys.stdout)
"""


def _bytecode(files: dict[str, bytes]) -> dict[str, bytes]:
    """``name.pyc`` for each module (unchecked-hash pycs: no timestamps; code objects name
    their file by its path in the bundle). Empty if compiling fails: sources still work."""
    sources = {n: b.decode("utf-8") for n, b in files.items()
               if n.endswith(".py") and n != "__main__.py"}
    try:
        proc = subprocess.run([sys.executable, "-I", "-S", "-c", _COMPILE],
                              input=json.dumps(sources), capture_output=True, text=True,
                              timeout=60, check=True)
        return {n: base64.b64decode(b) for n, b in json.loads(proc.stdout).items()}
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        log.warning("engine bundle without bytecode (compiling failed: %s)", exc)
        return {}


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(files):
            info = zipfile.ZipInfo(name, date_time=_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o600 << 16
            zf.writestr(info, files[name])
    return buf.getvalue()


def _store(path: Path, data: bytes) -> None:
    """Keep a built bundle (0600 in a 0700 directory, atomically); a failure only costs the
    next client a rebuild."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        log.debug("could not keep the engine bundle in %s: %s", path, exc)


@dataclasses.dataclass(frozen=True)
class StartedEngine:
    uuid: str
    pid: int
    nanny: int
    socket: str
    log: str


@dataclasses.dataclass(frozen=True)
class LaunchReport:
    engines: tuple[StartedEngine, ...]
    python: tuple[int, ...]
    executable: str
    hostname: str
    runtime_dir: str
    #: The kept launcher's socket on the host (and its pid, if this launch started it).
    launcher: str | None = None
    launcher_pid: int | None = None
    #: Whether a kept launcher served this launch (else the launch command did).
    by_kept_launcher: bool = False


def _shell_path(path: str) -> str:
    """Quote a remote path but let a leading ~ expand on the remote side."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def shell_prelude(spec: HostSpec) -> str:
    """Shell lines every remote command starts with: umask, `setup:`, `env:`, W=workdir."""
    lines = ["umask 077"]
    if spec.setup:
        lines.append(spec.setup)
    for name, value in spec.env:
        lines.append(f"export {name}={shlex.quote(value)}")
    lines.append(f"W={_shell_path(spec.workdir)}")
    return "\n".join(lines) + "\n"


# Run a bundle only if this user owns it and its folder, and nobody else can write either:
# in a shared workdir, another user could otherwise plant code under the (public) name.
_GUARD = ('for f in "$W/bundles" "$B"; do\n'
          '  [ -O "$f" ] || { echo "SSHPAR-ERROR {\\"kind\\": \\"unsafe\\", \\"message\\": '
          '\\"$f is not owned by $(id -un)\\"}"; exit 3; }\n'
          '  case "$(ls -ld "$f")" in ?????w*|????????w*) echo "SSHPAR-ERROR {\\"kind\\": '
          '\\"unsafe\\", \\"message\\": \\"$f is writable by other users\\"}"; exit 3;; esac\n'
          'done\n')


def python_command(spec: HostSpec, bundle: Bundle, *args: str) -> str:
    """A shell command running the bundle with ``args`` under the host's Python."""
    quoted = " ".join(shlex.quote(a) for a in args)
    return (shell_prelude(spec) + f'B="$W/bundles/{bundle.name}"\n' + _GUARD +
            f"exec {spec.python} \"$B\" {quoted}")


_NEED_BUNDLE = "SSHPAR-NEED-BUNDLE"


async def launch(transport: Transport, spec: HostSpec, *, cluster: str, key: bytes,
                 engines: int | None, timeout: float = LAUNCH_TIMEOUT) -> LaunchReport:
    """Start ``engines`` daemons and return them: through the host's kept launcher if one
    serves these settings, else by the launch command (uploading the bundle if the host
    lacks it), which keeps a launcher for next time (see ``_engine/launcher.py``)."""
    bundle = build_bundle()
    version = "{}.{}".format(*sys.version_info[:2])
    conf: dict[str, Any] = {
        "key": key.hex(), "cluster": cluster, "engines": engines, "workdir": spec.workdir,
        "idle_timeout": spec.idle_timeout, "restart": spec.restart,
        "restart_limit": spec.restart_limit}
    kept = None
    if spec.keep_launcher > 0 and transport.supports_unix_streams:
        name = launcher_id(spec, bundle, version)
        kept = _KeptLaunchers(spec.label + " " + name)
        path = kept.get()
        if path is not None:
            report = await _launch_kept(transport, spec, path, conf, bundle, version, timeout)
            if report is not None:
                return report
            kept.forget()
        conf.update(keep_launcher=spec.keep_launcher, launcher_id=name)
    request = json.dumps(conf).encode() + b"\n"
    check = (shell_prelude(spec) + f'B="$W/bundles/{bundle.name}"\n'
             f'[ -f "$B" ] || {{ echo {_NEED_BUNDLE}; exit 0; }}\n' + _GUARD +
             f"exec {spec.python} \"$B\" launch {version}")
    result = await transport.run(check, input=request, timeout=timeout)
    if result.stdout.startswith(_NEED_BUNDLE.encode()):
        await upload_bundle(transport, spec, bundle, timeout=timeout)
        result = await transport.run(check, input=request, timeout=timeout)
    report = _parse_launch(spec, result, bundle, version)
    if kept is not None and report.launcher is not None:
        kept.remember(report.launcher)
    return report


def launcher_id(spec: HostSpec, bundle: Bundle, version: str) -> str:
    """Names what a kept launcher's engines inherit: a launch with other settings for the
    interpreter, its environment or the workdir is not served by it."""
    doc = [bundle.name, version, spec.python, spec.setup, list(spec.env), spec.workdir]
    return hashlib.sha256(json.dumps(doc).encode()).hexdigest()[:16]


async def _launch_kept(transport: Transport, spec: HostSpec, path: str, conf: dict,
                       bundle: Bundle, version: str, timeout: float) -> LaunchReport | None:
    """A launch through the kept launcher at ``path``; None if it is not there to serve (the
    caller runs the launch command instead), a report or an error as the command's."""
    try:
        reader, writer = await asyncio.wait_for(transport.open_unix(path), KEPT_TIMEOUT)
    except (SshparError, ForwardingRefused, OSError, asyncio.TimeoutError) as exc:
        # ForwardingRefused: a stale socket file (the launcher was killed), or a host that
        # forwards to no Unix socket (then every other start there pays this try).
        log.info("%s: no kept launcher at %s (%s: %s); running the launch command",
                 spec.label, path, type(exc).__name__, exc)
        return None
    try:
        writer.write(json.dumps(conf).encode() + b"\n")
        await writer.drain()
        out = await asyncio.wait_for(reader.read(), timeout)
    except (SshparError, OSError, EOFError, asyncio.TimeoutError) as exc:
        log.info("%s: the kept launcher at %s did not serve (%s: %s); running the launch "
                 "command", spec.label, path, type(exc).__name__, exc)
        return None
    finally:
        writer.close()
    if not out:  # it closed without a word: its bundle is gone, or it was stopping
        log.info("%s: the kept launcher at %s closed without a report; running the launch "
                 "command", spec.label, path)
        return None
    try:
        report = _parse_launch(spec, CommandResult(None, out, b""), bundle, version)
    except BootstrapError as exc:  # a fresh interpreter tells whether it is the settings
        log.warning("%s: the kept launcher at %s could not start the engines (%s); running "
                    "the launch command", spec.label, path, exc)
        return None
    return dataclasses.replace(report, launcher=path, by_kept_launcher=True)


class _KeptLaunchers:
    """Where this machine last learnt a host's kept launcher listens, by host and launcher
    id (``$SSHPAR_HOME/cache/launchers.json``, 0600): the path is on the host, under a
    workdir that may start with ``~``, so a client cannot work it out before its first
    launch there."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.path = _clusterfile.home() / "cache" / "launchers.json"

    def _load(self) -> dict[str, str]:
        try:
            doc = json.loads(self.path.read_bytes())
        except (OSError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def get(self) -> str | None:
        path = self._load().get(self.key)
        return path if isinstance(path, str) else None

    def remember(self, socket_path: str) -> None:
        doc = self._load()
        if doc.get(self.key) != socket_path:
            doc[self.key] = socket_path
            _store(self.path, json.dumps(doc, indent=1).encode())

    def forget(self) -> None:
        doc = self._load()
        if doc.pop(self.key, None) is not None:
            _store(self.path, json.dumps(doc, indent=1).encode())


async def upload_bundle(transport: Transport, spec: HostSpec, bundle: Bundle, *,
                        timeout: float) -> None:
    log.info("%s: uploading engine bundle %s (%d bytes)", spec.label, bundle.name,
             len(bundle.data))
    cmd = (shell_prelude(spec) + 'mkdir -p "$W/bundles" || exit 1\n'
           f'T="$W/bundles/.{bundle.name}.$$"\n'
           f'cat > "$T" && mv -f "$T" "$W/bundles/{bundle.name}"')
    result = await transport.run(cmd, input=bundle.data, timeout=timeout)
    if result.exit_status != 0:
        raise BootstrapError(
            spec.label, f"could not upload the engine bundle to {spec.workdir}/bundles "
            f"(exit {result.exit_status})", stderr=result.stderr_text,
            hint=f"check that `workdir:` for {spec.host} is writable",
            exit_status=result.exit_status)


def _parse_launch(spec: HostSpec, result, bundle: Bundle, version: str) -> LaunchReport:  # type: ignore[no-untyped-def]
    out = result.stdout.decode("utf-8", "replace")
    for line in out.splitlines():
        if line.startswith("SSHPAR-READY "):
            doc = json.loads(line[len("SSHPAR-READY "):])
            kept = doc.get("launcher") or {}
            return LaunchReport(
                engines=tuple(StartedEngine(e["uuid"], e["pid"], e["nanny"], e["socket"],
                                            e["log"]) for e in doc["engines"]),
                python=tuple(doc["python"]), executable=doc["executable"],
                hostname=doc["hostname"], runtime_dir=doc["runtime_dir"],
                launcher=kept.get("socket"), launcher_pid=kept.get("pid"))
        if line.startswith("SSHPAR-ERROR "):
            try:
                doc = json.loads(line[len("SSHPAR-ERROR "):])
            except ValueError:
                doc = {"kind": "unknown", "message": line[len("SSHPAR-ERROR "):]}
            if doc.get("kind") == "version":
                raise PythonVersionError(
                    spec.label,
                    f"remote {doc['message']} at {doc.get('executable')} differs from this "
                    f"client's Python {sys.version.split()[0]} (minor versions must match, "
                    "pickled code is version-specific)",
                    hint=f"set `python:` for {spec.host} in the hosts file to a Python "
                         f"{version} interpreter")
            if doc.get("kind") == "unsafe":
                raise BootstrapError(
                    spec.label, f"refusing to run the engine bundle: {doc['message']}",
                    hint=f"another user may have planted it; set `workdir:` for {spec.host} "
                         "to a directory only you can write (or remove the file if it is "
                         "yours)", exit_status=result.exit_status)
            raise BootstrapError(spec.label, f"engines failed to start: {doc['message']}",
                                 stderr=doc.get("log", "") or result.stderr_text,
                                 exit_status=result.exit_status)
    status = result.exit_status
    err = result.stderr_text
    if status == 127 or "not found" in err or "No such file" in err:
        hint = (f"set `python:` for {spec.host} in the hosts file to an existing interpreter"
                f" (now {spec.python!r})")
        if spec.setup:
            hint += " and check its `setup:` line"
        raise BootstrapError(spec.label, f"could not run {spec.python!r} (exit {status})",
                             stderr=err, hint=hint, exit_status=status)
    raise BootstrapError(spec.label, f"engine launcher failed (exit {status})", stderr=err,
                         hint="see the remote stderr above", exit_status=status)
