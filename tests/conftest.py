"""Helpers that run the real server and clients as processes on 127.0.0.1.

Synchronisation is always on something a process printed (the server's
"listening on HOST:PORT", a round line), read line by line with a deadline;
every wait is bounded and every process a test starts is ended by PID.
"""

from __future__ import annotations

import csv
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

# Small, fast federations: logistic regression trains an MNIST round in about a second.
FAST = ["--model", "logreg", "--time-to-wait", "30"]


class Proc:
    """A running fedsock process whose merged stdout/stderr is read line by line."""

    def __init__(self, args: list[str], name: str, env: dict | None = None):
        self.name = name
        self.args = args
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.popen = subprocess.Popen(
            [sys.executable, "-u", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        for line in self.popen.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float = 60.0) -> re.Match:
        """Block until a line matching `pattern` appears (lines already seen count)."""
        regex = re.compile(pattern)
        for line in self.lines:
            if match := regex.search(line):
                return match
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{self.name}: no line matching {pattern!r} within {timeout} s; output:\n" + self.output)
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                self._queue.put(None)
                raise AssertionError(f"{self.name} ended before printing {pattern!r}; output:\n" + self.output)
            self.lines.append(line)
            if match := regex.search(line):
                return match

    def finish(self, timeout: float = 120.0) -> int:
        """Wait for the process to exit (bounded) and collect all of its output."""
        try:
            code = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.name} did not exit within {timeout} s; output:\n" + self.output)
        self._reader.join(timeout=10)
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._queue.put(None)
                break
            self.lines.append(line)
        return code

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signum)

    def kill(self) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=10)


class Cluster:
    """Starts servers and clients for one test and ends every one of them afterwards."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.procs: list[Proc] = []
        self.port: int | None = None

    def server(self, *args: str, output_dir: Path | None = None, env: dict | None = None, wait: bool = True) -> Proc:
        out = output_dir or self.tmp_path / "run"
        proc = Proc(["fl_server.py", "--server-port", "0", "--output-dir", str(out), *args], "server", env)
        self.procs.append(proc)
        if wait:
            self.port = int(proc.wait_for(r"listening on [\d.]+:(\d+)", timeout=90).group(1))
        return proc

    def client(self, client_id: int, *args: str, port: int | None = None, env: dict | None = None,
               quiet: bool = True) -> Proc:
        port = port or self.port
        flags = ["--quiet"] if quiet else []
        proc = Proc(["fl_client.py", "--client-id", str(client_id), "--server-port", str(port), *flags, *args],
                    f"client {client_id}", env)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    yield c
    c.close()


def free_port() -> int:
    """A port nobody listens on (for 'no server there' and clients started before the server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(path: Path) -> list[dict[str, float]]:
    with open(path) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
