"""AsyncResult: the handle on work submitted to one or more engines.

Layer: API. Imports errors and _serialize; the session layer fills its records in.

An AsyncResult is a ``concurrent.futures.Future`` (and awaitable). The IO thread only marks
records finished; unpickling happens in the thread that asks for the value, so a large result
never stalls other engines' traffic.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import sys
import time
from collections.abc import Callable, Generator, Sequence
from typing import Any

from . import _serialize
from .errors import (
    CompositeError,
    EngineInfo,
    RemoteError,
    SerializationError,
    SshparError,
    TaskAborted,
    TimeoutError,
)

_UTC = datetime.timezone.utc


def _dt(t: float | None) -> datetime.datetime | None:
    return None if t is None else datetime.datetime.fromtimestamp(t, _UTC)


def keep_running_note(exc: BaseException, msg_ids: Sequence[str]) -> None:
    """Tell an interrupted waiter that its tasks were not stopped (Python 3.11+ notes)."""
    if isinstance(exc, KeyboardInterrupt) and hasattr(exc, "add_note"):
        exc.add_note(f"sshpar: the task(s) {', '.join(msg_ids)} keep running; fetch later "
                     "with rc.get_result(msg_id) or stop with ar.abort()/view.interrupt()")


class TaskRecord:
    """One task on one engine, as the client tracks it (filled in by the IO thread)."""

    __slots__ = ("msg_id", "engine", "submitted", "received", "started", "completed",
                 "status", "stdout", "stderr", "error_record", "payload", "failure",
                 "result_type", "owner", "on_output", "_outcome", "request", "__weakref__")

    def __init__(self, msg_id: str, engine: EngineInfo, submitted: float) -> None:
        self.msg_id = msg_id
        self.engine = engine
        self.submitted = submitted
        self.received: float | None = None
        self.started: float | None = None
        self.completed: float | None = None
        self.status = "pending"
        self.stdout = ""
        self.stderr = ""
        self.error_record: dict | None = None
        self.payload: list = []
        self.failure: BaseException | None = None   # a local error: engine lost, aborted
        self.result_type = ""
        self.owner: AsyncResult | None = None
        self.on_output: Callable[[TaskRecord, str, str], None] | None = None
        self._outcome: tuple[bool, Any] | None = None
        # (meta, payload) as sent, kept until the task is done so it can be resent after a
        # reconnect if the engine never received it. Holds references, not copies.
        self.request: tuple[dict, list] | None = None

    @property
    def done(self) -> bool:
        return self.status != "pending"

    # -- called in the IO thread ------------------------------------------------------------
    def add_output(self, name: str, text: str) -> None:
        if name == "stdout":
            self.stdout += text
        else:
            self.stderr += text
        if self.on_output is not None:
            self.on_output(self, name, text)

    def finish(self, meta: dict, payload: list, received: float, clock_offset: float) -> None:
        # Engine clocks differ from ours: shift by the offset measured at connect, then clamp
        # so that submitted <= started <= completed <= received always holds.
        # A result fetched by a later client was submitted before this record existed.
        if meta.get("queued_at"):
            self.submitted = min(self.submitted, meta["queued_at"] - clock_offset)
        self.received = max(received, self.submitted)
        started = min(max(meta["started"] - clock_offset, self.submitted), self.received)
        completed = min(max(meta["completed"] - clock_offset, started), self.received)
        self.started, self.completed = started, completed
        self.stdout = meta.get("stdout", "")
        self.stderr = meta.get("stderr", "")
        self.error_record = meta.get("error")
        self.result_type = meta.get("result_type", "")
        self.payload = payload
        self.status = meta["status"]
        self.request = None
        self._notify()

    def fail(self, exc: BaseException, when: float) -> None:
        if self.done:
            return
        self.failure = exc
        self.request = None
        self.received = max(when, self.submitted)
        self.status = "aborted" if isinstance(exc, TaskAborted) else "error"
        self._notify()

    def _notify(self) -> None:
        owner, self.owner = self.owner, None  # no record <-> result cycle once done
        if owner is not None:
            owner._record_done()

    # -- read in the user's thread ----------------------------------------------------------
    def outcome(self) -> tuple[bool, Any]:
        """(True, value) or (False, exception); computed once, in the caller's thread."""
        if self._outcome is None:
            self._outcome = self._compute_outcome()
            self.payload = []
        return self._outcome

    def _compute_outcome(self) -> tuple[bool, Any]:
        if self.failure is not None:
            return False, self.failure
        if self.status == "aborted":
            return False, TaskAborted(f"task {self.msg_id} was aborted before it ran on "
                                      f"{self.engine}")
        if self.status != "ok":
            err = RemoteError.from_record(self.error_record or {}, self.engine)
            limit = (self.error_record or {}).get("timeout")
            if limit:
                timeout = TimeoutError(f"task {self.msg_id} exceeded its time limit of "
                                       f"{limit:g} s on {self.engine} and was interrupted")
                timeout.remote = err  # type: ignore[attr-defined]
                return False, timeout
            return False, err
        try:
            value = _serialize.loads(self.payload)
        except Exception as exc:
            return False, SerializationError(
                f"the result ({self.result_type or 'unknown type'}) from {self.engine} could "
                f"not be unpickled here: {type(exc).__name__}: {exc} — is the module that "
                "defines it importable on the client?")
        return True, value

    def metadata(self) -> dict:
        return {
            "after": [],
            "completed": _dt(self.completed),
            "engine_id": self.engine.engine_id,
            "engine_uuid": self.engine.uuid,
            "error": self.failure,
            "follow": [],
            "msg_id": self.msg_id,
            "received": _dt(self.received),
            "started": _dt(self.started),
            "status": self.status,
            "stderr": self.stderr,
            "stdout": self.stdout,
            "submitted": _dt(self.submitted),
        }


