"""The rest of the direct interface, over real SSH: run, decorators, Reference, imports, map,
scatter/gather, live output and the full AsyncResult."""

from __future__ import annotations

import asyncio
import io
import os
import shutil

import numpy
import pytest

import sshpar as p
from tests.helpers import engine_pids, interactive, running_client, wait_gone, wait_until

pytestmark = pytest.mark.ssh


HOLD = interactive("""
    def hold(path, value=None, message=None):
        import os, sys, time
        if message:
            print(message)
            sys.stdout.flush()
        deadline = time.monotonic() + 60
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.01)
        return value
""")["hold"]


@pytest.fixture(scope="module")
def rc(sshd_session, tmp_path_factory):
    with running_client(sshd_session, tmp_path_factory.mktemp("direct")) as client:
        yield client


@pytest.fixture
def dv(rc):
    view = rc[:]
    view.block = True
    return view


# -- run() --------------------------------------------------------------------------------------

def test_run_sets_file_and_tracebacks_name_the_script(rc, tmp_path):
    script = tmp_path / "job.py"
    script.write_text("seen_file = __file__\n\ndef boom():\n    raise KeyError('k')\n")
    e1 = rc[1]
    e1.run(script, block=True)
    assert e1["seen_file"] == str(script)
    with pytest.raises(p.RemoteError) as info:
        e1.execute("boom()", block=True)
    assert f'File "{script}", line 4, in boom' in info.value.traceback
    assert "raise KeyError('k')" in info.value.traceback


def test_run_missing_file_is_local_error(rc, tmp_path):
    with pytest.raises(FileNotFoundError):
        rc[0].run(tmp_path / "nope.py")


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                    reason="needs root and unshare(1) for a private mount namespace")
def test_run_uploads_when_the_host_cannot_see_our_files(sshd_factory, tmp_path):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    script = scripts / "myscript.py"
    script.write_text("def mysquare(x):\n    return x*x\nwhere = __file__\n")
    # sshd (and so the engine) lives in a mount namespace where `scripts` is an empty tmpfs
    hide = ("unshare", "-m", "--propagation", "private", "sh", "-c",
            'mount -t tmpfs tmpfs "$0" && exec "$@"', str(scripts))
    server = sshd_factory(wrap=hide)
    hosts = server.hosts_yaml(tmp_path / "h.yaml", engines=1, workdir=tmp_path / "w")
    client = p.Client(hosts=hosts)
    try:
        e0 = client[0]
        e0.block = True
        assert e0.apply(os.path.exists, str(script)) is False  # the engine cannot see it
        e0.run(str(script))
        e0["a"] = 7
        e0.execute("b = mysquare(a)")
        assert e0["b"] == 49
        assert e0["where"] == str(script)
    finally:
        pids = engine_pids(client)
        client.shutdown()
        wait_gone(pids)


# -- decorators ---------------------------------------------------------------------------------

def test_remote_on_many_engines(dv):
    @dv.remote(block=True)
    def pid():
        import os
        return os.getpid()

    pids = pid()
    assert len(pids) == 2 and len(set(pids)) == 2

    @dv.remote(block=False)
    def add(a, b):
        return a + b

    assert add(1, 2).get(30) == [3, 3]


def test_parallel_decorator(dv):
    @dv.parallel(block=True)
    def pmul(a, b):
        return a * b

    a = numpy.arange(10.0)
    assert (pmul(a, a) == a * a).all()
    assert pmul.map([1, 2, 3], [4, 5, 6]) == [4, 10, 18]

    @dv.parallel(block=True)
    def chunk_len(xs):
        return [len(xs)]

    assert chunk_len(list(range(5))) == [3, 2]


# -- namespace, Reference, require/depend ----------------------------------------------------------

