"""The virtual clock of fl_simulate.py (fedsock/virtual_time.py): the speed profiles, the order in which
the engines see updates, and the virtual time of rounds and versions.

The engines here are the real ones, with real VirtualClients whose backend is a fake: it adds the
client's id to every weight (so each aggregate can be checked by hand) after sleeping for real as long
as the test says, in a thread, as a backend trains. Milliseconds of real time each; the virtual times
are exact ."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch

from fedsock.buffered import BufferedEngine
from fedsock.clients import ClientPool, GlobalModel
from fedsock.config import ServerConfig
from fedsock.console import ExitStatus
from fedsock.engine import RoundEngine
from fedsock.events import ClientDropped, Events, RoundStarted, UpdateAccepted, UpdateDiscarded
from fedsock.simulate import Faults, VirtualClient, come_and_go
from fedsock.strategies import Strategy
from fedsock.transport import Traffic
from fedsock.virtual_time import Availability, SpeedProfiles, run_virtual, sleep_until, virtual_now
from test_engine import Recorder

bounded = pytest.mark.timeout(60)  # real seconds; each test takes well under one


class FakeBackend:
    """Trains by adding the client's id to each weight, after `real_s[client id]` real seconds in a thread."""

    def __init__(self, real_s: dict[int, float] | None = None):
        self.real_s = real_s or {}
        self.finished: list[int] = []  # client ids, in the order their real training ended

    async def fit(self, client_id: int, ins):
        return await asyncio.get_running_loop().run_in_executor(None, self._fit, client_id, ins.model.tensors)

    def _fit(self, client_id: int, tensors: dict) -> tuple[dict, dict]:
        time.sleep(self.real_s.get(client_id, 0.0))
        self.finished.append(client_id)
        return {name: t + client_id for name, t in tensors.items()}, {"train_loss": 0.5, "fit_seconds": 0.0}


def virtual_run(engine_class, examples: dict[int, int], speeds: SpeedProfiles, backend: FakeBackend | None = None,
                availability: Availability | None = None, evaluation_s: float = 0.0, faults: Faults | None = None,
                **changes):
    """Run an engine over VirtualClients holding `examples[id]` examples each, on the virtual clock: the
    engine, its recorder and the backend."""
    config = ServerConfig(**{"num_clients": len(examples), "model": "logreg", "time_to_wait_s": 0.0,
                             "round_timeout_s": 1000.0, "num_rounds": 3, "round_retries": 1, **changes})
    backend = backend or FakeBackend()
    pool = ClientPool(config.num_clients)
    faults = faults or Faults(0, 0.0, 0.0, 0.0)
    clients = [VirtualClient(client_id, count, backend, faults, speeds=speeds,
                             availability=availability) for client_id, count in examples.items()]
    if availability is None:  # otherwise come_and_go adds those here
        for client in clients:
            pool.joined(client)
            pool.add(client)
    recorder = Recorder()
    def evaluate(tensors: dict) -> dict:
        time.sleep(evaluation_s)  # the server's evaluation, in its worker thread
        return {"test_accuracy": float(tensors["w"][0]), "test_loss": 0.0}

    engine = engine_class(config, Strategy(config), pool, GlobalModel.of({"w": torch.zeros(2)}), evaluate,
                          Events([recorder]), Traffic())

    async def run() -> int:
        comings = asyncio.ensure_future(come_and_go(pool, clients, availability)) if availability else None
        try:
            return await engine.run()
        finally:
            if comings is not None:
                comings.cancel()

    assert run_virtual(run()) == ExitStatus.OK
    return engine, recorder, backend


# ---- the profiles