_UNSET = object()


class AsyncResult(concurrent.futures.Future):
    """The result of work on one engine (a value) or several (a list in target order).

    >>> ar = view.apply_async(pow, 2, 10)
    >>> ar.get(timeout=5)
    1024
    """

    def __init__(self, records: Sequence[TaskRecord], *, single: bool, fname: str = "",
                 postprocess: Callable[[Any], Any] | None = None) -> None:
        super().__init__()
        self._records = list(records)
        self._single = single
        self._fname = fname
        self._postprocess = postprocess
        self._remaining = len(self._records)
        # One lock for everything: the Future's own condition (fewer objects per task).
        self._lock = self._progress = self._condition
        self._outcome: Any = _UNSET
        self._client: Any = None    # set by the Client that submitted it
        for rec in self._records:
            rec.owner = self
        if not self._records:
            super().set_result(None)
        else:
            for rec in self._records:
                if rec.done:
                    self._record_done()

    def _record_done(self) -> None:
        with self._lock:
            self._remaining -= 1
            last = self._remaining == 0
            if not last:  # the last one notifies through set_result
                self._progress.notify_all()
        if last:
            super().set_result(None)

    # -- the ipyparallel / multiprocessing API ---------------------------------------------
    def ready(self) -> bool:
        """Whether every engine has answered."""
        return self.done()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until ready or ``timeout`` seconds pass; return whether it is ready."""
        if self.done():
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._condition:  # notified as each engine's part finishes, and at the end
            while not self.done():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._condition.wait(left)
        return self.done()

    def successful(self) -> bool:
        """Whether it finished without error. Raises ValueError while not ready."""
        if not self.done():
            raise ValueError(f"{self!r} is not ready yet")
        return all(rec.status == "ok" for rec in self._records)

    def get(self, timeout: float | None = None) -> Any:
        """The result: a value for one engine, a list in target order for several.

        Args:
            timeout: seconds to wait; None waits until done.

        Raises:
            TimeoutError: not ready within ``timeout`` (the task keeps running).
            RemoteError: it raised on its engine (CompositeError for several engines).
            EngineError: its engine was lost.
        """
        try:
            ready = self.wait(timeout)
        except KeyboardInterrupt as exc:
            keep_running_note(exc, self.msg_ids)
            raise
        if not ready:
            raise TimeoutError(f"Result not ready after {timeout:g} s." if timeout else
                               "Result not ready.")
        ok, value = self._resolve()
        if self._client is not None:
            self._client._claimed(self)
        if not ok:
            raise value
        return value

    def abort(self) -> None:
        """Drop these tasks if they have not started; their results raise TaskAborted."""
        if self._client is None or self.done():
            return
        pending = [rec for rec in self._records if not rec.done]
        ids = sorted({rec.engine.engine_id for rec in pending})
        self._client._abort(ids, [rec.msg_id for rec in pending])

    def _resolve(self) -> tuple[bool, Any]:
        with self._lock:
            if self._outcome is not _UNSET:
                return self._outcome
        outcome = resolve(self._records, single=self._single, fname=self._fname,
                          postprocess=self._postprocess)
        with self._lock:
            if self._outcome is _UNSET:
                self._outcome = outcome
            return self._outcome  # type: ignore[return-value]

    # -- concurrent.futures.Future ----------------------------------------------------------
    def result(self, timeout: float | None = None) -> Any:
        return self.get(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if not self.wait(timeout):
            raise TimeoutError("Result not ready.")
        ok, value = self._resolve()
        return None if ok else value

    def cancel(self) -> bool:
        # Work already sent cannot be recalled silently; abort() is the explicit way.
        return False

    def __await__(self) -> Generator[Any, None, Any]:
        yield from asyncio.wrap_future(self).__await__()
        return self.get(0)

    # -- what ran where ---------------------------------------------------------------------
    @property
    def msg_ids(self) -> list[str]:
        return [rec.msg_id for rec in self._records]

    @property
    def engine_id(self) -> int | list[int]:
        ids = [rec.engine.engine_id for rec in self._records]
        return ids[0] if self._single else ids

    @property
    def metadata(self) -> dict | list[dict]:
        md = [rec.metadata() for rec in self._records]
        return md[0] if self._single else md

    @property
    def stdout(self) -> str | list[str]:
        out = [rec.stdout for rec in self._records]
        return out[0] if self._single else out

    @property
    def stderr(self) -> str | list[str]:
        err = [rec.stderr for rec in self._records]
        return err[0] if self._single else err

    @property
    def progress(self) -> int:
        """How many engines' tasks have finished."""
        return len(self._records) - self._remaining

    @property
    def elapsed(self) -> float:
        """Seconds since submission: until now, or until the last result if all are in."""
        start = min(rec.submitted for rec in self._records)
        if self.done():
            return max(rec.received or start for rec in self._records) - start
        return time.time() - start

    @property
    def wall_time(self) -> float:
        """Seconds from the first submission to the last result (when ready)."""
        self._require_ready("wall_time")
        return self.elapsed

    @property
    def serial_time(self) -> float:
        """Sum of the engines' compute times (started to completed), in seconds."""
        self._require_ready("serial_time")
        return sum((rec.completed or 0) - (rec.started or 0) for rec in self._records
                   if rec.started is not None)

    def _require_ready(self, what: str) -> None:
        if not self.done():
            raise ValueError(f"{what} is known only once {self!r} is ready")

    def get_dict(self, timeout: float | None = None) -> dict[int, Any]:
        """The results as ``{engine_id: result}`` (one task per engine)."""
        ids = [rec.engine.engine_id for rec in self._records]
        if len(set(ids)) != len(ids):
            raise ValueError("get_dict() needs one task per engine; this result has "
                             f"several on engines {ids}")
        value = self.get(timeout)
        values = [value] if self._single else list(value)
        if len(values) != len(ids):
            raise ValueError("get_dict() is not available for map results")
        return dict(zip(ids, values))

    def display_outputs(self, file: Any = None) -> None:
        """Print each engine's captured stdout and stderr, prefixed ``[engine N@host]``."""
        out = file if file is not None else sys.stdout
        for rec in self._records:
            tag = f"[engine {rec.engine.engine_id}@{rec.engine.host}]"
            for name, text in (("stdout", rec.stdout), ("stderr", rec.stderr)):
                if not text:
                    continue
                label = tag if name == "stdout" else f"{tag} (stderr)"
                for line in text.splitlines():
                    print(f"{label} {line}", file=out)

    def wait_interactive(self, interval: float = 0.1, timeout: float | None = None) -> bool:
        """Wait, showing a progress bar of finished tasks; return whether all finished."""
        from ._progress import progress_bar

        return progress_bar(self, interval=interval, timeout=timeout)

    def _wait_record(self, rec: TaskRecord, deadline: float | None) -> None:
        with self._lock:
            while not rec.done:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError("Result not ready.")
                self._progress.wait(left)

    def __len__(self) -> int:
        return len(self._records)

    def __repr__(self) -> str:
        state = "finished" if self.done() else "pending"
        name = f"({self._fname})" if self._fname else ""
        return f"<AsyncResult{name}: {state}>"


