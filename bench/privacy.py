"""Benchmark 9: client-level differential privacy, epsilon against accuracy.

MNIST split IID among 1,000 virtual clients (60 examples each), each round a Poisson sample
of 5% of them (about 50), the mlp (2NN), E = 1, B = 10, lr 0.1, 100 rounds, on the server's
own round engine (fl_simulate.py). DP-FedAvg with clip S = 1 and noise multipliers z, in
central mode (the server adds the noise), and at one z in local mode (each client adds its
own), beside the non-private run of the same seed. epsilon is at delta = 1e-5, under
add-or-remove-one-client, from dp-accounting's PLD accountant (what fedsock reports), with
its RDP accountant's figure beside it for the same runs. The table and the curve
(imgs/privacy.png) are printed and saved to bench/results/privacy.json.

--accountants: what the tighter accounting buys. For each target epsilon, the noise
multiplier that RDP would plan for the 100 rounds and the one PLD plans (fedsock's
--dp-epsilon), each trained with the same seed: the accuracy gained at the same epsilon.
Saved to bench/results/accountants.json.

    python bench/privacy.py                  # about 15 minutes here
    python bench/privacy.py --accountants    # about 8 minutes
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH, ROOT, Proc, Row, read_metrics, say  # noqa: E402

COMMON = ["--model", "mlp", "--num-clients", "1000", "--fraction-fit", "0.05", "--sampling", "poisson",
          "--local-epochs", "1", "--batch-size", "10", "--lr", "0.1", "--seed", "0", "--workers", "2", "--quiet"]
NOISE = (0.5, 0.8, 1.2, 2.0)
CLIP = "1.0"


def run_one(extra: list[str], rounds: int, out: Path) -> list[dict]:
    proc = Proc(["fl_simulate.py", *COMMON, "--num-rounds", str(rounds), "--output-dir", str(out), *extra], "privacy run")
    code = proc.finish(timeout=rounds * 60 + 300)
    if code != 0:
        raise RuntimeError(f"{extra} failed ({code}):\n{proc.tail()}")
    return read_metrics(out / "metrics.csv")


def plot(results: list[dict]) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    figure = Figure(figsize=(10, 4), dpi=110)
    FigureCanvasAgg(figure)
    curve, rounds = figure.subplots(1, 2)
    central = [r for r in results if r["mode"] == "central"]
    curve.plot([r["epsilon"] for r in central], [100 * r["accuracy"] for r in central], marker="o", label="central DP")
    for r in central:
        curve.annotate(f"z={r['z']:g}", (r["epsilon"], 100 * r["accuracy"]), textcoords="offset points", xytext=(4, -10),
                       fontsize=8)
    for r in results:
        if r["mode"] == "local":
            curve.plot([r["epsilon"]], [100 * r["accuracy"]], marker="s", color="tab:red", linestyle="",
                       label=f"local DP, z={r['z']:g}")
        if r["mode"] == "none":
            curve.axhline(100 * r["accuracy"], color="grey", linestyle="--", label="no DP")
    curve.set(xlabel="epsilon at delta 1e-5 (client level)", ylabel="final test accuracy (%)", xscale="log",
              title="privacy against utility")
    curve.set_xticks([1, 2, 5, 10, 20], labels=["1", "2", "5", "10", "20"])
    curve.xaxis.set_minor_formatter(NullFormatter())
    curve.legend(fontsize=8)
    for r in results:
        label = "no DP" if r["mode"] == "none" else f"{r['mode']} z={r['z']:g}"
        rounds.plot(range(1, len(r["curve"]) + 1), [100 * a for a in r["curve"]], label=label)
    rounds.set(xlabel="round", ylabel="test accuracy (%)", title="accuracy per round", ylim=(50, 100))
    rounds.legend(fontsize=8)
    for axes in (curve, rounds):
        axes.grid(alpha=0.3)
    figure.suptitle("fedsock DP-FedAvg: 1,000 clients, 5% Poisson sampling, mlp, 100 rounds (bench/privacy.py)")
    figure.tight_layout()
    path = ROOT / "imgs" / "privacy.png"
    figure.savefig(path)
    return path


def rdp_epsilon(z: float, rounds: int, rate: float = 0.05, delta: float = 1e-5) -> float:
    """What dp-accounting's RDP accountant says of the same Poisson rounds."""
    import dp_accounting
    from dp_accounting import dp_event, rdp

    accountant = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    accountant.compose(dp_event.PoissonSampledDpEvent(rate, dp_event.GaussianDpEvent(z)), rounds)
    return float(accountant.get_epsilon(delta))


