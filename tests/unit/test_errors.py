"""Unit tests for sshpar.errors' remote errors: the dual classes, str(), pickling, the tree."""

from __future__ import annotations

import ast
import builtins
import pickle
import sys
from pathlib import Path

import pytest

import sshpar.errors as errors_module
from sshpar._engine.executor import error_record
from sshpar._markers import require
from sshpar.errors import (
    CompositeError,
    EngineInfo,
    RemoteError,
    SshparError,
    UnmetDependencyError,
)

INFO = EngineInfo(engine_id=0, host="node1", pid=1234, uuid="u-0")


def record_of(exc_factory) -> dict:
    """Raise what ``exc_factory`` builds (chained as it likes) and describe it like an engine."""
    try:
        exc_factory()
    except BaseException as exc:  # noqa: BLE001 - an engine reports whatever was raised
        return error_record(exc)
    raise AssertionError("did not raise")


def divide() -> None:
    1 / 0  # noqa: B018


def chained() -> None:
    try:
        divide()
    except ZeroDivisionError as exc:
        raise ValueError("wrapped") from exc


def raises(exc: BaseException):
    def f() -> None:
        raise exc
    return f


def fake(etype: str, ename: str | None = None, evalue: str = "boom") -> dict:
    ename = ename or etype.rpartition(".")[2]
    return {"ename": ename, "etype": etype, "evalue": evalue, "frames": [], "chain": [],
            "traceback": f"Traceback (most recent call last):\n{ename}: {evalue}\n"}


# -- catching remote errors by their original class ------------------------------------------
def test_except_zero_division_error_catches_the_remote_one() -> None:
    err = RemoteError.from_record(record_of(divide), INFO)
    with pytest.raises(ZeroDivisionError) as info:
        raise err
    caught = info.value
    assert isinstance(caught, RemoteError) and isinstance(caught, ArithmeticError)
    assert caught.remote_class is ZeroDivisionError
    assert (caught.ename, caught.evalue) == ("ZeroDivisionError", "division by zero")
    assert caught.engine_info == INFO
    assert type(caught).__qualname__ == "RemoteError[ZeroDivisionError]"
    assert type(caught).__module__ == "sshpar.errors"


def test_dual_classes_are_cached() -> None:
    a = RemoteError.from_record(record_of(divide), INFO)
    b = RemoteError.from_record(fake("builtins.ZeroDivisionError"))
    assert type(a) is type(b)


def test_os_errors_are_caught_by_their_family() -> None:
    record = record_of(lambda: Path("/nonexistent/sshpar/x").read_text())
    err = RemoteError.from_record(record, INFO)
    assert isinstance(err, FileNotFoundError) and isinstance(err, OSError)
    assert err.errno is None  # the class only, not the remote object's attributes
    assert "No such file or directory" in str(err)


def test_unknown_class_is_a_plain_remote_error() -> None:
    err = RemoteError.from_record(fake("nosuchmodule.Boom"), INFO)
    assert type(err) is RemoteError
    assert (err.ename, err.evalue, err.etype) == ("Boom", "boom", "nosuchmodule.Boom")
    assert "Boom: boom" in err.traceback
    assert err.remote_class is None
    assert "nosuchmodule" not in sys.modules


