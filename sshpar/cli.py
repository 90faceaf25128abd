"""The `sshpar` command: start, inspect, use and stop clusters of engines; check hosts.

Layer: CLI (top). The only module, with _demo, that prints. Commands (docs/cli.md): start,
status, stop, exec, run, check, demo; each command's help is its function's docstring.

Exit codes:
    0  success
    1  a task or engine failed (a remote exception, an engine lost)
    2  bad usage or configuration (bad option or hosts file, no such cluster)
    3  a host could not be reached or started
  130  interrupted (Ctrl-C); tasks already sent keep running on their engines

Tables, JSON and engine stdout go to stdout; errors, warnings and engine stderr to stderr;
progress and notes to stdout, or to stderr when ``--json`` keeps stdout machine-readable.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import inspect
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table
from rich.text import Text

from . import _clusterfile, _doctor, errors
from .client import Client
from .config import load_hosts

if TYPE_CHECKING:
    from .asyncresult import AsyncResult
    from .view import DirectView

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_HOST, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

_STYLE = {"ok": "green", "idle": "green", "busy": "yellow", "warn": "yellow",
          "reconnecting": "yellow", "lost": "red", "unresponsive": "red", "fail": "red",
          "skip": "dim"}
_FAILED_STATES = ("lost", "unresponsive")


class Ui:
    """Where output goes: ``out`` (results), ``err`` (problems), ``info`` (progress, notes)."""

    def __init__(self, json: bool = False) -> None:
        self.out = Console(highlight=False)
        self.err = Console(stderr=True, highlight=False)
        self.info = self.err if json else self.out

    def error(self, message: str) -> None:
        self.err.print(f"[red]error:[/] {escape(message)}")

    def warn(self, message: str) -> None:
        self.err.print(f"[yellow]warning:[/] {escape(message)}")


def _print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2, default=str))


def parse_targets(text: str) -> int | list[int] | slice | str:
    """``all``, ``0``, ``0,2`` or ``1:3`` (a slice of the running engines' ids)."""
    text = text.strip()
    try:
        if text == "all":
            return "all"
        if ":" in text:
            bounds = [int(b) if b.strip() else None for b in text.split(":")]
            if len(bounds) > 3:
                raise ValueError(text)
            return slice(*bounds)
        if "," in text:
            return [int(t) for t in text.split(",") if t.strip()]
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a target: use all, 0, 0,2 or 1:3") from None


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def _host_column() -> Column:
    return Column("host", overflow="fold")  # wrapped if need be, never cut: the port matters


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    d, h = divmod(h, 24)
    return f"{d}d {h}h" if d else f"{h}h {m:02d}m" if h else f"{m}m {s:02d}s" if m else f"{s}s"


def _host_errors(rc: Client) -> dict[str, str]:
    """Each unreachable host's error message, which names the host and says what to do."""
    return {host: msg if (msg := str(exc)).startswith(host) else f"{host}: {msg}"
            for host, exc in rc.start_errors.items()}


# -- start / status / stop ---------------------------------------------------------------------
def cmd_start(args: argparse.Namespace, ui: Ui) -> int:
    """Start the engines of a hosts file and leave them running.

    Shows each host's progress, then the engines, and writes the cluster file that a later
    `sshpar.Client()` reads. A cluster that is already running is reused.
    """
    spec = load_hosts(args.file)
    if args.engines is not None:
        spec = dataclasses.replace(spec, hosts=tuple(
            dataclasses.replace(h, engines=args.engines) for h in spec.hosts))
    path = _clusterfile.path_for(spec.name)
    existed, started, phases = path.exists(), time.monotonic(), []

    def progress(host: str, phase: str) -> None:  # called from the client's loop thread
        phases.append(phase)
        style = ("red" if phase.startswith("failed") else
                 "green" if phase.startswith("ready") else "dim")
        ui.info.print(f"[dim]{time.monotonic() - started:5.1f}s[/] [bold]{escape(host)}[/] "
                      f"[{style}]{escape(phase)}[/]")

    ui.info.print(f"starting cluster [bold]{escape(spec.name)}[/] on {len(spec.hosts)} host(s)")
    rc = Client(hosts=spec, allow_partial=args.allow_partial, on_progress=progress,
                timeout=args.timeout)
    try:
        reused = existed and not phases  # a reused cluster starts nothing, so reports nothing
        engines: list[dict[str, Any]] = [{"id": i, "host": e.host, "pid": e.pid}
                                         for i, e in rc.engine_info.items()]
        problems = _host_errors(rc)
    finally:
        rc.close()
    if args.json:
        _print_json({"cluster": spec.name, "reused": reused, "file": str(path),
                     "engines": engines, "errors": problems})
        return EXIT_OK
    if reused:
        ui.out.print(f"cluster [bold]{escape(spec.name)}[/] is already running: reusing its "
                     f"{len(engines)} engine(s)")
    table = Table("id", _host_column(), "pid", title=f"cluster {escape(spec.name)}")
    for e in engines:
        table.add_row(str(e["id"]), escape(e["host"]), str(e["pid"]))
    ui.out.print(table)
    for message in problems.values():
        ui.warn(f"not started: {message}")
    name = escape(spec.name)
    ui.out.print(f"cluster file: {escape(str(path))}\nconnect: [bold]sshpar.Client()[/] or "
                 f"[bold]sshpar.Client(cluster={name!r})[/]\nstop: [bold]sshpar stop {name}[/]")
    return EXIT_OK


def _chosen(args: argparse.Namespace, ui: Ui) -> list[str]:
    """The clusters a status/stop command is about (error message if there are none)."""
    names = _clusterfile.list_names()
    if args.name is not None and args.name not in names:
        ui.error(f"no cluster named {args.name!r} (running clusters: "
                 f"{', '.join(names) or 'none'})")
        return []
    chosen = names if args.all else [args.name or _clusterfile.default_name()]
    if not names or chosen == [None]:
        ui.error(f"no running cluster (none in {_clusterfile.clusters_dir()}); start one "
                 "with `sshpar start -f hosts.yaml`, or try `sshpar demo`")
        return []
    return [n for n in chosen if n is not None]


def cmd_status(args: argparse.Namespace, ui: Ui) -> int:
    """Show the engines of a running cluster (by default the last one started).

    Per engine: id, host, pid, state (idle, busy, lost...), tasks queued and done, uptime,
    Python version. Exit 1 if an engine is lost, 3 if a host cannot be reached.
    """
    names = _chosen(args, ui)
    if not names:
        return EXIT_USAGE
    default, docs, code = _clusterfile.default_name(), [], EXIT_OK
    for name in names:
        rc = Client(cluster=name)
        try:
            rows = list(rc.engine_status().values())
            problems = _host_errors(rc)
        finally:
            rc.close()
        lost = any(r["state"] in _FAILED_STATES for r in rows)
        code = max(code, EXIT_HOST if problems else EXIT_FAILED if lost else EXIT_OK)
        docs.append({"cluster": name, "default": name == default, "engines": rows,
                     "errors": problems})
        if not args.json:
            _status_table(ui, docs[-1], lost)
    if args.json:
        _print_json(docs if args.all else docs[0])
    return code


def _status_table(ui: Ui, doc: dict[str, Any], lost: bool) -> None:
    name = doc["cluster"]
    title = f"cluster {name}" + (" (default)" if doc["default"] else "")
    table = Table("id", _host_column(), "pid", "state", "queued", "done", "uptime", "python",
                  title=escape(title))
    for r in doc["engines"]:
        state = f"[{_STYLE.get(r['state'], '')}]{r['state']}[/]"
        uptime = _duration(r["uptime"]) if "uptime" in r else "-"
        table.add_row(str(r["id"]), escape(r["host"]), str(r["pid"]), state,
                      str(r.get("queued", "-")), str(r.get("done", "-")), uptime,
                      r.get("python", "-"))
    ui.out.print(table)
    for message in doc["errors"].values():
        ui.warn(message)
    if lost and not doc["errors"]:
        ui.warn(f"lost engines have exited (idle_timeout?) or were killed: `sshpar stop "
                f"{name}` forgets them, `sshpar start -f HOSTS` starts the cluster again")


def cmd_stop(args: argparse.Namespace, ui: Ui) -> int:
    """Stop a cluster's engines; remove their sockets and the cluster file.

    If a host cannot be reached, nothing is removed unless --force is given: then the
    engines that can be reached are stopped and the cluster file is removed anyway.
    """
    names = _chosen(args, ui)
    if not names:
        return EXIT_USAGE
    return max(_stop_one(name, args.force, ui) for name in names)


def _stop_one(name: str, force: bool, ui: Ui) -> int:
    again = f"`sshpar stop {name} --force`"
    try:
        rc = Client(cluster=name)
    except errors.SshparError as exc:
        if not force:
            ui.error(f"cluster {name}: {exc}\nnothing was stopped; {again} forgets the cluster")
            return EXIT_HOST
        _clusterfile.remove(name)
        ui.out.print(f"forgot cluster [bold]{escape(name)}[/] ({escape(str(exc))})")
        return EXIT_OK
    problems = _host_errors(rc)
    if problems and not force:
        rc.close()
        for message in problems.values():
            ui.error(message)
        ui.err.print(f"cluster {escape(name)} was kept: its engines there may still run (each "
                     f"exits after its idle_timeout with no client). {escape(again)} stops "
                     "the engines that can be reached and removes the cluster file.")
        return EXIT_HOST
    count = len(rc.ids)
    rc.shutdown()
    ui.out.print(f"stopped cluster [bold]{escape(name)}[/]: {count} engine(s) shut down, "
                 "cluster file removed")
    for host in problems:
        ui.warn(f"{host} was unreachable: engines there (if any) were not stopped")
    return EXIT_OK


# -- exec / run ---------------------------------------------------------------------------------
def cmd_exec(args: argparse.Namespace, ui: Ui) -> int:
    """Execute Python code on engines, in their namespaces.

    Each engine's output is printed as it arrives, prefixed [engine N@host]; remote errors
    are shown as tracebacks and make the exit status 1.
    """
    code = sys.stdin.read() if args.code == "-" else args.code
    return _on_engines(args, ui, lambda view: view.execute(code, block=False))


def cmd_run(args: argparse.Namespace, ui: Ui) -> int:
    """Upload a local Python script and run it on engines.

    The file is read here and its text sent: engines need not see this machine's disk.
    Output and errors are shown as for `sshpar exec`.
    """
    if not os.path.isfile(args.script):
        ui.error(f"{args.script}: no such file")
        return EXIT_USAGE
    return _on_engines(args, ui, lambda view: view.run(args.script, block=False))


def _on_engines(args: argparse.Namespace, ui: Ui,
                submit: Callable[[DirectView], AsyncResult]) -> int:
    rc = Client(cluster=args.cluster)
    try:
        for message in _host_errors(rc).values():
            ui.warn(message)
        if not rc.ids:
            ui.error(f"no engine of cluster {rc.spec.name!r} is running; `sshpar status` "
                     "shows them, `sshpar start -f HOSTS` starts them again")
            return EXIT_HOST if rc.start_errors else EXIT_FAILED
        try:
            view = rc[args.targets]
        except (IndexError, errors.NoEnginesError) as exc:
            ui.error(str(exc))
            return EXIT_USAGE if isinstance(exc, IndexError) else EXIT_FAILED
        ar = submit(view)
        try:
            _stream_outputs(rc, ar, ui)
        except KeyboardInterrupt:
            ui.error(f"interrupted; the engines keep running the task: fetch its results with "
                     f"sshpar.Client().get_result(msg_id) for msg_id in {ar.msg_ids}")
            return EXIT_INTERRUPTED
        failure = ar.exception()
    finally:
        rc.close()
    if failure is None:
        return EXIT_OK
    for err in failure.elist if isinstance(failure, errors.CompositeError) else [failure]:
        ui.err.print(err if isinstance(err, errors.RemoteError) else escape(str(err)))
    return EXIT_FAILED


def _stream_outputs(rc: Client, ar: AsyncResult, ui: Ui, interval: float = 0.05) -> None:
    """Print each engine's stdout and stderr as whole lines arrive, prefixed
    ``[engine N@host]``, until every engine has answered."""
    hosts = {h.label: h.host for h in rc.spec.hosts}
    info = rc.engine_info
    ids = ar.engine_id if isinstance(ar.engine_id, list) else [ar.engine_id]
    tags = [f"[engine {i}@{hosts.get(info[i].host, info[i].host)}]" for i in ids]
    shown = [[0, 0] for _ in ids]  # characters printed so far, per engine and stream
    while True:
        done = ar.wait(interval)
        streams = ((ar.stdout, ui.out, "cyan"), (ar.stderr, ui.err, "red"))
        for s, (texts, console, style) in enumerate(streams):
            for k, text in enumerate(texts if isinstance(texts, list) else [texts]):
                end = len(text) if done else text.rfind("\n", shown[k][s]) + 1
                for line in text[shown[k][s]:end].splitlines():
                    console.print(Text.assemble((tags[k], style), " ", line), soft_wrap=True)
                shown[k][s] = max(shown[k][s], end)
        if done:
            return


# -- check / demo -------------------------------------------------------------------------------
def cmd_check(args: argparse.Namespace, ui: Ui) -> int:
    """Check that the hosts of a hosts file can run engines.

    All hosts at once; per host: SSH connection, authentication and host key; the remote
    Python, its path and whether its minor version matches; whether sshd forwards to Unix
    sockets (if not, sshpar relays: a warning); the round-trip time. Exit 0 if all usable.
    """
    spec = load_hosts(args.file)
    with ui.info.status(f"checking {len(spec.hosts)} host(s)…"):
        reports = asyncio.run(_doctor.check_cluster(spec))
    usable = all(r.usable for r in reports)
    if args.json:
        _print_json({"cluster": spec.name, "usable": usable,
                     "hosts": [r.to_json() for r in reports]})
        return EXIT_OK if usable else EXIT_HOST
    table = Table(_host_column(), "connect", "python", "version", "forwarding", "rtt", "usable",
                  title=f"check {escape(spec.name)}")
    for r in reports:
        cells = [f"[{_STYLE[p.status.value]}]{escape(p.summary)}[/]" for p in r.probes]
        table.add_row(escape(r.host), *cells, "[green]yes[/]" if r.usable else "[red]no[/]")
    ui.out.print(table)
    for r in reports:
        if isinstance(python := r.probe("python").value, dict):
            ui.out.print(f"[dim]{escape(r.host)}: python {escape(python['executable'])}[/]")
        for p in r.probes:
            if p.message:
                kind = "error" if p.status is _doctor.Status.FAIL else "warning"
                ui.out.print(f"[{_STYLE[p.status.value]}]{kind}:[/] {escape(p.message)}")
    return EXIT_OK if usable else EXIT_HOST


def cmd_demo(args: argparse.Namespace, ui: Ui) -> int:
    """Start local engines and tour the examples.

    The engines run on this machine (no SSH, nothing to configure).
    """
    from ._demo import run_demo

    run_demo(args.engines, console=ui.out, workdir=args.workdir)
    return EXIT_OK


# -- the parser -----------------------------------------------------------------------------------
_EXIT_CODES = """\
exit codes: 0 ok; 1 a task or engine failed; 2 usage or configuration error;
            3 a host could not be reached or started"""

_EXAMPLES = """
examples (docs/cli.md has more):
  sshpar check -f hosts.yaml && sshpar start -f hosts.yaml -n 4
  sshpar exec -t 0,2 "import os; print(os.getpid())"; sshpar run job.py
  sshpar status; sshpar stop"""


def _parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="sshpar", formatter_class=raw, epilog=_EXIT_CODES + "\n" + _EXAMPLES,
        description="Run Python on machines you can ssh into (IPython.parallel's direct "
                    "interface, nothing installed remotely).")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log more (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func: Callable[[argparse.Namespace, Ui], int], *,
                json: bool = False) -> argparse.ArgumentParser:
        doc = inspect.cleandoc(func.__doc__ or "")
        p = sub.add_parser(name, help=doc.splitlines()[0].rstrip("."), description=doc,
                           formatter_class=raw, epilog=_EXIT_CODES)
        p.set_defaults(func=func)
        if json:
            p.add_argument("--json", action="store_true",
                           help="print machine-readable JSON on stdout (messages on stderr)")
        return p

    def hosts_file(p: argparse.ArgumentParser) -> None:
        p.add_argument("-f", "--file", required=True, metavar="HOSTS",
                       help="the hosts file (YAML; see hosts.example.yaml)")

    def cluster_name(p: argparse.ArgumentParser, all_help: str) -> None:
        p.add_argument("name", nargs="?", metavar="NAME",
                       help="cluster name (default: the last one started)")
        p.add_argument("--all", action="store_true", help=all_help)

    p = command("start", cmd_start, json=True)
    hosts_file(p)
    p.add_argument("-n", "--engines", type=_positive, metavar="N",
                   help="engines per host (overrides `engines:` in the file)")
    p.add_argument("--allow-partial", action="store_true",
                   help="keep the hosts that started when others fail (exit 0, warnings)")
    p.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                   help="time allowed to connect and start every host (default 120)")
    cluster_name(command("status", cmd_status, json=True), "show every running cluster")
    p = command("stop", cmd_stop)
    cluster_name(p, "stop every running cluster")
    p.add_argument("--force", action="store_true",
                   help="remove the cluster file even if some hosts cannot be reached")
    for name, func, arg, arg_help in (
            ("exec", cmd_exec, "code", "Python code to execute (- reads it from stdin)"),
            ("run", cmd_run, "script", "a local Python file")):
        p = command(name, func)
        p.add_argument(arg, help=arg_help)
        p.add_argument("-t", "--targets", type=parse_targets, default="all",
                       metavar="TARGETS", help="engines: all (default), 0, 0,2 or 1:3")
        p.add_argument("-c", "--cluster", metavar="NAME",
                       help="cluster name (default: the last one started)")
    hosts_file(command("check", cmd_check, json=True))
    p = command("demo", cmd_demo)
    p.add_argument("-n", "--engines", type=_positive, default=2,
                   help="engines to start (default 2)")
    p.add_argument("--workdir", metavar="DIR",
                   help="where the engines keep their bundle, sockets and logs "
                        "(default: a new temporary directory)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    ui = Ui(json=getattr(args, "json", False))
    try:
        return int(args.func(args, ui))
    except KeyboardInterrupt:
        ui.error("interrupted; tasks already sent keep running on their engines")
        return EXIT_INTERRUPTED
    except (errors.ConfigError, errors.NoEnginesError) as exc:
        ui.error(str(exc))
        return EXIT_USAGE
    except (errors.HostError, errors.StartError) as exc:
        ui.error(str(exc))
        return EXIT_HOST
    except errors.SshparError as exc:
        ui.err.print(exc if isinstance(exc, errors.RemoteError) else escape(str(exc)))
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
