"""Strategies, sampling, shards and a saved starting model, end to end. The maths of each strategy is
tested in-process (test_strategies.py, test_engine.py); here, that each one trains real clients on the
real round engine, with its files (in this process, as fl_simulate.py runs them), that the ones whose
clients or wire differ run over the wire (real server and client processes), and that results are
exactly what they should be."""

from __future__ import annotations

import asyncio
import re

import pytest
import torch

import client_helper
import neural_net_helper as nnh
from conftest import FAST, read_metrics
from fedsock.prepare import prepare_training
from fedsock.run_files import read_checkpoint
from fedsock.simulate import SharedData, SimulationConfig, make_backend, simulate
from fedsock.strategies import STRATEGIES, RunningMean

processes = pytest.mark.processes  # these start a real server and real clients


def both_finish(cluster) -> bool:
    """Start clients 1 and 2 together, and wait for both."""
    clients = [cluster.client(k) for k in (1, 2)]
    return [c.finish() for c in clients] == [0, 0]


SERVER_STATE = {"fedavgm": {"momentum"}, "fedadam": {"m", "v"}, "fedyogi": {"m", "v"}, "fedadagrad": {"m", "v"}}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_every_strategy_trains_real_clients_on_the_round_engine(tmp_path, strategy):
    config = SimulationConfig(model="logreg", num_clients=10, num_rounds=2, strategy=strategy, quiet=True,
                              output_dir=str(tmp_path))
    setup = prepare_training(config, None, keep_train=True, who="simulation")
    data = SharedData(setup.train, setup.info, setup.partitions, config.seed)
    backend = make_backend(config, data)
    try:
        assert asyncio.run(simulate(config, setup, data, backend, tmp_path)) == 0
    finally:
        backend.close()
    rows = read_metrics(tmp_path / "metrics.csv")
    assert [r["clients"] for r in rows] == [10, 10]
    # It learns (how well each strategy does is bench/strategies.py's question, not this test's).
    assert rows[-1]["test_accuracy"] > 0.3, rows  # chance is 0.1
    state = read_checkpoint(tmp_path / "checkpoint.fsck").strategy_state
    assert {name.split("/")[0] for name in state} == SERVER_STATE.get(strategy, set())


# Over the wire, the strategies whose clients or rounds differ: fedprox's clients add the proximal
# term (sent in every <MODEL>), and multi-krum holds every update of a round (f = 1 of 5).
@processes
@pytest.mark.parametrize("strategy", ["fedprox", "multi-krum"])
def test_strategies_whose_clients_or_rounds_differ_train_over_the_wire(cluster, tmp_path, strategy):
    server = cluster.server(*FAST, "--num-clients", "5", "--num-rounds", "2", "--strategy", strategy)
    clients = [cluster.client(k) for k in range(1, 6)]
    assert [c.finish() for c in clients] == [0] * 5
    assert server.finish() == 0, server.output
    server.wait_for(rf"training starts with 5 client\(s\) \[1-5\]: .* strategy {strategy}$")
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert [r["clients"] for r in rows] == [5, 5]
    assert rows[-1]["test_accuracy"] > 0.3, rows


@processes
def test_sampling_sends_each_round_to_the_picked_clients_only(cluster, tmp_path):
    server = cluster.server(*FAST, "--num-clients", "6", "--num-rounds", "3", "--clients-per-round", "2",
                            "--partition", "shards")
    clients = [cluster.client(k) for k in range(1, 7)]
    assert [c.finish() for c in clients] == [0] * 6 and server.finish() == 0
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert [(r["clients"], r["round"]) for r in rows] == [(2, 1), (2, 2), (2, 3)]
    picked = {int(m.group(1)): {int(i) for i in m.group(2).replace("-", ", ").split(", ")}
              for m in re.finditer(r"round (\d+): picked 2 of 6 ready clients \[([\d, -]+)\]", server.output)}
    assert sorted(picked) == [1, 2, 3] and all(len(ids) == 2 for ids in picked.values())
    for client in clients:  # each trained exactly the rounds it was picked for
        trained = {int(n) for n in re.findall(r"round (\d+): trained on", client.output)}
        assert trained == {r for r, ids in picked.items() if int(client.name.split()[-1]) in ids}
    server.wait_for(r"mnist: 60000 training examples in 6 shards partitions of 10000\.\.10000 \(label skew 0\.[6-9]")


