"""Load and validate the hosts file into frozen ``HostSpec`` / ``ClusterSpec`` records.

Layer: bottom; imports stdlib, PyYAML and sshpar.errors.

The YAML is composed, not loaded, so every node keeps its line number: each mistake becomes a
``ConfigError`` naming the file, the line and the key, never a silent default.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import SafeConstructor

from .errors import ConfigError

__all__ = ["AUTO_ENGINES", "ClusterSpec", "HostSpec", "load_hosts", "local_cluster", "parse_hosts"]

#: ``HostSpec.engines`` for ``engines: auto``: one engine per core, counted on the remote.
AUTO_ENGINES = None

_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MERGE_TAG = "tag:yaml.org,2002:merge"
_TOP_KEYS = ("name", "defaults", "hosts")


@dataclasses.dataclass(frozen=True, slots=True)
class HostSpec:
    """One host of a cluster, with every setting resolved from the file (see docs/hosts-file.md).

    ``None`` for ``user``, ``port``, ``proxy_jump`` means "not set here": the SSH library takes it
    from ``~/.ssh/config`` (or its own default). ``line`` is where the entry starts in the file.
    """

    host: str
    engines: int | None = 1
    python: str = "python3"
    setup: str | None = None
    workdir: str = "~/.cache/sshpar"
    env: tuple[tuple[str, str], ...] = ()
    user: str | None = None
    port: int | None = None
    identity_file: tuple[str, ...] = ()
    known_hosts: str | None = None
    proxy_jump: str | None = None
    transport: str = "ssh"
    backend: str = "asyncssh"
    idle_timeout: float = 3600.0
    restart: str = "no"
    restart_limit: int = 3
    connect_timeout: float = 10.0
    heartbeat_interval: float = 2.0
    lost_after: float = 30.0
    openssh_lane: bool = True
    keep_launcher: float = 60.0
    line: int = 0

    @property
    def env_dict(self) -> dict[str, str]:
        """The ``env`` pairs as a fresh dict."""
        return dict(self.env)

    @property
    def label(self) -> str:
        """A short name for messages: ``host``, or ``user@host:port`` when those are set."""
        text = self.host if self.user is None else f"{self.user}@{self.host}"
        return text if self.port is None else f"{text}:{self.port}"


@dataclasses.dataclass(frozen=True, slots=True)
class ClusterSpec:
    """A named set of hosts, as read from one hosts file (``source``)."""

    name: str
    hosts: tuple[HostSpec, ...]
    source: str | None = None

    @property
    def total_engines(self) -> int | None:
        """How many engines the cluster starts, or None if any host uses ``engines: auto``."""
        if any(h.engines is AUTO_ENGINES for h in self.hosts):
            return None
        return sum(h.engines or 0 for h in self.hosts)


class _Invalid(Exception):
    """A value is wrong; the caller adds file, line and key. ``node`` overrides the line."""

    def __init__(self, message: str, node: yaml.Node | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.node = node


_NOT_SCALAR = object()  # _Reader.scalar of a mapping, a list or an unknown tag


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Reader:
    """Walks the node tree of one file, turning mistakes into ConfigErrors for that file."""

    def __init__(self, source: str) -> None:
        self.source = source
        self._ctor = SafeConstructor()

    def error(self, message: str, node: yaml.Node, key: str | None) -> ConfigError:
        return ConfigError(message, file=self.source, line=_line(node), key=key)

    def scalar(self, node: yaml.Node) -> Any:
        """The node's Python value; _NOT_SCALAR for a collection or an unknown tag (`!foo`)."""
        if not isinstance(node, yaml.ScalarNode):
            return _NOT_SCALAR
        try:
            return self._ctor.construct_object(node)
        except yaml.YAMLError:
            return _NOT_SCALAR

    def show(self, node: yaml.Node) -> str:
        """How a wrong value is quoted in a message: 'abc', 42, null, true, a list."""
        if isinstance(node, yaml.MappingNode):
            return "a mapping"
        if isinstance(node, yaml.SequenceNode):
            return "a list"
        value = self.scalar(node)
        if value is _NOT_SCALAR:
            return f"{node.value!r} tagged {node.tag} (remove the tag)"
        if value is None:
            return "null"
        if isinstance(value, bool):
            plain = node.value.lower() in ("true", "false")
            return f"{str(value).lower()}{'' if plain else ' (YAML reads it as a boolean)'}"
        return repr(value) if isinstance(value, str) else str(node.value)

    def mapping(self, node: yaml.MappingNode) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """Key name -> (key node, value node), refusing duplicates (which YAML allows)."""
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for knode, vnode in node.value:
            if not isinstance(knode, yaml.ScalarNode):
                raise self.error("keys must be plain names, not a list or mapping", knode, None)
            name = str(knode.value)
            if knode.tag == _MERGE_TAG:
                raise self.error("YAML merge keys ('<<') are not supported; put shared settings "
                                 "under `defaults:`", knode, name)
            if name in out:
                first = _line(out[name][0])
                raise self.error(f"duplicate key {name!r} (first set on line {first}); keep one",
                                 knode, name)
            out[name] = (knode, vnode)
        return out

    def field(self, key: str, vnode: yaml.Node, check: _Check) -> Any:
        try:
            return check(self, key, vnode)
        except _Invalid as exc:
            node = vnode if exc.node is None else exc.node
            raise self.error(exc.message, node, key) from None

    def unknown(self, name: str, knode: yaml.Node, allowed: list[str]) -> ConfigError:
        close = difflib.get_close_matches(name, allowed, n=1)
        if close:
            hint = f" (did you mean {close[0]!r}?)"
        elif name in _CHECKS:  # a host setting written at the top level
            hint = f"; {name!r} goes under `defaults:` or in a host entry"
        else:
            hint = f"; allowed here: {', '.join(allowed)}"
        return self.error(f"unknown key {name!r}{hint}", knode, name)

    def settings(self, node: yaml.MappingNode, *, in_defaults: bool) -> dict[str, Any]:
        """Validate the host settings of ``defaults:`` or of one host entry."""
        allowed = list(_CHECKS) if in_defaults else ["host", *_CHECKS]
        out: dict[str, Any] = {}
        for name, (knode, vnode) in self.mapping(node).items():
            if name == "host":
                if in_defaults:
                    raise self.error("'host' cannot go under `defaults:`; list each host under "
                                     "`hosts:`", knode, name)
                continue
            if name not in _CHECKS:
                raise self.unknown(name, knode, allowed)
            out[name] = self.field(name, vnode, _CHECKS[name])
        return out


