"""Unit tests for sshpar._render: rich tracebacks of the remote code, never of local files.

Records come from the engine's real ``error_record()``, for exceptions raised in code compiled
under a fake remote filename. Its lines are in linecache only while the "engine" runs, so the
client side of each test sees nothing but what the record carries.
"""

from __future__ import annotations

import io
import linecache
import re
import sys

import pytest
from rich.console import Console

from sshpar import _excepthook, _render
from sshpar._engine.executor import error_record
from sshpar.errors import CompositeError, EngineInfo, RemoteError

REMOTE_FILE = "/srv/jobs/remote_job.py"
INFO = EngineInfo(engine_id=3, host="node1", pid=4242, uuid="u-3")
ANSI = re.compile(r"\x1b\[[0-9;]*m")

JOB = '''\
def divide(x):
    y = x - x
    return x / y  # the engine's line


def convert(x):
    try:
        return divide(x)
    except ZeroDivisionError as exc:
        raise ValueError(f"cannot convert {x}") from exc


def cleanup(x):
    try:
        divide(x)
    except ZeroDivisionError:
        raise KeyError("during cleanup")
'''


def run_on_engine(call: str, source: str = JOB, filename: str = REMOTE_FILE) -> dict:
    """Play the engine: run ``call`` against ``source`` compiled as ``filename``; its record."""
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    try:
        namespace: dict = {"__name__": "__main__"}
        exec(compile(source, filename, "exec"), namespace)  # noqa: S102 - the engine runs it
        try:
            eval(call, namespace)  # a "<string>" frame: one without source lines
        except BaseException as exc:  # noqa: BLE001 - an engine reports whatever was raised
            return error_record(exc)
        raise AssertionError(f"{call} did not raise")
    finally:
        linecache.cache.pop(filename, None)


def remote_error(call: str, info: EngineInfo | None = INFO, **kw: str) -> RemoteError:
    return RemoteError.from_record(run_on_engine(call, **kw), info)


def render(obj: object, *, width: int = 100) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(obj)
    return console.file.getvalue()


def test_renders_title_frames_engine_source_and_exception() -> None:
    assert linecache.getlines(REMOTE_FILE) == []  # the client cannot read the remote file
    out = render(remote_error("divide(2)"))
    assert "RemoteError from engine 3 on node1 (pid 4242)" in out
    assert 'File "<string>", line 1, in <module>' in out
    assert f'File "{REMOTE_FILE}", line 3, in divide' in out
    assert re.search(r"❱ 3 │ *return x / y  # the engine's line", out)  # the error line
    assert re.search(r" 2 │ *y = x - x", out)  # context the engine sent
    assert "def convert" not in out  # context after the error line stops at a blank line
    assert "ZeroDivisionError: division by zero" in out
    assert "Traceback (most recent call last):" in out


def test_explicit_cause_is_shown_first_with_its_separator() -> None:
    out = render(remote_error("convert(5)"))
    cause = out.index("ZeroDivisionError: division by zero")
    separator = out.index("The above exception was the direct cause of the following exception:")
    error = out.index("ValueError: cannot convert 5")
    assert cause < separator < error
    assert "During handling" not in out
    assert 'raise ValueError(f"cannot convert {x}") from exc' in out


def test_implicit_context_has_its_own_separator() -> None:
    out = render(remote_error("cleanup(1)"))
    assert "During handling of the above exception, another exception occurred:" in out
    assert "direct cause" not in out
    assert out.index("ZeroDivisionError") < out.index("KeyError: 'during cleanup'")


def test_engine_lines_win_over_a_local_file_at_the_same_path(tmp_path) -> None:
    path = tmp_path / "job.py"
    err = remote_error("divide(2)", filename=str(path))
    path.write_text("LOCAL_ONLY = 'not the remote code'\n" * 10)
    linecache.checkcache(str(path))
    assert "LOCAL_ONLY" in linecache.getline(str(path), 3)  # the pitfall is really there
    out = render(err, width=200)
    assert "return x / y  # the engine's line" in out
    assert "LOCAL_ONLY" not in out


def test_frame_without_any_source_still_renders() -> None:
    record = run_on_engine("divide(2)")
    for frame in record["frames"]:
        frame["lines"], frame["line"] = [], ""
    out = render(RemoteError.from_record(record, INFO))
    assert f'File "{REMOTE_FILE}", line 3, in divide' in out
    assert "ZeroDivisionError: division by zero" in out


def test_syntax_error_shows_where_it_points() -> None:
    out = render(remote_error("compile('1 +', '<execute-1>', 'exec')"))
    assert 'File "<execute-1>", line 1' in out
    assert "1 +" in out and "^" in out
    assert "SyntaxError: invalid syntax" in out


@pytest.mark.skipif(sys.version_info < (3, 11), reason="notes and groups are 3.11+")
def test_notes_and_group_members_are_shown() -> None:
    source = ("def group():\n    err = ValueError('member')\n    err.add_note('a note')\n"
              "    raise ExceptionGroup('several', [err, KeyError('k')])\n")
    out = render(remote_error("group()", source=source))
    assert "ExceptionGroup: several (2 sub-exceptions)" in out
    assert "| ValueError: member" in out and "| a note" in out and "| KeyError: 'k'" in out


