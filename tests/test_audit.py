"""python -m fedsock.audit: the empirical epsilon's maths against closed forms and brute force, the
membership attack's ROC on hand-made scores, and the audit itself: a correct DP run passes, one whose
noise is accounted but never added fails."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from support import run_cli
from fedsock.audit import (
    Gaussian,
    auc,
    empirical_epsilon,
    gaussian_pair_epsilon,
    hockey_stick_delta,
    roc,
    tpr_at_fpr,
)


def phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def gdp_delta(epsilon: float, mu: float) -> float:
    """mu-Gaussian DP's delta(epsilon) (Dong, Roth and Su 2019), written out here from the formula."""
    return phi(-epsilon / mu + mu / 2) - math.exp(epsilon) * phi(-epsilon / mu - mu / 2)


@pytest.mark.parametrize("mu", [0.5, 1.0, 2.0, 4.0])
def test_equal_spreads_give_gaussian_dps_closed_form(mu):
    """N(mu s, s²) against N(0, s²) is mu-GDP, whatever the scale s (cosines are about 1/sqrt(d))."""
    s = 1 / math.sqrt(7850)
    inserted, held_out = Gaussian(mu * s + 0.3, s), Gaussian(0.3, s)
    for epsilon in (0.0, 0.5, 2.0, 5.0):
        assert hockey_stick_delta(inserted, held_out, epsilon) == pytest.approx(gdp_delta(epsilon, mu), rel=1e-6, abs=1e-15)
    for delta in (1e-3, 1e-5):
        epsilon = gaussian_pair_epsilon(inserted, held_out, delta)
        assert gdp_delta(epsilon, mu) == pytest.approx(delta, rel=1e-5)
    assert gaussian_pair_epsilon(held_out, held_out, 1e-5) == 0.0


def brute_force_delta(p: Gaussian, q: Gaussian, epsilon: float) -> float:
    """The integral of (p - e^epsilon q)+ on a fine grid: no regions, no roots."""
    x = np.linspace(-60, 60, 2_000_001)
    density = lambda g: np.exp(-0.5 * ((x - g.mean) / g.std) ** 2) / (g.std * math.sqrt(2 * math.pi))  # noqa: E731
    return float(np.trapezoid(np.maximum(density(p) - math.exp(epsilon) * density(q), 0.0), x))


@pytest.mark.parametrize("p, q", [(Gaussian(1.0, 1.3), Gaussian(0.0, 1.0)), (Gaussian(2.0, 0.7), Gaussian(0.0, 1.0)),
                                  (Gaussian(0.0, 1.5), Gaussian(0.0, 1.0))])
def test_unequal_spreads_match_brute_force_in_both_directions(p, q):
    for epsilon in (0.0, 1.0, 3.0):
        assert hockey_stick_delta(p, q, epsilon) == pytest.approx(brute_force_delta(p, q, epsilon), rel=1e-5, abs=1e-12)
        assert hockey_stick_delta(q, p, epsilon) == pytest.approx(brute_force_delta(q, p, epsilon), rel=1e-5, abs=1e-12)
    one_way = [gaussian_pair_epsilon(p, q, 1e-5), gaussian_pair_epsilon(q, p, 1e-5)]
    assert one_way[0] == one_way[1]  # the pair's epsilon is the larger direction's, in either order
    assert brute_force_delta(p, q, one_way[0]) <= 1.0001e-5 and brute_force_delta(q, p, one_way[0]) <= 1.0001e-5
    # a different spread alone leaks: the same means still give epsilon > 0 (the tails tell them apart)
    assert gaussian_pair_epsilon(Gaussian(0.0, 1.2), Gaussian(0.0, 1.0), 1e-5) > 1.0


def test_the_estimate_from_samples_finds_the_gaussian_dp_epsilon():
    rng = np.random.default_rng(0)
    mu, s = 2.0, 0.01
    inserted, held_out = rng.normal(mu * s, s, 20_000), rng.normal(0.0, s, 20_000)
    truth = gaussian_pair_epsilon(Gaussian(mu, 1.0), Gaussian(0.0, 1.0), 1e-5)
    assert empirical_epsilon(inserted, held_out, 1e-5) == pytest.approx(truth, rel=0.15)
    assert empirical_epsilon(held_out[:10_000], held_out[10_000:], 1e-5) < 0.5  # no canary, no leak (to sampling error)


