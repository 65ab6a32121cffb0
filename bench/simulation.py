"""Benchmark 10: fl_simulate.py, against a paper's table and for throughput and overhead.

- **McMahan et al. 2017's table**: the MNIST CNN, 100 clients, C = 0.1 (10 a round), E = 5,
  B = 10, lr 0.05 (as the paper's tuned rate for this setting ranges over 0.02-0.2), IID and
  the pathological non-IID split (`--partition shards`): rounds to 99% test accuracy, beside
  the paper's figures.
- **Throughput**: client-rounds per second and peak memory (the simulation's VmHWM) with 100
  and 1,000 virtual clients, 10 a round, logreg and cnn, for each backend (inprocess with 2
  threads, processes with 2 workers, Ray on a local cluster of this machine).
- **Overhead**: the simulation's wall time per round against the sum of the sampled clients'
  training time, measured in the same run (inprocess, one worker, the cnn): the rest is the
  engine, the sampling, the aggregation and the evaluation.

    python bench/simulation.py --only table            # the paper's table (long: about 10 s per cnn round here)
    python bench/simulation.py --only throughput overhead
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH, Proc, RssSampler, Row, median, read_metrics, say  # noqa: E402

# McMahan et al. 2017, Table 2 (rounds of FedAvg to reach 99% on the MNIST CNN, C = 0.1).
PAPER = {"iid": 20, "shards": 229}


def simulate(args: list[str], out: Path, timeout_s: float) -> tuple[Proc, list[dict], int]:
    proc = Proc(["fl_simulate.py", "--output-dir", str(out), "--quiet", *args], "simulation")
    sampler = RssSampler(proc.pid)
    code = proc.finish(timeout=timeout_s)
    peak_kb = sampler.stop()
    if code != 0:
        raise RuntimeError(f"fl_simulate.py {' '.join(args)} failed ({code}):\n{proc.tail()}")
    return proc, read_metrics(out / "metrics.csv"), peak_kb


def table(rounds: dict[str, int], workdir: Path, lr: float = 0.05, splits=("iid", "shards")) -> list[Row]:
    rows = []
    for split, partition in (("iid", ["--partition", "iid"]), ("shards", ["--partition", "shards"])):
        if split not in splits:
            continue
        say(f"simulation table: {split}, up to {rounds[split]} rounds")
        _, metrics, _ = simulate(["--model", "cnn", "--num-clients", "100", "--fraction-fit", "0.1", "--local-epochs",
                                  "5", "--batch-size", "10", "--lr", str(lr), "--num-rounds", str(rounds[split]),
                                  "--workers", "2", "--seed", "0", *partition], workdir / split, rounds[split] * 900)
        accuracy = [m["test_accuracy"] for m in metrics]
        reached = next((i + 1 for i, a in enumerate(accuracy) if a >= 0.99), None)
        (BENCH / "results").mkdir(exist_ok=True)
        (BENCH / "results" / f"mcmahan-{split}-lr{lr:g}.json").write_text(json.dumps(accuracy) + "\n")
        say(f"simulation table {split}: " + " ".join(f"{100 * a:.2f}" for a in accuracy))
        rows.append(Row("10 simulation", f"McMahan et al. 2017 cnn, 100 clients, C=0.1, E=5, B=10, lr {lr:g}, {split}: rounds to 99%",
                        reached if reached is not None else float("nan"), "rounds", PAPER[split], "the paper's Table 2",
                        reached / PAPER[split] if reached else None,
                        note=f"best {100 * max(accuracy):.2f}% in {len(accuracy)} rounds; per round: "
                             + ", ".join(f"{100 * a:.2f}" for a in accuracy)))
    return rows


BACKENDS = {"inprocess": ["--backend", "inprocess", "--workers", "2"],
            "processes": ["--backend", "processes", "--workers", "2"],
            "ray": ["--backend", "ray", "--client-cpus", "1"]}


def throughput(workdir: Path, quick: bool) -> list[Row]:
    rows = []
    for model, rounds in (("logreg", 5), ("cnn", 2 if quick else 3)):
        for clients in (100, 1000):
            for backend, flags in BACKENDS.items():
                out = workdir / f"{model}-{clients}-{backend}"
                started = time.perf_counter()
                _, metrics, peak_kb = simulate(["--model", model, "--num-clients", str(clients), "--clients-per-round",
                                                "10", "--num-rounds", str(rounds), *flags], out, 3600)
                wall = time.perf_counter() - started
                seconds = sum(m["seconds"] for m in metrics)
                rate = 10 * rounds / seconds
                say(f"throughput {model} {clients} clients {backend}: {rate:.2f} client-rounds/s (rounds "
                    f"{seconds:.1f} s of {wall:.1f} s wall), peak RSS {peak_kb / 1024:.0f} MB")
                rows.append(Row("10 simulation", f"throughput, {model}, {clients} virtual clients (10 a round), {backend}",
                                rate, "client-rounds/s", note=f"peak RSS {peak_kb / 1024:.0f} MB; rounds "
                                                              f"{', '.join('%.2f' % m['seconds'] for m in metrics)} s; "
                                                              f"whole run {wall:.0f} s with start-up"))
    return rows


def overhead(workdir: Path, quick: bool) -> list[Row]:
    """Per round: the wall time against the sum of the sampled clients' own training time (one worker,
    so the clients train one after another and the sum is what the round would take with no engine)."""
    rounds = 3 if quick else 5
    _, metrics, _ = simulate(["--model", "cnn", "--num-clients", "100", "--clients-per-round", "10", "--num-rounds",
                              str(rounds), "--workers", "1"], workdir / "overhead", 3600)
    later = metrics[1:]  # round 1 also builds each worker's model
    shares = [(m["seconds"] - m["sum_fit_seconds"]) / m["sum_fit_seconds"] for m in later]
    share = median(shares)
    return [Row("10 simulation", "overhead: round wall time beyond the sum of the sampled clients' fits (cnn, inprocess)",
                100 * share, "%", target="<= 10%", passed=share <= 0.10,
                note=f"median of rounds 2..{len(metrics)}: " + ", ".join(f"{100 * s:.1f}%" for s in shares))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=("table", "throughput", "overhead"),
                        default=["table", "throughput", "overhead"])
    parser.add_argument("--rounds-iid", type=int, default=25)
    parser.add_argument("--rounds-shards", type=int, default=40)
    parser.add_argument("--lr", type=float, default=0.05, help="the table's client learning rate")
    parser.add_argument("--splits", nargs="+", choices=("iid", "shards"), default=["iid", "shards"])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="fedsock-simulation-") as tmp:
        workdir = Path(tmp)
        if "overhead" in args.only:
            rows += overhead(workdir, args.quick)
        if "throughput" in args.only:
            rows += throughput(workdir, args.quick)
        if "table" in args.only:
            rows += table({"iid": args.rounds_iid, "shards": args.rounds_shards}, workdir, args.lr, args.splits)
    for row in rows:
        print(f"{row.metric}: {row.value:.3g} {row.unit}" + (f" (reference {row.reference})" if row.reference else "")
              + (f" [{row.target} {'PASS' if row.passed else 'FAIL'}]" if row.target else "") + f"  {row.note}")
    return 1 if any(r.passed is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
