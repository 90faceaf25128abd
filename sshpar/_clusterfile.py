"""Cluster files: what a client needs to reach running engines again (~/.sshpar/clusters).

Layer: config (beside config.py). Imports the standard library, config and errors.

A cluster file holds the cluster key, so it is written 0600 in a 0700 directory, atomically
(temp file + rename), and never logged. ``SSHPAR_HOME`` moves the whole tree (tests use it).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from pathlib import Path
from typing import Any

from .config import ClusterSpec, HostSpec
from .errors import ConfigError, NoEnginesError

_DEFAULT = "default"


def home() -> Path:
    """sshpar's own directory: ``$SSHPAR_HOME`` or ``~/.sshpar``."""
    return Path(os.environ.get("SSHPAR_HOME") or Path.home() / ".sshpar")


def clusters_dir() -> Path:
    path = home() / "clusters"
    for d in (home(), path):
        d.mkdir(mode=0o700, exist_ok=True)
        if d.stat().st_mode & 0o077:
            d.chmod(0o700)
    return path


@dataclasses.dataclass(frozen=True)
class EngineRecord:
    id: int
    host: int          # index into ClusterRecord.hosts
    uuid: str
    pid: int
    socket: str


@dataclasses.dataclass(frozen=True)
class ClusterRecord:
    """A running cluster: its hosts, engines and key."""

    name: str
    key: bytes
    hosts: tuple[HostSpec, ...]
    engines: tuple[EngineRecord, ...]
    created: str = ""
    source: str | None = None

    @property
    def spec(self) -> ClusterSpec:
        return ClusterSpec(name=self.name, hosts=self.hosts, source=self.source)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "created": self.created,
            "source": self.source,
            "key": self.key.hex(),
            "hosts": [_host_to_json(h) for h in self.hosts],
            "engines": [dataclasses.asdict(e) for e in self.engines],
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any], path: str) -> ClusterRecord:
        try:
            return cls(
                name=doc["name"],
                key=bytes.fromhex(doc["key"]),
                hosts=tuple(_host_from_json(h) for h in doc["hosts"]),
                engines=tuple(EngineRecord(**e) for e in doc["engines"]),
                created=doc.get("created", ""),
                source=doc.get("source"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"not a valid sshpar cluster file ({type(exc).__name__}: {exc})",
                              file=path) from None


def _host_to_json(h: HostSpec) -> dict[str, Any]:
    doc = dataclasses.asdict(h)
    doc["env"] = [list(pair) for pair in h.env]
    doc["identity_file"] = list(h.identity_file)
    return doc


def _host_from_json(doc: dict[str, Any]) -> HostSpec:
    doc = dict(doc)
    doc["env"] = tuple(tuple(pair) for pair in doc.get("env", ()))
    doc["identity_file"] = tuple(doc.get("identity_file", ()))
    return HostSpec(**doc)


def path_for(name: str) -> Path:
    return clusters_dir() / f"{name}.json"


def save(record: ClusterRecord) -> Path:
    """Write the cluster file (0600, atomically) and make it the default cluster."""
    path = path_for(record.name)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(record.to_json(), f, indent=1)
    os.replace(tmp, path)
    set_default(record.name)
    return path


def set_default(name: str) -> None:
    pointer = clusters_dir() / _DEFAULT
    tmp = pointer.with_name(f".{_DEFAULT}.{os.getpid()}.tmp")
    tmp.write_text(name + "\n")
    os.replace(tmp, pointer)


def default_name() -> str | None:
    try:
        name = (clusters_dir() / _DEFAULT).read_text().strip()
    except FileNotFoundError:
        return None
    return name if name and path_for(name).exists() else None


def load(path: str | os.PathLike) -> ClusterRecord:
    path = os.path.expanduser(os.fspath(path))
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise ConfigError("cluster file not found", file=path) from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read cluster file: {exc}", file=path) from None
    return ClusterRecord.from_json(doc, path)


def load_named(name: str | None) -> ClusterRecord:
    """The cluster called ``name``, or the default one when ``name`` is None."""
    if name is None:
        name = default_name()
        if name is None:
            raise NoEnginesError(
                "no running cluster: start one with `sshpar start -f hosts.yaml` (or "
                "p.Client(hosts='hosts.yaml')), or try `sshpar demo`")
    path = path_for(name)
    if not path.exists():
        known = ", ".join(sorted(list_names())) or "none"
        raise NoEnginesError(f"no cluster named {name!r} (running clusters: {known}); "
                             f"start it with `sshpar start -f hosts.yaml`")
    return load(path)


def list_names() -> list[str]:
    return sorted(p.stem for p in clusters_dir().glob("*.json"))


def remove(name: str) -> None:
    path_for(name).unlink(missing_ok=True)
    if default_name() is None:
        rest = sorted(clusters_dir().glob("*.json"), key=lambda p: p.stat().st_mtime)
        pointer = clusters_dir() / _DEFAULT
        if rest:
            set_default(rest[-1].stem)
        else:
            pointer.unlink(missing_ok=True)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
