"""Buffered asynchronous aggregation (FedBuff: Nguyen et al., "Federated Learning with Buffered
Asynchronous Aggregation", AISTATS 2022), read top-down in `BufferedEngine.train`.

There are no rounds. The server holds model versions 0, 1, 2, ... and, over and over:

    1. dispatch  every idle client gets the newest version, at most C training at once
                 (C: --clients-per-round or --fraction-fit; all ready clients by default);
    2. fold      each update, the moment it arrives, goes into a buffer as its delta against the
                 version it started from, Δ = w_client − w_base, weighted by its staleness s (the
                 versions made since its base): 1/√(1+s) by default (--staleness-weight). An
                 update more than --max-staleness versions behind is dropped, and its client told;
    3. step      every K arrivals (--async-buffer K) the next version is
                     w ← w + η · Σ_i weight(s_i) · Δ_i / K          (η: --server-lr, 1 by default)
                 (with fedavgm or an adaptive strategy, the server optimiser steps on Σ/K instead);
                 its row of metrics.csv and its checkpoint follow, as a round's do.

A client trains at most once per version, and an update folded while version v is the newest
keeps its client waiting until v+1 is made: so each version holds at most one update per client.
That keeps one client's influence on a version to one weighted, clipped update, which is what
client-level DP's sensitivity needs, and stops a fast client from filling the buffer alone.

With central DP each delta is clipped to S, the buffer's sum gets N(0, z²S²) noise, and the
denominator is always K: each version is one Gaussian mechanism of sensitivity S (a staleness
weight is at most 1). The accountant records one such mechanism per version, composed over all of
them, with no sampling amplification: which clients land in a buffer depends on their speed, not
on a random sample, so nothing can be claimed for it.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any, Mapping

import numpy as np
import torch

from fedsock.clients import ClientProxy, FitIns, FitRes, GlobalModel, Stopped
from fedsock.engine import RoundEngine, RunFailed
from fedsock.events import ClientDropped, Notice, RoundStarted, UpdateAccepted, UpdateDiscarded
from fedsock.privacy import clip_delta, gaussian_noise, secret_generator
from fedsock.virtual_time import virtual_now

# The strategies whose step is the aggregate itself: η scales the buffer's mean delta. The others
# (fedavgm, fedadam, ...) step with their own server learning rate on the same mean delta.
PLAIN_STEP = ("fedavg", "fedprox")


def staleness_weight(staleness: int, rule: str) -> float:
    """How much an update `staleness` versions behind the newest counts: 1/√(1+s) (sqrt, FedBuff's
    choice), 1 (constant) or (1+s)^-A (poly:A, as FedAsync: Xie et al. 2019). Never above 1, so a
    weighted, clipped delta moves a version's sum by at most the clip."""
    if staleness < 0:
        raise ValueError(f"staleness {staleness} is negative")
    if rule == "sqrt":
        return 1 / math.sqrt(1 + staleness)
    if rule == "constant":
        return 1.0
    if rule.startswith("poly:"):
        return (1 + staleness) ** -float(rule[5:])
    raise ValueError(f"unknown staleness rule {rule!r}")


