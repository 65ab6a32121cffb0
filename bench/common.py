"""What every benchmark shares: result rows, processes ended by PID, memory readings.

Every figure is reported beside a reference measured in the same run (and, where
it makes sense, interleaved with it), because the machine may be busy with other
work: absolute numbers drift, ratios much less.
"""

from __future__ import annotations

import csv
import os
import queue
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PYTHON = sys.executable


@dataclass
class Row:
    """One line of the results table: a figure, its reference, their ratio and the target."""

    bench: str
    metric: str
    value: float
    unit: str
    reference: float | None = None
    reference_label: str = ""
    ratio: float | None = None
    target: str = ""
    passed: bool | None = None  # None: no target, reported for information
    note: str = ""


def median(values) -> float:
    return float(statistics.median(values))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A child process whose merged stdout/stderr is read line by line (so it never
    blocks on a full pipe). The tests use it too (tests/conftest.py), with failures
    raised as AssertionError instead of RuntimeError."""

    error: type[Exception] = RuntimeError

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
            raise self.error(f"{self.name} did not exit within {timeout:g} s; output:\n" + self.output) from None
        self._reader.join(timeout=10)
        while True:
            try:
                if self._take(0) is None:
                    break
            except queue.Empty:
                break
        return code

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


def kill_all(procs: list[Proc]) -> None:
    for proc in procs:
        try:
            proc.kill()
        except (OSError, subprocess.TimeoutExpired):
            pass


def status_kb(pid: int, field: str) -> int | None:
    """A memory field of /proc/PID/status (VmRSS, VmHWM) in KiB; None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


class RssSampler:
    """Polls a process's VmRSS and VmHWM in a thread; `peak_kb` is the highest seen."""

    def __init__(self, pid: int, period_s: float = 0.05):
        self.pid, self.period_s = pid, period_s
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for field in ("VmHWM", "VmRSS"):
                value = status_kb(self.pid, field)
                if value is not None:
                    self.peak_kb = max(self.peak_kb, value)
            self._stop.wait(self.period_s)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.peak_kb


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


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)
