"""Benchmark 12: real networks and compressed updates.

Part `links` (issue 16's table): a federation across hosts (the server and 2 clients, each in a
network namespace of its own, TLS and a token; the mlp, 3 rounds) under each impairment of
bench/netlab.py's switch, beside the same federation on 127.0.0.1: round times, whether
everything finished, and what happened.

Part `compression`: the MNIST cnn, 5 clients, 5 rounds, on 127.0.0.1, once per --compression
mode: bytes per round each way and the final accuracy, beside `none` in the same run. Then the
round time over 10 Mbit/s links (2 clients, each on its own link) for none, fp16 and int8, each
with the broadcast compressed the same way, beside the bytes that crossed.

    sudo python bench/network.py                   # both parts, about 20 minutes here
    sudo python bench/network.py --part links      # about 4 minutes
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import BENCH, Proc, Row, kill_all, read_metrics, say  # noqa: E402
from netlab import NetLab, unavailable  # noqa: E402
from pki import Authority  # noqa: E402

TOKEN = "bench-network-token-0c4f"


class Deployment:
    """A CA, a server certificate for the server's namespace address and for 127.0.0.1, a token file."""

    def __init__(self, folder: Path):
        ca = Authority(folder, "ca")
        self.ca = ca.path
        self.cert, self.key = ca.issue("server", ips=["10.99.0.1", "127.0.0.1"])
        self.token = folder / "token"
        self.token.write_text(TOKEN + "\n")
        self.token.chmod(0o600)

    def server_flags(self) -> list[str]:
        return ["--tls-cert", self.cert, "--tls-key", self.key, "--auth-token-file", str(self.token)]

    def client_flags(self) -> list[str]:
        return ["--tls-ca", self.ca, "--auth-token-file", str(self.token)]


def federation(run, deploy: Deployment, server_host: str, flags: list[str], client_ids: list[int], out: Path,
               during=None, client_flags: list[str] = ()) -> dict:
    """One federation; `run(host, args, name)` starts a process (in a namespace or not); `during(server,
    clients)` acts while it runs. Returns its metrics, exit codes and logs."""
    procs = []
    try:
        server = run("server", ["fl_server.py", "--host", server_host, "--server-port", "0", "--output-dir", str(out),
                                *deploy.server_flags(), *flags], "server")
        procs.append(server)
        port = server.wait_for(r"listening on [\d.]+:(\d+)", timeout=120).group(1)
        clients = [run(f"c{k}", ["fl_client.py", "--client-id", str(k), "--server-host", server_host, "--server-port",
                                 port, *deploy.client_flags(), *client_flags], f"client {k}") for k in client_ids]
        procs.extend(clients)
        if during is not None:
            during(server, clients)
        codes = [c.finish(timeout=900) for c in clients]
        code = server.finish(timeout=120)
        rows = read_metrics(out / "metrics.csv") if (out / "metrics.csv").exists() else []
        return {"rows": rows, "server_code": code, "client_codes": codes, "server_log": server.output,
                "client_logs": [c.output for c in clients]}
    finally:
        kill_all(procs)


# --------------------------------------------------------------------------- part 1: impaired links

LINK_FED = ["--model", "mlp", "--num-clients", "2", "--num-rounds", "3", "--time-to-wait", "120", "--quiet"]


def partition(lab: NetLab, seconds: float):
    def act(server, clients):
        server.wait_for(r"round 1/\d+ ", timeout=300)  # round 2's model goes out now: hold it or its update
        lab.impair("c1", hold=True)
        time.sleep(seconds)  # the partition itself
        lab.impair("c1", hold=False)
    return act


def dead_link(lab: NetLab):
    def act(server, clients):
        clients[0].wait_for(r"round 2: trained", timeout=300)
        lab.wait_traffic("c1", frames=100)  # its upload is under way
        lab.impair("c1", hold=True)  # and the link stays dead
    return act


CONDITIONS = [
    # (name, what is done to client 1's and client 2's links, an action during the run, extra server flags)
    ("127.0.0.1 (no namespaces)", None, None, []),
    ("namespaces, clean links", {}, None, []),
    ("50 ms delay each way", {"delay_ms": 50}, None, []),
    ("2% loss each way", {"loss": 0.02}, None, []),
    ("10% loss each way", {"loss": 0.10}, None, []),
    ("10 Mbit/s links", {"rate_mbit": 10}, None, []),
    ("10 s partition of client 1 in round 2", {}, "partition", []),
    ("10 Mbit/s; client 1's link dies mid-upload (--stall-timeout 5)", {"rate_mbit": 10}, "dead",
     ["--stall-timeout", "5", "--min-clients", "1"]),
]


