"""The round engine with fake clients behind the ClientProxy seam: no socket, no process, milliseconds.

Each fake client answers `fit` with the global weights plus its own fixed step, so every
aggregate can be computed by hand. A fake can drop (raise Dropped), or stall until the
test opens its gate; the test opens gates from the engine's own events (an observer),
never after a sleep.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Callable

import pytest
import torch

from fedsock.clients import ClientPool, Dropped, FitIns, FitRes, GlobalModel, Stopped
from fedsock.config import ServerConfig
from fedsock.console import ExitStatus
from fedsock.events import (ClientDropped, Event, Events, Notice, Observer, RoundFailed, RoundFinished, RoundSaved,
                            RoundStarted)
from fedsock.strategies import Strategy
from fedsock.transport import Traffic
from fedsock.engine import Round, RoundEngine, RunFailed

RUN_TIMEOUT_S = 20  # a bound on every run below (each takes milliseconds)


class FakeClient:
    def __init__(self, client_id: int, step: float = 1.0, num_examples: int = 10):
        self.client_id, self.step, self.num_examples = client_id, step, num_examples
        self.pool: ClientPool | None = None
        self.fits: list[int] = []  # the rounds it was sent a model for
        self.lrs: list[float] = []  # the lr it was told to train each of them with
        self.acks: list[tuple[int, bool]] = []
        self.finished: tuple | None = None
        self.gate: asyncio.Event | None = None  # when set: a stalled client waits for it
        self.drop: str | None = None  # when set: fit raises Dropped with this reason
        self.leaves = True  # a dropped client leaves the pool, as a closed connection does
        self.sessions: list[tuple[int, int]] = []  # --stay: the <SESSION_END>s it was told

    async def fit(self, ins: FitIns) -> FitRes:
        self.fits.append(ins.round)
        self.lrs.append(ins.settings["lr"])
        if self.gate is not None:
            await self.gate.wait()
        if self.drop:
            if self.leaves:
                self.pool.remove(self.client_id)
            raise Dropped(self.drop)
        tensors = {name: t + self.step for name, t in ins.model.tensors.items()}
        return FitRes(self.client_id, ins.round, self.num_examples, tensors,
                      {"train_loss": 0.5, "local_test_accuracy": 0.9, "fit_seconds": 0.01})

    def acknowledge(self, result: FitRes, accepted: bool, note: str) -> None:
        self.acks.append((result.round, accepted))

    async def finish(self, completed: bool, rounds_completed: int, message: str) -> None:
        self.finished = (completed, rounds_completed, message)

    async def end_session(self, session: int, rounds_completed: int, message: str) -> None:
        self.sessions.append((session, rounds_completed))


class Recorder(Observer):
    """Keeps every event, and runs the test's hooks on chosen ones."""

    def __init__(self):
        self.events: list[Event] = []
        self.hooks: list[tuple[Callable[[Event], bool], Callable[[], None]]] = []

    def on(self, matches: Callable[[Event], bool], action: Callable[[], None]) -> None:
        self.hooks.append((matches, action))

    def notify(self, event: Event) -> None:
        self.events.append(event)
        for matches, action in self.hooks:
            if matches(event):
                action()

    def of(self, kind: type) -> list:
        return [e for e in self.events if isinstance(e, kind)]

    def rows(self) -> list[dict]:
        return [e.row for e in self.of(RoundSaved)]


def pool_of(clients: list[FakeClient], num_clients: int) -> ClientPool:
    """A pool with every fake client joined and ready, as the lobby leaves it when training starts."""
    pool = ClientPool(num_clients)
    for client in clients:
        client.pool = pool
        pool.joined(client)
        pool.add(client)
    return pool


def engine_for(clients: list[FakeClient], **changes) -> tuple[RoundEngine, Recorder]:
    config = ServerConfig(**{"num_clients": len(clients), "model": "logreg", "time_to_wait_s": 0.0,
                             "round_timeout_s": 0.3, "num_rounds": 3, "round_retries": 1, **changes})
    pool = pool_of(clients, config.num_clients)
    recorder = Recorder()
    engine = RoundEngine(config, Strategy(config), pool, GlobalModel.of({"w": torch.zeros(2)}),
                         lambda tensors: {"test_accuracy": float(tensors["w"][0]), "test_loss": 0.0},
                         Events([recorder]), Traffic())
    return engine, recorder