_Check = Callable[[_Reader, str, yaml.Node], Any]


def _expect(what: str, ok: Callable[[Any], bool],
            convert: Callable[[Any], Any] = lambda v: v) -> _Check:
    """A check for one scalar: ``ok(value)`` or "'key' must be <what>, got <value>"."""
    def check(r: _Reader, key: str, node: yaml.Node) -> Any:
        value = r.scalar(node)
        if value is not _NOT_SCALAR and ok(value):
            return convert(value)
        raise _Invalid(f"{key!r} must be {what}, got {r.show(node)}")
    return check


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _optional_text(value: Any) -> bool:
    # An explicit null on an optional key means "not set here", e.g. to drop a default proxy_jump.
    return value is None or _text(value)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _env(r: _Reader, key: str, node: yaml.Node) -> tuple[tuple[str, str], ...]:
    if not isinstance(node, yaml.MappingNode):
        raise _Invalid(f"{key!r} must be a mapping of NAME: value, got {r.show(node)}")
    pairs = []
    for name, (knode, vnode) in r.mapping(node).items():
        if not _ENV_NAME_RE.fullmatch(name):
            raise _Invalid(f"env name {name!r} is not a valid variable name (letters, digits "
                           "and '_', not starting with a digit)", knode)
        value = r.scalar(vnode)
        if value is None or value is _NOT_SCALAR:
            fix = f'; write {name}: "" for an empty value' if value is None else ""
            raise _Invalid(f"env value of {name} must be a string, number or boolean, "
                           f"got {r.show(vnode)}{fix}", vnode)
        pairs.append((name, str(vnode.value)))  # as written: `1.50` stays "1.50", `yes` "yes"
    return tuple(sorted(pairs))


