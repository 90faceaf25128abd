"""Calls as segments, and the reuse of function pickles (sshpar._serialize).

Functions here are compiled into a namespace named ``__main__``, so cloudpickle sends them by
value with what they capture, as it does for a user's script or notebook.
"""

from __future__ import annotations

import pickle
import threading
from typing import Any

import cloudpickle
import pytest

from sshpar import _serialize
from sshpar.errors import SerializationError


def main_namespace(source: str, **values: Any) -> dict:
    ns: dict[str, Any] = {"__name__": "__main__", **values}
    exec(compile(source, "<user script>", "exec"), ns)
    return ns


def remote_call(f: Any, *args: Any, **kwargs: Any) -> Any:
    """Pickle the call as the client does, rebuild it as the engine does, run it."""
    files: set[str] = set()
    segments = [bytes(s) for s in _serialize.dumps_call(f, args, kwargs, what="f",
                                                         code_files=files)]
    g = pickle.loads(segments[0])                     # the engine: Executor.function
    a, k = _serialize.loads(segments[1:])
    return g(*a, **k)


def test_a_call_round_trips_with_arguments_and_keywords() -> None:
    ns = main_namespace("def f(x, *, y):\n    return x * y\n")
    assert remote_call(ns["f"], 6, y=7) == 42


def test_an_unchanged_function_with_immutable_captures_is_pickled_once() -> None:
    ns = main_namespace("LIMIT = 10\ndef f(x):\n    return min(x, LIMIT)\n")
    first = _serialize.dumps_call(ns["f"], (1,), {}, what="f", code_files=set())[0]
    again = _serialize.dumps_call(ns["f"], (2,), {}, what="f", code_files=set())[0]
    assert again is first


def test_a_rebound_global_is_seen_by_the_next_call() -> None:
    ns = main_namespace("scale = 2\ndef f(x):\n    return x * scale\n")
    assert remote_call(ns["f"], 5) == 10
    ns["scale"] = 3
    assert remote_call(ns["f"], 5) == 15


def test_a_mutated_container_global_is_seen_by_the_next_call() -> None:
    ns = main_namespace("seen = [1]\ndef f():\n    return list(seen)\n")
    assert remote_call(ns["f"]) == [1]
    ns["seen"].append(2)
    assert remote_call(ns["f"]) == [1, 2]


def test_a_function_capturing_arrays_is_one_segment_the_engine_can_unpickle() -> None:
    # numpy pickles arrays out of band when it may; the engine unpickles a function on its
    # own, so whatever the function captures must travel inside its pickle.
    np = pytest.importorskip("numpy")
    table = np.arange(100_000, dtype=np.float64)
    ns = main_namespace("def f(i):\n    return float(TABLE[i] + local[0])\n", TABLE=table)
    ns["local"] = np.array([0.5])
    assert remote_call(ns["f"], 7) == 7.5

    def closure(i: int) -> float:
        return float(table[i])

    assert remote_call(closure, 99_999) == 99_999.0


def test_a_changed_closure_cell_is_seen_by_the_next_call() -> None:
    ns = main_namespace(
        "def make():\n"
        "    n = 1\n"
        "    def f():\n"
        "        return n\n"
        "    def bump():\n"
        "        nonlocal n\n"
        "        n += 1\n"
        "    return f, bump\n")
    f, bump = ns["make"]()
    assert remote_call(f) == 1
    bump()
    assert remote_call(f) == 2


def test_a_redefined_helper_is_seen_by_the_function_that_calls_it() -> None:
    ns = main_namespace("def helper():\n    return 'old'\ndef f():\n    return helper()\n")
    assert remote_call(ns["f"]) == "old"
    exec("def helper():\n    return 'new'\n", ns)
    assert remote_call(ns["f"]) == "new"


def test_changed_defaults_are_seen_by_the_next_call() -> None:
    ns = main_namespace("def f(x=1):\n    return x\n")
    assert remote_call(ns["f"]) == 1
    ns["f"].__defaults__ = (2,)
    assert remote_call(ns["f"]) == 2


def test_an_unpicklable_argument_is_a_serialization_error() -> None:
    ns = main_namespace("def f(x):\n    return x\n")
    with pytest.raises(SerializationError, match="cannot pickle the arguments"):
        _serialize.dumps_call(ns["f"], (threading.Lock(),), {}, what="f", code_files=set())


def test_an_unpicklable_capture_names_the_function() -> None:
    ns = main_namespace("def f():\n    return guard\n", guard=threading.Lock())
    with pytest.raises(SerializationError, match="cannot pickle the function f"):
        _serialize.dumps_call(ns["f"], (), {}, what="the function f", code_files=set())


def test_code_files_are_reported_on_every_call_even_when_reused() -> None:
    ns = main_namespace("def f():\n    return 1\n")
    for _ in range(2):
        files: set[str] = set()
        _serialize.dumps_call(ns["f"], (), {}, what="f", code_files=files)
        assert files == {"<user script>"}


@pytest.mark.parametrize("value", [None, True, 7, 10**40, -0.0, 2.5, 1 + 2j, "text", "",
                                   (1, "a", None), ((1, 2.0), {"k": "v"}), ((), {})])
def test_plain_values_pickle_to_the_same_bytes_as_cloudpickle(value) -> None:
    assert _serialize.dumps(value) == [cloudpickle.dumps(value, protocol=5)]
    assert _serialize.loads(_serialize.dumps(value)) == value


def test_values_that_are_not_plain_still_go_through_cloudpickle() -> None:
    import numpy

    a = numpy.arange(1000.0)
    segments = _serialize.dumps((a, {"k": [1, 2]}))
    assert len(segments) == 2                       # the array's buffer out of band
    back, d = _serialize.loads(segments)
    assert numpy.array_equal(back, a) and d == {"k": [1, 2]}
