"""The engine daemon, driven over its Unix socket with real frames (no SSH, no Client).

Engines are started by the bundle's own launcher (see conftest.py). Functions sent to them
are builtins, sshpar._engine.ops functions, or functions compiled here into a namespace named
``__main__`` so cloudpickle ships them by value: the engine runs from the bundle and cannot
import this test module.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import struct
import sys
import textwrap
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

from sshpar import _serialize, _wire
from sshpar._engine import ops
from sshpar._stream import client_handshake
from sshpar._wire import HEADER, MAGIC, VERSION, Frame, Kind
from sshpar.errors import ProtocolError

from .conftest import (
    EXIT_TIMEOUT,
    Engine,
    EngineLauncher,
    Launch,
    has_exited,
    wait_for_exit,
    wait_until,
)

T = TypeVar("T")
#: Bound on each read from an engine; only a hang (a bug) ever gets near it.
WAIT = 20.0
SCENARIO_TIMEOUT = 60.0


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro_fn(), SCENARIO_TIMEOUT)

    return asyncio.run(bounded())


def main_function(source: str, name: str) -> Callable[..., Any]:
    """A function as if typed at the client's prompt: cloudpickle sends it by value."""
    ns: dict[str, Any] = {"__name__": "__main__"}
    exec(compile(textwrap.dedent(source), f"<client {name}>", "exec"), ns)  # noqa: S102
    return ns[name]


class EngineClient:
    """A bare client of one engine: handshake, then frames, each read bounded by WAIT."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 codec: _wire.Codec, hello: Frame) -> None:
        self.reader = reader
        self.writer = writer
        self.codec = codec
        self.hello = hello
        self.pending: list[Frame] = []
        self._unbatched: list[Frame] = []

    @classmethod
    async def connect(cls, engine: Engine, key: bytes | None = None) -> EngineClient:
        reader, writer = await asyncio.open_unix_connection(engine.socket)
        try:
            codec = await asyncio.wait_for(
                client_handshake(reader, writer, engine.key if key is None else key),
                WAIT)
            hello = await asyncio.wait_for(codec.read(reader), WAIT)
        except BaseException:
            writer.close()
            raise
        assert hello.kind is Kind.REPLY and hello.meta["op"] == "hello", hello
        return cls(reader, writer, codec, hello)

    def encode(self, kind: Kind, meta: dict, payload: Any = ()) -> bytes:
        return b"".join(bytes(b) for b in self.codec.encode(kind, meta, payload))

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send(self, kind: Kind, meta: dict, payload: Any = ()) -> None:
        self.writer.writelines(self.codec.encode(kind, meta, payload))
        await self.writer.drain()

    async def submit(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> str:
        msg_id = uuid.uuid4().hex
        await self.send(Kind.TASK, {"msg_id": msg_id},
                        _serialize.dumps_call(f, args, kwargs, what="f", code_files=set()))
        return msg_id

    async def read(self) -> Frame:
        """The next frame; a batch of results comes out one result at a time."""
        if not self._unbatched:
            frame = await self.read_frame()
            if not (frame.kind is Kind.RESULT and "batch" in frame.meta):
                return frame
            self._unbatched = [Frame(Kind.RESULT, m, p)
                               for m, p in _wire.split_batch(frame.meta, frame.payload)]
        return self._unbatched.pop(0)

    async def read_frame(self) -> Frame:
        return await asyncio.wait_for(self.codec.read(self.reader), WAIT)

    async def result(self, msg_id: str) -> tuple[dict, Any, list[Frame]]:
        """Read until ``msg_id``'s RESULT: its meta, its value (or None) and its OUTPUTs."""
        outputs = []
        while True:
            frame = await self.read()
            if frame.meta.get("msg_id") != msg_id:
                self.pending.append(frame)
                continue
            if frame.kind is Kind.OUTPUT:
                outputs.append(frame)
                continue
            assert frame.kind is Kind.RESULT, frame
            value = _serialize.loads(frame.payload) if frame.payload else None
            return frame.meta, value, outputs

    async def call(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        meta, value, _ = await self.result(await self.submit(f, *args, **kwargs))
        assert meta["status"] == "ok", meta["error"] and meta["error"]["traceback"]
        return value

    async def control(self, op: str, **kw: Any) -> dict:
        req = uuid.uuid4().hex
        await self.send(Kind.CONTROL, {"op": op, "req": req, **kw})
        while True:
            frame = await self.read()
            if frame.kind is Kind.REPLY and frame.meta.get("req") == req:
                return frame.meta
            self.pending.append(frame)

    async def assert_dropped(self) -> None:
        """The engine hung up: EOF (or a reset, when it closed with our bytes unread)."""
        try:
            rest = await asyncio.wait_for(self.reader.read(), WAIT)
        except ConnectionResetError:
            return
        assert rest == b"", f"engine sent {len(rest)} bytes instead of hanging up"

    async def close(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), WAIT)
        except (ConnectionError, BrokenPipeError):
            pass


