"""Strategies: how a round's updates become the next global model.

The maths is pure functions over tensors and example counts, each tested against
hand-computed values (tests/test_strategies.py), in the manner of Flower's
`strategy/aggregate.py`:

  weighted_mean      FedAvg (McMahan et al. 2017): the example-weighted mean
  coordinate_median  the median of each coordinate (Yin et al. 2018)
  trimmed_mean       each coordinate's mean after cutting the beta share at both ends (Yin et al. 2018)
  krum               the update closest to its n-f-2 nearest neighbours (Blanchard et al. 2017);
                     multi-krum averages the m best
  fedavgm_step       server momentum on the pseudo-gradient (Hsu et al. 2019)
  fedopt_step        FedAdagrad, FedAdam, FedYogi (Reddi et al. 2021, Algorithm 2)

A `Strategy` puts them together for a run: which clients train (sampling), what they
are told (the fit settings), how their updates are combined (an aggregator: streaming
for the mean-based strategies, which fold each update in as it arrives and hold one
float64 sum whatever the number of clients; collecting for the robust ones, which
must hold every update of the round) and the server's own step. The server's
optimiser state (momentum, moments) is saved in every checkpoint.
"""

from __future__ import annotations

import math

from typing import Iterable, Mapping

import numpy as np
import torch

from fedsock.config import ServerConfig

Weights = dict[str, torch.Tensor]
Result = tuple[Mapping[str, torch.Tensor], int]  # (weights, num_examples)


# --------------------------------------------------------------------------- pure maths


class RunningMean:
    """The example-weighted mean of the updates added so far, folded in one at a time.

    Sums are kept in float64: each float32 value times an integer example count is
    exact there, so the result does not depend on the order in which updates arrive
    (up to the rounding of the sums themselves, far below float32's resolution).
    """

    def __init__(self, template: Mapping[str, torch.Tensor]):
        self._dtypes = {name: t.dtype for name, t in template.items()}
        self._sums = {name: torch.zeros(t.shape, dtype=torch.float64) for name, t in template.items()}
        self.total_examples = 0
        self.count = 0

    def add(self, tensors: Mapping[str, torch.Tensor], num_examples: int) -> None:
        if num_examples <= 0:
            raise ValueError("an update must carry at least one example")
        for name, total in self._sums.items():
            total.add_(tensors[name], alpha=num_examples)  # promoted to float64 on the fly, no temporary
        self.total_examples += num_examples
        self.count += 1

    def result(self) -> Weights:
        if not self.count:
            raise ValueError("no update to average")
        return {name: _cast(total / self.total_examples, self._dtypes[name]) for name, total in self._sums.items()}


