"""An audit of the epsilon the accountant reports: a measured lower-bound-style estimate beside it.

    python -m fedsock.audit canaries --noise-multipliers 0,0.5,1,2      # empirical epsilon beside the accountant's
    python -m fedsock.audit canaries --break drop-noise                  # a broken run: the audit must fail it
    python -m fedsock.audit membership                                   # loss-threshold attack, spam and chest X-ray

**canaries** (Andrew et al., "One-shot Empirical Privacy Estimation for Federated Learning",
ICLR 2024). A real DP-FedAvg run on the server's own round engine, virtual clients training on
MNIST (fedsock/simulate.py), with k canary clients added to the pool. A canary's update is the
global model plus S times its own fixed random unit direction: exactly at the clip bound, the
most a client may move the sum. Many more directions are drawn and never inserted (held out;
they cost nothing). At the end, the cosine between the model's whole change (final − initial
weights) and each direction: a Gaussian is fitted to the inserted canaries' cosines and one to
the held-out ones, and the empirical epsilon at the run's delta is the epsilon of that pair of
Gaussians (`gaussian_pair_epsilon`: the hockey-stick divergence, in both directions, unequal
variances included). It is printed beside the accountant's epsilon for the same run.

How the canaries count: as clients, exactly like the others. They are members of the pool, sampled
as every client is, counted in the population the accountant is told of and in the fixed
denominator m. The guarantee is for any one client, whatever its update, so a client that sends a
crafted update is one the mechanism must already hide; giving canaries a place of their own
(outside the sampling or the denominator) would audit another mechanism than the one that runs.
delta is fedsock's default for the whole pool (real and canary clients).

What the estimate is, and is not (Andrew et al.'s own caveats): a *heuristic* measurement from one
run, not a proof. It sees only the final model (the accountant bounds every round's release, which
is more), one kind of adversary (random directions at the clip bound, not the worst case), this
data and these settings, and it has sampling error (k inserted canaries). An estimate far below the
accountant's epsilon does not show the bound to be loose; one *above* it shows a bug: the run
leaks more than the accountant believes. `--break drop-noise` makes such a bug on purpose (the
accountant records z, the aggregator adds no noise), and the audit must fail it: the line
"AUDIT FAILED: ..." and exit status 3.

**membership** (Yeom et al. 2018, "Privacy Risk in Machine Learning"): the loss-threshold attack on
the final global model of a short federation on each own-data task (SMS spam, chest X-rays), with
and without client-level DP. Members are the examples the clients trained on; non-members are held
out from the same pool before the split; the score is −loss. Reported: the ROC's AUC and the true
positive rate at 1% false positives (`roc`, `tpr_at_fpr`: exact, no interpolation).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from fedsock.clients import ClientPool, FitIns, FitRes, UnconnectedProxy
from fedsock.console import ArgumentParser, HelpFormatter, UsageError, run_main, say
from fedsock.console import number as bounded
from fedsock.events import Events
from fedsock.privacy import DPMean, Privacy, PrivacySettings, default_delta
from fedsock.strategies import Strategy
from fedsock.transport import Traffic

PROG = "python -m fedsock.audit"
WHO = "audit"
AUDIT_FAILED = 3  # the exit status when a run leaks more than its accountant says
BREAKS = ("none", "drop-noise")


# --------------------------------------------------------------------------- the maths: epsilon of two Gaussians


@dataclass(frozen=True)
class Gaussian:
    mean: float
    std: float


def fit_gaussian(values: Sequence[float]) -> Gaussian:
    values = np.asarray(values, dtype=np.float64)
    return Gaussian(float(values.mean()), float(values.std(ddof=1)))


def _interval_mass(low: float, high: float, mean: float, std: float) -> float:
    """P(low < X < high) for X ~ N(mean, std²), accurate in either tail."""
    from scipy.special import ndtr

    a, b = (low - mean) / std, (high - mean) / std
    if a > 0:  # both in the upper tail: subtract survival functions, not values near 1
        return float(ndtr(-a) - ndtr(-b))
    return float(ndtr(b) - ndtr(a))


def _loss_region(p: Gaussian, q: Gaussian, epsilon: float) -> list[tuple[float, float]]:
    """Where log p(x) − log q(x) > epsilon, as intervals. The log ratio of two Gaussians is a
    quadratic in x, so the region is empty, one interval, or two half-lines: found exactly."""
    # In units of q: q = N(0, 1), p = N(mu, sigma²); the quadratic a x² + b x + c > 0.
    mu, sigma = (p.mean - q.mean) / q.std, p.std / q.std
    a, b = (1 - 1 / sigma**2) / 2, mu / sigma**2
    c = -(mu**2) / (2 * sigma**2) - math.log(sigma) - epsilon
    to_x = lambda t: q.mean + q.std * t  # noqa: E731
    if abs(a) < 1e-12 * max(1.0, abs(b), abs(c)):  # equal spreads: a line
        if b == 0:
            return [] if c <= 0 else [(-math.inf, math.inf)]
        root = to_x(-c / b)
        return [(root, math.inf)] if b > 0 else [(-math.inf, root)]
    disc = b * b - 4 * a * c
    if disc <= 0:
        return [(-math.inf, math.inf)] if a > 0 else []
    s = -(b + math.copysign(math.sqrt(disc), b)) / 2  # the stable pair of roots: s/a and c/s
    r1, r2 = sorted((s / a, c / s)) if s != 0 else sorted((math.sqrt(disc) / (2 * a), -math.sqrt(disc) / (2 * a)))
    if a > 0:
        return [(-math.inf, to_x(r1)), (to_x(r2), math.inf)]
    return [(to_x(r1), to_x(r2))]


def hockey_stick_delta(p: Gaussian, q: Gaussian, epsilon: float) -> float:
    """delta(epsilon) of P against Q: sup over sets S of P(S) − e^epsilon Q(S), the integral of
    (p − e^epsilon q)+, over the region where the privacy loss exceeds epsilon."""
    region = _loss_region(p, q, epsilon)
    mass_p = sum(_interval_mass(lo, hi, p.mean, p.std) for lo, hi in region)
    mass_q = sum(_interval_mass(lo, hi, q.mean, q.std) for lo, hi in region)
    scaled_q = math.exp(min(epsilon + math.log(mass_q), 700.0)) if mass_q > 0 else 0.0
    return max(mass_p - scaled_q, 0.0)


def _one_way_epsilon(p: Gaussian, q: Gaussian, delta: float, ceiling: float) -> float:
    """The smallest epsilon with hockey_stick_delta(p, q, epsilon) <= delta, by bisection (it falls with epsilon)."""
    if hockey_stick_delta(p, q, 0.0) <= delta:
        return 0.0
    low, high = 0.0, 1.0
    while hockey_stick_delta(p, q, high) > delta:
        low, high = high, 2 * high
        if high > ceiling:
            return math.inf
    while high - low > 1e-9 * max(high, 1.0):
        middle = (low + high) / 2
        low, high = (middle, high) if hockey_stick_delta(p, q, middle) > delta else (low, middle)
    return high


def gaussian_pair_epsilon(inserted: Gaussian, held_out: Gaussian, delta: float, ceiling: float = 1e5) -> float:
    """The epsilon at `delta` of a mechanism whose output is N(inserted) with the canary and N(held_out)
    without: the larger of the two directions (with unequal spreads they differ)."""
    if inserted.std <= 0 or held_out.std <= 0:
        return math.inf if inserted.mean != held_out.mean else 0.0
    return max(_one_way_epsilon(inserted, held_out, delta, ceiling), _one_way_epsilon(held_out, inserted, delta, ceiling))


def empirical_epsilon(inserted_cosines: Sequence[float], held_out_cosines: Sequence[float], delta: float) -> float:
    """Andrew et al.'s one-shot estimate: Gaussians fitted to both sets of cosines, and their epsilon at delta."""
    return gaussian_pair_epsilon(fit_gaussian(inserted_cosines), fit_gaussian(held_out_cosines), delta)


