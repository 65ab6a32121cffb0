"""Each strategy's maths against values computed by hand, and the Strategy's sampling and state."""

import math

import pytest
import torch

from fedsock.config import ServerConfig
from fedsock.strategies import (
    RunningMean,
    Strategy,
    coordinate_median,
    fedavgm_step,
    fedopt_step,
    krum,
    krum_scores,
    trimmed_mean,
    weighted_mean,
)


def w(*values: float) -> dict:
    return {"w": torch.tensor(values, dtype=torch.float32)}


def test_fedavg_is_the_example_weighted_mean():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
    b = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([4.0])}
    # 1 example of a, 3 of b: (1*1 + 3*3)/4 = 2.5, (1*2 + 3*6)/4 = 5, (0 + 12)/4 = 3
    result = weighted_mean([(a, 1), (b, 3)])
    assert result["w"].tolist() == [2.5, 5.0]
    assert result["b"].tolist() == [3.0]
    assert result["w"].dtype == torch.float32


def test_running_mean_matches_an_independent_computation_in_any_order():
    torch.manual_seed(1)
    updates = [({"w": torch.randn(50, 7), "v": torch.randn(3)}, n) for n in (5, 120, 33, 1, 900)]
    total = sum(n for _, n in updates)
    expected = {name: sum(u[name].double() * n for u, n in updates) / total for name in ("w", "v")}
    forward, backward = RunningMean(updates[0][0]), RunningMean(updates[0][0])
    for tensors, n in updates:
        forward.add(tensors, n)
    for tensors, n in reversed(updates):
        backward.add(tensors, n)
    for name in expected:
        assert torch.allclose(forward.result()[name].double(), expected[name], atol=1e-6)
        assert torch.equal(forward.result()[name], backward.result()[name])
    assert forward.total_examples == total and forward.count == 5


def test_integer_and_bool_tensors_keep_their_dtype():
    result = weighted_mean([({"i": torch.tensor([1, 10]), "m": torch.tensor([True, False])}, 1),
                            ({"i": torch.tensor([2, 20]), "m": torch.tensor([True, True])}, 2)])
    assert result["i"].dtype == torch.int64 and result["i"].tolist() == [2, 17]  # 5/3 -> 2, 50/3 -> 17
    assert result["m"].tolist() == [True, True]


def test_empty_round_and_bad_counts_are_refused():
    with pytest.raises(ValueError):
        weighted_mean([])
    running = RunningMean({"w": torch.zeros(2)})
    with pytest.raises(ValueError):
        running.add({"w": torch.ones(2)}, 0)
    with pytest.raises(ValueError):
        running.result()


def test_coordinate_median_odd_and_even_ignores_example_counts():
    # per coordinate: (1, 2, 9) -> 2 and (10, 0, 5) -> 5; the huge count of the outlier changes nothing
    assert coordinate_median([(w(1, 10), 1), (w(2, 0), 1), (w(9, 5), 10**6)])["w"].tolist() == [2.0, 5.0]
    # even: the mean of the two middle values, (1, 3) -> 2 and (4, 8) -> 6
    assert coordinate_median([(w(1, 4), 1), (w(3, 8), 1)])["w"].tolist() == [2.0, 6.0]


def test_trimmed_mean_cuts_both_ends_per_coordinate():
    updates = [(w(v, -v), 1) for v in (1, 2, 3, 4, 100)]
    # beta 0.2 of 5 cuts one at each end: mean(2, 3, 4) = 3, and -3 for the mirrored coordinate
    assert trimmed_mean(updates, 0.2)["w"].tolist() == [3.0, -3.0]
    assert trimmed_mean(updates, 0.0)["w"].tolist() == [22.0, -22.0]  # no cut: the plain mean
    with pytest.raises(ValueError):
        trimmed_mean(updates[:2], 0.5)  # cuts 1 of 2 at each end: nothing left


def test_krum_picks_the_update_closest_to_its_neighbours():
    updates = [(w(v), 1) for v in (0, 1, 2, 3, 100)]
    # f = 1, n = 5: each score sums the squared distances to the 5 - 1 - 2 = 2 nearest others:
    # 0 -> 1 + 4 = 5, 1 -> 1 + 1 = 2, 2 -> 1 + 1 = 2, 3 -> 1 + 4 = 5, 100 -> 97^2 + 98^2
    scores = krum_scores(torch.tensor([[0.0], [1.0], [2.0], [3.0], [100.0]], dtype=torch.float64), 1)
    assert scores.tolist() == [5.0, 2.0, 2.0, 5.0, 97.0**2 + 98.0**2]
    assert krum(updates, 1)["w"].item() in (1.0, 2.0)
    # multi-krum with m = n - f = 4: the mean of 0, 1, 2, 3
    assert krum(updates, 1, keep=4)["w"].item() == 1.5
    with pytest.raises(ValueError):
        krum_scores(torch.zeros(3, 1, dtype=torch.float64), 1)  # 3 - 1 - 2 = 0 neighbours


