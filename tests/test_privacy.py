"""Client-level differential privacy: the clipping bound, the noise's size, the accountant against
dp-accounting itself, the budget, and the run's behaviour (in-process engine and real processes)."""

from __future__ import annotations

import math
import re

import dp_accounting
import pytest
import torch
from dp_accounting import dp_event, pld, rdp

from conftest import FAST, read_metrics
from support import run_cli
from fedsock.privacy import (
    PLD_INTERVAL,
    Accountant,
    DPMean,
    Privacy,
    PrivacySettings,
    clip_delta,
    default_delta,
    l2_norm,
    plan_noise_multiplier,
    privatize_update,
)
from test_engine import FakeClient, engine_for, run


def test_every_update_is_clipped_to_the_bound():
    generator = torch.Generator().manual_seed(0)
    current = {"w": torch.zeros(50), "b": torch.zeros(3)}
    mean = DPMean(current, clip=2.0, noise_std=0.0, denominator=1.0, clip_here=True)
    for scale in (0.01, 1.0, 10.0, 1e4):
        update = {name: scale * torch.randn(t.shape, generator=generator) for name, t in current.items()}
        before = {name: t.clone() for name, t in mean.sum.items()}
        mean.add(update, num_examples=10**6)  # a claimed example count changes nothing
        step = {name: mean.sum[name] - before[name] for name in current}
        assert l2_norm(step) <= 2.0 * (1 + 1e-12)
        assert math.isclose(l2_norm(step), min(2.0, l2_norm(update)), rel_tol=1e-9)
    assert [n > 2.0 for n in mean.norms] == [False, True, True, True]
    clipped, norm = clip_delta({"w": torch.tensor([3.0, 4.0])}, 1.0)  # 3-4-5: scaled by 1/5
    assert norm == 5.0 and clipped["w"].tolist() == pytest.approx([0.6, 0.8])
    sent, _ = privatize_update({"w": torch.ones(4)}, {"w": torch.full((4,), 101.0)}, clip=1.0, noise_std=0.0)
    assert l2_norm({"w": sent["w"] - 1}) == pytest.approx(1.0)  # local mode: the client clips before sending


def test_the_noise_has_the_stated_standard_deviation():
    """200,000 coordinates: the sample standard deviation of N(0, s^2) is within 5 standard errors,
    5 * s / sqrt(2n) = 0.8% of s, of the true one (fixed seed)."""
    n, s, m = 200_000, 0.37, 4.0  # noise std z*S = 0.37 on the sum, fixed denominator 4
    mean = DPMean({"w": torch.zeros(n)}, clip=1.0, noise_std=s, denominator=m, clip_here=True,
                  generator=torch.Generator().manual_seed(7))
    released = mean.result()["w"].double()
    tolerance = 5 / math.sqrt(2 * n)
    assert abs(float(released.std()) - s / m) <= tolerance * s / m
    assert abs(float(released.mean())) <= 5 * (s / m) / math.sqrt(n)


def pld_accountant(interval: float = PLD_INTERVAL):
    return pld.PLDAccountant(neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
                             value_discretization_interval=interval)


@pytest.mark.parametrize("sampling, method, library, event", [
    ("none", "exact", lambda: pld_accountant(1e-4), lambda: dp_event.GaussianDpEvent(0.55)),
    ("fixed", "RDP", lambda: rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE),
     lambda: dp_event.SampledWithoutReplacementDpEvent(1000, 50, dp_event.GaussianDpEvent(0.55))),
    ("poisson", "PLD", pld_accountant, lambda: dp_event.PoissonSampledDpEvent(0.05, dp_event.GaussianDpEvent(1.1))),
])
def test_epsilon_is_the_librarys_answer_for_the_sampling_done(sampling, method, library, event):
    """z = 1.1: under replace-one the Gaussian's multiplier is z/2 = 0.55 (one client's swap moves the sum by 2S).
    PLD where dp-accounting's PLD accountant analyses the sampling, RDP for sampling without replacement, and
    without sampling the closed form (which PLD, given the 30 rounds as one Gaussian, matches)."""
    ours = Accountant(1e-5, sampling)
    assert ours.method_for([1.1]) == method
    theirs = library()
    for _ in range(30):
        ours.record(1.1, 1000, 50 if sampling != "none" else 1000, 0.05)
    theirs.compose(event(), 30)
    assert ours.epsilon() == pytest.approx(theirs.get_epsilon(1e-5), rel=1e-9)
    again = Accountant.from_json(ours.to_json())  # what a checkpoint keeps
    assert again.epsilon() == ours.epsilon()