def test_reference_nested_and_missing(rc):
    e0 = rc[0]
    e0.block = True
    e0["a"] = 3
    ra = p.Reference("a")
    echo = interactive("def echo(*args, **kw):\n    return args, kw\n")["echo"]
    assert e0.apply(echo, [ra, (ra,)], k={"x": ra}) == (([3, (3,)],), {"k": {"x": 3}})
    with pytest.raises(p.RemoteError) as info:
        e0.apply(echo, p.Reference("not_there"))
    assert info.value.ename == "NameError"
    assert "not_there" in info.value.evalue


def test_depend(rc):
    e0 = rc[0]
    e0.block = True

    def on_engine_with(name):
        import os
        return os.environ.get(name) is not None

    @p.depend(on_engine_with, "PATH")
    def ok():
        return "ran"

    assert e0.apply(ok) == "ran"

    @p.depend(on_engine_with, "SSHPAR_SURELY_UNSET")
    def never():
        return "ran"

    with pytest.raises(p.UnmetDependencyError):
        e0.apply(never)


def test_sync_imports_forms(dv, capsys):
    with dv.sync_imports():
        import json as js
        import xml.dom  # noqa: F401 - used remotely below
        from math import sqrt
        from os import path as osp
    out = capsys.readouterr().out
    assert "importing json as js on engine(s)" in out
    assert "importing path as osp from os on engine(s)" in out
    assert "importing sqrt from math on engine(s)" in out
    dv.execute("names = (js.__name__, osp.__name__, xml.dom.__name__, sqrt(9))")
    assert dv["names"] == [("json", osp.__name__, "xml.dom", 3.0)] * 2
    assert js and sqrt(4) == 2.0  # imported locally too


def test_sync_imports_quiet_and_remote_only(dv, capsys):
    with dv.sync_imports(local=False, quiet=True):
        import colorsys
    assert capsys.readouterr().out == ""
    with pytest.raises(RuntimeError):
        colorsys.rgb_to_hsv(1, 0, 0)  # a placeholder here
    hsv = interactive("def hsv():\n    return colorsys.rgb_to_hsv(1, 0, 0)\n",
                      colorsys=colorsys)["hsv"]
    assert dv.apply(hsv) == [(0.0, 1.0, 1.0)] * 2


# -- map, scatter, gather --------------------------------------------------------------------------

def test_map_forms(dv):
    square = interactive("def square(x):\n    return x * x\n")["square"]
    assert dv.map(square, range(7)) == [x * x for x in range(7)]
    assert dv.map_sync(pow, [2, 3, 4], [2, 2, 2]) == [4, 9, 16]
    ar = dv.map_async(square, range(5))
    assert isinstance(ar, p.AsyncResult)
    assert list(ar) == [0, 1, 4, 9, 16]
    assert ar.get(30) == [0, 1, 4, 9, 16]
    assert list(dv.imap(str, [1, 2, 3])) == ["1", "2", "3"]
    assert dv.map(square, []) == []
    assert dv.map(square, [5]) == [25]
    with pytest.raises(ValueError, match="differ in length"):
        dv.map(pow, [1, 2], [1])


def test_map_sees_engine_namespace(dv):
    dv["offset"] = 100
    add = interactive("def add(x):\n    return x + offset\n")["add"]
    assert dv.map(add, [1, 2, 3]) == [101, 102, 103]


def test_map_async_iterates_as_parts_arrive(rc, tmp_path):
    gate = tmp_path / "second"
    dv = rc[:]
    ns = interactive("""
        def slow_on_second(x, gate):
            import os, time
            if x >= 2:
                deadline = time.monotonic() + 60
                while not os.path.exists(gate) and time.monotonic() < deadline:
                    time.sleep(0.01)
            return x
    """)
    ar = dv.map_async(ns["slow_on_second"], [0, 1, 2, 3], [str(gate)] * 4)
    it = iter(ar)
    assert [next(it), next(it)] == [0, 1]  # the first engine's part, while the second waits
    assert not ar.ready()
    gate.touch()
    assert list(it) == [2, 3]


