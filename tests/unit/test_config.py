"""Unit tests for sshpar.config: the hosts file, its validation and its error messages."""

from __future__ import annotations

import dataclasses
import pickle
import re
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from sshpar.config import (
    _CHECKS,
    _TOP_KEYS,
    AUTO_ENGINES,
    ClusterSpec,
    HostSpec,
    load_hosts,
    local_cluster,
    parse_hosts,
)
from sshpar.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "hosts.example.yaml"


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake HOME so `~` expands to a known place."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


def write(tmp_path: Path, text: str, name: str = "hosts.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load(tmp_path: Path, text: str, name: str = "hosts.yaml") -> ClusterSpec:
    return load_hosts(write(tmp_path, text, name))


def load_error(tmp_path: Path, text: str, name: str = "hosts.yaml") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text, name)
    return info.value


# --- valid files ---------------------------------------------------------------------------


FULL = """\
name: lab
defaults:
  engines: 3
  python: /opt/py/bin/python3
  setup: source ~/venv/bin/activate
  workdir: /scratch/sshpar
  env: {B_VAR: "x", A_VAR: 1}
  user: bob
  port: 2200
  identity_file: ~/.ssh/id_default
  known_hosts: ~/.ssh/lab_known_hosts
  proxy_jump: gate.example.org
  transport: ssh
  backend: paramiko
  idle_timeout: 0
  restart: on-failure
  restart_limit: 5
  connect_timeout: 2.5
hosts:
  - host: node1.example.org
    engines: auto
    python: python3.11
    setup: module load python
    workdir: ~/work
    env:
      OMP_NUM_THREADS: 4
      FLAG: yes
      RATIO: 1.50
    user: alice
    port: 22
    identity_file: [~/.ssh/id_ed25519, /keys/id_rsa]
    known_hosts: NONE
    proxy_jump: alice@bastion:2222
    transport: local
    backend: asyncssh
    idle_timeout: 90.5
    restart: "no"
    restart_limit: 0
    connect_timeout: 30
    openssh_lane: false
  - node2
"""


def test_full_file_sets_every_field(tmp_path: Path, _home: Path) -> None:
    spec = load(tmp_path, FULL)
    assert spec.name == "lab"
    assert spec.source == str(tmp_path / "hosts.yaml")
    assert len(spec.hosts) == 2
    assert spec.hosts[0] == HostSpec(
        host="node1.example.org",
        engines=AUTO_ENGINES,
        python="python3.11",
        setup="module load python",
        workdir="~/work",  # remote path: not expanded here
        env=(("FLAG", "yes"), ("OMP_NUM_THREADS", "4"), ("RATIO", "1.50")),
        user="alice",
        port=22,
        identity_file=(f"{_home}/.ssh/id_ed25519", "/keys/id_rsa"),
        known_hosts="none",
        proxy_jump="alice@bastion:2222",
        transport="local",
        backend="asyncssh",
        idle_timeout=90.5,
        restart="no",
        restart_limit=0,
        connect_timeout=30.0,
        openssh_lane=False,
        line=20,
    )
    assert spec.hosts[1] == HostSpec(
        host="node2",
        engines=3,
        python="/opt/py/bin/python3",
        setup="source ~/venv/bin/activate",
        workdir="/scratch/sshpar",
        env=(("A_VAR", "1"), ("B_VAR", "x")),
        user="bob",
        port=2200,
        identity_file=(f"{_home}/.ssh/id_default",),
        known_hosts=f"{_home}/.ssh/lab_known_hosts",
        proxy_jump="gate.example.org",
        transport="ssh",
        backend="paramiko",
        idle_timeout=0.0,
        restart="on-failure",
        restart_limit=5,
        connect_timeout=2.5,
        line=41,
    )
    assert isinstance(spec.hosts[1].idle_timeout, float)
    assert isinstance(spec.hosts[1].connect_timeout, float)


def test_defaults_merge_and_per_host_override(tmp_path: Path) -> None:
    spec = load(tmp_path, """\
        defaults:
          engines: 2
          python: /usr/bin/python3
          env: {A: "1"}
        hosts:
          - host: a
            engines: 8
          - host: b
            env: {B: "2"}
          - c
        """)
    a, b, c = spec.hosts
    assert (a.engines, a.python, a.env) == (8, "/usr/bin/python3", (("A", "1"),))
    assert (b.engines, b.python, b.env) == (2, "/usr/bin/python3", (("B", "2"),))  # replaced
    assert (c.engines, c.python, c.env) == (2, "/usr/bin/python3", (("A", "1"),))
    assert spec.total_engines == 12


