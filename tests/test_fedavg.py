"""FedAvg against a weighted mean computed by hand."""

import pytest
import torch

from fedsock.fedavg import RunningAverage, fedavg


def test_fedavg_is_the_example_weighted_mean():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
    b = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([4.0])}
    # 1 example of a, 3 of b: (1*1 + 3*3)/4 = 2.5, (1*2 + 3*6)/4 = 5, (0 + 12)/4 = 3
    result = fedavg([(a, 1), (b, 3)])
    assert result["w"].tolist() == [2.5, 5.0]
    assert result["b"].tolist() == [3.0]
    assert result["w"].dtype == torch.float32


def test_running_average_matches_an_independent_computation_in_any_order():
    torch.manual_seed(1)
    updates = [({"w": torch.randn(50, 7), "v": torch.randn(3)}, n) for n in (5, 120, 33, 1, 900)]
    total = sum(n for _, n in updates)
    expected = {
        name: sum(u[name].double() * n for u, n in updates) / total for name in ("w", "v")
    }
    forward, backward = RunningAverage(updates[0][0]), RunningAverage(updates[0][0])
    for tensors, n in updates:
        forward.add(tensors, n)
    for tensors, n in reversed(updates):
        backward.add(tensors, n)
    for name in expected:
        assert torch.allclose(forward.result()[name].double(), expected[name], atol=1e-6)
        assert torch.equal(forward.result()[name], backward.result()[name])
    assert forward.total_examples == total and forward.count == 5


def test_integer_and_bool_tensors_keep_their_dtype():
    result = fedavg([({"i": torch.tensor([1, 10]), "m": torch.tensor([True, False])}, 1),
                     ({"i": torch.tensor([2, 20]), "m": torch.tensor([True, True])}, 2)])
    assert result["i"].dtype == torch.int64 and result["i"].tolist() == [2, 17]  # 5/3 -> 2, 50/3 -> 17
    assert result["m"].tolist() == [True, True]


def test_empty_round_and_bad_counts_are_refused():
    with pytest.raises(ValueError):
        fedavg([])
    running = RunningAverage({"w": torch.zeros(2)})
    with pytest.raises(ValueError):
        running.add({"w": torch.ones(2)}, 0)
    with pytest.raises(ValueError):
        running.result()
