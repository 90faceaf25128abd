"""The `sshpar` command, end to end: the real command in subprocesses against a real sshd.

Every command runs as `python -m sshpar.cli ...` with its own SSHPAR_HOME, so the cluster
files are the command's own; later Python processes reconnect through them like a user would.
Engines started here are stopped at teardown (and killed if stopping fails).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sshpar.cli import main, parse_targets
from tests.helpers import (
    alive,
    engine_processes,
    stop_kept_launchers,
    wait_gone,
    wait_until,
)

pytestmark = pytest.mark.ssh

COMMAND_TIMEOUT = 60
HOST = "127.0.0.1"


class Cli:
    """Runs `sshpar` (and plain Python) in subprocesses that share one SSHPAR_HOME.

    Everything of a test lives under ``base``: SSHPAR_HOME is ``base/home`` and engine workdirs
    go below ``base`` too, so its engine processes (nannies included) are found by path.
    """

    def __init__(self, base: Path) -> None:
        self.base = base
        self.home = base / "home"
        # A wide, colourless console: tables never wrap and assertions see plain text.
        self.env = {**os.environ, "SSHPAR_HOME": str(self.home), "COLUMNS": "200",
                    "NO_COLOR": "1", "PYTHONIOENCODING": "utf-8"}

    def __call__(self, *args: object, input: str | None = None) -> subprocess.CompletedProcess:
        return self.python("-m", "sshpar.cli", *args, input=input)

    def python(self, *args: object, input: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *map(str, args)], env=self.env, input=input,
                              capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
                              check=False)

    def ok(self, *args: object) -> subprocess.CompletedProcess:
        proc = self(*args)
        assert proc.returncode == 0, f"sshpar {args} exited {proc.returncode}:\n{proc.stderr}"
        return proc

    def json(self, *args: object) -> dict:
        return json.loads(self.ok(*args, "--json").stdout)

    def cluster_file(self, name: str) -> Path:
        return self.home / "clusters" / f"{name}.json"

    def engines(self) -> list[tuple[int, str]]:
        """(pid, socket) of every engine in every cluster file of this home."""
        found = []
        for path in sorted((self.home / "clusters").glob("*.json")):
            found += [(e["pid"], e["socket"]) for e in json.loads(path.read_text())["engines"]]
        return found

    def processes(self) -> list[int]:
        """Engines and nannies (live, not zombies) running a bundle below ``base``."""
        return engine_processes(self.base)

    def cleanup(self) -> None:
        """Stop every cluster; kill engines that survive (e.g. on a host that went away)."""
        if self.engines():
            self("stop", "--all", "--force")
        left = self.processes()
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_gone(left)
        stop_kept_launchers(self.base)


@pytest.fixture
def cli(tmp_path):
    runner = Cli(tmp_path)
    yield runner
    runner.cleanup()


@pytest.fixture(scope="module")
def cluster(sshd_session, tmp_path_factory):
    """A two-engine cluster started by `sshpar start`: (runner, that command, hosts file)."""
    base = tmp_path_factory.mktemp("cli")
    runner = Cli(base)
    hosts = sshd_session.hosts_yaml(base / "hosts.yaml", engines=2, workdir=base / "w",
                                    name="clitest")
    started = runner("start", "-f", hosts)
    try:
        assert started.returncode == 0, started.stderr
        yield runner, started, hosts
    finally:
        runner.cleanup()


def _pids(runner: Cli, name: str = "clitest") -> list[int]:
    return [e["pid"] for e in json.loads(runner.cluster_file(name).read_text())["engines"]]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# -- start, status, exec, run against one cluster -------------------------------------------------
def test_start_lists_every_engine_and_reuses_a_running_cluster(cluster):
    runner, started, hosts = cluster
    pids = _pids(runner)
    assert len(pids) == 2
    for line in ("connecting", "ready: 2 engine(s)", "cluster clitest"):
        assert line in started.stdout
    for engine_id, pid in enumerate(pids):
        assert f"│ {engine_id}  │" in started.stdout and str(pid) in started.stdout
    assert runner.cluster_file("clitest").stat().st_mode & 0o777 == 0o600

    doc = runner.json("start", "-f", hosts)
    assert doc["reused"] is True and doc["errors"] == {}
    assert [(e["id"], e["pid"]) for e in doc["engines"]] == list(enumerate(pids))
    assert runner.ok("start", "-f", hosts).stdout.startswith(
        "starting cluster clitest on 1 host(s)\ncluster clitest is already running")


def test_status_shows_every_engine_idle(cluster):
    runner, _, _ = cluster
    out = runner.ok("status").stdout
    assert "cluster clitest (default)" in out
    assert out.count(" idle ") == 2 and platform.python_version() in out

    doc = runner.json("status", "clitest")
    assert [r["state"] for r in doc["engines"]] == ["idle", "idle"]
    assert [r["pid"] for r in doc["engines"]] == _pids(runner)
    assert {r["python"] for r in doc["engines"]} == {platform.python_version()}
    assert [d["cluster"] for d in runner.json("status", "--all")] == ["clitest"]


def test_exec_prints_each_engines_output(cluster):
    runner, _, _ = cluster
    pids = _pids(runner)
    proc = runner.ok("exec", "import os, sys; print('pid', os.getpid()); "
                             "print('to stderr', file=sys.stderr)")
    # Lines are printed as they arrive, so engines may come in either order.
    assert sorted(proc.stdout.splitlines()) == [f"[engine {i}@{HOST}] pid {pid}"
                                                for i, pid in enumerate(pids)]
    tagged = [line for line in proc.stderr.splitlines() if line.startswith("[engine ")]
    assert sorted(tagged) == [f"[engine {i}@{HOST}] to stderr" for i in (0, 1)]

    assert runner.ok("exec", "-t", "1", "print('one')").stdout == f"[engine 1@{HOST}] one\n"
    assert runner.ok("exec", "-t", "1:", "print('sl')").stdout == f"[engine 1@{HOST}] sl\n"
    assert sorted(runner.ok("exec", "-t", "1,0", "print('l')").stdout.splitlines()) == [
        f"[engine 0@{HOST}] l", f"[engine 1@{HOST}] l"]
    assert runner("exec", "-", input="print('stdin')\n").stdout.count("stdin") == 2


def test_exec_error_exits_1_with_a_rich_traceback(cluster):
    runner, _, _ = cluster
    proc = runner("exec", "x = 1\n1/0")
    assert proc.returncode == 1, proc.stderr
    for engine_id in (0, 1):  # one framed traceback per engine, with the remote source line
        assert f"╭─ RemoteError from engine {engine_id} on" in proc.stderr
    assert proc.stderr.count("ZeroDivisionError: division by zero") == 2
    assert "❱ 2 1/0" in proc.stderr

    bad = runner("exec", "-t", "7", "1")
    assert bad.returncode == 2 and "no engine 7" in bad.stderr
    assert runner("exec", "-t", "x", "1").returncode == 2


def test_run_uploads_a_local_script(cluster, tmp_path):
    runner, _, _ = cluster
    script = tmp_path / "job.py"
    script.write_text("import os\nprint('hello from', os.getpid())\ny = 6 * 7\n")
    pids = _pids(runner)
    proc = runner.ok("run", "-t", "0", script)
    assert proc.stdout == f"[engine 0@{HOST}] hello from {pids[0]}\n"
    assert runner.ok("exec", "-t", "0", "print(y)").stdout.endswith("] 42\n")

    script.write_text("def f():\n    raise ValueError('in the script')\n\nf()\n")
    failed = runner("run", "-t", "1", script)
    assert failed.returncode == 1 and "ValueError: in the script" in failed.stderr
    assert "job.py" in failed.stderr
    assert runner("run", tmp_path / "missing.py").returncode == 2


def test_a_second_process_reconnects_and_reads_what_the_first_pushed(cluster):
    runner, _, _ = cluster
    runner.ok("exec", "-t", "0", "x = 41")
    proc = runner.python("-c", "import sshpar; rc = sshpar.Client(); print(rc[0]['x'])")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "41\n"


SUBMIT = """\
import time, sshpar
rc = sshpar.Client()
def slow():
    print("started", flush=True)
    time.sleep(0.3)
    return 6 * 7