def test_bare_names_get_all_defaults(tmp_path: Path) -> None:
    spec = load(tmp_path, """\
        hosts:
          - node1
          - gpu-box
          - 10.0.0.7
        """)
    assert [h.host for h in spec.hosts] == ["node1", "gpu-box", "10.0.0.7"]
    assert [h.line for h in spec.hosts] == [2, 3, 4]
    assert all(h == HostSpec(host=h.host, line=h.line) for h in spec.hosts)
    assert spec.total_engines == 3


def test_engines_auto_is_none_and_total_is_unknown(tmp_path: Path) -> None:
    spec = load(tmp_path, "hosts:\n  - {host: a, engines: auto}\n  - {host: b, engines: 4}\n")
    assert AUTO_ENGINES is None
    assert spec.hosts[0].engines is None
    assert spec.hosts[1].engines == 4
    assert spec.total_engines is None


def test_default_name_is_the_file_stem(tmp_path: Path) -> None:
    assert load(tmp_path, "hosts: [a]\n", name="my-lab.v2.yaml").name == "my-lab.v2"
    assert load(tmp_path, "name: other\nhosts: [a]\n", name="my-lab.yml").name == "other"


def test_parse_hosts_defaults() -> None:
    spec = parse_hosts("hosts: [a]")
    assert (spec.name, spec.source) == ("cluster", "<string>")
    assert parse_hosts("hosts: [a]", "x.yaml", default_name="x").name == "x"


def test_known_hosts_none_vs_path_vs_absent(tmp_path: Path, _home: Path) -> None:
    spec = load(tmp_path, """\
        hosts:
          - {host: a, known_hosts: none}
          - {host: b, known_hosts: None}
          - {host: c, known_hosts: ~/kh}
          - {host: d}
        """)
    assert [h.known_hosts for h in spec.hosts] == ["none", "none", f"{_home}/kh", None]


@pytest.mark.parametrize("value", ["null", "~", ""])
def test_known_hosts_null_is_an_error(tmp_path: Path, value: str) -> None:
    err = load_error(tmp_path, f"hosts:\n  - host: a\n    known_hosts: {value}\n")
    assert err.key == "known_hosts"
    assert "hosts.yaml:3:" in str(err)
    assert "write `known_hosts: none`" in str(err)


@pytest.mark.parametrize(("value", "expected"), [
    ("no", "no"),          # YAML 1.1: the boolean False
    ("off", "no"),         # also False
    ("false", "no"),
    ('"no"', "no"),
    ("on-failure", "on-failure"),
])
def test_restart_values(tmp_path: Path, value: str, expected: str) -> None:
    assert load(tmp_path, f"defaults: {{restart: {value}}}\nhosts: [a]\n").hosts[0].restart \
        == expected


def test_env_values_are_strings_as_written(tmp_path: Path) -> None:
    spec = load(tmp_path, """\
        hosts:
          - host: a
            env:
              S: text
              I: 4
              F: 0.5
              B: true
              Y: yes
              Q: "007"
              E: ""
              _under: x
        """)
    assert spec.hosts[0].env_dict == {
        "S": "text", "I": "4", "F": "0.5", "B": "true", "Y": "yes", "Q": "007", "E": "",
        "_under": "x",
    }
    assert [name for name, _ in spec.hosts[0].env] == sorted(spec.hosts[0].env_dict)


def test_identity_file_string_or_list(tmp_path: Path, _home: Path) -> None:
    spec = load(tmp_path, """\
        hosts:
          - {host: a, identity_file: ~/.ssh/k1}
          - {host: b, identity_file: [~/.ssh/k1, /k2]}
          - {host: c, identity_file: []}
        """)
    assert [h.identity_file for h in spec.hosts] == [
        (f"{_home}/.ssh/k1",), (f"{_home}/.ssh/k1", "/k2"), (),
    ]


def test_null_unsets_an_optional_default(tmp_path: Path) -> None:
    spec = load(tmp_path, """\
        defaults: {proxy_jump: gate, user: bob, port: 2222, setup: "true"}
        hosts:
          - {host: a, proxy_jump: null, user: ~, port: null, setup: null}
          - b
        """)
    a, b = spec.hosts
    assert (a.proxy_jump, a.user, a.port, a.setup) == (None, None, None, None)
    assert (b.proxy_jump, b.user, b.port, b.setup) == ("gate", "bob", 2222, "true")


def test_host_line_is_where_the_entry_starts(tmp_path: Path) -> None:
    spec = load(tmp_path, """\
        # comment
        hosts:

          - host: a
            engines: 2
          - engines: 3
            host: b
        """)
    assert [h.line for h in spec.hosts] == [4, 6]


