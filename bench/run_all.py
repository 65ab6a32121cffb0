"""Run every fedsock benchmark, print one table, save bench/results/results.json and results.csv.

    python bench/run_all.py              # everything (about 3 minutes here, over half of it the cnn federation)
    python bench/run_all.py --quick      # a smoke version in about 2 minutes (no cnn federation)
    python bench/run_all.py --skip-cnn   # everything but the slow cnn federation of benchmark 3
    python bench/run_all.py --only 1 4   # some benchmarks only

Each figure stands beside a reference measured in the same run, with their ratio
and the target, because absolute numbers on a shared machine drift from run to run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import broadcast_once  # noqa: E402
import many_clients  # noqa: E402
import overhead  # noqa: E402
import startup  # noqa: E402
import training  # noqa: E402
import wire  # noqa: E402
from common import BENCH, ROOT, Row, say  # noqa: E402

RESULTS = BENCH / "results"
FIELDS = ("bench", "metric", "value", "unit", "reference", "reference_label", "ratio", "target", "passed", "note")


def benchmarks(args: argparse.Namespace) -> dict[str, tuple[str, callable]]:
    models = ("logreg",) if args.skip_cnn or args.quick else ("logreg", "cnn")
    return {
        "1": ("model exchange at wire speed", lambda: wire.run(args.quick)),
        "2": ("broadcast encoded once", lambda: broadcast_once.run(args.quick)),
        "3": ("overhead per round", lambda: overhead.run(args.quick, models)),
        "4": ("many clients, flat memory", lambda: many_clients.run(args.quick)),
        "5": ("client startup", lambda: startup.run(args.quick)),
        "6": ("local training against a plain loop", lambda: training.run(args.quick)),
    }


def number(value: float | None) -> str:
    if value is None:
        return ""
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def table(rows: list[Row]) -> str:
    header = ("#", "bench", "metric", "value", "reference", "ratio", "target", "result")
    lines = []
    for i, r in enumerate(rows, 1):
        reference = f"{number(r.reference)} {r.unit} ({r.reference_label})" if r.reference is not None else ""
        result = {True: "PASS", False: "FAIL", None: "info"}[r.passed]
        lines.append((i, r.bench, r.metric, f"{number(r.value)} {r.unit}", reference,
                      number(r.ratio) if r.ratio is not None else "", r.target, result))
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]
    widths[2] = min(widths[2], 70)
    widths[4] = min(widths[4], 60)

    def fmt(cells) -> str:
        return "  ".join(str(c)[:w].ljust(w) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([fmt(header), fmt("-" * w for w in widths), *map(fmt, lines)])


def machine() -> dict:
    load = os.getloadavg()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip())
    return {"python": platform.python_version(), "cpus": os.cpu_count(), "load_average": [round(x, 2) for x in load],
            "commit": commit + ("+changes" if dirty else ""), "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and rounds, no cnn federation (~2 min)")
    parser.add_argument("--skip-cnn", action="store_true", help="leave out the cnn federation of benchmark 3 (~2 min)")
    parser.add_argument("--only", nargs="+", choices=("1", "2", "3", "4", "5", "6"), help="run only these benchmarks")
    args = parser.parse_args()
    chosen = benchmarks(args)
    rows: list[Row] = []
    started, before = time.perf_counter(), machine()
    for key, (title, run) in chosen.items():
        if args.only and key not in args.only:
            continue
        say(f"benchmark {key}: {title}")
        t0 = time.perf_counter()
        try:
            rows.extend(run())
        except Exception as exc:  # one broken benchmark must not hide the others' results
            traceback.print_exc()
            rows.append(Row(f"{key} {title}", "benchmark failed to run", float("nan"), "", passed=False,
                            note=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))
        say(f"benchmark {key} took {time.perf_counter() - t0:.0f} s")
    elapsed = time.perf_counter() - started
    after = machine()
    RESULTS.mkdir(exist_ok=True)
    meta = {"quick": args.quick, "skip_cnn": args.skip_cnn or args.quick, "seconds": round(elapsed, 1),
            "before": before, "after": after}
    (RESULTS / "results.json").write_text(json.dumps({"run": meta, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    with open(RESULTS / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    print()
    print(table(rows))
    print()
    for i, r in enumerate(rows, 1):
        if r.note:
            print(f"  [{i}] {r.metric}: {r.note}")
    print()
    failed = [r for r in rows if r.passed is False]
    print(f"{len(rows)} rows, {sum(r.passed is True for r in rows)} pass, {len(failed)} fail, "
          f"{sum(r.passed is None for r in rows)} for information; {elapsed:.0f} s; load average "
          f"{before['load_average'][0]} before, {after['load_average'][0]} after ({before['cpus']} CPUs)")
    print(f"notes and raw numbers: {RESULTS / 'results.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