# -- start and identity -----------------------------------------------------------------------

def test_launcher_reports_each_engine_ready_with_its_socket(shared_launch: Launch) -> None:
    doc = shared_launch.doc
    assert doc["python"][:2] == list(sys.version_info[:2])
    (eng,) = shared_launch.engines
    assert len(eng.uuid) == 16
    assert not has_exited(eng.pid)
    assert stat.S_ISSOCK(os.stat(eng.socket).st_mode)
    assert os.path.dirname(eng.socket) == doc["runtime_dir"]
    assert Path(eng.log).is_file()


def test_hello_identifies_the_engine(engine: Engine) -> None:
    async def scenario() -> dict:
        c = await EngineClient.connect(engine)
        await c.close()
        return c.hello.meta

    hello = run(scenario)
    assert hello["uuid"] == engine.uuid
    assert hello["pid"] == engine.pid
    assert hello["python"][:2] == list(sys.version_info[:2])
    assert hello["started"] <= hello["time"]


def test_engine_runs_the_bundle_not_the_installed_package(engine: Engine,
                                                          module_launcher: EngineLauncher
                                                          ) -> None:
    where = main_function("""
        def where():
            import sys
            return {n: getattr(sys.modules[n], "__file__", None)
                    for n in ("sshpar", "sshpar._wire", "sshpar._engine.ops", "cloudpickle")}
    """, "where")

    async def scenario() -> dict:
        c = await EngineClient.connect(engine)
        try:
            return await c.call(where)
        finally:
            await c.close()

    files = run(scenario)
    assert all(f.startswith(str(module_launcher.bundle)) for f in files.values()), files


def test_key_never_appears_in_argv_or_environment(engine: Engine) -> None:
    key = engine.key.hex().encode()
    assert key not in Path(f"/proc/{engine.pid}/cmdline").read_bytes()
    assert key not in Path(f"/proc/{engine.pid}/environ").read_bytes()


def test_runtime_dir_is_private_and_socket_owner_only(shared_launch: Launch) -> None:
    (eng,) = shared_launch.engines
    run_dir = os.stat(os.path.dirname(eng.socket))
    assert stat.S_ISDIR(run_dir.st_mode)
    assert stat.S_IMODE(run_dir.st_mode) == 0o700
    assert run_dir.st_uid == os.getuid()
    sock = os.stat(eng.socket)
    assert stat.S_ISSOCK(sock.st_mode)
    assert stat.S_IMODE(sock.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(eng.log).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(eng.log)).st_mode) == 0o700


def test_launch_leaves_an_existing_workdirs_permissions_alone(launcher: EngineLauncher,
                                                              tmp_path: Path) -> None:
    workdir = tmp_path / "shared-project"
    workdir.mkdir()
    workdir.chmod(0o755)
    (eng,) = launcher.launch(workdir=workdir).engines
    assert stat.S_IMODE(os.stat(os.path.dirname(eng.socket)).st_mode) == 0o700
    assert stat.S_IMODE(workdir.stat().st_mode) == 0o755


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a directory owned by "
                    "another user")