def test_records_are_frozen_and_labelled() -> None:
    host = HostSpec(host="n1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        host.engines = 3  # type: ignore[misc]
    assert host.label == "n1"
    assert HostSpec(host="n1", user="al").label == "al@n1"
    assert HostSpec(host="n1", port=2222).label == "n1:2222"
    assert HostSpec(host="n1", user="al", port=2222).label == "al@n1:2222"
    assert HostSpec(host="n1", env=(("A", "1"),)).env_dict == {"A": "1"}
    assert ClusterSpec(name="x", hosts=()).total_engines == 0


def test_local_cluster() -> None:
    spec = local_cluster()
    assert spec == ClusterSpec(name="local", hosts=(HostSpec(
        host="localhost", engines=2, python=sys.executable, transport="local"),))
    spec = local_cluster(4, name="t", python="/py", workdir="/w", idle_timeout=5)
    (host,) = spec.hosts
    assert (spec.name, host.engines, host.python, host.workdir, host.idle_timeout) == (
        "t", 4, "/py", "/w", 5.0)
    assert spec.total_engines == 4


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"engines": 0}, "engines"),
    ({"engines": True}, "engines"),
    ({"name": "a b"}, "name"),
    ({"idle_timeout": -1}, "idle_timeout"),
])
def test_local_cluster_rejects_bad_arguments(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        local_cluster(**kwargs)
    assert info.value.key == key
    assert str(info.value).startswith("local_cluster(): ")


# --- the example file ----------------------------------------------------------------------


def test_example_file_loads() -> None:
    spec = load_hosts(EXAMPLE)
    assert spec.name == "demo"
    assert [h.host for h in spec.hosts] == ["node1.example.org", "gpu-box", "node3.internal"]
    assert spec.hosts[2].proxy_jump is not None
    assert spec.hosts[1] == dataclasses.replace(spec.hosts[1], user=None, port=None)


def test_example_file_uses_every_accepted_key() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    keys = {*_TOP_KEYS, "host", *_CHECKS}
    assert set(_CHECKS) == {f.name for f in dataclasses.fields(HostSpec)} - {"host", "line"}
    # Set for real (not only in a comment), so the example also proves the value is accepted.
    missing = [k for k in keys if not re.search(rf"^\s*(-\s+)?{k}:", text, re.MULTILINE)]
    assert missing == []


# --- errors --------------------------------------------------------------------------------


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_hosts(path)
    assert str(path) in str(info.value)
    assert "not found" in str(info.value)
    assert info.value.file == str(path)


def test_unreadable_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_hosts(tmp_path)  # a directory
    assert str(info.value).startswith(f"{tmp_path}: cannot read the hosts file")
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"hosts: [caf\xe9]\n")
    with pytest.raises(ConfigError) as info:
        load_hosts(bad)
    assert str(info.value).startswith(f"{bad}: cannot read the hosts file")


