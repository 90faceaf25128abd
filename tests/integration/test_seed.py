"""The user's specification, example by example (../shared/seed/basics-of-remote-execution.txt).

Each test is one passage of the seed, run over a real sshd with `import sshpar as p` in place of
`from IPython import parallel as p`. Functions the seed defines "interactively" are defined here
in a `__main__` namespace (as they would be in IPython), so cloudpickle ships them by value.
"""

from __future__ import annotations

import os
import time

import numpy
import pytest

import sshpar as p
from tests.helpers import interactive, running_client

pytestmark = pytest.mark.ssh




@pytest.fixture(scope="module")
def rc(sshd_session, tmp_path_factory):
    with running_client(sshd_session, tmp_path_factory.mktemp("seed")) as client:
        yield client


@pytest.fixture
def e0(rc):
    e0 = rc[0]  # just one engine
    e0.block = True  # let's be synchronous for now
    return e0


def test_creating_a_client(rc):
    assert rc.ids == [0, 1]


def test_apply_get_norms(e0):
    ns = interactive("""
        def get_norms(A, levels=[2]):
            norms = []
            for level in levels:
                norms.append(numpy.linalg.norm(A, level))
            return norms
    """, numpy=numpy)
    A = numpy.random.random(1024)
    local = ns["get_norms"](A, levels=[1, 2, 3, numpy.inf])
    assert e0.apply(ns["get_norms"], A, levels=[1, 2, 3, numpy.inf]) == local


def test_execute_import_and_sync_imports(e0, capsys):
    e0.execute("import numpy")
    e0.execute("kind = type(numpy).__name__")
    assert e0["kind"] == "module"
    e0.execute("del numpy")
    with e0.sync_imports():
        import numpy  # noqa: F401
    assert "importing numpy on engine(s)" in capsys.readouterr().out
    e0.execute("kind = numpy.__name__")
    assert e0["kind"] == "numpy"


def test_module_functions(e0):
    A = numpy.random.random(1024)
    assert e0.apply(numpy.linalg.norm, A, 2) == pytest.approx(numpy.linalg.norm(A, 2))


def test_run_a_script_then_execute(e0, tmp_path):
    script = tmp_path / "myscript.py"
    script.write_text("import math\nimport numpy\nimport sys\n\n\n"
                      "def mysquare(x):\n    return x*x\n")
    e0["a"] = 5
    e0.run(str(script))
    e0.execute("b=mysquare(a)")
    assert e0["a"] == 5
    assert e0["b"] == 25
    e0.execute("kinds = (math.__name__, sys.__name__, mysquare.__module__)")
    assert e0["kinds"] == ("math", "sys", "__main__")


def test_remote_function_decorator(e0):
    @e0.remote(block=True)
    def getpid():
        import os
        return os.getpid()

    assert getpid() != os.getpid()
    assert getpid() == e0.apply(os.getpid)


def test_engine_namespace_as_globals(e0):
    ns = interactive("""
        def inc_a(increment):
            global a
            a = a+increment

        def mul_by_a(b):
            return a*b
    """)
    e0["a"] = 10
    assert e0.apply(ns["mul_by_a"], 2) == 20
    e0.apply(ns["inc_a"], 1)
    assert e0["a"] == 11


def test_reference(e0):
    ra = p.Reference("a")
    e0["a"] = 10
    ns = interactive("""
        def double(x):
            return x*2
    """)
    double = e0.remote(block=True)(ns["double"])
    assert double(ra) == 20
    e0["a"] = 5
    assert double(ra) == 10
    assert e0.apply(ns["double"], ra) == 10


def test_push_and_pull(e0):
    e0.push(dict(a=1.03234, b=3453))
    assert e0.pull("a") == 1.03234
    assert e0.pull("b") == 3453
    assert e0.pull(("a", "b")) == [1.03234, 3453]
    e0.push(dict(c="speed"))
    ar = e0.pull("a", block=False)
    assert ar.get() == 1.03234
    assert e0["c"] == "speed"


def test_dictionary_interface(e0):
    e0["a"] = ["foo", "bar"]
    assert e0["a"] == ["foo", "bar"]


def test_non_blocking_execution(e0, tmp_path):
    ns = interactive("""
        def wait(t):
            import time
            tic = time.time()
            time.sleep(t)
            return time.time()-tic
    """)
    ar = e0.apply_async(ns["wait"], 0.2)
    assert ar.get() >= 0.2
    gate = tmp_path / "go"
    hold = interactive("""
        def hold(path):
            import os, time
            deadline = time.monotonic() + 60
            while not os.path.exists(path) and time.monotonic() < deadline:
                time.sleep(0.01)
            return 10
    """)
    ar = e0.apply_async(hold["hold"], str(gate))
    assert ar.ready() is False
    with pytest.raises(p.TimeoutError, match="Result not ready"):
        ar.get(1)
    gate.touch()
    assert ar.get(30) == 10


def test_sync_and_async_forms(e0):
    assert e0.apply_sync(pow, 2, 3) == 8
    assert e0.apply_async(pow, 2, 3).get() == 8


def test_metadata(e0):
    ns = interactive("""
        def wait(t):
            import time
            tic = time.time()
            time.sleep(t)
            return time.time()-tic
    """)
    ar = e0.apply_async(ns["wait"], 0.05)
    ar.get()
    md = ar.metadata
    for key in ("after", "completed", "engine_id", "engine_uuid", "follow", "msg_id",
                "received", "started", "status", "stderr", "stdout", "submitted"):
        assert key in md
    assert md["status"] == "ok" and md["engine_id"] == 0
    assert md["after"] == [] and md["follow"] == []
    assert md["submitted"] <= md["started"] <= md["completed"] <= md["received"]


def test_require(e0):
    @p.require("re")
    def findall(pat, x):
        # re is guaranteed to be available
        return re.findall(pat, x)  # noqa: F821

    assert e0.apply(findall, "an", "banana") == ["an", "an"]

    @p.require(time)
    def wait(t):
        time.sleep(t)
        return t

    assert e0.apply(wait, 0) == 0


def test_require_unmet(e0):
    @p.require("no_such_module_here")
    def f():
        return 1

    with pytest.raises(p.UnmetDependencyError) as info:
        e0.apply(f)
    assert isinstance(info.value, p.RemoteError)
    assert info.value.ename == "UnmetDependencyError"
    assert "no_such_module_here" in info.value.evalue


def test_remote_exceptions_blocking(e0):
    with pytest.raises(p.RemoteError) as info:
        e0.execute("1/0", block=True)
    assert info.value.ename == "ZeroDivisionError"
    assert "1/0" in info.value.traceback


def test_remote_exceptions_non_blocking(rc):
    e0 = rc[0]
    e0.block = False
    ar = e0.execute("1/0")
    with pytest.raises(p.RemoteError) as info:
        ar.get()
    assert info.value.ename == "ZeroDivisionError"
    ar = rc[:].execute("1/0", block=False)
    with pytest.raises(p.CompositeError):
        ar.get()