class AsyncMapResult(AsyncResult):
    """The result of ``map``: one list, iterable element by element as parts arrive."""

    def __iter__(self) -> Generator[Any, None, None]:
        for rec in self._records:
            self._wait_record(rec, None)
            ok, value = rec.outcome()
            if not ok:
                raise value
            yield from value


def resolve(records: Sequence[TaskRecord], *, single: bool, fname: str,
            postprocess: Callable[[Any], Any] | None) -> tuple[bool, Any]:
    """(True, value) or (False, exception) of finished tasks: a value for one engine
    (``single``), a list in target order for several, or the error (CompositeError for
    several engines)."""
    if single and postprocess is None:
        return records[0].outcome()
    values: list[Any] = []
    errors: list[BaseException] = []
    for rec in records:
        ok, v = rec.outcome()
        (values if ok else errors).append(v)
    if errors:
        if single:
            return False, errors[0]
        remote = [e if isinstance(e, RemoteError) else _as_remote(e) for e in errors]
        return False, CompositeError(
            f"one or more exceptions raised in {fname or 'the call'} on "
            f"{len(errors)} of {len(records)} engine(s)", remote)
    value: Any = values[0] if single else values
    if postprocess is not None:
        value = postprocess(value)
    return True, value


def _as_remote(exc: BaseException) -> RemoteError:
    info = getattr(exc, "engine_info", None)
    err = RemoteError(type(exc).__name__, str(exc), f"{type(exc).__name__}: {exc}", info)
    err.__cause__ = exc
    if isinstance(exc, SshparError):
        err.local = exc  # type: ignore[attr-defined]
    return err
