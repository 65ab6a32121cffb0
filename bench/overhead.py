"""Benchmark 3: what a round costs beyond the slowest client's own work.

Real federations: `fl_server.py` and 5 `fl_client.py` processes on this machine.
From the server's metrics.csv, overhead = `seconds` (the round, from the first
byte of the broadcast to the last update) - `max_fit_seconds` (the slowest
client's training and local test, as it measured them). The median is taken over
rounds 2.., because round 1 also includes each client loading its data
(that happens once, after the handshake, before the first model is read).

    python bench/overhead.py --model logreg cnn
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Proc, Row, kill_all, median, read_metrics, say  # noqa: E402

CLIENTS = 5
# Flower, the reference framework, measured earlier on this machine (not run by this benchmark).
FLOWER_REPORTED = {
    "logreg": ("20-30 ms/round on the 31 KB logreg model", 25.0),
    "cnn": ("0.3 s/round on the 6.6 MB cnn model", 300.0),
}


def run_federation(model: str, rounds: int, workdir: Path) -> list[dict[str, float]]:
    out = workdir / model
    procs: list[Proc] = []
    try:
        server = Proc(["fl_server.py", "--model", model, "--num-clients", str(CLIENTS), "--min-clients", str(CLIENTS),
                       "--num-rounds", str(rounds), "--time-to-wait", "60", "--server-port", "0",
                       "--output-dir", str(out), "--quiet"], f"server ({model})")
        procs.append(server)
        port = server.wait_for(r"listening on [\d.]+:(\d+)", timeout=120).group(1)
        clients = [Proc(["fl_client.py", "--client-id", str(k), "--server-port", port, "--quiet"], f"client {k}")
                   for k in range(1, CLIENTS + 1)]
        procs.extend(clients)
        limit_s = 60 + rounds * (120 if model == "cnn" else 20)
        codes = [c.finish(timeout=limit_s) for c in clients]
        if server.finish(timeout=120) != 0 or any(codes):
            raise RuntimeError(f"{model} federation failed (clients {codes}):\n{server.tail()}")
        return read_metrics(out / "metrics.csv")
    finally:
        kill_all(procs)


def rows_for(model: str, metrics: list[dict[str, float]]) -> list[Row]:
    later = metrics[1:]
    overheads_ms = [1e3 * (r["seconds"] - r["max_fit_seconds"]) for r in later]
    overhead_ms = median(overheads_ms)
    fit_ms = median([1e3 * r["max_fit_seconds"] for r in later])
    round_ms = median([1e3 * r["seconds"] for r in later])
    first = metrics[0]
    note = (f"median of rounds 2..{len(metrics)} (round 1, with data loading: "
            f"{1e3 * (first['seconds'] - first['max_fit_seconds']):.0f} ms overhead); "
            f"per round: {', '.join(f'{o:.1f}' for o in overheads_ms)} ms; median round {round_ms:.0f} ms")
    if model == "logreg":
        measured = Row("3 overhead", f"logreg, {CLIENTS} clients: round - slowest client's fit", overhead_ms, "ms",
                       fit_ms, "slowest client's fit (median)", overhead_ms / fit_ms, "<= 15 ms",
                       overhead_ms <= 15.0, note)
    else:
        share = overhead_ms / round_ms
        measured = Row("3 overhead", f"cnn, {CLIENTS} clients: round - slowest client's fit", overhead_ms, "ms",
                       fit_ms, "slowest client's fit (median)", overhead_ms / fit_ms, "<= 2% of the round",
                       share <= 0.02, note + f"; overhead = {100 * share:.2f}% of the round")
    text, value = FLOWER_REPORTED[model]
    flower = Row("3 overhead", f"{model}: Flower (reported, not run here)", value, "ms",
                 note=f"{text}, measured earlier on this machine; a constant for the README, not part of this run")
    return [measured, flower]


def run(quick: bool, models: tuple[str, ...] = ("logreg", "cnn")) -> list[Row]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedsock-overhead-") as tmp:
        for model in models:
            rounds = {"logreg": 6 if quick else 11, "cnn": 2 if quick else 3}[model]
            metrics = run_federation(model, rounds, Path(tmp))
            say(f"overhead {model}: " + ", ".join(
                f"round {int(r['round'])} {r['seconds']:.3f} s (fit {r['max_fit_seconds']:.3f} s)" for r in metrics))
            rows.extend(rows_for(model, metrics))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("logreg", "cnn"), nargs="+", default=["logreg"])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    for row in run(args.quick, tuple(args.model)):
        print(json.dumps(row.__dict__))


if __name__ == "__main__":
    main()
