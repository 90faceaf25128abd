"""The background thread that owns the asyncio loop and every SSH object.

Layer: core. Imports errors only.

Public sync calls submit work here and wait with a timeout; nothing else touches the loop's
objects from another thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from .errors import TimeoutError

T = TypeVar("T")


class LoopThread:
    """An asyncio loop running in a daemon thread, started on creation."""

    def __init__(self, name: str = "sshpar-io") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        # Cancel what is left so nothing is destroyed while pending.
        pending = asyncio.all_tasks(self.loop)
        for task in pending:
            task.cancel()
        if pending:
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()

    @property
    def in_loop(self) -> bool:
        return threading.current_thread() is self._thread

    def run(self, coro: Awaitable[T], timeout: float | None, what: str = "operation") -> T:
        """Run ``coro`` on the loop and wait for it; ``timeout`` None waits forever."""
        if self.in_loop:
            raise RuntimeError("sshpar: a blocking call was made from the sshpar IO thread "
                               "(use the *_async form in callbacks)")
        fut: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(
            coro, self.loop)  # type: ignore[arg-type]
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError(f"{what} did not finish within {timeout:g} s") from None

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        """Schedule ``fn(*args)`` on the loop (thread-safe, does not wait)."""
        self.loop.call_soon_threadsafe(fn, *args)

    def stop(self, timeout: float = 10.0) -> None:
        if self.loop.is_closed():
            return
        try:
            self.loop.call_soon_threadsafe(self.loop.stop)
        except RuntimeError:
            return
        if not self.in_loop:
            self._thread.join(timeout)
