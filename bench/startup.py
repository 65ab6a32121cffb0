"""Benchmark 5: a client says <HELLO> before PyTorch could even have been imported.

Three wall times, interleaved repetition by repetition, median:
  hello   launching `fl_client.py --client-id 1 --server-port P` until its whole
          <HELLO> frame has arrived at a bare listening socket here (no server:
          the client is then disconnected and ended by its PID);
  help    `fl_client.py --help`, start to exit;
  torch   `python -c "import torch"`, start to exit: the reference;
and `python -c pass` (the interpreter alone) for scale.

    python bench/startup.py --reps 5
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PYTHON, ROOT, Row, median, say  # noqa: E402


def time_command(args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run([PYTHON, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True,
                   timeout=120)
    return time.perf_counter() - started


def read_exactly(sock: socket.socket, nbytes: int) -> bytes:
    data = b""
    while len(data) < nbytes:
        chunk = sock.recv(nbytes - len(data))
        if not chunk:
            raise ConnectionError("the client closed the connection before its <HELLO> was complete")
        data += chunk
    return data


def time_hello() -> float:
    """Launch a client at a bare listening socket; seconds until its <HELLO> frame is in."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(60)
        port = listener.getsockname()[1]
        started = time.perf_counter()
        client = subprocess.Popen([PYTHON, "fl_client.py", "--client-id", "1", "--server-port", str(port), "--quiet"],
                                  cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(60)
                (length,) = struct.unpack(">Q", read_exactly(conn, 8))
                hello = json.loads(read_exactly(conn, length))
                elapsed = time.perf_counter() - started
            if hello.get("header") != "<HELLO>" or hello.get("client_id") != 1:
                raise RuntimeError(f"expected the client's <HELLO>, got {hello}")
            return elapsed
        finally:
            if client.poll() is None:
                client.kill()  # this Popen's own PID
            client.wait(timeout=30)


def run(quick: bool, reps: int | None = None) -> list[Row]:
    reps = reps or (3 if quick else 7)
    times: dict[str, list[float]] = {"hello": [], "help": [], "torch": [], "python": []}
    time_command(["-c", "import torch"])  # warm the file cache once, for every contender alike
    for _ in range(reps):
        times["hello"].append(time_hello())
        times["help"].append(time_command(["fl_client.py", "--help"]))
        times["torch"].append(time_command(["-c", "import torch"]))
        times["python"].append(time_command(["-c", "pass"]))
    hello, help_s, torch_s, bare = (median(times[k]) for k in ("hello", "help", "torch", "python"))
    say(f"startup: hello {hello:.3f} s, --help {help_s:.3f} s, import torch {torch_s:.3f} s, python {bare:.3f} s")
    note = f"median of {reps} interleaved runs; `python -c pass` alone takes {1e3 * bare:.0f} ms"
    return [
        Row("5 startup", "fl_client.py launch -> <HELLO> at a bare socket", hello * 1e3, "ms", torch_s * 1e3,
            'python -c "import torch"', hello / torch_s, "<= 0.25x import torch", hello <= 0.25 * torch_s, note),
        Row("5 startup", "fl_client.py --help", help_s * 1e3, "ms", torch_s * 1e3,
            'python -c "import torch"', help_s / torch_s, "<= 0.25x import torch", help_s <= 0.25 * torch_s, note),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    for row in run(False, args.reps):
        print(json.dumps(row.__dict__))


if __name__ == "__main__":
    main()
