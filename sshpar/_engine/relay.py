"""Joins this process's stdin/stdout to an engine's Unix socket.

Layer: engine. Shipped to engines; stdlib only. Used when the SSH server refuses
streamlocal forwarding (or the backend cannot do it): the client runs this over an exec
channel and speaks the same frames through it.
"""

from __future__ import annotations

import os
import selectors
import socket
import sys


def main(argv: list[str]) -> None:
    path = argv[0]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as exc:
        sys.stderr.write(f"sshpar relay: cannot connect to {path}: {exc}\n")
        sys.exit(4)
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    sel = selectors.DefaultSelector()
    sel.register(stdin, selectors.EVENT_READ, "in")
    sel.register(sock, selectors.EVENT_READ, "sock")
    while True:
        for key, _ in sel.select():
            if key.data == "in":
                data = os.read(stdin, 1 << 16)
                if not data:
                    sock.shutdown(socket.SHUT_WR)
                    sel.unregister(stdin)
                    continue
                sock.sendall(data)
            else:
                data = sock.recv(1 << 16)
                if not data:
                    return
                view = memoryview(data)
                while view:
                    n = os.write(stdout, view)
                    view = view[n:]
