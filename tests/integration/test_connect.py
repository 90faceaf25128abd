"""Connecting and bootstrapping: every failure is a specific error naming the host and the fix."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import sshpar as p
from sshpar._bootstrap import build_bundle
from sshpar.config import local_cluster
from tests.helpers import engine_pids, wait_gone

pytestmark = pytest.mark.ssh


def _hosts(server, tmp_path, name="h.yaml", **extra):
    path = server.hosts_yaml(tmp_path / name, engines=1, workdir=tmp_path / "w")
    if extra:
        doc = yaml.safe_load(path.read_text())
        for key, value in extra.items():
            if value is None:
                doc["defaults"].pop(key, None)
            else:
                doc["defaults"][key] = value
        path.write_text(yaml.safe_dump(doc))
    return path


def _run_and_stop(hosts):
    rc = p.Client(hosts=hosts)
    try:
        return rc[0].apply_sync(os.getpid), rc
    finally:
        pids = engine_pids(rc)
        rc.shutdown()
        wait_gone(pids)


def test_wrong_host_key_is_refused(sshd_session, tmp_path):
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    kh = tmp_path / "known_hosts"
    pub = (other.with_suffix(".pub")).read_text().split()[:2]
    kh.write_text(f"[127.0.0.1]:{sshd_session.port} {' '.join(pub)}\n")
    hosts = _hosts(sshd_session, tmp_path, known_hosts=str(kh))
    with pytest.raises(p.HostKeyError) as info:
        p.Client(hosts=hosts)
    assert "127.0.0.1" in str(info.value)
    assert "known_hosts" in str(info.value)


def test_unknown_host_key_is_refused(sshd_session, tmp_path):
    kh = tmp_path / "empty_known_hosts"
    kh.write_text("")
    with pytest.raises(p.HostKeyError):
        p.Client(hosts=_hosts(sshd_session, tmp_path, known_hosts=str(kh)))


def test_known_hosts_none_is_explicit_and_warns(sshd_session, tmp_path, caplog):
    hosts = _hosts(sshd_session, tmp_path, known_hosts="none")
    with caplog.at_level(logging.WARNING, logger="sshpar.transport"):
        pid, _ = _run_and_stop(hosts)
    assert pid != os.getpid()
    assert any("host key checking is OFF" in r.getMessage() for r in caplog.records)


def test_unreachable_port(sshd_session, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    hosts = _hosts(sshd_session, tmp_path, port=port)
    with pytest.raises(p.HostUnreachableError) as info:
        p.Client(hosts=hosts)
    assert f"127.0.0.1:{port}" in str(info.value)


def test_authentication_failure(sshd_session, tmp_path):
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)],
                   check=True)
    with pytest.raises(p.AuthenticationError) as info:
        p.Client(hosts=_hosts(sshd_session, tmp_path, identity_file=str(stranger)))
    assert "identity_file" in str(info.value)


def test_missing_remote_python(sshd_session, tmp_path):
    hosts = _hosts(sshd_session, tmp_path, python="/nonexistent/python3")
    with pytest.raises(p.BootstrapError) as info:
        p.Client(hosts=hosts)
    err = info.value
    assert "python:" in str(err)
    assert "/nonexistent/python3" in err.stderr
    assert err.exit_status == 127


def _other_minor_python() -> str | None:
    mine = "{}.{}".format(*sys.version_info[:2])
    candidates = [shutil.which(f"python3.{m}") for m in range(8, 15)]
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    if root.is_dir():
        candidates += [str(v / "bin" / "python3") for v in sorted(root.iterdir())]
    for c in candidates:
        if not c or not os.access(c, os.X_OK):
            continue
        out = subprocess.run([c, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True)
        version = out.stdout.strip()
        if out.returncode == 0 and version != mine and version.startswith("3."):
            return c
    return None


def test_python_minor_version_mismatch_is_refused(sshd_session, tmp_path):
    other = _other_minor_python()
    if other is None:
        pytest.skip("no Python of another minor version on this machine")
    with pytest.raises(p.PythonVersionError) as info:
        p.Client(hosts=_hosts(sshd_session, tmp_path, python=other))
    text = str(info.value)
    assert "{}.{}".format(*sys.version_info[:2]) in text
    assert "python:" in text


def test_setup_and_env_are_honoured(sshd_session, tmp_path):
    marker = tmp_path / "setup-ran"
    hosts = _hosts(sshd_session, tmp_path, setup=f"export FROM_SETUP=1; touch {marker}",
                   env={"OMP_NUM_THREADS": "1", "SSHPAR_T": "a b"})
    rc = p.Client(hosts=hosts)
    try:
        env = rc[0].apply_sync(lambda: {k: os.environ.get(k) for k in
                                        ("FROM_SETUP", "OMP_NUM_THREADS", "SSHPAR_T")})
        assert env == {"FROM_SETUP": "1", "OMP_NUM_THREADS": "1", "SSHPAR_T": "a b"}
        assert marker.exists()
    finally:
        pids = engine_pids(rc)
        rc.shutdown()
        wait_gone(pids)


def test_bundle_uploaded_once_per_content_hash(sshd_session, tmp_path):
    hosts = _hosts(sshd_session, tmp_path)
    _run_and_stop(hosts)
    bundle = tmp_path / "w" / "bundles" / build_bundle().name
    assert bundle.read_bytes() == build_bundle().data
    before = bundle.stat()
    _run_and_stop(hosts)
    after = bundle.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_relay_fallback_when_streamlocal_is_refused(sshd_factory, tmp_path):
    server = sshd_factory(extra_config="AllowStreamLocalForwarding no\n")
    pid, _ = _run_and_stop(_hosts(server, tmp_path))
    assert pid != os.getpid()


def test_proxy_jump(sshd_factory, tmp_path):
    jump, target = sshd_factory(), sshd_factory()
    # one key for both: authorize the jump host's client key on the target too
    key_pub = Path(str(jump.client_key_path) + ".pub").read_text()
    auth = target.workdir / "authorized_keys"
    auth.write_text(auth.read_text() + key_pub)
    kh = tmp_path / "known_hosts"
    kh.write_text(jump.known_hosts_path.read_text() + target.known_hosts_path.read_text())
    hosts = _hosts(target, tmp_path, identity_file=str(jump.client_key_path),
                   known_hosts=str(kh), proxy_jump=f"{jump.user}@127.0.0.1:{jump.port}")
    before = len(jump.sshd_pids())
    rc = p.Client(hosts=hosts)
    try:
        assert rc[0].apply_sync(pow, 2, 5) == 32
        assert len(jump.sshd_pids()) > before  # the connection went through the jump host
    finally:
        pids = engine_pids(rc)
        rc.shutdown()
        wait_gone(pids)


def test_proxy_jump_host_key_is_checked(sshd_factory, tmp_path):
    jump, target = sshd_factory(), sshd_factory()
    kh = tmp_path / "known_hosts"
    kh.write_text(target.known_hosts_path.read_text())  # the jump host's key is missing
    hosts = _hosts(target, tmp_path, known_hosts=str(kh),
                   proxy_jump=f"{jump.user}@127.0.0.1:{jump.port}")
    with pytest.raises(p.HostKeyError) as info:
        p.Client(hosts=hosts)
    assert str(jump.port) in str(info.value)


def test_local_transport_runs_the_same_engines(tmp_path):
    spec = local_cluster(2, workdir=str(tmp_path / "w"))
    rc = p.Client(hosts=spec)
    try:
        dv = rc[:]
        dv.block = True
        dv.push({"z": 5})
        assert dv.pull("z") == [5, 5]
        assert len(set(dv.apply(os.getpid))) == 2
        with pytest.raises(p.CompositeError):
            dv.execute("1/0")
    finally:
        pids = engine_pids(rc)
        rc.shutdown()
        wait_gone(pids)
