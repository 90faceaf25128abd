"""The executor keeps functions unpickled only where a fresh unpickle could not differ.

A client sends the same pickle for each call of a function; the engine reuses the function it
unpickled the first time. These tests run the engine's executor in-process (the code an
engine runs, minus its sockets) and check that every call still behaves as if its function
had been unpickled anew.
"""

from __future__ import annotations

import itertools
import textwrap
from typing import Any

import cloudpickle
import pytest

from sshpar import _serialize, _wire
from sshpar._engine.executor import Executor, Task

_ids = itertools.count()


def defined(source: str, name: str, module: str = "__main__") -> Any:
    """A function as if typed at the client's prompt (``module`` ``__main__``) or defined in a
    module sent by value: cloudpickle sends it by value either way."""
    ns: dict[str, Any] = {"__name__": module}
    exec(compile(textwrap.dedent(source), f"<client {name}>", "exec"), ns)  # noqa: S102
    return ns[name]


def call(ex: Executor, f: Any, *args: Any) -> Any:
    """Run ``f(*args)`` as a task whose function came by digest; return its value."""
    payload = _serialize.dumps_call(f, args, {}, what="f", code_files=set())
    task = Task(f"t{next(_ids)}", {}, payload, None, _wire.function_digest(payload[0]))
    ex.run(task)
    assert task.status == "ok", task.error
    return _serialize.loads(task.result)


def test_a_function_whose_pickle_recurs_is_unpickled_once() -> None:
    ex = Executor()
    f = defined("def scaled(x):\n    return x * FACTOR\n", "scaled")
    f.__globals__["FACTOR"] = 3
    data = cloudpickle.dumps(f, protocol=5)
    digest = _wire.function_digest(data)
    first = ex.function(data, digest)
    assert ex.function(data, digest) is first
    assert first(2) == 6
    assert ex.function(data, None) is not first  # no digest: nothing kept


def test_a_kept_function_changed_since_is_unpickled_anew() -> None:
    ex = Executor()
    data = cloudpickle.dumps(defined("def f(x=1):\n    return x\n", "f"), protocol=5)
    digest = _wire.function_digest(data)
    first = ex.function(data, digest)
    first.note = "set by someone"
    first.__defaults__ = (5,)
    again = ex.function(data, digest)
    assert again is not first
    assert again() == 1 and not again.__dict__


def test_names_a_kept_function_brought_are_set_again_at_each_call() -> None:
    ex = Executor()
    f = defined("def get():\n    return LIMIT\n", "get")
    f.__globals__["LIMIT"] = 7
    assert call(ex, f) == 7
    del ex.namespace["LIMIT"]            # the engine lost it: the next call brings it again
    assert call(ex, f) == 7
    ex.namespace["LIMIT"] = 9            # set on the engine (execute/push): the engine's wins
    assert call(ex, f) == 9


def test_a_mutable_default_starts_fresh_at_each_call() -> None:
    ex = Executor()
    f = defined("def collect(x, acc=[]):\n    acc.append(x)\n    return acc\n", "collect")
    assert [call(ex, f, i) for i in range(3)] == [[0], [1], [2]]


def test_a_function_that_refers_to_itself_starts_fresh_at_each_call() -> None:
    ex = Executor()
    f = defined("def count():\n    count.calls = getattr(count, 'calls', 0) + 1\n"
                "    return count.calls\n", "count")
    assert [call(ex, f) for _ in range(3)] == [1, 1, 1]


def test_a_closure_starts_from_the_clients_cells_at_each_call() -> None:
    ex = Executor()
    f = defined("def make():\n    n = 0\n    def bump():\n        nonlocal n\n"
                "        n += 1\n        return n\n    return bump\n", "make")()
    assert [call(ex, f) for _ in range(3)] == [1, 1, 1]


@pytest.mark.parametrize("module", ["__main__", "lab.helpers"])
def test_a_function_writing_globals_starts_from_what_it_brought(module: str) -> None:
    # __main__: its globals are the engine namespace (written there, as before);
    # a module sent by value: its own globals, which a fresh unpickle would reset.
    ex = Executor()
    f = defined("def tick():\n    global ticks\n    ticks = ticks + 1\n    return ticks\n",
                "tick", module)
    f.__globals__["ticks"] = 0
    got = [call(ex, f) for _ in range(3)]
    assert got == ([1, 2, 3] if module == "__main__" else [1, 1, 1])


def test_output_goes_to_the_task_running_when_it_is_written() -> None:
    # A thread that a task leaves behind writes into the task running at the time (as in
    # ipyparallel), not into a finished task's output that nobody will see again.
    ex = Executor()
    start = defined("def start():\n    global go, t\n    import threading\n"
                    "    go = threading.Event()\n"
                    "    t = threading.Thread(target=lambda: (go.wait(30), print('late')))\n"
                    "    t.start()\n    print('first')\n", "start")
    finish = defined("def finish():\n    go.set()\n    t.join(30)\n    print('second')\n",
                     "finish")
    first = Task("t-start", {}, _serialize.dumps_call(start, (), {}, what="f",
                                                      code_files=set()), None)
    ex.run(first)
    second = Task("t-finish", {}, _serialize.dumps_call(finish, (), {}, what="f",
                                                        code_files=set()), None)
    ex.run(second)
    assert first.status == second.status == "ok"
    assert first.result_meta()["stdout"] == "first\n"
    assert second.result_meta()["stdout"] == "late\nsecond\n"
    assert second.result_meta()["stderr"] == ""


def test_references_are_found_in_a_pickle_as_received_and_only_there() -> None:
    from sshpar._markers import Reference, may_hold_references

    ex = Executor()
    ex.namespace["a"] = 7
    echo = defined("def echo(*args, **kw):\n    return args, kw\n", "echo")
    payload = _serialize.dumps_call(echo, ([1, {"x": Reference("a")}],), {"k": (Reference("a"),)},
                                    what="echo", code_files=set())
    assert may_hold_references(memoryview(payload[1]))       # as the wire hands it over
    task = Task(f"t{next(_ids)}", {}, [payload[0], memoryview(payload[1])], None,
                _wire.function_digest(payload[0]))
    ex.run(task)
    assert _serialize.loads(task.result) == (([1, {"x": 7}],), {"k": (7,)})
    plain = _serialize.dumps(([list(range(1000)), "sshpar"], {}), what="args")
    assert not may_hold_references(memoryview(plain[0]))
    assert call(ex, echo, list(range(1000))) == ((list(range(1000)),), {})