def run(engine: RoundEngine) -> int:
    async def bounded() -> int:
        return await asyncio.wait_for(engine.run(), RUN_TIMEOUT_S)

    return asyncio.run(bounded())


def test_each_round_is_the_example_weighted_mean_of_the_updates():
    clients = [FakeClient(1, step=1.0, num_examples=1), FakeClient(2, step=4.0, num_examples=3)]
    engine, recorder = engine_for(clients)
    assert run(engine) == ExitStatus.OK
    # every round moves w by (1 * 1 + 3 * 4) / 4 = 3.25
    assert [row["test_accuracy"] for row in recorder.rows()] == [3.25, 6.5, 9.75]
    assert [(row["clients"], row["expected"]) for row in recorder.rows()] == [(2, 2)] * 3
    assert engine.model.tensors["w"].tolist() == [9.75, 9.75]
    for client in clients:
        assert client.fits == [1, 2, 3] and client.acks == [(1, True), (2, True), (3, True)]
        assert client.finished[:2] == (True, 3) and "final test accuracy 975.00%" in client.finished[2]


def test_the_clients_lr_is_constant_or_decays_by_lr_decay_every_round():
    plain, decaying = [FakeClient(1)], [FakeClient(1)]
    assert run(engine_for(plain, lr=0.05)[0]) == ExitStatus.OK
    assert plain[0].lrs == [0.05, 0.05, 0.05]  # the default, 1: exactly the --lr, as before
    assert run(engine_for(decaying, lr=0.1, lr_decay=0.5)[0]) == ExitStatus.OK
    assert decaying[0].lrs == [0.1, 0.05, 0.025]
    # the decay follows the round's number, so a resumed run (or a later session) goes on from it
    assert ServerConfig(lr=0.1, lr_decay=0.5).round_lr(11) == pytest.approx(0.1 / 1024)
    assert ServerConfig(lr=0.05, lr_decay=0.5).round_lr(5000) > 0  # never 0, which <MODEL> refuses


def test_next_round_is_the_first_round_a_client_joining_now_is_sent():
    """<METADATA>'s next_round: a client that joins once round 2 has picked its clients is first sent round 3,
    and is told so; one that joins between rounds is told the round that comes next."""
    clients, late = [FakeClient(1), FakeClient(2)], FakeClient(3)
    engine, recorder = engine_for(clients, num_clients=3)
    told: list[int] = [engine.next_round(3)]

    def join_late() -> None:
        told.append(engine.next_round(3))
        late.pool = engine.pool
        engine.pool.joined(late)
        engine.pool.add(late)

    recorder.on(lambda e: isinstance(e, RoundStarted) and e.number == 2, join_late)
    assert run(engine) == ExitStatus.OK
    assert told == [1, 3]
    assert late.fits == [3]
    assert engine.next_round(3) == 4  # after the last round: the one a new session would begin with


def test_a_dropped_client_is_left_out_and_the_round_goes_on():
    clients = [FakeClient(1), FakeClient(2, step=3.0), FakeClient(3)]
    engine, recorder = engine_for(clients)
    recorder.on(lambda e: isinstance(e, RoundStarted) and e.number == 2, lambda: setattr(clients[1], "drop", "connection closed"))
    assert run(engine) == ExitStatus.OK
    assert [row["clients"] for row in recorder.rows()] == [3, 2, 2]
    drops = recorder.of(ClientDropped)
    assert [(d.number, d.client_id, d.reason, d.timed_out) for d in drops] == [(2, 2, "connection closed", False)]
    assert engine.drops and "client 2 in round 2 (connection closed)" in engine.drops[0]
    assert clients[1].finished is None  # it left: nobody to tell


def test_a_stalled_client_is_left_out_at_the_timeout_and_its_late_update_is_refused():
    clients = [FakeClient(1), FakeClient(2)]
    clients[1].gate = asyncio.Event()
    engine, recorder = engine_for(clients)
    # Round 2 starts while client 2 still trains round 1's model: it is not sent round 2's.
    recorder.on(lambda e: isinstance(e, RoundStarted) and e.number == 2, clients[1].gate.set)
    assert run(engine) == ExitStatus.OK
    assert [(row["clients"], row["expected"]) for row in recorder.rows()] == [(1, 2), (1, 1), (2, 2)]
    timed_out = recorder.of(ClientDropped)
    assert [(d.number, d.client_id, d.timed_out) for d in timed_out] == [(1, 2, True)]
    assert clients[1].fits == [1, 3]  # no new model while its late update was outstanding
    assert clients[1].acks == [(1, False), (3, True)]


