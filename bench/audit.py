"""Benchmark 15: an audit of the accountant's epsilon (python -m fedsock.audit).

- **Canaries** (Andrew et al., ICLR 2024): MNIST among 100 virtual clients training the mlp on the
  server's own round engine, 100 canary clients beside them (each update the global model plus S
  times its own random unit direction), 5 rounds of every client, clip S = 1, delta 1e-5 for the
  200-client pool, 2,000 held-out directions. For z = 0 (clipping only), 0.5, 1 and 2: the empirical
  epsilon (one-shot estimate from the final model) beside the accountant's for the same run; then
  the deliberately broken run (--break drop-noise, z = 1 and 2: noise accounted, none added), which
  the audit must fail.
- **Membership inference** (Yeom et al. 2018): the loss-threshold attack on the final model of a
  short federation on each own-data task (SMS spam with textcnn, chest X-rays with the mlp), without
  and with client-level DP: AUC and the TPR at 1% FPR.

Each part runs `python -m fedsock.audit` as a process (bounded), and the tables are printed and
saved to bench/results/audit.json.

    python bench/audit.py            # about 4 minutes here (3.5 measured)
    python bench/audit.py --quick    # 2 rounds, fewer clients and canaries: about 2 minutes
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH, Proc, Row, say  # noqa: E402

NOISE = "0,0.5,1,2"


def audit(args: list[str], out: Path, expect: int, timeout_s: float) -> dict:
    proc = Proc(["-m", "fedsock.audit", *args, "--json", str(out)], "audit")
    code = proc.finish(timeout=timeout_s)
    if code != expect:
        raise RuntimeError(f"fedsock.audit {' '.join(args)} exited {code}, expected {expect}:\n{proc.tail()}")
    for line in proc.lines:
        if "[audit] z =" in line or "AUDIT FAILED" in line or "[audit] spam" in line or "[audit] xray" in line:
            say(line.split("] ", 1)[-1])
    return json.loads(out.read_text())


def show(value) -> str:
    return "∞" if value is None else f"{value:.2f}"


def run(quick: bool) -> list[Row]:
    size = (["--num-clients", "20", "--canaries", "50", "--num-rounds", "2"] if quick else [])
    membership = (["--num-rounds", "2"] if quick else [])
    with tempfile.TemporaryDirectory(prefix="fedsock-audit-") as tmp:
        work = Path(tmp)
        say("audit: canaries, correct runs")
        correct = audit(["canaries", "--noise-multipliers", NOISE, *size], work / "canaries.json", 0, 1200)
        say("audit: canaries, --break drop-noise")
        broken = audit(["canaries", "--noise-multipliers", "1,2", "--break", "drop-noise", *size], work / "broken.json",
                       3, 900)
        say("audit: membership inference")
        members = audit(["membership", *membership], work / "membership.json", 0, 1200)
    results = {"canaries": correct, "broken": broken, "membership": members}
    (BENCH / "results").mkdir(exist_ok=True)
    (BENCH / "results" / "audit.json").write_text(json.dumps(results, indent=1) + "\n")
    print("\n| run | z | accountant ε | empirical ε | inserted cosines (mean ± sd) | held-out cosines | test accuracy | audit |")
    print("|---|---|---|---|---|---|---|---|")
    for r in correct["runs"] + broken["runs"]:
        name = "drop-noise (broken on purpose)" if r["broken"] != "none" else "no DP (clip only)" if not r["noise_multiplier"] else "DP-FedAvg"
        verdict = "—" if not r["noise_multiplier"] else "**FAILED**" if r["failed"] else "passed"
        print(f"| {name} | {r['noise_multiplier']:g} | {show(r['accountant_epsilon'])} | {show(r['empirical_epsilon'])} | "
              f"{r['inserted']['mean']:+.4f} ± {r['inserted']['std']:.4f} | {r['held_out']['mean']:+.4f} ± "
              f"{r['held_out']['std']:.4f} | {100 * r['test_accuracy']:.2f}% | {verdict} |")
    print("\n| task | DP | ε at δ | AUC | TPR at 1% FPR | mean loss, members / non-members | accuracy on non-members |")
    print("|---|---|---|---|---|---|---|")
    for r in members["runs"]:
        dp = "none" if r["noise_multiplier"] is None else f"z = {r['noise_multiplier']:g}"
        epsilon = "∞" if r["epsilon"] is None else f"{r['epsilon']:.1f} at {r['delta']:.0e}"
        print(f"| {r['task']} ({r['model']}) | {dp} | {epsilon} | {r['auc']:.3f} | {100 * r['tpr_at_1pct_fpr']:.2f}% | "
              f"{r['train_loss_members']:.3f} / {r['loss_non_members']:.3f} | {100 * r['accuracy_non_members']:.2f}% |")
    rows = [Row("15 audit", f"empirical epsilon, z = {r['noise_multiplier']:g}{' drop-noise' if r['broken'] != 'none' else ''}",
                r["empirical_epsilon"] or float("inf"), "", r["accountant_epsilon"], "accountant's epsilon",
                target="flagged" if r["broken"] != "none" else "<= accountant's",
                passed=(r["failed"] if r["broken"] != "none" else not r["failed"]) if r["noise_multiplier"] else None)
            for r in correct["runs"] + broken["runs"]]
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rows = run(args.quick)
    return 1 if any(r.passed is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