# (file text, line, key, a fragment of the message)
ERRORS = [
    pytest.param("hosts: [a]\nname: x: y\n", 2, None, "invalid YAML", id="invalid-yaml"),
    pytest.param("hosts:\n  - a\n\t- b\n", 3, None, "invalid YAML", id="tab"),
    pytest.param("# only a comment\n", 1, "hosts", "the file is empty", id="empty"),
    pytest.param("- a\n- b\n", 1, None, "indent the list under `hosts:`", id="top-list"),
    pytest.param("just text\n", 1, None, "top level must be a mapping", id="top-scalar"),
    pytest.param("hosts:\n  - host: a\n    engnes: 2\n", 3, "engnes",
                 "unknown key 'engnes' (did you mean 'engines'?)", id="unknown-host-key"),
    pytest.param("defaults:\n  colour: red\nhosts: [a]\n", 2, "colour",
                 "unknown key 'colour'; allowed here: engines,", id="unknown-defaults-key"),
    pytest.param("name: x\nhots: [a]\n", 2, "hots", "(did you mean 'hosts'?)",
                 id="unknown-top-key"),
    pytest.param("hosts: [a]\nengines: 4\n", 2, "engines",
                 "'engines' goes under `defaults:` or in a host entry", id="setting-at-top"),
    pytest.param("hosts:\n  - host: a\n    port: abc\n", 3, "port",
                 "'port' must be an integer from 1 to 65535, got 'abc'", id="port-type"),
    pytest.param("hosts:\n  - host: a\n    port: 70000\n", 3, "port", "got 70000",
                 id="port-range"),
    pytest.param("hosts:\n  - host: a\n    port: true\n", 3, "port", "got true",
                 id="port-bool"),
    pytest.param("defaults:\n  restart_limit: yes\nhosts: [a]\n", 2, "restart_limit",
                 "got true (YAML reads it as a boolean)", id="limit-bool"),
    pytest.param("defaults:\n  engines: true\nhosts: [a]\n", 2, "engines",
                 "'engines' must be a positive integer or \"auto\", got true", id="engines-bool"),
    pytest.param("defaults:\n  engines: 0\nhosts: [a]\n", 2, "engines", "got 0",
                 id="engines-zero"),
    pytest.param("defaults:\n  engines: \"4\"\nhosts: [a]\n", 2, "engines", "got '4'",
                 id="engines-quoted"),
    pytest.param("defaults:\n  engines: [1]\nhosts: [a]\n", 2, "engines", "got a list",
                 id="engines-list"),
    pytest.param("defaults:\n  idle_timeout: -1\nhosts: [a]\n", 2, "idle_timeout",
                 "'idle_timeout' must be a number of seconds >= 0, got -1", id="idle-negative"),
    pytest.param("defaults:\n  connect_timeout: 0\nhosts: [a]\n", 2, "connect_timeout",
                 "must be a number of seconds > 0, got 0", id="connect-zero"),
    pytest.param("defaults:\n  openssh_lane: \"yes\"\nhosts: [a]\n", 2, "openssh_lane",
                 "'openssh_lane' must be true or false, got 'yes'", id="openssh-lane-text"),
    pytest.param("defaults:\n  python: ''\nhosts: [a]\n", 2, "python",
                 "'python' must be a non-empty string, got ''", id="python-empty"),
    pytest.param("defaults:\n  python:\nhosts: [a]\n", 2, "python", "got null",
                 id="python-null"),
    pytest.param("defaults:\n  transport: telnet\nhosts: [a]\n", 2, "transport",
                 "'transport' must be ssh or local, got 'telnet'", id="transport"),
    pytest.param("defaults:\n  backend: libssh\nhosts: [a]\n", 2, "backend",
                 "must be asyncssh or paramiko", id="backend"),
    pytest.param("hosts:\n  - host: a\n    restart: always\n", 3, "restart",
                 "'restart' must be \"no\" or \"on-failure\", got 'always'", id="restart"),
    pytest.param("hosts:\n  - host: a\n    restart: yes\n", 3, "restart",
                 "got true (YAML reads it as a boolean)", id="restart-yes"),
    pytest.param("hosts:\n  - host: a\n    identity_file: [~/k, 3]\n", 3, "identity_file",
                 "must be a path or a list of paths, got 3", id="identity-file"),
    pytest.param("hosts:\n  - host: a\n    env: [A]\n", 3, "env",
                 "'env' must be a mapping of NAME: value, got a list", id="env-type"),
    pytest.param("hosts:\n  - host: a\n    env:\n      OK: 1\n      1BAD: x\n", 5, "env",
                 "env name '1BAD' is not a valid variable name", id="env-name"),
    pytest.param("hosts:\n  - host: a\n    env:\n      EMPTY:\n", 4, "env",
                 'write EMPTY: "" for an empty value', id="env-null"),
    pytest.param("hosts:\n  - host: a\n    env:\n      L: [1]\n", 4, "env",
                 "env value of L must be a string, number or boolean, got a list",
                 id="env-list"),
    pytest.param("name: x\n", 1, "hosts", "missing `hosts:`", id="missing-hosts"),
    pytest.param("name: x\nhosts: []\n", 2, "hosts", "'hosts' is empty", id="empty-hosts"),
    pytest.param("name: x\nhosts:\n", 2, "hosts", "'hosts' is empty", id="null-hosts"),
    pytest.param("hosts: node1\n", 1, "hosts",
                 "'hosts' must be a list of host names or mappings, got 'node1'",
                 id="hosts-scalar"),
    pytest.param("hosts:\n  - a\n  - [b, c]\n", 3, "hosts",
                 "each item under `hosts:` must be a host name", id="host-item-list"),
    pytest.param("hosts:\n  - a\n  - engines: 2\n    user: x\n", 3, "host",
                 "host entry has no 'host' key; add `host: ", id="host-missing"),
    pytest.param("hosts:\n  - a\n  - node1:\n", 3, "host",
                 "write `- node1` without the colon", id="host-with-colon"),
    pytest.param("hosts:\n  - a\n  - {}\n", 3, "host", "host entry has no 'host' key",
                 id="host-empty-mapping"),
    pytest.param("hosts:\n  - hots: a\n", 2, "hots", "unknown key 'hots' (did you mean 'host'?)",
                 id="host-typo"),
    pytest.param("hosts:\n  - host: 42\n", 2, "host", "got 42", id="host-int"),
    pytest.param("hosts:\n  - alice@node1\n", 2, "host",
                 "write `host: node1` and `user: alice`", id="host-with-user"),
    pytest.param("defaults:\n  host: a\nhosts: [a]\n", 2, "host",
                 "'host' cannot go under `defaults:`", id="host-in-defaults"),
    pytest.param("hosts:\n  - host: a\n    port: 22\n    port: 23\n", 4, "port",
                 "duplicate key 'port' (first set on line 3)", id="duplicate-host-key"),
    pytest.param("hosts: [a]\nname: x\nhosts: [b]\n", 3, "hosts",
                 "duplicate key 'hosts' (first set on line 1)", id="duplicate-top-key"),
    pytest.param("defaults:\n  env:\n    A: 1\n    A: 2\nhosts: [a]\n", 4, "A",
                 "duplicate key 'A' (first set on line 3)", id="duplicate-env-key"),
    pytest.param("hosts:\n  - node1\n  - node2\n  - host: node1\n", 4, "host",
                 "host 'node1' is listed twice (lines 2 and 4)", id="duplicate-host"),
    pytest.param("name: my lab\nhosts: [a]\n", 1, "name",
                 "'name' must be letters, digits, '_', '.' and '-' only, got 'my lab'",
                 id="bad-name"),
    pytest.param("x: &d {engines: 2}\nhosts: [a]\n", 1, "x", "unknown key 'x'",
                 id="unknown-anchor-holder"),
    pytest.param("defaults: &d {engines: 2}\nhosts:\n  - <<: *d\n    host: a\n", 3, "<<",
                 "merge keys ('<<') are not supported", id="merge-key"),
    pytest.param("hosts:\n  - host: a\n    port: !!binary AAAA\n", 3, "port",
                 "must be an integer", id="odd-tag"),
    pytest.param("hosts:\n  - host: a\n    port: !custom 22\n", 3, "port",
                 "got '22' tagged !custom (remove the tag)", id="unknown-tag"),
]


