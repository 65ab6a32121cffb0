"""Benchmark 17: synchronous FedAvg, FedAvg with over-selection and FedBuff on heterogeneous clients.

All three (FedAvg, FedAvg over-selecting 1.3x, FedBuff with --async-buffer) run on fl_simulate.py's
virtual clock (fedsock/virtual_time.py) with the same speed profiles, seed and data: the clients
train for real, and time is each fit's virtual time (its examples at --virtual-examples-per-s,
times its slowness). For each profile and split, the figures are the virtual time to reach the
target test accuracy, over FedAvg's, and FedBuff's final accuracy less FedAvg's (>= -0.5 points):

- `slow`: 20% of the clients 10 times slower (`--slow-share 0.2 --slow-factor 10`): target ≤ 0.5;
- `equal`: every client equally fast: target ≤ 1.2 (FedBuff should not lose much when nothing is slow);

on an IID split and a Dirichlet(0.3) one. Rounds pick C clients each (--clients-per-round); FedBuff
keeps C training at once and makes a version every K updates. Each run's rows go to
bench/results/asynchrony.json, and a plot of test accuracy against virtual time to
bench/results/asynchrony.png.

    python bench/asynchrony.py                        # cnn, 50 clients, lr 0.1, target 98%: long on 2 CPU cores
    python bench/asynchrony.py --quick                # logreg, target 90%, about 2 minutes: the pipeline only

On this 2-core machine a cnn round of 10 clients takes 10-18 s of real time, so the full run (4
settings, 20 rounds and 80 versions each) takes about an hour. The mlp does not reach 98% here
(97.8% after 60 rounds of E = 2, lr 0.1, with 20% slow clients); logreg tops out near 92%.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH, Proc, Row, read_metrics, say  # noqa: E402

PROFILES = {"slow": ["--slow-share", "0.2", "--slow-factor", "10"], "equal": ["--virtual-clock"]}
TARGET_RATIO = {"slow": 0.5, "equal": 1.2}
SPLITS = {"iid": ["--partition", "iid"], "dirichlet0.3": ["--partition", "dirichlet", "--alpha", "0.3"]}


def simulate(args: list[str], out: Path, timeout_s: float) -> list[dict]:
    proc = Proc(["fl_simulate.py", "--output-dir", str(out), "--quiet", *args], "simulation")
    code = proc.finish(timeout=timeout_s)
    if code != 0:
        raise RuntimeError(f"fl_simulate.py {' '.join(args)} failed ({code}):\n{proc.tail()}")
    return read_metrics(out / "metrics.csv")


def time_to(target: float, rows: list[dict]) -> float:
    """The virtual seconds of the first round or version at `target` test accuracy; nan if none is."""
    return next((r["virtual_seconds"] for r in rows if r["test_accuracy"] >= target), math.nan)


def compare(args, workdir: Path) -> tuple[list[Row], dict]:
    common = ["--model", args.model, "--num-clients", str(args.clients), "--clients-per-round", str(args.per_round),
              "--lr", str(args.lr), "--seed", str(args.seed), "--round-timeout", "1000000", "--workers", "2"]
    rows, curves = [], {}
    for profile in args.profiles:
        for split in args.splits:
            flags = [*common, *PROFILES[profile], *SPLITS[split]]
            name = f"{profile}-{split}"
            say(f"asynchrony {name}: FedAvg, {args.rounds} rounds")
            sync = simulate([*flags, "--num-rounds", str(args.rounds)], workdir / f"{name}-sync", args.timeout)
            say(f"asynchrony {name}: FedAvg with over-selection {args.over_select:g}, {args.rounds} rounds")
            over = simulate([*flags, "--num-rounds", str(args.rounds), "--over-select", str(args.over_select)],
                            workdir / f"{name}-overselect", args.timeout)
            say(f"asynchrony {name}: FedBuff K={args.buffer}, {args.versions} versions")
            buffered = simulate([*flags, "--num-rounds", str(args.versions), "--async-buffer", str(args.buffer),
                                 "--max-staleness", "100"], workdir / f"{name}-fedbuff", args.timeout)
            runs = {"fedavg": sync, "fedavg+overselect": over, "fedbuff": buffered}
            curves[name] = {kind: [(r["virtual_seconds"], r["test_accuracy"], r.get("staleness")) for r in run]
                            for kind, run in runs.items()}
            times = {kind: time_to(args.target, run) for kind, run in runs.items()}
            final = {kind: 100 * run[-1]["test_accuracy"] for kind, run in runs.items()}
            note = ("virtual seconds to " + f"{100 * args.target:g}%: "
                    + ", ".join(f"{kind} {t:.0f}" for kind, t in times.items())
                    + "; final accuracy " + ", ".join(f"{kind} {a:.2f}%" for kind, a in final.items()))
            target = f"{100 * args.target:g}%"
            for kind in ("fedbuff", "fedavg+overselect"):
                ratio = times[kind] / times["fedavg"]  # nan when either never got there
                goal = TARGET_RATIO[profile] if kind == "fedbuff" else None
                passed = None if math.isnan(ratio) or goal is None else ratio <= goal
                rows.append(Row("asynchrony", f"{args.model}, {profile} clients, {split}: {kind} / fedavg virtual "
                                              f"time to {target}", ratio, "x",
                                target=f"<= {goal}" if goal else "", passed=passed, note=note))
            gap = final["fedbuff"] - final["fedavg"]
            rows.append(Row("asynchrony", f"{args.model}, {profile} clients, {split}: fedbuff - fedavg final accuracy",
                            gap, "points", target=">= -0.5", passed=gap >= -0.5, note=note))
            say(f"asynchrony {name}: {note}")
    return rows, curves


def plot(curves: dict, target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.6), squeeze=False)
    for ax, (name, runs) in zip(axes[0], curves.items()):
        for kind, points in runs.items():
            ax.plot([p[0] for p in points], [100 * p[1] for p in points], label=kind, marker=".", markersize=3)
        ax.axhline(100 * target, color="grey", linestyle=":", linewidth=1)
        ax.set(title=name, xlabel="virtual seconds", ylabel="test accuracy (%)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cnn", help="default: cnn")
    parser.add_argument("--lr", type=float, default=0.1, help="the clients' learning rate (default: 0.1)")
    parser.add_argument("--clients", type=int, default=50, help="default: 50")
    parser.add_argument("--per-round", type=int, default=10, help="C: clients a round, and FedBuff's concurrency "
                                                                  "(default: 10)")
    parser.add_argument("--buffer", type=int, default=5, help="FedBuff's K (default: 5)")
    parser.add_argument("--rounds", type=int, default=20, help="FedAvg's rounds (default: 20)")
    parser.add_argument("--over-select", type=float, default=1.3, help="the over-selecting FedAvg's F (default: 1.3)")
    parser.add_argument("--versions", type=int, default=80, help="FedBuff's versions (default: 80)")
    parser.add_argument("--target", type=float, default=0.98, help="test accuracy (default: 0.98)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profiles", nargs="+", choices=tuple(PROFILES), default=list(PROFILES))
    parser.add_argument("--splits", nargs="+", choices=tuple(SPLITS), default=list(SPLITS))
    parser.add_argument("--timeout", type=float, default=3600, help="seconds each run may take (default: 3600)")
    parser.add_argument("--quick", action="store_true", help="logreg at lr 0.05, 20 clients, 8 rounds, 32 versions, "
                                                             "target 90%%")
    args = parser.parse_args()
    if args.quick:
        args.model, args.lr, args.clients, args.rounds, args.versions, args.target = "logreg", 0.05, 20, 8, 32, 0.90
    with tempfile.TemporaryDirectory(prefix="fedsock-asynchrony-") as tmp:
        rows, curves = compare(args, Path(tmp))
    (BENCH / "results").mkdir(exist_ok=True)
    (BENCH / "results" / "asynchrony.json").write_text(json.dumps({"settings": vars(args), "curves": curves}) + "\n")
    plot(curves, args.target, BENCH / "results" / "asynchrony.png")
    for row in rows:
        verdict = "not reached" if row.passed is None else ("PASS" if row.passed else "FAIL")
        verdict = "" if not row.target else f" [{row.target} {verdict}]"
        print(f"{row.metric}: {row.value:.3g} {row.unit}{verdict}")
    for row in rows[::3]:
        print(row.note)
    return 1 if any(r.passed is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