def _cast(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float64 aggregate back in its tensor's own dtype (integers rounded, booleans by majority)."""
    if dtype == torch.bool:
        return values >= 0.5
    if not dtype.is_floating_point:
        return values.round().to(dtype)
    return values.to(dtype)


def weighted_mean(results: Iterable[Result]) -> Weights:
    """FedAvg: the mean of the weights, each update weighted by its number of examples."""
    results = list(results)
    if not results:
        raise ValueError("no update to average")
    running = RunningMean(results[0][0])
    for tensors, num_examples in results:
        running.add(tensors, num_examples)
    return running.result()


def _stacked(results: list[Result], name: str) -> torch.Tensor:
    return torch.stack([tensors[name].double() for tensors, _ in results])


def coordinate_median(results: Iterable[Result]) -> Weights:
    """The median of every coordinate over the updates, unweighted (Yin et al. 2018).

    With an even count it is the mean of the two middle values, as numpy's median.
    Example counts are ignored: they are the clients' own claims, and a robust
    aggregate must not let one client weigh more by claiming more.
    """
    results = list(results)
    if not results:
        raise ValueError("no update to aggregate")
    n, out = len(results), {}
    for name, template in results[0][0].items():
        ordered = _stacked(results, name).sort(dim=0).values
        middle = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
        out[name] = _cast(middle, template.dtype)
    return out


def trimmed_mean(results: Iterable[Result], beta: float) -> Weights:
    """Per coordinate, drop the floor(beta * n) largest and smallest values, average the rest (Yin et al. 2018)."""
    results = list(results)
    cut = int(beta * len(results))
    if len(results) - 2 * cut < 1:
        raise ValueError(f"trimming {cut} of {len(results)} updates from each end leaves none")
    out = {}
    for name, template in results[0][0].items():
        ordered = _stacked(results, name).sort(dim=0).values
        out[name] = _cast(ordered[cut : len(results) - cut].mean(dim=0), template.dtype)
    return out


def krum_scores(vectors: torch.Tensor, byzantine: int) -> torch.Tensor:
    """Each row's Krum score: the sum of squared distances to its n - f - 2 nearest other rows."""
    n = len(vectors)
    neighbours = n - byzantine - 2
    if neighbours < 1:
        raise ValueError(f"krum with f={byzantine} needs at least {byzantine + 3} updates, got {n}")
    distances = torch.cdist(vectors, vectors).pow(2)
    distances.fill_diagonal_(float("inf"))
    return distances.sort(dim=1).values[:, :neighbours].sum(dim=1)


def krum(results: Iterable[Result], byzantine: int, keep: int = 1) -> Weights:
    """Krum (Blanchard et al. 2017): the update with the lowest score; with keep = m > 1, multi-krum,
    the unweighted mean of the m updates with the lowest scores."""
    results = list(results)
    names = list(results[0][0])
    vectors = torch.stack([torch.cat([tensors[n].double().reshape(-1) for n in names]) for tensors, _ in results])
    chosen = krum_scores(vectors, byzantine).argsort(stable=True)[:keep].tolist()
    return weighted_mean((results[i][0], 1) for i in chosen)


def pseudo_gradient(current: Mapping[str, torch.Tensor], aggregate: Mapping[str, torch.Tensor]) -> Weights:
    """What the clients moved the model by, on average: aggregate - current (float64)."""
    return {name: aggregate[name].double() - current[name].double() for name in current}


def fedavgm_step(current: Mapping[str, torch.Tensor], aggregate: Mapping[str, torch.Tensor],
                 momentum: Mapping[str, torch.Tensor] | None, beta: float, server_lr: float) -> tuple[Weights, Weights]:
    """FedAvgM (Hsu et al. 2019): v = beta * v + delta; x = x + eta * v. Returns (x, v)."""
    delta = pseudo_gradient(current, aggregate)
    new_momentum = {n: (beta * momentum[n] if momentum else 0) + d for n, d in delta.items()}
    return {n: _cast(current[n].double() + server_lr * v, current[n].dtype) for n, v in new_momentum.items()}, new_momentum


def fedopt_step(kind: str, current: Mapping[str, torch.Tensor], aggregate: Mapping[str, torch.Tensor],
                m: Mapping[str, torch.Tensor] | None, v: Mapping[str, torch.Tensor] | None,
                server_lr: float, beta1: float, beta2: float, tau: float) -> tuple[Weights, Weights, Weights]:
    """One step of FedAdagrad, FedAdam or FedYogi (Reddi et al. 2021, Algorithm 2). Returns (x, m, v).

        delta = aggregate - x
        m = beta1 * m + (1 - beta1) * delta
        v = v + delta^2                                        (adagrad)
        v = beta2 * v + (1 - beta2) * delta^2                  (adam)
        v = v - (1 - beta2) * delta^2 * sign(v - delta^2)      (yogi)
        x = x + eta * m / (sqrt(v) + tau)

    m starts at 0 and v at tau^2, as the paper's v_{-1} >= tau^2; there is no bias correction.
    """
    delta = pseudo_gradient(current, aggregate)
    new_x, new_m, new_v = {}, {}, {}
    for name, d in delta.items():
        m_old = m[name] if m else torch.zeros_like(d)
        v_old = v[name] if v else torch.full_like(d, tau * tau)
        new_m[name] = beta1 * m_old + (1 - beta1) * d
        square = d * d
        if kind == "fedadagrad":
            new_v[name] = v_old + square
        elif kind == "fedadam":
            new_v[name] = beta2 * v_old + (1 - beta2) * square
        elif kind == "fedyogi":
            new_v[name] = v_old - (1 - beta2) * square * torch.sign(v_old - square)
        else:
            raise ValueError(f"unknown adaptive strategy {kind!r}")
        step = server_lr * new_m[name] / (new_v[name].sqrt() + tau)
        new_x[name] = _cast(current[name].double() + step, current[name].dtype)
    return new_x, new_m, new_v


# --------------------------------------------------------------------------- aggregators


class MeanAggregator:
    """Streaming: each update is folded into a float64 sum as it arrives, then released."""

    streaming = True

    def __init__(self, template: Mapping[str, torch.Tensor]):
        self.running = RunningMean(template)

    @property
    def count(self) -> int:
        return self.running.count

    def add(self, tensors: Mapping[str, torch.Tensor], num_examples: int) -> None:
        self.running.add(tensors, num_examples)

    def result(self) -> Weights:
        return self.running.result()


class CollectingAggregator:
    """Holds a copy of every update of the round (memory: one model per update), then combines them."""

    streaming = False

    def __init__(self, combine):
        self.combine = combine
        self.results: list[Result] = []

    @property
    def count(self) -> int:
        return len(self.results)

    def add(self, tensors: Mapping[str, torch.Tensor], num_examples: int) -> None:
        self.results.append(({n: t.clone() for n, t in tensors.items()}, num_examples))

    def result(self) -> Weights:
        return self.combine(self.results)


# --------------------------------------------------------------------------- strategies


# name: (what it does, where it comes from, what it costs) -- for --help and the docs
STRATEGIES = {
    "fedavg": "example-weighted mean of the updates (McMahan et al. 2017); streams",
    "fedavgm": "fedavg plus server momentum (Hsu et al. 2019); streams, keeps one momentum model",
    "fedprox": "fedavg whose clients add (mu/2)·‖w − w_global‖² to their loss (Li et al. 2020); streams",
    "fedadam": "Adam on the server over the mean update (Reddi et al. 2021); streams, keeps two moment models",
    "fedyogi": "Yogi on the server over the mean update (Reddi et al. 2021); streams, keeps two moment models",
    "fedadagrad": "Adagrad on the server over the mean update (Reddi et al. 2021); streams, keeps two moment models",
    "median": "coordinate-wise median, unweighted (Yin et al. 2018); holds every update of the round",
    "trimmed-mean": "coordinate-wise trimmed mean, unweighted (Yin et al. 2018); holds every update of the round",
    "krum": "the one update nearest its neighbours (Blanchard et al. 2017); holds every update of the round",
    "multi-krum": "mean of the n-f updates nearest their neighbours (Blanchard et al. 2017); holds every update",
}
ADAPTIVE = ("fedadam", "fedyogi", "fedadagrad")
# The server's learning rate when --server-lr is not given (tuned on bench/strategies.py: see docs/how-to/tune-strategy.md).
DEFAULT_SERVER_LR = {"fedavgm": 1.0, "fedadam": 0.03, "fedyogi": 0.03, "fedadagrad": 0.1}
ROBUST = ("median", "trimmed-mean", "krum", "multi-krum")


class Strategy:
    """Sampling, fit settings, aggregation and the server step of one run's strategy. It reads its
    settings (fedsock.config.StrategySettings, and the federation's sampling) from the run's config."""

    def __init__(self, settings: ServerConfig, privacy=None):
        self.settings = settings
        self.name = settings.strategy
        if self.name not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.name!r}")
        # Server optimiser state, float64, keyed "m/<tensor>", "v/<tensor>" or "momentum/<tensor>".
        self.state: dict[str, torch.Tensor] = {}
        self.privacy = privacy  # fedsock.privacy.Privacy, when client-level DP is on

    @property
    def server_lr(self) -> float:
        if self.settings.server_lr is not None:
            return self.settings.server_lr
        return DEFAULT_SERVER_LR.get(self.name, 1.0)

    @property
    def collects(self) -> bool:
        return self.name in ROBUST

    def min_updates(self) -> int:
        """The fewest updates this strategy can combine."""
        if self.name in ("krum", "multi-krum"):
            return 2 * self.settings.byzantine_clients + 3  # n >= 2f + 3 (Blanchard et al. 2017)
        return 1

    # ---- who trains
    @property
    def sampled(self) -> bool:
        return self.settings.clients_per_round is not None or self.settings.fraction_fit is not None

    def sampling_rate(self, available: int) -> float:
        """Poisson sampling's probability q: C, or K/N (1 without sampling)."""
        s = self.settings
        if s.fraction_fit is not None:
            return s.fraction_fit
        if s.clients_per_round is not None:
            return min(1.0, s.clients_per_round / max(s.num_clients, 1))
        return 1.0

    def sample(self, idle: list[int], round_number: int, attempt: int) -> list[int]:
        """The ids that train this round: all idle clients, or K (or the fraction C) of them, picked
        by an RNG seeded from (seed, round, attempt), so that a resumed run picks the same ones. With
        client-level DP the seed is the run's secret one instead (see fedsock/privacy.py)."""
        seed = self.privacy.sampling_seed if self.privacy is not None else self.settings.seed
        rng = np.random.default_rng([seed, round_number, attempt])
        if self.sampled and self.settings.sampling == "poisson":
            chosen = rng.random(len(idle)) < self.sampling_rate(len(idle))
            return [i for i, take in zip(sorted(idle), chosen) if take]
        wanted = self.clients_to_sample(len(idle))
        if wanted >= len(idle):
            return sorted(idle)
        return sorted(int(i) for i in rng.choice(sorted(idle), size=wanted, replace=False))

    def planned(self, picked: int, available: int) -> float:
        """The clients a round plans for: DP's fixed denominator (the expected count for Poisson; with
        over-selection, the K that close the round, not the F·K picked: a count no one's data decides)."""
        if self.sampled and self.settings.sampling == "poisson":
            return self.sampling_rate(available) * available
        return min(picked, self.enough(available) or picked)

    def clients_to_sample(self, available: int) -> int:
        """K, or with --over-select F the F·K (rounded up) that a round picks to get K in early."""
        return min(available, math.ceil(self.settings.over_select * self.clients_to_pick(available) - 1e-9))

    def enough(self, available: int) -> int | None:
        """With --over-select, the updates that close a round (K); None: a round waits for all it picked."""
        return self.clients_to_pick(available) if self.settings.over_select > 1 and self.sampled else None

    def clients_to_pick(self, available: int) -> int:
        s = self.settings
        if s.clients_per_round is not None:
            return min(available, s.clients_per_round)
        if s.fraction_fit is not None:
            return min(available, max(s.min_clients, int(round(s.fraction_fit * available))))
        return available

    # ---- what they are told
    def fit_settings(self) -> dict[str, float]:
        settings = {"proximal_mu": self.settings.proximal_mu if self.name == "fedprox" else 0.0}
        if self.privacy is not None:
            settings.update(self.privacy.fit_settings())
        return settings

    # ---- combining
    def aggregator(self, template: Mapping[str, torch.Tensor], planned: float = 1.0):
        """How this round's updates are combined; `planned`: the clients the round planned for."""
        s = self.settings
        if self.privacy is not None:
            return self.privacy.aggregator(template, planned)
        if self.name == "median":
            return CollectingAggregator(coordinate_median)
        if self.name == "trimmed-mean":
            return CollectingAggregator(lambda results: trimmed_mean(results, s.trim_fraction))
        if self.name == "krum":
            return CollectingAggregator(lambda results: krum(results, s.byzantine_clients, 1))
        if self.name == "multi-krum":
            return CollectingAggregator(
                lambda results: krum(results, s.byzantine_clients, max(1, len(results) - s.byzantine_clients)))
        return MeanAggregator(template)

    def step(self, current: Mapping[str, torch.Tensor], aggregate: Weights) -> Weights:
        """The next global model from the current one and the round's aggregate."""
        s = self.settings
        if self.name == "fedavgm":
            new, momentum = fedavgm_step(current, aggregate, self._part("momentum"), s.server_momentum, self.server_lr)
            self.state = {f"momentum/{n}": t for n, t in momentum.items()}
            return new
        if self.name in ADAPTIVE:
            new, m, v = fedopt_step(self.name, current, aggregate, self._part("m"), self._part("v"),
                                    self.server_lr, s.beta1, s.beta2, s.tau)
            self.state = {**{f"m/{n}": t for n, t in m.items()}, **{f"v/{n}": t for n, t in v.items()}}
            return new
        return aggregate

    def _part(self, prefix: str) -> Weights | None:
        part = {k.split("/", 1)[1]: t for k, t in self.state.items() if k.startswith(prefix + "/")}
        return part or None

    def load_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.state = {k: t.double().clone() for k, t in tensors.items()}