def test_launcher_refuses_a_runtime_dir_owned_by_someone_else(launcher: EngineLauncher,
                                                              tmp_path: Path) -> None:
    workdir = tmp_path / "w"
    run_dir = workdir / "run" / "t"
    assert len(str(run_dir)) + 22 <= 100, "path too long: the launcher would use /tmp instead"
    run_dir.mkdir(parents=True, mode=0o700)
    os.chown(run_dir, 65534, 65534)
    proc = launcher.run_launcher({"key": os.urandom(32).hex(), "cluster": "t", "engines": 1,
                                  "workdir": str(workdir), "idle_timeout": 0})
    assert proc.returncode == 3, proc.stderr
    (line,) = proc.stdout.splitlines()
    assert line.startswith("SSHPAR-ERROR ")
    doc = json.loads(line[len("SSHPAR-ERROR "):])
    assert doc["kind"] == "runtime"
    assert str(run_dir) in doc["message"] and "owned by uid 65534" in doc["message"]
    assert list(run_dir.iterdir()) == []  # no engine bound a socket there


# -- running tasks ----------------------------------------------------------------------------

def test_simple_call_returns_its_value_and_metadata(engine: Engine) -> None:
    async def scenario() -> tuple[dict, Any, list[Frame]]:
        c = await EngineClient.connect(engine)
        try:
            return await c.result(await c.submit(pow, 2, 10))
        finally:
            await c.close()

    meta, value, outputs = run(scenario)
    assert value == 1024
    assert meta["status"] == "ok"
    assert meta["error"] is None
    assert meta["result_type"] == "builtins.int"
    assert 0 < meta["started"] <= meta["completed"]
    assert (meta["stdout"], meta["stderr"], outputs) == ("", "", [])


def _append_task(name: str, i: int) -> list:
    return _serialize.dumps_call(ops.execute, (f"{name}.append({i})",), {}, what="execute",
                                 code_files=set())


@pytest.mark.parametrize("framing", ["a frame each", "one batch frame"])
def test_tasks_run_in_the_order_sent(engine: Engine, framing: str) -> None:
    name = f"order_{uuid.uuid4().hex[:8]}"

    async def scenario() -> tuple[list[str], list[str], list[int]]:
        c = await EngineClient.connect(engine)
        try:
            await c.call(ops.push, {name: []})
            items = [({"msg_id": uuid.uuid4().hex}, _append_task(name, i)) for i in range(20)]
            if framing == "one batch frame":
                await c.send(Kind.TASK, *_wire.join_batch(items))
            else:
                for meta, payload in items:  # all queued before the first result is read
                    await c.send(Kind.TASK, meta, payload)
            received: list[str] = []
            while len(received) < len(items):  # results come one per frame or batched
                frame = await c.read()
                assert frame.kind is Kind.RESULT and frame.meta["status"] == "ok", frame.meta
                received.append(frame.meta["msg_id"])
            return [m["msg_id"] for m, _ in items], received, await c.call(ops.pull, name)
        finally:
            await c.close()

    sent, received, order = run(scenario)
    assert received == sent
    assert order == list(range(20))


def test_a_function_sent_once_is_referred_to_by_its_digest_on_that_connection(
        engine: Engine) -> None:
    name = f"fn_{uuid.uuid4().hex[:8]}"

    async def scenario() -> tuple[list[str], list[int]]:
        c = await EngineClient.connect(engine)
        try:
            await c.call(ops.push, {name: []})
            first = _append_task(name, 0)
            digest = _wire.function_digest(first[0])
            statuses = []
            await c.send(Kind.TASK, {"msg_id": "k0", "fn_keep": digest}, first)
            for i in (1, 2):
                await c.send(Kind.TASK, {"msg_id": f"k{i}", "fn": digest},
                             [b"", *_append_task(name, i)[1:]])
            for i in range(3):
                meta, _, _ = await c.result(f"k{i}")
                statuses.append(meta["status"])
            return statuses, await c.call(ops.pull, name)
        finally:
            await c.close()

    statuses, ran = run(scenario)
    assert statuses == ["ok"] * 3
    assert ran == [0, 1, 2]


