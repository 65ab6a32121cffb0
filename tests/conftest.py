"""Helpers that run the real server and clients as processes on 127.0.0.1.

Synchronisation is always on something a process printed (the server's
"listening on HOST:PORT", a round line), read line by line with a deadline;
every wait is bounded and every process a test starts is ended by PID.
"""

from __future__ import annotations

import multiprocessing.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))  # netlab.py and pki.py: the namespaces and CAs some tests make

from support import Proc, free_port, read_metrics  # noqa: E402,F401  (re-exported for the tests)

def pytest_configure(config):
    config.addinivalue_line("markers", "processes: the test starts processes (servers, clients, a browser, a "
                                       "namespace); the fast tier is `pytest -m 'not processes'`")


# Process tests first, the longest modules first (seconds, from `pytest --durations=0` on 2 cores): with
# `-n` (pytest-xdist, as .ci/run runs), the workers then end together instead of waiting on one long tail.
SLOW_MODULES = {"test_simulate.py": 180, "test_lobby.py": 140, "test_netns.py": 120, "test_faults.py": 110,
                "test_secagg_processes.py": 150, "test_federation.py": 100,
                "test_security.py": 95, "test_compression.py": 74, "test_privacy.py": 71}


def pytest_collection_modifyitems(config, items):
    def cost(item) -> tuple:
        processes = item.get_closest_marker("processes") is not None
        return (not processes, -SLOW_MODULES.get(item.path.name, 0) if processes else 0)

    items.sort(key=cost)  # a stable sort: within a module, tests keep their order


@pytest.fixture(autouse=True)
def processes_are_marked(request, monkeypatch):
    """The fast tier stays fast: a test not marked `processes` that starts one fails, and says so."""
    if request.node.get_closest_marker("processes") is not None:
        return

    def refuse(*args, **kwargs):
        raise AssertionError(f"{request.node.nodeid} starts a process: mark it @pytest.mark.processes")

    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse)
    monkeypatch.setattr(multiprocessing.util, "spawnv_passfds", refuse)
    monkeypatch.setattr(os, "fork", refuse)


# Small, fast federations: logistic regression trains an MNIST round in about a second.
FAST = ["--model", "logreg", "--time-to-wait", "30"]


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

    def run_program(self, program: str, *args: str) -> Proc:
        proc = Proc([program, *args], program)
        self.procs.append(proc)
        return proc

    def flood(self, count: int = 300, port: int | None = None) -> Proc:
        """`count` silent connections to the server, each re-opened when the server closes it
        (tests/flood.py), until stop_flood(); returns once they are all open."""
        proc = Proc(["tests/flood.py", "--port", str(port or self.port), "--count", str(count)], "flood",
                    stdin_pipe=True)
        self.procs.append(proc)
        proc.wait_for(rf"flood: {count} silent connections open", timeout=30)
        return proc

    def stop_flood(self, flood: Proc) -> int:
        """End a flood; how many connections it opened in all."""
        flood.close_stdin()
        assert flood.finish(timeout=30) == 0, flood.output
        return int(flood.wait_for(r"flood: opened (\d+) connections in all").group(1))

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    yield c
    c.close()