@pytest.mark.parametrize("rate, z, rounds, rdp_epsilon, pld_epsilon", [(0.01, 1.1, 10, 0.833, 0.272),
                                                                       (0.05, 0.8, 100, 6.66, 5.74)])
def test_pld_is_tighter_than_rdp_where_it_applies(rate, z, rounds, rdp_epsilon, pld_epsilon):
    """The issue's figures (Poisson sampling, delta 1e-5): the same mechanism, a much smaller epsilon. The
    replace-one Gaussian without sampling is exact in closed form (Balle and Wang 2018), and PLD matches it."""
    events = [[z, 1000, 1000 * rate, rate]] * rounds
    rdp_side = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    rdp_side.compose(dp_event.PoissonSampledDpEvent(rate, dp_event.GaussianDpEvent(z)), rounds)
    assert rdp_side.get_epsilon(1e-5) == pytest.approx(rdp_epsilon, abs=5e-3)
    ours = Accountant(1e-5, "poisson", events).epsilon()
    assert ours == pytest.approx(pld_epsilon, abs=5e-3)  # the figures are rounded
    finest = pld_accountant(1e-4)  # dp-accounting's default grid: ours is within 1e-4 of it, and above
    finest.compose(dp_event.PoissonSampledDpEvent(rate, dp_event.GaussianDpEvent(z)), rounds)
    assert 0 <= ours - finest.get_epsilon(1e-5) <= 1e-4
    sigma = 0.55 / math.sqrt(rounds)  # 'none': rounds Gaussians of z/2 compose to one of z/2/sqrt(rounds)
    epsilon = Accountant(1e-5, "none", [[1.1, 10, 10, 1.0]] * rounds).epsilon()
    assert analytic_delta(epsilon, sigma) == pytest.approx(1e-5, rel=1e-6)


def test_tiny_noise_multipliers_are_accounted_without_blowing_up():
    """z = 1e-6 without sampling: the closed form, at once (PLD's grid would need petabytes); z = 0.1 with
    Poisson sampling: RDP, as the start-up line says."""
    assert Accountant(1e-5, "none", [[1e-6, 10, 10, 1.0]] * 1000).epsilon() > 1e12
    tiny = Accountant(1e-5, "poisson", [[0.1, 1000, 50, 0.05]] * 10)
    assert tiny.method_for([0.1]) == "RDP" and tiny.epsilon() > 100


def analytic_delta(epsilon: float, sigma: float) -> float:
    """The exact delta of the Gaussian mechanism of sensitivity 1 and std sigma at epsilon (Balle and Wang)."""
    phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))  # noqa: E731
    return phi(1 / (2 * sigma) - epsilon * sigma) - math.exp(epsilon) * phi(-1 / (2 * sigma) - epsilon * sigma)


def test_a_budget_plans_the_smallest_noise_that_meets_it():
    z = plan_noise_multiplier(4.0, 1e-5, 20, "poisson", 1000, 50, 0.05)
    spent = Accountant(1e-5, "poisson")
    assert spent.epsilon([[z, 1000, 50, 0.05]] * 20) <= 4.0
    assert spent.epsilon([[0.99 * z, 1000, 50, 0.05]] * 20) > 4.0
    with pytest.raises(ValueError, match="even a noise multiplier of 1000"):
        plan_noise_multiplier(1e-6, 1e-9, 10**4, "none", 10, 10, 1.0)
    assert default_delta(100) == 1e-5 and default_delta(10**6) == 1e-7  # below 1/N either way


