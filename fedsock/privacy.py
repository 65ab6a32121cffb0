"""Differential privacy at the client level: DP-FedAvg (McMahan et al. 2018), honestly accounted.

The guarantee is about clients, not examples: whether one client took part, with whatever
data, changes the distribution of everything the server releases (each round's model) by
at most (epsilon, delta). It rests on three things done here:

1. **Clipping.** Each client's update is its model delta, Δ = w − w_global, scaled down to
   L2 norm at most S (`clip_delta`): one client can move the sum of deltas by at most S.
2. **Noise.** The round's sum of clipped deltas gets Gaussian noise of standard deviation
   z·S on every coordinate, and is divided by a *fixed* denominator m, the number of
   clients the round planned for (not the number that arrived), every client weighted 1:
   the released mean is (Σ clip(Δ_i) + N(0, z²S²·I)) / m. Example-weighted FedAvg is not
   used: a client's claimed example count would scale its influence past S.
   - `central`: the server clips and adds the noise (the server must be trusted with the
     clear updates).
   - `local`: every client clips and adds N(0, z²S²) to its own delta before sending; the
     server only averages. The server never sees an un-noised update, and each update is
     private on its own, but the mean carries √m times more noise than central's.
3. **Accounting**, for the sampling that is really done, round by round: exactly where a
   closed form exists, else with Google's `dp-accounting`, its PLD accountant (privacy loss
   distributions: exact up to a discretisation that only ever rounds epsilon up) where that
   analyses the sampling, else its RDP one:
   - every ready client each round (no sampling): the Gaussian mechanism composed, no
     amplification, which is one Gaussian mechanism again: its exact epsilon (Balle and Wang
     2018, "Improving the Gaussian Mechanism for Differential Privacy");
   - `--sampling fixed` (K of the n ready clients, uniformly, without replacement):
     `SampledWithoutReplacementDpEvent(n, K, ...)`, under the replace-one relation (RDP: the
     PLD accountant has no analysis of sampling without replacement);
   - `--sampling poisson` (each ready client with probability q): `PoissonSampledDpEvent`,
     under add-or-remove-one (PLD; RDP when a round's multiplier is below 0.2, where PLD's grid
     grows to gigabytes and epsilon is in the hundreds anyway).
   Under replace-one, swapping one client's data for another's can move the sum by 2S, so
   the Gaussian's noise multiplier there is z/2; under add-or-remove it is z.
   The sampling uses a secret seed drawn when the run starts (kept in the checkpoint), not
   --seed, which every client knows: amplification needs randomness the adversary cannot
   predict.
"""

from __future__ import annotations

import math
from collections import Counter
import secrets
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

NEIGHBOURS = {"none": "replace", "fixed": "replace", "poisson": "add-remove"}
# How each sampling's epsilon is computed: the closed form where there is one, dp-accounting's PLD where
# it has the analysis (much tighter than RDP: at q = 0.01, z = 1.1, 10 rounds, epsilon 0.27 against
# RDP's 0.83), RDP where it has not.
METHODS = {"none": "exact", "poisson": "PLD", "fixed": "RDP"}
# PLD's discretisation of the privacy loss. It rounds the loss up, so a coarser grid can only overstate
# epsilon: this one is within 1e-4 of dp-accounting's default (1e-4) at z 0.3..2 over 10..1,000 rounds,
# and ten times faster (about 0.07 s for 100 rounds, which the server pays every round).
PLD_INTERVAL = 1e-3
PLD_MIN_MULTIPLIER = 0.2  # below it, PLD's grid of a Poisson round grows past a gigabyte: RDP instead
ACCOUNTED = {"exact": "exact (the Gaussian mechanism's)", "PLD": "from dp-accounting's PLD accountant",
             "RDP": "from dp-accounting's RDP accountant"}
MAX_NOISE_MULTIPLIER = 1000.0


# --------------------------------------------------------------------------- the maths


def l2_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors.values()))


def clip_delta(delta: Mapping[str, torch.Tensor], bound: float) -> tuple[dict[str, torch.Tensor], float]:
    """The delta scaled to L2 norm at most `bound` (unchanged if already within it); and its norm before."""
    norm = l2_norm(delta)
    scale = min(1.0, bound / norm) if norm > 0 else 1.0
    return {name: t * scale for name, t in delta.items()}, norm