ar = rc[0].apply_async(slow)
deadline = time.monotonic() + 30
while "started" not in ar.stdout and time.monotonic() < deadline:
    time.sleep(0.01)  # bounded poll: the task is running before this client leaves
print(ar.msg_ids[0])
rc.close()
"""

FETCH = """\
import sys, sshpar
rc = sshpar.Client(cluster="clitest")
ar = rc.get_result(sys.argv[1])
print(ar.get(30), ar.stdout.strip())
"""


def test_a_result_computed_while_no_client_was_connected_is_fetched_later(cluster):
    runner, _, _ = cluster
    submitted = runner.python("-c", SUBMIT)
    assert submitted.returncode == 0, submitted.stderr
    msg_id = submitted.stdout.strip()

    def engine0_idle() -> bool:  # the task finished with no client of ours connected
        return runner.json("status")["engines"][0]["state"] == "idle"

    wait_until(engine0_idle, 30, "engine 0 to finish the task")
    fetched = runner.python("-c", FETCH, msg_id)
    assert fetched.returncode == 0, fetched.stderr
    assert fetched.stdout == "42 started\n"


def test_ctrl_c_leaves_the_task_running_and_fetchable(cluster):
    runner, _, _ = cluster
    code = "import time; print('go', flush=True); time.sleep(1); print('done')"
    proc = subprocess.Popen([sys.executable, "-m", "sshpar.cli", "exec", "-t", "1", code],
                            env=runner.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline() == f"[engine 1@{HOST}] go\n"  # the task is running
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=COMMAND_TIMEOUT)
    assert proc.returncode == 130, err
    (msg_id,) = re.findall(r"'([0-9a-f]{16}-[0-9a-f]+)'", err)
    fetched = runner.python("-c", FETCH, msg_id)
    assert fetched.returncode == 0, fetched.stderr
    assert fetched.stdout == "None go\ndone\n"


# -- stop, idle exit, no cluster -----------------------------------------------------------------
def test_stop_leaves_no_engine_socket_or_cluster_file(cli, sshd_session, tmp_path):
    hosts = sshd_session.hosts_yaml(tmp_path / "hosts.yaml", engines=2, workdir=tmp_path / "w")
    doc = cli.json("start", "-f", hosts, "-n", "3")
    name = doc["cluster"]
    pids = [r["pid"] for r in cli.json("status")["engines"]]
    sockets = [s for _, s in cli.engines()]
    assert len(pids) == 3 and all(map(alive, pids)) and all(map(os.path.exists, sockets))

    proc = cli.ok("stop")
    assert f"stopped cluster {name}: 3 engine(s) shut down" in proc.stdout
    wait_gone(pids)
    wait_until(lambda: not cli.processes(), 10, "every engine process (nannies too) to exit")
    assert not any(map(os.path.exists, sockets))
    assert not cli.cluster_file(name).exists()
    assert cli("status").returncode == 2


def test_stop_an_unreachable_cluster_needs_force(cli, sshd, tmp_path):
    hosts = sshd.hosts_yaml(tmp_path / "hosts.yaml", workdir=tmp_path / "w")
    name = cli.json("start", "-f", hosts)["cluster"]
    sshd.stop()  # engines keep running; their host can no longer be reached

    kept = cli("stop", name)
    assert kept.returncode == 3, kept.stderr
    assert f"sshpar stop {name} --force" in kept.stderr and "cannot connect" in kept.stderr
    assert cli.cluster_file(name).exists()
    assert cli("status", name).returncode == 3

    forced = cli("stop", name, "--force")
    assert forced.returncode == 0, forced.stderr
    assert "was unreachable" in forced.stderr
    assert not cli.cluster_file(name).exists()


def test_an_idle_daemon_exits_after_idle_timeout(cli, sshd_session, tmp_path):
    hosts = sshd_session.hosts_yaml(tmp_path / "hosts.yaml", workdir=tmp_path / "w",
                                    extra={"idle_timeout": 2})
    cli.json("start", "-f", hosts)  # the command's client has left when it returns
    (pid, sock), = cli.engines()
    assert alive(pid)
    wait_gone([pid], timeout=20)
    wait_until(lambda: not os.path.exists(sock), 10, "the engine socket to be removed")
    wait_until(lambda: not cli.processes(), 10, "every engine process (nannies too) to exit")
    status = cli("status")
    assert status.returncode == 1 and " lost " in status.stdout


def test_without_any_cluster_commands_say_so_and_exit_2(cli):
    for args in (("status",), ("status", "--all"), ("stop",), ("exec", "1")):
        proc = cli(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "no running cluster" in proc.stderr
    named = cli("status", "nope")
    assert named.returncode == 2 and "no cluster named 'nope'" in named.stderr


def test_start_with_an_unreachable_host_exits_3_unless_partial_is_allowed(
        cli, sshd_session, tmp_path):
    hosts = sshd_session.hosts_yaml(tmp_path / "hosts.yaml", workdir=tmp_path / "w")
    doc = yaml.safe_load(hosts.read_text())
    doc["hosts"].append({"host": "localhost", "port": _closed_port()})
    hosts.write_text(yaml.safe_dump(doc))

    failed = cli("start", "-f", hosts)
    assert failed.returncode == 3, failed.stderr
    assert "localhost" in failed.stderr and "cannot connect" in failed.stderr
    assert not cli.engines()  # no cluster file, and the good host's engines were stopped
    wait_until(lambda: not cli.processes(), 10, "the good host's engines to be stopped")

    partial = cli("start", "-f", hosts, "--allow-partial", "--json")
    assert partial.returncode == 0, partial.stderr
    started = json.loads(partial.stdout)
    user, good, bad = sshd_session.user, sshd_session.port, doc["hosts"][1]["port"]
    assert [e["host"] for e in started["engines"]] == [f"{user}@{HOST}:{good}"]
    assert list(started["errors"]) == [f"{user}@localhost:{bad}"]


def test_start_with_a_bad_hosts_file_exits_2(cli, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("hosts: [node1]\ndefaults: {engnes: 2}\n")
    proc = cli("start", "-f", bad)
    assert proc.returncode == 2 and "did you mean 'engines'" in proc.stderr
    assert cli("start", "-f", tmp_path / "missing.yaml").returncode == 2


# -- check ---------------------------------------------------------------------------------------
def test_check_a_good_host(cli, hosts_file):
    proc = cli("check", "-f", hosts_file)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    row = next(line for line in proc.stdout.splitlines() if HOST in line and "│" in line)
    cells = [c.strip() for c in row.strip("│ ").split("│")]
    assert cells[1:5] == ["ok", platform.python_version(), "ok", "allowed"]
    assert cells[-1] == "yes"
    assert f"python {sys.executable}" in proc.stdout

    doc = cli.json("check", "-f", hosts_file)
    (host,) = doc["hosts"]
    assert doc["usable"] is True and host["usable"] is True
    assert host["probes"]["python"]["value"]["version"] == platform.python_version()
    assert host["probes"]["streamlocal"]["value"] == "allowed"
    assert host["probes"]["latency"]["value"]["rtt_ms"] > 0


def test_check_a_closed_port_reports_unreachable(cli, sshd_session, tmp_path):
    hosts = sshd_session.hosts_yaml(tmp_path / "hosts.yaml", extra={"port": _closed_port()})
    proc = cli("check", "-f", hosts)
    assert proc.returncode == 3
    assert "unreachable" in proc.stdout and "is sshd running there" in proc.stdout
    doc = json.loads(cli("check", "-f", hosts, "--json").stdout)
    assert doc["usable"] is False
    connect = doc["hosts"][0]["probes"]["connect"]
    assert (connect["status"], connect["value"]) == ("fail", "HostUnreachableError")


# -- in-process: parsing and help ------------------------------------------------------------------
def test_targets_parse():
    assert parse_targets("all") == "all"
    assert parse_targets("0") == 0
    assert parse_targets("0,2") == [0, 2]
    assert parse_targets("1:3") == slice(1, 3)
    assert parse_targets(":2") == slice(None, 2)


@pytest.mark.parametrize("command", ["start", "status", "stop", "exec", "run", "check", "demo"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: sshpar {command}") and "exit codes:" in out
    if command in ("start", "status", "check"):
        assert "--json" in out


def test_the_docs_name_every_command():
    docs = (Path(__file__).parents[2] / "docs" / "cli.md").read_text()
    for command in ("start", "status", "stop", "exec", "run", "check", "demo"):
        assert f"## `sshpar {command}" in docs
    assert "| 3 | a host could not be reached or started |" in docs


def test_demo_tours_the_seed_and_leaves_nothing_running(tmp_path: Path) -> None:
    cli = Cli(tmp_path)
    proc = cli("demo", "--workdir", tmp_path / "demo-w")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for expected in ("Out: [0, 1]", "Out: (5, 25)", "Out: 30", "Out: 20",
                     "Out: [1.03234, 3453]", "Out: ['foo', 'bar']", "Out: ['an', 'an']",
                     "ZeroDivisionError", "Every engine was shut down"):
        assert expected in out, f"{expected!r} missing from the demo's output"
    assert not cli.processes()
    assert not list((tmp_path / "home" / "clusters").glob("*.json"))
