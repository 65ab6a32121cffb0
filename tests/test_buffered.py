"""Buffered asynchronous aggregation (FedBuff) with fake clients behind the ClientProxy seam: no socket,
no process, milliseconds.

The fakes are tests/test_engine.py's: each answers with the weights it was sent plus its own step, so
every version can be computed by hand. A slow client is one whose gate the test opens from the
engine's own events (a version opening), never after a sleep.
"""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

import fl_server
from fedsock.buffered import BufferedEngine, VersionBuffer, plain_step, staleness_weight
from fedsock.clients import GlobalModel
from fedsock.config import ServerConfig
from fedsock.console import ExitStatus
from fedsock.engine import RunFailed
from fedsock.events import ClientDropped, Events, Notice, RoundFinished, RoundStarted, UpdateDiscarded
from fedsock.privacy import Privacy, PrivacySettings, clip_delta, gaussian_epsilon, gaussian_noise
from fedsock.strategies import Strategy
from fedsock.transport import Traffic
from test_engine import FakeClient, Recorder, pool_of, run


def buffered_engine(clients: list[FakeClient], privacy: Privacy | None = None, resumed=None,
                    **changes) -> tuple[BufferedEngine, Recorder]:
    config = ServerConfig(**{"num_clients": len(clients), "model": "logreg", "time_to_wait_s": 0.0,
                             "round_timeout_s": 5.0, "num_rounds": 3, "round_retries": 1, "async_buffer": 1,
                             **changes})
    pool = pool_of(clients, config.num_clients)
    recorder = Recorder()
    model = GlobalModel.of(resumed.model if resumed else {"w": torch.zeros(2)})
    engine = BufferedEngine(config, Strategy(config, privacy), pool, model,
                            lambda tensors: {"test_accuracy": float(tensors["w"][0]), "test_loss": 0.0},
                            Events([recorder]), Traffic(), resumed)
    return engine, recorder


def open_gate_when_version_opens(recorder: Recorder, client: FakeClient, number: int) -> None:
    """A slow client: its first fit waits until the buffer of version `number` opens."""
    client.gate = asyncio.Event()
    recorder.on(lambda e: isinstance(e, RoundStarted) and e.number == number, lambda: client.gate.set())


# ---- the maths


def test_staleness_weights_follow_the_rule_and_never_exceed_one():
    assert [staleness_weight(s, "sqrt") for s in (0, 3, 8)] == [1.0, 0.5, pytest.approx(1 / 3)]  # FedBuff's 1/√(1+s)
    assert [staleness_weight(s, "constant") for s in (0, 5)] == [1.0, 1.0]
    assert [staleness_weight(s, "poly:2") for s in (0, 1, 3)] == [1.0, 0.25, 0.0625]
    assert staleness_weight(4, "poly:0") == 1.0
    with pytest.raises(ValueError, match="negative"):
        staleness_weight(-1, "sqrt")