def _identity_file(r: _Reader, key: str, node: yaml.Node) -> tuple[str, ...]:
    items = node.value if isinstance(node, yaml.SequenceNode) else [node]
    paths = []
    for item in items:
        value = r.scalar(item)
        if not (isinstance(value, str) and value.strip()):
            raise _Invalid(f"{key!r} must be a path or a list of paths, got {r.show(item)}", item)
        paths.append(os.path.expanduser(value))
    return tuple(paths)


def _known_hosts(r: _Reader, key: str, node: yaml.Node) -> str:
    value = r.scalar(node)
    if value is None:
        # Turning host-key checking off must be spelled out; an empty value could be a slip.
        raise _Invalid(f"{key!r} is empty (YAML null); write `known_hosts: none` to turn "
                       "host-key checking off, or leave the key out to use ~/.ssh/known_hosts")
    if not (isinstance(value, str) and value.strip()):
        raise _Invalid(f"{key!r} must be a path or the string none, got {r.show(node)}")
    return "none" if value.strip().lower() == "none" else os.path.expanduser(value)


def _host_name(r: _Reader, key: str, node: yaml.Node) -> str:
    value = r.scalar(node)
    if not (isinstance(value, str) and value.strip()) or any(c.isspace() for c in value):
        raise _Invalid(f"{key!r} must be a host name or ~/.ssh/config alias, got {r.show(node)}")
    user, at, rest = value.rpartition("@")
    if at:
        raise _Invalid(f"{key!r} must be a bare host name, got {value!r}; write "
                       f"`host: {rest}` and `user: {user}`")
    return value


_cluster_name = _expect("letters, digits, '_', '.' and '-' only",
                        lambda v: isinstance(v, str) and bool(_NAME_RE.fullmatch(v)))

# The keys allowed under `defaults:` and in each host entry; each is a HostSpec field.
#: One ProxyJump hop: [user@]host[:port] (an IPv6 address in brackets).
_JUMP_HOP = re.compile(r"(?:[^@\s,]+@)?(?:\[[0-9A-Fa-f:.]+\]|[^@\s,:\[\]]+)"
                       r"(?::(?:6553[0-5]|655[0-2]\d|65[0-4]\d\d|6[0-4]\d{3}|[1-5]\d{4}|[1-9]\d{0,3}))?")


_CHECKS: dict[str, _Check] = {
    "engines": _expect('a positive integer or "auto"',
                       lambda v: v == "auto" or (_is_int(v) and v >= 1),
                       lambda v: AUTO_ENGINES if v == "auto" else v),
    "python": _expect("a non-empty string", _text),
    "setup": _expect("a non-empty string", _optional_text),
    "workdir": _expect("a non-empty string", _text),
    "env": _env,
    "user": _expect("a non-empty string", _optional_text),
    "port": _expect("an integer from 1 to 65535",
                    lambda v: v is None or (_is_int(v) and 1 <= v <= 65535)),
    "identity_file": _identity_file,
    "known_hosts": _known_hosts,
    "proxy_jump": _expect("[user@]host[:port], or several joined by commas",
                          lambda v: v is None or (isinstance(v, str) and all(
                              _JUMP_HOP.fullmatch(h.strip()) for h in v.split(",")))),
    "transport": _expect("ssh or local", lambda v: v in ("ssh", "local")),
    "backend": _expect("asyncssh or paramiko", lambda v: v in ("asyncssh", "paramiko")),
    "idle_timeout": _expect("a number of seconds >= 0", lambda v: _number(v) and v >= 0, float),
    # YAML 1.1 reads a bare `no` (also `off`, `false`) as the boolean False: all mean "no".
    "restart": _expect('"no" or "on-failure"', lambda v: v is False or v in ("no", "on-failure"),
                       lambda v: "no" if v is False else v),
    "restart_limit": _expect("an integer >= 0", lambda v: _is_int(v) and v >= 0),
    "connect_timeout": _expect("a number of seconds > 0", lambda v: _number(v) and v > 0, float),
    "heartbeat_interval": _expect("a number of seconds > 0", lambda v: _number(v) and v > 0,
                                  float),
    "lost_after": _expect("a number of seconds > 0", lambda v: _number(v) and v > 0, float),
    "openssh_lane": _expect("true or false", lambda v: isinstance(v, bool)),
    "keep_launcher": _expect("a number of seconds >= 0", lambda v: _number(v) and v >= 0,
                             float),
}


