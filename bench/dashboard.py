"""Benchmark 14: does the live dashboard slow the rounds? 1,000 light clients, with and without it.

The real server (`fl_server.py --model cnn`, 6.6 MB) against 1,000 light clients
(bench/light_clients.py), the same run twice in each of two modes, alternated (A B A B)
so that the machine's drift falls on both: **plain**, no dashboard; **dashboard**,
`--dashboard 127.0.0.1:0` with the page open in a headless Chromium (the system's,
driven by Playwright) for the whole run, receiving the live feed and redrawing the
1,000-row lobby table. On this 2-core machine the browser's own CPU is part of what the
server competes with, as it would be on a laptop running a demo. Reported: the median
round time of each mode (rounds 2.., from metrics.csv) and their ratio. Target: <= 1.05.

    python bench/dashboard.py                  # about 10 minutes here
    python bench/dashboard.py --clients 100 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Proc, Row, kill_all, median, read_metrics, say  # noqa: E402
from many_clients import light_clients  # noqa: E402


def run_federation(num_clients: int, rounds: int, out: Path, dashboard: bool, playwright) -> dict:
    procs: list[Proc] = []
    browser = None
    try:
        flags = ["--dashboard", "127.0.0.1:0"] if dashboard else []
        server = Proc(["fl_server.py", "--model", "cnn", "--num-clients", str(num_clients), "--min-clients",
                       str(num_clients), "--num-rounds", str(rounds), "--time-to-wait", "120", "--server-port", "0",
                       "--round-timeout", "300", "--output-dir", str(out), "--quiet", *flags],
                      f"server ({'dashboard' if dashboard else 'plain'})")
        procs.append(server)
        port = int(server.wait_for(r"listening on [\d.]+:(\d+)", timeout=120).group(1))
        page = None
        if dashboard:
            link = server.wait_for(r"dashboard: (http://\S+)", timeout=30).group(1)  # with the run's token
            chromium = shutil.which("chromium") or shutil.which("chromium-browser")
            browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(link)  # as a user opens it: the token goes into the page's cookie
            page.wait_for_selector("#feed.live", timeout=30_000)
        swarms = light_clients(port, num_clients)
        procs.extend(swarms)
        codes = [swarm.finish(timeout=900) for swarm in swarms]
        code = server.finish(timeout=120)
        if code != 0 or any(codes):
            raise RuntimeError(f"server exit {code}, light clients {codes}\n{server.tail()}")
        shown = page.evaluate("() => [state.clients.size, state.rounds.size]") if page is not None else None
        rows = read_metrics(out / "metrics.csv")
        return {"round_seconds": [r["seconds"] for r in rows], "clients": [int(r["clients"]) for r in rows],
                "page": shown}
    finally:
        if browser is not None:
            browser.close()
        kill_all(procs)


def run(num_clients: int, rounds: int, repeats: int) -> list[Row]:
    from playwright.sync_api import sync_playwright

    seconds: dict[str, list[float]] = {"plain": [], "dashboard": []}
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="fedsock-dashboard-") as tmp, sync_playwright() as playwright:
        for repeat in range(repeats):
            for mode in ("plain", "dashboard"):
                started = time.perf_counter()
                result = run_federation(num_clients, rounds, Path(tmp) / f"{mode}-{repeat}", mode == "dashboard",
                                        playwright)
                complete = all(c == num_clients for c in result["clients"])
                seconds[mode] += result["round_seconds"][1:]  # round 1 also carries the clients' start
                say(f"dashboard bench {mode} #{repeat + 1}: rounds {[round(s, 2) for s in result['round_seconds']]} s, "
                    f"every client in every round: {complete}, page showed {result['page']}, "
                    f"{time.perf_counter() - started:.0f} s")
                if not complete:
                    raise RuntimeError(f"{mode}: not every client took part: {result['clients']}")
                if mode == "dashboard":
                    notes.append(f"the page listed {result['page'][0]} clients and {result['page'][1]} rounds")
    plain, with_page = median(seconds["plain"]), median(seconds["dashboard"])
    ratio = with_page / plain
    return [Row("14 dashboard", f"{num_clients} light clients, cnn: median round with the dashboard open", with_page,
                "s", plain, "the same run without --dashboard", ratio, "<= 1.05x", ratio <= 1.05,
                f"rounds 2..{rounds} of {repeats} run(s) per mode, alternated; plain "
                f"{', '.join(f'{s:.2f}' for s in seconds['plain'])} s; dashboard "
                f"{', '.join(f'{s:.2f}' for s in seconds['dashboard'])} s; " + "; ".join(notes))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    rows = run(args.clients, args.rounds, args.repeats)
    for row in rows:
        print(json.dumps(row.__dict__))
    return 1 if any(r.passed is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