def test_fedavgm_accumulates_momentum_over_rounds():
    x, v = fedavgm_step(w(1.0), w(3.0), None, beta=0.9, server_lr=1.0)  # delta 2, v = 2, x = 1 + 2
    assert x["w"].item() == 3.0 and v["w"].item() == 2.0
    x, v = fedavgm_step(x, w(4.0), v, beta=0.9, server_lr=1.0)  # delta 1, v = 0.9 * 2 + 1 = 2.8, x = 3 + 2.8
    assert math.isclose(v["w"].item(), 2.8) and math.isclose(x["w"].item(), 5.8, rel_tol=1e-6)


@pytest.mark.parametrize("kind, v_after, x_after", [
    # x = 0, aggregate 1 (delta 1), beta1 0.9, beta2 0.99, tau 0.1, eta 0.5; m = 0.1 always
    ("fedadam", 0.99 * 0.01 + 0.01 * 1, 0.5 * 0.1 / (math.sqrt(0.0199) + 0.1)),
    ("fedyogi", 0.01 + 0.01 * 1, 0.5 * 0.1 / (math.sqrt(0.02) + 0.1)),  # sign(0.01 - 1) = -1
    ("fedadagrad", 0.01 + 1, 0.5 * 0.1 / (math.sqrt(1.01) + 0.1)),
])
def test_adaptive_server_steps_follow_reddi_et_al(kind, v_after, x_after):
    x, m, v = fedopt_step(kind, w(0.0), w(1.0), None, None, server_lr=0.5, beta1=0.9, beta2=0.99, tau=0.1)
    assert math.isclose(m["w"].item(), 0.1, rel_tol=1e-12)
    assert math.isclose(v["w"].item(), v_after, rel_tol=1e-12)
    assert math.isclose(x["w"].item(), x_after, rel_tol=1e-6)


def test_a_strategy_keeps_its_state_for_the_checkpoint_and_continues_exactly_from_it():
    settings = ServerConfig(strategy="fedadam", server_lr=0.1, tau=0.01)
    straight, resumed = Strategy(settings), Strategy(settings)
    x = w(0.5, -0.5)
    x1 = straight.step(x, w(1.0, -1.0))
    resumed.load_state(straight.state)  # what a checkpoint keeps
    assert sorted(straight.state) == ["m/w", "v/w"]
    a, b = straight.step(x1, w(2.0, 0.0)), resumed.step(x1, w(2.0, 0.0))
    assert torch.equal(a["w"], b["w"])


def test_sampling_is_seeded_by_round_and_attempt_and_respects_the_counts():
    strategy = Strategy(ServerConfig(clients_per_round=10, seed=3))
    ids = list(range(1, 101))
    first = strategy.sample(ids, round_number=1, attempt=0)
    assert len(first) == 10 and len(set(first)) == 10 and set(first) <= set(ids)
    assert strategy.sample(ids, 1, 0) == first  # a resumed run picks the same ones
    assert strategy.sample(ids, 2, 0) != first and strategy.sample(ids, 1, 1) != first
    assert strategy.sample(ids[:4], 5, 0) == ids[:4]  # fewer ready than K: all of them
    fraction = Strategy(ServerConfig(fraction_fit=0.1, min_clients=3))
    assert len(fraction.sample(ids, 1, 0)) == 10 and len(fraction.sample(ids[:20], 1, 0)) == 3
    assert Strategy(ServerConfig()).sample(ids, 1, 0) == ids  # no sampling: everyone


def test_only_fedprox_tells_clients_a_proximal_term():
    assert Strategy(ServerConfig(strategy="fedprox", proximal_mu=0.1)).fit_settings() == {"proximal_mu": 0.1}
    assert Strategy(ServerConfig(strategy="fedavg", proximal_mu=0.1)).fit_settings() == {"proximal_mu": 0.0}


@pytest.mark.parametrize("name, collects", [("fedavg", False), ("fedadam", False), ("median", True), ("krum", True)])
def test_mean_based_strategies_stream_and_robust_ones_collect(name, collects):
    strategy = Strategy(ServerConfig(strategy=name))
    aggregator = strategy.aggregator(w(0.0, 0.0))
    assert strategy.collects is collects and aggregator.streaming is (not collects)
    buffer = w(1.0, 2.0)
    aggregator.add(buffer, 1)
    buffer["w"].fill_(99)  # the receive buffer is reused: a collecting aggregator kept its own copy
    if collects:
        assert aggregator.results[0][0]["w"].tolist() == [1.0, 2.0]