def test_task_output_is_streamed_and_kept_in_the_result(engine: Engine) -> None:
    chatty = main_function("""
        def chatty(n):
            import sys
            for i in range(n):
                print("out", i)
                print("err", i, file=sys.stderr)
            sys.stdout.write("no newline")
            return n
    """, "chatty")

    async def scenario() -> tuple[dict, Any, list[Frame]]:
        c = await EngineClient.connect(engine)
        try:
            return await c.result(await c.submit(chatty, 3))
        finally:
            await c.close()

    meta, value, outputs = run(scenario)
    assert value == 3
    assert meta["stdout"] == "out 0\nout 1\nout 2\nno newline"
    assert meta["stderr"] == "err 0\nerr 1\nerr 2\n"
    streamed = {"stdout": "", "stderr": ""}
    for frame in outputs:
        streamed[frame.meta["name"]] += frame.meta["text"]
    assert streamed == {"stdout": meta["stdout"], "stderr": meta["stderr"]}


def test_exception_becomes_an_error_result_with_its_traceback(engine: Engine) -> None:
    fail = main_function("""
        def helper(x):
            raise ValueError(f"bad value {x}")

        def fail(x):
            try:
                helper(x)
            except ValueError as exc:
                raise KeyError("wrapped") from exc
    """, "fail")

    async def scenario() -> dict:
        c = await EngineClient.connect(engine)
        try:
            meta, value, _ = await c.result(await c.submit(fail, 7))
            assert value is None and meta["result_type"] == ""
            return meta
        finally:
            await c.close()

    meta = run(scenario)
    assert meta["status"] == "error"
    err = meta["error"]
    assert err["ename"] == "KeyError"
    assert err["etype"] == "builtins.KeyError"
    assert err["evalue"] == "'wrapped'"
    assert "KeyError: 'wrapped'" in err["traceback"]
    assert "ValueError: bad value 7" in err["traceback"]
    # The user's frames only: the engine's own (executor) frames are cut off.
    assert [f["name"] for f in err["frames"]] == ["fail"]
    assert all("executor.py" not in f["filename"] for f in err["frames"])
    (cause,) = err["chain"]
    assert (cause["ename"], cause["evalue"], cause["explicit"]) == ("ValueError",
                                                                     "bad value 7", True)
    assert [f["name"] for f in cause["frames"]] == ["fail", "helper"]


def test_executed_code_error_shows_the_remote_source_line(engine: Engine) -> None:
    async def scenario() -> dict:
        c = await EngineClient.connect(engine)
        try:
            meta, _, _ = await c.result(await c.submit(ops.execute, "x = 1\ny = x / 0\n"))
            return meta
        finally:
            await c.close()

    meta = run(scenario)
    err = meta["error"]
    assert err["ename"] == "ZeroDivisionError"
    last = err["frames"][-1]
    assert last["filename"].startswith("<execute-")
    assert last["lineno"] == 2
    assert last["line"] == "y = x / 0"
    assert "y = x / 0" in last["lines"]


def test_sys_exit_in_a_task_is_an_error_not_an_engine_exit(engine: Engine) -> None:
    async def scenario() -> tuple[dict, int]:
        c = await EngineClient.connect(engine)
        try:
            meta, _, _ = await c.result(await c.submit(ops.execute, "import sys; sys.exit(5)"))
            return meta, await c.call(pow, 3, 2)
        finally:
            await c.close()

    meta, after = run(scenario)
    assert meta["status"] == "error" and meta["error"]["ename"] == "SystemExit"
    assert after == 9
    assert not has_exited(engine.pid)


