"""A rich progress bar for AsyncResult.wait_interactive().

Layer: API helpers. Imports rich.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .asyncresult import AsyncResult


def progress_bar(ar: AsyncResult, *, interval: float = 0.1, timeout: float | None = None,
                 console: Any = None) -> bool:
    """Show finished/total tasks of ``ar`` until it is ready or ``timeout`` passes."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    deadline = None if timeout is None else time.monotonic() + timeout
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(ar._fname or "tasks", total=len(ar))
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            wait = interval if left is None else min(interval, left)
            done = ar.wait(wait)
            bar.update(task, completed=ar.progress)
            if done:
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