def rdp_plan(target: float, rounds: int) -> float:
    """The smallest z (to 0.1%) whose RDP epsilon meets the target: what an RDP-only accountant would plan."""
    low, high = 0.1, 20.0
    while high - low > 1e-3 * high:
        middle = (low + high) / 2
        low, high = (middle, high) if rdp_epsilon(middle, rounds) > target else (low, middle)
    return high


def compare_accountants(quick: bool) -> list[Row]:
    from fedsock.privacy import plan_noise_multiplier

    rounds = 20 if quick else 100
    results, rows = [], []
    with tempfile.TemporaryDirectory(prefix="fedsock-accountants-") as tmp:
        for target in (2.0, 6.0):
            plans = {"RDP": rdp_plan(target, rounds),
                     "PLD": plan_noise_multiplier(target, 1e-5, rounds, "poisson", 1000, 50, 0.05)}
            finals = {}
            for method, z in plans.items():
                say(f"accountants: target epsilon {target:g}, {method} plans z = {z:.4g}")
                final = run_one(["--dp-clip", CLIP, "--dp-noise-multiplier", f"{z:.6g}"], rounds,
                                Path(tmp) / f"{target:g}-{method}")[-1]
                finals[method] = final
                say(f"accountants: z = {z:.4g}: epsilon (PLD) {final['epsilon']:.3f}, RDP {rdp_epsilon(z, rounds):.3f}, "
                    f"final accuracy {100 * final['test_accuracy']:.2f}%")
            results.append({"target": target, "z": plans, "accuracy": {m: f["test_accuracy"] for m, f in finals.items()},
                            "epsilon_pld": {m: f["epsilon"] for m, f in finals.items()}})
            rows.append(Row("9 privacy", f"accuracy at target epsilon {target:g}: z planned by PLD "
                                         f"({plans['PLD']:.3f}) against RDP ({plans['RDP']:.3f})",
                            100 * finals["PLD"]["test_accuracy"], "%", 100 * finals["RDP"]["test_accuracy"],
                            "RDP-planned z, same seed", finals["PLD"]["test_accuracy"] / finals["RDP"]["test_accuracy"],
                            note=f"{rounds} rounds, q = 0.05 Poisson, delta 1e-5"))
    (BENCH / "results").mkdir(exist_ok=True)
    (BENCH / "results" / "accountants.json").write_text(json.dumps(results, indent=1) + "\n")
    return rows


def run(quick: bool) -> list[Row]:
    rounds = 20 if quick else 100
    runs = [("none", None, [])] + [("central", z, ["--dp-clip", CLIP, "--dp-noise-multiplier", str(z)]) for z in NOISE]
    runs.append(("local", 1.2, ["--dp-clip", CLIP, "--dp-noise-multiplier", "1.2", "--dp-mode", "local"]))
    results = []
    with tempfile.TemporaryDirectory(prefix="fedsock-privacy-") as tmp:
        for index, (mode, z, extra) in enumerate(runs):
            say(f"privacy: {mode} z={z}")
            metrics = run_one(extra, rounds, Path(tmp) / str(index))
            final = metrics[-1]
            results.append({"mode": mode, "z": z, "epsilon": final["epsilon"], "accuracy": final["test_accuracy"],
                            "epsilon_rdp": rdp_epsilon(z, rounds) if z else None,
                            "curve": [r["test_accuracy"] for r in metrics]})
            epsilon = f"{final['epsilon']:.2f}" if final["epsilon"] is not None else "inf"
            say(f"privacy: {mode:7} z={z}  epsilon {epsilon}  final accuracy {100 * final['test_accuracy']:.2f}%")
    (BENCH / "results").mkdir(exist_ok=True)
    (BENCH / "results" / "privacy.json").write_text(json.dumps(results, indent=1) + "\n")
    say(f"figure: {plot(results)}")
    baseline = results[0]["accuracy"]
    return [Row("9 privacy", f"DP-FedAvg {r['mode']}, z={r['z']:g}: final accuracy at epsilon {r['epsilon']:.2f}",
                100 * r["accuracy"], "%", 100 * baseline, "no DP, same seed", r["accuracy"] / baseline,
                note=f"delta 1e-5, 1000 clients, q=0.05 Poisson, {rounds} rounds") for r in results[1:]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--accountants", action="store_true", help="only the comparison of PLD and RDP planning")
    args = parser.parse_args()
    if args.accountants:
        for row in compare_accountants(args.quick):
            print(f"{row.metric}: {row.value:.2f}% against {row.reference:.2f}%")
        return 0
    for row in run(args.quick):
        print(f"{row.metric}: {row.value:.2f}% (no DP {row.reference:.2f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
