"""A regular install works: a wheel built from this checkout, installed into a fresh virtual
environment, runs a federation from another folder, with the MNIST that ships inside it.

The fresh environment borrows this one's third-party packages (torch, numpy, ...) through a
.pth line, so nothing is downloaded; it does not see this checkout, nor its editable install
(a .pth line adds a folder to sys.path, but the .pth files inside that folder are not run).
"""

from __future__ import annotations

import json
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT, Proc, read_metrics

pytestmark = pytest.mark.processes  # every test here starts real processes

STEP_TIMEOUT_S = 300


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=STEP_TIMEOUT_S)
    assert done.returncode == 0, f"{args}:\n{done.stdout}\n{done.stderr}"
    return done


def test_a_wheel_installs_six_modules_and_one_package_and_runs_from_anywhere(tmp_path):
    dist, venv, elsewhere = tmp_path / "dist", tmp_path / "venv", tmp_path / "elsewhere"
    elsewhere.mkdir()
    source = tmp_path / "source"  # a copy, so that the build's own folders stay out of the checkout
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "build", "*.egg-info",
                                                               "__pycache__", ".hypothesis", "results"))
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(dist),
        str(source), cwd=tmp_path)
    (wheel,) = dist.glob("fedsock-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = sorted({n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))})
    assert top == ["client_helper.py", "fedsock", "fl_client.py", "fl_server.py", "fl_simulate.py",
                   "neural_net_helper.py", "socket_methods.py"], top
    assert "fedsock/data/mnist/train-images-idx3-ubyte.gz" in names
    assert {"fedsock/data/sms-spam/README.md", "fedsock/data/pneumonia-mnist/pneumoniamnist.npz"} <= set(names)
    assert {"fedsock/static/dashboard.html", "fedsock/static/uPlot.iife.min.js", "fedsock/static/uPlot-LICENSE.txt"} \
        <= set(names)  # the dashboard works offline: its page and chart library ship inside the package

    run(sys.executable, "-m", "venv", str(venv), cwd=tmp_path)
    python = venv / "bin" / "python"
    packages = run(str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).stdout.strip()
    (Path(packages) / "borrowed.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    run(str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel), cwd=tmp_path)
    where = json.loads(run(str(python), "-c", "import fedsock, fl_server, json; "
                                              "print(json.dumps([fedsock.__file__, fl_server.__file__]))",
                           cwd=elsewhere).stdout)
    assert all(path.startswith(packages) for path in where), where  # the installed copy, not this checkout

    out = elsewhere / "run"
    server = Proc([str(venv / "bin" / "fl-server"), "--model", "logreg", "--num-clients", "1", "--num-rounds", "1",
                   "--server-port", "0", "--output-dir", str(out)], "installed server", cwd=elsewhere, interpreter=None)
    client = None
    try:
        port = server.wait_for(r"listening on [\d.]+:(\d+)", timeout=120).group(1)
        client = Proc([str(venv / "bin" / "fl-client"), "--client-id", "1", "--server-port", port, "--quiet"],
                      "installed client", cwd=elsewhere, interpreter=None)
        assert client.finish(timeout=180) == 0, client.output
        assert server.finish(timeout=60) == 0, server.output
        simulate = Proc([str(venv / "bin" / "fl-simulate"), "--help"], "installed simulation", cwd=elsewhere,
                        interpreter=None)
        assert simulate.finish(timeout=60) == 0 and "--backend" in simulate.output, simulate.output
    finally:
        server.kill()
        if client is not None:
            client.kill()
    assert read_metrics(out / "metrics.csv")[0]["test_accuracy"] > 0.85