def test_a_buffer_is_the_weighted_sum_of_deltas_against_each_updates_own_base_over_k():
    buffer = VersionBuffer(5, 2, {"w": torch.zeros(2)})
    base_old, base_new = {"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([4.0, 4.0])}
    metrics = {"train_loss": 1.0, "fit_seconds": 0.5}
    buffer.add(1, base_old, {"w": torch.tensor([3.0, 1.0])}, 3, 0.5, 10, metrics)  # Δ (2, 0), weight 1/2
    buffer.add(2, base_new, {"w": torch.tensor([5.0, 6.0])}, 0, 1.0, 30, metrics)  # Δ (1, 2), weight 1
    with pytest.raises(ValueError, match="already has an update in version 5"):
        buffer.add(2, base_new, base_new, 0, 1.0, 30, metrics)
    assert buffer.full and buffer.mean_delta()["w"].tolist() == [1.0, 1.0]  # ((1, 0) + (1, 2)) / 2
    new = plain_step({"w": torch.tensor([4.0, 4.0])}, buffer.mean_delta(), server_lr=0.5)
    assert new["w"].tolist() == [4.5, 4.5] and new["w"].dtype == torch.float32
    row = buffer.row()
    assert (row["round"], row["clients"], row["staleness"], row["mean_staleness"]) == (5, 2, 3, 1.5)


def test_with_central_dp_each_delta_is_clipped_and_the_sum_noised_once_over_k():
    clip, std = 1.0, 0.3
    buffer = VersionBuffer(1, 2, {"w": torch.zeros(2)}, clip=clip, noise_std=std,
                           generator=torch.Generator().manual_seed(7))
    zero, metrics = {"w": torch.zeros(2)}, {"train_loss": 0.0, "fit_seconds": 0.0}
    buffer.add(1, zero, {"w": torch.tensor([30.0, 40.0])}, 0, 1.0, 10, metrics)  # norm 50: clipped to (0.6, 0.8)
    buffer.add(2, zero, {"w": torch.tensor([0.0, 0.5])}, 3, 0.5, 10, metrics)  # inside the clip, weighted 1/2
    noise = gaussian_noise({"w": torch.zeros(2)}, std, torch.Generator().manual_seed(7))["w"]
    expected = (torch.tensor([0.6, 0.8], dtype=torch.float64) + torch.tensor([0.0, 0.25], dtype=torch.float64)
                + noise) / 2
    assert torch.allclose(buffer.mean_delta()["w"], expected)
    assert clip_delta({"w": torch.tensor([30.0, 40.0])}, clip)[1] == 50.0


# ---- versions, with fake clients


def test_each_version_takes_k_updates_and_a_slow_update_is_weighted_against_its_own_base():
    fast_a, fast_b, slow = FakeClient(1, step=1.0), FakeClient(2, step=3.0), FakeClient(3, step=5.0)
    engine, recorder = buffered_engine([fast_a, fast_b, slow], async_buffer=2, num_rounds=4)
    open_gate_when_version_opens(recorder, slow, 3)  # it trains version 0 until version 2 is made
    assert run(engine) == ExitStatus.OK
    rows = recorder.rows()
    # v1 = 0 + (1 + 3)/2 = 2; v2 = 4; v3 = 6; v4 = 6 + (5/√(1+3) + 1)/2: the slow client's Δ = 5 from version 0,
    # weighted 1/2, and client 1's from version 3
    assert [row["test_accuracy"] for row in rows] == [2.0, 4.0, 6.0, 7.75]
    assert [(row["round"], row["clients"], row["staleness"], row["mean_staleness"]) for row in rows] == \
        [(1, 2, 0, 0.0), (2, 2, 0, 0.0), (3, 2, 0, 0.0), (4, 2, 3, 1.5)]
    # The slow client's update went into version 4, made from version 3 on: it was not sent version 3, though
    # idle, because a version takes one update per client.
    assert slow.fits == [1] and slow.acks == [(1, True)]
    assert fast_a.fits == [1, 2, 3, 4] and all(accepted for _, accepted in fast_a.acks)
    assert fast_b.fits == [1, 2, 3, 4] and fast_b.acks[-1] == (4, False)  # its version-3 update came after the last
    assert recorder.of(UpdateDiscarded)[-1].reason.startswith("the session had made its last version (4)")
    assert [e.checkpoint.round for e in recorder.of(RoundFinished)] == [1, 2, 3, 4]  # a checkpoint per version
    assert fast_a.finished[:2] == (True, 4)


def test_a_client_whose_fit_dropped_may_train_the_same_version_when_it_is_back():
    """A dropped fit brought no update, so the version it was on may still take one from that client: with
    K = 2 and two clients, version 1 needs the client that went away mid-fit to train version 0 again
    (a real client comes back by reconnecting; --availability's clients do)."""
    steady, leaving = FakeClient(1, step=1.0), FakeClient(2, step=3.0)
    leaving.drop = "connection closed"
    engine, recorder = buffered_engine([steady, leaving], async_buffer=2, num_rounds=2, round_timeout_s=1.0)

    def come_back() -> None:
        leaving.drop = None
        engine.pool.joined(leaving)
        engine.pool.add(leaving)

    recorder.on(lambda e: isinstance(e, ClientDropped) and e.client_id == 2, come_back)
    assert run(engine) == ExitStatus.OK
    assert leaving.fits == [1, 1, 2] and steady.fits == [1, 2]
    assert [row["test_accuracy"] for row in recorder.rows()] == [2.0, 4.0]  # (1 + 3) / 2 each version


def test_a_client_that_fails_at_once_every_time_is_sent_a_version_again_only_once():
    """A simulated crash (--drop-rate) fails the same (client, version) every time it is tried, in no time:
    sent the version again after each failure, it was sent it over and over while the others trained (on a
    virtual clock, where their training takes virtual time and the failures none, forever)."""
    steady_a, steady_b, broken = FakeClient(1, step=1.0), FakeClient(2, step=1.0), FakeClient(3, step=1.0)
    broken.drop, broken.leaves = "a simulated crash (--drop-rate)", False  # it stays in the pool
    steady_a.gate = steady_b.gate = asyncio.Event()  # the others train once the broken one has failed twice
    engine, recorder = buffered_engine([steady_a, steady_b, broken], async_buffer=2, num_rounds=2,
                                       round_timeout_s=1.0)
    drops = []
    recorder.on(lambda e: isinstance(e, ClientDropped) and e.client_id == 3, lambda: drops.append(1))
    recorder.on(lambda e: isinstance(e, ClientDropped) and e.client_id == 3 and len(drops) >= 2,
                steady_a.gate.set)
    assert run(engine) == ExitStatus.OK
    assert broken.fits.count(1) == 2, broken.fits  # version 1 (the first): tried once, and once again


def test_an_update_past_max_staleness_is_dropped_and_its_client_told():
    fast, slow = FakeClient(1, step=1.0), FakeClient(2, step=100.0)
    engine, recorder = buffered_engine([fast, slow], async_buffer=1, max_staleness=1, num_rounds=5)
    open_gate_when_version_opens(recorder, slow, 3)
    assert run(engine) == ExitStatus.OK
    rows = recorder.rows()
    assert [row["test_accuracy"] for row in rows[:3]] == [1.0, 2.0, 3.0]
    assert all(row["staleness"] <= 1 for row in rows) and len(rows) == 5
    dropped = recorder.of(UpdateDiscarded)[0]
    assert (dropped.number, dropped.client_id) == (4, 2)
    assert dropped.reason == ("this update started from version 0, 3 versions behind the newest (3); the server uses "
                              "none more than 1 behind (--max-staleness): it was not used")
    assert slow.acks[0] == (1, False)
    # sent a version at least as new as the one its update was dropped against (3): whether its second update
    # beat the fast client's depends on when the engine's evaluation thread yields
    assert slow.fits[0] == 1 and slow.fits[1] >= 4
    assert set(engine.bases) == {4, 5}  # the versions an update may still start from, and no older


def test_central_dp_accounts_one_gaussian_per_version_without_amplification():
    z, clip, delta = 2.0, 1.0, 1e-5
    privacy = Privacy(PrivacySettings(clip, z, delta, "central", "none"))
    clients = [FakeClient(k, step=10.0) for k in (1, 2, 3)]
    engine, recorder = buffered_engine(clients, privacy, async_buffer=2, num_rounds=3, clients_per_round=2,
                                       dp_clip=clip, dp_noise_multiplier=z)
    engine.generator = torch.Generator().manual_seed(0)
    assert run(engine) == ExitStatus.OK
    assert privacy.accountant.history == [[z, 3, 2, 1.0]] * 3
    epsilon = gaussian_epsilon(1 / math.sqrt(3 / (z / 2) ** 2), delta)  # replace-one: each version's z/2, composed
    assert recorder.rows()[-1]["epsilon"] == pytest.approx(epsilon)
    # each Δ = (10, 10) is clipped to norm 1 before it is summed: without noise every version would move w by 1/√2
    generator, w = torch.Generator().manual_seed(0), torch.zeros(2, dtype=torch.float64)
    for _ in range(3):
        w += (2 * torch.full((2,), 1 / math.sqrt(2), dtype=torch.float64)
              + gaussian_noise({"w": w}, z * clip, generator)["w"]) / 2
    assert torch.allclose(engine.model.tensors["w"].double(), w, atol=1e-6)


def test_the_accountant_of_an_async_run_claims_no_sampling(capsys):
    from fedsock.prepare import make_privacy

    config = ServerConfig(num_clients=10, clients_per_round=4, async_buffer=2, dp_clip=1.0, dp_noise_multiplier=1.0)
    assert make_privacy(config, None).accountant.sampling == "none"
    assert "with no sampling amplification" in capsys.readouterr().out
    assert make_privacy(ServerConfig(num_clients=10, clients_per_round=4, dp_clip=1.0, dp_noise_multiplier=1.0),
                        None).accountant.sampling == "fixed"


def test_at_most_c_clients_train_at_once():
    clients = [FakeClient(k) for k in range(1, 6)]
    engine, recorder = buffered_engine(clients, async_buffer=2, clients_per_round=2, num_rounds=3, seed=3)
    in_flight = []
    recorder.on(lambda e: isinstance(e, RoundStarted), lambda: in_flight.append(len(engine.pool.busy)))
    assert run(engine) == ExitStatus.OK
    assert in_flight and max(in_flight) <= 2
    assert sum(len(c.fits) for c in clients) <= 2 * 3 + 2  # 3 versions of 2 updates, and at most 2 left in flight


def test_a_resumed_run_continues_the_versions_from_its_checkpoint():
    first, recorder = buffered_engine([FakeClient(1, step=1.0), FakeClient(2, step=3.0)], async_buffer=2, num_rounds=2)
    assert run(first) == ExitStatus.OK
    checkpoint = recorder.of(RoundFinished)[-1].checkpoint
    assert checkpoint.round == 2
    clients = [FakeClient(1, step=1.0), FakeClient(2, step=3.0)]
    again, recorder = buffered_engine(clients, resumed=checkpoint, async_buffer=2, num_rounds=4)
    assert run(again) == ExitStatus.OK
    assert [(row["round"], row["test_accuracy"]) for row in recorder.rows()] == [(3, 6.0), (4, 8.0)]
    assert [row["round"] for row in again.metrics] == [1, 2, 3, 4]
    assert clients[0].fits[0] == 3  # the first model sent is version 2's


def test_when_no_update_arrives_in_time_it_says_so_then_gives_up():
    stuck = FakeClient(1)
    stuck.gate = asyncio.Event()  # never opened
    engine, recorder = buffered_engine([stuck], round_timeout_s=0.05, round_retries=1)
    with pytest.raises(RunFailed, match="version 1: no update arrived in 2 waits of 0.05 s \\(0 of 1 in the buffer\\); "
                                        "the last good model is version 0"):
        run(engine)
    assert [e.message for e in recorder.of(Notice) if e.warning] == [
        "version 1: no update arrived in 0.05 s (0 of 1 in the buffer, 1 client(s) training); waiting again "
        "(retry 1 of 1)"]
    assert stuck.finished[0] is False


def test_a_stop_during_a_version_ends_the_run():
    clients = [FakeClient(1), FakeClient(2)]
    engine, recorder = buffered_engine(clients, async_buffer=2, num_rounds=5)

    def stall_and_stop() -> None:
        clients[1].gate = asyncio.Event()
        engine.control.request_stop("SIGINT")

    recorder.on(lambda e: isinstance(e, RoundStarted) and e.number == 2, stall_and_stop)
    assert run(engine) == ExitStatus.INTERRUPTED
    assert clients[0].finished[:2] == (False, 1)


# ---- what is refused, in one line


@pytest.mark.parametrize("flags, says", [
    (["--async-buffer", "2", "--secure-aggregation"], "--secure-aggregation does not go with --async-buffer"),
    (["--async-buffer", "2", "--strategy", "median"], "--strategy median does not go with --async-buffer"),
    (["--async-buffer", "4", "--clients-per-round", "3"], "--async-buffer 4 is more than the 3 client(s)"),
    (["--async-buffer", "2", "--fraction-fit", "0.5", "--sampling", "poisson"], "--sampling poisson does not go"),
    (["--staleness-weight", "constant"], "--staleness-weight needs --async-buffer K"),
    (["--async-buffer", "2", "--staleness-weight", "poly:-1"], "must be sqrt, constant or poly:A"),
    (["--async-buffer", "2", "--federated-evaluation"], "--async-buffer needs the server's own test set"),
])
def test_flags_that_do_not_go_with_async_are_refused_in_one_line(flags, says, capsys):
    with pytest.raises(SystemExit) as exited:
        fl_server.parse_config(["--num-clients", "5", *flags])
    assert exited.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert says in error


def test_async_takes_a_server_lr_with_fedavg():
    config, _ = fl_server.parse_config(["--async-buffer", "2", "--server-lr", "0.5", "--staleness-weight", "poly:0.5"])
    assert (config.async_buffer, config.server_lr, config.staleness_weight) == (2, 0.5, "poly:0.5")


def test_the_dashboard_keeps_each_versions_staleness():
    from fedsock.dashboard import DashboardState

    fast, slow = FakeClient(1, step=1.0), FakeClient(2, step=1.0)
    engine, recorder = buffered_engine([fast, slow], async_buffer=1, num_rounds=4)
    open_gate_when_version_opens(recorder, slow, 3)
    state = DashboardState(engine)
    engine.events.observers.append(state)
    assert run(engine) == ExitStatus.OK
    assert [(r["round"], r["staleness"]) for r in state.changes()["rounds"]] == [(1, 0), (2, 0), (3, 0), (4, 3)]


# ---- over sockets: a real server and real clients


@pytest.mark.processes
def test_a_federation_of_processes_trains_asynchronously_with_a_slow_client(cluster, tmp_path):
    """With int8 updates: each is a delta from the version its client received, so the server must decode a
    stale one against that older version, not the newest (RemoteClient.sent)."""
    from conftest import FAST, read_metrics

    server = cluster.server(*FAST, "--num-clients", "3", "--async-buffer", "2", "--num-rounds", "16",
                            "--max-staleness", "50",  # the slow client's first update may be many versions late
                            "--compression", "int8")
    fast = [cluster.client(1), cluster.client(2)]
    slow = cluster.client(3, "--slowdown", "3")
    slow.wait_for(r"--slowdown 3: each round's training is made to take 3 times as long")
    assert server.finish() == 0
    server.wait_for(r"round 16/16  clients 2/2  test acc \d+\.\d\d%  loss \d\.\d+  \d+\.\d s  staleness ≤ \d+")
    server.wait_for("training finished after 16 rounds")
    assert [c.finish() for c in [*fast, slow]] == [0, 0, 0]
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert [r["round"] for r in rows] == list(range(1, 17)) and all(r["clients"] == 2 for r in rows)
    assert any(r["staleness"] > 0 for r in rows)  # the slow client's updates came versions late, and counted
    assert rows[-1]["test_accuracy"] > 0.85
    for proc in (server, *fast, slow):
        assert "Traceback" not in proc.output, proc.output