def gaussian_noise(template: Mapping[str, torch.Tensor], std: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """N(0, std²) on every coordinate, float64, one tensor per template tensor."""
    return {name: torch.normal(0.0, std, size=t.shape, generator=generator, dtype=torch.float64)
            for name, t in template.items()}


def secret_generator() -> torch.Generator:
    """A generator seeded from the operating system's randomness: noise nobody can replay."""
    return torch.Generator().manual_seed(secrets.randbits(63))


def privatize_update(start: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor], clip: float,
                     noise_std: float, generator: torch.Generator | None = None) -> tuple[dict[str, torch.Tensor], float]:
    """What a client sends in local (or distributed) mode: w_global + clip(Δ) + N(0, noise_std²). Returns the
    weights to send and the norm of Δ before clipping."""
    delta = {name: trained[name].double() - start[name].double() for name in start}
    clipped, norm = clip_delta(delta, clip)
    if noise_std > 0:
        noise = gaussian_noise(clipped, noise_std, generator or secret_generator())
        clipped = {name: t + noise[name] for name, t in clipped.items()}
    return {name: (start[name].double() + clipped[name]).to(start[name].dtype) for name in start}, norm


# --------------------------------------------------------------------------- aggregators


class DPMean:
    """The DP-FedAvg aggregate of a round, streaming: each update's delta is clipped (central mode)
    and folded into a float64 sum as it arrives; the result is the current model plus
    (sum + noise) / denominator. In local mode the clients clipped and noised already."""

    streaming = True

    def __init__(self, current: Mapping[str, torch.Tensor], clip: float, noise_std: float, denominator: float,
                 clip_here: bool, generator: torch.Generator | None = None):
        self.current = {name: t.double() for name, t in current.items()}
        self.dtypes = {name: t.dtype for name, t in current.items()}
        self.clip, self.noise_std, self.denominator, self.clip_here = clip, noise_std, denominator, clip_here
        self.generator = generator or secret_generator()
        self.sum = {name: torch.zeros_like(t) for name, t in self.current.items()}
        self.count = 0
        self.norms: list[float] = []  # each update's delta norm before clipping (for tests and reports)

    def add(self, tensors: Mapping[str, torch.Tensor], num_examples: int) -> None:
        delta = {name: tensors[name].double() - start for name, start in self.current.items()}
        if self.clip_here:
            delta, norm = clip_delta(delta, self.clip)
            self.norms.append(norm)
        for name, total in self.sum.items():
            total.add_(delta[name])
        self.count += 1

    def result(self) -> dict[str, torch.Tensor]:
        noise = gaussian_noise(self.sum, self.noise_std, self.generator) if self.noise_std > 0 else None
        out = {}
        for name, total in self.sum.items():
            noised = total + noise[name] if noise is not None else total
            out[name] = (self.current[name] + noised / self.denominator).to(self.dtypes[name])
        return out


# --------------------------------------------------------------------------- accounting


@dataclass
class PrivacySettings:
    clip: float
    noise_multiplier: float
    delta: float
    mode: str = "central"  # central | local (| distributed, with secure aggregation)
    sampling: str = "none"  # none | fixed | poisson

    @property
    def relation(self) -> str:
        return NEIGHBOURS[self.sampling]


def _dp_event(z: float, sampling: str, population: int, sampled: int, rate: float):
    from dp_accounting import dp_event

    if sampling == "poisson":
        return dp_event.PoissonSampledDpEvent(rate, dp_event.GaussianDpEvent(z))
    gaussian = dp_event.GaussianDpEvent(z / 2)  # replace-one: the sum moves by up to 2S
    if sampling == "fixed" and sampled < population:
        return dp_event.SampledWithoutReplacementDpEvent(population, sampled, gaussian)
    return gaussian


def gaussian_epsilon(sigma: float, delta: float) -> float:
    """The exact epsilon at `delta` of the Gaussian mechanism of sensitivity 1 and noise std `sigma`
    (Balle and Wang 2018, Theorem 8): the epsilon where
    Phi(1/(2 sigma) - epsilon sigma) - e^epsilon Phi(-1/(2 sigma) - epsilon sigma) = delta, by bisection
    (the left side falls with epsilon), in log space where e^epsilon would overflow."""
    from scipy.special import log_ndtr, ndtr

    def delta_at(epsilon: float) -> float:
        a, b = 1 / (2 * sigma) - epsilon * sigma, -1 / (2 * sigma) - epsilon * sigma
        return float(ndtr(a) - math.exp(min(epsilon + log_ndtr(b), 0.0)))

    low, high = 0.0, 1.0
    while delta_at(high) > delta:
        low, high = high, 2 * high
    while high - low > 1e-12 * max(high, 1.0):
        middle = (low + high) / 2
        low, high = (middle, high) if delta_at(middle) > delta else (low, middle)
    return high