def dp_engine(clients, budget=None, z=1.0, **changes):
    engine, recorder = engine_for(clients, **changes)
    privacy = Privacy(PrivacySettings(clip=1.0, noise_multiplier=z, delta=1e-5, sampling="none"), budget=budget)
    engine.strategy.privacy = engine.privacy = privacy
    return engine, recorder


def test_a_dp_round_moves_the_model_by_at_most_the_clipped_mean_plus_noise():
    clients = [FakeClient(1, step=100.0), FakeClient(2, step=100.0)]  # enormous updates, clipped to 1 each
    engine, recorder = dp_engine(clients, z=1e-6, num_rounds=1)
    run(engine)
    moved = l2_norm(engine.model.tensors)
    assert moved == pytest.approx(1.0, rel=1e-3)  # each delta clipped to norm 1, mean of two equal ones: norm 1
    row = recorder.rows()[0]
    assert row["epsilon"] > 0


def test_the_run_stops_cleanly_when_the_budget_is_spent():
    clients = [FakeClient(1), FakeClient(2)]
    one_round = Accountant(1e-5, "none")
    one_round.record(1.0, 2, 2, 1.0)
    two_rounds = one_round.epsilon([[1.0, 2, 2, 1.0]])
    engine, recorder = dp_engine(clients, budget=(one_round.epsilon() + two_rounds) / 2, num_rounds=5)
    assert run(engine) == 0
    assert len(recorder.rows()) == 1  # a second round would have spent more than the budget
    assert clients[0].finished[0] is False and "the privacy budget" in clients[0].finished[2]
    assert "allows no more rounds: stopped after round 1 of 5" in clients[0].finished[2]


def test_epsilon_grows_with_every_round_and_only_with_released_rounds():
    clients = [FakeClient(1), FakeClient(2)]
    clients[1].drop, clients[1].leaves = "flaky", False
    engine, recorder = dp_engine(clients, num_rounds=3, min_clients=2, round_retries=3)
    with pytest.raises(Exception):
        run(engine)  # every round fails: nothing is released
    assert engine.privacy.accountant.history == []
    engine, recorder = dp_engine([FakeClient(1), FakeClient(2)], num_rounds=4)
    run(engine)
    epsilons = [row["epsilon"] for row in recorder.rows()]
    assert epsilons == sorted(epsilons) and len(set(epsilons)) == 4


# --------------------------------------------------------------------------- real processes


@pytest.mark.processes
def test_local_mode_over_the_wire_and_a_client_without_the_feature_is_refused(cluster, tmp_path):
    import socket

    from socket_methods import PROTOCOL_VERSION, decode_message, encode_message

    server = cluster.server(*FAST, "--num-clients", "3", "--num-rounds", "2", "--dp-clip", "0.5",
                            "--dp-noise-multiplier", "0.01", "--dp-mode", "local", "--time-to-wait", "60")
    server.wait_for(r"client-level DP \(local: each client noises its own\): clip S = 0.5, noise multiplier z = 0.01")
    with socket.create_connection(("127.0.0.1", cluster.port), timeout=30) as old:
        old.sendall(encode_message("<HELLO>", protocol_version=PROTOCOL_VERSION, client_id=3, features=[]))
        length = int.from_bytes(old.recv(8, socket.MSG_WAITALL), "big")
        refusal = decode_message(old.recv(length, socket.MSG_WAITALL))
    assert refusal["header"] == "<ERROR>" and "needs the client features dp-local" in refusal["message"]
    clients = [cluster.client(k) for k in (1, 2, 3)]
    assert [c.finish() for c in clients] == [0, 0, 0] and server.finish() == 0
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert all(r["epsilon"] is not None and r["epsilon"] > 0 for r in rows)
    assert rows[-1]["test_accuracy"] > 0.5  # small noise: it still learns
    server.wait_for(r"round 2/2  clients 3/3  test acc \d+\.\d+%  loss \d\.\d+  \d+\.\d s  ε \d")


