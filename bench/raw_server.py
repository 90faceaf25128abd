"""The far end of the raw-SSH limit: a loop that runs cloudpickled calls read from stdin.

Run as ``ssh bench-sshd PYTHON raw_server.py``. Frames both ways are an 8-byte little-endian
length and a body; a request body is ``cloudpickle.dumps((f, args, kwargs))``, a reply body
``pickle.dumps(result, 5)``. It first writes its pid as one line, then serves until EOF.
This is the least a remote-call library must do per call: one pickle each way over one pipe.
"""

import os
import pickle
import struct
import sys

import cloudpickle  # noqa: F401 - functions arrive pickled by value

_LEN = struct.Struct("<Q")


def main() -> None:
    rd = sys.stdin.buffer.raw  # type: ignore[union-attr]
    wr = sys.stdout.buffer.raw  # type: ignore[union-attr]
    wr.write(b"%d\n" % os.getpid())
    while True:
        head = _read(rd, 8)
        if head is None:
            return
        (n,) = _LEN.unpack(head)
        body = _read(rd, n)
        f, args, kwargs = pickle.loads(body)
        out = pickle.dumps(f(*args, **kwargs), 5)
        frame = _LEN.pack(len(out)) + out
        view = memoryview(frame)
        while view:
            view = view[wr.write(view):]


def _read(rd, n):  # type: ignore[no-untyped-def]
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = rd.readinto(view[got:])
        if not k:
            return None
        got += k
    return buf


if __name__ == "__main__":
    main()
