"""Chaos benchmark: a federation whose clients are SIGKILLed at random moments and restarted.

Two federations with the same settings and seed, on 127.0.0.1:
  chaos       while it trains, a seeded loop waits a random while, SIGKILLs a random
              client (by PID) and starts it again with the same id; the new process
              rejoins (its id is enrolled) and takes part from the next round it is ready for.
  fault-free  the same run, nobody killed.
For each: rounds completed, models sent, updates accepted (aggregated), updates lost (a
model sent to a client whose update was never aggregated: it was killed, or it was a
restarted client still loading its data when the round timed out), kills, final test
accuracy, wall time; the table goes to stdout and bench/results/chaos.json.

    python bench/chaos.py --rounds 8 --clients 4 --seed 0

Round 1 is a warm-up in both runs (clients load PyTorch and MNIST after joining, which on a
busy machine can outlast a round timeout, so it may take a few attempts); the kills start
after it and the counts cover rounds 2..N. Models sent and updates accepted come from the
server's log: `round R/N  clients K/M` (K aggregated of M sent, checked against
metrics.csv) for a completed attempt, and the clients dropped from a failed attempt.
Every process is started by this script, on 127.0.0.1, and ended by its PID.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH, Proc, kill_all, read_metrics, say  # noqa: E402

ROUND_LINE = re.compile(r"round (\d+)/(\d+)  clients (\d+)/(\d+)  test acc ([\d.]+)%")
FAILED_ROUND = re.compile(r"round (\d+): (\d+) update\(s\) arrived")
DROP_LINE = re.compile(r"WARNING: client (?:(\d+) in round (\d+) \((.*?)\); the round goes on|(\d+) sent no update within \S+ s in round (\d+))")
REFUSED = 3  # fl_client's exit status when the server refuses it (its id still looks connected)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Federated averaging while clients are killed and restarted.")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="seeds the federation and the chaos schedule")
    parser.add_argument("--model", default="logreg")
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--round-timeout", type=float, default=5.0, help="seconds a round waits for updates")
    parser.add_argument("--round-retries", type=int, default=10,
                        help="the server's --round-retries: round 1 may need several while cold clients load their data")
    parser.add_argument("--kill-every", type=float, nargs=2, default=(0.5, 2.5), metavar=("MIN_S", "MAX_S"),
                        help="a kill comes after a uniformly random wait in this range")
    parser.add_argument("--max-kills", type=int, default=None, help="at most this many kills (default: 2 per round)")
    parser.add_argument("--run-limit", type=float, default=150.0, help="seconds either federation may take at most")
    parser.add_argument("--out", default=str(BENCH / "results" / "chaos.json"))
    parser.add_argument("--keep", action="store_true", help="keep the runs' output folders")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.clients < 2:
        parser.error("need --rounds >= 1 and --clients >= 2")
    if not 0 <= args.kill_every[0] <= args.kill_every[1]:
        parser.error("--kill-every MIN_S MAX_S with 0 <= MIN_S <= MAX_S")
    if args.max_kills is None:
        args.max_kills = 2 * args.rounds
    return args


class Run:
    """One federation: a server and its clients, started, watched and ended by this script."""

    def __init__(self, args: argparse.Namespace, name: str, folder: Path):
        self.args, self.name, self.folder = args, name, folder
        self.procs: list[Proc] = []  # every process ever started, for the final cleanup
        self.clients: dict[int, Proc] = {}  # the current process of each client id
        self.kills = 0
        self.restarts = 0
        self.server: Proc | None = None

    def start_server(self) -> None:
        a = self.args
        self.server = Proc([
            "fl_server.py", "--server-port", "0", "--output-dir", str(self.folder), "--model", a.model,
            "--num-clients", str(a.clients), "--min-clients", "1", "--num-rounds", str(a.rounds),
            "--local-epochs", str(a.local_epochs), "--round-timeout", str(a.round_timeout), "--time-to-wait", "60",
            "--seed", str(a.seed), "--heartbeat-interval", "2", "--round-retries", str(a.round_retries),
        ], f"{self.name} server")
        self.procs.append(self.server)
        self.port = int(self.server.wait_for(r"listening on [\d.]+:(\d+)", timeout=120).group(1))

    def start_client(self, client_id: int) -> None:
        proc = Proc(["fl_client.py", "--client-id", str(client_id), "--server-port", str(self.port), "--quiet",
                     "--connect-timeout", "5"], f"{self.name} client {client_id}")
        self.procs.append(proc)
        self.clients[client_id] = proc

    def server_done(self, within_s: float) -> bool:
        """Wait up to within_s for the server to exit (the chaos schedule's pause)."""
        try:
            self.server.popen.wait(timeout=within_s)
            return True
        except subprocess.TimeoutExpired:
            return False

    def chaos(self, rng: random.Random, deadline: float) -> None:
        a = self.args
        while self.kills < a.max_kills and time.monotonic() < deadline:
            if self.server_done(rng.uniform(*a.kill_every)):
                return
            for client_id, proc in self.clients.items():  # a restart refused while its old connection lingered
                if proc.popen.poll() == REFUSED and self.restarts < 4 * a.max_kills:
                    self.restarts += 1
                    self.start_client(client_id)
            victim = rng.choice(sorted(self.clients))
            proc = self.clients[victim]
            if proc.popen.poll() is None:
                proc.kill()  # SIGKILL, by PID
                self.kills += 1
            self.restarts += 1
            self.start_client(victim)

    def execute(self, with_chaos: bool) -> dict:
        a = self.args
        started = time.monotonic()
        deadline = started + a.run_limit
        try:
            self.start_server()
            for client_id in range(1, a.clients + 1):
                self.start_client(client_id)
            # Round 1 is the warm-up (cold clients); the chaos starts after it.
            self.server.wait_for(r"round 1/\d+  clients", timeout=120)
            if with_chaos:
                self.chaos(random.Random(a.seed), deadline)
            code = self.server.finish(timeout=max(1.0, deadline - time.monotonic()))
            seconds = time.monotonic() - started
            for proc in self.clients.values():  # the survivors read <FINISHED> and exit
                try:
                    proc.finish(timeout=30)
                except RuntimeError:
                    proc.kill()
        finally:
            kill_all(self.procs)
            if self.server is not None and self.folder.exists():
                (self.folder / "server.log").write_text("\n".join(self.server.lines) + "\n")
        return self.summarise(code, seconds)

    def summarise(self, server_code: int, seconds: float) -> dict:
        rows = read_metrics(self.folder / "metrics.csv") if (self.folder / "metrics.csv").exists() else []
        attempts = account(self.server.lines)
        assert [a["accepted"] for a in attempts if a["completed"]] == [int(r["clients"]) for r in rows], (
            "the server's round lines and metrics.csv disagree")
        # Round 1 is the warm-up: clients load PyTorch and their data after joining, which can take
        # longer than a round timeout on a busy machine, and chaos starts after it. The counts are
        # over rounds 2..N, in both runs; every attempt of a round counts (a retried round sends
        # its model again).
        steady = [a for a in attempts if a["round"] > 1]
        reasons = {"killed": 0, "round timeout": 0, "other": 0}
        for attempt in steady:
            for reason in attempt["dropped"].values():
                reasons[reason] += 1
        return {
            "server_exit": server_code,
            "rounds_completed": len(rows),
            "rounds_planned": self.args.rounds,
            "round_1_attempts": sum(1 for a in attempts if a["round"] == 1),
            "failed_attempts_after_round_1": sum(1 for a in steady if not a["completed"]),
            "models_sent": sum(a["sent"] for a in steady),
            "updates_accepted": sum(a["accepted"] for a in steady),
            "updates_lost": sum(a["lost"] for a in steady),
            "lost_by_reason": reasons,
            "updates_accepted_beyond_models_sent": sum(a["beyond"] for a in attempts),
            "kills": self.kills,
            "client_processes_started": self.args.clients + self.restarts,
            "final_accuracy": rows[-1]["test_accuracy"] if rows else None,
            "wall_seconds": round(seconds, 1),
            "attempts": attempts,
        }


def account(lines: list[str]) -> list[dict]:
    """Every attempt at every round, from the server's log: models sent, updates accepted, and the
    clients dropped from it with why.

    A completed attempt prints `round R/N  clients K/M` (K aggregated of M sent). A failed one
    (no update: --min-clients is 1) prints `round R: 0 update(s) arrived`, and every client it
    sent a model to was dropped from it, so those drops count its models. Drops are keyed by
    client within an attempt: a client restarted and killed again in the same round is logged
    twice. A retried round also aggregates updates trained for its failed attempt (same number,
    same global model), so K may exceed M; that excess is kept apart, never as negative loss.
    """
    attempt_of: dict[int, int] = {}  # round -> index of its current attempt
    dropped: dict[tuple[int, int], dict[int, str]] = {}
    finished: list[dict] = []
    for line in lines:
        text = line.split("] ", 1)[-1]
        if text.startswith("dropped: "):
            continue  # the summary at the end repeats the live warnings
        if m := DROP_LINE.search(text):
            client, number = int(m.group(1) or m.group(4)), int(m.group(2) or m.group(5))
            why = m.group(3)
            reason = "round timeout" if why is None else "killed" if why.startswith("connection closed") else "other"
            dropped.setdefault((number, attempt_of.get(number, 0)), {}).setdefault(client, reason)
        elif m := ROUND_LINE.search(text):
            number, accepted, sent = int(m.group(1)), int(m.group(3)), int(m.group(4))
            key = (number, attempt_of.get(number, 0))
            finished.append({"round": number, "attempt": key[1] + 1, "completed": True, "sent": sent,
                             "accepted": accepted, "lost": max(0, sent - accepted), "beyond": max(0, accepted - sent),
                             "dropped": dropped.get(key, {})})
        elif m := FAILED_ROUND.search(text):
            number = int(m.group(1))
            key = (number, attempt_of.get(number, 0))
            lost = dropped.get(key, {})
            finished.append({"round": number, "attempt": key[1] + 1, "completed": False, "sent": len(lost),
                             "accepted": 0, "lost": len(lost), "beyond": 0, "dropped": lost})
            attempt_of[number] = key[1] + 1
    for attempt in finished:
        attempt["dropped"] = {str(k): v for k, v in sorted(attempt["dropped"].items())}
    return finished


def table(results: dict[str, dict]) -> str:
    names = list(results)
    def pct(x):
        return "-" if x is None else f"{100 * x:.2f}%"
    rows = [
        ("rounds completed", lambda r: f"{r['rounds_completed']}/{r['rounds_planned']}"),
        (f"models sent (rounds 2..{results[names[0]]['rounds_planned']})", lambda r: str(r["models_sent"])),
        ("updates accepted", lambda r: str(r["updates_accepted"])),
        ("updates lost", lambda r: str(r["updates_lost"])),
        ("  of which: killed", lambda r: str(r["lost_by_reason"]["killed"])),
        ("  of which: round timeout", lambda r: str(r["lost_by_reason"]["round timeout"])),
        ("failed round attempts", lambda r: str(r["failed_attempts_after_round_1"])),
        ("round 1 attempts (warm-up)", lambda r: str(r["round_1_attempts"])),
        ("kills", lambda r: str(r["kills"])),
        ("final accuracy", lambda r: pct(r["final_accuracy"])),
        ("wall time", lambda r: f"{r['wall_seconds']:.1f} s"),
    ]
    width = max(len(label) for label, _ in rows) + 2
    out = [" " * width + "".join(f"{name:>14}" for name in names)]
    for label, cell in rows:
        out.append(f"{label:<{width}}" + "".join(f"{cell(results[n]):>14}" for n in names))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="fedsock-chaos-"))
    results: dict[str, dict] = {}
    try:
        for name, with_chaos in (("chaos", True), ("fault-free", False)):
            say(f"{name}: {args.rounds} rounds of {args.model}, {args.clients} clients, seed {args.seed}")
            results[name] = Run(args, name, workdir / name).execute(with_chaos)
            say(f"{name}: done in {results[name]['wall_seconds']:.1f} s")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(table(results), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "keep")}
    out.write_text(json.dumps({"bench": "chaos", "settings": settings, **results}, indent=2) + "\n")
    say(f"results in {out}" + (f"; runs kept in {workdir}" if args.keep else ""))
    ok = all(r["server_exit"] == 0 and r["rounds_completed"] == args.rounds for r in results.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
