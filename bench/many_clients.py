"""Benchmark 4: one server, 10 / 100 / 1,000 concurrent clients, flat memory.

The real server (`fl_server.py --model cnn`, 1,663,370 parameters, 6.6 MB) against
light clients (bench/light_clients.py: numpy + asyncio, no project code, no PyTorch),
a few processes holding many connections each. Reported per N: the median round
time from the server's metrics.csv and the server's peak RSS (VmHWM, polled from
/proc until it exits). Target: peak RSS at 1,000 clients <= 1.5x that at 10.

    python bench/many_clients.py --clients 10 100 1000 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Proc, Row, RssSampler, kill_all, median, read_metrics, say, status_kb  # noqa: E402

CLIENTS_PER_PROCESS = 250


def light_clients(port: int, num_clients: int) -> list[Proc]:
    """Light clients 1..num_clients against the server at `port`, CLIENTS_PER_PROCESS to a process."""
    processes = max(1, math.ceil(num_clients / CLIENTS_PER_PROCESS))
    share = math.ceil(num_clients / processes)
    return [Proc(["bench/light_clients.py", "--port", str(port), "--first-id", str(first), "--count",
                  str(min(share, num_clients - first + 1)), "--timeout", "900"], f"light clients {first}..")
            for first in range(1, num_clients + 1, share)]


def run_federation(num_clients: int, rounds: int, workdir: Path) -> dict:
    """One server and its light clients; returns round times and memory readings."""
    out = workdir / f"n{num_clients}"
    procs: list[Proc] = []
    try:
        server = Proc([
            "fl_server.py", "--model", "cnn", "--num-clients", str(num_clients), "--min-clients", str(num_clients),
            "--num-rounds", str(rounds), "--time-to-wait", "60", "--server-port", "0", "--round-timeout", "300",
            "--output-dir", str(out), "--quiet",
        ], f"server (N={num_clients})")
        procs.append(server)
        sampler = RssSampler(server.pid)
        port = int(server.wait_for(r"listening on [\d.]+:(\d+)", timeout=120).group(1))
        idle_rss_kb = status_kb(server.pid, "VmRSS")
        started = time.perf_counter()
        swarms = light_clients(port, num_clients)
        procs.extend(swarms)
        codes = [swarm.finish(timeout=900) for swarm in swarms]
        code = server.finish(timeout=120)
        wall_s = time.perf_counter() - started
        peak_kb = max(sampler.stop(), 0)
        summaries = [json.loads(s.wait_for(r"light clients: (.*)", timeout=1).group(1)) for s in swarms]
        if code != 0 or any(codes):
            raise RuntimeError(f"N={num_clients}: server exit {code}, light clients {codes}: {summaries}\n{server.tail()}")
        rows = read_metrics(out / "metrics.csv")
        return {
            "clients": num_clients,
            "round_seconds": [r["seconds"] for r in rows],
            "clients_per_round": [int(r["clients"]) for r in rows],
            "peak_rss_mb": peak_kb / 1024,
            "idle_rss_mb": (idle_rss_kb or 0) / 1024,
            "wall_s": wall_s,
            "finished": sum(s["finished"] for s in summaries),
            "processes": len(swarms),
        }
    finally:
        kill_all(procs)


def run(quick: bool, sizes: tuple[int, ...] = (10, 100, 1000)) -> list[Row]:
    rounds = 2 if quick else 3
    results = {}
    with tempfile.TemporaryDirectory(prefix="fedsock-many-") as tmp:
        for n in sizes:
            r = run_federation(n, rounds, Path(tmp))
            results[n] = r
            say(f"many clients N={n}: rounds {[f'{s:.2f}' for s in r['round_seconds']]} s, "
                f"peak RSS {r['peak_rss_mb']:.0f} MB (idle {r['idle_rss_mb']:.0f} MB), {r['finished']} finished")
    base = results[sizes[0]]
    rows = []
    for n, r in results.items():
        complete = r["finished"] == n and all(c == n for c in r["clients_per_round"])
        rows.append(Row(
            "4 many clients", f"N={n}: median round time (cnn 6.6 MB, {rounds} rounds)", median(r["round_seconds"]), "s",
            note=f"all {n} clients in every round: {'yes' if complete else 'NO'}; "
                 f"{r['processes']} light-client process(es); whole run {r['wall_s']:.0f} s",
            passed=complete,
            target="every client in every round",
        ))
        ratio = r["peak_rss_mb"] / base["peak_rss_mb"]
        rows.append(Row(
            "4 many clients", f"N={n}: server peak RSS (VmHWM)", r["peak_rss_mb"], "MB",
            base["peak_rss_mb"], f"peak RSS at N={sizes[0]}", ratio,
            "<= 1.5x N=10" if n == 1000 else "", (ratio <= 1.5) if n == 1000 else None,
            f"RSS after start-up, before any client: {r['idle_rss_mb']:.0f} MB",
        ))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    for row in run(args.quick, tuple(args.clients)):
        print(json.dumps(row.__dict__))


if __name__ == "__main__":
    main()