def what_happened(result: dict, name: str) -> str:
    log = result["server_log"]
    drops = [line.split("] ", 1)[1] for line in log.splitlines() if "WARNING: client" in line and "round" in line]
    if drops:
        return drops[0].replace("WARNING: ", "")
    if "partition" in name:
        return "nothing visible: TCP retransmitted after the partition; round 2 waited for it"
    if "loss" in name:
        return "nothing visible: TCP retransmitted the lost segments"
    return "finished normally"


def links_part(tmp: Path, deploy: Deployment) -> tuple[list[Row], list[dict]]:
    rows, table = [], []
    reference = None
    for name, impairment, action, extra in CONDITIONS:
        say(f"links: {name}")
        out = tmp / name.replace(" ", "_").replace("/", "_")
        if impairment is None:
            run = lambda host, args, label: Proc(args, label)  # noqa: E731
            result = federation(run, deploy, "127.0.0.1", [*LINK_FED, *extra], [1, 2], out, client_flags=["--quiet"])
        else:
            lab = NetLab(["server", "c1", "c2"], Proc, seed=1)
            try:
                for host in ("c1", "c2"):
                    lab.impair(host, **impairment)
                during = partition(lab, 10) if action == "partition" else dead_link(lab) if action == "dead" else None
                result = federation(lambda host, args, label: lab.run(host, args, label), deploy, lab.address("server"),
                                    [*LINK_FED, *extra], [1, 2], out, during,
                                    client_flags=[] if action else ["--quiet"])
            finally:
                lab.close()
        seconds = [r["seconds"] for r in result["rows"]]
        finished = result["server_code"] == 0 and len(seconds) == 3
        median = statistics.median(seconds) if seconds else float("nan")
        if reference is None:
            reference = median
        entry = {"condition": name, "round_seconds": [round(s, 2) for s in seconds], "median_s": round(median, 2),
                 "finished": finished, "server_code": result["server_code"], "client_codes": result["client_codes"],
                 "clients_per_round": [int(r["clients"]) for r in result["rows"]],
                 "final_accuracy": result["rows"][-1]["test_accuracy"] if result["rows"] else None,
                 "what_happened": what_happened(result, name),
                 "tracebacks": sum("Traceback" in log for log in [result["server_log"], *result["client_logs"]])}
        table.append(entry)
        say(f"  rounds {entry['round_seconds']} finished {finished} codes {result['server_code']} "
            f"{result['client_codes']}: {entry['what_happened']}")
        rows.append(Row("12 networks", f"median round, {name}", median, "s", reference, "127.0.0.1", median / reference,
                        "finishes, no traceback", finished and entry["tracebacks"] == 0,
                        note=f"rounds {entry['round_seconds']}; clients {entry['clients_per_round']}; exit codes "
                             f"{result['server_code']}/{result['client_codes']}; {entry['what_happened']}"))
    return rows, table


# --------------------------------------------------------------------------- part 2: compression

CNN_FED = ["--model", "cnn", "--num-clients", "5", "--time-to-wait", "120", "--quiet"]
MODES = {"none": [], "fp16": ["--compression", "fp16"], "int8": ["--compression", "int8"],
         "topk 1%": ["--compression", "topk", "--topk-fraction", "0.01"]}
# Over the slow links: 2 of 20 clients (2,700 examples each, so that training is short), 2 rounds.
SLOW_FED = ["--model", "cnn", "--num-clients", "20", "--min-clients", "2", "--num-rounds", "2", "--time-to-wait", "120",
            "--quiet"]
SLOW_MODES = {"none": [], "fp16": ["--compression", "fp16", "--compress-broadcast", "fp16"],
              "int8": ["--compression", "int8", "--compress-broadcast", "int8"]}