class VersionBuffer:
    """The updates folded towards the next version: Σ weight · Δ in float64 (each Δ clipped first
    when `clip` is given), the updates' metrics and staleness. `number` is the version it makes;
    `reported` and `expected` are what the <WAITING> line and the dashboard read of an open round."""

    def __init__(self, number: int, size: int, template: Mapping[str, torch.Tensor], clip: float | None = None,
                 noise_std: float = 0.0, generator: torch.Generator | None = None):
        self.number, self.size, self.clip, self.noise_std = number, size, clip, noise_std
        self.generator = generator
        self.sum = {name: torch.zeros(t.shape, dtype=torch.float64) for name, t in template.items()}
        self.reported: dict[int, dict[str, Any]] = {}  # client id -> num_examples, staleness, weight and metrics
        self.expected = range(size)  # K updates, whoever sends them
        self.open = True
        self.started = time.perf_counter()

    @property
    def count(self) -> int:
        return len(self.reported)

    @property
    def full(self) -> bool:
        return self.count >= self.size

    def add(self, client_id: int, base: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor],
            staleness: int, weight: float, num_examples: int, metrics: dict[str, Any]) -> float | None:
        """Fold one update; the norm of its delta before clipping (None without a clip)."""
        if client_id in self.reported:
            raise ValueError(f"client {client_id} already has an update in version {self.number}'s buffer")
        delta = {name: trained[name].double() - base[name].double() for name in self.sum}
        norm = None
        if self.clip is not None:
            delta, norm = clip_delta(delta, self.clip)
        for name, total in self.sum.items():
            total.add_(delta[name], alpha=weight)
        self.reported[client_id] = {"num_examples": num_examples, "staleness": staleness, "weight": weight, **metrics}
        return norm

    def mean_delta(self) -> dict[str, torch.Tensor]:
        """(Σ weight · Δ + noise) / K, float64: the noise (central DP) is drawn once, on the sum."""
        noise = gaussian_noise(self.sum, self.noise_std, self.generator or secret_generator()) \
            if self.noise_std > 0 else None
        return {name: (total + noise[name] if noise else total) / self.size for name, total in self.sum.items()}

    def row(self) -> dict[str, Any]:
        """The version's line of metrics.csv, before its model is evaluated (bytes and times: the caller's)."""
        updates = list(self.reported.values())
        examples = sum(u["num_examples"] for u in updates) or 1
        stalenesses = [u["staleness"] for u in updates]
        return {
            "round": self.number, "clients": len(updates), "expected": self.size,
            "train_loss": sum(u["train_loss"] * u["num_examples"] for u in updates) / examples,
            "seconds": time.perf_counter() - self.started,
            "max_fit_seconds": max([u["fit_seconds"] for u in updates], default=0.0),
            "sum_fit_seconds": sum(u["fit_seconds"] for u in updates),
            "staleness": max(stalenesses, default=0), "mean_staleness": sum(stalenesses) / max(len(stalenesses), 1),
            "virtual_seconds": virtual_now(),  # a simulation's virtual clock (None in real time)
        }


def plain_step(current: Mapping[str, torch.Tensor], mean_delta: Mapping[str, torch.Tensor],
               server_lr: float) -> dict[str, torch.Tensor]:
    """w + η · mean_delta, each tensor back in its own dtype."""
    out = {}
    for name, t in current.items():
        value = t.double() + server_lr * mean_delta[name]
        out[name] = value.round().to(t.dtype) if not t.dtype.is_floating_point else value.to(t.dtype)
    return out