def _accountant(sampling: str, method: str):
    """dp-accounting's accountant (PLD or RDP) for a run's sampling."""
    import dp_accounting
    from dp_accounting import pld, rdp

    if method == "PLD":
        return pld.PLDAccountant(neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
                                 value_discretization_interval=PLD_INTERVAL)
    neighbours = (dp_accounting.NeighboringRelation.REPLACE_ONE if NEIGHBOURS[sampling] == "replace"
                  else dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    return rdp.RdpAccountant(neighboring_relation=neighbours)


@dataclass
class Accountant:
    """The privacy spent so far: one entry per released round, (noise multiplier, ready clients,
    clients sampled, sampling rate), and epsilon at delta from dp-accounting's accountant for the
    run's sampling (METHODS). The history is what the checkpoint keeps, so a resumed run continues
    the same budget."""

    delta: float
    sampling: str
    history: list[list[float]] = field(default_factory=list)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)  # the last question and its answer

    def record(self, noise_multiplier: float, population: int, sampled: int, rate: float) -> None:
        self.history.append([noise_multiplier, population, sampled, rate])

    def epsilon(self, extra: list[list[float]] | None = None) -> float:
        events = self.history + (extra or [])
        if not events:
            return 0.0
        if any(z <= 0 for z, *_ in events):
            return math.inf
        # Privacy adds up over rounds, in any order: each distinct round is analysed once, times its count
        # (a run's rounds are mostly alike; composing them one by one costs a run quadratic time)
        rounds = tuple(sorted(Counter(map(tuple, events)).items()))
        if rounds not in self._cache:  # a round's budget check and its record ask the same question
            self._cache = {rounds: self._epsilon(rounds)}
        return self._cache[rounds]

    def _epsilon(self, rounds: tuple) -> float:
        method = self.method_for(z for (z, *_), _ in rounds)
        if method == "exact":  # Gaussians compose to one: its multiplier is 1/sqrt(sum of 1/z_i^2), each z_i/2
            return gaussian_epsilon(1 / math.sqrt(sum(count / (z / 2) ** 2 for (z, *_), count in rounds)), self.delta)
        accountant = _accountant(self.sampling, method)
        for (z, population, sampled, rate), count in rounds:
            accountant.compose(_dp_event(z, self.sampling, int(population), int(sampled), rate), count)
        return float(accountant.get_epsilon(self.delta))

    def method_for(self, multipliers) -> str:
        """exact, PLD or RDP: how this run's epsilon is computed, for rounds of these noise multipliers."""
        if METHODS[self.sampling] == "PLD" and min(multipliers, default=1.0) < PLD_MIN_MULTIPLIER:
            return "RDP"
        return METHODS[self.sampling]

    def to_json(self) -> dict[str, Any]:
        return {"delta": self.delta, "sampling": self.sampling, "history": self.history}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Accountant":
        return cls(float(data["delta"]), str(data["sampling"]), [list(map(float, e)) for e in data["history"]])


def plan_noise_multiplier(target_epsilon: float, delta: float, rounds: int, sampling: str, population: int,
                          sampled: int, rate: float, spent: Accountant | None = None) -> float:
    """The smallest noise multiplier (to 0.1%) for which `rounds` more rounds keep epsilon at delta within
    the target; raises ValueError when even MAX_NOISE_MULTIPLIER cannot."""
    accountant = spent or Accountant(delta, sampling)

    def eps(z: float) -> float:
        return accountant.epsilon([[z, population, sampled, rate]] * rounds)

    if eps(MAX_NOISE_MULTIPLIER) > target_epsilon:
        raise ValueError(f"even a noise multiplier of {MAX_NOISE_MULTIPLIER:g} spends more than epsilon "
                         f"{target_epsilon:g} in {rounds} rounds")
    low, high = 0.0, 1.0
    while eps(high) > target_epsilon:
        low, high = high, high * 2
    while high - low > 1e-3 * high:
        middle = (low + high) / 2
        if eps(middle) > target_epsilon:
            low = middle
        else:
            high = middle
    return high


def default_delta(num_clients: int) -> float:
    """Below 1/N, so that "leak everything about one client with probability delta" cannot cover a
    whole client on average: 1e-5, or 1/(10 N) when there are more than 10,000 clients."""
    return min(1e-5, 1 / (10 * num_clients))


