"""The tests' process harness: real fedsock processes, read line by line, ended by PID.

Synchronisation is always on something a process printed (the server's "listening on
HOST:PORT", a round line), read with a deadline; no test sleeps to wait. The benchmarks
use the same harness (bench/common.py imports it), with RuntimeError for a failed wait.
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

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A child process whose merged stdout/stderr is read line by line (so it never
    blocks on a full pipe). A wait that fails is a failed test (AssertionError)."""

    error: type[Exception] = AssertionError

    def __init__(self, args: list[str], name: str, env: dict | None = None, cwd: Path = ROOT, stdin_pipe: bool = False,
                 preexec_fn=None, interpreter: str | None = PYTHON):
        self.name = name
        self.args = args
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.popen = subprocess.Popen(
            [interpreter, "-u", *args] if interpreter else args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **(env or {})}, stdin=subprocess.PIPE if stdin_pipe else None, preexec_fn=preexec_fn,
        )
        self.pid = self.popen.pid
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        for line in self.popen.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def _take(self, timeout: float) -> str | None:
        line = self._queue.get(timeout=timeout)
        if line is None:
            self._queue.put(None)  # keep the end marker for later readers
        else:
            self.lines.append(line)
        return line

    def wait_for(self, pattern: str, timeout: float = 60.0) -> re.Match:
        """Block until a line matching `pattern` appears (lines already seen count)."""
        regex = re.compile(pattern)
        for line in self.lines:
            if match := regex.search(line):
                return match
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self._take(remaining)
            except queue.Empty:
                break
            if line is None:
                raise self.error(f"{self.name} ended before printing {pattern!r}; output:\n" + self.output)
            if match := regex.search(line):
                return match
        raise self.error(f"{self.name}: no line matching {pattern!r} within {timeout:g} s; output:\n" + self.output)

    def finish(self, timeout: float = 120.0) -> int:
        """Wait (bounded) for the exit, then collect the rest of the output."""
        try:
            code = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self._drain()  # what it printed after the last line a test waited for: the clue
            raise self.error(f"{self.name} did not exit within {timeout:g} s; output:\n" + self.output) from None
        self._drain()
        return code

    def _drain(self) -> None:
        self._reader.join(timeout=10)
        while True:
            try:
                if self._take(0) is None:
                    break
            except queue.Empty:
                break

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.lines[-lines:])

    def close_stdin(self) -> None:
        """For a process started with stdin_pipe: the end of its input (a flood stops at it)."""
        if self.popen.stdin is not None and not self.popen.stdin.closed:
            self.popen.stdin.close()

    def signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        """SIGKILL this process (by its PID) if it is still running."""
        if self.popen.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.popen.wait(timeout=10)


def _cell(text: str):
    if text == "":
        return None  # a blank cell: epsilon without DP, a test score without a test set
    try:
        return float(text)
    except ValueError:
        return text  # the confusion matrix, as its JSON text


def read_metrics(path: Path) -> list[dict]:
    """metrics.csv's rows, numbers as floats (a blank cell is None; the confusion matrix stays text)."""
    with open(path) as f:
        return [{k: _cell(v) for k, v in row.items()} for row in csv.DictReader(f)]


class InProcessClient:
    """fl_client.py's `main`, run in a thread of this process against a real socket, with the same
    reading interface as Proc (finish, output, lines, wait_for): for tests of what a client does with
    a server's bytes, where a process of its own would only add PyTorch's import to every case. Its
    stdout and stderr are captured while it runs (one client at a time in a process)."""

    error: type[Exception] = AssertionError

    def __init__(self, args: list[str]):
        import fl_client
        from fedsock.console import run_main

        self.lines: list[str] = []
        self.code: int | None = None
        self._run = lambda: run_main("fl_client.py", fl_client.main, args)
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        import contextlib
        import io

        captured = io.StringIO()
        try:
            with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
                try:
                    self.code = self._run()
                except SystemExit as exc:  # argparse's exit on a bad flag
                    self.code = exc.code if isinstance(exc.code, int) else 1
        finally:
            self.lines = captured.getvalue().splitlines()

    def finish(self, timeout: float = 120.0) -> int:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise self.error(f"the client did not end within {timeout:g} s")
        return self.code

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 60.0) -> re.Match:
        """After finish(): the first line matching `pattern`."""
        self.finish(timeout)
        regex = re.compile(pattern)
        for line in self.lines:
            if match := regex.search(line):
                return match
        raise self.error(f"no line matching {pattern!r}; output:\n{self.output}")

    def kill(self) -> None:
        pass  # a thread ends with its connection: the tests' fake server closes it


def run_cli(program: str, argv: list[str], timeout_s: float = 60.0) -> tuple[int, str]:
    """A command line (fl_server, fl_client, fl_simulate) run in this process as its script runs it
    (`run_main`): its exit status and everything it printed. For flags and files it must refuse in
    one line; bounded, in case one it should refuse starts a run instead."""
    import contextlib
    import importlib
    import io

    from fedsock.console import run_main

    main = importlib.import_module(program).main
    printed, result = io.StringIO(), []

    def run() -> None:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            try:
                result.append(run_main(f"{program}.py", main, argv))
            except SystemExit as exc:  # argparse's exit on a bad flag
                result.append(exc.code)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert result, f"{program} {' '.join(argv)} did not end within {timeout_s:g} s:\n{printed.getvalue()}"
    return result[0], printed.getvalue()
