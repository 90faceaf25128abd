"""The core, end to end: hosts file -> real sshd -> engines -> Client/DirectView/AsyncResult."""

from __future__ import annotations

import datetime
import os
import pickle
import threading
from pathlib import Path

import pytest

import sshpar as p
from tests.helpers import engine_pids, running_client, socket_paths, wait_gone

pytestmark = pytest.mark.ssh


@pytest.fixture(scope="module")
def rc(sshd_session, tmp_path_factory):
    with running_client(sshd_session, tmp_path_factory.mktemp("core")) as client:
        yield client


@pytest.fixture
def e0(rc):
    view = rc[0]
    view.block = True
    return view


def test_ids_and_views(rc):
    assert rc.ids == [0, 1]
    assert len(rc) == 2
    assert rc[0].targets == 0
    assert rc[:].apply_sync(os.getpid) == [i.pid for i in rc.engine_info.values()]
    assert len(set(rc[:].apply_sync(os.getpid))) == 2
    assert rc[1:].apply_sync(int, "7") == [7]
    assert rc[[1, 0]].apply_sync(os.getpid) == list(reversed(rc[:].apply_sync(os.getpid)))
    assert rc[-1].apply_sync(os.getpid) == rc[1].apply_sync(os.getpid)
    with pytest.raises(IndexError, match="no engine 5"):
        rc[5]


def test_engines_are_remote_processes(rc):
    assert os.getpid() not in rc[:].apply_sync(os.getpid)


def test_apply_forms(rc, e0):
    def f(x, y=1, *, z=0):
        return x * 100 + y * 10 + z

    assert e0.apply(f, 1, y=2, z=3) == 123
    assert e0.apply_sync(f, 4) == 410
    ar = e0.apply_async(f, 5, z=9)
    assert isinstance(ar, p.AsyncResult)
    assert ar.get(timeout=30) == 519
    view = rc[0]
    view.block = False
    assert isinstance(view.apply(f, 1), p.AsyncResult)
    assert view.apply(f, 1).get(30) == 110


def test_execute_push_pull_dict_interface(e0):
    e0.execute("import math\nx = math.factorial(5)")
    assert e0.pull("x") == 120
    e0.push(dict(a=1.03234, b=3453))
    assert e0.pull("a") == 1.03234
    assert e0.pull(("a", "b")) == [1.03234, 3453]
    ar = e0.pull("a", block=False)
    assert ar.get(30) == 1.03234
    e0["c"] = ["foo", "bar"]
    assert e0["c"] == ["foo", "bar"]
    assert e0.get("c") == ["foo", "bar"]
    e0.update({"d": 4})
    assert e0.get(("c", "d")) == [["foo", "bar"], 4]


def test_multi_engine_push_pull(rc):
    dv = rc[:]
    dv.block = True
    dv.push({"k": 3})
    assert dv.pull("k") == [3, 3]
    dv.execute("k = k * 2")
    assert dv["k"] == [6, 6]


def test_namespace_is_globals_of_interactive_functions(e0):
    ns: dict = {"__name__": "__main__"}
    exec("def mul_by_a(b):\n    return a * b\n"
         "def inc_a(increment):\n    global a\n    a = a + increment\n", ns)
    e0["a"] = 10
    assert e0.apply(ns["mul_by_a"], 2) == 20
    e0.apply(ns["inc_a"], 5)
    assert e0["a"] == 15


def test_async_result_api(rc, e0):
    import time as _t

    release = rc[0].apply_async(_t.sleep, 0)
    assert release.get(30) is None
    ar = e0.apply_async(pow, 2, 10)
    assert ar.wait(30) is True
    assert ar.ready()
    assert ar.successful()
    assert ar.get() == 1024
    assert ar.result() == 1024  # concurrent.futures.Future API
    assert ar.exception() is None
    md = ar.metadata
    keys = {"after", "completed", "engine_id", "engine_uuid", "follow", "msg_id", "received",
            "started", "status", "stderr", "stdout", "submitted"}
    assert keys <= set(md)
    assert md["status"] == "ok"
    assert md["engine_id"] == 0
    assert md["msg_id"] == ar.msg_ids[0]
    assert md["engine_uuid"] == rc.engine_info[0].uuid
    times = [md[k] for k in ("submitted", "started", "completed", "received")]
    assert all(isinstance(t, datetime.datetime) and t.tzinfo is not None for t in times)
    assert times == sorted(times)


def test_get_timeout_raises_builtin_timeout(rc, tmp_path):
    flag = tmp_path / "release"
    ns: dict = {"__name__": "__main__"}
    exec("def wait_for(path):\n"
         "    import os, time\n"
         "    deadline = time.monotonic() + 60\n"
         "    while not os.path.exists(path) and time.monotonic() < deadline:\n"
         "        time.sleep(0.01)\n"
         "    return os.path.exists(path)\n", ns)
    ar = rc[1].apply_async(ns["wait_for"], str(flag))
    with pytest.raises(p.TimeoutError) as info:
        ar.get(0.05)
    assert isinstance(info.value, TimeoutError)
    assert not ar.ready()
    with pytest.raises(ValueError):
        ar.successful()
    flag.touch()
    assert ar.get(30) is True


def test_stdout_stderr_captured(e0):
    def noisy():
        import sys

        print("to out")
        print("to err", file=sys.stderr)
        return 1

    ar = e0.apply_async(noisy)
    assert ar.get(30) == 1
    assert ar.stdout == "to out\n"
    assert ar.stderr == "to err\n"
    assert ar.metadata["stdout"] == "to out\n"