def test_too_few_updates_retry_the_round_then_the_run_gives_up():
    clients = [FakeClient(1), FakeClient(2)]
    clients[1].drop, clients[1].leaves = "it crashed", False  # flaky: stays, and fails every time
    engine, recorder = engine_for(clients, min_clients=2, round_retries=2)
    with pytest.raises(RunFailed, match="round 1 failed 3 times; the last good model is round 0"):
        run(engine)
    failed = recorder.of(RoundFailed)
    assert [(f.number, f.got, f.needed, f.retry) for f in failed] == [(1, 1, 2, 1), (1, 1, 2, 2), (1, 1, 2, 0)]
    assert clients[0].fits == [1, 1, 1]  # the same round, retried with the same model
    assert clients[0].finished[0] is False and not recorder.of(RoundSaved)


def test_an_update_from_an_earlier_attempt_of_the_same_round_counts():
    clients = [FakeClient(1), FakeClient(2, step=3.0)]
    clients[1].gate = asyncio.Event()
    engine, recorder = engine_for(clients, min_clients=2, num_rounds=1)
    recorder.on(lambda e: isinstance(e, RoundStarted) and e.attempt == 1, clients[1].gate.set)
    assert run(engine) == ExitStatus.OK
    started = recorder.of(RoundStarted)
    assert [(s.attempt, s.picked, s.expected) for s in started] == [(0, [1, 2], [1, 2]), (1, [1], [1, 2])]
    assert recorder.rows()[0]["clients"] == 2 and clients[1].fits == [1]
    assert engine.model.tensors["w"].tolist() == [2.0, 2.0]  # (1 + 3) / 2


def test_sampling_sends_the_model_only_to_the_picked_clients():
    clients = [FakeClient(k) for k in range(1, 11)]
    engine, recorder = engine_for(clients, clients_per_round=3, seed=5)
    assert run(engine) == ExitStatus.OK
    for started in recorder.of(RoundStarted):
        assert len(started.picked) == 3 and started.idle == 7
        assert {c.client_id for c in clients if started.number in c.fits} == set(started.picked)
    again, again_recorder = engine_for([FakeClient(k) for k in range(1, 11)], clients_per_round=3, seed=5)
    run(again)
    assert [s.picked for s in again_recorder.of(RoundStarted)] == [s.picked for s in recorder.of(RoundStarted)]
    assert len({tuple(s.picked) for s in recorder.of(RoundStarted)}) > 1  # not the same three every round


def test_a_stop_during_a_round_ends_the_run_and_nobody_is_called_dropped():
    clients = [FakeClient(1), FakeClient(2)]
    engine, recorder = engine_for(clients, round_timeout_s=30.0)

    def stall_and_stop() -> None:  # the fits of round 2 start after this event: client 2 stalls in it
        clients[1].gate = asyncio.Event()
        engine.control.request_stop("SIGINT")

    recorder.on(lambda e: isinstance(e, RoundStarted) and e.number == 2, stall_and_stop)
    assert run(engine) == ExitStatus.INTERRUPTED
    for client in clients:
        assert client.finished[:2] == (False, 1)
        assert "the server was stopped (SIGINT) after round 1; it can resume from its checkpoint" in client.finished[2]
    assert not recorder.of(ClientDropped)


def test_a_stop_before_any_round_says_there_is_nothing_to_resume():
    clients = [FakeClient(1)]
    clients[0].gate = asyncio.Event()
    engine, recorder = engine_for(clients, round_timeout_s=30.0)
    recorder.on(lambda e: isinstance(e, RoundStarted), lambda: engine.control.request_stop("SIGTERM"))
    assert run(engine) == ExitStatus.TERMINATED
    assert "before any round completed; there is no checkpoint to resume from" in clients[0].finished[2]
    assert "SIGTERM: stopping before its first round completed" in [e.message for e in recorder.of(Notice)]