def test_payload_that_does_not_unpickle_is_an_error_result(engine: Engine) -> None:
    async def scenario() -> tuple[dict, int]:
        c = await EngineClient.connect(engine)
        try:
            await c.send(Kind.TASK, {"msg_id": "junk"}, [b"\x80\x05not a pickle"])
            meta, _, _ = await c.result("junk")
            return meta, await c.call(pow, 2, 5)
        finally:
            await c.close()

    meta, after = run(scenario)
    assert meta["status"] == "error"
    assert meta["error"]["ename"] == "UnpicklingError"
    assert after == 32


def test_push_pull_and_execute_share_the_engine_namespace(engine: Engine) -> None:
    suffix = uuid.uuid4().hex[:8]
    a, b = f"a_{suffix}", f"b_{suffix}"
    reads_global = main_function(f"""
        def reads_global(k):
            return {a} * k
    """, "reads_global")

    async def scenario() -> tuple[Any, ...]:
        c = await EngineClient.connect(engine)
        try:
            await c.call(ops.push, {a: 5, b: "text"})
            one = await c.call(ops.pull, a)
            both = await c.call(ops.pull, (a, b))
            await c.call(ops.execute, f"{a} = {a} + 1")
            via_function = await c.call(reads_global, 10)
            meta, _, _ = await c.result(await c.submit(ops.pull, f"missing_{suffix}"))
            bad_push, _, _ = await c.result(await c.submit(ops.push, {"not a name": 1}))
            return one, both, via_function, meta["error"], bad_push["error"]
        finally:
            await c.close()

    one, both, via_function, missing, bad_push = run(scenario)
    assert one == 5
    assert both == [5, "text"]
    assert via_function == 60  # the shipped function reads the engine's `a`, now 6
    assert missing["ename"] == "NameError" and f"missing_{suffix}" in missing["evalue"]
    assert bad_push["ename"] == "NameError"


def test_large_numpy_array_round_trips_through_the_namespace(engine: Engine) -> None:
    name = f"arr_{uuid.uuid4().hex[:8]}"
    array = np.arange(3 << 17, dtype=np.float64)  # 3 MiB: large frames both ways

    async def scenario() -> tuple[Any, float]:
        c = await EngineClient.connect(engine)
        try:
            await c.call(ops.push, {name: array})
            await c.call(ops.execute, f"{name} *= 2")  # in place: needs a writable array
            back = await c.call(ops.pull, name)
            await c.call(ops.execute, f"{name}_sum = float({name}.sum())")
            total = await c.call(ops.pull, f"{name}_sum")
            return back, total
        finally:
            await c.close()

    back, total = run(scenario)
    np.testing.assert_array_equal(back, array * 2)
    assert back.flags.writeable
    assert total == float((array * 2).sum())


def test_small_numpy_array_pushed_can_be_modified_in_place(engine: Engine) -> None:
    name = f"small_{uuid.uuid4().hex[:8]}"

    async def scenario() -> Any:
        c = await EngineClient.connect(engine)
        try:
            await c.call(ops.push, {name: np.zeros(10)})
            await c.call(ops.execute, f"{name}[0] = 1.0")
            return await c.call(ops.pull, name)
        finally:
            await c.close()

    assert run(scenario)[0] == 1.0


# -- control operations -----------------------------------------------------------------------

def test_info_reports_identity_and_counts(engine: Engine) -> None:
    async def scenario() -> dict:
        c = await EngineClient.connect(engine)
        try:
            return await c.control("info")
        finally:
            await c.close()

    info = run(scenario)
    assert info["op"] == "info"
    assert info["uuid"] == engine.uuid and info["pid"] == engine.pid
    assert info["queued"] == 0
    assert isinstance(info["unacked"], int)