@processes
def test_fedavg_is_exactly_fedavg_computed_here(cluster, tmp_path):
    """What the server and its clients compute over the wire equals FedAvg done by hand, in this
    process, from the same partitions and seeds: the same final weights, bit for bit."""
    server = cluster.server(*FAST, "--num-clients", "2", "--num-rounds", "2", "--seed", "7", "--partition",
                            "dirichlet", "--alpha", "1", "--local-epochs", "1", "--batch-size", "64", "--lr", "0.1")
    clients = [cluster.client(k) for k in (1, 2)]
    assert [c.finish() for c in clients] == [0, 0] and server.finish() == 0
    served = torch.load(tmp_path / "run" / "model.pt")

    torch.set_num_threads(1)
    info = client_helper.DATASETS["mnist"]
    train = client_helper.load_split("mnist", "train")
    parts = client_helper.partition_indices(train.labels, 2, "dirichlet", 1.0, 7)
    data = {}
    for k in (1, 2):
        mine, test = client_helper.split_local(parts[k - 1], 7, k)
        data[k] = nnh.LocalData(*nnh.to_tensors(train.images[mine], train.labels[mine], info, torch.device("cpu")),
                                *nnh.to_tensors(train.images[test], train.labels[test], info, torch.device("cpu")))
    model = nnh.build_model("logreg", info, 7)
    weights = {name: t.clone() for name, t in nnh.get_weights(model).items()}
    for number in (1, 2):
        mean = RunningMean(weights)
        for k in (1, 2):
            nnh.local_round(model, data[k], weights, epochs=1, batch_size=64, lr=0.1, seed=hash((7, k, number)) & 0x7FFFFFFF)
            mean.add(nnh.get_weights(model), len(data[k].x))
        weights = mean.result()
    assert all(torch.equal(served[name], weights[name]) for name in weights)


@processes
def test_a_resumed_server_optimiser_continues_exactly(cluster, tmp_path):
    common = [*FAST, "--num-clients", "2", "--strategy", "fedadam", "--server-lr", "0.05", "--seed", "3"]
    straight = cluster.server(*common, "--num-rounds", "4", output_dir=tmp_path / "straight")
    assert both_finish(cluster) and straight.finish() == 0
    first = cluster.server(*common, "--num-rounds", "2", output_dir=tmp_path / "halves")
    assert both_finish(cluster) and first.finish() == 0
    second = cluster.server("--resume", str(tmp_path / "halves" / "checkpoint.fsck"), "--num-rounds", "4",
                            "--time-to-wait", "30", output_dir=tmp_path / "halves")
    assert both_finish(cluster) and second.finish() == 0
    a, b = torch.load(tmp_path / "straight" / "model.pt"), torch.load(tmp_path / "halves" / "model.pt")
    assert all(torch.equal(a[name], b[name]) for name in a), "the Adam moments did not survive the resume"
    assert read_metrics(tmp_path / "straight" / "metrics.csv") [-1]["test_accuracy"] == \
        read_metrics(tmp_path / "halves" / "metrics.csv")[-1]["test_accuracy"]


@processes
def test_an_initial_model_continues_a_finished_run(cluster, tmp_path):
    first = cluster.server(*FAST, "--num-clients", "2", "--num-rounds", "2", output_dir=tmp_path / "first")
    assert both_finish(cluster) and first.finish() == 0
    saved = tmp_path / "first" / "model.pt"
    before = read_metrics(tmp_path / "first" / "metrics.csv")[-1]["test_accuracy"]
    second = cluster.server(*FAST, "--num-clients", "2", "--num-rounds", "1", "--initial-model", str(saved),
                            output_dir=tmp_path / "second")
    assert both_finish(cluster) and second.finish() == 0
    assert read_metrics(tmp_path / "second" / "metrics.csv")[0]["test_accuracy"] >= before - 0.005
    mismatch = cluster.server("--model", "cnn", "--initial-model", str(saved), wait=False)
    assert mismatch.finish(timeout=60) == 2
    assert re.search(r"fl_server.py: error: --initial-model \S+model.pt does not fit the chosen model: weights names "
                     r"differ from the model", mismatch.output), mismatch.output
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    junk = cluster.server(*FAST, "--initial-model", str(tmp_path / "junk.pt"), wait=False)
    assert junk.finish(timeout=60) == 2 and "cannot read --initial-model" in junk.output
    assert "Traceback" not in mismatch.output + junk.output
