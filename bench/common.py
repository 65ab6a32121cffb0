"""What every benchmark shares: result rows, processes ended by PID, memory readings.

Every figure is reported beside a reference measured in the same run (and, where
it makes sense, interleaved with it), because the machine may be busy with other
work: absolute numbers drift, ratios much less.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import support  # noqa: E402  (tests/support.py: the process harness, shared with the tests)
from support import free_port, read_metrics  # noqa: E402,F401  (re-exported for the benchmarks)

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


class Proc(support.Proc):
    """A benchmark's child process (tests/support.py): a failed wait is a RuntimeError."""

    error = RuntimeError


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


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)