def test_a_resumed_dp_run_continues_its_epsilon(tmp_path):
    import fl_simulate

    common = ["--model", "logreg", "--num-clients", "50", "--clients-per-round", "10", "--dp-clip",
              "1", "--dp-noise-multiplier", "1.2", "--quiet"]

    def simulate(*args):  # fl_simulate.py's main, in this process
        assert fl_simulate.main([*common, *args]) == 0

    simulate("--num-rounds", "6", "--output-dir", str(tmp_path / "straight"))
    simulate("--num-rounds", "3", "--output-dir", str(tmp_path / "halves"))
    simulate("--resume", str(tmp_path / "halves" / "checkpoint.fsck"), "--num-rounds", "6")
    straight = [r["epsilon"] for r in read_metrics(tmp_path / "straight" / "metrics.csv")]
    halves = [r["epsilon"] for r in read_metrics(tmp_path / "halves" / "metrics.csv")]
    assert halves == pytest.approx(straight, rel=1e-12) and halves == sorted(halves)


@pytest.mark.parametrize("args, message", [
    (["--dp-noise-multiplier", "1"], "--dp-noise-multiplier needs --dp-clip S"),
    (["--dp-clip", "1"], "needs either --dp-noise-multiplier Z or a budget --dp-epsilon E"),
    (["--dp-clip", "1", "--dp-noise-multiplier", "1", "--dp-epsilon", "3"], "needs either"),
    (["--dp-clip", "1", "--dp-noise-multiplier", "1", "--strategy", "median"], "--strategy median does not go with --dp-clip"),
    (["--dp-clip", "1", "--dp-noise-multiplier", "1", "--dp-delta", "0.5"], "--dp-delta 0.5 is not below 1/N = 0.2"),
    (["--sampling", "poisson"], "--sampling poisson needs --fraction-fit C"),
    (["--dp-clip", "1", "--dp-epsilon", "0.001", "--num-rounds", "1000"], "--dp-epsilon 0.001 cannot be met"),
])
def test_privacy_flags_that_make_no_sense_are_one_line(args, message):
    code, output = run_cli("fl_server", [*FAST, *args])  # main as the script runs it, in this process
    assert code == 2 and message in output and "Traceback" not in output, output


@pytest.mark.processes
def test_a_client_with_dp_sgd_reports_the_epsilon_opacus_computes(cluster, tmp_path):
    """Example-level DP on one client: Opacus's DP-SGD, Poisson batches of rate 1/844 (27,000 examples, B = 32,
    as 844 batches would have), 843 steps a round (Opacus's loader: int(1 / rate)); its epsilon after each
    round must be what Opacus's RDP analysis gives for those steps."""
    from opacus.accountants.analysis import rdp as opacus_rdp

    server = cluster.server(*FAST, "--num-clients", "2", "--num-rounds", "2")
    private = cluster.client(1, "--dp-sgd", "--dp-sgd-noise-multiplier", "1.1", "--dp-sgd-clip", "1.0")
    plain = cluster.client(2)
    assert [private.finish(), plain.finish()] == [0, 0] and server.finish() == 0
    printed = [float(e) for e in re.findall(r"DP-SGD epsilon ([\d.]+) at delta 1e-05", private.output)]
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))  # Opacus's default orders
    expected = []
    for rounds in (1, 2):
        rdp_values = opacus_rdp.compute_rdp(q=1 / 844, noise_multiplier=1.1, steps=843 * rounds, orders=orders)
        expected.append(opacus_rdp.get_privacy_spent(orders=orders, rdp=rdp_values, delta=1e-5)[0])
    assert printed == pytest.approx([float(f"{e:.3g}") for e in expected], rel=1e-9), (printed, expected)
    assert read_metrics(tmp_path / "run" / "metrics.csv")[-1]["test_accuracy"] > 0.8
    bad = cluster.client(1, "--dp-sgd-clip", "2", port=cluster.port)
    assert bad.finish(timeout=60) == 2 and "--dp-sgd-clip applies to --dp-sgd" in bad.output