# --------------------------------------------------------------------------- the maths: ROC of an attack


def roc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The exact ROC of "member if score >= t", every threshold t: (false positive rates, true positive
    rates), from (0, 0) to (1, 1). Tied scores move both rates in one step."""
    members, others = np.asarray(member_scores, np.float64), np.asarray(nonmember_scores, np.float64)
    if not len(members) or not len(others):
        raise ValueError("an ROC needs members and non-members")
    scores = np.concatenate([members, others])
    is_member = np.concatenate([np.ones(len(members)), np.zeros(len(others))])
    order = np.argsort(-scores, kind="stable")
    scores, is_member = scores[order], is_member[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # a threshold between distinct scores
    tp, fp = np.cumsum(is_member)[last_of_tie], np.cumsum(1 - is_member)[last_of_tie]
    return np.r_[0.0, fp / len(others)], np.r_[0.0, tp / len(members)]


def auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """The area under the ROC (trapezoids: a tie counts one half, as in the Mann-Whitney U statistic)."""
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """The true positive rate of the best threshold whose false positive rate is at most `target`: no
    interpolation between thresholds (what Carlini et al. 2022, "Membership Inference Attacks From First
    Principles", report as TPR at low FPR)."""
    return float(tpr[fpr <= target + 1e-12].max())


# --------------------------------------------------------------------------- canary clients


def flat_size(template: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in template.values() if t.is_floating_point())


def flatten(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The floating-point tensors as one float64 vector, in the model's order."""
    return torch.cat([t.detach().double().reshape(-1) for t in tensors.values() if t.is_floating_point()])


def unflatten(vector: torch.Tensor, template: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, at = {}, 0
    for name, t in template.items():
        if t.is_floating_point():
            out[name] = vector[at:at + t.numel()].reshape(t.shape)
            at += t.numel()
        else:
            out[name] = torch.zeros(t.shape, dtype=torch.float64)
    return out


def unit_directions(count: int, dimension: int, seed: int, stream: int) -> torch.Tensor:
    """`count` directions uniform on the unit sphere, float64 (count, dimension), from (seed, stream)."""
    generator = torch.Generator().manual_seed(hash((seed, stream)) & 0x7FFFFFFFFFFF)
    directions = torch.randn(count, dimension, generator=generator, dtype=torch.float64)
    return directions / directions.norm(dim=1, keepdim=True)


def held_out_cosines(change: torch.Tensor, count: int, seed: int) -> np.ndarray:
    """Cosines of `change` with `count` directions that were never inserted, drawn in chunks of 64 MB."""
    unit = change / change.norm()
    chunk = max(1, 2**23 // len(change))
    out = [unit_directions(min(chunk, count - start), len(change), seed, 1_000_000 + start) @ unit
           for start in range(0, count, chunk)]
    return torch.cat(out).numpy()


class CanaryClient(UnconnectedProxy):
    """A ClientProxy whose update is the global model plus clip · its direction: exactly at the clip bound,
    whatever the model. It trains nothing, so it holds no examples (and weighs nothing in train_loss)."""

    num_examples = 0

    def __init__(self, client_id: int, direction: torch.Tensor, clip: float):
        self.client_id, self.direction, self.clip = client_id, direction, clip

    async def fit(self, ins: FitIns) -> FitRes:
        step = unflatten(self.clip * self.direction, ins.model.tensors)
        tensors = {name: t.double() + step[name] for name, t in ins.model.tensors.items()}
        return FitRes(self.client_id, ins.round, 0, tensors, {"train_loss": 0.0, "local_test_accuracy": 0.0,
                                                              "fit_seconds": 0.0})


class NoiseNotAdded(Privacy):
    """`--break drop-noise`, a deliberate bug: the accountant records the noise multiplier, but the
    aggregator adds no noise. The audit must catch it."""

    def aggregator(self, current: Mapping[str, torch.Tensor], denominator: float) -> DPMean:
        return DPMean(current, self.settings.clip, 0.0, max(denominator, 1e-12), clip_here=True)


# --------------------------------------------------------------------------- the canary run


@dataclass
class CanarySettings:
    noise_multipliers: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0, 2.0])
    model: str = "mlp"  # d = 199,210: a random direction is nearly orthogonal to the clients' updates
    num_clients: int = 100  # real clients, training on MNIST
    # Enough to fit their spread: at delta 1e-5 the estimate is very sensitive to it (a spread 10% off
    # the held-out one adds about 3 to epsilon), and k canaries know it only to about 1/sqrt(2k).
    canaries: int = 100
    held_out: int = 2000
    num_rounds: int = 5
    clip: float = 1.0
    # Poisson sampling of every client, canaries included; None: all, each round. Not offered on the command
    # line: under sampling a canary's cosine is a mixture over how many rounds it was picked, which one
    # Gaussian fits badly when rounds are few (a 2-round trial at q = 0.5 estimated 7.6 against a bound of 4.9).
    fraction_fit: float | None = None
    delta: float | None = None  # default: fedsock's for the whole pool
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    seed: int = 0
    broken: str = "none"

    @property
    def pool_size(self) -> int:
        return self.num_clients + self.canaries

    @property
    def run_delta(self) -> float:
        return self.delta if self.delta is not None else default_delta(self.pool_size)


@dataclass
class CanaryResult:
    noise_multiplier: float
    accountant_epsilon: float
    empirical_epsilon: float
    inserted: Gaussian
    held_out: Gaussian
    test_accuracy: float | None
    broken: str

    @property
    def failed(self) -> bool:
        return self.empirical_epsilon > self.accountant_epsilon

    def to_json(self) -> dict:
        as_number = lambda x: None if math.isinf(x) else x  # noqa: E731  (JSON has no infinity)
        return {**asdict(self), "accountant_epsilon": as_number(self.accountant_epsilon),
                "empirical_epsilon": as_number(self.empirical_epsilon), "failed": self.failed}


class CanaryAudit:
    """MNIST loaded and split once; then one federation per noise multiplier, canaries in its pool."""

    def __init__(self, settings: CanarySettings):
        from fedsock.prepare import prepare_training
        from fedsock.simulate import InProcessBackend, SharedData, SimulationConfig

        self.settings = s = settings
        self.config = SimulationConfig(model=s.model, num_clients=s.num_clients, num_rounds=s.num_rounds, seed=s.seed,
                                       local_epochs=s.local_epochs, batch_size=s.batch_size, lr=s.lr, quiet=True,
                                       fraction_fit=s.fraction_fit, sampling="poisson", device="cpu")
        with contextlib.redirect_stdout(io.StringIO()):  # prepare_training's line about the data split
            self.setup = prepare_training(self.config, None, keep_train=True, who=WHO)
        self.data = SharedData(self.setup.train, self.setup.info, self.setup.partitions, s.seed)
        self.setup.train = None
        self.backend = InProcessBackend(self.data, s.model, s.seed, 1, torch.device("cpu"))
        self.initial = flatten(self.setup.model.tensors)
        self.directions = unit_directions(s.canaries, len(self.initial), s.seed, 0)

    def close(self) -> None:
        self.backend.close()

    def privacy(self, z: float) -> Privacy:
        s = self.settings
        sampling = "poisson" if s.fraction_fit is not None else "none"
        kind = NoiseNotAdded if s.broken == "drop-noise" else Privacy
        # the sampling secret from the seed: an audit is reproducible (a real run draws it afresh)
        return kind(PrivacySettings(s.clip, z, s.run_delta, "central", sampling), sampling_seed=s.seed + 1)

    async def federation(self, privacy: Privacy):
        from fedsock.engine import RoundEngine
        from fedsock.simulate import Faults, VirtualClient

        s = self.settings
        pool = ClientPool(s.pool_size)
        no_faults = Faults(s.seed, 0.0, 0.0, 0.0)
        clients = [VirtualClient(i, self.data.num_examples(i), self.backend, no_faults) for i in range(1, s.num_clients + 1)]
        clients += [CanaryClient(s.num_clients + 1 + j, self.directions[j], s.clip) for j in range(s.canaries)]
        for client in clients:
            pool.joined(client)
            pool.add(client)
        engine = RoundEngine(self.config, Strategy(self.config, privacy), pool, self.setup.model, self.setup.evaluate,
                             Events([]), Traffic())
        await engine.run()
        return engine

    def run(self, z: float) -> CanaryResult:
        privacy = self.privacy(z)
        engine = asyncio.run(self.federation(privacy))
        change = flatten(engine.model.tensors) - self.initial
        if float(change.norm()) == 0:
            raise UsageError("the model did not change in the run: nothing to measure")
        inserted = (self.directions @ (change / change.norm())).numpy()
        held_out = held_out_cosines(change, self.settings.held_out, self.settings.seed)
        last = engine.metrics[-1] if engine.metrics else {}
        return CanaryResult(z, privacy.accountant.epsilon(), empirical_epsilon(inserted, held_out, self.settings.run_delta),
                            fit_gaussian(inserted), fit_gaussian(held_out), last.get("test_accuracy"), self.settings.broken)


def show_epsilon(value: float) -> str:
    return "∞" if math.isinf(value) else f"{value:.3g}" if value < 100 else f"{value:.0f}"


def run_canaries(settings: CanarySettings, json_path: str | None) -> int:
    s = settings
    sampled = f"Poisson sampling q = {s.fraction_fit:g}" if s.fraction_fit is not None else "every client every round"
    broken = f"; BROKEN on purpose: {s.broken}" if s.broken != "none" else ""
    say(WHO, f"canaries: mnist {s.model}, {s.num_clients} clients + {s.canaries} canary clients (updates at the clip "
             f"bound S = {s.clip:g}), {s.num_rounds} rounds, {sampled}; {s.held_out} held-out directions; "
             f"delta {s.run_delta:.3g}{broken}")
    audit = CanaryAudit(s)
    results = []
    try:
        for z in s.noise_multipliers:
            result = audit.run(z)
            results.append(result)
            accuracy = f"{100 * result.test_accuracy:.2f}%" if result.test_accuracy is not None else "-"
            verdict = ("no DP: nothing to check" if z == 0 else "FAILED" if result.failed else "ok")
            say(WHO, f"z = {z:<4g} accountant epsilon {show_epsilon(result.accountant_epsilon):>6}  empirical epsilon "
                     f"{show_epsilon(result.empirical_epsilon):>6}  cosines: inserted {result.inserted.mean:+.4f} ± "
                     f"{result.inserted.std:.4f}, held out {result.held_out.mean:+.4f} ± {result.held_out.std:.4f}  "
                     f"test accuracy {accuracy}  {verdict}")
    finally:
        audit.close()
    if json_path:
        write_json(json_path, {"settings": {**asdict(s), "delta": s.run_delta}, "runs": [r.to_json() for r in results]})
    say(WHO, "the empirical epsilon is Andrew et al.'s one-shot estimate from the final model of this one run: a "
             "heuristic measurement, not a proof; below the accountant's it shows no bug, above it shows one")
    failed = [r for r in results if r.failed]
    for r in failed:
        print(f"AUDIT FAILED: z = {r.noise_multiplier:g}{' (--break ' + r.broken + ')' if r.broken != 'none' else ''}: "
              f"empirical epsilon {show_epsilon(r.empirical_epsilon)} > the accountant's "
              f"{show_epsilon(r.accountant_epsilon)}: the run leaks more than it accounts for", flush=True)
    return AUDIT_FAILED if failed else 0


# --------------------------------------------------------------------------- membership inference


@dataclass
class MembershipSettings:
    tasks: list[str] = field(default_factory=lambda: ["spam", "xray"])
    noise_multiplier: float = 1.0
    clip: float = 1.0
    num_clients: int = 10
    num_rounds: int = 10
    local_epochs: int = 5
    batch_size: int = 16
    lr: float = 0.1
    held_out_fraction: float = 0.2
    seed: int = 0


TASK_MODELS = {"spam": "textcnn", "xray": "mlp"}


def task_data(name: str):
    """(task, examples, labels) of an own-data task, every example from the same pool."""
    from fedsock.demo_data import XRAY_CLASSES, XRAY_FILE, read_spam
    from fedsock.tasks import make_task
    from fedsock.text import encode_texts

    if name == "spam":
        task = make_task("text", "ham,spam", 28, 1, None, None, 30, 1 << 15, None)
        pairs = read_spam()  # deduplicated: a copy of a member among the non-members would blur the test
        x = encode_texts([text for _, text in pairs], task.max_tokens, task.buckets)
        y = np.asarray([task.classes.index(label) for label, _ in pairs], dtype=np.int64)
        return task, x, y
    task = make_task("image", ",".join(XRAY_CLASSES), 28, 1, None, None, 30, 1 << 15, None)
    with np.load(XRAY_FILE, allow_pickle=False) as archive:
        # train and val come from the same source (Kermany et al.'s training set); the test split does not
        x = np.concatenate([archive["train_images"], archive["val_images"]])[:, None]
        y = np.concatenate([archive["train_labels"], archive["val_labels"]]).reshape(-1).astype(np.int64)
    return task, x, y


def membership_run(name: str, z: float | None, s: MembershipSettings) -> dict:
    """A federation on one own-data task (z None: no DP), then the loss-threshold attack on its final model."""
    import client_helper
    import neural_net_helper as nnh
    from fedsock.clients import GlobalModel
    from fedsock.engine import RoundEngine
    from fedsock.evaluation import Evaluator
    from fedsock.simulate import Faults, InProcessBackend, SharedData, SimulationConfig, VirtualClient

    task, x, y = task_data(name)
    order = np.random.default_rng([s.seed, 0xA0]).permutation(len(y))
    cut = int(len(y) * s.held_out_fraction)
    outside, pool_ids = order[:cut], order[cut:]
    parts = [np.sort(pool_ids[p]) for p in np.array_split(np.arange(len(pool_ids)), s.num_clients)]
    data = SharedData(client_helper.Split(x, y), task, parts, s.seed)
    model_name = TASK_MODELS[name]
    config = SimulationConfig(model=model_name, num_clients=s.num_clients, num_rounds=s.num_rounds, seed=s.seed,
                              local_epochs=s.local_epochs, batch_size=s.batch_size, lr=s.lr, quiet=True, device="cpu")
    model = nnh.build_model(model_name, task, s.seed)
    privacy = None
    if z is not None:
        privacy = Privacy(PrivacySettings(s.clip, z, default_delta(s.num_clients), "central", "none"),
                          sampling_seed=s.seed + 1)
    outside_x, outside_y = data.x[torch.from_numpy(outside)], data.y[torch.from_numpy(outside)]
    evaluate = Evaluator(nnh.build_model(model_name, task, s.seed), (outside_x, outside_y), task)
    backend = InProcessBackend(data, model_name, s.seed, 1, torch.device("cpu"))
    pool = ClientPool(s.num_clients)
    for i in range(1, s.num_clients + 1):
        client = VirtualClient(i, data.num_examples(i), backend, Faults(s.seed, 0.0, 0.0, 0.0))
        pool.joined(client)
        pool.add(client)
    engine = RoundEngine(config, Strategy(config, privacy), pool, GlobalModel.of(nnh.get_weights(model)), evaluate,
                         Events([]), Traffic())
    try:
        asyncio.run(engine.run())
    finally:
        backend.close()
    nnh.set_weights(model, engine.model.tensors)
    members = np.concatenate([data.shares[i][0] for i in range(1, s.num_clients + 1)])
    member_scores = -example_losses(model, data.x[torch.from_numpy(members)], data.y[torch.from_numpy(members)])
    nonmember_scores = -example_losses(model, outside_x, outside_y)
    fpr, tpr = roc(member_scores, nonmember_scores)
    last = engine.metrics[-1]
    return {"task": name, "model": model_name, "noise_multiplier": z, "epsilon": privacy.accountant.epsilon() if privacy else None,
            "delta": privacy.settings.delta if privacy else None, "auc": auc(fpr, tpr),
            "tpr_at_1pct_fpr": tpr_at_fpr(fpr, tpr, 0.01), "members": len(members), "non_members": len(outside),
            "accuracy_non_members": last.get("test_accuracy"),
            "train_loss_members": float(-member_scores.mean()), "loss_non_members": float(-nonmember_scores.mean())}


@torch.no_grad()
def example_losses(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    from torch.nn import functional as F

    model.eval()
    return torch.cat([F.cross_entropy(model(x[i:i + batch_size]), y[i:i + batch_size], reduction="none")
                      for i in range(0, len(x), batch_size)]).double().numpy()


def run_membership(settings: MembershipSettings, json_path: str | None) -> int:
    s = settings
    say(WHO, f"membership: loss-threshold attack (Yeom et al. 2018) on the final model; {s.num_clients} clients, "
             f"{s.num_rounds} rounds, E = {s.local_epochs}, B = {s.batch_size}, lr {s.lr:g}; {100 * s.held_out_fraction:g}% "
             f"of each task's examples held out as non-members; DP: clip S = {s.clip:g}, z = {s.noise_multiplier:g}")
    results = []
    for name in s.tasks:
        for z in (None, s.noise_multiplier):
            r = membership_run(name, z, s)
            results.append(r)
            dp = "no DP" if z is None else f"DP z = {z:g}, epsilon {show_epsilon(r['epsilon'])} at delta {r['delta']:.3g}"
            accuracy = r["accuracy_non_members"]
            accuracy = f"{100 * accuracy:.2f}%" if accuracy is not None else "-"
            say(WHO, f"{name} ({r['model']}), {dp}: AUC {r['auc']:.3f}, TPR at 1% FPR {100 * r['tpr_at_1pct_fpr']:.2f}% "
                     f"({r['members']} members, {r['non_members']} non-members); mean loss {r['train_loss_members']:.3f} "
                     f"members, {r['loss_non_members']:.3f} non-members; accuracy on non-members {accuracy}")
    if json_path:
        write_json(json_path, {"settings": asdict(s), "runs": results})
    return 0


# --------------------------------------------------------------------------- the command line


def write_json(path: str, content: dict) -> None:
    try:
        Path(path).write_text(json.dumps(content, indent=1) + "\n")
    except OSError as exc:
        raise UsageError(f"cannot write --json {path}: {exc.strerror or exc}") from exc


def noise_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be numbers separated by commas, got {text!r}") from None
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"must be one or more numbers >= 0 (0: no DP), got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{canaries,membership}")
    c = commands.add_parser("canaries", help="empirical epsilon from canary clients, beside the accountant's",
                            formatter_class=HelpFormatter)
    d = CanarySettings()
    c.add_argument("--noise-multipliers", type=noise_list, default=d.noise_multipliers, metavar="Z,Z,...",
                   help="one run for each (0: no DP, clipping only)")
    c.add_argument("--model", choices=("logreg", "mlp"), default=d.model, help="the MNIST model the clients train")
    c.add_argument("--num-clients", type=bounded(int, 2, 100_000), default=d.num_clients, help="real clients")
    c.add_argument("--canaries", type=bounded(int, 2, 10_000), default=d.canaries, help="canary clients inserted")
    c.add_argument("--held-out", type=bounded(int, 2, 1_000_000), default=d.held_out,
                   help="canary directions drawn but never inserted")
    c.add_argument("--num-rounds", type=bounded(int, 1, 10_000), default=d.num_rounds, help="rounds of each run")
    c.add_argument("--clip", type=bounded(float, 1e-9), default=d.clip, help="the clip bound S")
    c.add_argument("--delta", type=bounded(float, 1e-300, 0.1), default=None,
                   help="delta (default: fedsock's for the whole pool, min(1e-5, 1/(10 N)))")
    c.add_argument("--local-epochs", type=bounded(int, 1, 100), default=d.local_epochs, help="epochs each client trains per round")
    c.add_argument("--batch-size", type=bounded(int, 1, 4096), default=d.batch_size, help="client minibatch size")
    c.add_argument("--lr", type=bounded(float, 1e-6, 10.0), default=d.lr, help="client SGD learning rate")
    c.add_argument("--seed", type=bounded(int, 0), default=d.seed, help="seed of the data, the model, the canaries and the noise")
    c.add_argument("--break", dest="broken", choices=BREAKS, default=d.broken,
                   help="drop-noise: a deliberately broken run (accounted noise, none added) that the audit must fail")
    c.add_argument("--json", metavar="PATH", help="also write the results to this JSON file")
    c.add_argument("--traceback", action="store_true", help="show a full traceback on errors (for bug reports)")
    m = commands.add_parser("membership", help="loss-threshold membership inference on the own-data tasks",
                            formatter_class=HelpFormatter)
    e = MembershipSettings()
    m.add_argument("--tasks", type=task_list, default=e.tasks, metavar="spam,xray",
                   help="the tasks to attack: spam (SMS messages) and xray (chest X-rays)")
    m.add_argument("--noise-multiplier", type=bounded(float, 0.0, 1000.0), default=e.noise_multiplier,
                   help="z of the DP run (each task also runs without DP)")
    m.add_argument("--clip", type=bounded(float, 1e-9), default=e.clip, help="the clip bound S of the DP run")
    m.add_argument("--num-clients", type=bounded(int, 1, 1000), default=e.num_clients, help="clients")
    m.add_argument("--num-rounds", type=bounded(int, 1, 1000), default=e.num_rounds, help="rounds of each run")
    m.add_argument("--local-epochs", type=bounded(int, 1, 100), default=e.local_epochs, help="epochs each client trains per round")
    m.add_argument("--batch-size", type=bounded(int, 1, 4096), default=e.batch_size, help="client minibatch size")
    m.add_argument("--lr", type=bounded(float, 1e-6, 10.0), default=e.lr, help="client SGD learning rate")
    m.add_argument("--seed", type=bounded(int, 0), default=e.seed, help="seed of the data, the model and the noise")
    m.add_argument("--json", metavar="PATH", help="also write the results to this JSON file")
    m.add_argument("--traceback", action="store_true", help="show a full traceback on errors (for bug reports)")
    return parser


def task_list(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names or any(n not in TASK_MODELS for n in names):
        raise argparse.ArgumentTypeError(f"must be spam, xray or both (comma-separated), got {text!r}")
    return names


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    command, json_path = args.pop("command"), args.pop("json")
    args.pop("traceback")
    if json_path and not Path(json_path).resolve().parent.is_dir():  # found out now, not after the runs
        raise UsageError(f"--json {json_path}: no such folder {Path(json_path).resolve().parent}")
    torch.set_num_threads(1)
    if command == "canaries":
        settings = CanarySettings(**args)
        if settings.broken != "none" and not any(z > 0 for z in settings.noise_multipliers):
            raise UsageError("--break drop-noise needs a noise multiplier above 0 to drop")
        return run_canaries(settings, json_path)
    return run_membership(MembershipSettings(**args), json_path)


def cli() -> int:
    return run_main(PROG, main)


if __name__ == "__main__":
    sys.exit(cli())