def _compose(text: str, source: str) -> yaml.Node | None:
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = exc.problem or exc.context or exc
        raise ConfigError(f"invalid YAML: {problem}; check the indentation and quoting around "
                          "this line", file=source, line=line) from exc
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        raise ConfigError(f"invalid YAML: unacceptable character #x{exc.character:04x}",
                          file=source, line=line) from exc


def _host_entry(r: _Reader, item: yaml.Node) -> tuple[str, yaml.Node, dict[str, Any]]:
    if isinstance(item, yaml.ScalarNode):
        return r.field("host", item, _host_name), item, {}
    if not isinstance(item, yaml.MappingNode):
        raise r.error(f"each item under `hosts:` must be a host name or a mapping with 'host', "
                      f"got {r.show(item)}", item, "hosts")
    fields = r.mapping(item)
    if len(fields) == 1 and "host" not in fields:  # `- node1:` is the mapping {node1: null}
        ((name, (_, value)),) = fields.items()
        if name not in _CHECKS and r.scalar(value) is None:
            raise r.error(f"host entry has no 'host' key; for a bare name write `- {name}` "
                          "without the colon", item, "host")
    settings = r.settings(item, in_defaults=False)  # unknown keys first: `hots:` is a typo
    if "host" not in fields:
        raise r.error("host entry has no 'host' key; add `host: <hostname or ~/.ssh/config "
                      "alias>`", item, "host")
    hnode = fields["host"][1]
    return r.field("host", hnode, _host_name), hnode, settings


def _parse(text: str, source: str, default_name: str) -> ClusterSpec:
    root = _compose(text, source)
    r = _Reader(source)
    if root is None:
        raise ConfigError("the file is empty; it needs a `hosts:` list (see hosts.example.yaml)",
                          file=source, line=1, key="hosts")
    if not isinstance(root, yaml.MappingNode):
        hint = "; indent the list under `hosts:`" if isinstance(root, yaml.SequenceNode) else ""
        raise r.error("the top level must be a mapping with `hosts:` (and optional `name:`, "
                      f"`defaults:`), got {r.show(root)}{hint}", root, None)
    top = r.mapping(root)
    for key, (knode, _) in top.items():
        if key not in _TOP_KEYS:
            raise r.unknown(key, knode, list(_TOP_KEYS))

    if "name" in top:
        name = r.field("name", top["name"][1], _cluster_name)
    elif _NAME_RE.fullmatch(default_name):
        name = default_name
    else:
        raise ConfigError(f"the cluster name {default_name!r} taken from the file name may use "
                          "only letters, digits, '_', '.' and '-'; add `name: ...` to the file",
                          file=source, line=1, key="name")

    defaults: dict[str, Any] = {}
    if "defaults" in top:
        dnode = top["defaults"][1]
        if not isinstance(dnode, yaml.MappingNode):
            raise r.error(f"'defaults' must be a mapping of host settings, got {r.show(dnode)}",
                          dnode, "defaults")
        defaults = r.settings(dnode, in_defaults=True)

    if "hosts" not in top:
        raise r.error("missing `hosts:`; list at least one host, e.g. `hosts: [node1]`",
                      root, "hosts")
    hkey, hnode = top["hosts"]
    if not isinstance(hnode, yaml.SequenceNode) or not hnode.value:
        empty = isinstance(hnode, yaml.SequenceNode) or r.scalar(hnode) is None
        message = ("'hosts' is empty; list at least one host" if empty else
                   f"'hosts' must be a list of host names or mappings, got {r.show(hnode)}")
        raise r.error(message, hkey if empty else hnode, "hosts")

    specs: list[HostSpec] = []
    seen: dict[str, int] = {}
    for item in hnode.value:
        host, where, settings = _host_entry(r, item)
        if host in seen:
            raise r.error(f"host {host!r} is listed twice (lines {seen[host]} and {_line(where)});"
                          " list it once and raise its `engines:` instead", where, "host")
        seen[host] = _line(where)
        merged: dict[str, Any] = {**defaults, **settings}
        specs.append(HostSpec(host=host, line=_line(item), **merged))
    return ClusterSpec(name=name, hosts=tuple(specs), source=source)


