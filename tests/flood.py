"""A flood of silent connections: opens COUNT sockets to a server and says nothing on any of
them; whenever the server closes one, it opens another. It runs until its stdin closes (the
test that started it is done), or for --seconds at most.

    python tests/flood.py --port 50052 --count 300

Each pass over the sockets waits at most 20 ms in select(), so the loop is bounded and does
not spin. At the end it prints one line: how many connections it opened in all.
"""

from __future__ import annotations

import argparse
import select
import socket
import sys
import time


def open_one(port: int) -> socket.socket | None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.connect_ex(("127.0.0.1", port))
    except OSError:
        sock.close()
        return None
    return sock


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=600.0)
    args = parser.parse_args()
    deadline = time.monotonic() + args.seconds
    socks = [s for s in (open_one(args.port) for _ in range(args.count)) if s is not None]
    opened = len(socks)
    print(f"flood: {opened} silent connections open", flush=True)
    while time.monotonic() < deadline:
        readable, _, _ = select.select([sys.stdin, *socks], [], [], 0.02)
        if sys.stdin in readable and not sys.stdin.readline():
            break  # the test closed our stdin: stop
        for sock in readable:
            if sock is sys.stdin:
                continue
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if data:
                continue  # the server spoke (an <ERROR>, say): we still say nothing
            socks.remove(sock)  # closed by the server: open another in its place
            sock.close()
            again = open_one(args.port)
            if again is not None:
                socks.append(again)
                opened += 1
        while len(socks) < args.count:  # a connect that failed outright is retried on the next pass
            again = open_one(args.port)
            if again is None:
                break
            socks.append(again)
            opened += 1
    print(f"flood: opened {opened} connections in all", flush=True)
    for sock in socks:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