def test_remote_error_single_engine(rc, e0):
    with pytest.raises(p.RemoteError) as info:
        e0.execute("1/0")
    err = info.value
    assert err.ename == "ZeroDivisionError"
    assert "division by zero" in err.evalue
    assert "ZeroDivisionError" in err.traceback
    assert "1/0" in err.traceback
    assert err.engine_info.engine_id == 0
    assert err.engine_info.pid == rc.engine_info[0].pid
    assert "ZeroDivisionError" in str(err)
    clone = pickle.loads(pickle.dumps(err))
    assert (clone.ename, clone.evalue, clone.traceback) == (err.ename, err.evalue, err.traceback)
    ar = rc[0].execute("1/0", block=False)
    with pytest.raises(p.RemoteError):
        ar.get(30)
    assert ar.metadata["status"] == "error"
    assert not ar.successful()


def test_composite_error_multi_engine(rc):
    with pytest.raises(p.CompositeError) as info:
        rc[:].execute("raise ValueError('bad')", block=True)
    err = info.value
    assert isinstance(err, p.RemoteError)
    assert [e.ename for e in err.elist] == ["ValueError", "ValueError"]
    assert sorted(e.engine_info.engine_id for e in err.elist) == [0, 1]
    clone = pickle.loads(pickle.dumps(err))
    assert len(clone.elist) == 2


def test_unpicklable_argument_fails_locally(e0):
    lock = threading.Lock()
    with pytest.raises(p.SerializationError, match="argument 1 of len"):
        e0.apply(len, lock)
    with pytest.raises(TypeError):
        e0.apply(len, lock)
    assert e0.apply(len, [1, 2]) == 2  # nothing was sent; the engine is fine


def test_numpy_round_trip(e0):
    np = pytest.importorskip("numpy")
    a = np.arange(300_000, dtype=np.float64)
    e0.push({"arr": a})
    b = e0.pull("arr")
    assert b.dtype == a.dtype and (a == b).all()
    assert b.flags.writeable
    assert e0.apply(lambda x: float(x.sum()), a) == float(a.sum())


@pytest.mark.parametrize("has_cryptography", [True, False], ids=["poly1305", "hmac"])
def test_large_arrays_travel_signed_with_poly1305_or_without_cryptography_hmac(
        sshd_session, tmp_path, has_cryptography):
    np = pytest.importorskip("numpy")
    extra = {}
    if not has_cryptography:  # an engine host whose Python has no cryptography package
        hidden = tmp_path / "no-cryptography"
        (hidden / "cryptography").mkdir(parents=True)
        (hidden / "cryptography" / "__init__.py").write_text(
            "raise ImportError('no cryptography on this host')\n")
        extra = {"env": {"PYTHONPATH": str(hidden)}}
    with running_client(sshd_session, tmp_path, engines=1, **extra) as rc:
        assert rc.engine_status()[0]["bulk_mac"] == ("poly1305" if has_cryptography
                                                      else "hmac-sha256")
        e0 = rc[0]
        e0.block = True
        a = np.random.default_rng(7).random(3 << 20)        # 24 MiB: bulk frames both ways
        e0.push({"a": a})
        assert e0.apply(lambda: float(a.sum())) == float(a.sum())
        back = e0.pull("a")
        assert (back == a).all() and back.flags.writeable


def test_close_leaves_engines_running_and_shutdown_stops_them(sshd_session, tmp_path):
    hosts = sshd_session.hosts_yaml(tmp_path / "h.yaml", engines=1, workdir=tmp_path / "w")
    client = p.Client(hosts=hosts)
    pids = engine_pids(client)
    sockets = socket_paths(client)
    client.close()
    client.close()  # idempotent
    assert all(Path(f"/proc/{pid}").exists() for pid in pids)
    assert all(Path(s).exists() for s in sockets)
    for pid in pids:
        os.kill(pid, 15)
    wait_gone(pids)

    client = p.Client(hosts=hosts)
    pids = engine_pids(client)
    sockets = socket_paths(client)
    client.shutdown()
    client.shutdown()  # idempotent
    wait_gone(pids)
    assert not any(Path(s).exists() for s in sockets)


def test_runtime_dir_and_socket_modes(rc):
    for sock in socket_paths(rc):
        assert os.stat(sock).st_mode & 0o777 == 0o600
        assert os.stat(os.path.dirname(sock)).st_mode & 0o777 == 0o700


def test_two_hosts_start_concurrently(sshd_factory, tmp_path):
    a, b = sshd_factory(), sshd_factory()
    hosts_a = a.hosts_yaml(tmp_path / "a.yaml", engines=1, workdir=tmp_path / "wa")
    doc = hosts_a.read_text()
    # one hosts file, two entries: the second host is b (its own port, key and known_hosts)
    import yaml

    spec = yaml.safe_load(doc)
    d = spec["defaults"]
    spec["hosts"] = [
        {"host": "127.0.0.1", "port": a.port},
        {"host": "localhost", "port": b.port, "known_hosts": str(b.known_hosts_path),
         "identity_file": str(b.client_key_path)},
    ]
    d.pop("port")
    # b's known_hosts names 127.0.0.1; reach it as "localhost" with a matching entry
    kh = b.known_hosts_path.read_text().replace("[127.0.0.1]", "[localhost]")
    b.known_hosts_path.write_text(kh)
    hosts = tmp_path / "two.yaml"
    hosts.write_text(yaml.safe_dump(spec))
    client = p.Client(hosts=hosts)
    try:
        assert client.ids == [0, 1]
        labels = [client.engine_info[i].host for i in client.ids]
        assert labels[0] != labels[1]
        assert client[:].apply_sync(pow, 3, 2) == [9, 9]
    finally:
        pids = engine_pids(client)
        client.shutdown()
        wait_gone(pids)
