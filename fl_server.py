"""fedsock server: waits for clients, then runs rounds of federated learning.

One round, as a student would follow it (`RoundEngine.fit_round` below):
  1. sample     the strategy picks which ready clients train (all of them by default);
  2. send       each picked client gets the global model, encoded once for all of them
                (`RemoteClient.fit` in fedsock/lobby.py frames it; fl_client.py trains
                on it and answers with an <UPDATE>);
  3. collect    each client's reader (`RemoteClient.receive_update`) checks its update,
                and `fit_done` folds it into the round's aggregate the moment it arrives;
  4. aggregate  once every picked client has answered, dropped, or the round timed out;
  5. step       the strategy makes the next global model (`Strategy.step`: a plain mean,
                server momentum, Adam, ...), and the next round starts at once, while the
                evaluation of this one and its report run in a worker thread.

The engine knows its clients only as `ClientProxy` objects (fedsock/clients.py); the
sockets live in fedsock/lobby.py, the console lines and files are observers of the
run's events (fedsock/events.py, fedsock/run_files.py).

    python fl_server.py --num-rounds 10 --time-to-wait 10
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import functools
import ipaddress
import json
import math
import os
import resource
import signal
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import client_helper
import neural_net_helper as nnh
from fedsock import compression, secagg
from fedsock import config as settings
from fedsock import security
from fedsock.clients import ClientPool, ClientProxy, Dropped, EvalRes, FitIns, FitRes, GlobalModel, Stopped, wait_any
from fedsock.config import ServerConfig
from fedsock.console import ArgumentParser, ExitStatus, FedsockError, HelpFormatter, UsageError, run_main, say, warn
from fedsock.events import (
    ClientDropped,
    Console,
    Events,
    FederatedEvaluation,
    Listening,
    MetricsUpdated,
    RoundFailed,
    RoundFinished,
    RoundSaved,
    RoundStarted,
    RunFinished,
    SessionFinished,
    TrainingStarted,
    UpdateAccepted,
    UpdateDiscarded,
    drop_line,
)
from fedsock.lobby import RECEIVE_BUFFERS, Lobby, ReceiveBuffers
from fedsock.own_data import load_own_data
from fedsock.privacy import Accountant, Privacy, PrivacySettings, default_delta, plan_noise_multiplier
from fedsock.secagg import SecAggError, SecureAggregation
from fedsock.tasks import Task, make_task, task_of_dataset
from fedsock.run_files import Checkpoint, OutputFailed, RunFiles, read_checkpoint
from fedsock.strategies import ROBUST, STRATEGIES, Strategy, StrategySettings
from fedsock.transport import Traffic
from socket_methods import ProtocolError, check_finite, check_layout, encode_bitmap, weights_layout

WHO = "server"


class RunFailed(FedsockError):
    """The federation cannot go on (too many failed rounds)."""


# --------------------------------------------------------------------------- flags


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="fl_server.py",
        description="fedsock server: federated learning over plain TCP (or TLS).",
        epilog="strategies (--strategy):\n" + "\n".join(f"  {name:<13} {what}" for name, what in STRATEGIES.items()),
        formatter_class=HelpFormatter,
    )
    settings.add_settings(parser, ServerConfig)
    parser.add_argument("--use-cuda", action=argparse.BooleanOptionalAction, default=None,
                        help="the original tool's switch: same as --device cuda / --device cpu")
    parser.add_argument("--traceback", action="store_true", help="show a full traceback on errors (for bug reports)")
    return parser


# Flags that only one kind of strategy reads: given with another, they would silently do nothing.
STRATEGY_FLAGS = {
    "proximal_mu": ("fedprox",), "server_momentum": ("fedavgm",), "server_lr": ("fedavgm", "fedadam", "fedyogi", "fedadagrad"),
    "beta1": ("fedadam", "fedyogi", "fedadagrad"), "beta2": ("fedadam", "fedyogi"), "tau": ("fedadam", "fedyogi", "fedadagrad"),
    "trim_fraction": ("trimmed-mean",), "byzantine_clients": ("krum", "multi-krum"),
}


def parse_config(argv: list[str] | None) -> tuple[ServerConfig, Checkpoint | None]:
    """Flags to a config; with --resume, the checkpoint's settings under the flags given now."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    given = settings.given_flags(build_parser, argv)
    use_cuda = args.pop("use_cuda")
    args.pop("traceback")
    if use_cuda is not None:
        if "device" in given and args["device"] != ("cuda" if use_cuda else "cpu"):
            parser.error("--use-cuda/--no-use-cuda contradicts --device")
        args["device"] = given["device"] = "cuda" if use_cuda else "cpu"
    if args["task"] == "text" and "model" not in given:
        args["model"] = "textcnn"
    config, checkpoint = ServerConfig(**args), None
    if config.resume:
        if config.initial_model:
            parser.error("--initial-model and --resume do not go together: a resumed run continues its own model")
        checkpoint = read_checkpoint(config.resume)
        config = settings.resumed(config, checkpoint.config, given, args)
    check_config(config, given, parser)
    return config, checkpoint


