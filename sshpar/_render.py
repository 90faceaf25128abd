"""Rendering remote errors for people: rich renderables, IPython's lines, the excepthook.

Layer: API. The one module that imports rich for errors (the CLI is the other rich user).

As in ``rich/traceback.py``, extraction and rendering are separate: :func:`extract` turns a
:class:`~sshpar.errors.RemoteError` into plain :class:`RemoteTrace` data, and
:func:`render_trace` draws any trace. Source lines always come from the engine's record:
rich's own ``Traceback`` reads files by path, and a local file at a remote frame's path may hold
different code (or none), so it is not used here.
"""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.syntax import Syntax
from rich.text import Text

from .errors import CompositeError, RemoteError

log = logging.getLogger("sshpar._render")

#: Frames shown per exception; the middle of a longer stack (deep recursion) is elided.
MAX_FRAMES = 20
#: ANSI colours follow the terminal's palette, so IPython lines need only 16 colours.
THEME = "ansi_dark"

_CAUSE = "The above exception was the direct cause of the following exception:"
_CONTEXT = "During handling of the above exception, another exception occurred:"
_SEPARATOR = re.compile(rf"^(?:{re.escape(_CAUSE)}|{re.escape(_CONTEXT)})$", re.MULTILINE)
_TB_HEADER = "Traceback (most recent call last):"
# The "File ..., line N" a SyntaxError's text ends with (a frame's line has ", in name").
_SYNTAX_LOCATION = re.compile(r'^  File ".*", line \d+$', re.MULTILINE)
_SYNTAX_ERRORS = {"SyntaxError", "IndentationError", "TabError"}
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


# -- extraction: the error's plain data, nothing rich ----------------------------------------
@dataclass(frozen=True)
class RemoteFrame:
    """One remote frame, with the source lines the engine read (from line ``start``)."""

    filename: str
    lineno: int
    name: str
    line: str = ""
    start: int = 0
    lines: tuple[str, ...] = ()


@dataclass(frozen=True)
class RemoteStack:
    """One exception of a chain: its frames and the engine's plain text for it."""

    ename: str
    evalue: str
    frames: tuple[RemoteFrame, ...] = ()
    text: str = ""
    #: True when this exception is the ``raise ... from`` cause of the next one.
    explicit: bool = False

    @property
    def headline(self) -> str:
        return f"{self.ename}: {self.evalue}" if self.evalue else self.ename


@dataclass(frozen=True)
class RemoteTrace:
    """What to draw for one remote error: a title and its stacks, oldest first."""

    title: str
    stacks: tuple[RemoteStack, ...]


def extract(err: RemoteError) -> RemoteTrace:
    """Turn a RemoteError into a :class:`RemoteTrace` (pure data, no rendering)."""
    causes = [
        RemoteStack(str(link.get("ename", "Exception")), str(link.get("evalue", "")),
                    _frames(link.get("frames") or ()), str(link.get("text") or ""),
                    bool(link.get("explicit")))
        for link in reversed(err.chain)
    ]
    # err.traceback holds the whole chain; the error's own part follows the last separator.
    own_text = _SEPARATOR.split(err.traceback or "")[-1].lstrip("\n")
    own = RemoteStack(err.ename, err.evalue, _frames(err.frames), own_text)
    return RemoteTrace(_title(err), (*causes, own))


def _frames(records: Any) -> tuple[RemoteFrame, ...]:
    frames = []
    for rec in records:
        lineno = int(rec.get("lineno") or 0)
        frames.append(RemoteFrame(
            filename=str(rec.get("filename", "?")), lineno=lineno, name=str(rec.get("name", "?")),
            line=str(rec.get("line") or ""), start=int(rec.get("start") or lineno),
            lines=tuple(str(ln) for ln in rec.get("lines") or ())))
    return tuple(frames)


def _title(err: RemoteError) -> str:
    kind = "RemoteError" if err.remote_class is not None else type(err).__name__
    where = str(err.engine_info) if err.engine_info is not None else "an unknown engine"
    return f"{kind} from {where}"


# -- rendering: any trace, into rich renderables ---------------------------------------------
def render_trace(trace: RemoteTrace) -> Panel:
    """A red panel titled with the engine: each stack's frames and source, then its error."""
    body: list[RenderableType] = []
    for i, stack in enumerate(trace.stacks):
        if i:
            previous = trace.stacks[i - 1]
            body.append(Text(f"\n{_CAUSE if previous.explicit else _CONTEXT}\n", style="italic"))
        body.extend(_render_stack(stack))
    return Panel(Group(*body), title=Text(trace.title, style="bold red"), title_align="left",
                 border_style="red", expand=True, padding=(0, 1))


