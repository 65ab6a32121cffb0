"""The round engine: what the server does every round, read top-down in `RoundEngine.fit_round`.

    1. sample     the strategy picks which ready clients train (all of them by default);
    2. send       each picked client's proxy gets the global model (`ClientProxy.fit`: over a
                  socket for fedsock.lobby.RemoteClient, in this process for a virtual client);
    3. collect    each update is folded into the round's aggregate as it arrives (`collect`);
    4. aggregate  once every picked client has answered, dropped, or the round timed out;
    5. step       the strategy makes the next global model (`Strategy.step`), and the next round
                  starts at once, while this one's evaluation and report run in a worker thread.

The engine knows its clients only as `ClientProxy` objects (fedsock/clients.py), asks
`RunControl` (fedsock/run_control.py) when to train, and prints nothing and writes no file:
it emits events (fedsock/events.py), and the console, the run's files and the dashboard
observe them. So the same engine runs a socket federation and a simulation, and its rounds
are tested with fake clients in milliseconds (tests/test_engine.py).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from fedsock.attack import UpdateRecorder
from fedsock.clients import ClientPool, ClientProxy, Dropped, FitIns, FitRes, GlobalModel, Stopped
from fedsock.config import ServerConfig
from fedsock.console import ExitStatus, FedsockError
from fedsock.evaluation import FederatedEvaluation
from fedsock.events import (ClientDropped, Event, Events, MetricsUpdated, Notice, RoundFailed, RoundStarted,
                            RunFinished, UpdateAccepted, UpdateDiscarded, drop_line, id_ranges)
from fedsock.reports import RoundReports
from fedsock.run_control import RunControl
from fedsock.run_files import Checkpoint, OutputFailed
from fedsock.secagg import SecAggError, SecureAggregation
from fedsock.strategies import Strategy
from fedsock.tasks import Task
from fedsock.transport import Traffic
from fedsock.virtual_time import virtual_now


class RunFailed(FedsockError):
    """The federation cannot go on (too many failed rounds)."""


@dataclass
class Round:
    """One attempt at a round: who is expected, what came in, and the aggregate so far. Its
    `collect` loop folds each finished fit as it arrives (streaming aggregation: an update's
    buffer goes back to the transport the moment it is added)."""

    number: int
    attempt: int
    started: float
    traffic_at_start: tuple[int, int]
    tell: Callable[[Event], None]  # the engine's: emit an event (and keep a drop's line)
    expected: set[int] = field(default_factory=set)
    aggregator: Any = None  # the strategy's, or the run's SecureAggregation
    federated: FederatedEvaluation | None = None
    recorder: UpdateRecorder | None = None  # --record-updates: each update as the server holds it
    enough: int | None = None  # --over-select: the updates that close the round (None: every one expected)
    closed_early: set[int] = field(default_factory=set)  # the engine's: rounds closed with `enough`
    population: int = 0  # ready, free clients when the round sampled
    picked: int = 0
    planned: float = 0.0  # the clients it planned for (DP's fixed denominator)
    reported: dict[int, dict[str, Any]] = field(default_factory=dict)  # id -> num_examples and metrics
    dropped: dict[int, str] = field(default_factory=dict)  # id -> why
    arrivals: asyncio.Queue = field(default_factory=asyncio.Queue)  # (proxy, finished fit)
    open: bool = True
    deadline: float | None = None  # on the event loop's clock; None until `start_clock`
    timeout_s: float = 0.0
    seconds: float = 0.0  # from the first byte of the model sent to the round's close

    def complete(self) -> bool:
        if self.enough is not None and len(self.reported) >= self.enough:
            return True  # over-selected: the rest are not needed
        return self.expected <= self.reported.keys() | self.dropped.keys()

    def start_clock(self, timeout_s: float) -> None:
        """The round's time runs from now (once the last round's report is done), for `timeout_s`."""
        self.timeout_s = timeout_s
        self.deadline = asyncio.get_running_loop().time() + timeout_s
        self.arrivals.put_nowait(None)  # wakes `collect`, to look at the deadline

    async def collect(self, stopping: asyncio.Event) -> None:
        """Fold each update as it arrives, until every expected client has answered or dropped, or the
        round's time is up (`start_clock`); then close the round. Raises Stopped on a stop request."""
        loop = asyncio.get_running_loop()
        try:
            while not self.complete() and not stopping.is_set():
                remaining = None if self.deadline is None else self.deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    break
                arrival, stop = asyncio.ensure_future(self.arrivals.get()), asyncio.ensure_future(stopping.wait())
                await asyncio.wait([arrival, stop], timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                if not arrival.done():
                    arrival.cancel()  # the time is up, or a stop was asked for: the loop's test says which
                elif arrival.result() is not None:  # None: the clock started
                    self.fold(*arrival.result())
        finally:
            while not self.arrivals.empty():  # arrived before the close (or the stop): still this round's
                if (arrival := self.arrivals.get_nowait()) is not None:
                    self.fold(*arrival)
        if stopping.is_set():
            raise Stopped
        self.open = False
        self.seconds = time.perf_counter() - self.started
        rest = sorted(self.expected - self.reported.keys() - self.dropped.keys())
        if rest and self.enough is not None and len(self.reported) >= self.enough:  # over-selected: not drops
            self.closed_early.add(self.number)
            self.tell(Notice(f"round {self.number}: closed with the {self.enough} updates it needed; client(s) "
                             f"{id_ranges(rest)}, over-selected and still training, will hear theirs was not needed"))
            return
        for client_id in rest:
            self.tell(ClientDropped(self.number, client_id, f"{self.timeout_s:g} s", timed_out=True))

    def fold(self, proxy: ClientProxy, fit: asyncio.Future) -> None:
        """One client's finished fit: its update into the aggregate, or its drop into the round."""
        client_id = proxy.client_id
        if fit.exception() is not None:
            exc = fit.exception()
            reason = str(exc) if isinstance(exc, Dropped) else f"internal error: {type(exc).__name__}: {exc}"
            if client_id in self.expected and client_id not in self.reported:
                self.drop(client_id, reason)
            return
        result: FitRes = fit.result()
        try:
            if isinstance(self.aggregator, SecureAggregation):
                try:
                    self.aggregator.add(client_id, result.tensors, result.num_examples)
                except (SecAggError, KeyError) as exc:
                    self.drop(client_id, f"secure aggregation: {exc}")
                    return
            else:
                if self.recorder is not None:
                    self.recorder.update(self.number, client_id, result.tensors, result.num_examples)
                self.aggregator.add(result.tensors, result.num_examples)
        finally:
            result.release()
            result.tensors = {}  # views of a buffer that is reused now
        self.expected.add(client_id)
        self.reported[client_id] = {"num_examples": result.num_examples, **result.metrics}
        if "eval_confusion" in result.metrics and self.federated is not None:
            self.federated.note(result.metrics["eval_round"], result.metrics["eval_loss_sum"],
                                result.metrics["eval_confusion"])
        proxy.acknowledge(result, True, "update accepted")
        self.tell(UpdateAccepted(self.number, client_id, result.num_examples, result.metrics))

    def drop(self, client_id: int, reason: str) -> None:
        self.dropped[client_id] = reason
        self.tell(ClientDropped(self.number, client_id, reason))

    def take_notes(self, secure: SecureAggregation) -> None:
        """What secure aggregation's stages saw: the drops (a client gone at a key or share stage), and
        the warnings (a bad share left out in the unmasking)."""
        for client_id, reason in secure.notes:
            if client_id not in self.dropped:
                self.drop(client_id, reason)
        for line in secure.warnings:
            self.tell(Notice(f"round {self.number}: {line}", warning=True))
        secure.notes.clear()
        secure.warnings.clear()

    def row(self, traffic: Traffic) -> dict[str, Any]:
        """The round's line of metrics.csv, before its model is evaluated."""
        updates = list(self.reported.values())
        examples = sum(u["num_examples"] for u in updates) or 1  # a DP round may release noise alone
        return {
            "round": self.number,
            "clients": len(updates),
            "expected": len(self.expected),
            "train_loss": sum(u["train_loss"] * u["num_examples"] for u in updates) / examples,
            "seconds": self.seconds,
            "bytes_sent": traffic.sent - self.traffic_at_start[0],
            "bytes_received": traffic.received - self.traffic_at_start[1],
            "max_fit_seconds": max([u["fit_seconds"] for u in updates], default=0.0),
            "sum_fit_seconds": sum(u["fit_seconds"] for u in updates),
            "virtual_seconds": virtual_now(),  # a simulation's virtual clock (None in real time)
        }


def budget_words(privacy, rounds_done: int, num_rounds: int) -> str:
    return (f"the privacy budget (epsilon {privacy.budget:g} at delta {privacy.settings.delta:g}) allows no more "
            f"rounds: stopped after round {rounds_done} of {num_rounds}")


def stop_words(phase: str, rounds_done: int) -> tuple[str, str]:
    """When a stopped run stopped, and what that leaves it: for its notice and its last message."""
    if rounds_done:
        return f"after round {rounds_done}", f"after round {rounds_done}; it can resume from its checkpoint"
    when = "before training started" if phase == "lobby" else "before its first round completed"
    return when, "before any round completed; there is no checkpoint to resume from"


def clients_needed(config: ServerConfig, strategy: Strategy, secure: SecureAggregation | None) -> int:
    """Ready clients a round waits for; with secure aggregation at least 3, since with two, each
    could subtract its own update from the new model."""
    return max(config.min_clients, strategy.min_updates(), 3 if secure is not None else 0)


def release_at(config: ServerConfig, strategy: Strategy, needed: int) -> int:
    """Updates a round needs to be released. With DP and Poisson sampling, every sampled round is
    released, whatever arrived (even noise alone): the accountant's analysis is of exactly that."""
    poisson_dp = strategy.privacy is not None and strategy.sampled and config.sampling == "poisson"
    return 0 if poisson_dp else needed


def final_words(last: dict[str, Any]) -> str:
    """The end of the run's last line: its final accuracy, on the server's test set or the clients'."""
    if last.get("test_accuracy") is not None:
        return f"; final test accuracy {100 * last['test_accuracy']:.2f}%"
    if last.get("fed_accuracy") is not None:
        return f"; final accuracy on the clients' test splits {100 * last['fed_accuracy']:.2f}%"
    return ""


class RoundEngine:
    """Every round: sample, send, collect, aggregate, step; and the run around the rounds."""

    def __init__(self, config: ServerConfig, strategy: Strategy, pool: ClientPool, model: GlobalModel,
                 evaluate: Callable[[dict], dict[str, float]], events: Events, traffic: Traffic,
                 resumed: Checkpoint | None = None, secure: SecureAggregation | None = None,
                 task: Task | None = None, federated_evaluation: bool = False, output_dir: str = "", recorder=None):
        self.config, self.strategy, self.pool, self.model = config, strategy, pool, model
        self.events, self.traffic, self.output_dir, self.task = events, traffic, output_dir, task
        self.rounds_done = resumed.round if resumed else 0
        self.secure, self.recorder = secure, recorder  # --secure-aggregation, --record-updates
        needed = clients_needed(config, strategy, secure)
        self.control = RunControl(config, pool, events, needed, lambda: self.rounds_done, resumed and resumed.metrics)
        self.privacy = strategy.privacy
        self.release_at = release_at(config, strategy, needed)
        self.reports = RoundReports(config, events, evaluate, list(resumed.metrics) if resumed else [], self.privacy,
                                    task)
        self.federated = FederatedEvaluation(events, task) if federated_evaluation else None
        self.current: Round | None = None
        self.picked_round: int | None = None  # a round whose clients are picked, until it is aggregated or retried
        self.budget_spent = False
        self.drops: list[str] = []
        self.closed_early: set[int] = set()  # rounds that --over-select closed once they had enough updates

    @property
    def needed(self) -> int:
        return self.control.needed

    def next_round(self, client_id: int) -> int:
        """<METADATA>'s next_round for a client joining now: the first round that picks its clients after now
        (if the round under way fails, its retry picks afresh under the same number)."""
        return self.rounds_done + (2 if self.picked_round == self.rounds_done + 1 else 1)

    @property
    def metrics(self) -> list[dict[str, Any]]:
        return self.reports.metrics

    # ---- the run
    async def run(self) -> int:
        """The whole run; its exit status."""
        control = self.control
        try:
            await control.wait_for_start()
            await self.train()
            while self.config.stay and not self.budget_spent and await control.next_session():
                await self.train()
        except Stopped:
            when, then = stop_words(control.phase, self.rounds_done)
            self.events.notice(f"{control.stop_reason}: stopping {when}")
            await self.finish(False, f"the server was stopped ({control.stop_reason}) {then}")
            return ExitStatus.TERMINATED if control.stop_reason == "SIGTERM" else ExitStatus.INTERRUPTED
        except (RunFailed, OutputFailed) as exc:
            await self.finish(False, str(exc))
            raise
        finally:
            self.reports.close()
        if self.budget_spent:
            await self.finish(False, budget_words(self.privacy, self.rounds_done, self.config.num_rounds))
            return ExitStatus.OK
        sessions = f" in {control.session} sessions" if control.session > 1 else ""
        await self.finish(True, f"training finished after {self.rounds_done} rounds{sessions}")
        return ExitStatus.OK

    async def train(self) -> None:
        """Rounds until --num-rounds; a round with too few updates is retried with the same model."""
        failures = 0
        while self.rounds_done < self.config.num_rounds:
            number = self.rounds_done + 1
            round_ = await self.fit_round(number, failures)
            if round_ is None:
                break  # the privacy budget is spent
            enough = round_.aggregator is not None and len(round_.reported) >= self.release_at
            aggregate = await self.aggregate(round_) if enough else None
            self.picked_round = None  # from here, the round is done (rounds_done moves on below) or retried
            if aggregate is None:  # too few updates (or the unmasking failed): the same model again
                failures += 1
                give_up = failures > self.config.round_retries
                self.events.emit(RoundFailed(number, len(round_.reported), self.needed, 0 if give_up else failures,
                                             self.config.round_retries))
                if give_up:
                    raise RunFailed(f"round {number} failed {failures} times; the last good model is round "
                                    f"{self.rounds_done}")
                continue
            failures = 0
            self.model = GlobalModel.of(self.strategy.step(self.model.tensors, aggregate), self.config.compress_broadcast)
            self.rounds_done = number
            if self.federated is not None:  # what this round's clients measured of the last round's model
                self.federated.attach(number - 1, self.metrics)
            row = {**round_.row(self.traffic), **self.control.session_columns()}
            if self.privacy is not None:
                row["epsilon"] = self.privacy.record(round_.population, round_.picked,
                                                     self.strategy.sampling_rate(round_.population))
            self.reports.start(row, self.model, dict(self.strategy.state))
        await self.reports.settle()
        if self.federated is not None and not self.control.stopping.is_set():
            await self.evaluate_final_model()

    # ---- one round
    async def fit_round(self, number: int, attempt: int) -> Round | None:
        """One round's story: sample, send, collect. The caller aggregates. None: the privacy budget
        would not allow this round."""
        pool, stopping = self.pool, self.control.stopping
        round_ = Round(number, attempt, time.perf_counter(), (self.traffic.sent, self.traffic.received), self.tell,
                       federated=self.federated, closed_early=self.closed_early)
        # A retried round keeps the same model, so a client still training it from an earlier
        # attempt is as good as one picked now: it is expected too. (Not with DP: there, a round's
        # participants are exactly its fresh sample, as the accountant assumes.)
        carried = lambda: ([] if self.privacy or self.secure  # noqa: E731
                           else [i for i, r in pool.busy.items() if r == number])
        # 1. sample
        if not await pool.wait_until(lambda: len(pool.idle()) + len(carried()) >= self.needed,
                                     self.config.round_timeout_s, stopping):
            return round_
        idle = pool.idle()
        if self.privacy is not None and self.privacy.would_exceed_budget(
                len(idle), self.strategy.clients_to_sample(len(idle)), self.strategy.sampling_rate(len(idle))):
            self.budget_spent = True
            return None
        picked = self.strategy.sample(idle, number, attempt)
        self.picked_round = number  # a client that joins from now on is first sent the next round
        round_.population, round_.picked = len(idle), len(picked)
        round_.planned, round_.enough = self.strategy.planned(len(picked), len(idle)), self.strategy.enough(len(idle))
        settings = self.fit_settings(number)
        round_.started = time.perf_counter()  # a secure round's time and bytes include its key and share stages
        round_.traffic_at_start = (self.traffic.sent, self.traffic.received)
        # The picked clients' proxies, held from here: one that leaves during the key stages is gone
        # from the pool, and its fit reports the drop.
        proxies = {i: pool.members[i] for i in picked}
        if self.secure is not None:  # keys and shares first, among the picked; then the model to those still here
            threshold = self.secure.threshold(len(picked))
            picked = await self.secure.setup(number, proxies)
            round_.take_notes(self.secure)
            picked = [i for i in picked if i not in round_.dropped]  # one gone at <SECAGG_ROUTED>: no model
            if stopping.is_set():
                raise Stopped
            if not picked:
                return round_
            round_.aggregator = self.secure
            if self.privacy is not None:
                settings.update(self.privacy.secure_fit_settings(threshold))
        else:
            round_.aggregator = self.strategy.aggregator(self.model.tensors, round_.planned)
        round_.expected = set(picked) | set(carried())
        round_.recorder = self.recorder.start(number, self.model.tensors, settings) if self.recorder else None
        # 2. send
        self.current = round_
        instructions = FitIns(number, self.model, settings, evaluate=self.federated is not None)
        for client_id in picked:
            self.start_fit(proxies[client_id], instructions)
        self.events.emit(RoundStarted(number, attempt, picked, sorted(round_.expected), len(idle) - len(picked)))
        # 3. collect, from now on (4. aggregate and 5. step follow in `train`). The round's time runs once
        # the last round's evaluation and files, which ran while this model went out, are done.
        collecting = asyncio.ensure_future(round_.collect(self.control.stopping))
        try:
            await self.reports.settle()
        except BaseException:
            collecting.cancel()  # what arrived is folded, then the failure ends the run
            await asyncio.gather(collecting, return_exceptions=True)
            raise
        round_.start_clock(self.config.round_timeout_s)
        await collecting
        self.current = None
        return round_

    def fit_settings(self, number: int) -> dict[str, Any]:
        """How the clients train this round: the <MODEL>'s fields beside the weights."""
        settings = {"local_epochs": self.config.local_epochs, "batch_size": self.config.batch_size,
                    "lr": self.config.round_lr(number), **self.strategy.fit_settings()}
        if self.config.augment != "none":  # absent otherwise: the <MODEL> of a plain run is as it always was
            settings["augment"] = self.config.augment
        return settings

    def start_fit(self, proxy: ClientProxy, instructions: FitIns) -> None:
        self.pool.busy[proxy.client_id] = instructions.round
        fit = asyncio.ensure_future(proxy.fit(instructions))
        fit.add_done_callback(lambda done: self.fit_finished(proxy, instructions.round, done))

    def fit_finished(self, proxy: ClientProxy, number: int, fit: asyncio.Future) -> None:
        """A client's fit ended. The client is free again at once; an update for the open round goes
        to that round's `collect`, and any other is late: acknowledged as not used, and let go."""
        self.pool.busy.pop(proxy.client_id, None)
        self.pool.changed.set()
        if fit.cancelled():
            return
        round_ = self.current
        if round_ is not None and round_.open and round_.number == number:
            round_.arrivals.put_nowait((proxy, fit))
        elif fit.exception() is None:
            result: FitRes = fit.result()
            result.release()
            why = "it had all it needed: this update was not needed" if number in self.closed_early else "it was not used"
            proxy.acknowledge(result, False, f"round {number} had closed before this update arrived; {why}")
            self.events.emit(UpdateDiscarded(number, proxy.client_id, f"late update for round {number} discarded"))

    def tell(self, event: Event) -> None:
        """Emit a round's event; a drop's line is kept for the end-of-run summary too."""
        if isinstance(event, ClientDropped):
            self.drops.append(f"{time.strftime('%H:%M:%S')} {drop_line(event)}")
        self.events.emit(event)

    # ---- secure aggregation
    async def aggregate(self, round_: Round) -> dict[str, torch.Tensor] | None:
        """The round's aggregate; with secure aggregation, after the unmasking (None: it failed)."""
        if self.secure is None:
            return round_.aggregator.result()
        result = await self.secure.finish(self.model.tensors, max(round_.planned, 1e-12))
        round_.seconds = time.perf_counter() - round_.started  # the unmasking is part of the round
        round_.take_notes(self.secure)
        if isinstance(result, str):
            self.events.notice(f"round {round_.number}: secure aggregation failed: {result}", warning=True)
            return None
        if round_.recorder is not None:  # all that a server holds under secure aggregation
            round_.recorder.aggregate(round_.number, result, round_.reported)
        return result

    async def evaluate_final_model(self) -> None:
        """The clients' evaluation of the last model: no round follows to carry it, so ask for it."""
        await self.reports.settle()
        proxies = [self.pool.members[i] for i in self.pool.idle()]
        if not proxies or not self.metrics:
            return
        await self.federated.ask(proxies, self.rounds_done, self.model, self.config.round_timeout_s)
        self.federated.attach(self.rounds_done, self.metrics)
        self.events.emit(MetricsUpdated(self.reports.checkpoint(self.metrics[-1]["round"], self.model,
                                                                dict(self.strategy.state))))
        await self.events.flush()

    async def finish(self, completed: bool, message: str) -> None:
        """Close any round in progress, let the report and files finish, tell every client the run is over."""
        self.control.phase = "finished"
        if self.current is not None:
            self.current.open = False
            self.current = None  # clients that leave now were told to: not drops
        failure = None
        try:
            await self.reports.settle()
        except OutputFailed as exc:
            failure = exc
        message += final_words(self.metrics[-1] if self.metrics else {})
        self.events.emit(RunFinished(completed, self.rounds_done, message, self.output_dir, list(self.drops)))
        try:
            await self.events.flush()
        except OutputFailed as exc:
            failure = failure or exc
        if failure is not None and str(failure) not in message:
            message, completed = f"{message}; {failure}", False
        await asyncio.gather(*(c.finish(completed, self.rounds_done, message) for c in list(self.pool.connected.values())))
        if failure is not None:
            raise failure