class BufferedEngine(RoundEngine):
    """FedBuff on the round engine's run: its control, reports, checkpoints and privacy; its own loop."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.size = self.config.async_buffer
        self.control.needed = max(self.control.needed, self.size)  # K distinct clients fill a buffer
        self.bases: dict[int, GlobalModel] = {}  # version -> its model, the last --max-staleness + 1 of them
        self.instructions: FitIns | None = None  # the newest version's, framed once for every client sent it
        self.ready_from: dict[int, int] = {}  # client id -> the first version it may train next
        self.retried: dict[int, int] = {}  # client id -> the version it was last sent again after a failed fit
        self.arrivals: asyncio.Queue = asyncio.Queue()  # (proxy, finished fit)
        self.dispatches = 0
        self.generator: torch.Generator | None = None  # tests seed the DP noise; None: the OS's randomness

    def next_round(self, client_id: int) -> int:
        """<METADATA>'s next_round: the round (version + 1) of the first model a client joining now is sent: the
        newest version's, unless it trained on that one before it rejoined (then the next one's)."""
        return max(self.rounds_done, self.ready_from.get(client_id, 0)) + 1

    # ---- the versions
    async def train(self) -> None:
        """Versions until --num-rounds: dispatch, fold each arrival, step every K. In-flight work
        does not outlive the session: an update that comes after it is acknowledged as not used."""
        self.new_version()
        buffer, waits = self.open_buffer(), 0
        while self.rounds_done < self.config.num_rounds:
            if buffer.count == 0 and self.privacy is not None and self.privacy.would_exceed_budget(
                    len(self.pool.members), self.size, 1.0):
                self.budget_spent = True
                break
            arrival = await self.next_arrival(buffer)  # 1. dispatch, while waiting
            if arrival is None:
                waits += 1
                self.say_nothing_arrived(buffer, waits)
                continue
            waits = 0
            self.fold(buffer, *arrival)  # 2. fold
            if buffer.full:  # 3. step; the version's report runs while the clients train on it
                row = self.step(buffer)
                if self.rounds_done < self.config.num_rounds:
                    buffer = self.open_buffer()
                await self.reports.settle()  # the last version's files, before this one's start
                self.reports.start(row, self.model, dict(self.strategy.state))
        self.current = None
        while not self.arrivals.empty():  # came after the last version was made
            proxy, fit = self.arrivals.get_nowait()
            self.pool.busy.pop(proxy.client_id, None)
            self.not_used(proxy, fit)
        await self.reports.settle()

    def open_buffer(self) -> VersionBuffer:
        central = self.privacy is not None and self.privacy.settings.mode == "central"
        buffer = VersionBuffer(self.rounds_done + 1, self.size, self.model.tensors,
                               clip=self.privacy.settings.clip if central else None,
                               noise_std=self.privacy.noise_std if central else 0.0, generator=self.generator)
        buffer.traffic_at_start = (self.traffic.sent, self.traffic.received)
        self.current = buffer
        sent = self.dispatch()
        self.events.emit(RoundStarted(buffer.number, 0, sent, sorted(self.pool.busy), 0))
        return buffer

    def new_version(self) -> None:
        """The newest model becomes the one clients are sent; versions too old to fold are let go."""
        version = self.rounds_done
        self.bases[version] = self.model
        for old in [v for v in self.bases if v < version - self.config.max_staleness]:
            del self.bases[old]
        self.instructions = FitIns(version + 1, self.model, self.fit_settings(version + 1))

    def dispatch(self) -> list[int]:
        """Send the newest version to idle clients that have not trained on it, at most C training at once;
        which of them, when more wait than there is room for, is drawn by an RNG seeded from (seed, version,
        dispatch). The ids sent it."""
        pool, version = self.pool, self.rounds_done
        room = self.strategy.clients_to_pick(len(pool.members)) - len(pool.busy)
        waiting = [i for i in pool.idle() if self.ready_from.get(i, 0) <= version]
        if room <= 0 or not waiting:
            return []
        if len(waiting) > room:
            rng = np.random.default_rng([self.config.seed, version, self.dispatches])
            waiting = sorted(int(i) for i in rng.choice(waiting, size=room, replace=False))
        self.dispatches += 1
        for client_id in waiting:
            self.ready_from[client_id] = version + 1  # at most once per version
            self.start_fit(pool.members[client_id], self.instructions)
        return waiting

    async def next_arrival(self, buffer: VersionBuffer) -> tuple | None:
        """The next finished fit; None when none came within --round-timeout. Clients that become idle or
        join meanwhile are sent the newest version. Raises Stopped on a stop request."""
        loop, stopping = asyncio.get_running_loop(), self.control.stopping
        deadline = loop.time() + self.config.round_timeout_s
        while self.arrivals.empty():
            self.dispatch()
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            self.pool.changed.clear()
            waiters = [asyncio.ensure_future(self.arrivals.get()), asyncio.ensure_future(self.pool.changed.wait()),
                       asyncio.ensure_future(stopping.wait())]
            await asyncio.wait(waiters, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters[1:]:
                waiter.cancel()
            if waiters[0].done():
                if stopping.is_set():
                    self.fold(buffer, *waiters[0].result())  # it arrived: acknowledge it before stopping
                    raise Stopped
                return waiters[0].result()
            waiters[0].cancel()
            if stopping.is_set():
                raise Stopped
        return self.arrivals.get_nowait()

    def fold(self, buffer: VersionBuffer, proxy: ClientProxy, fit: asyncio.Future) -> None:
        """One finished fit: a drop, an update too stale to use, or an update into the buffer."""
        client_id = proxy.client_id
        self.pool.busy.pop(client_id, None)  # free for the next dispatch only now, with its update counted
        self.pool.changed.set()
        if fit.exception() is not None:  # no update: it may try the newest version once more (a client back
            if self.retried.get(client_id) != self.rounds_done:  # from a drop); only once, or a client that
                self.retried[client_id] = self.rounds_done  # fails at once each time would be sent it forever
                self.ready_from[client_id] = self.rounds_done
            self.tell(ClientDropped(buffer.number, client_id, str(fit.exception())))
            return
        result: FitRes = fit.result()
        base = result.round - 1
        staleness = self.rounds_done - base
        try:
            if staleness > self.config.max_staleness or base not in self.bases:
                self.ready_from[client_id] = self.rounds_done  # it may train the newest version at once
                reason = (f"this update started from version {base}, {staleness} versions behind the newest "
                          f"({self.rounds_done}); the server uses none more than {self.config.max_staleness} behind "
                          f"(--max-staleness): it was not used")
                proxy.acknowledge(result, False, reason)
                self.events.emit(UpdateDiscarded(buffer.number, client_id, reason))
                return
            weight = staleness_weight(staleness, self.config.staleness_weight)
            buffer.add(client_id, self.bases[base].tensors, result.tensors, staleness, weight, result.num_examples,
                       result.metrics)
        finally:
            result.release()
            result.tensors = {}  # views of a buffer that is reused now
        self.ready_from[client_id] = max(self.ready_from.get(client_id, 0), buffer.number)  # one update per version
        proxy.acknowledge(result, True, f"update accepted into version {buffer.number} (staleness {staleness}, "
                                        f"weight {weight:.3g})")
        self.tell(UpdateAccepted(buffer.number, client_id, result.num_examples,
                                 {**result.metrics, "staleness": staleness}))

    def step(self, buffer: VersionBuffer) -> dict[str, Any]:
        """The next version from the buffer; its row of metrics.csv, to report."""
        buffer.open = False
        mean_delta = buffer.mean_delta()
        current = self.model.tensors
        if self.strategy.name in PLAIN_STEP:
            tensors = plain_step(current, mean_delta, self.strategy.server_lr)
        else:  # the server optimiser's own step, on the pseudo-gradient Σ/K
            tensors = self.strategy.step(current, plain_step(current, mean_delta, 1.0))
        self.model = GlobalModel.of(tensors, self.config.compress_broadcast)
        self.rounds_done = buffer.number
        row = {**buffer.row(), "bytes_sent": self.traffic.sent - buffer.traffic_at_start[0],
               "bytes_received": self.traffic.received - buffer.traffic_at_start[1], **self.control.session_columns()}
        if self.privacy is not None:  # one Gaussian mechanism over every ready client: no amplification claimed
            row["epsilon"] = self.privacy.record(len(self.pool.members), self.size, 1.0)
        self.new_version()
        return row

    def say_nothing_arrived(self, buffer: VersionBuffer, waits: int) -> None:
        retries, timeout = self.config.round_retries, self.config.round_timeout_s
        if waits > retries:
            raise RunFailed(f"version {buffer.number}: no update arrived in {waits} waits of {timeout:g} s "
                            f"({buffer.count} of {self.size} in the buffer); the last good model is version "
                            f"{self.rounds_done}")
        self.events.emit(Notice(f"version {buffer.number}: no update arrived in {timeout:g} s ({buffer.count} of "
                                f"{self.size} in the buffer, {len(self.pool.busy)} client(s) training); waiting again "
                                f"(retry {waits} of {retries})", warning=True))

    def fit_finished(self, proxy: ClientProxy, number: int, fit: asyncio.Future) -> None:
        """A client's fit ended: its update goes to the loop (the client stays busy until it is folded,
        so that it is not sent the newest version before its update is counted against it), or, once the
        session's versions are done, is acknowledged as not used."""
        if not fit.cancelled() and self.current is not None and self.current.open:
            self.arrivals.put_nowait((proxy, fit))
            self.pool.changed.set()
            return
        self.pool.busy.pop(proxy.client_id, None)
        self.pool.changed.set()
        if not fit.cancelled():
            self.not_used(proxy, fit)

    def not_used(self, proxy: ClientProxy, fit: asyncio.Future) -> None:
        if fit.exception() is None:
            result: FitRes = fit.result()
            result.release()
            reason = (f"the session had made its last version ({self.rounds_done}) before this update arrived; "
                      f"it was not used")
            proxy.acknowledge(result, False, reason)
            self.events.emit(UpdateDiscarded(result.round, proxy.client_id, reason))


def engine_class(config) -> type[RoundEngine]:
    """The engine a run's settings ask for: rounds, or versions (--async-buffer)."""
    return BufferedEngine if config.async_buffer else RoundEngine