def test_ack_lets_the_engine_forget_results(engine: Engine) -> None:
    async def scenario() -> tuple[int, int, int]:
        c = await EngineClient.connect(engine)
        try:
            before = (await c.control("info"))["unacked"]
            ids = [await c.submit(pow, 2, i) for i in range(3)]
            for msg_id in ids:
                await c.result(msg_id)
            kept = (await c.control("info"))["unacked"]
            await c.send(Kind.CONTROL, {"op": "ack", "msg_ids": ids[:2]})  # no reply
            after = (await c.control("info"))["unacked"]  # frames are handled in order
            await c.send(Kind.CONTROL, {"op": "ack", "msg_ids": [ids[2], "never-existed"]})
            return before, kept - before, after - before
        finally:
            await c.close()

    _before, added, after_ack = run(scenario)
    assert added == 3
    assert after_ack == 1


def test_unknown_control_operation_gets_an_error_reply(engine: Engine) -> None:
    async def scenario() -> tuple[dict, int]:
        c = await EngineClient.connect(engine)
        try:
            return await c.control("frobnicate"), await c.call(pow, 2, 2)
        finally:
            await c.close()

    reply, after = run(scenario)
    assert reply["op"] == "frobnicate"
    assert "unknown control operation 'frobnicate'" in reply["error"]
    assert after == 4


# -- refusing clients and frames that are not genuine ------------------------------------------

def test_client_with_the_wrong_key_is_refused_and_the_engine_keeps_serving(
        engine: Engine) -> None:
    async def scenario() -> tuple[BaseException | None, int]:
        refused: BaseException | None = None
        try:
            c = await EngineClient.connect(engine, key=os.urandom(32))
            await c.close()
        except (ProtocolError, asyncio.IncompleteReadError, ConnectionError) as exc:
            refused = exc
        good = await EngineClient.connect(engine)
        try:
            return refused, await good.call(pow, 7, 2)
        finally:
            await good.close()

    refused, value = run(scenario)
    assert refused is not None, "a client without the key completed the handshake"
    assert value == 49
    assert "handshake refused: client did not prove the cluster key" in engine.log_text()


def _counter_task(name: str) -> list:
    return _serialize.dumps_call(ops.execute, (f"{name} = globals().get({name!r}, 0) + 1",), {},
                                 what="execute", code_files=set())


async def _attack_garbage(attacker: EngineClient, engine: Engine, name: str) -> None:
    await attacker.write(b"\x00\x01GET / HTTP/1.1\r\nHost: engine\r\n\r\n" * 4)