def check_config(config: ServerConfig, given: dict[str, Any], parser: argparse.ArgumentParser) -> None:
    """Flags that make no sense together are one line each, before anything starts."""
    if config.min_clients > config.num_clients:
        parser.error(f"--min-clients {config.min_clients} is more than --num-clients {config.num_clients}")
    if config.clients_per_round is not None and config.fraction_fit is not None:
        parser.error("use --clients-per-round or --fraction-fit, not both")
    if config.clients_per_round is not None:
        if config.clients_per_round > config.num_clients:
            parser.error(f"--clients-per-round {config.clients_per_round} is more than --num-clients {config.num_clients}")
        if config.clients_per_round < config.min_clients:
            parser.error(f"--clients-per-round {config.clients_per_round} is below --min-clients {config.min_clients}: "
                         f"no round could get enough updates")
    for name, strategies in STRATEGY_FLAGS.items():
        if name in given and config.strategy not in strategies:
            parser.error(f"--{name.replace('_', '-')} applies to --strategy {' or '.join(strategies)}, "
                         f"not {config.strategy}")
    task_flags = [name for name in ("classes", "positive_class", "image_size", "channels", "image_mean", "image_std",
                                    "max_tokens", "buckets", "test_data", "max_client_examples") if name in given]
    kind = "text" if config.task == "text" else "image"
    if config.task == "dataset":
        if task_flags:
            parser.error(f"--{task_flags[0].replace('_', '-')} applies to --task image or text (clients with their "
                         f"own data), not to --task dataset")
    else:
        if not config.classes:
            parser.error(f"--task {config.task} needs --classes, e.g. --classes ham,spam")
        wrong = [name for name in ("dataset", "partition", "alpha", "data_root") if name in given]
        if wrong:
            parser.error(f"--{wrong[0].replace('_', '-')} applies to --task dataset; with --task {config.task} each "
                         f"client brings its own data")
    if not nnh.model_fits(config.model, kind):
        parser.error(f"--model {config.model} is for {'text' if kind == 'image' else 'images'}; a {kind} task needs "
                     f"{' or '.join(nnh.TEXT_MODELS if kind == 'text' else nnh.IMAGE_MODELS)}")
    if config.augment != "none" and kind == "text":
        parser.error(f"--augment {config.augment} is for images; a text task has none to turn")
    dp_flags = [name for name in ("dp_noise_multiplier", "dp_epsilon", "dp_delta", "dp_mode") if name in given]
    if config.dp_clip is None and dp_flags:
        parser.error(f"--{dp_flags[0].replace('_', '-')} needs --dp-clip S, which turns client-level DP on")
    if config.dp_clip is not None:
        if (config.dp_noise_multiplier is None) == (config.dp_epsilon is None):
            parser.error("client-level DP needs either --dp-noise-multiplier Z or a budget --dp-epsilon E (one of them)")
        if config.strategy in ROBUST:
            parser.error(f"--strategy {config.strategy} does not go with --dp-clip: the DP guarantee is for the "
                         f"noised mean of clipped updates, and {config.strategy} is not a mean")
        if config.dp_delta is not None and config.dp_delta >= 1 / config.num_clients:
            parser.error(f"--dp-delta {config.dp_delta:g} is not below 1/N = {1 / config.num_clients:g}: a guarantee "
                         f"that may fail for one client in N protects no one")
    if config.dashboard is not None:
        from fedsock.dashboard import parse_address

        try:
            parse_address(config.dashboard)
        except ValueError as exc:
            parser.error(f"--dashboard {exc}")
    secagg_flags = [name for name in ("secagg_threshold", "secagg_clip") if name in given]
    if secagg_flags and not config.secure_aggregation:
        parser.error(f"--{secagg_flags[0].replace('_', '-')} needs --secure-aggregation")
    if config.dp_mode == "distributed" and not config.secure_aggregation:
        parser.error("--dp-mode distributed needs --secure-aggregation: the clients' shares of the noise protect "
                     "only a sum the server cannot see into")
    if config.secure_aggregation:
        if config.strategy in ROBUST:
            parser.error(f"--strategy {config.strategy} does not go with --secure-aggregation: it needs each "
                         f"client's update, and secure aggregation shows the server only their sum")
        if config.compression != "none":
            parser.error("--compression does not go with --secure-aggregation: a masked update is uniform 32-bit "
                         "words, which no encoding shrinks")
        if config.sampling == "poisson":
            parser.error("--sampling poisson does not go with --secure-aggregation: a Poisson round may pick fewer "
                         "clients than the threshold t; use --sampling fixed")
    if config.sampling == "poisson" and config.clients_per_round is None and config.fraction_fit is None:
        parser.error("--sampling poisson needs --fraction-fit C (or --clients-per-round K: a rate of K/N)")
    if config.strategy in ("krum", "multi-krum"):
        needed = 2 * config.byzantine_clients + 3
        if max(config.min_clients, needed) > min(config.clients_per_round or config.num_clients, config.num_clients):
            parser.error(f"{config.strategy} with --byzantine-clients {config.byzantine_clients} needs at least "
                         f"{needed} updates a round (n >= 2f + 3, Blanchard et al. 2017): raise the clients per round")


def strategy_settings(config: ServerConfig) -> StrategySettings:
    names = StrategySettings.__dataclass_fields__
    return StrategySettings(**{name: getattr(config, name) for name in names})


# --------------------------------------------------------------------------- the rounds


@dataclass
class Round:
    """One attempt at a round: who is expected, what came in, and the aggregate so far."""

    number: int
    attempt: int
    expected: set[int]
    aggregator: Any
    started: float
    traffic_at_start: tuple[int, int]
    population: int = 0  # ready, free clients when the round sampled
    picked: int = 0
    planned: float = 0.0  # the clients it planned for (DP's fixed denominator)
    reported: dict[int, dict[str, Any]] = field(default_factory=dict)  # id -> num_examples and metrics
    dropped: dict[int, str] = field(default_factory=dict)  # id -> why
    complete: asyncio.Event = field(default_factory=asyncio.Event)
    open: bool = True
    seconds: float = 0.0  # from the first byte of the model sent to the round's close

    def settle(self) -> None:
        if self.expected <= self.reported.keys() | self.dropped.keys():
            self.complete.set()