def compression_part(tmp: Path, deploy: Deployment, quick: bool) -> tuple[list[Row], dict]:
    rows, results = [], {"loopback": {}, "slow_link": {}}
    fed = [*CNN_FED, "--num-rounds", "2" if quick else "5"]
    run = lambda host, args, label: Proc(args, label)  # noqa: E731
    for mode, flags in MODES.items():
        say(f"compression on 127.0.0.1: {mode}")
        result = federation(run, deploy, "127.0.0.1", [*fed, *flags], [1, 2, 3, 4, 5], tmp / f"cnn-{mode}",
                            client_flags=["--quiet"])
        metrics = result["rows"]
        if result["server_code"] != 0:
            raise RuntimeError(f"the {mode} federation failed:\n{result['server_log'][-3000:]}")
        results["loopback"][mode] = {
            "upload_bytes_per_round": statistics.mean(r["bytes_received"] for r in metrics),
            "download_bytes_per_round": statistics.mean(r["bytes_sent"] for r in metrics),
            "accuracy_per_round": [r["test_accuracy"] for r in metrics],
            "round_seconds": [round(r["seconds"], 2) for r in metrics]}
        say(f"  {results['loopback'][mode]}")
    base = results["loopback"]["none"]
    targets = {"fp16": (1.9, None), "int8": (3.5, 0.3), "topk 1%": (20, None)}
    for mode, got in results["loopback"].items():
        if mode == "none":
            continue
        fewer = base["upload_bytes_per_round"] / got["upload_bytes_per_round"]
        drop = 100 * (base["accuracy_per_round"][-1] - got["accuracy_per_round"][-1])
        least, most_drop = targets[mode]
        rows.append(Row("12 compression", f"upload bytes per round, {mode} (cnn, 5 clients)",
                        got["upload_bytes_per_round"] / 1e6, "MB", base["upload_bytes_per_round"] / 1e6, "none", fewer,
                        f">= {least:g}x fewer", fewer >= least))
        rows.append(Row("12 compression", f"final accuracy after {len(got['accuracy_per_round'])} rounds, {mode}",
                        100 * got["accuracy_per_round"][-1], "%", 100 * base["accuracy_per_round"][-1], "none",
                        None, f"<= {most_drop:g} points below none" if most_drop is not None else "",
                        (drop <= most_drop) if most_drop is not None else None, note=f"{drop:+.2f} points below none"))
    if unavailable() is None:
        for mode, flags in SLOW_MODES.items():
            say(f"compression over 10 Mbit/s links: {mode}")
            lab = NetLab(["server", "c1", "c2"], Proc, seed=2)
            try:
                for host in ("c1", "c2"):
                    lab.impair(host, rate_mbit=10)
                result = federation(lambda host, args, label: lab.run(host, args, label), deploy, lab.address("server"),
                                    [*SLOW_FED, *flags], [1, 2], tmp / f"slow-{mode}", client_flags=["--quiet"])
            finally:
                lab.close()
            metrics = result["rows"]
            if result["server_code"] != 0:
                raise RuntimeError(f"the slow-link {mode} federation failed:\n{result['server_log'][-3000:]}")
            results["slow_link"][mode] = {
                "round_seconds": [round(r["seconds"], 2) for r in metrics],
                "fit_seconds": [round(r["max_fit_seconds"], 2) for r in metrics],
                "bytes_per_round": statistics.mean(r["bytes_received"] + r["bytes_sent"] for r in metrics)}
            say(f"  {results['slow_link'][mode]}")
        slow = results["slow_link"]
        for mode, got in slow.items():
            if mode == "none":
                continue
            time_ratio = statistics.mean(slow["none"]["round_seconds"]) / statistics.mean(got["round_seconds"])
            transfer = lambda g: statistics.mean(g["round_seconds"]) - statistics.mean(g["fit_seconds"])  # noqa: E731
            transfer_ratio = transfer(slow["none"]) / transfer(got)
            bytes_ratio = slow["none"]["bytes_per_round"] / got["bytes_per_round"]
            rows.append(Row("12 compression", f"round time over 10 Mbit/s, {mode} (model and update)",
                            statistics.mean(got["round_seconds"]), "s", statistics.mean(slow["none"]["round_seconds"]),
                            "none", time_ratio, "time outside training falls as the bytes do (within 25%)",
                            abs(transfer_ratio / bytes_ratio - 1) <= 0.25,
                            note=f"bytes {bytes_ratio:.2f}x fewer; time outside training {transfer_ratio:.2f}x less"))
    return rows, results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("links", "compression", "both"), default="both")
    parser.add_argument("--quick", action="store_true", help="2 cnn rounds instead of 5")
    args = parser.parse_args()
    reason = unavailable()
    if reason and args.part != "compression":
        print(f"network.py: the links part needs network namespaces: {reason}", file=sys.stderr)
        return 2
    rows = run(args.part, args.quick)
    for row in rows:
        print(f"{row.metric}: {row.value:.3g} {row.unit} (reference {row.reference}) ratio {row.ratio} "
              f"{'' if row.passed is None else 'PASS' if row.passed else 'FAIL'} {row.note}")
    return 0 if all(r.passed is not False for r in rows) else 1


def run(part: str = "both", quick: bool = False) -> list[Row]:
    rows, saved = [], {}
    with tempfile.TemporaryDirectory(prefix="fedsock-network-") as tmp:
        tmp = Path(tmp)
        deploy = Deployment(tmp)
        if part in ("links", "both") and unavailable() is None:
            got, saved["links"] = links_part(tmp, deploy)
            rows += got
        if part in ("compression", "both"):
            got, saved["compression"] = compression_part(tmp, deploy, quick)
            rows += got
    out = BENCH / "results" / "network.json"
    previous = json.loads(out.read_text()) if out.exists() else {}
    out.write_text(json.dumps({**previous, **saved}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    sys.exit(main())