def parse_hosts(text: str, source: str = "<string>", *,
                default_name: str = "cluster") -> ClusterSpec:
    """Parse and validate the text of a hosts file.

    Args:
        text: the YAML text.
        source: the file name used in error messages and stored as ``ClusterSpec.source``.
        default_name: the cluster name when the text has no ``name:``.

    Returns:
        The validated cluster, hosts in file order with ``defaults:`` merged in.

    Raises:
        ConfigError: the YAML is invalid, or a key is unknown, duplicated, missing or of the
            wrong type; the error names ``source``, the line and the key.

    >>> spec = parse_hosts("hosts: [node1, {host: node2, engines: 4}]")
    >>> [(h.host, h.engines) for h in spec.hosts], spec.name
    ([('node1', 1), ('node2', 4)], 'cluster')
    """
    return _parse(text, source, default_name)


def load_hosts(path: str | os.PathLike[str]) -> ClusterSpec:
    """Read and validate a hosts file; the cluster name defaults to the file's stem.

    Args:
        path: the YAML file (``~`` is expanded).

    Returns:
        The validated cluster; ``source`` is ``path`` as given.

    Raises:
        ConfigError: the file is missing, unreadable or not UTF-8, or its content is invalid
            (see :func:`parse_hosts`).

    >>> spec = load_hosts("hosts.example.yaml")
    >>> spec.name, spec.hosts[0].host
    ('demo', 'node1.example.org')
    """
    source = os.fsdecode(path)
    file = Path(source).expanduser()
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("hosts file not found; check the path (hosts.example.yaml shows the "
                          "format)", file=source) from None
    except (OSError, UnicodeError) as exc:
        raise ConfigError(f"cannot read the hosts file: {exc}", file=source) from exc
    return _parse(text, source, file.stem)


def local_cluster(engines: int = 2, *, name: str = "local", python: str | None = None,
                  workdir: str | None = None, idle_timeout: float = 3600.0,
                  keep_launcher: float = 60.0) -> ClusterSpec:
    """A one-host cluster of engines run as subprocesses on this machine (no SSH).

    Args:
        engines: how many engines to start (a positive integer).
        name: the cluster name.
        python: the interpreter for the engines; defaults to ``sys.executable``.
        workdir: where engines keep their files; defaults to ``~/.cache/sshpar``.
        idle_timeout: seconds an engine waits with no client before exiting; 0 = never.
        keep_launcher: seconds the launcher stays ready for the next start; 0 = not kept.

    Raises:
        ConfigError: an argument is out of range.
    """
    where = "local_cluster()"
    if not _is_int(engines) or engines < 1:
        raise ConfigError(f"engines must be a positive integer, got {engines!r}",
                          file=where, key="engines")
    if not _NAME_RE.fullmatch(name):
        raise ConfigError(f"name may use only letters, digits, '_', '.' and '-', got {name!r}",
                          file=where, key="name")
    for key, value in (("idle_timeout", idle_timeout), ("keep_launcher", keep_launcher)):
        if not (_number(value) and value >= 0):
            raise ConfigError(f"{key} must be a number >= 0, got {value!r}", file=where,
                              key=key)
    extra: dict[str, Any] = {} if workdir is None else {"workdir": workdir}
    host = HostSpec(host="localhost", engines=engines, python=python or sys.executable,
                    transport="local", idle_timeout=float(idle_timeout),
                    keep_launcher=float(keep_launcher), **extra)
    return ClusterSpec(name=name, hosts=(host,))
