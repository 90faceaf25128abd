"""The `sshpar` command: start, inspect, use and stop clusters of engines; check hosts.

Layer: CLI (top). The only module, with _demo, that prints. Commands (docs/cli.md):
start, status, stop, exec, run, check, demo.

Exit codes:
    0  success
    1  a task or engine failed (a remote exception, an engine lost)
    2  bad usage or configuration (bad option or hosts file, no such cluster)
    3  a host could not be reached or started
  130  interrupted (Ctrl-C); tasks already sent keep running on their engines

Output: tables and engine stdout go to stdout; progress, warnings, engine stderr and errors to
stderr when stdout carries ``--json`` (else progress and notes go to stdout too).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
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

if TYPE_CHECKING:
    from .asyncresult import AsyncResult
    from .client import Client
    from .view import DirectView

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_HOST, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

_STYLE = {"ok": "green", "idle": "green", "busy": "yellow", "warn": "yellow", "lost": "red",
          "fail": "red", "skip": "dim"}


@dataclasses.dataclass
class Ui:
    """Where output goes: ``out`` (results), ``err`` (errors), ``info`` (progress, notes)."""

    json: bool = False

    def __post_init__(self) -> None:
        self.out = Console(highlight=False)
        self.err = Console(stderr=True, highlight=False)
        self.info = self.err if self.json else self.out

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


def _duration(seconds: float) -> str:
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d {h}h" if d else f"{h}h {m:02d}m" if h else f"{m}m {s:02d}s" if m
            else f"{s}s")


def _host_errors(rc: Client) -> dict[str, str]:
    return {host: str(exc) for host, exc in rc.start_errors.items()}


# -- start / status / stop ---------------------------------------------------------------------
def cmd_start(args: argparse.Namespace, ui: Ui) -> int:
    from . import _clusterfile
    from .client import Client
    from .config import load_hosts

    spec = load_hosts(args.file)
    if args.engines is not None:
        spec = dataclasses.replace(spec, hosts=tuple(
            dataclasses.replace(h, engines=args.engines) for h in spec.hosts))
    path = _clusterfile.path_for(spec.name)
    existed = path.exists()
    started = time.monotonic()
    phases: list[str] = []

    def progress(host: str, phase: str) -> None:  # called from the client's loop thread
        phases.append(phase)
        style = "red" if phase.startswith("failed") else "green" if phase.startswith(
            "ready") else "dim"
        ui.info.print(f"[dim]{time.monotonic() - started:5.1f}s[/] [bold]{escape(host)}[/] "
                      f"[{style}]{escape(phase)}[/]")

    ui.info.print(f"starting cluster [bold]{escape(spec.name)}[/] on {len(spec.hosts)} host(s)")
    rc = Client(hosts=spec, allow_partial=args.allow_partial, on_progress=progress,
                timeout=args.timeout)
    try:
        reused = existed and not phases  # a reused cluster starts nothing, so reports nothing
        engines = [{"id": i, "host": e.host, "pid": e.pid} for i, e in rc.engine_info.items()]
        errors = _host_errors(rc)
    finally:
        rc.close()
    if args.json:
        _print_json({"cluster": spec.name, "reused": reused, "file": str(path),
                     "engines": engines, "errors": errors})
        return EXIT_OK
    if reused:
        ui.out.print(f"cluster [bold]{escape(spec.name)}[/] is already running: reusing its "
                     f"{len(engines)} engine(s)")
    table = Table("engine", "host", "pid", title=f"cluster {spec.name}")
    for e in engines:
        table.add_row(str(e["id"]), escape(e["host"]), str(e["pid"]))
    ui.out.print(table)
    for host, message in errors.items():
        ui.warn(f"not started on {host}: {message}")
    ui.out.print(f"cluster file: {escape(str(path))}\nconnect: [bold]sshpar.Client()[/] or "
                 f"[bold]sshpar.Client(cluster={spec.name!r})[/]; stop: "
                 f"[bold]sshpar stop {escape(spec.name)}[/]")
    return EXIT_OK


def _no_cluster(ui: Ui) -> int:
    ui.error("no running cluster; start one with `sshpar start -f hosts.yaml` "
             "(or try `sshpar demo`)")
    return EXIT_USAGE


def _chosen(args: argparse.Namespace) -> list[str]:
    from . import _clusterfile

    if args.all:
        return _clusterfile.list_names()
    name = args.name or _clusterfile.default_name()
    return [name] if name is not None else []


def cmd_status(args: argparse.Namespace, ui: Ui) -> int:
    from . import _clusterfile
    from .client import Client

    names = _chosen(args)
    if not names:
        return _no_cluster(ui)
    default = _clusterfile.default_name()
    docs, code = [], EXIT_OK
    for name in names:
        rc = Client(cluster=name)
        try:
            rows = list(rc.engine_status().values())
            errors = _host_errors(rc)
        finally:
            rc.close()
        if errors:
            code = EXIT_HOST
        elif any(r["state"] == "lost" for r in rows):
            code = max(code, EXIT_FAILED)
        docs.append({"cluster": name, "default": name == default, "engines": rows,
                     "errors": errors})
        if not args.json:
            _status_table(ui, docs[-1])
    if args.json:
        _print_json(docs if args.all else docs[0])
    return code


def _status_table(ui: Ui, doc: dict[str, Any]) -> None:
    name = doc["cluster"]
    title = f"cluster {name}" + (" (default)" if doc["default"] else "")
    table = Table("engine", "host", "pid", "state", "queued", "done", "uptime", "python",
                  title=escape(title))
    for r in doc["engines"]:
        state = r["state"]
        table.add_row(str(r["id"]), escape(r["host"]), str(r["pid"]),
                      f"[{_STYLE.get(state, '')}]{state}[/]", str(r.get("queued", "-")),
                      str(r.get("done", "-")),
                      _duration(r["uptime"]) if "uptime" in r else "-", r.get("python", "-"))
    ui.out.print(table)
    for host, message in doc["errors"].items():
        ui.warn(f"cannot reach {host}: {message}")
    if any(r["state"] == "lost" for r in doc["engines"]) and not doc["errors"]:
        ui.warn(f"lost engines have exited (idle_timeout?) or were killed: `sshpar stop "
                f"{name}` forgets them, `sshpar start -f HOSTS` starts the cluster again")


def cmd_stop(args: argparse.Namespace, ui: Ui) -> int:
    from . import _clusterfile

    if args.name is not None and args.name not in _clusterfile.list_names():
        known = ", ".join(_clusterfile.list_names()) or "none"
        ui.error(f"no cluster named {args.name!r} (running clusters: {known})")
        return EXIT_USAGE
    names = _chosen(args)
    if not names:
        return _no_cluster(ui)
    return max(_stop_one(name, args.force, ui) for name in names)


def _stop_one(name: str, force: bool, ui: Ui) -> int:
    from . import _clusterfile
    from .client import Client
    from .errors import SshparError

    again = f"`sshpar stop {name} --force`"
    try:
        rc = Client(cluster=name)
    except SshparError as exc:
        if not force:
            ui.error(f"cluster {name}: {exc}\nnothing was stopped; {again} forgets the cluster")
            return EXIT_HOST
        _clusterfile.remove(name)
        ui.out.print(f"forgot cluster [bold]{escape(name)}[/] ({escape(str(exc))})")
        return EXIT_OK
    errors = _host_errors(rc)
    if errors and not force:
        rc.close()
        for host, message in errors.items():
            ui.error(f"cannot reach {host}: {message}")
        ui.err.print(f"cluster {escape(name)} was kept: its engines there may still run (each "
                     f"exits after its idle_timeout with no client). {escape(again)} stops "
                     "the engines that can be reached and removes the cluster file.")
        return EXIT_HOST
    count = len(rc.ids)
    rc.shutdown()
    ui.out.print(f"stopped cluster [bold]{escape(name)}[/]: {count} engine(s) shut down, "
                 "cluster file removed")
    for host in errors:
        ui.warn(f"{host} was unreachable: engines there (if any) were not stopped")
    return EXIT_OK


# -- exec / run ---------------------------------------------------------------------------------
def cmd_exec(args: argparse.Namespace, ui: Ui) -> int:
    code = sys.stdin.read() if args.code == "-" else args.code
    return _on_engines(args, ui, lambda view: view.execute(code, block=False))


def cmd_run(args: argparse.Namespace, ui: Ui) -> int:
    if not os.path.isfile(args.script):
        ui.error(f"{args.script}: no such file")
        return EXIT_USAGE
    return _on_engines(args, ui, lambda view: view.run(args.script, block=False))


def _on_engines(args: argparse.Namespace, ui: Ui,
                submit: Callable[[DirectView], AsyncResult]) -> int:
    from .client import Client
    from .errors import CompositeError, EngineError, NoEnginesError, RemoteError

    rc = Client(cluster=args.cluster)
    try:
        for host, message in _host_errors(rc).items():
            ui.warn(f"cannot reach {host}: {message}")
        if not rc.ids:
            ui.error(f"no engine of cluster {rc.spec.name!r} is running; `sshpar status` "
                     "shows them, `sshpar start -f HOSTS` starts them again")
            return EXIT_HOST if rc.start_errors else EXIT_FAILED
        try:
            view = rc[args.targets]
        except IndexError as exc:
            ui.error(str(exc))
            return EXIT_USAGE
        except NoEnginesError as exc:
            ui.error(str(exc))
            return EXIT_FAILED
        ar = submit(view)
        _stream_outputs(rc, ar, ui)
        try:
            ar.get()
        except CompositeError as exc:
            for err in exc.elist:
                ui.err.print(err)
            return EXIT_FAILED
        except (RemoteError, EngineError) as exc:
            ui.err.print(exc if isinstance(exc, RemoteError) else escape(str(exc)))
            return EXIT_FAILED
    finally:
        rc.close()
    return EXIT_OK


def _stream_outputs(rc: Client, ar: AsyncResult, ui: Ui, interval: float = 0.05) -> None:
    """Print each engine's stdout and stderr as whole lines arrive, prefixed
    ``[engine N@host]``, until every engine has answered."""
    hosts = {h.label: h.host for h in rc.spec.hosts}
    info = rc.engine_info
    ids = ar.engine_id if isinstance(ar.engine_id, list) else [ar.engine_id]
    tags = [f"[engine {i}@{hosts.get(info[i].host, info[i].host)}]" for i in ids]
    shown = [[0, 0] for _ in ids]
    while True:
        done = ar.wait(interval)
        outs = [ar.stdout, ar.stderr]
        for s, (texts, console, style) in enumerate(zip(outs, (ui.out, ui.err),
                                                        ("cyan", "red"))):
            for k, text in enumerate(texts if isinstance(texts, list) else [texts]):
                end = len(text) if done else text.rfind("\n", shown[k][s]) + 1
                for line in text[shown[k][s]:end].splitlines():
                    console.print(Text.assemble((tags[k], style), " ", line), soft_wrap=True)
                shown[k][s] = max(shown[k][s], end)
        if done:
            return


# -- check --------------------------------------------------------------------------------------
def cmd_check(args: argparse.Namespace, ui: Ui) -> int:
    from . import _doctor
    from .config import load_hosts

    spec = load_hosts(args.file)
    with ui.info.status(f"checking {len(spec.hosts)} host(s)…"):
        reports = asyncio.run(_doctor.check_cluster(spec))
    usable = all(r.usable for r in reports)
    if args.json:
        _print_json({"cluster": spec.name, "usable": usable,
                     "hosts": [r.to_json() for r in reports]})
        return EXIT_OK if usable else EXIT_HOST
    table = Table(Column("host", overflow="fold"),
                  *(Column(c, no_wrap=True) for c in ("connect", "python", "version",
                                                      "forwarding", "rtt", "usable")),
                  Column("interpreter", overflow="fold"), title=f"check {spec.name}")
    for r in reports:
        cells = [f"[{_STYLE[p.status.value]}]{escape(p.summary)}[/]" for p in r.probes]
        python = r.probe("python").value
        table.add_row(escape(r.host), *cells, "[green]yes[/]" if r.usable else "[red]no[/]",
                      escape(python["executable"]) if isinstance(python, dict) else "-")
    ui.out.print(table)
    for r in reports:
        for p in r.probes:
            if p.message:
                kind = "error" if p.status is _doctor.Status.FAIL else "warning"
                ui.out.print(f"[{_STYLE[p.status.value]}]{kind}:[/] {escape(p.message)}")
    return EXIT_OK if usable else EXIT_HOST


def cmd_demo(args: argparse.Namespace, ui: Ui) -> int:
    from ._demo import run_demo

    run_demo(args.engines, console=ui.out)
    return EXIT_OK


# -- the parser -----------------------------------------------------------------------------------
_EPILOG = """\
exit codes: 0 ok; 1 a task or engine failed; 2 usage or configuration error;
            3 a host could not be reached or started