class RoundEngine:
    """When training starts, and then every round: sample, send, collect, aggregate, step.

    It talks to clients only through the pool's ClientProxy objects, and tells the world
    what happens only through events, so the same engine runs a socket federation and a
    simulation, and its rounds can be tested with fake clients in milliseconds."""

    def __init__(self, config: ServerConfig, strategy: Strategy, pool: ClientPool, model: GlobalModel,
                 evaluate: Callable[[dict], dict[str, float]], events: Events, traffic: Traffic,
                 resumed: Checkpoint | None = None, output_dir: str = "", secure: SecureAggregation | None = None):
        self.config, self.strategy, self.pool, self.model = config, strategy, pool, model
        self.evaluate, self.events, self.traffic, self.output_dir = evaluate, events, traffic, output_dir
        self.rounds_done = resumed.round if resumed else 0
        self.metrics: list[dict[str, Any]] = list(resumed.metrics) if resumed else []
        self.needed = max(config.min_clients, strategy.min_updates())  # ready clients a round waits for
        self.secure = secure  # --secure-aggregation
        if secure is not None:  # with two clients, each could subtract its own update from the new model
            self.needed = max(self.needed, 3)

        self.privacy = strategy.privacy
        # Updates a round needs to be released. With DP and Poisson sampling, every sampled round is
        # released, whatever arrived (even noise alone): the accountant's analysis is of exactly that.
        poisson_dp = self.privacy is not None and strategy.sampled and config.sampling == "poisson"
        self.release_at = 0 if poisson_dp else self.needed
        self.current: Round | None = None
        self.reporting: asyncio.Future | None = None  # the last round's evaluation and files
        self.stopping = asyncio.Event()
        self.stop_reason = ""
        self.crash: Exception | None = None  # a bug in a callback (fit_done): raised from the round
        self.budget_spent = False
        self.task: Task | None = None  # set by the caller: the classes, for the clients' evaluations
        self.federated_evaluation = False
        self.evaluations: dict[int, list] = {}  # round -> [clients, loss sum, confusion] of the clients' own tests
        self.drops: list[str] = []
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="evaluate")
        # --start manual and --stay: the lobby waits for `launch`; between sessions, for `more`
        self.phase = "lobby"  # lobby, training, between sessions, finished
        self.launch = asyncio.Event()
        self.more = asyncio.Event()
        self.more_rounds = 0
        self.session = 1
        self.session_start = self.rounds_done  # the rounds done when this session began

    def request_stop(self, reason: str) -> None:
        """Ask the run to end after what it is doing now (SIGINT, SIGTERM, a Stop button)."""
        self.stop_reason = reason
        self.stopping.set()

    # ---- what a dashboard (or SIGUSR1) may ask of the run
    def waiting_for_launch(self) -> bool:
        return self.phase == "lobby" and self.config.start == "manual" and not self.launch.is_set()

    def request_launch(self, changes: dict[str, Any] | None = None) -> str:
        """Start training now (--start manual), with `changes` to the launch settings; a sentence
        saying what happens. ValueError: not now, or a setting outside its limits (nothing changed)."""
        if self.config.start != "manual":
            raise ValueError("this server starts by itself (--start auto)")
        if not self.waiting_for_launch():
            raise ValueError("training has already started" if self.phase != "lobby" else
                             "Start was pressed already; training begins once enough clients are ready")
        # Only what differs from the run's settings is checked: a value from the command line stands.
        given = {k: v for k, v in (changes or {}).items() if getattr(self.config, k, object()) != v}
        changed = settings.check_launch_settings(given)
        if changed.get("num_rounds", self.config.num_rounds) <= self.rounds_done:
            raise ValueError(f"num_rounds must be more than the {self.rounds_done} round(s) this run has done")
        if "num_rounds" in changed and self.config.dp_epsilon is not None:
            raise ValueError(f"the noise was planned for --dp-epsilon {self.config.dp_epsilon:g} over "
                             f"{self.config.num_rounds} rounds: restart the server to plan for another number")
        if len(self.pool.members) < self.needed and changes is not None:
            raise ValueError(f"{len(self.pool.members)} client(s) ready, {self.needed} needed to start")
        for name, value in changed.items():
            setattr(self.config, name, value)
        save_config(self.config, self.output_dir, rewrite=True)
        self.launch.set()
        return "training starts" + "".join(f"; {name.replace('_', ' ')} {value:g}" for name, value in changed.items())

    def request_more(self, rounds: int) -> str:
        """--stay: another session of `rounds` rounds from the last global model."""
        if self.phase != "between sessions":
            raise ValueError("more rounds can be asked for only when a session has ended (with --stay)")
        try:
            rounds = settings.check_launch_settings({"num_rounds": rounds})["num_rounds"]
        except ValueError as exc:
            raise ValueError(str(exc).replace("num_rounds", "rounds", 1)) from None
        self.more_rounds = rounds
        self.more.set()
        return f"{rounds} more round(s)"

    def signal_go(self) -> None:
        """SIGUSR1: start (--start manual), or with --stay another session as long as the last one."""
        try:
            if self.waiting_for_launch():
                self.events.notice(f"SIGUSR1: {self.request_launch()}")
            elif self.phase == "between sessions":
                last = max(self.rounds_done - self.session_start, 1)
                self.events.notice(f"SIGUSR1: {self.request_more(last)}")
            else:
                self.events.notice("SIGUSR1: nothing to start now", warning=True)
        except ValueError as exc:
            self.events.notice(f"SIGUSR1: {exc}", warning=True)

    # ---- the run
    async def run(self) -> int:
        """The whole run; its exit status."""
        try:
            await self.wait_for_start()
            await self.train()
            while self.config.stay and not self.budget_spent and await self.next_session():
                await self.train()
        except Stopped:
            if self.rounds_done:
                then = f"after round {self.rounds_done}; it can resume from its checkpoint"
            else:
                then = "before any round completed; there is no checkpoint to resume from"
            self.events.notice(f"{self.stop_reason}: stopping after round {self.rounds_done}")
            await self.finish(False, f"the server was stopped ({self.stop_reason}) {then}")
            return ExitStatus.TERMINATED if self.stop_reason == "SIGTERM" else ExitStatus.INTERRUPTED
        except (RunFailed, OutputFailed) as exc:
            await self.finish(False, str(exc))
            raise
        finally:
            self.worker.shutdown(wait=True)
        if self.budget_spent:
            await self.finish(False, f"the privacy budget (epsilon {self.privacy.budget:g} at delta "
                                     f"{self.privacy.settings.delta:g}) allows no more rounds: stopped after round "
                                     f"{self.rounds_done} of {self.config.num_rounds}")
            return ExitStatus.OK
        sessions = f" in {self.session} sessions" if self.session > 1 else ""
        await self.finish(True, f"training finished after {self.rounds_done} rounds{sessions}")
        return ExitStatus.OK

    async def next_session(self) -> bool:
        """--stay: the session is over; keep the clients and wait for more rounds (True) or a stop (False)."""
        self.more.clear()
        self.phase = "between sessions"  # from now on, request_more may set `more`
        self.events.emit(SessionFinished(self.session, self.rounds_done))
        await self.events.flush()  # the model and the plot of this session are on disk
        note = (f"session {self.session} ended after round {self.rounds_done}; stay connected: another session "
                f"may follow")
        await asyncio.gather(*(c.end_session(self.session, self.rounds_done, note)
                               for c in list(self.pool.connected.values())))
        await wait_any(self.more, self.stopping, None)
        if self.stopping.is_set():
            self.events.notice(f"{self.stop_reason}: the run ends after session {self.session}")
            return False
        self.session += 1
        self.session_start = self.rounds_done
        self.config.num_rounds = self.rounds_done + self.more_rounds
        save_config(self.config, self.output_dir, rewrite=True)
        self.phase = "training"
        self.events.emit(TrainingStarted(sorted(self.pool.members), self.rounds_done + 1, self.config.num_rounds,
                                         self.config.model, self.data_name(), self.config.strategy, self.session))
        return True

    def data_name(self) -> str:
        return self.config.dataset if self.config.task == "dataset" else "their own data"

    async def wait_for_start(self) -> None:
        """The lobby: wait for the first ready client, then --time-to-wait for the others (or until
        all --num-clients are ready), and never start with fewer than the rounds need."""
        pool, config = self.pool, self.config
        if config.start == "manual":
            self.events.notice("waiting for Start training on the dashboard (or SIGUSR1)" if config.dashboard else
                               f"waiting for SIGUSR1 to start training (--start manual): kill -USR1 {os.getpid()}")
            await wait_any(self.launch, self.stopping, None)
            if self.stopping.is_set():
                raise Stopped
        await pool.wait_until(lambda: bool(pool.members), None, self.stopping)
        if config.start == "auto" and config.time_to_wait_s and len(pool.members) < config.num_clients:
            self.events.notice(f"first client is ready; waiting {config.time_to_wait_s:g} s for more "
                               f"(up to {config.num_clients})")
            await pool.wait_until(lambda: len(pool.members) >= config.num_clients, config.time_to_wait_s, self.stopping)
        if len(pool.members) < self.needed:
            self.events.notice(f"{len(pool.members)} client(s) ready, {self.needed} needed: waiting for more")
            await pool.wait_until(lambda: len(pool.members) >= self.needed, None, self.stopping)
        pool.training_started = True
        self.phase = "training"
        self.events.emit(TrainingStarted(sorted(pool.members), self.rounds_done + 1, config.num_rounds,
                                         config.model, self.data_name(), config.strategy))

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
            self.attach_evaluation(number - 1)  # what this round's clients measured of the last round's model
            row = self.round_row(round_)
            if self.privacy is not None:
                row["epsilon"] = self.privacy.record(round_.population, round_.picked,
                                                     self.strategy.sampling_rate(round_.population))
            self.reporting = asyncio.ensure_future(self.report(row, self.model, dict(self.strategy.state)))
        await self.settle_report()
        if self.federated_evaluation and not self.stopping.is_set():
            await self.evaluate_final_model()

    async def aggregate(self, round_: Round) -> dict[str, torch.Tensor] | None:
        """The round's aggregate; with secure aggregation, after the unmasking (None: it failed)."""
        if self.secure is None:
            return round_.aggregator.result()
        result = await self.secure.finish(self.model.tensors, max(round_.planned, 1e-12))
        round_.seconds = time.perf_counter() - round_.started  # the unmasking is part of the round
        self.note_secure_drops(round_)
        if isinstance(result, str):
            self.events.notice(f"round {round_.number}: secure aggregation failed: {result}", warning=True)
            return None
        return result

    def note_secure_drops(self, round_: Round) -> None:
        for client_id, reason in self.secure.notes:
            if client_id not in round_.dropped:
                round_.dropped[client_id] = reason
                self.note_drop(ClientDropped(round_.number, client_id, reason))
        self.secure.notes = []

    async def fit_round(self, number: int, attempt: int) -> Round | None:
        """One round's story: sample, send, collect. The caller aggregates. None: the privacy budget
        would not allow this round."""
        pool = self.pool
        round_ = Round(number, attempt, set(), None, time.perf_counter(), (self.traffic.sent, self.traffic.received))
        # A retried round keeps the same model, so a client still training it from an earlier
        # attempt is as good as one picked now: it is expected too. (Not with DP: there, a round's
        # participants are exactly its fresh sample, as the accountant assumes.)
        carried = lambda: ([] if self.privacy or self.secure  # noqa: E731
                           else [i for i, r in pool.busy.items() if r == number])
        if not await pool.wait_until(lambda: len(pool.idle()) + len(carried()) >= self.needed,
                                     self.config.round_timeout_s, self.stopping):
            return round_
        idle = pool.idle()
        if self.privacy is not None and self.privacy.would_exceed_budget(
                len(idle), self.strategy.clients_to_pick(len(idle)), self.strategy.sampling_rate(len(idle))):
            self.budget_spent = True
            return None
        picked = self.strategy.sample(idle, number, attempt)
        round_.population, round_.picked = len(idle), len(picked)
        round_.planned = self.strategy.planned(len(picked), len(idle))
        settings = {"local_epochs": self.config.local_epochs, "batch_size": self.config.batch_size,
                    "lr": self.config.round_lr(number), **self.strategy.fit_settings()}
        if self.config.augment != "none":  # absent otherwise: the <MODEL> of a plain run is as it always was
            settings["augment"] = self.config.augment
        round_.started = time.perf_counter()  # a secure round's time and bytes include its key and share stages
        round_.traffic_at_start = (self.traffic.sent, self.traffic.received)
        # The picked clients' proxies, held from here: one that leaves during the key stages is gone
        # from the pool, and its fit reports the drop.
        proxies = {i: pool.members[i] for i in picked}
        if self.secure is not None:  # keys and shares first, among the picked; then the model to those still here
            threshold = self.secure.threshold(len(picked))
            picked = await self.secure.setup(number, proxies)
            self.note_secure_drops(round_)
            picked = [i for i in picked if i not in round_.dropped]  # one gone at <SECAGG_ROUTED>: no model
            if self.stopping.is_set():
                raise Stopped
            if not picked:
                return round_
            round_.aggregator = self.secure
            settings.update(self.secure_dp_settings(threshold))
        else:
            round_.aggregator = self.strategy.aggregator(self.model.tensors, round_.planned)
        round_.expected = set(picked) | set(carried())
        self.current = round_
        instructions = FitIns(number, self.model, settings, evaluate=self.federated_evaluation)
        for client_id in picked:
            self.start_fit(proxies[client_id], instructions)
        self.events.emit(RoundStarted(number, attempt, picked, sorted(round_.expected), len(idle) - len(picked)))
        round_.settle()  # a round that picked nobody (Poisson sampling) is complete at once
        await self.settle_report()  # the last round's evaluation ran while this model went out
        await wait_any(round_.complete, self.stopping, self.config.round_timeout_s)
        if self.crash is not None:
            raise self.crash
        if self.stopping.is_set():
            raise Stopped
        self.close_round(round_)
        return round_

    def secure_dp_settings(self, threshold: int) -> dict[str, float]:
        """With DP and secure aggregation the clients clip (the server sees no update to clip), and add
        noise: none in central mode (the server adds it to the unmasked sum), their share of it in
        distributed mode (std z·S/√t each: any t survivors' noise adds up to z·S), all of it in local mode."""
        if self.privacy is None:
            return {}
        mode, full = self.privacy.settings.mode, self.privacy.noise_std
        share = {"central": 0.0, "distributed": full / math.sqrt(threshold), "local": full}[mode]
        return {"dp_clip": self.privacy.settings.clip, "dp_noise_std": share}

    def note_evaluation(self, number: int, loss_sum: float, confusion) -> None:
        entry = self.evaluations.setdefault(number, [0, 0.0, 0])
        entry[0], entry[1], entry[2] = entry[0] + 1, entry[1] + loss_sum, entry[2] + confusion

    def attach_evaluation(self, number: int) -> None:
        """Put the clients' evaluation of round `number`'s model into its row (written with the next
        checkpoint), and say it."""
        entry = self.evaluations.pop(number, None)
        row = next((r for r in self.metrics if r["round"] == number), None)
        if entry is None or row is None or "fed_clients" in row:  # --stay: a session's end evaluated it already
            return
        clients, loss_sum, confusion = entry
        scores = nnh.scores(confusion, loss_sum, self.task.positive_index if self.task else None)
        if not scores:
            return
        row.update({f"fed_{k}": v for k, v in scores.items()}, fed_clients=clients, fed_examples=int(confusion.sum()))
        if "confusion" not in row or row.get("test_accuracy") is None:
            row["confusion"] = confusion.tolist()
        self.events.emit(FederatedEvaluation(number, clients, int(confusion.sum()), scores))

    async def evaluate_final_model(self) -> None:
        """The clients' evaluation of the last model: no round follows to carry it, so ask for it."""
        await self.settle_report()
        proxies = [self.pool.members[i] for i in self.pool.idle()]
        if not proxies or not self.metrics:
            return
        answers = await asyncio.gather(*(asyncio.wait_for(p.evaluate(self.rounds_done, self.model),
                                                          self.config.round_timeout_s) for p in proxies),
                                       return_exceptions=True)
        for answer in answers:
            if isinstance(answer, EvalRes):
                self.note_evaluation(self.rounds_done, answer.loss_sum, answer.confusion)
        self.attach_evaluation(self.rounds_done)
        last = self.metrics[-1]
        extra = {"privacy": self.privacy.to_json()} if self.privacy is not None else {}
        self.events.emit(MetricsUpdated(Checkpoint(asdict(self.config), last["round"], [dict(r) for r in self.metrics],
                                                   self.model.tensors, dict(self.strategy.state), extra)))
        await self.events.flush()

    def start_fit(self, proxy: ClientProxy, instructions: FitIns) -> None:
        self.pool.busy[proxy.client_id] = instructions.round
        task = asyncio.ensure_future(proxy.fit(instructions))
        task.add_done_callback(functools.partial(self.fit_done, proxy, instructions.round))

    def fit_done(self, proxy: ClientProxy, number: int, task: asyncio.Future) -> None:
        """A client's fit ended: fold its update into the round, or note the drop, or the lateness.
        (A callback: a bug in it must end the run, not leave the round waiting for ever.)"""
        try:
            self._fit_done(proxy, number, task)
        except Exception as exc:
            self.crash = exc
            self.stopping.set()

    def _fit_done(self, proxy: ClientProxy, number: int, task: asyncio.Future) -> None:
        self.pool.busy.pop(proxy.client_id, None)
        self.pool.changed.set()
        if task.cancelled():
            return
        round_ = self.current
        in_round = round_ is not None and round_.open and round_.number == number
        if task.exception() is not None:
            exc = task.exception()
            reason = str(exc) if isinstance(exc, Dropped) else f"internal error: {type(exc).__name__}: {exc}"
            if in_round and proxy.client_id in round_.expected and proxy.client_id not in round_.reported:
                round_.dropped[proxy.client_id] = reason
                self.note_drop(ClientDropped(number, proxy.client_id, reason))
                round_.settle()
            return
        result: FitRes = task.result()
        try:
            if not in_round:
                proxy.acknowledge(result, False, f"round {number} had closed before this update arrived; it was not used")
                self.events.emit(UpdateDiscarded(number, proxy.client_id, f"late update for round {number} discarded"))
                return
            if self.secure is not None:
                try:
                    self.secure.add(proxy.client_id, result.tensors)
                except (SecAggError, KeyError) as exc:
                    round_.dropped[proxy.client_id] = f"secure aggregation: {exc}"
                    self.note_drop(ClientDropped(number, proxy.client_id, round_.dropped[proxy.client_id]))
                    round_.settle()
                    return
            else:
                round_.aggregator.add(result.tensors, result.num_examples)
        finally:
            result.release()
            result.tensors = {}  # views of a buffer that is reused now
        round_.expected.add(proxy.client_id)
        round_.reported[proxy.client_id] = {"num_examples": result.num_examples, **result.metrics}
        if "eval_confusion" in result.metrics:
            self.note_evaluation(result.metrics["eval_round"], result.metrics["eval_loss_sum"],
                                 result.metrics["eval_confusion"])
        proxy.acknowledge(result, True, "update accepted")
        self.events.emit(UpdateAccepted(number, proxy.client_id, result.num_examples, result.metrics))
        round_.settle()

    def close_round(self, round_: Round) -> None:
        round_.open = False
        round_.seconds = time.perf_counter() - round_.started
        self.current = None
        for client_id in sorted(round_.expected - round_.reported.keys() - round_.dropped.keys()):
            self.note_drop(ClientDropped(round_.number, client_id, f"{self.config.round_timeout_s:g} s", timed_out=True))

    def note_drop(self, event: ClientDropped) -> None:
        self.drops.append(f"{time.strftime('%H:%M:%S')} {drop_line(event)}")
        self.events.emit(event)

    def round_row(self, round_: Round) -> dict[str, Any]:
        updates = list(round_.reported.values())
        examples = sum(u["num_examples"] for u in updates) or 1  # a DP round may release noise alone
        return {
            "round": round_.number,
            "clients": len(updates),
            "expected": len(round_.expected),
            "train_loss": sum(u["train_loss"] * u["num_examples"] for u in updates) / examples,
            "seconds": round_.seconds,
            "bytes_sent": self.traffic.sent - round_.traffic_at_start[0],
            "bytes_received": self.traffic.received - round_.traffic_at_start[1],
            "max_fit_seconds": max([u["fit_seconds"] for u in updates], default=0.0),
            "sum_fit_seconds": sum(u["fit_seconds"] for u in updates),
        }

    async def report(self, row: dict[str, Any], model: GlobalModel, strategy_state: dict) -> None:
        """Evaluate the round's model (in the worker thread), then tell the observers; their files are
        written by the time the next round's model is out (settle_report)."""
        loop = asyncio.get_running_loop()
        row.update(await loop.run_in_executor(self.worker, self.evaluate, model.tensors))
        row["positive"] = bool(self.task and self.task.positive is not None)
        self.metrics.append(row)
        extra = {"privacy": self.privacy.to_json()} if self.privacy is not None else {}
        checkpoint = Checkpoint(asdict(self.config), row["round"], [dict(r) for r in self.metrics], model.tensors,
                                strategy_state, extra)
        self.events.emit(RoundFinished(row, self.config.num_rounds, checkpoint))
        await self.events.flush()
        self.events.emit(RoundSaved(row, self.config.num_rounds))

    async def settle_report(self) -> None:
        if self.reporting is not None:
            reporting, self.reporting = self.reporting, None
            await reporting

    async def finish(self, completed: bool, message: str) -> None:
        """Close any round in progress, let the report and files finish, tell every client the run is over."""
        self.phase = "finished"
        if self.current is not None:
            self.current.open = False
            self.current = None  # clients that leave now were told to: not drops
        failure = None
        try:
            await self.settle_report()
        except OutputFailed as exc:
            failure = exc
        if self.metrics and self.metrics[-1].get("test_accuracy") is not None:
            message += f"; final test accuracy {100 * self.metrics[-1]['test_accuracy']:.2f}%"
        elif self.metrics and self.metrics[-1].get("fed_accuracy") is not None:
            message += f"; final accuracy on the clients' test splits {100 * self.metrics[-1]['fed_accuracy']:.2f}%"
        self.events.emit(RunFinished(completed, self.rounds_done, message, self.output_dir, list(self.drops)))
        try:
            await self.events.flush()
        except OutputFailed as exc:
            failure = failure or exc
        if failure is not None and str(failure) not in message:
            message, completed = f"{message}; {failure}", False
        clients = list(self.pool.connected.values())
        await asyncio.gather(*(c.finish(completed, self.rounds_done, message) for c in clients))
        if failure is not None:
            raise failure

    def status(self) -> str:
        """What the server is waiting for, in words: the text of <WAITING>."""
        round_, pool = self.current, self.pool
        if round_ is not None:
            return f"round {round_.number}: {len(round_.reported)} of {len(round_.expected)} updates in"
        if self.waiting_for_launch():
            return f"waiting for Start on the dashboard: {len(pool.members)} of {pool.num_clients} clients ready"
        if self.phase == "between sessions":
            return f"session {self.session} is over after round {self.rounds_done}; waiting for more rounds"
        if not pool.training_started:
            return (f"waiting for clients: {len(pool.members)} of {pool.num_clients} ready, "
                    f"training starts with at least {self.needed}")
        return f"between rounds: {len(pool.idle())} client(s) ready, {self.needed} needed"