def test_error_without_frames_shows_its_text() -> None:
    err = RemoteError("EngineError", "engine 1 died", "EngineError: engine 1 died", INFO)
    out = render(err)
    assert "RemoteError from engine 3 on node1 (pid 4242)" in out
    assert out.count("EngineError: engine 1 died") == 1


def test_long_stacks_hide_their_middle() -> None:
    source = "def down(n):\n    if n == 0:\n        raise RecursionError('deep')\n" \
             "    return down(n - 1)\n"
    out = render(remote_error("down(40)", source=source))
    assert "frames hidden" in out
    # 43 frames: run_on_engine, <string>, 41 x down; the first and last ten are shown
    assert out.count("in down") == _render.MAX_FRAMES - 2
    assert "23 frames hidden" in out


def test_composite_error_shows_the_first_few_then_counts_the_rest() -> None:
    elist = [remote_error("divide(1)", EngineInfo(i, "node1", 100 + i, f"u{i}"))
             for i in range(4)]
    elist.append(remote_error("convert(1)", EngineInfo(4, "node2", 200, "u4")))
    err = CompositeError("one or more exceptions raised in divide on 5 of 5 engine(s)", elist)
    out = render(err)
    assert "CompositeError: one or more exceptions raised in divide on 5 of 5 engine(s)" in out
    assert out.count("RemoteError from engine") == CompositeError.shown == 3
    assert "engine 2 on node1 (pid 102)" in out and "engine 3 on" not in out
    assert "... and 2 more engine error(s): 1 ZeroDivisionError, 1 ValueError" in out


def test_styles_at_a_fixed_colour_system() -> None:
    console = Console(file=io.StringIO(), width=100, color_system="truecolor",
                      force_terminal=True)
    console.print(remote_error("divide(2)"))
    out = console.file.getvalue()
    assert "\x1b[1;31mZeroDivisionError" in out
    assert "\x1b[1;31m RemoteError from engine 3" in out


def test_render_traceback_gives_ipython_lines_with_the_same_content() -> None:
    err = remote_error("convert(2)")
    lines = err._render_traceback_()
    assert lines and all(isinstance(line, str) for line in lines)
    plain = ANSI.sub("", "\n".join(lines))
    assert "RemoteError from engine 3 on node1 (pid 4242)" in plain
    assert "return x / y  # the engine's line" in plain
    assert "ValueError: cannot convert 2" in plain
    assert "\x1b[" in "".join(lines)


def test_extraction_is_plain_data_oldest_first() -> None:
    trace = _render.extract(remote_error("convert(7)"))
    assert trace.title == "RemoteError from engine 3 on node1 (pid 4242)"
    assert [s.ename for s in trace.stacks] == ["ZeroDivisionError", "ValueError"]
    assert trace.stacks[0].explicit and not trace.stacks[1].explicit
    frame = trace.stacks[0].frames[-1]
    assert (frame.filename, frame.lineno, frame.name) == (REMOTE_FILE, 3, "divide")
    assert frame.lines[frame.lineno - frame.start] == "    return x / y  # the engine's line"


def test_title_without_engine_info() -> None:
    assert "RemoteError from an unknown engine" in render(remote_error("divide(1)", info=None))


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def hook_calls(monkeypatch: pytest.MonkeyPatch) -> list:
    calls: list = []
    monkeypatch.setattr(sys, "excepthook", lambda *args: calls.append(args))
    return calls


def test_excepthook_renders_uncaught_remote_errors_on_a_terminal(monkeypatch, hook_calls) -> None:
    stderr = FakeTTY()
    monkeypatch.setattr(sys, "stderr", stderr)
    _excepthook.install_excepthook()
    err = remote_error("divide(2)")
    try:
        raise err
    except RemoteError as caught:
        sys.excepthook(type(caught), caught, caught.__traceback__)
    out = ANSI.sub("", stderr.getvalue())
    assert "RemoteError from engine 3 on node1 (pid 4242)" in out
    assert "return x / y  # the engine's line" in out
    assert "raise err" in out  # where the client was
    assert hook_calls == []

    value = ValueError("local")
    sys.excepthook(ValueError, value, None)
    assert hook_calls == [(ValueError, value, None)]
    assert "local" not in ANSI.sub("", stderr.getvalue())


def test_excepthook_is_installed_once(hook_calls) -> None:
    previous = sys.excepthook
    _excepthook.install_excepthook()
    hook = sys.excepthook
    _excepthook.install_excepthook()
    assert sys.excepthook is hook and hook._sshpar_previous is previous


def test_excepthook_falls_through_when_stderr_is_not_a_terminal(monkeypatch, hook_calls) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    _excepthook.install_excepthook()
    err = remote_error("divide(2)")
    sys.excepthook(type(err), err, None)
    assert hook_calls == [(type(err), err, None)]
    assert sys.stderr.getvalue() == ""


def test_ipython_shows_the_remote_rendering(tmp_path, monkeypatch) -> None:
    pytest.importorskip("IPython")
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    monkeypatch.setenv("IPYTHONDIR", str(tmp_path))  # its history and profile go here
    shell = InteractiveShell.instance()
    try:
        shell.user_ns["err"] = remote_error("convert(2)")
        with capture_output() as captured:
            shell.run_cell("raise err")
    finally:
        InteractiveShell.clear_instance()
    out = ANSI.sub("", captured.stdout)
    assert "RemoteError from engine 3 on node1 (pid 4242)" in out
    assert "return x / y  # the engine's line" in out
    assert "ValueError: cannot convert 2" in out