def test_the_profiles_are_drawn_from_the_seed_with_the_stated_distribution():
    profiles = SpeedProfiles(seed=3, num_clients=2000, sigma=0.5, slow_share=0.2, slow_factor=10.0)
    again = SpeedProfiles(seed=3, num_clients=2000, sigma=0.5, slow_share=0.2, slow_factor=10.0)
    ids = range(1, 2001)
    slowness = np.array([profiles.slowness(i) for i in ids])
    assert slowness.tolist() == [again.slowness(i) for i in ids]  # from (seed, client id) alone
    assert len(profiles.slow_clients) == 400 and profiles.slow_clients <= set(ids)  # exactly round(P·N)
    assert profiles.slow_clients != SpeedProfiles(seed=4, num_clients=2000, slow_share=0.2).slow_clients
    # a slow client is F times slower than its own lognormal draw; the draws are lognormal(0, σ)
    plain = SpeedProfiles(seed=3, num_clients=2000, sigma=0.5)
    assert all(profiles.slowness(i) == pytest.approx(10 * plain.slowness(i)) for i in profiles.slow_clients)
    logs = np.log([plain.slowness(i) for i in ids])
    assert abs(logs.mean()) < 0.05 and logs.std() == pytest.approx(0.5, abs=0.03)
    # a fit's time: examples × epochs / rate × slowness
    flat = SpeedProfiles(seed=3, num_clients=10, examples_per_s=50.0, slow_share=0.1, slow_factor=4.0)
    (slow,) = flat.slow_clients
    assert flat.fit_seconds(slow, 100, 2) == 16.0 and flat.fit_seconds(slow % 10 + 1, 100, 2) == 4.0


# ---- the clock


@bounded
def test_the_clock_releases_work_in_virtual_order_whatever_order_its_real_work_ends_in():
    """Three fits whose real work ends in the opposite order of their virtual finish times."""
    released: list[tuple[int, float]] = []

    async def fit(client_id: int, real_s: float, virtual_s: float) -> None:
        await asyncio.get_running_loop().run_in_executor(None, time.sleep, real_s)
        await sleep_until(virtual_s, client_id)
        released.append((client_id, virtual_now()))

    async def main() -> float:
        started = time.perf_counter()
        await asyncio.gather(fit(1, 0.3, 105.0), fit(2, 0.2, 107.0), fit(3, 0.0, 109.0), fit(4, 0.1, 107.0))
        return time.perf_counter() - started

    real_s = run_virtual(main(), start_s=100.0)
    assert released == [(1, 105.0), (2, 107.0), (4, 107.0), (3, 109.0)]  # ties: in the order of the ids
    assert real_s < 2.0  # the virtual seconds were not waited for


@bounded
def test_the_engine_sees_updates_in_virtual_order_not_in_the_order_training_ends():
    """FedBuff with K=1: each update is a version, so the versions' order is the arrivals'. Client 1 is the
    fastest in virtual time and the slowest in real time."""
    speeds = SpeedProfiles(seed=0, num_clients=3, examples_per_s=10.0)
    backend = FakeBackend({1: 0.3, 2: 0.15, 3: 0.0})
    engine, recorder, _ = virtual_run(BufferedEngine, {1: 10, 2: 20, 3: 30}, speeds, backend, async_buffer=1,
                                      num_rounds=3, max_staleness=5)
    assert backend.finished[:3] == [3, 2, 1]  # real time: the other way round
    assert [e.client_id for e in recorder.of(UpdateAccepted)] == [1, 1, 2]  # virtual time: 1, 2 and 2 s
    rows = recorder.rows()
    # client 1 makes v1 at 1 s, and v2 at 2 s from v1; client 2's update from v0, done at 2 s too, comes after
    # it (ties in the order of the ids), 2 versions behind
    assert [row["virtual_seconds"] for row in rows] == pytest.approx([1.0, 2.0, 2.0])
    assert [row["staleness"] for row in rows] == [0, 0, 2]
    assert [row["test_accuracy"] for row in rows] == pytest.approx([1.0, 2.0, 2.0 + 2 / 3 ** 0.5])


@bounded
def test_a_synchronous_rounds_virtual_time_is_its_slowest_clients():
    speeds = SpeedProfiles(seed=0, num_clients=3, examples_per_s=100.0)
    _, recorder, _ = virtual_run(RoundEngine, {1: 100, 2: 200, 3: 300}, speeds, FakeBackend({3: 0.0, 1: 0.2}))
    rows = recorder.rows()
    assert [row["virtual_seconds"] for row in rows] == pytest.approx([3.0, 6.0, 9.0])
    # example-weighted: (100·1 + 200·2 + 300·3) / 600 a round
    assert [row["test_accuracy"] for row in rows] == pytest.approx([14 / 6, 28 / 6, 42 / 6])


