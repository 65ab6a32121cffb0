"""The runs view (fedsock/run_history.py, fedsock/runs.py): reading run folders, its routes' checks, and its page in a real Chromium.

Two real runs are made once for the module (fl_simulate.py's main in this process, logreg, 3 rounds): one
with fedavg, stopped after 2 rounds and resumed for a third, one with fedadam. The browser test opens
`python -m fedsock.runs` on them as a user does, and checks the table and the comparison against their
metrics.csv; the folder-reading tests build damaged folders by hand.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import urllib.parse

import pytest

from conftest import read_metrics
from support import run_cli
from fedsock import run_history as runs_module
from fedsock.console import ExitStatus
from fedsock.run_files import METRIC_COLUMNS
from fedsock.dashboard import SHOWN_SETTINGS
from fedsock.run_history import RunsFolder as Folder, Unreadable, read_metrics as read_rows
from test_dashboard import UI_TIMEOUT_MS, bearer, chromium, request, with_dashboard
from test_engine import FakeClient, engine_for

def RunsFolder(path):  # noqa: N802: the folder as the dashboard reads it
    return Folder(path, SHOWN_SETTINGS)


RUNS_LINK = r"dashboard: ((http://127\.0\.0\.1:\d+/)runs\?token=[\w-]+)"
SIMULATION = ["--model", "logreg", "--num-clients", "3", "--seed", "1", "--quiet"]
# metrics.csv's columns before the session columns: tools that read it by position still find them there
COLUMNS_BEFORE = ("round", "clients", "test_accuracy", "test_loss", "train_loss", "seconds", "bytes_sent",
                  "bytes_received", "max_fit_seconds", "sum_fit_seconds", "epsilon", "test_precision", "test_recall",
                  "test_f1", "fed_accuracy", "fed_loss", "fed_precision", "fed_recall", "fed_f1", "fed_clients",
                  "fed_examples", "confusion")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """runs/fedavg (2 rounds, then --resume to 3) and runs/fedadam (3 rounds): real simulations."""
    import fl_simulate

    root = tmp_path_factory.mktemp("runs")
    fedavg, fedadam = root / "fedavg", root / "fedadam"
    assert fl_simulate.main([*SIMULATION, "--num-rounds", "2", "--output-dir", str(fedavg)]) == 0
    assert fl_simulate.main(["--resume", str(fedavg / "checkpoint.fsck"), "--num-rounds", "3", "--quiet"]) == 0
    assert fl_simulate.main([*SIMULATION, "--num-rounds", "3", "--strategy", "fedadam",
                             "--output-dir", str(fedadam)]) == 0
    return root


# --------------------------------------------------------------------------- what a run folder says


def test_metrics_csv_says_where_a_resume_began_after_the_columns_it_had(two_runs):
    with open(two_runs / "fedavg" / "metrics.csv") as f:
        header = next(csv.reader(f))
    assert tuple(header) == METRIC_COLUMNS == (*COLUMNS_BEFORE, "session", "resumed", "staleness",
                                                        "mean_staleness", "virtual_seconds")
    rows = read_metrics(two_runs / "fedavg" / "metrics.csv")
    assert [(r["round"], r["session"], r["resumed"]) for r in rows] == [(1, 1, None), (2, 1, None), (3, 2, 1)]
    assert [r["session"] for r in read_metrics(two_runs / "fedadam" / "metrics.csv")] == [1, 1, 1]


def test_the_listing_has_each_runs_settings_and_final_numbers(two_runs):
    listing = RunsFolder(two_runs).listing()
    assert listing["skipped"] == [] and listing["not_listed"] == 0
    runs = {r["name"]: r for r in listing["runs"]}
    assert set(runs) == {"fedavg", "fedadam"}
    for name, run in runs.items():
        rows = read_metrics(two_runs / name / "metrics.csv")
        config = json.loads((two_runs / name / "config.json").read_text())
        assert run["settings"]["strategy"] == config["strategy"] == name
        assert (run["settings"]["model"], run["settings"]["num_clients"], run["settings"]["seed"]) == ("logreg", 3, 1)
        assert (run["rounds_done"], run["num_rounds"], run["completed"]) == (3, 3, True)
        assert run["final_accuracy"] == rows[-1]["test_accuracy"] and run["final_loss"] == rows[-1]["test_loss"]
        assert run["best_accuracy"] == max(r["test_accuracy"] for r in rows)
        assert run["seconds"] == pytest.approx(sum(r["seconds"] for r in rows))
        assert "output_dir" not in run["settings"] and "auth_token_file" not in json.dumps(run)  # no paths
    assert (runs["fedavg"]["sessions"], runs["fedadam"]["sessions"]) == (2, 1)


def write_run(folder, rounds: int = 2, config: str | None = None, metrics: str | None = None):
    folder.mkdir()
    (folder / "config.json").write_text(config if config is not None else json.dumps(
        {"model": "logreg", "strategy": "fedavg", "num_rounds": rounds, "output_dir": "/secret/path"}))
    if metrics is None:
        metrics = "round,test_accuracy,test_loss\n" + "".join(f"{k},0.{k},1.{k}\n" for k in range(1, rounds + 1))
    (folder / "metrics.csv").write_text(metrics)


def test_damaged_and_partial_folders_are_skipped_with_a_reason(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    write_run(runs / "good")  # an old metrics.csv: no session column (its rounds are session 1)
    write_run(runs / "not-json", config="{")
    write_run(runs / "a-list", config="[1, 2]")
    (runs / "no-config").mkdir()
    write_run(runs / "no-metrics")
    (runs / "no-metrics" / "metrics.csv").unlink()
    write_run(runs / "empty", metrics="")
    write_run(runs / "header-only", metrics="round,test_accuracy\n")
    write_run(runs / "bad-number", metrics="round,test_accuracy\n1,0.5\n2,lots\n")
    write_run(runs / "gap", metrics="round,test_accuracy\n1,0.5\n3,0.6\n")
    write_run(runs / "not-utf8", metrics="round,test_accuracy\n1,\xff\n")
    (runs / "not-utf8" / "metrics.csv").write_bytes(b"round,test_accuracy\n1,\xff\n")
    write_run(runs / "linked-metrics", metrics="")
    (runs / "linked-metrics" / "metrics.csv").unlink()
    (runs / "linked-metrics" / "metrics.csv").symlink_to(runs / "good" / "metrics.csv")
    write_run(runs / "a-pipe", metrics="")
    (runs / "a-pipe" / "metrics.csv").unlink()
    os.mkfifo(runs / "a-pipe" / "metrics.csv")  # opening it for reading must not hang the page
    (runs / "linked-run").symlink_to(runs / "good")
    write_run(runs / "odd name")
    (runs / "notes.txt").write_text("not a run")  # a file beside the runs: not a folder, not listed

    listing = RunsFolder(runs).listing()

    assert [r["name"] for r in listing["runs"]] == ["good"]
    good = listing["runs"][0]
    assert (good["rounds_done"], good["final_accuracy"], good["sessions"], good["completed"]) == (2, 0.2, 1, True)
    reasons = {s["name"]: s["reason"] for s in listing["skipped"]}
    assert reasons == {
        "not-json": reasons["not-json"], "a-list": "config.json is not a JSON object", "no-config": "no config.json",
        "no-metrics": "no metrics.csv: no round has finished", "empty": "metrics.csv is empty",
        "header-only": "metrics.csv has no rounds yet",
        "bad-number": "metrics.csv, round 2: test_accuracy 'lots' is not a number",
        "gap": "metrics.csv, round 2: the row says round '3' (rows go 1, 2, 3, ...)",
        "not-utf8": "metrics.csv is not UTF-8 text",
        "linked-metrics": reasons["linked-metrics"], "a-pipe": "metrics.csv is not a regular file",
        "linked-run": "a symbolic link: only folders in the runs folder itself are read",
        "odd name": "not a run folder's name (letters, digits and _ . + = , - only; no leading dot)",
    }
    assert reasons["not-json"].startswith("config.json is not JSON")
    assert reasons["linked-metrics"].startswith("cannot read metrics.csv")  # O_NOFOLLOW: ELOOP


@pytest.mark.parametrize("name", ["..", ".", "../runs", "good/../good", ".hidden", "", "a/b", "good\x00"])
def test_only_direct_children_of_the_runs_folder_are_read(tmp_path, name):
    runs = tmp_path / "runs"
    runs.mkdir()
    write_run(runs / "good")
    write_run(runs / ".hidden")
    with pytest.raises(Unreadable, match="not a run folder's name"):
        RunsFolder(runs).metrics(name)
    assert RunsFolder(runs).metrics("good")["rows"][1]["test_accuracy"] == 0.2


def test_the_work_is_bounded(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    runs.mkdir()
    for k in range(3):
        write_run(runs / f"run{k}", rounds=5)
        os.utime(runs / f"run{k}", (1_000_000 + k, 1_000_000 + k))
    rows, truncated = read_rows(runs / "run0", max_rows=4)
    assert [r["round"] for r in rows] == [1, 2, 3, 4] and truncated
    monkeypatch.setattr(runs_module, "MAX_RUNS", 2)
    listing = RunsFolder(runs).listing()
    assert [r["name"] for r in listing["runs"]] == ["run2", "run1"] and listing["not_listed"] == 1  # the newest
    monkeypatch.setattr(runs_module, "MAX_METRICS_BYTES", 10)
    with pytest.raises(Unreadable, match="over the view's limit of 10"):
        RunsFolder(runs).metrics("run0")


# --------------------------------------------------------------------------- the routes


def test_the_routes_need_the_token_and_refuse_traversal(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    write_run(runs / "live")
    write_run(runs / "other", rounds=3)
    (tmp_path / "secret").mkdir()
    write_run(tmp_path / "secret" / "x")
    engine, _ = engine_for([FakeClient(1)], start="manual")
    engine.output_dir = str(runs / "live")

    def scenario(dashboard) -> list:
        url, good = dashboard.url, bearer(dashboard.access.link)
        return [request(url + path, None, headers) for path, headers in [
            ("api/runs", {}), ("runs", {}), ("api/runs/other/metrics", {}),  # no token
            ("api/runs", good), ("api/runs/other/metrics", good), ("runs", good),
            ("api/runs/..%2Fsecret%2Fx/metrics", good), ("api/runs/%2E%2E/metrics", good),
            ("api/runs/../secret/metrics", good), ("api/runs/missing/metrics", good),
            ("api/runs", {**good, "Host": "evil.example"}),  # DNS rebinding
        ]]

    answers = with_dashboard(engine, scenario)
    statuses = [status for status, _ in answers]
    assert statuses == [403, 403, 403, 200, 200, 200, 404, 404, 404, 404, 403], statuses
    listing = answers[3][1]
    assert (listing["current"], listing["live"], listing["folder"]) == ("live", True, "runs")
    assert sorted(r["name"] for r in listing["runs"]) == ["live", "other"]
    assert "/secret/path" not in json.dumps(listing) and str(tmp_path) not in json.dumps(listing)
    assert [r["round"] for r in answers[4][1]["rows"]] == [1, 2, 3]
    assert b"runs.js" in answers[5][1]
    assert "not a run folder's name" in answers[6][1]["error"]


def test_bad_flags_are_one_line_and_exit_2(tmp_path):
    for argv in (["--dashbord", "0"], ["--dashboard", "99999", str(tmp_path)], [str(tmp_path / "none")]):
        code, output = run_cli("fedsock.runs", argv)
        lines = [line for line in output.splitlines() if line.strip()]
        assert code == ExitStatus.USAGE and len(lines) == 1 and "Traceback" not in output, output
    assert "did you mean --dashboard?" in run_cli("fedsock.runs", ["--dashbord", "0"])[1]


# --------------------------------------------------------------------------- in the browser


@pytest.mark.processes
def test_the_runs_page_lists_two_real_runs_and_compares_them(cluster, two_runs):
    from playwright.sync_api import expect, sync_playwright

    viewer = cluster.run_program("-m", "fedsock.runs", str(two_runs), "--dashboard", "127.0.0.1:0")
    link, url = viewer.wait_for(RUNS_LINK, timeout=60).groups()
    metrics = {name: read_metrics(two_runs / name / "metrics.csv") for name in ("fedavg", "fedadam")}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        try:
            assert browser.new_page().goto(url + "api/runs").status == 403  # a browser that never opened the link
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(link)
            assert page.url == url + "runs"  # the token left the address bar
            rows = page.locator("#runs tbody tr")
            expect(rows).to_have_count(2, timeout=UI_TIMEOUT_MS)
            for name, strategy in (("fedavg", "fedavg"), ("fedadam", "fedadam")):
                row = page.locator(f"#runs tr[data-name={name}]")
                last = metrics[name][-1]
                cell = lambda key: row.locator(f"td[data-key={key}]")  # noqa: E731
                expect(cell("strategy")).to_have_text(strategy)
                expect(cell("model")).to_have_text("logreg")
                expect(cell("clients")).to_have_text("3")
                expect(cell("seed")).to_have_text("1")
                expect(cell("rounds")).to_have_text("3 of 3")
                expect(cell("status")).to_have_text("completed")
                expect(cell("final_accuracy")).to_have_text(f"{100 * last['test_accuracy']:.2f}")
                expect(cell("final_loss")).to_have_text(f"{last['test_loss']:.4f}")
            page.click("#runs th[data-key=final_accuracy]")  # sorted by final accuracy, highest first
            better = max(metrics, key=lambda n: metrics[n][-1]["test_accuracy"])
            expect(rows.first).to_have_attribute("data-name", better)

            page.check("#runs tr[data-name=fedavg] input")
            page.check("#runs tr[data-name=fedadam] input")
            page.wait_for_function("() => view.charts.accuracy && view.charts.accuracy.series.length === 3",
                                   timeout=UI_TIMEOUT_MS)
            chart = page.evaluate("({labels: view.charts.accuracy.series.map((s) => s.label),"
                                  " data: view.charts.accuracy.data, loss: view.charts.loss.data,"
                                  " marks: view.charts.accuracy.sessionMarks})")
            assert chart["labels"] == ["round", "fedavg", "fedadam"]
            assert chart["data"][0] == [1, 2, 3]
            for series, name in enumerate(("fedavg", "fedadam"), start=1):
                assert chart["data"][series] == pytest.approx([100 * r["test_accuracy"] for r in metrics[name]],
                                                              rel=1e-12)
                assert chart["loss"][series] == pytest.approx([r["test_loss"] for r in metrics[name]], rel=1e-12)
            assert [(m["round"], m["label"]) for m in chart["marks"]] == [(3, "fedavg: resumed")]  # drawn
            page.uncheck("#runs tr[data-name=fedadam] input")
            page.wait_for_function("() => view.charts.accuracy.series.length === 2", timeout=UI_TIMEOUT_MS)
            assert not errors, errors
        finally:
            browser.close()
    viewer.signal(signal.SIGINT)
    assert viewer.finish(timeout=30) == ExitStatus.INTERRUPTED
    assert not re.search("Traceback", viewer.output), viewer.output
    assert urllib.parse.urlsplit(link).path == "/runs"