def _render_stack(stack: RemoteStack) -> Iterator[RenderableType]:
    # The engine's text: [header, frames,] detail, the "ename: evalue" line(s), notes.
    text, before, after = stack.text.rstrip(), "", ""
    found = list(re.finditer(rf"^(?:  \| )?{re.escape(stack.ename)}(?::|$)", text,
                             re.MULTILINE))
    if found:
        before = text[:found[-1].start()].rstrip()
        rest = text[found[-1].start():].removeprefix("  | ")
        after = rest[len(stack.headline):].strip("\n") if rest.startswith(stack.headline) else ""
    if stack.frames:
        yield Text(_TB_HEADER, style="dim")
        yield from _render_frames(stack.frames)
        found = list(_SYNTAX_LOCATION.finditer(before))
        before = before[found[-1].start():] if found and stack.ename in _SYNTAX_ERRORS else ""
    elif before.startswith(_TB_HEADER):
        before = before[len(_TB_HEADER):].strip("\n")
    if before:
        yield Text(before)  # frameless detail, e.g. where a SyntaxError points
    yield Text.assemble((stack.ename, "bold red"), (": " if stack.evalue else "", "bold red"),
                        stack.evalue)
    if after:
        yield Text(after, style="dim")  # notes, sub-exceptions of a group


def _render_frames(frames: tuple[RemoteFrame, ...]) -> Iterator[RenderableType]:
    hidden = range(MAX_FRAMES // 2, len(frames) - MAX_FRAMES // 2)
    for index, frame in enumerate(frames):
        if len(frames) > MAX_FRAMES and index in hidden:
            if index == hidden.start:
                yield Text(f"... {len(hidden)} frames hidden ...", style="dim", justify="center")
            continue
        if index:
            yield Text("")
        yield Text.assemble(("  File ", "dim"), (f'"{frame.filename}"', "magenta"),
                            (", line ", "dim"), (str(frame.lineno), "cyan"), (", in ", "dim"),
                            (frame.name, "green"))
        # Context: the engine's lines before the error line, and after it up to a blank line.
        lines, start = list(frame.lines), frame.start
        after = lines[frame.lineno - start + 1:]
        cut = next((i for i, ln in enumerate(after) if not ln.strip()), len(after))
        lines = lines[:max(frame.lineno - start + 1 + cut, 0)]
        while lines and not lines[0].strip() and start < frame.lineno:
            lines.pop(0)
            start += 1
        code = "\n".join(lines)
        if not code.strip():
            code, start = frame.line, frame.lineno
        if code.strip():
            yield Syntax(code, "python", theme=THEME, line_numbers=True,
                         start_line=max(start, 1), highlight_lines={frame.lineno},
                         dedent=False, indent_guides=True, word_wrap=False)


def error_renderables(err: RemoteError) -> Iterator[RenderableType]:
    """What ``err.__rich_console__`` yields; a CompositeError shows its first ``shown``."""
    if isinstance(err, CompositeError):
        yield Text.assemble(("CompositeError: ", "bold red"), err.evalue)
        for each in err.elist[: err.shown]:
            yield from error_renderables(each)
        if err.hidden_summary():
            yield Text(err.hidden_summary(), style="italic")
        return
    yield render_trace(extract(err))


def render_lines(err: RemoteError, *, width: int | None = None) -> list[str]:
    """The rendering as ANSI-coloured lines, for IPython's ``_render_traceback_``."""
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, color_system="standard",
                      width=width or shutil.get_terminal_size((100, 24)).columns)
    console.print(err)
    return buf.getvalue().splitlines()


# -- uncaught errors in a terminal (see _excepthook.py) -------------------------------------
def print_uncaught(err: RemoteError, tb: TracebackType | None, stream: Any) -> None:
    """Where the client was (its own frames, not sshpar's), then the remote error rendered."""
    console = Console(file=stream)
    local = [fs for fs in traceback.extract_tb(tb)
             if not os.path.abspath(fs.filename).startswith(_PACKAGE_DIR + os.sep)]
    if local:
        console.print(Text(_TB_HEADER + "\n" + "".join(traceback.format_list(local)).rstrip(),
                           style="dim"))
    console.print(err)