def test_a_stop_in_the_lobby_says_training_had_not_started():
    engine, recorder = engine_for([FakeClient(1)], start="manual")
    recorder.on(lambda e: getattr(e, "message", "").startswith("waiting for SIGUSR1"),
                lambda: engine.control.request_stop("SIGINT"))
    assert run(engine) == ExitStatus.INTERRUPTED
    assert "SIGINT: stopping before training started" in [e.message for e in recorder.of(Notice)]


def test_the_server_optimiser_state_goes_into_every_checkpoint():
    engine, recorder = engine_for([FakeClient(1, step=2.0)], strategy="fedavgm", server_momentum=0.5, num_rounds=2)
    assert run(engine) == ExitStatus.OK
    states = [e.checkpoint.strategy_state for e in recorder.of(RoundFinished)]
    # round 1: v = 2, x = 2; round 2: delta 2, v = 0.5 * 2 + 2 = 3, x = 5
    assert [s["momentum/w"].tolist() for s in states] == [[2.0, 2.0], [3.0, 3.0]]
    assert engine.model.tensors["w"].tolist() == [5.0, 5.0]


def test_a_robust_strategy_holds_off_a_poisoned_update():
    clients = [FakeClient(k, step=1.0) for k in range(1, 5)] + [FakeClient(5, step=-100.0, num_examples=10**6)]
    fedavg, _ = engine_for([FakeClient(k, step=c.step, num_examples=c.num_examples) for k, c in enumerate(clients, 1)],
                           num_rounds=1)
    run(fedavg)
    assert fedavg.model.tensors["w"][0] < -99  # the claimed example count lets one client pull the mean anywhere
    for strategy in ("median", "trimmed-mean", "krum", "multi-krum"):
        fresh = [FakeClient(c.client_id, step=c.step, num_examples=c.num_examples) for c in clients]
        engine, _ = engine_for(fresh, strategy=strategy, num_rounds=1, min_clients=5, byzantine_clients=1)
        assert run(engine) == ExitStatus.OK
        assert engine.model.tensors["w"].tolist() == [1.0, 1.0], strategy


def test_a_bug_while_folding_an_update_ends_the_run_instead_of_hanging_it():
    class Broken(FakeClient):
        def acknowledge(self, result: FitRes, accepted: bool, note: str) -> None:
            raise KeyError("a bug")

    engine, _ = engine_for([Broken(1), FakeClient(2)], round_timeout_s=600)
    with pytest.raises(KeyError, match="a bug"):
        run(engine)


def test_updates_that_arrive_while_the_last_round_is_evaluated_are_folded_at_once():
    """Round 2's updates come while round 1's model is still being evaluated (in the worker thread):
    they are folded and acknowledged then, not held until the evaluation ends (a held update holds a
    receive buffer, and a client waiting for its <SUCCESS>)."""
    acked_round_2 = threading.Event()

    class Acking(FakeClient):
        def acknowledge(self, result: FitRes, accepted: bool, note: str) -> None:
            super().acknowledge(result, accepted, note)
            if result.round == 2 and all((2, True) in c.acks for c in clients):
                acked_round_2.set()

    clients = [Acking(1), Acking(2)]
    engine, recorder = engine_for(clients, num_rounds=2, round_timeout_s=30)
    seen_during_evaluation = []

    def slow_evaluate(tensors):
        if not seen_during_evaluation:  # round 1's model: wait (bounded) for round 2's updates to be folded
            seen_during_evaluation.append(acked_round_2.wait(timeout=10))
        return {"test_accuracy": float(tensors["w"][0]), "test_loss": 0.0}

    engine.reports.evaluate = slow_evaluate
    assert run(engine) == ExitStatus.OK
    assert seen_during_evaluation == [True]
    assert [row["clients"] for row in recorder.rows()] == [2, 2]