def test_scatter_gather(dv):
    dv.scatter("x", list(range(7)))
    assert dv["x"] == [[0, 1, 2, 3], [4, 5, 6]]
    assert dv.gather("x") == list(range(7))
    a = numpy.arange(12.0).reshape(6, 2)
    dv.scatter("arr", a)
    parts = dv["arr"]
    assert [part.shape for part in parts] == [(3, 2), (3, 2)]
    assert (dv.gather("arr") == a).all()
    dv.scatter("one", [10, 20], flatten=True)
    assert dv["one"] == [10, 20]
    ar = dv.gather("x", block=False)
    assert ar.get(30) == list(range(7))


# -- output -------------------------------------------------------------------------------------

def test_output_streams_live_and_is_complete_at_get(rc, tmp_path):
    gate = tmp_path / "go"
    ar = rc[0].apply_async(HOLD, str(gate), 1, "started")
    wait_until(lambda: ar.stdout == "started\n", what="live stdout")
    assert not ar.ready()
    gate.touch()
    assert ar.get(30) == 1
    assert ar.stdout == "started\n" and ar.metadata["stdout"] == "started\n"


def test_display_outputs(rc):
    shout = interactive("""
        def shout():
            import sys
            print("line one")
            print("line two")
            print("oops", file=sys.stderr)
    """)["shout"]
    ar = rc[:].apply_async(shout)
    ar.get(30)
    buf = io.StringIO()
    ar.display_outputs(file=buf)
    text = buf.getvalue()
    host = rc.engine_info[0].host
    assert f"[engine 0@{host}] line one\n[engine 0@{host}] line two\n" in text
    assert f"[engine 1@{host}] line two" in text
    assert f"[engine 0@{host}] (stderr) oops" in text


# -- AsyncResult --------------------------------------------------------------------------------

def test_async_result_timing_and_progress(rc, tmp_path):
    gate = tmp_path / "go"
    ar = rc[:].apply_async(HOLD, str(gate), 5)
    assert ar.progress == 0
    with pytest.raises(ValueError):
        _ = ar.wall_time
    assert ar.elapsed >= 0
    gate.touch()
    assert ar.get(30) == [5, 5]
    assert ar.progress == 2
    assert ar.wall_time >= ar.serial_time / 2 > 0
    assert ar.get_dict() == {0: 5, 1: 5}


def test_async_result_is_a_future(rc):
    import concurrent.futures

    ar = rc[0].apply_async(pow, 3, 3)
    seen = []
    ar.add_done_callback(lambda f: seen.append(f.result()))
    assert isinstance(ar, concurrent.futures.Future)
    done, _ = concurrent.futures.wait([ar], timeout=30)
    assert done == {ar}
    assert ar.result() == 27
    wait_until(lambda: seen == [27], what="done callback")
    bad = rc[0].apply_async(divmod, 1, 0)
    assert isinstance(bad.exception(30), p.RemoteError)


def test_await_async_result(rc):
    async def main():
        return await rc[0].apply_async(pow, 2, 8), await rc[:].apply_async(pow, 2, 2)

    assert asyncio.run(main()) == (256, [4, 4])

    async def failing():
        await rc[0].apply_async(divmod, 1, 0)

    with pytest.raises(p.RemoteError):
        asyncio.run(failing())


def test_wait_interactive(rc, capsys):
    ar = rc[:].map_async(abs, range(-4, 4))
    assert ar.wait_interactive(interval=0.01, timeout=30) is True
    assert ar.get() == [4, 3, 2, 1, 0, 1, 2, 3]


def test_temp_flags_and_set_flags(rc):
    view = rc[:]
    view.set_flags(block=True)
    assert view.apply(pow, 2, 2) == [4, 4]
    with view.temp_flags(block=False, targets=[1]):
        ar = view.apply(pow, 2, 3)
        assert isinstance(ar, p.AsyncResult)
        assert ar.get(30) == [8]
    assert view.block is True and view.apply(pow, 1, 1) == [1, 1]
    view.set_flags(targets=0)
    assert view.apply(pow, 2, 4) == 16
