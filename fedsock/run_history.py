"""The runs view: the run folders side by side, their settings and final numbers, and a chart that compares them.

This module reads the folders and answers the view's routes; the live dashboard (fedsock/dashboard.py) adds
them to its own server, and `python -m fedsock.runs` (fedsock/runs.py) serves them alone.

The live dashboard serves it for the runs beside its own (the sibling folders of --output-dir: the default
runs/<timestamp>/ puts every run in runs/), and it opens without a federation as TensorBoard's does:

    python -m fedsock.runs [FOLDER] [--dashboard [HOST:]PORT]
    # runs: http://127.0.0.1:8090/runs?token=...

    GET /runs                     the page (fedsock/static/runs.html, .js, .css)
    GET /api/runs                 every run folder's settings and final numbers; the folders skipped, and why
    GET /api/runs/<name>/metrics  one run's rows of metrics.csv (the columns the charts draw)

It reads only what a run wrote (config.json, metrics.csv) and only in the direct children of the runs
folder: a name must be a plain folder name (no `/`, no `..`, no leading dot) and a folder or file that is a
symbolic link is refused, so no request reaches a file elsewhere. The work is bounded: the newest MAX_RUNS
folders are listed, each file is read only up to its size limit and MAX_ROWS rows, and a summary is kept
until its files change. A damaged or partial folder is skipped with its reason, never a failed page.
The same token, cookie and Host checks as the live dashboard guard every route (fedsock/dashboard.py).
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any

from aiohttp import web


STATIC = Path(__file__).resolve().parent / "static"
MAX_RUNS = 200  # folders listed, newest first: a page (and its scan) stays small however many runs pile up
MAX_ENTRIES = 10_000  # entries of the runs folder looked at, at most
MAX_ROWS = 100_000  # rounds read from one metrics.csv
MAX_METRICS_BYTES = 64 << 20
MAX_CONFIG_BYTES = 1 << 20
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=,-]{0,127}")  # runs/<timestamp>, runs/fedavg-seed3, ...
# The columns the runs view reads; the others (bytes, precision, the confusion matrix) stay on disk.
NUMBERS = ("test_accuracy", "test_loss", "train_loss", "seconds", "test_f1", "fed_accuracy", "fed_loss", "fed_f1",
           "epsilon")
# The settings a run is told apart by, in the table; the page gets SHOWN_SETTINGS (no token, no path).
KEY_SETTINGS = ("model", "task", "dataset", "strategy", "num_clients", "clients_per_round", "num_rounds",
                "dp_clip", "dp_noise_multiplier", "dp_mode", "secure_aggregation", "compression", "seed")


class Unreadable(Exception):
    """A run folder or file the view does not read: the sentence says why."""


# --------------------------------------------------------------------------- reading a run folder


def run_folder(runs_dir: Path, name: str) -> Path:
    """The folder `name` in runs_dir, if it is a plain name and a real folder (not a link); Unreadable if not."""
    if not NAME.fullmatch(name):
        raise Unreadable("not a run folder's name (letters, digits and _ . + = , - only; no leading dot)")
    path = runs_dir / name
    try:
        mode = os.lstat(path).st_mode
    except OSError as exc:
        raise Unreadable(exc.strerror or str(exc)) from None
    if stat.S_ISLNK(mode):
        raise Unreadable("a symbolic link: only folders in the runs folder itself are read")
    if not stat.S_ISDIR(mode):
        raise Unreadable("not a folder")
    return path


def read_file(path: Path, limit: int) -> bytes:
    """A regular file's bytes, refused if it is a link (O_NOFOLLOW), a pipe or a device, or over `limit`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise Unreadable(f"no {path.name}") from None
    except OSError as exc:
        raise Unreadable(f"cannot read {path.name}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise Unreadable(f"{path.name} is not a regular file")
        if info.st_size > limit:
            raise Unreadable(f"{path.name} is {info.st_size:,} bytes, over the view's limit of {limit:,}")
        return f.read(limit + 1)[:limit]


def read_config(folder: Path) -> dict[str, Any]:
    text = read_file(folder / "config.json", MAX_CONFIG_BYTES)
    try:
        config = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Unreadable(f"config.json is not JSON ({exc})") from None
    if not isinstance(config, dict):
        raise Unreadable("config.json is not a JSON object")
    return config


def read_metrics(folder: Path, max_rows: int = MAX_ROWS) -> tuple[list[dict[str, Any]], bool]:
    """metrics.csv's rows (round, the NUMBERS, session, resumed), and whether rows beyond max_rows were left."""
    try:
        text = read_file(folder / "metrics.csv", MAX_METRICS_BYTES).decode("utf-8")
    except UnicodeDecodeError:
        raise Unreadable("metrics.csv is not UTF-8 text") from None
    rows: list[dict[str, Any]] = []
    reader = csv.DictReader(io.StringIO(text))
    try:
        if "round" not in (reader.fieldnames or []):
            raise Unreadable("metrics.csv has no round column" if text.strip() else "metrics.csv is empty")
        for line in reader:
            if len(rows) == max_rows:
                return rows, True
            rows.append(metrics_row(line, len(rows) + 1))
    except csv.Error as exc:
        raise Unreadable(f"metrics.csv line {reader.line_num}: {exc}") from None
    return rows, False


def metrics_row(line: dict[str, str | None], expected_round: int) -> dict[str, Any]:
    """One row, checked: its round is the next one, its numbers are numbers (empty: None). Rows written
    before metrics.csv had a `session` column are session 1."""
    where = f"metrics.csv, round {expected_round}"
    if line.get("round") != str(expected_round):
        raise Unreadable(f"{where}: the row says round {line.get('round')!r} (rows go 1, 2, 3, ...)")
    row: dict[str, Any] = {"round": expected_round}
    for name in (*NUMBERS, "session", "resumed"):
        cell = (line.get(name) or "").strip()
        try:
            value = float(cell) if cell else None
        except ValueError:
            raise Unreadable(f"{where}: {name} {cell[:20]!r} is not a number") from None
        row[name] = value if value is not None and math.isfinite(value) else None  # a diverged loss: no point
    row["session"] = int(row["session"]) if row["session"] is not None else 1
    row["resumed"] = 1 if row["resumed"] else None
    return row


def summary(name: str, config: dict[str, Any], rows: list[dict[str, Any]], truncated: bool, modified: float,
            shown: tuple[str, ...]) -> dict[str, Any]:
    """What the table shows of a run: its settings, and its final and best numbers. The accuracy is the
    server's test set's, or, for a run without one (the clients' own data), the clients' evaluation."""
    scored = "test" if any(r["test_accuracy"] is not None for r in rows) else "fed"
    accuracy = [(r[f"{scored}_accuracy"], r["round"]) for r in rows if r[f"{scored}_accuracy"] is not None]
    f1 = [r[f"{scored}_f1"] for r in rows if r[f"{scored}_f1"] is not None]
    loss = [r[f"{scored}_loss"] for r in rows if r[f"{scored}_loss"] is not None]
    best = max(accuracy, default=(None, None))
    planned = config.get("num_rounds")
    done = len(rows)
    return {
        "name": name, "modified": modified, "settings": {k: config.get(k) for k in shown if k in config},
        "rounds_done": done, "num_rounds": planned, "truncated": truncated,
        "completed": isinstance(planned, int) and done >= planned, "scored_on": scored,
        "final_accuracy": accuracy[-1][0] if accuracy else None, "best_accuracy": best[0], "best_round": best[1],
        "final_f1": f1[-1] if f1 else None, "best_f1": max(f1, default=None), "final_loss": loss[-1] if loss else None,
        "seconds": sum(r["seconds"] or 0.0 for r in rows), "sessions": max((r["session"] for r in rows), default=1),
    }


class RunsFolder:
    """The run folders in one folder, read on request and kept until their files change."""

    def __init__(self, path: Path, shown: tuple[str, ...], current: str | None = None):
        # shown: the settings the page may show of a config (the dashboard's SHOWN_SETTINGS: no token, no path)
        self.path, self.current, self.shown = Path(path), current, shown
        self.kept: dict[str, tuple[tuple, dict[str, Any]]] = {}

    def listing(self) -> dict[str, Any]:
        """Every run, newest first (up to MAX_RUNS), and the folders skipped with their reasons."""
        folders, skipped, beyond = [], [], 0
        try:
            with os.scandir(self.path) as entries:
                for count, entry in enumerate(entries):
                    if count == MAX_ENTRIES:
                        beyond = -1  # "more than were looked at"
                        break
                    if entry.is_dir(follow_symlinks=False) or entry.is_symlink():
                        try:
                            folders.append((entry.stat(follow_symlinks=False).st_mtime, entry.name))
                        except OSError:
                            pass  # gone meanwhile
        except OSError as exc:
            raise Unreadable(f"cannot list the runs folder: {exc.strerror or exc}") from None
        folders.sort(reverse=True)
        if beyond == 0:
            beyond = max(len(folders) - MAX_RUNS, 0)
        runs = []
        for modified, name in folders[:MAX_RUNS]:
            try:
                runs.append(self.run(name, modified))
            except Unreadable as exc:
                skipped.append({"name": name if NAME.fullmatch(name) else ascii(name)[1:-1][:80], "reason": str(exc)})
        if len(self.kept) > 2 * MAX_RUNS:
            self.kept.clear()
        return {"folder": self.path.name, "current": self.current, "runs": runs, "skipped": skipped,
                "not_listed": beyond, "max_runs": MAX_RUNS}

    def stamp(self, folder: Path) -> tuple:
        def of(name: str) -> tuple:
            try:
                info = os.stat(folder / name, follow_symlinks=False)
            except OSError:
                return ()
            return info.st_mtime_ns, info.st_size, info.st_ino

        return of("config.json"), of("metrics.csv")

    def run(self, name: str, modified: float) -> dict[str, Any]:
        folder = run_folder(self.path, name)
        stamp = self.stamp(folder)
        kept = self.kept.get(name)
        if kept is not None and kept[0] == stamp:
            return kept[1]
        config = read_config(folder)
        if not (folder / "metrics.csv").exists():
            raise Unreadable("no metrics.csv: no round has finished")
        rows, truncated = read_metrics(folder)
        if not rows:
            raise Unreadable("metrics.csv has no rounds yet")
        result = summary(name, config, rows, truncated, modified, self.shown)
        self.kept[name] = (stamp, result)
        return result

    def metrics(self, name: str) -> dict[str, Any]:
        rows, truncated = read_metrics(run_folder(self.path, name))
        return {"name": name, "rows": rows, "truncated": truncated}


# --------------------------------------------------------------------------- serving it


class RunsView:
    """The routes of the runs view, added to an aiohttp app whose middleware checks every request."""

    def __init__(self, folder: RunsFolder, live: bool):
        self.folder, self.live = folder, live
        self.reading = asyncio.Lock()  # one scan at a time: a page reloaded in a loop queues, never piles up

    def add_routes(self, router) -> None:
        router.add_get("/runs", self.page)
        router.add_get("/api/runs", self.api_runs)
        router.add_get("/api/runs/{name}/metrics", self.api_metrics)

    async def page(self, request):
        return web.FileResponse(STATIC / "runs.html", headers={"Content-Type": "text/html; charset=utf-8"})

    async def read(self, work, *args):
        """`work(*args)` off the event loop; what it cannot read is a 404 with its sentence (the dashboard's
        checks answer it as JSON)."""
        async with self.reading:
            try:
                return await asyncio.get_running_loop().run_in_executor(None, work, *args)
            except Unreadable as exc:
                raise web.HTTPNotFound(reason=str(exc)) from None

    async def api_runs(self, request):
        answer = await self.read(self.folder.listing)
        return web.json_response({**answer, "live": self.live}, dumps=dumps)

    async def api_metrics(self, request):
        return web.json_response(await self.read(self.folder.metrics, request.match_info["name"]), dumps=dumps)


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)  # the rows hold no NaN: read as None
