"""DirectView: run functions, code and scripts on chosen engines, and move data to and from them.

Layer: API. Imports asyncresult, errors, _serialize, _markers and _engine.ops (to name the
engine-side operations); it talks to engines only through its Client.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from . import _partition, _serialize
from ._engine import ops
from .asyncresult import AsyncMapResult, AsyncResult
from .errors import NoEnginesError, SerializationError

if TYPE_CHECKING:
    from .client import Client

Targets = int | Sequence[int] | slice | str | None


class _Unset:
    """Marks a flag that was not given (None is a meaningful timeout: no limit)."""


_UNSET = _Unset()


class DirectView:
    """Direct access to one engine (scalar results) or several (lists in target order).

    Made by indexing a Client: ``rc[0]``, ``rc[:]``, ``rc[1:3]``, ``rc[[0, 2]]``.

    Attributes:
        block: whether calls wait for their result (True) or return an AsyncResult (False,
            the default). Every call also takes ``block=`` to override it once.
        targets: the engines this view sends to.
    """

    def __init__(self, client: Client, targets: Targets, *, block: bool = False) -> None:
        self.client = client
        self.targets = targets
        self.block = block
        self.timeout: float | None = None

    def __repr__(self) -> str:
        return f"<DirectView {self.targets!r}>"

    # -- flags ------------------------------------------------------------------------------
    def _is_blocking(self, block: bool | None) -> bool:
        return self.block if block is None else bool(block)

    def _resolve_targets(self, targets: Targets = None) -> tuple[list[int], bool]:
        """Engine ids and whether results are scalar (a single int target)."""
        targets = self.targets if targets is None else targets
        return self.client._resolve_targets(targets)

    def set_flags(self, *, block: bool | None = None, targets: Targets = None,
                  timeout: float | None | _Unset = _UNSET) -> None:
        """Set ``block``, ``targets`` and/or ``timeout`` (a run-time limit in seconds for
        each task, None for none) for later calls."""
        if block is not None:
            self.block = bool(block)
        if targets is not None:
            self.client._resolve_targets(targets)
            self.targets = targets
        if not isinstance(timeout, _Unset):
            if timeout is not None and not timeout > 0:
                raise ValueError(f"timeout must be a number of seconds > 0 or None, "
                                 f"not {timeout!r}")
            self.timeout = timeout

    @contextlib.contextmanager
    def temp_flags(self, *, block: bool | None = None, targets: Targets = None,
                   timeout: float | None | _Unset = _UNSET) -> Iterator[DirectView]:
        """Set flags for the duration of a ``with`` block, then restore them."""
        saved = self.block, self.targets, self.timeout
        self.set_flags(block=block, targets=targets, timeout=timeout)
        try:
            yield self
        finally:
            self.block, self.targets, self.timeout = saved

    # -- control ----------------------------------------------------------------------------
    def interrupt(self, targets: Targets = None) -> None:
        """Raise KeyboardInterrupt in the task running on each engine (it fails with a
        RemoteError; the engine carries on with its queue)."""
        ids, _ = self._resolve_targets(targets)
        self.client._control(ids, "interrupt")

    def abort(self, jobs: Any = None, targets: Targets = None) -> None:
        """Drop queued tasks before they run; their results raise TaskAborted.

        Args:
            jobs: AsyncResults or msg_ids to abort; default every task this client has
                waiting on the view's engines. A task already running is not stopped (see
                :meth:`interrupt`).
        """
        ids, _ = self._resolve_targets(targets)
        self.client._abort(ids, _msg_ids(jobs))

    # -- the core: apply ----------------------------------------------------------------------
    def _run(self, f: Callable, args: tuple, kwargs: dict, *, block: bool | None,
             targets: Targets = None, postprocess: Callable[[Any], Any] | None = None,
             fname: str | None = None) -> Any:
        ids, single = self._resolve_targets(targets)
        if not ids:
            raise NoEnginesError("this view has no engines to run on")
        name = fname or str(getattr(f, "__name__", type(f).__name__))
        files: set[str] = set()
        payload = _pickle_call(f, args, kwargs, name, files)
        return self.client._submit(ids, single, [payload] * len(ids), fname=name,
                                   postprocess=postprocess, code_files=files,
                                   limit=self.timeout, block=self._is_blocking(block))

    def apply(self, f: Callable, /, *args: Any, **kwargs: Any) -> Any:
        """Call ``f(*args, **kwargs)`` on the engines; blocks if ``self.block``.

        >>> e0.apply(pow, 2, 10)        # with e0.block = True
        1024
        """
        return self._run(f, args, kwargs, block=None)

    def apply_sync(self, f: Callable, /, *args: Any, **kwargs: Any) -> Any:
        """Call ``f`` on the engines and wait for the result."""
        return self._run(f, args, kwargs, block=True)

    def apply_async(self, f: Callable, /, *args: Any, **kwargs: Any) -> AsyncResult:
        """Call ``f`` on the engines; return an AsyncResult at once."""
        return self._run(f, args, kwargs, block=False)

    # -- code -------------------------------------------------------------------------------
    def execute(self, code: str, *, block: bool | None = None,
                targets: Targets = None) -> Any:
        """Execute a string of code in the engines' namespace.

        >>> e0.execute("import numpy")
        """
        if not isinstance(code, str):
            raise TypeError(f"execute() takes a string of code, got {type(code).__name__}")
        return self._run(ops.execute, (code,), {}, block=block, targets=targets,
                         postprocess=_none, fname="execute")

    def run(self, filename: str | os.PathLike, *, block: bool | None = None,
            targets: Targets = None) -> Any:
        """Upload a local Python file and execute it in the engines' namespace.

        The file is read here (the engines need not see this machine's files); tracebacks
        name it and its lines.

        Raises:
            FileNotFoundError: the local file does not exist (nothing is sent).
        """
        path = os.path.abspath(os.fspath(filename))
        with open(path, encoding="utf-8") as f:
            source = f.read()
        return self._run(ops.execute, (source, path), {}, block=block, targets=targets,
                         postprocess=_none, fname=f"run({os.path.basename(path)})")

    # -- data -------------------------------------------------------------------------------
    def push(self, ns: Mapping[str, Any], *, block: bool | None = None,
             targets: Targets = None) -> Any:
        """Update the engines' namespace with ``ns``.

        >>> e0.push(dict(a=1.03234, b=3453))
        """
        if not isinstance(ns, Mapping):
            raise TypeError(f"push() takes a mapping of names to values, got "
                            f"{type(ns).__name__}")
        return self._run(ops.push, (dict(ns),), {}, block=block, targets=targets,
                         postprocess=_none, fname="push")

    def pull(self, names: str | Sequence[str], *, block: bool | None = None,
             targets: Targets = None) -> Any:
        """Get one name (a value) or several (a list) from the engines' namespace.

        >>> e0.pull(("a", "b"))
        [1.03234, 3453]
        """
        if not isinstance(names, str):
            names = tuple(names)
            for n in names:
                if not isinstance(n, str):
                    raise TypeError(f"pull() takes names (str), got {n!r}")
        return self._run(ops.pull, (names,), {}, block=block, targets=targets, fname="pull")

    def __getitem__(self, key: str) -> Any:
        return self.pull(key, block=True)

    def __setitem__(self, key: str, value: Any) -> None:
        self.push({key: value}, block=True)

    def get(self, key_s: str | Sequence[str]) -> Any:
        """``pull(key_s, block=True)``: the dictionary interface."""
        return self.pull(key_s, block=True)

    def update(self, ns: Mapping[str, Any]) -> Any:
        """``push(ns)``: the dictionary interface."""
        return self.push(ns)

    # -- many items -------------------------------------------------------------------------
    def _run_each(self, f: Callable, per_engine: Sequence[tuple], *, block: bool | None,
                  ids: list[int], single: bool, fname: str,
                  postprocess: Callable[[Any], Any] | None = None,
                  result_class: type[AsyncResult] = AsyncResult) -> Any:
        """Call ``f(*per_engine[i])`` on engine ``ids[i]``: one payload each."""
        files: set[str] = set()
        payloads = [_pickle_call(f, args, {}, fname, files) for args in per_engine]
        return self.client._submit(ids, single, payloads, fname=fname,
                                   postprocess=postprocess, result_class=result_class,
                                   code_files=files, limit=self.timeout,
                                   block=self._is_blocking(block))

    def map(self, f: Callable, *sequences: Any, block: bool | None = None) -> Any:
        """``list(map(f, *sequences))``, the sequences split evenly across the engines.

        Returns the list (blocking) or an AsyncMapResult, iterable as parts arrive.

        >>> rc[:].map_sync(lambda x: x * x, range(6))
        [0, 1, 4, 9, 16, 25]
        """
        if not sequences:
            raise TypeError("map() needs at least one sequence")
        ids, _ = self._resolve_targets()
        if not ids:
            raise NoEnginesError("this view has no engines to run on")
        lengths = {len(s) for s in sequences if hasattr(s, "__len__")}
        if len(lengths) > 1:
            raise ValueError(f"map() sequences differ in length: {sorted(lengths)}")
        split = [_partition.split(seq, len(ids)) for seq in sequences]
        per_engine = [tuple(parts[i] for parts in split) for i in range(len(ids))]
        keep = [i for i, args in enumerate(per_engine) if len(args[0])]
        if not keep:
            keep = [0]
        name = getattr(f, "__name__", "f")
        return self._run_each(
            ops.map_chunk, [(f, *per_engine[i]) for i in keep], block=block,
            ids=[ids[i] for i in keep], single=False, fname=f"map({name})",
            postprocess=_partition.join, result_class=AsyncMapResult)

    def map_sync(self, f: Callable, *sequences: Any) -> list:
        """:meth:`map`, waiting for the whole list."""
        return self.map(f, *sequences, block=True)

    def map_async(self, f: Callable, *sequences: Any) -> AsyncMapResult:
        """:meth:`map`, returning an AsyncMapResult at once."""
        return self.map(f, *sequences, block=False)

    def imap(self, f: Callable, *sequences: Any) -> Iterator[Any]:
        """Results of ``map(f, *sequences)`` one by one, in order, as they arrive."""
        return iter(self.map_async(f, *sequences))

    def scatter(self, key: str, seq: Any, *, flatten: bool = False,
                block: bool | None = None, targets: Targets = None) -> Any:
        """Split ``seq`` across the engines and bind each part to ``key`` there.

        With ``flatten=True`` a part of one element is bound as that element.
        """
        ids, _ = self._resolve_targets(targets)
        parts = _partition.split(seq, len(ids))
        if flatten:
            parts = [p[0] if len(p) == 1 else p for p in parts]
        return self._run_each(ops.push, [({key: part},) for part in parts], block=block,
                              ids=ids, single=False, fname="scatter", postprocess=_none)

    def gather(self, key: str, *, block: bool | None = None, targets: Targets = None) -> Any:
        """Pull ``key`` from every engine and join the parts, in engine order."""
        ids, _ = self._resolve_targets(targets)
        return self._run(ops.pull, (key,), {}, block=block, targets=list(ids),
                         postprocess=_partition.join, fname="gather")

    def sync_imports(self, local: bool = True, quiet: bool = False) -> Any:
        """Imports inside this ``with`` block happen on the engines too.

        >>> with rc[:].sync_imports():
        ...     import numpy
        importing numpy on engine(s)

        Args:
            local: also import here (with False, names bind to placeholders locally).
            quiet: do not print what is imported.
        """
        from ._imports import SyncImports

        return SyncImports(self, local=local, quiet=quiet)

    # -- decorators -------------------------------------------------------------------------
    def remote(self, block: bool | None = None) -> Callable[[Callable], Callable]:
        """Decorate a function so that calling it runs it on this view's engines.

        >>> @e0.remote(block=True)
        ... def getpid():
        ...     import os
        ...     return os.getpid()
        """

        def decorate(f: Callable) -> Callable:
            @functools.wraps(f)
            def call(*args: Any, **kwargs: Any) -> Any:
                return self._run(f, args, kwargs, block=block)

            return call

        return decorate

    def parallel(self, block: bool | None = None) -> Callable[[Callable], ParallelFunction]:
        """Decorate a function to run on parts of its sequence arguments, one per engine.

        Calling the result splits every argument across the engines, calls the function
        on each part and joins the results; ``.map(...)`` calls it element-wise instead.

        >>> @rc[:].parallel(block=True)
        ... def pmul(a, b):
        ...     return a * b            # with numpy arrays: element-wise on each part
        """

        def decorate(f: Callable) -> ParallelFunction:
            return ParallelFunction(self, f, block=block)

        return decorate


def _none(_: Any) -> None:
    return None


def _msg_ids(jobs: Any) -> list[str]:
    if jobs is None:
        return []
    if isinstance(jobs, (str, AsyncResult)):
        jobs = [jobs]
    out: list[str] = []
    for job in jobs:
        out.extend(job.msg_ids if isinstance(job, AsyncResult) else [str(job)])
    return out


def _pickle_call(f: Callable, args: tuple, kwargs: dict, name: str,
                 code_files: set[str]) -> list:
    if not callable(f):
        raise TypeError(f"apply() needs a callable, got {type(f).__name__}")
    try:
        return _serialize.dumps_call(f, args, kwargs, what=f"the function {name}",
                                     code_files=code_files)
    except SerializationError as exc:
        if not str(exc).startswith("cannot pickle the arguments"):
            raise
        # Name the culprit: which argument.
        parts = [(f"argument {i + 1} of {name}()", a) for i, a in enumerate(args)]
        parts += [(f"keyword argument {k!r} of {name}()", v) for k, v in kwargs.items()]
        for what, obj in parts:
            try:
                _serialize.dumps(obj, what=what)
            except SerializationError as culprit:
                raise culprit from exc.__cause__
        raise


class ParallelFunction:
    """A function that runs split across a view's engines (see :meth:`DirectView.parallel`)."""

    def __init__(self, view: DirectView, f: Callable, *, block: bool | None = None) -> None:
        self.view = view
        self.func = f
        self.block = block
        functools.update_wrapper(self, f)

    def __call__(self, *sequences: Any) -> Any:
        view = self.view
        ids, _ = view._resolve_targets()
        split = [_partition.split(seq, len(ids)) for seq in sequences]
        per_engine = [(self.func, *(parts[i] for parts in split)) for i in range(len(ids))]
        name = getattr(self.func, "__name__", "f")
        return view._run_each(ops.call_chunk, per_engine, block=self.block, ids=ids,
                              single=False, fname=name, postprocess=_partition.join,
                              result_class=AsyncMapResult)

    def map(self, *sequences: Any) -> Any:
        return self.view.map(self.func, *sequences, block=self.block)