@bounded
def test_a_stragglers_delay_is_virtual_seconds_too():
    """--straggler-rate 1 --straggler-delay 5 on the clock: every fit 5 virtual seconds later, and no real wait."""
    speeds = SpeedProfiles(seed=0, num_clients=2, examples_per_s=100.0)
    started = time.perf_counter()
    _, recorder, _ = virtual_run(RoundEngine, {1: 100, 2: 200}, speeds, faults=Faults(0, 0.0, 1.0, 5.0))
    assert [row["virtual_seconds"] for row in recorder.rows()] == pytest.approx([7.0, 14.0, 21.0])
    assert time.perf_counter() - started < 5.0


@bounded
def test_a_round_timeout_is_in_virtual_seconds():
    """Client 3 takes 3 virtual seconds; a round waits 2.5. It is left out of round 1 and still busy when round 2
    starts, so round 2 has clients 1 and 2; its late update (at 3 s) is discarded; round 3 times out like round 1."""
    speeds = SpeedProfiles(seed=0, num_clients=3, examples_per_s=100.0)
    _, recorder, _ = virtual_run(RoundEngine, {1: 100, 2: 200, 3: 300}, speeds, round_timeout_s=2.5)
    rows = recorder.rows()
    assert [row["virtual_seconds"] for row in rows] == pytest.approx([2.5, 4.5, 7.0])
    assert [row["clients"] for row in rows] == [2, 2, 2]
    assert [(e.number, e.client_id) for e in recorder.of(ClientDropped) if e.timed_out] == [(1, 3), (3, 3)]
    assert [e.picked for e in recorder.of(RoundStarted)] == [[1, 2, 3], [1, 2], [1, 2, 3]]
    assert [(e.number, e.client_id) for e in recorder.of(UpdateDiscarded)] == [(1, 3)]  # at 3 s, in round 2


@bounded
def test_fedbuff_with_a_slow_client_makes_versions_sooner_than_rounds_and_folds_it_stale():
    """Four clients of 1 s, one of them 10× slower: a round takes 10 s, while FedBuff (K=2) makes versions
    every half second or so, and folds the slow update, many versions behind, when it comes."""
    examples = {i: 100 for i in range(1, 5)}
    speeds = SpeedProfiles(seed=1, num_clients=4, examples_per_s=100.0, slow_share=0.25, slow_factor=10.0)
    (slow,) = speeds.slow_clients
    _, sync, _ = virtual_run(RoundEngine, examples, speeds, num_rounds=3)
    engine, buffered, _ = virtual_run(BufferedEngine, examples, speeds, async_buffer=2, num_rounds=20,
                                      max_staleness=50)
    assert [row["virtual_seconds"] for row in sync.rows()] == pytest.approx([10.0, 20.0, 30.0])
    versions = buffered.rows()
    assert versions[2]["virtual_seconds"] < 10.0 / 3  # 3 versions before a third of one round
    assert versions[-1]["virtual_seconds"] < 20.0  # 20 versions before 2 rounds
    slow_updates = [e for e in buffered.of(UpdateAccepted) if e.client_id == slow]
    assert slow_updates and slow_updates[0].metrics["staleness"] >= 5
    assert max(row["staleness"] for row in versions) >= 5


@bounded
def test_the_same_seed_gives_the_same_virtual_times_and_the_same_model():
    """Real training times differ from run to run (here on purpose); the virtual clock's results do not."""
    examples = {i: 100 for i in range(1, 7)}
    speeds = SpeedProfiles(seed=2, num_clients=6, examples_per_s=100.0, sigma=0.5, slow_share=0.34)
    runs = []
    for real_s in ({1: 0.1, 4: 0.05}, {2: 0.1, 6: 0.08}):
        engine, recorder, _ = virtual_run(BufferedEngine, examples, speeds, FakeBackend(real_s), async_buffer=2,
                                          num_rounds=8, max_staleness=20)
        runs.append(([(row["virtual_seconds"], row["staleness"]) for row in recorder.rows()],
                     engine.model.tensors["w"].tolist(), [e.client_id for e in recorder.of(UpdateAccepted)]))
    assert runs[0] == runs[1]


@bounded
@pytest.mark.parametrize("engine_class, changes", [(RoundEngine, {}), (BufferedEngine, {"async_buffer": 2})])
def test_virtual_time_stands_still_while_the_server_evaluates(engine_class, changes):
    """The server's evaluation is real work too: while it runs (here 50 ms a model, longer than the clients'
    real training), no fit is released, so a slow evaluation changes no virtual time and no model."""
    examples = {i: 100 for i in range(1, 6)}
    speeds = SpeedProfiles(seed=4, num_clients=5, examples_per_s=100.0, sigma=0.5, slow_share=0.2)
    runs = []
    for evaluation_s in (0.0, 0.05):
        engine, recorder, _ = virtual_run(engine_class, examples, speeds, evaluation_s=evaluation_s, num_rounds=6,
                                          max_staleness=20, **changes)
        runs.append(([(row["virtual_seconds"], row.get("staleness")) for row in recorder.rows()],
                     engine.model.tensors["w"].tolist()))
    assert runs[0] == runs[1]


