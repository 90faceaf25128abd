"""The `sshpar` command.

Layer: CLI (top). The only module, with _demo, that prints.

Exit codes: 0 success; 1 a task or engine failed; 2 bad usage or configuration;
3 a host could not be reached or started.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from rich.console import Console

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_HOST = 0, 1, 2, 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sshpar",
        description="Run Python on machines you can ssh into (IPython.parallel's direct "
                    "interface, nothing installed remotely).")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log more (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo", help="start a local cluster and tour the examples",
                          description="Start engines on this machine (no SSH, nothing to "
                                      "configure) and walk through the basics of remote "
                                      "execution.")
    demo.add_argument("-n", "--engines", type=int, default=2, help="engines to start (2)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    console = Console()
    from . import errors

    try:
        if args.command == "demo":
            from ._demo import run_demo

            run_demo(args.engines, console=console)
            return EXIT_OK
    except errors.ConfigError as exc:
        console.print(f"[red]error:[/] {exc}")
        return EXIT_USAGE
    except errors.HostError as exc:
        console.print(f"[red]error:[/] {exc}")
        return EXIT_HOST
    except errors.SshparError as exc:
        console.print(exc)
        return EXIT_FAILED
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