class Privacy:
    """A run's client-level DP: its settings, the accountant, and the secret that seeds its sampling."""

    def __init__(self, settings: PrivacySettings, accountant: Accountant | None = None,
                 sampling_seed: int | None = None, budget: float | None = None):
        self.settings = settings
        self.accountant = accountant or Accountant(settings.delta, settings.sampling)
        self.sampling_seed = sampling_seed if sampling_seed is not None else secrets.randbits(63)
        self.budget = budget  # --dp-epsilon, if given

    @property
    def noise_std(self) -> float:
        return self.settings.noise_multiplier * self.settings.clip

    def aggregator(self, current: Mapping[str, torch.Tensor], denominator: float) -> DPMean:
        central = self.settings.mode == "central"
        return DPMean(current, self.settings.clip, self.noise_std if central else 0.0, max(denominator, 1e-12),
                      clip_here=central)

    def fit_settings(self) -> dict[str, float]:
        """What each client is told (local mode: clip and noise its own update)."""
        if self.settings.mode == "local":
            return {"dp_clip": self.settings.clip, "dp_noise_std": self.noise_std}
        return {}

    def secure_fit_settings(self, threshold: int) -> dict[str, float]:
        """With secure aggregation the clients clip (the server sees no update to clip), and add noise:
        none in central mode (the server adds it to the unmasked sum), their share of it in distributed
        mode (std z·S/√t each: any t survivors' noise adds up to z·S), all of it in local mode."""
        share = {"central": 0.0, "distributed": self.noise_std / math.sqrt(threshold), "local": self.noise_std}
        return {"dp_clip": self.settings.clip, "dp_noise_std": share[self.settings.mode]}

    def record(self, population: int, sampled: int, rate: float) -> float:
        """A round was released: account for it; epsilon so far."""
        self.accountant.record(self.settings.noise_multiplier, population, sampled, rate)
        return self.accountant.epsilon()

    def would_exceed_budget(self, population: int, sampled: int, rate: float) -> bool:
        if self.budget is None:
            return False
        extra = [[self.settings.noise_multiplier, population, sampled, rate]]
        return self.accountant.epsilon(extra) > self.budget * (1 + 1e-9)

    def to_json(self) -> dict[str, Any]:
        return {"accountant": self.accountant.to_json(), "sampling_seed": self.sampling_seed,
                "noise_multiplier": self.settings.noise_multiplier}

    def describe(self) -> str:
        method = self.accountant.method_for([self.settings.noise_multiplier])
        where = {"central": "the server clips and adds it", "local": "each client noises its own",
                 "distributed": "each client adds its share; the server sees only the noised sum"}[self.settings.mode]
        return (f"client-level DP ({self.settings.mode}: {where}): clip S = {self.settings.clip:g}, noise multiplier "
                f"z = {self.settings.noise_multiplier:.4g}, delta = {self.settings.delta:.3g}, sampling "
                f"{self.settings.sampling} ({self.settings.relation} neighbours), epsilon {ACCOUNTED[method]}")


class ExampleLevelDP:
    """`fl_client.py --dp-sgd`: DP-SGD on one client's own examples (Abadi et al. 2016), with Opacus.

    Every example's gradient is clipped to L2 norm `max_grad_norm`, each batch's sum gets Gaussian
    noise of std z * max_grad_norm, and batches are Poisson samples of the client's examples (each
    example with probability B/n), which is what Opacus's RDP accountant analyses. The guarantee is
    about one example of this client's data (add or remove one), over every round it trains; it is
    this client's own, independent of the server's client-level DP."""

    def __init__(self, model: torch.nn.Module, noise_multiplier: float, max_grad_norm: float, delta: float):
        from opacus import GradSampleModule
        from opacus.accountants import RDPAccountant

        self.module = GradSampleModule(model)  # the same parameters, with per-example gradient hooks
        self.noise_multiplier, self.max_grad_norm, self.delta = noise_multiplier, max_grad_norm, delta
        self.accountant = RDPAccountant()

    def train(self, x: torch.Tensor, y: torch.Tensor, *, epochs: int, batch_size: int, lr: float, seed: int,
              progress=None) -> float:
        from opacus.data_loader import DPDataLoader
        from opacus.optimizers import DPOptimizer
        from torch.nn import functional as F
        from torch.utils.data import DataLoader, TensorDataset

        generator = torch.Generator().manual_seed(seed)
        loader = DPDataLoader.from_data_loader(DataLoader(TensorDataset(x, y), batch_size=batch_size),
                                               generator=generator)
        optimizer = DPOptimizer(torch.optim.SGD(self.module.parameters(), lr=lr), noise_multiplier=self.noise_multiplier,
                                max_grad_norm=self.max_grad_norm, expected_batch_size=batch_size)
        optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=loader.sample_rate))
        self.module.train()
        total, seen, done = 0.0, 0, 0
        with warnings.catch_warnings():
            # Opacus's per-example hooks fire on the first layer, whose input needs no gradient:
            # PyTorch warns about that, though it is what the hooks are for.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for _ in range(epochs):
                for xb, yb in loader:
                    optimizer.zero_grad(set_to_none=True)
                    if len(xb):
                        loss = F.cross_entropy(self.module(xb), yb)
                        loss.backward()
                        total, seen = total + float(loss.detach()) * len(xb), seen + len(xb)
                    optimizer.step()
                    done += 1
                    if progress is not None:
                        progress(done)
        self.module.zero_grad(set_to_none=True)
        return total / max(seen, 1)

    def epsilon(self) -> float:
        return float(self.accountant.get_epsilon(self.delta))