@pytest.mark.parametrize(("text", "line", "key", "fragment"), ERRORS)
def test_errors_name_file_line_and_key(tmp_path: Path, text: str, line: int, key: str | None,
                                       fragment: str) -> None:
    err = load_error(tmp_path, text)
    assert err.file == str(tmp_path / "hosts.yaml")
    assert err.line == line
    assert err.key == key
    assert f"hosts.yaml:{line}: " in str(err)
    assert fragment in str(err)


def test_unknown_key_message_is_exact(tmp_path: Path) -> None:
    err = load_error(tmp_path, "hosts:\n  - host: a\n    engnes: 2\n")
    assert err.message == "unknown key 'engnes' (did you mean 'engines'?)"
    assert str(err) == f"{tmp_path / 'hosts.yaml'}:3: {err.message}"


def test_bad_stem_needs_a_name(tmp_path: Path) -> None:
    err = load_error(tmp_path, "hosts: [a]\n", name="my hosts.yaml")
    assert (err.line, err.key) == (1, "name")
    assert "add `name: ...`" in str(err)
    assert load(tmp_path, "name: ok\nhosts: [a]\n", name="my hosts.yaml").name == "ok"


def test_errors_pickle(tmp_path: Path) -> None:
    err = load_error(tmp_path, "hosts:\n  - host: a\n    engnes: 2\n")
    copy = pickle.loads(pickle.dumps(err))
    assert (str(copy), copy.line, copy.key, copy.file) == (str(err), 3, "engnes", err.file)


@settings(max_examples=300, deadline=None)
@given(st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2, 70000), st.floats(), st.text(max_size=6),
              st.sampled_from(["auto", "none", "no", "on-failure", "a@b", "<<"])),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["name", "defaults", "hosts", "host", "engines", "port",
                                         "env", "restart", "known_hosts", "identity_file", "x"]),
                        inner, max_size=4)),
    max_leaves=16))
def test_any_document_gives_a_spec_or_a_config_error(document: object) -> None:
    try:
        spec = parse_hosts(yaml.safe_dump(document), "f.yaml")
    except ConfigError as err:
        assert err.file == "f.yaml"
        assert err.line is None or err.line >= 1
    else:
        assert spec.hosts and all(isinstance(h, HostSpec) for h in spec.hosts)
