"""Benchmark 13: secure aggregation beside plain FedAvg, in the same run.

For each row, the same federation (MNIST IID, the same seed) three times, one after the
other: plain; with --secure-aggregation (against a server that follows the protocol); and
active-secure, with identities (--federation on the server, --identity on each client:
signed keys and the consistency check, against a server that lies):

- 5 and 10 clients: the real fl_server.py and that many fl_client.py processes on 127.0.0.1,
  for logreg (3 rounds) and the cnn (3 rounds);
- 50 clients: the real fl_server.py over TCP, the 50 clients virtual ones in one process
  (fl_simulate.py --transport sockets: each speaks the protocol, secure aggregation included,
  on its own connection, and trains on its own share), for logreg (3 rounds) and the cnn (2).

From the server's metrics.csv: the median round time (a secure round's includes its key,
share and unmask stages), the bytes each way per round, and the final test accuracy.
Targets: bytes <= 1.1x plain plus the O(n) key traffic, and the cnn round at 10 clients
within 25% of plain (issue 14); the active-secure cnn round at 10 clients <= 1.3x plain
(issue 23). The table is printed and saved to bench/results/secagg.json.

    python bench/secagg.py                 # about 15 minutes here
    python bench/secagg.py --quick         # 5 clients only, 2 rounds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH, Proc, Row, kill_all, read_metrics, say  # noqa: E402

from fedsock.enrol import enrol  # noqa: E402

# per model: rounds, and what a client does each round
MODELS = {"logreg": {"rounds": 3, "flags": ["--local-epochs", "1", "--lr", "0.1"]},
          "cnn": {"rounds": 3, "flags": ["--local-epochs", "1", "--lr", "0.05"]}}


VARIANTS = ("plain", "secure", "active")


def variant_flags(variant: str, federation: Path) -> list[str]:
    """The server's (or simulation's) flags of a variant."""
    return {"plain": [], "secure": ["--secure-aggregation"],
            "active": ["--secure-aggregation", "--federation", str(federation / "federation.pub")]}[variant]


def processes(model: str, clients: int, rounds: int, variant: str, out: Path, federation: Path) -> dict:
    """A real federation: fl_server.py and `clients` fl_client.py processes."""
    flags = ["--model", model, "--num-rounds", str(rounds), "--num-clients", str(clients),
             "--min-clients", str(clients), "--time-to-wait", "600", "--seed", "1", "--quiet", *MODELS[model]["flags"],
             *variant_flags(variant, federation)]
    procs = []
    try:
        server = Proc(["fl_server.py", "--server-port", "0", "--output-dir", str(out), *flags], "server")
        procs.append(server)
        port = server.wait_for(r"listening on [\d.]+:(\d+)", timeout=120).group(1)
        identity = (lambda k: ["--identity", str(federation / f"client-{k}.identity")] if variant == "active" else [])
        procs += [Proc(["fl_client.py", "--client-id", str(k), "--server-port", port, "--quiet", *identity(k)],
                       f"client {k}") for k in range(1, clients + 1)]
        codes = [p.finish(timeout=1800) for p in procs[1:]]
        code = server.finish(timeout=120)
        if code or any(codes):
            raise RuntimeError(f"{model} with {clients} clients ({variant}) failed: server {code}, clients "
                               f"{codes}\n{server.tail(40)}")
        return summary(out)
    finally:
        kill_all(procs)


def simulated(model: str, clients: int, rounds: int, variant: str, out: Path, federation: Path) -> dict:
    """The real server over TCP, the clients virtual ones in one process (fl_simulate.py --transport sockets;
    with identities, each signs with its own, enrolled beside federation.pub)."""
    flags = ["--model", model, "--num-rounds", str(rounds), "--num-clients", str(clients),
             "--min-clients", str(clients), "--seed", "1", "--quiet", *MODELS[model]["flags"], "--transport", "sockets",
             "--output-dir", str(out), *variant_flags(variant, federation)]
    sim = Proc(["fl_simulate.py", *flags], "simulation")
    try:
        code = sim.finish(timeout=3600)
        if code:
            raise RuntimeError(f"{model} with {clients} virtual clients ({variant}) failed:\n{sim.tail(40)}")
        return summary(out)
    finally:
        kill_all([sim])


def summary(out: Path) -> dict:
    rows = read_metrics(out / "metrics.csv")
    later = rows[1:] or rows  # round 1 also holds each client's first steps
    return {"round_seconds": [round(r["seconds"], 3) for r in rows],
            "median_round_s": statistics.median(r["seconds"] for r in later),
            "upload_bytes_per_round": statistics.mean(r["bytes_received"] for r in rows),
            "download_bytes_per_round": statistics.mean(r["bytes_sent"] for r in rows),
            "final_accuracy": rows[-1]["test_accuracy"], "rounds": len(rows)}


def key_traffic(clients: int) -> float:
    """An upper bound on the O(n) bytes per client that secure aggregation adds beyond its masked update:
    two public keys and n - 1 sealed shares each way (each share message well under 1 KB as JSON)."""
    return clients * 1024 * 2


def run(quick: bool = False, only: list[int] | None = None) -> list[Row]:
    plan = [(5, "processes"), (10, "processes"), (50, "simulated")] if not quick else [(5, "processes")]
    plan = [(n, how) for n, how in plan if not only or n in only]
    out = BENCH / "results" / "secagg.json"
    kept = json.loads(out.read_text()) if only and out.exists() else []  # the other rows, from an earlier run
    results, rows = [r for r in kept if r["clients"] not in only] if only else [], []
    with tempfile.TemporaryDirectory(prefix="fedsock-secagg-") as tmp:
        federation = Path(tmp) / "federation"
        enrol(federation, list(range(1, max(n for n, _ in plan) + 1)))
        for clients, how in plan:
            for model in MODELS:
                rounds = 2 if quick or (clients == 50 and model == "cnn") else MODELS[model]["rounds"]
                runs = {}
                for variant in VARIANTS:
                    label = f"{model}, {clients} clients, {variant}"
                    say(label)
                    runner = processes if how == "processes" else simulated
                    runs[variant] = runner(model, clients, rounds, variant,
                                           Path(tmp) / label.replace(", ", "-").replace(" ", "_"), federation)
                    say(f"  {runs[variant]}")
                results.append({"model": model, "clients": clients, "how": how, **runs})
                rows += rows_for(model, clients, runs)
    (BENCH / "results").mkdir(exist_ok=True)
    results.sort(key=lambda r: (r["clients"], r["model"] != "logreg"))
    out.write_text(json.dumps(results, indent=2) + "\n")
    return rows


def rows_for(model: str, clients: int, runs: dict) -> list[Row]:
    """Each secure variant beside plain: its bytes, its round time and its accuracy."""
    plain, out = runs["plain"], []
    for variant, limit in (("secure", 1.25), ("active", 1.3)):
        run = runs[variant]
        allowed = 1.1 * plain["upload_bytes_per_round"] + key_traffic(clients) * clients
        up = run["upload_bytes_per_round"] / plain["upload_bytes_per_round"]
        time_ratio = run["median_round_s"] / plain["median_round_s"]
        target = model == "cnn" and clients == 10
        what = f"{model}, {clients} clients, {variant}"
        out += [Row("13 secagg", f"upload bytes per round, {what}", run["upload_bytes_per_round"] / 1e6, "MB",
                    plain["upload_bytes_per_round"] / 1e6, "plain", up, "<= 1.1x plain + O(n) keys",
                    run["upload_bytes_per_round"] <= allowed),
                Row("13 secagg", f"download bytes per round, {what}", run["download_bytes_per_round"] / 1e6, "MB",
                    plain["download_bytes_per_round"] / 1e6, "plain",
                    run["download_bytes_per_round"] / plain["download_bytes_per_round"]),
                Row("13 secagg", f"median round time, {what}", run["median_round_s"], "s", plain["median_round_s"],
                    "plain", time_ratio, f"<= {limit}x plain" if target else "", time_ratio <= limit if target else None),
                Row("13 secagg", f"final accuracy, {what}", 100 * run["final_accuracy"], "%",
                    100 * plain["final_accuracy"], "plain", None,
                    note=f"{100 * (run['final_accuracy'] - plain['final_accuracy']):+.2f} points")]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5 clients only, 2 rounds")
    parser.add_argument("--clients", type=int, nargs="+", choices=(5, 10, 50),
                        help="only these rows (the others stay in the results file from an earlier run)")
    args = parser.parse_args()
    rows = run(args.quick, args.clients)
    print(f"{'metric':<56} {'value':>10} {'plain':>10} {'ratio':>7}  target")
    for row in rows:
        ratio = "" if row.ratio is None else f"{row.ratio:.3f}"
        verdict = "" if row.passed is None else "PASS" if row.passed else "FAIL"
        print(f"{row.metric:<56} {row.value:>10.4g} {row.reference:>10.4g} {ratio:>7}  {row.target} {verdict} {row.note}")
    return 0 if all(r.passed is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