def test_roc_auc_and_tpr_at_low_fpr_on_hand_made_scores():
    members, others = [0.9, 0.8, 0.4], [0.7, 0.3, 0.2, 0.1]
    fpr, tpr = roc(members, others)
    assert list(fpr) == pytest.approx([0, 0, 0, 0.25, 0.25, 0.5, 0.75, 1])
    assert list(tpr) == pytest.approx([0, 1 / 3, 2 / 3, 2 / 3, 1, 1, 1, 1])
    assert auc(fpr, tpr) == pytest.approx(11 / 12)  # 11 of the 12 (member, non-member) pairs are ordered right
    assert tpr_at_fpr(fpr, tpr, 0.01) == pytest.approx(2 / 3)  # no threshold between: no interpolation
    assert tpr_at_fpr(fpr, tpr, 0.25) == 1.0
    fpr, tpr = roc([1.0, 0.5], [0.5, 0.0])  # a tie counts one half
    assert auc(fpr, tpr) == pytest.approx(3.5 / 4) and tpr_at_fpr(fpr, tpr, 0.01) == 0.5
    rng = np.random.default_rng(1)
    a, b = rng.normal(0.3, 1, 300).round(1), rng.normal(0, 1, 400).round(1)  # rounded: many ties
    pairs = (a[:, None] > b[None, :]).mean() + 0.5 * (a[:, None] == b[None, :]).mean()
    assert auc(*roc(a, b)) == pytest.approx(pairs)  # the Mann-Whitney U statistic, by brute force


SMALL = ["canaries", "--model", "logreg", "--num-clients", "10", "--canaries", "200", "--num-rounds", "3",
         "--held-out", "1000", "--noise-multipliers", "1"]


def test_a_correct_run_passes_and_one_without_its_noise_fails(tmp_path):
    """z = 1 over 3 rounds: the accountant's epsilon is 20.1. Measured (logreg, 200 canaries among 210 clients)
    about 9 with the noise, about 40 without it."""
    import json

    code, output = run_cli("fedsock.audit", [*SMALL, "--json", str(tmp_path / "ok.json")], timeout_s=120)
    assert code == 0 and "AUDIT FAILED" not in output, output
    ok = json.loads((tmp_path / "ok.json").read_text())["runs"][0]
    assert 0 < ok["empirical_epsilon"] < ok["accountant_epsilon"] == pytest.approx(20.1, abs=0.1)
    code, output = run_cli("fedsock.audit", [*SMALL, "--break", "drop-noise", "--json", str(tmp_path / "broken.json")],
                           timeout_s=120)
    broken = json.loads((tmp_path / "broken.json").read_text())["runs"][0]
    assert code == 3, output
    assert "AUDIT FAILED: z = 1 (--break drop-noise): empirical epsilon" in output
    assert broken["accountant_epsilon"] == ok["accountant_epsilon"]  # the accountant cannot tell them apart
    assert broken["empirical_epsilon"] > broken["accountant_epsilon"]


def test_membership_attacks_the_final_model_of_each_run(tmp_path):
    """A tiny federation on the chest X-rays, with and without DP: members and non-members are disjoint parts
    of one pool (90% of 80% trained on, 20% held out), and the attack's figures are rates."""
    import json

    code, output = run_cli("fedsock.audit", ["membership", "--tasks", "xray", "--num-clients", "2", "--num-rounds", "1",
                                             "--local-epochs", "1", "--json", str(tmp_path / "m.json")], timeout_s=120)
    assert code == 0, output
    runs = json.loads((tmp_path / "m.json").read_text())["runs"]
    assert [r["noise_multiplier"] for r in runs] == [None, 1.0] and runs[1]["epsilon"] > 0
    for r in runs:
        assert r["non_members"] == int(0.2 * 2698) and r["members"] + r["non_members"] < 2698
        assert 0 <= r["auc"] <= 1 and 0 <= r["tpr_at_1pct_fpr"] <= 1
    assert re.search(r"xray \(mlp\), no DP: AUC 0\.\d{3}, TPR at 1% FPR \d+\.\d\d%", output), output


@pytest.mark.parametrize("args, message", [
    ([], "the following arguments are required"),
    (["canaries", "--noise-multipliers", "1,x"], "--noise-multipliers: must be numbers separated by commas"),
    (["canaries", "--noise-multipliers", "-1"], "must be one or more numbers >= 0"),
    (["canaries", "--canaries", "1"], "--canaries: must be 2..10000, got 1"),
    (["canaries", "--break", "drop-noise", "--noise-multipliers", "0"], "--break drop-noise needs a noise multiplier"),
    (["canaries", "--break", "nothing"], "argument --break: invalid choice"),
    (["canaries", "--json", "/no/such/folder/out.json"], "--json /no/such/folder/out.json: no such folder"),
    (["membership", "--tasks", "cats"], "--tasks: must be spam, xray or both"),
    (["membership", "--num-rounds", "0"], "--num-rounds: must be 1..1000, got 0"),
])
def test_bad_input_is_one_line(args, message):
    code, output = run_cli("fedsock.audit", args)
    assert code == 2 and message in output and "Traceback" not in output, output
    assert len(output.strip().splitlines()) == 1, output