async def _attack_truncated(attacker: EngineClient, engine: Engine, name: str) -> None:
    data = attacker.encode(Kind.TASK, {"msg_id": "cut"}, _counter_task(name))
    await attacker.write(data[: len(data) // 2])
    attacker.writer.write_eof()


async def _attack_oversized(attacker: EngineClient, engine: Engine, name: str) -> None:
    # Only the header and a length of 3 GiB: the engine must refuse without the body.
    await attacker.write(HEADER.pack(MAGIC, VERSION, int(Kind.TASK), 0, 0, 1)
                         + struct.pack("!Q", 3 << 30))


async def _attack_wrong_mac(attacker: EngineClient, engine: Engine, name: str) -> None:
    data = bytearray(attacker.encode(Kind.TASK, {"msg_id": "forged"}, _counter_task(name)))
    nseg = HEADER.unpack_from(data)[5]
    data[HEADER.size + 8 * nseg + 5] ^= 0xFF  # inside the MAC
    await attacker.write(bytes(data))


async def _attack_replay(attacker: EngineClient, engine: Engine, name: str) -> None:
    data = attacker.encode(Kind.TASK, {"msg_id": "replayed"}, _counter_task(name))
    await attacker.write(data)
    meta, _, _ = await attacker.result("replayed")
    assert meta["status"] == "ok"
    await attacker.write(data)


async def _attack_cross_connection(attacker: EngineClient, engine: Engine,
                                   name: str) -> None:
    # A frame captured on another connection (sequence number 0 there, as here) is sent
    # on the attacker's: different nonces, so different keys.
    fresh = await EngineClient.connect(engine)
    try:
        data = fresh.encode(Kind.TASK, {"msg_id": "captured"}, _counter_task(name))
        await fresh.write(data)
        meta, _, _ = await fresh.result("captured")
        assert meta["status"] == "ok"
    finally:
        await fresh.close()
    await attacker.write(data)


async def _attack_result_from_client(attacker: EngineClient, engine: Engine,
                                     name: str) -> None:
    await attacker.send(Kind.RESULT, {"msg_id": "x", "status": "ok"})


async def _attack_task_without_msg_id(attacker: EngineClient, engine: Engine,
                                      name: str) -> None:
    await attacker.send(Kind.TASK, {"op": "apply"}, _counter_task(name))


async def _attack_batch_that_does_not_add_up(attacker: EngineClient, engine: Engine,
                                             name: str) -> None:
    # Two tasks announced, segments for one: the whole frame is refused, nothing runs.
    payload = _counter_task(name)
    await attacker.send(Kind.TASK, {"batch": [{"msg_id": "a"}, {"msg_id": "b"}],
                                    "segs": [len(payload), len(payload)]}, payload)


async def _attack_unknown_function_reference(attacker: EngineClient, engine: Engine,
                                             name: str) -> None:
    payload = _counter_task(name)
    await attacker.send(Kind.TASK, {"msg_id": "r", "fn": _wire.function_digest(payload[0])},
                        [b"", *payload[1:]])


#: attack -> (coroutine, times its task must have run, why the engine's log says it hung up)
ATTACKS: dict[str, tuple[Callable[..., Awaitable[None]], int, str | None]] = {
    "garbage": (_attack_garbage, 0, "bad frame magic"),
    "truncated": (_attack_truncated, 0, None),  # an ordinary EOF: nothing to log
    "oversized": (_attack_oversized, 0, f"exceeds the limit of {_wire.MAX_FRAME_BYTES}"),
    "wrong-mac": (_attack_wrong_mac, 0, "does not verify"),
    "replay": (_attack_replay, 1, "out of sequence"),  # ran once, never twice
    "cross-connection-replay": (_attack_cross_connection, 1, "does not verify"),
    "result-from-client": (_attack_result_from_client, 0, "unexpected RESULT frame"),
    "task-without-msg-id": (_attack_task_without_msg_id, 0, "msg_id"),
    "malformed-batch": (_attack_batch_that_does_not_add_up, 0, "malformed batch frame"),
    "unknown-function": (_attack_unknown_function_reference, 0, "never sent on this connection"),
}
_ATTACK_PARAMS = list(ATTACKS)


@pytest.mark.parametrize("attack", _ATTACK_PARAMS)
def test_bad_frame_drops_only_its_connection(engine: Engine, attack: str) -> None:
    do_attack, runs, logged = ATTACKS[attack]
    name = f"ran_{uuid.uuid4().hex[:8]}"
    log_start = len(engine.log_text())

    async def scenario() -> tuple[int, int]:
        good = await EngineClient.connect(engine)
        attacker = await EngineClient.connect(engine)
        try:
            assert await good.call(pow, 2, 3) == 8
            try:
                await do_attack(attacker, engine, name)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the engine hung up while we were still writing: that is the point
            await attacker.assert_dropped()
            value = await good.call(pow, 2, 4)
            await good.call(ops.execute, f"{name} = globals().get({name!r}, 0)")
            ran = await good.call(ops.pull, name)
            return value, ran
        finally:
            await attacker.close()
            await good.close()

    value, ran = run(scenario)
    assert value == 16, "the good connection stopped working"
    assert ran == runs, f"the attack's task ran {ran} time(s), expected {runs}"
    assert not has_exited(engine.pid)
    # The engine logged the refusal while handling the attacker, before it served the good
    # connection's later task, so the line is there by now.
    log = engine.log_text()[log_start:]
    assert "Traceback" not in log, log
    if logged is not None:
        refusals = [ln for ln in log.splitlines() if "dropped a client" in ln]
        assert len(refusals) == 1 and logged in refusals[0], log


# -- ending -----------------------------------------------------------------------------------

def test_shutdown_stops_that_engine_and_removes_its_socket(launcher: EngineLauncher) -> None:
    first, second = launcher.launch(engines=2).engines
    assert first.uuid != second.uuid and first.socket != second.socket

    async def scenario() -> tuple[dict, int]:
        c = await EngineClient.connect(first)
        try:
            reply = await c.control("shutdown")
            await c.assert_dropped()
        finally:
            await c.close()
        other = await EngineClient.connect(second)
        try:
            return reply, await other.call(pow, 5, 2)
        finally:
            await other.close()

    reply, value = run(scenario)
    assert reply["op"] == "shutdown"
    assert wait_for_exit(first.pid, EXIT_TIMEOUT), "engine still running after shutdown"
    assert not os.path.exists(first.socket)
    assert value == 25, "the other engine should be unaffected"
    assert not has_exited(second.pid)


def test_sigterm_stops_the_engine_and_removes_its_socket(launcher: EngineLauncher) -> None:
    (eng,) = launcher.launch().engines
    os.kill(eng.pid, signal.SIGTERM)
    assert wait_for_exit(eng.pid, EXIT_TIMEOUT), "engine ignored SIGTERM"
    assert not os.path.exists(eng.socket)


def test_a_sigterm_another_thread_takes_still_stops_an_idle_engine(
        launcher: EngineLauncher) -> None:
    # The kernel may hand a process-directed signal to any thread. Python then only sets a
    # flag for the main thread, which, idle in epoll_wait with a client connected, would
    # never look at it: the engine must wake up and exit all the same.
    (eng,) = launcher.launch().engines
    send_later = main_function("""
        def send_later():
            import os, signal, threading, time
            main = os.getpid()  # the main thread's tid (threading's may predate a fork)
            def run():
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:  # until the engine waits for work again
                    with open(f"/proc/self/task/{main}/wchan") as f:
                        if "epoll" in f.read():
                            break
                    time.sleep(0.001)
                signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
            threading.Thread(target=run, daemon=True).start()
            return os.getpid()
        """, "send_later")

    async def scenario() -> tuple[int, bool]:
        c = await EngineClient.connect(eng)
        try:
            pid = await c.call(send_later)
            # still connected, and sending nothing: only the signal can wake the engine
            return pid, wait_for_exit(eng.pid, EXIT_TIMEOUT)
        finally:
            await c.close()

    pid, exited = run(scenario)
    assert pid == eng.pid
    assert exited, "the engine sat on a SIGTERM that another thread received"


def test_idle_engine_exits_after_its_last_client_leaves(launcher: EngineLauncher) -> None:
    # 2 s rather than 1 leaves the engine's first idle period (from start to our connect)
    # comfortably longer than a loaded machine takes to connect.
    (eng,) = launcher.launch(idle_timeout=2).engines

    async def scenario() -> int:
        c = await EngineClient.connect(eng)
        try:
            return await c.call(pow, 2, 8)
        finally:
            await c.close()

    assert run(scenario) == 256
    assert wait_for_exit(eng.pid, EXIT_TIMEOUT), "idle engine did not exit"
    assert not os.path.exists(eng.socket)
    assert "no client for 2 s: exiting" in eng.log_text()


def test_idle_timeout_does_not_kill_a_running_task(launcher: EngineLauncher,
                                                   tmp_path: Path) -> None:
    (eng,) = launcher.launch(idle_timeout=1).engines
    done = tmp_path / "task-finished"
    # The task outlasts idle_timeout on purpose: that is the situation under test, not a
    # synchronisation (the test waits on the file and on the process, whichever comes first).
    slow = main_function(f"""
        def slow():
            import time
            time.sleep(3)
            open({str(done)!r}, "w").close()
    """, "slow")

    async def scenario() -> None:
        c = await EngineClient.connect(eng)
        try:
            await c.submit(slow)
        finally:
            await c.close()  # the client goes away; its task keeps running

    run(scenario)
    assert wait_until(lambda: done.exists() or has_exited(eng.pid), EXIT_TIMEOUT)
    assert done.exists(), "the engine idled out and exited while its task was running"
