"""Benchmark 8: robust aggregation against poisoned updates.

10 virtual clients on MNIST (IID, the mlp, 10 rounds, all clients every round), on the
server's own round engine (fedsock.simulate, in this process). Clients 9 and 10 are
attackers, in two kinds of run: **scaled**, they train honestly and send
w_global - 10 * (w - w_global), their update reversed and ten times larger; **noise**,
they send w_global plus Gaussian noise with each tensor's own standard deviation. Each
of fedavg, median, trimmed-mean (beta 0.2) and krum (f = 2) runs with no attacker,
then with each kind; the table gives the final test accuracy of each.

    python bench/robust.py            # about 5 minutes here
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import Row, say  # noqa: E402

STRATEGIES = {"fedavg": [], "median": [], "trimmed-mean": ["--trim-fraction", "0.2"],
              "krum": ["--byzantine-clients", "2"]}
ATTACKS = ("none", "scaled", "noise")
ATTACKERS = (9, 10)


def attacked(client, attack: str, seed: int):
    """Wrap a virtual client's fit so that it sends a poisoned update instead."""
    import torch

    honest_fit = client.fit

    async def fit(ins):
        result = await honest_fit(ins)
        generator = torch.Generator().manual_seed(seed * 1000 + ins.round * 10 + client.client_id)
        poisoned = {}
        for name, start in ins.model.tensors.items():
            if attack == "scaled":
                poisoned[name] = start - 10 * (result.tensors[name] - start)
            else:
                scale = float(start.std()) if start.numel() > 1 else 1.0
                poisoned[name] = start + scale * torch.randn(start.shape, generator=generator)
        result.tensors = poisoned
        return result

    client.fit = fit
    return client


def run_one(strategy: str, attack: str, rounds: int, workdir: Path) -> float:
    import fl_simulate
    from fedsock import simulate as sim
    from fedsock.clients import ClientPool
    from fedsock.engine import RoundEngine
    from fedsock.prepare import prepare_training
    from fedsock.events import Events
    from fedsock.transport import Traffic

    config, _ = fl_simulate.parse_config(["--model", "mlp", "--num-clients", "10", "--num-rounds", str(rounds), "--seed", "0",
                                  "--strategy", strategy, *STRATEGIES[strategy], "--output-dir", str(workdir), "--quiet"])
    setup = prepare_training(config, None, keep_train=True, who="robust")
    data = sim.SharedData(setup.train, setup.info, setup.partitions, config.seed)
    backend = sim.InProcessBackend(data, config.model, config.seed, 2, sim.nnh.choose_device("cpu"))
    pool = ClientPool(config.num_clients)
    faults = sim.Faults(config.seed, 0, 0, 0)
    for client_id in range(1, 11):
        client = sim.VirtualClient(client_id, data.num_examples(client_id), backend, faults)
        if attack != "none" and client_id in ATTACKERS:
            attacked(client, attack, config.seed)
        pool.joined(client)
        pool.add(client)
    engine = RoundEngine(config, setup.strategy, pool, setup.model, setup.evaluate, Events(), Traffic())
    try:
        asyncio.run(engine.run())
    finally:
        backend.close()
    return engine.metrics[-1]["test_accuracy"]


def run(quick: bool) -> list[Row]:
    rounds = 3 if quick else 10
    results = {}
    with tempfile.TemporaryDirectory(prefix="fedsock-robust-") as tmp:
        for strategy in STRATEGIES:
            for attack in ATTACKS:
                accuracy = run_one(strategy, attack, rounds, Path(tmp) / f"{strategy}-{attack}")
                results[strategy, attack] = accuracy
                say(f"robust: {strategy:12} attack {attack:6} final test accuracy {100 * accuracy:.2f}%")
    rows = []
    for strategy in STRATEGIES:
        clean = results[strategy, "none"]
        for attack in ATTACKS[1:]:
            value = results[strategy, attack]
            rows.append(Row("8 robust", f"{strategy}, 2 of 10 attackers ({attack}): final accuracy", 100 * value, "%",
                            100 * clean, "the same strategy, no attacker", value / clean,
                            note=f"mlp, IID, {rounds} rounds"))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rows = run(args.quick)
    print()
    print(f"{'strategy':14} {'no attacker':>12} {'scaled x-10':>12} {'noise':>12}")
    for strategy in STRATEGIES:
        values = {r.metric.split("(")[1].split(")")[0]: r.value for r in rows if r.metric.startswith(strategy + ",")}
        clean = next(r.reference for r in rows if r.metric.startswith(strategy + ","))
        print(f"{strategy:14} {clean:11.2f}% {values['scaled']:11.2f}% {values['noise']:11.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