def test_a_stop_keeps_the_updates_that_had_arrived():
    """A stop that comes with updates queued for the round: they are folded and acknowledged first."""

    async def scenario():
        clients = [FakeClient(1), FakeClient(2)]
        round_ = Round(1, 0, time.perf_counter(), (0, 0), lambda event: None, expected={1, 2})
        round_.aggregator = Strategy(ServerConfig()).aggregator({"w": torch.zeros(2)}, 2)
        model = GlobalModel.of({"w": torch.zeros(2)})
        for client in clients:
            fit = asyncio.get_running_loop().create_future()
            fit.set_result(await client.fit(FitIns(1, model, {"lr": 0.1})))
            round_.arrivals.put_nowait((client, fit))
        stopping = asyncio.Event()
        stopping.set()
        with pytest.raises(Stopped):
            await round_.collect(stopping)
        return clients, round_

    clients, round_ = asyncio.run(scenario())
    assert sorted(round_.reported) == [1, 2]
    assert [c.acks for c in clients] == [[(1, True)], [(1, True)]]


# ---- --start manual and --stay: what the dashboard and SIGUSR1 ask of the engine


def test_a_manual_start_waits_for_the_launch_and_applies_its_settings():
    clients = [FakeClient(1), FakeClient(2)]
    engine, recorder = engine_for(clients, start="manual", num_rounds=5)

    def launch() -> None:
        with pytest.raises(ValueError, match="lr 50 is outside"):
            engine.control.request_launch({"lr": 50})
        with pytest.raises(ValueError, match="num_rounds must be a whole number"):
            engine.control.request_launch({"num_rounds": 2.5})
        with pytest.raises(ValueError, match="cannot be set from the dashboard"):
            engine.control.request_launch({"strategy": "krum"})
        assert engine.config.lr == 0.05  # a refused launch changes nothing
        engine.rounds_done = 3  # as a resumed run's
        with pytest.raises(ValueError, match="num_rounds must be more than the 3 round"):
            engine.control.request_launch({"num_rounds": 3})
        engine.rounds_done = 0
        assert engine.control.request_launch({"num_rounds": 2, "lr": 0.1, "batch_size": 8}) == \
            "training starts; num rounds 2; lr 0.1; batch size 8"

    recorder.on(lambda e: getattr(e, "message", "").startswith("waiting for SIGUSR1"), launch)
    assert run(engine) == ExitStatus.OK
    assert len(recorder.rows()) == 2 and engine.config.num_rounds == 2
    with pytest.raises(ValueError, match="already started"):
        engine.control.request_launch({})


def test_a_launch_with_too_few_ready_clients_is_refused():
    engine, recorder = engine_for([FakeClient(1)], start="manual", min_clients=1, num_rounds=1)
    engine.control.needed = 2
    refusals = []

    def launch() -> None:
        with pytest.raises(ValueError, match="1 client\\(s\\) ready, 2 needed") as caught:
            engine.control.request_launch({})
        refusals.append(str(caught.value))
        engine.control.request_stop("the Stop button on the dashboard")

    recorder.on(lambda e: getattr(e, "message", "").startswith("waiting for SIGUSR1"), launch)
    assert run(engine) == ExitStatus.INTERRUPTED  # stopped in the lobby, as Ctrl-C would
    assert refusals and not recorder.rows()


def test_sigusr1_starts_a_manual_run():
    engine, recorder = engine_for([FakeClient(1)], start="manual", num_rounds=1)
    recorder.on(lambda e: getattr(e, "message", "").startswith("waiting for SIGUSR1"), engine.control.signal_go)
    assert run(engine) == ExitStatus.OK
    assert len(recorder.rows()) == 1


def test_stay_keeps_the_clients_for_more_sessions_from_the_last_model():
    from fedsock.events import SessionFinished, TrainingStarted

    clients = [FakeClient(1, step=1.0), FakeClient(2, step=1.0)]
    engine, recorder = engine_for(clients, stay=True, num_rounds=2)
    sessions = []

    def between() -> None:
        sessions.append(engine.control.phase)
        if len(sessions) == 1:
            with pytest.raises(ValueError, match="rounds 0 is outside 1..100000"):
                engine.control.request_more(0)
            assert engine.control.request_more(3) == "3 more round(s)"
        elif len(sessions) == 2:
            engine.control.signal_go()  # SIGUSR1: another session as long as the last (3 rounds)
        else:
            engine.control.request_stop("the Stop button on the dashboard")

    recorder.on(lambda e: isinstance(e, SessionFinished), between)
    with pytest.raises(ValueError, match="only when a session has ended"):
        engine.control.request_more(3)
    assert run(engine) == ExitStatus.OK  # stopped between sessions: every round asked for was done
    assert sessions == ["between sessions"] * 3
    assert [row["round"] for row in recorder.rows()] == list(range(1, 9))
    assert [row["test_accuracy"] for row in recorder.rows()] == [float(n) for n in range(1, 9)]  # never restarted
    assert [(e.session, e.first_round, e.num_rounds) for e in recorder.of(TrainingStarted)] == [(1, 1, 2), (2, 3, 5),
                                                                                                (3, 6, 8)]
    for client in clients:
        assert client.sessions == [(1, 2), (2, 5), (3, 8)]
        assert client.finished[:2] == (True, 8) and "in 3 sessions" in client.finished[2]