# ---- clients that come and go


def test_availability_is_drawn_from_the_seed_and_a_fit_is_lost_when_its_client_goes():
    away = Availability(seed=5, share=0.7, period_s=10.0)
    here = np.array([[away.here(i, k) for k in range(50)] for i in range(1, 201)])
    assert here.mean() == pytest.approx(0.7, abs=0.02)
    assert here.tolist() == [[Availability(5, 0.7, 10.0).here(i, k) for k in range(50)] for i in range(1, 201)]
    assert Availability(seed=5).here(3, 7) and Availability(seed=5).leaves_at(3, 0.0, 1e6) is None  # share 1
    for client_id in range(1, 30):
        for start_s in (0.0, 14.0, 95.5):
            leaves = away.leaves_at(client_id, start_s, start_s + 35.0)
            periods = range(away.period(start_s), away.period(start_s + 35.0 - 1e-9) + 1)
            if leaves is None:
                assert all(away.here(client_id, k) for k in periods)
            else:  # the first period of the fit it is away in: at its start, or the fit's own start
                first_away = next(k for k in periods if not away.here(client_id, k))
                assert leaves == max(start_s, first_away * 10.0)


def test_the_next_period_a_client_is_here_or_away_is_the_first_such_draw():
    away = Availability(seed=5, share=0.7, period_s=10.0)
    for client_id in range(1, 20):
        for start in (0, 3, 11):
            for here in (True, False):
                found = away.next_period(client_id, start, here)
                assert found >= start and away.here(client_id, found) == here
                assert all(away.here(client_id, k) != here for k in range(start, found))
    assert Availability(seed=5).next_period(1, 0, here=False) is None  # share 1: never away
    assert Availability(seed=5, share=0.0).next_period(1, 0, here=True) is None  # share 0: never here


def test_real_slowdowns_are_the_slownesses_with_the_fastest_client_at_real_speed():
    """Over sockets time is real, and training cannot be sped up: slownesses of 1 or more are kept as they
    are; with a faster client, all are scaled by it, so their ratios stay the virtual clock's."""
    plain = SpeedProfiles(seed=3, num_clients=10, slow_share=0.3, slow_factor=4.0)
    assert [plain.real_slowdown(k) for k in range(1, 11)] == [plain.slowness(k) for k in range(1, 11)]
    spread = SpeedProfiles(seed=3, num_clients=10, sigma=1.0)
    assert spread.fastest < 1 and min(spread.real_slowdown(k) for k in range(1, 11)) == pytest.approx(1.0)
    assert [spread.real_slowdown(k) * spread.fastest for k in range(1, 11)] == \
        pytest.approx([spread.slowness(k) for k in range(1, 11)])


@bounded
def test_clients_that_come_and_go_send_only_updates_trained_while_they_were_here():
    """FedBuff (K=1: each version one update, made at its finish) over 6 clients here 60% of 1.5 s periods; a
    fit takes 1 s. Each accepted update was trained in periods its client was here; others were lost."""
    availability = Availability(seed=7, share=0.6, period_s=1.5)
    speeds = SpeedProfiles(seed=7, num_clients=6, examples_per_s=100.0)
    _, recorder, _ = virtual_run(BufferedEngine, {i: 100 for i in range(1, 7)}, speeds, availability=availability,
                                 async_buffer=1, num_rounds=12, max_staleness=50)
    finishes = [row["virtual_seconds"] for row in recorder.rows()]
    for accepted, finish_s in zip(recorder.of(UpdateAccepted), finishes):
        periods = range(availability.period(finish_s - 1.0), availability.period(finish_s - 1e-9) + 1)
        assert all(availability.here(accepted.client_id, k) for k in periods), (accepted.client_id, finish_s)
    lost = [e for e in recorder.of(ClientDropped) if "went away (--availability)" in e.reason]
    assert lost and len(recorder.rows()) == 12
