"""Benchmark 7: the strategies side by side on non-IID MNIST, 10 clients, the same seed.

Each run is `fl_simulate.py` (the server's own round engine, virtual clients in this
machine's processes, two workers): 10 clients, all of them every round, Dirichlet
alpha 0.1 or McMahan et al.'s shards, 30 rounds, E = 1, B = 32, lr 0.05. For each
strategy it prints the test accuracy per round, the rounds to 97% and 98%, the best and
final accuracy, and the largest drop from one round to the next after round 10; the
results go to bench/results/strategies-<model>.json and the figure, every result saved so
far, to imgs/strategies.png.

    python bench/strategies.py --model mlp                          # the whole grid, about 15 minutes here
    python bench/strategies.py --model cnn --strategies fedavg fedadam   # about 15 minutes a run here
    python bench/strategies.py --model mlp --tune                   # the sweeps that chose the defaults
    python bench/strategies.py --model cnn --splits shards --strategies fedavgm --extra='--lr 0.1'
                                                                    # other client settings (saved, not drawn)
    python bench/strategies.py --plot                               # only redraw the figure
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH, ROOT, Proc, read_metrics, say  # noqa: E402

SPLITS = {"dirichlet 0.1": ["--partition", "dirichlet", "--alpha", "0.1"], "shards": ["--partition", "shards"]}
STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi")
# The setting each strategy's sweep varies (--tune), and the values tried.
SWEEPS = {
    "fedprox": ("--proximal-mu", ["0.001", "0.01", "0.1", "1"]),
    "fedavgm": ("--server-momentum", ["0.3", "0.5", "0.7", "0.9"]),
    "fedadam": ("--server-lr", ["0.001", "0.003", "0.01", "0.03", "0.1"]),
    "fedyogi": ("--server-lr", ["0.001", "0.003", "0.01", "0.03", "0.1"]),
    "fedadagrad": ("--server-lr", ["0.01", "0.03", "0.1", "0.3"]),
}
RESULTS = BENCH / "results"


def run_one(model: str, split: str, strategy: str, rounds: int, extra: list[str], workdir: Path) -> list[float]:
    out = workdir / f"{model}-{split.replace(' ', '')}-{strategy}-{'-'.join(extra).replace('--', '')}"
    proc = Proc(["fl_simulate.py", "--model", model, "--num-clients", "10", "--num-rounds", str(rounds), "--seed", "0",
                 "--strategy", strategy, "--workers", "2", "--output-dir", str(out), "--quiet", *SPLITS[split], *extra],
                f"{model} {split} {strategy}")
    code = proc.finish(timeout=rounds * 600)
    if code != 0:
        raise RuntimeError(f"{proc.name} {extra} failed ({code}):\n{proc.tail()}")
    return [row["test_accuracy"] for row in read_metrics(out / "metrics.csv")]


def summary(accuracy: list[float]) -> dict:
    def rounds_to(target: float) -> int | None:
        return next((i + 1 for i, a in enumerate(accuracy) if a >= target), None)

    drops = [100 * (accuracy[i - 1] - accuracy[i]) for i in range(10, len(accuracy))]  # round i+1 against round i
    return {"to_97": rounds_to(0.97), "to_98": rounds_to(0.98), "to_98_5": rounds_to(0.985),
            "best": max(accuracy), "final": accuracy[-1], "largest_drop_after_10": max([0.0, *drops])}


def show(model: str, split: str, strategy: str, extra: list[str], accuracy: list[float]) -> None:
    s = summary(accuracy)
    label = f"{strategy} {' '.join(extra)}".strip()
    print(f"{model:6} {split:14} {label:30} to 97%: {s['to_97'] or '-':>3}  to 98%: {s['to_98'] or '-':>3}  "
          f"to 98.5%: {s['to_98_5'] or '-':>3}  best {100 * s['best']:.2f}%  final {100 * s['final']:.2f}%  "
          f"largest drop after round 10: {s['largest_drop_after_10']:.2f} points", flush=True)
    print("        per round: " + " ".join(f"{100 * a:.2f}" for a in accuracy), flush=True)


def plot() -> Path | None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = [entry for path in sorted(RESULTS.glob("strategies-*.json")) for entry in json.loads(path.read_text())["runs"]
            if not entry["extra"]]  # sweeps are in the JSON, not on the figure
    if not runs:
        return None  # nothing to draw: no empty figure
    figure = Figure(figsize=(12, 4.6), dpi=110)
    FigureCanvasAgg(figure)
    panels = dict(zip(SPLITS, figure.subplots(1, len(SPLITS), sharey=True)))
    styles = {"mlp": ":", "cnn": "-"}
    for entry in runs:
        axes = panels[entry["split"]]
        rounds = range(1, len(entry["accuracy"]) + 1)
        axes.plot(rounds, [100 * a for a in entry["accuracy"]], styles.get(entry["model"], "-"),
                  label=f"{entry['model']} {entry['strategy']}", marker="o", markersize=2.5)
    for split, axes in panels.items():
        axes.set(title=f"10 clients, {split}", xlabel="round", ylim=(90, 100))
        axes.axhline(98.5, color="grey", linewidth=0.8, linestyle="--")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7, ncol=2, loc="lower right")
    panels["dirichlet 0.1"].set_ylabel("test accuracy (%)")
    figure.suptitle("fedsock strategies on non-IID MNIST (bench/strategies.py; dashed: 98.5%)")
    figure.tight_layout()
    path = ROOT / "imgs" / "strategies.png"
    figure.savefig(path)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("logreg", "mlp", "cnn"), default="mlp")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--splits", nargs="+", choices=list(SPLITS), default=list(SPLITS))
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--tune", action="store_true", help="sweep each strategy's main setting instead")
    parser.add_argument("--values", nargs="+", help="with --tune: only these values of the swept setting")
    parser.add_argument("--plot", action="store_true", help="only redraw imgs/strategies.png from saved results")
    parser.add_argument("--extra", default="", metavar="FLAGS",
                        help="more fl_simulate flags for every run, e.g. --extra='--lr 0.1' (saved with the run, not drawn)")
    args = parser.parse_args()
    if args.plot:
        print(f"figure: {plot()}")
        return 0
    RESULTS.mkdir(exist_ok=True)
    saved_path = RESULTS / f"strategies-{args.model}.json"
    saved = json.loads(saved_path.read_text()) if saved_path.exists() else {"runs": []}
    with tempfile.TemporaryDirectory(prefix="fedsock-strategies-") as tmp:
        for split in args.splits:
            for strategy in args.strategies:
                variants = [[flag, v] for flag, values in [SWEEPS[strategy]] for v in (args.values or values)] \
                    if args.tune and strategy in SWEEPS else [[]]
                variants = [extra + shlex.split(args.extra) for extra in variants]
                for extra in variants:
                    say(f"{args.model} {split} {strategy} {' '.join(extra)}")
                    accuracy = run_one(args.model, split, strategy, args.rounds, extra, Path(tmp))
                    show(args.model, split, strategy, extra, accuracy)
                    saved["runs"] = [r for r in saved["runs"] if (r["model"], r["split"], r["strategy"], r["extra"])
                                     != (args.model, split, strategy, extra)]
                    saved["runs"].append({"model": args.model, "split": split, "strategy": strategy, "extra": extra,
                                          "rounds": args.rounds, "accuracy": accuracy, **summary(accuracy)})
                    saved_path.write_text(json.dumps(saved, indent=1) + "\n")
    print(f"results: {saved_path}; figure: {plot()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