def test_class_of_an_unimported_module_is_never_imported(tmp_path, monkeypatch) -> None:
    (tmp_path / "sshpar_probe_errors.py").write_text(
        "import os\nos.environ['SSHPAR_PROBE_IMPORTED'] = '1'\n"
        "class ProbeError(Exception):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("SSHPAR_PROBE_IMPORTED", raising=False)
    record = fake("sshpar_probe_errors.ProbeError")
    err = RemoteError.from_record(record, INFO)
    assert type(err) is RemoteError
    assert "sshpar_probe_errors" not in sys.modules
    assert "SSHPAR_PROBE_IMPORTED" not in __import__("os").environ

    import sshpar_probe_errors  # the client imports it itself: now the class is used

    try:
        err = RemoteError.from_record(record, INFO)
        assert isinstance(err, sshpar_probe_errors.ProbeError) and isinstance(err, RemoteError)
        assert type(err).__qualname__ == "RemoteError[sshpar_probe_errors.ProbeError]"
    finally:
        sys.modules.pop("sshpar_probe_errors", None)


def test_remote_class_constructor_never_runs_on_the_client(monkeypatch) -> None:
    calls = []

    class Picky(Exception):
        def __init__(self, a, b, c) -> None:
            calls.append("init")
            super().__init__(a, b, c)

    monkeypatch.setattr(sys.modules[__name__], "Picky", Picky, raising=False)
    Picky.__qualname__ = "Picky"
    err = RemoteError.from_record(fake(f"{__name__}.Picky"), INFO)
    assert isinstance(err, Picky) and calls == []
    assert str(err).startswith("Picky: boom")


@pytest.mark.parametrize("name", ["KeyboardInterrupt", "SystemExit", "StopIteration"])
def test_remote_interrupts_and_stop_iteration_stay_plain(name: str) -> None:
    # A local `except KeyboardInterrupt` (or a for loop) must not swallow a remote one.
    err = RemoteError.from_record(fake(f"builtins.{name}"), INFO)
    assert type(err) is RemoteError
    assert not isinstance(err, getattr(builtins, name))
    with pytest.raises(RemoteError):
        raise err


def test_classes_whose_subclassing_runs_code_stay_plain(monkeypatch) -> None:
    subclassed = []

    class Registered(Exception):
        def __init_subclass__(cls, **kw) -> None:
            subclassed.append(cls)

    class Meta(type):
        pass

    class WithMeta(Exception, metaclass=Meta):
        pass

    for cls in (Registered, WithMeta):
        cls.__qualname__ = cls.__name__
        monkeypatch.setattr(sys.modules[__name__], cls.__name__, cls, raising=False)
        err = RemoteError.from_record(fake(f"{__name__}.{cls.__name__}"), INFO)
        assert type(err) is RemoteError
    assert subclassed == []


def test_classes_that_cannot_be_combined_fall_back_silently() -> None:
    # MemoryError's C lay-out cannot be shared with RemoteError's.
    err = RemoteError.from_record(fake("builtins.MemoryError"), INFO)
    assert type(err) is RemoteError and err.ename == "MemoryError"


def test_sshpar_errors_raised_remotely_are_not_local_ones() -> None:
    err = RemoteError.from_record(fake("sshpar.errors.TimeoutError", "TimeoutError"), INFO)
    assert type(err) is RemoteError
    assert not isinstance(err, TimeoutError)


def test_unmet_dependency_stays_its_own_class() -> None:
    @require("sshpar_no_such_module_anywhere")
    def needs() -> None:
        pass

    record = record_of(needs)
    err = RemoteError.from_record(record, INFO)
    assert type(err) is UnmetDependencyError
    assert "sshpar_no_such_module_anywhere" in err.evalue
    assert [link["ename"] for link in err.chain] == ["ModuleNotFoundError"]


# -- str(): plain and complete ---------------------------------------------------------------
def test_str_is_plain_complete_text() -> None:
    err = RemoteError.from_record(record_of(chained), INFO)
    text = str(err)
    lines = text.splitlines()
    assert lines[0] == "ValueError: wrapped"
    assert lines[1] == "--- remote traceback from engine 0 on node1 (pid 1234) ---"
    assert "ZeroDivisionError: division by zero" in text
    assert "The above exception was the direct cause of the following exception:" in text
    assert "raise ValueError(\"wrapped\") from exc" in text
    assert lines[-1] == "ValueError: wrapped"
    assert "\x1b" not in text
    assert repr(err) == "<RemoteError ValueError('wrapped') from engine 0>"


def test_str_without_traceback_names_the_engine() -> None:
    assert str(RemoteError("KeyError", "'x'", "", INFO)) == \
        "KeyError: 'x' [engine 0 on node1 (pid 1234)]"


def test_composite_str_lists_the_first_errors_and_counts_the_rest() -> None:
    elist = [RemoteError.from_record(record_of(divide), EngineInfo(i, "n", i, "u"))
             for i in range(4)]
    elist.append(RemoteError.from_record(record_of(chained), EngineInfo(4, "n", 4, "u")))
    err = CompositeError("one or more exceptions raised in f on 5 of 5 engine(s)", elist)
    text = str(err)
    assert text.splitlines()[0] == "one or more exceptions raised in f on 5 of 5 engine(s)"
    assert text.count("[engine ") == CompositeError.shown == 3
    assert "[engine 2 on n (pid 2)] ZeroDivisionError: division by zero" in text
    assert "    Traceback (most recent call last):" in text
    assert text.splitlines()[-1] == \
        "... and 2 more engine error(s): 1 ZeroDivisionError, 1 ValueError"
    assert isinstance(err, RemoteError) and not isinstance(err, ZeroDivisionError)
    with pytest.raises(ZeroDivisionError):
        err.raise_exception(0)


# -- pickling --------------------------------------------------------------------------------
def _same(a: RemoteError, b: RemoteError) -> None:
    assert type(a) is type(b)
    for attr in ("ename", "etype", "evalue", "traceback", "engine_info", "frames", "chain",
                 "args"):
        assert getattr(a, attr) == getattr(b, attr), attr


def test_dual_error_pickles_round_trip() -> None:
    err = RemoteError.from_record(record_of(chained), INFO)
    clone = pickle.loads(pickle.dumps(err))
    _same(err, clone)
    assert isinstance(clone, ValueError) and isinstance(clone, RemoteError)
    assert str(clone) == str(err)


def test_plain_and_unmet_dependency_errors_pickle_round_trip() -> None:
    for err in (RemoteError.from_record(fake("nosuchmodule.Boom"), INFO),
                UnmetDependencyError("UnmetDependencyError", "no numpy")):
        _same(err, pickle.loads(pickle.dumps(err)))


def test_composite_error_pickles_round_trip_with_its_elist() -> None:
    elist = [RemoteError.from_record(record_of(divide), INFO),
             RemoteError.from_record(fake("nosuchmodule.Boom"), INFO)]
    err = CompositeError("two engines raised", elist)
    clone = pickle.loads(pickle.dumps(err))
    assert type(clone) is CompositeError and clone.args == ("two engines raised",)
    assert str(clone) == str(err)
    for a, b in zip(err.elist, clone.elist):
        _same(a, b)
    assert isinstance(clone.elist[0], ZeroDivisionError)


def test_remote_keyboard_interrupt_record_from_a_real_raise() -> None:
    err = RemoteError.from_record(record_of(raises(KeyboardInterrupt())), INFO)
    assert err.ename == "KeyboardInterrupt" and type(err) is RemoteError
    assert isinstance(err, SshparError)


# -- the module itself -----------------------------------------------------------------------
def test_errors_module_imports_only_the_standard_library() -> None:
    tree = ast.parse(Path(errors_module.__file__).read_text())
    names = set()
    for node in tree.body:  # module level only: _render is imported lazily inside methods
        if isinstance(node, ast.Import):
            names |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "errors.py must not import sshpar modules at load"
            names.add((node.module or "").partition(".")[0])
    assert names <= set(sys.stdlib_module_names) | {"__future__"}


def test_tree_in_docstring_names_every_exception() -> None:
    for name in errors_module.__all__:
        obj = getattr(errors_module, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            assert name in errors_module.__doc__, name