examples:
  sshpar check -f hosts.yaml          is every host usable?
  sshpar start -f hosts.yaml -n 4     start 4 engines per host, leave them running
  sshpar exec -t 0,2 "import os; print(os.getpid())"
  sshpar run analysis.py              upload and run a local script on every engine
  sshpar status                       engines of the default cluster
  sshpar stop                         stop them and remove the cluster file
"""


def _parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="sshpar", formatter_class=raw, epilog=_EPILOG,
        description="Run Python on machines you can ssh into (IPython.parallel's direct "
                    "interface, nothing installed remotely).")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log more (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func: Callable[[argparse.Namespace, Ui], int], summary: str,
                description: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=summary, description=description, formatter_class=raw,
                           epilog=_EPILOG.partition("\n\n")[0])
        p.set_defaults(func=func)
        return p

    def json_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", action="store_true",
                       help="print machine-readable JSON on stdout (messages go to stderr)")

    def hosts_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument("-f", "--file", required=True, metavar="HOSTS",
                       help="the hosts file (YAML; see hosts.example.yaml)")

    p = command("start", cmd_start, "start engines on the hosts of a hosts file",
                "Start the engines a hosts file defines and leave them running; a later "
                "`sshpar.Client()` reaches them. If the cluster is already running, it is "
                "reused.")
    hosts_flag(p)
    p.add_argument("-n", "--engines", type=_positive, metavar="N",
                   help="engines per host (overrides `engines:` in the file)")
    p.add_argument("--allow-partial", action="store_true",
                   help="keep the hosts that started when others fail (exit 0, with warnings)")
    p.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                   help="time allowed to connect and start every host (120)")
    json_flag(p)

    p = command("status", cmd_status, "show the engines of a running cluster",
                "Ask every engine of a running cluster for its state (idle, busy or lost), "
                "queue, finished tasks, uptime and Python version.")
    p.add_argument("name", nargs="?", metavar="NAME", help="cluster name (default: the last "
                   "one started)")
    p.add_argument("--all", action="store_true", help="every running cluster")
    json_flag(p)

    p = command("stop", cmd_stop, "stop the engines of a cluster",
                "Stop the engines of a cluster, remove their sockets and its cluster file.")
    p.add_argument("name", nargs="?", metavar="NAME", help="cluster name (default: the last "
                   "one started)")
    p.add_argument("--all", action="store_true", help="stop every running cluster")
    p.add_argument("--force", action="store_true",
                   help="remove the cluster file even if some hosts cannot be reached")

    for name, func, summary, arg, arg_help in (
            ("exec", cmd_exec, "execute code on engines", "code",
             "Python code to execute (- reads it from stdin)"),
            ("run", cmd_run, "upload a local script and run it on engines", "script",
             "a local Python file; its text is sent, engines need not see it")):
        p = command(name, func, summary, f"{summary[0].upper()}{summary[1:]}, in their "
                    "namespaces; print each engine's output prefixed [engine N@host] and "
                    "remote errors as tracebacks (exit 1).")
        p.add_argument(arg, help=arg_help)
        p.add_argument("-t", "--targets", type=parse_targets, default="all",
                       metavar="TARGETS", help="engines: all (default), 0, 0,2 or 1:3")
        p.add_argument("-c", "--cluster", metavar="NAME",
                       help="cluster name (default: the last one started)")

    p = command("check", cmd_check, "check that the hosts of a hosts file are usable",
                "For every host, in parallel: SSH connection, authentication and host key; "
                "the remote Python and its version; streamlocal forwarding; round-trip time. "
                "Exit 0 if every host is usable, 3 if not.")
    hosts_flag(p)
    json_flag(p)

    p = command("demo", cmd_demo, "start a local cluster and tour the examples",
                "Start engines on this machine (no SSH, nothing to configure) and walk "
                "through the basics of remote execution.")
    p.add_argument("-n", "--engines", type=_positive, default=2, help="engines to start (2)")
    return parser


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    ui = Ui(json=getattr(args, "json", False))
    from . import errors

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