# --------------------------------------------------------------------------- setup


@dataclass
class Setup:
    """Everything that can fail on bad flags or files, made before the server listens."""

    info: client_helper.DatasetInfo | None  # None when the clients bring their own data
    tls: Any
    auth: security.Authenticator
    model: GlobalModel
    strategy: Strategy
    evaluate: Callable[[dict], dict[str, float]]
    partitions: list[np.ndarray]
    train_size: int
    checkpoint: Checkpoint | None
    train: client_helper.Split | None = None
    task: Task | None = None
    secure: SecureAggregation | None = None


class Evaluator:
    """The server's test set and a model to evaluate the global weights on (in the worker thread):
    accuracy, loss, precision, recall and F1 of the task's positive class, and the confusion matrix.
    Without a test set (clients with their own data, no --test-data) it measures nothing."""

    def __init__(self, model: torch.nn.Module, test: tuple[torch.Tensor, torch.Tensor] | None, task: Task):
        self.model, self.test, self.task = model, test, task

    def __call__(self, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        if self.test is None:
            return {}
        nnh.set_weights(self.model, tensors)
        loss_sum, confusion = nnh.evaluate_counts(self.model, *self.test, self.task.num_classes)
        return {f"test_{k}": v for k, v in nnh.scores(confusion, loss_sum, self.task.positive_index).items()} | {
            "confusion": confusion.tolist()}


class Welcome:
    """What a joining client is told (<METADATA>), and how many examples it may claim."""

    def __init__(self, config: ServerConfig, setup: Setup, engine: RoundEngine):
        self.config, self.setup, self.engine = config, setup, engine

    @property
    def num_rounds(self) -> int:  # the dashboard may change it before the start, and each new session
        return self.config.num_rounds

    def next_round(self) -> int:
        return self.engine.rounds_done + 1

    def max_examples(self, client_id: int) -> int:
        if not self.setup.partitions:  # own data: the server knows nothing of it but this bound
            return self.config.max_client_examples
        return len(self.setup.partitions[client_id - 1])

    def fields(self, client_id: int) -> dict[str, Any]:
        c, own = self.config, not self.setup.partitions
        return dict(
            client_id=client_id, num_clients=c.num_clients, dataset="" if own else c.dataset,
            partition="own" if own else c.partition, alpha=c.alpha, seed=c.seed, model=c.model,
            num_rounds=c.num_rounds, round_timeout_s=c.round_timeout_s, heartbeat_s=c.heartbeat_s,
            next_round=self.next_round(), train_size=self.setup.train_size,
            partition_bitmap=None if own else encode_bitmap(self.setup.partitions[client_id - 1], self.setup.train_size),
            task=self.setup.task.to_json(), federated_evaluation=federated_evaluation(c),
            required_features=required_features(c), compression=compression_of(c).to_json(),
            secure_aggregation=c.secure_aggregation,
        )


def federated_evaluation(config: ServerConfig) -> bool:
    """Whether clients evaluate the models they receive: asked for, or the only evaluation there is."""
    return config.federated_evaluation or (config.task != "dataset" and config.test_data is None)


def required_features(config: ServerConfig) -> list[str]:
    """The optional protocol features a client must support to take part in this run."""
    local_dp = config.dp_clip is not None and config.dp_mode == "local"
    return (["dp-local"] * (local_dp or config.secure_aggregation and config.dp_clip is not None)
            + [compression.FEATURE] * compression_of(config).active + [secagg.FEATURE] * config.secure_aggregation
            + ["sessions"] * config.stay + ["augment"] * (config.augment != "none"))


def compression_of(config: ServerConfig) -> compression.Compression:
    return compression.Compression(config.compression, config.topk_fraction, config.compress_broadcast)


def load_initial_model(path: str, template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A saved model.pt (a state_dict), checked against the chosen model's own layout."""
    try:
        # weights_only: PyTorch's restricted unpickler, which loads tensors and nothing that runs code.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many kinds (UnpicklingError, RuntimeError, EOFError, ...) for a bad file
        raise UsageError(f"cannot read --initial-model {path}: {type(exc).__name__}: {exc}".splitlines()[0]) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"--initial-model {path} is not a model.pt (a state_dict of tensors)")
    try:
        check_layout(weights_layout(state), weights_layout(template))
        check_finite(state)
    except FedsockError as exc:
        raise UsageError(f"--initial-model {path} does not fit the chosen model: {exc}") from exc
    return {name: state[name].clone() for name in template}


def prepare(config: ServerConfig, checkpoint: Checkpoint | None) -> Setup:
    """The server's setup: TLS and tokens, then what every run needs (prepare_training)."""
    tls = security.server_tls_context(config.tls_cert, config.tls_key, config.tls_client_ca)
    if config.auth_token_file and config.auth_tokens_file:
        raise UsageError("use --auth-token-file or --auth-tokens-file, not both")
    per_client = security.read_client_secrets(config.auth_tokens_file, WHO) if config.auth_tokens_file else None
    shared = None if per_client else security.load_token(config.auth_token_file, WHO)
    if config.dashboard:
        from fedsock.dashboard import parse_address

        host = parse_address(config.dashboard)[0]
        if not is_loopback(host) and shared is None:
            raise UsageError(f"--dashboard {config.dashboard} listens beyond loopback: its Start and Stop need the "
                             f"run's token, so give --auth-token-file (or keep it on 127.0.0.1 and use ssh -L)")
    setup = prepare_training(config, checkpoint)
    setup.tls, setup.auth = tls, security.Authenticator(shared, per_client)
    return setup


def prepare_training(config: ServerConfig, checkpoint: Checkpoint | None, keep_train: bool = False,
                     who: str = WHO) -> Setup:
    """The data split among the clients, the test set, the starting model and the strategy: what a
    server and a simulation both need. `keep_train` keeps the training split (a simulation trains on it)."""
    device = nnh.choose_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    info = train = test = None
    parts: list[np.ndarray] = []
    if config.task == "dataset":
        info = client_helper.DATASETS[config.dataset]
        task = task_of_dataset(info)
        train = client_helper.load_split(config.dataset, "train", config.data_root)
        parts = client_helper.partition_indices(train.labels, config.num_clients, config.partition, config.alpha,
                                                config.seed)
        test = client_helper.load_split(config.dataset, "test", config.data_root)
        test_tensors = nnh.to_tensors(test.images, test.labels, info, device)
    else:
        try:
            task = make_task(config.task, config.classes or "", config.image_size, config.channels, config.image_mean,
                             config.image_std, config.max_tokens, config.buckets, config.positive_class)
        except (ValueError, ProtocolError) as exc:
            raise UsageError(f"--task {config.task}: {exc}") from exc
        test_tensors = None
        if config.test_data:  # the server's own held-out set, in a client's formats; no training file is read
            held = load_own_data(config.test_data, task, flag="--test-data")
            xs = np.concatenate([held.x, held.test_x]) if held.test_x is not None else held.x
            ys = np.concatenate([held.y, held.test_y]) if held.test_y is not None else held.y
            test_tensors = nnh.to_tensors(xs, ys, task, device)
    model = nnh.build_model(config.model, task, config.seed).to(device)
    template = {k: v.cpu() for k, v in nnh.get_weights(model).items()}
    if checkpoint is not None:
        try:
            check_layout(weights_layout(checkpoint.model), weights_layout(template))
        except FedsockError as exc:
            raise UsageError(f"the checkpoint {config.resume} does not fit the {config.model} model: {exc}") from exc
        weights = checkpoint.model
    elif config.initial_model:
        weights = load_initial_model(config.initial_model, template)
    else:
        weights = {k: v.clone() for k, v in template.items()}
    model_bytes = sum(t.numel() * t.element_size() for t in weights.values())
    if model_bytes > config.max_message_mb * 2**20:
        raise UsageError(f"the {config.model} model has {model_bytes / 2**20:.1f} MB of weights, over "
                         f"--max-message-mb {config.max_message_mb:g}")
    strategy = Strategy(strategy_settings(config), make_privacy(config, checkpoint, who))
    if checkpoint is not None:
        strategy.load_state(checkpoint.strategy_state)
    if train is not None:
        skew = client_helper.label_skew(train.labels, parts)
        sizes = sorted(len(p) for p in parts)
        say(who, f"{config.dataset}: {len(train.labels)} training examples in {config.num_clients} {config.partition} "
                 f"partitions of {sizes[0]}..{sizes[-1]} (label skew {skew:.2f}); {len(test.labels)} test examples "
                 f"on {device}")
    else:
        where = (f"a test set of {len(test_tensors[1])} examples from {config.test_data}" if test_tensors is not None
                 else "no test set of its own")
        say(who, f"task: {task.describe()}; the clients bring their own data; the server has {where}"
                 f"{'; federated evaluation' if federated_evaluation(config) else ''} on {device}")
    secure = make_secure_aggregation(config, strategy, weights, parts, who) if config.secure_aggregation else None
    return Setup(
        info=info, tls=None, auth=security.Authenticator(), model=GlobalModel.of(weights, config.compress_broadcast),
        strategy=strategy,
        evaluate=Evaluator(model, test_tensors, task), partitions=parts,
        train_size=len(train.labels) if train is not None else 0, checkpoint=checkpoint,
        train=train if keep_train else None, task=task, secure=secure,
    )


def make_secure_aggregation(config: ServerConfig, strategy: Strategy, weights: dict[str, torch.Tensor],
                            parts: list[np.ndarray], who: str = WHO) -> SecureAggregation:
    """The run's secure aggregation, after refusing settings whose sums could overflow 32 bits."""
    if not all(t.is_floating_point() for t in weights.values()):
        raise UsageError(f"--secure-aggregation needs a model whose weights are all floating point; {config.model} "
                         f"has others")
    per_round = config.clients_per_round or config.num_clients
    if config.fraction_fit is not None:
        per_round = max(config.min_clients, math.ceil(config.fraction_fit * config.num_clients))
    privacy = strategy.privacy
    weight_bound = 1 if privacy else (max(len(p) for p in parts) if parts else config.max_client_examples)
    try:
        secagg.check_sizes(min(per_round, config.num_clients), weight_bound)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    settings = secagg.Settings(threshold_fraction=config.secagg_threshold, clip=config.secagg_clip,
                               weight_bound=weight_bound, weighted=privacy is None,
                               stage_timeout_s=min(60.0, config.round_timeout_s))
    if privacy is not None:
        s = privacy.settings
        settings.clip = s.clip * (1 + 8 * s.noise_multiplier)  # a clipped delta plus noise: |x| beyond this ~ never
        settings.noise_std = privacy.noise_std if s.mode == "central" else 0.0
    say(who, f"secure aggregation: threshold {config.secagg_threshold:.2f} of each round's clients (and more than "
             f"half), coordinates clipped to ±{settings.clip:g}, weights up to {weight_bound} examples")
    return SecureAggregation(settings, weights)


def make_privacy(config: ServerConfig, checkpoint: Checkpoint | None, who: str = WHO) -> Privacy | None:
    """Client-level DP, when --dp-clip asks for it: its noise multiplier (given, or planned for the budget
    --dp-epsilon over the rounds still to run), and the accountant and sampling secret of a resumed run."""
    if config.dp_clip is None:
        return None
    delta = config.dp_delta if config.dp_delta is not None else default_delta(config.num_clients)
    probe = Strategy(strategy_settings(config))
    sampling = config.sampling if probe.sampled else "none"
    saved = checkpoint.extra.get("privacy") if checkpoint is not None else None
    accountant = Accountant.from_json(saved["accountant"]) if saved else Accountant(delta, sampling)
    if accountant.sampling != sampling or accountant.delta != delta:
        raise UsageError(f"the checkpoint's privacy accounting is for {accountant.sampling} sampling at delta "
                         f"{accountant.delta:g}: keep --sampling and --dp-delta on --resume")
    z = config.dp_noise_multiplier
    if z is None:
        planned = probe.clients_to_pick(config.num_clients)
        rounds = config.num_rounds - (checkpoint.round if checkpoint is not None else 0)
        try:
            z = plan_noise_multiplier(config.dp_epsilon, delta, rounds, sampling, config.num_clients, planned,
                                      probe.sampling_rate(config.num_clients), accountant)
        except ValueError as exc:
            raise UsageError(f"--dp-epsilon {config.dp_epsilon:g} cannot be met: {exc}") from exc
    privacy = Privacy(PrivacySettings(config.dp_clip, z, delta, config.dp_mode, sampling), accountant,
                      saved["sampling_seed"] if saved else None, config.dp_epsilon)
    say(who, privacy.describe() + (f"; planned for epsilon {config.dp_epsilon:g}" if config.dp_epsilon else ""))
    return privacy


def open_listener(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UsageError(f"--host {host}: {exc.strerror}") from exc
    family, _, _, _, address = infos[0]
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(address)
        listener.listen(1024)
    except OSError as exc:
        listener.close()
        if exc.errno == errno.EADDRINUSE:
            raise UsageError(f"port {port} on {host} is already in use (another server?); pick another --server-port") from exc
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    listener.setblocking(False)
    return listener


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def raise_file_limit() -> None:
    """A thousand clients need a thousand file descriptors; many systems start at 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def make_output_dir(requested: str | None) -> Path:
    path = Path(requested) if requested else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    if not requested:
        suffix = 1
        while path.exists():
            suffix += 1
            path = Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{suffix}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text("")  # can we write here at all? (filled in below)
    except OSError as exc:
        raise UsageError(f"cannot write to --output-dir {path}: {exc.strerror}") from exc
    return path


def save_config(config: ServerConfig, output_dir: str, rewrite: bool = False) -> None:
    """config.json: the run's settings, written again (`rewrite`) when the dashboard or a new session
    changes them; a rewrite that fails is a warning (every checkpoint holds the settings too)."""
    if not output_dir:
        return
    try:
        (Path(output_dir) / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    except OSError as exc:
        if not rewrite:
            raise UsageError(f"cannot write {Path(output_dir) / 'config.json'}: {exc.strerror or exc}") from exc
        warn(WHO, f"cannot rewrite {Path(output_dir) / 'config.json'} with the new settings: {exc.strerror or exc}; "
                  f"the checkpoints hold them")


def stop_on_signals(engine: RoundEngine) -> None:
    """SIGINT and SIGTERM end the run after its current step, with the checkpoint whole; a second one at once."""

    def on_signal(signum: signal.Signals) -> None:
        if engine.stopping.is_set():
            say(WHO, "second signal: exiting at once (the last checkpoint is intact)")
            os._exit(128 + signum)
        engine.request_stop(signal.Signals(signum).name)

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    loop.add_signal_handler(signal.SIGUSR1, engine.signal_go)  # --start manual and --stay, without a browser


def update_layout(config: ServerConfig, setup: Setup) -> dict[str, Any]:
    """The layout every update must have: the model's, compressed, or one masked vector."""
    if setup.secure is not None:
        return secagg.masked_layout(setup.secure.length)
    return compression.update_layout(setup.model.layout, config.compression, config.topk_fraction)


def run_title(config: ServerConfig, who: str = "fedsock") -> str:
    """The plot's title: the model, the data, the clients and the strategy."""
    data = (f"{config.dataset}, {config.num_clients} clients, {config.partition}" if config.task == "dataset"
            else f"the clients' own data ({config.classes.replace(',', ', ')}), {config.num_clients} clients")
    augmented = f", {config.augment} augmentation" if config.augment != "none" else ""
    return f"{who}: {config.model} on {data}, {config.strategy}{augmented}"


async def serve(config: ServerConfig, setup: Setup, output_dir: Path) -> int:
    listener = open_listener(config.host, config.server_port)
    host, port = listener.getsockname()[:2]
    title = run_title(config)
    files = RunFiles(output_dir, title, setup.checkpoint)
    events = Events([Console(config.quiet), files])
    pool, traffic = ClientPool(config.num_clients), Traffic()
    engine = RoundEngine(config, setup.strategy, pool, setup.model, setup.evaluate, events, traffic, setup.checkpoint,
                         str(output_dir), setup.secure)
    engine.task, engine.federated_evaluation = setup.task, federated_evaluation(config)
    lobby = Lobby(
        listener=listener, pool=pool, events=events, traffic=traffic, tls=setup.tls, auth=setup.auth,
        welcome=Welcome(config, setup, engine),
        buffers=ReceiveBuffers(update_layout(config, setup), min(RECEIVE_BUFFERS, config.num_clients), output_dir),
        status=engine.status, handshake_timeout_s=config.handshake_timeout_s, round_timeout_s=config.round_timeout_s,
        heartbeat_s=config.heartbeat_s, max_pending=config.max_pending,
        require_client_cert=bool(config.tls_client_ca), required_features=required_features(config),
        compression=compression_of(config), stall_timeout_s=config.stall_timeout_s,
    )
    loop = asyncio.get_running_loop()
    stop_on_signals(engine)
    loop.set_exception_handler(lambda _, context: warn(WHO, f"internal: {context.get('message')} {context.get('exception') or ''}"))
    transport = "TLS" + (" with client certificates" if config.tls_client_ca else "") if setup.tls else "plain TCP"
    auth = "token authentication" if setup.auth.required else "no authentication"
    if not is_loopback(config.host) and not (setup.tls and setup.auth.required):
        warn(WHO, f"listening on {config.host} without TLS and a token: anyone who can reach this port can join and read the model")
    dashboard = await open_dashboard(config, setup, engine, events, title) if config.dashboard else None
    events.emit(Listening(f"{host}:{port}", transport, auth, str(output_dir)))
    if dashboard is not None:
        say(WHO, f"dashboard: {dashboard.url}" + ("" if dashboard.loopback else " (its actions need the run's token)"))
    lobby.start()
    try:
        return await engine.run()
    finally:
        lobby.close()
        files.close()
        if dashboard is not None:
            await dashboard.close()


async def open_dashboard(config: ServerConfig, setup: Setup, engine: RoundEngine, events: Events, title: str):
    """--dashboard: the page, in this event loop; it observes the run's events like the console."""
    from fedsock.dashboard import Dashboard, parse_address

    host, port = parse_address(config.dashboard)
    loopback = is_loopback(host)
    dashboard = Dashboard(host, port, engine, title, setup.auth.shared, loopback)
    try:
        await dashboard.start()
    except OSError as exc:
        await dashboard.close()
        if exc.errno == errno.EADDRINUSE:
            raise UsageError(f"--dashboard {config.dashboard}: port {port} is already in use; pick another") from exc
        raise UsageError(f"--dashboard {config.dashboard}: cannot listen: {exc.strerror or exc}") from exc
    events.observers.append(dashboard)
    return dashboard


def main(argv: list[str] | None = None) -> int:
    config, checkpoint = parse_config(argv)
    raise_file_limit()
    setup = prepare(config, checkpoint)
    if checkpoint is not None:
        say(WHO, f"resuming from {config.resume}: round {checkpoint.round} of {config.num_rounds} was the last completed")
        if checkpoint.round >= config.num_rounds:
            raise UsageError(f"the checkpoint already has all {config.num_rounds} rounds; raise --num-rounds to go on")
    output_dir = make_output_dir(config.output_dir)
    save_config(config, str(output_dir))
    return asyncio.run(serve(config, setup, output_dir))


def cli() -> int:
    return run_main("fl_server.py", main)


if __name__ == "__main__":
    sys.exit(cli())