def test_a_launch_setting_from_the_command_line_stands_even_beyond_the_pages_limits():
    engine, recorder = engine_for([FakeClient(1)], start="manual", num_rounds=1, lr=20.0, batch_size=8192)
    answers = []

    def launch() -> None:
        with pytest.raises(ValueError, match="already"):
            engine.control.launch.set()
            engine.control.request_launch({})
        engine.control.launch.clear()
        answers.append(engine.control.request_launch({"lr": 20.0, "batch_size": 8192, "num_rounds": 1}))  # the page's form

    recorder.on(lambda e: getattr(e, "message", "").startswith("waiting for SIGUSR1"), launch)
    assert run(engine) == ExitStatus.OK
    assert answers == ["training starts"] and (engine.config.lr, engine.config.batch_size) == (20.0, 8192)


def test_an_over_selected_round_closes_with_the_updates_it_needs_and_tells_the_late_one():
    """--over-select 1.3 with K = 3 of 4: all 4 are picked, the round closes at 3 updates; the fourth,
    still training, is no drop, and its update is acknowledged as not needed (Bonawitz et al. 2019)."""

    class Noting(FakeClient):
        def acknowledge(self, result: FitRes, accepted: bool, note: str) -> None:
            self.acks.append((result.round, accepted, note))

    clients = [FakeClient(1), FakeClient(2), FakeClient(3), Noting(4, step=100.0)]
    clients[3].gate = asyncio.Event()
    engine, recorder = engine_for(clients, clients_per_round=3, over_select=1.3)
    recorder.on(lambda e: isinstance(e, RoundStarted) and e.number == 3, clients[3].gate.set)
    assert run(engine) == ExitStatus.OK
    rows = recorder.rows()
    assert [(row["clients"], row["expected"]) for row in rows] == [(3, 4), (3, 3), (3, 3)]
    assert [row["test_accuracy"] for row in rows] == [1.0, 2.0, 3.0]  # the slow client's step never counted
    assert not recorder.of(ClientDropped)
    assert any("round 1: closed with the 3 updates it needed; client(s) 4" in n.message for n in recorder.of(Notice))
    assert clients[3].acks[0][:2] == (1, False) and "this update was not needed" in clients[3].acks[0][2]


def test_over_selection_samples_more_and_plans_for_the_k_that_close_the_round():
    strategy = Strategy(ServerConfig(num_clients=10, clients_per_round=4, over_select=1.3))
    assert (strategy.clients_to_sample(10), strategy.enough(10), strategy.planned(6, 10)) == (6, 4, 4)
    assert len(strategy.sample(list(range(1, 11)), 1, 0)) == 6
    assert strategy.clients_to_sample(5) == 5  # never more than are ready
    plain = Strategy(ServerConfig(num_clients=10, clients_per_round=4))
    assert (plain.clients_to_sample(10), plain.enough(10), plain.planned(4, 10)) == (4, None, 4)


@pytest.mark.parametrize("flags, said", [
    (["--over-select", "1.3"], "--over-select needs --clients-per-round K or --fraction-fit C"),
    (["--over-select", "1.3", "--fraction-fit", "0.5", "--sampling", "poisson"], "does not go with --sampling poisson"),
    (["--over-select", "1.3", "--clients-per-round", "3", "--secure-aggregation"], "does not go with --secure-aggregation"),
    (["--over-select", "0.5", "--clients-per-round", "3"], "--over-select: must be"),
])
def test_over_selection_that_cannot_work_is_one_line(flags, said):
    from support import run_cli

    code, printed = run_cli("fl_server", ["--num-clients", "5", *flags])
    assert code == 2 and said in printed and "Traceback" not in printed, printed
