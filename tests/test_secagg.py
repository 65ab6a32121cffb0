"""Secure aggregation, in-process and in milliseconds: Shamir sharing, the quantisation and its
overflow rule, the whole protocol among client sessions and the server's round (dropouts at every
stage), what a masked update looks like (uniform noise), every refusal an honest client makes, and
the round engine running secure rounds with clients behind the proxy seam, and what the server
catches of hostile clients (a forged count, coordinates beyond the clip, bad shares). The same
protocol over real sockets and processes is in tests/test_secagg_processes.py.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import secrets
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsock import secagg as sa
from fedsock import identity as ident
from fedsock import shamir
from fedsock.clients import ClientPool, Dropped, FitIns, FitRes, GlobalModel
from fedsock.config import ServerConfig
from fedsock.console import ExitStatus
from fedsock.events import ClientDropped, Events, Notice, RoundFailed
from fedsock.order import OutOfOrder
from fedsock.strategies import Strategy
from fedsock.transport import Traffic
from fedsock.engine import RoundEngine, RunFailed
from test_engine import Recorder

# --------------------------------------------------------------------------- Shamir


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 12).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n), st.randoms())))
def test_any_t_shares_rebuild_the_secret(case):
    n, t, rnd = case
    secret = secrets.randbelow(shamir.PRIME)
    holders = rnd.sample(range(1, 200), n)
    shares = shamir.split(secret, holders, t)
    subset = rnd.sample(holders, t)
    assert shamir.combine({x: shares[x] for x in subset}) == secret
    more = rnd.sample(holders, min(n, t + 1))
    assert shamir.combine({x: shares[x] for x in more}) == secret


def test_fewer_than_t_shares_say_nothing_about_the_secret():
    """Perfect secrecy: for t - 1 shares and ANY candidate secret there is a polynomial of degree t - 1
    through them with that secret at 0; so every secret is as likely as any other."""
    t, holders = 4, [3, 7, 9, 12, 20]
    shares = shamir.split(secrets.randbelow(shamir.PRIME), holders, t)
    seen = {x: shares[x] for x in holders[: t - 1]}
    for candidate in (0, 1, secrets.randbelow(shamir.PRIME)):
        points = {0: candidate, **seen}
        # the polynomial through these t points, evaluated back at each share's x, gives the share
        for x, y in seen.items():
            value = sum(yi * _basis(points, xi, x) for xi, yi in points.items()) % shamir.PRIME
            assert value == y


def _basis(points: dict, xi: int, x: int) -> int:
    numerator = denominator = 1
    for xj in points:
        if xj != xi:
            numerator = numerator * (x - xj) % shamir.PRIME
            denominator = denominator * (xi - xj) % shamir.PRIME
    return numerator * pow(denominator, -1, shamir.PRIME) % shamir.PRIME


def test_a_wrong_share_gives_a_wrong_secret_and_bad_parameters_are_refused():
    secret = secrets.randbelow(shamir.PRIME)
    shares = shamir.split(secret, [1, 2, 3], 2)
    assert shamir.combine({1: shares[1], 2: (shares[2] + 1) % shamir.PRIME}) != secret
    for bad in [dict(secret=shamir.PRIME, holders=[1, 2], threshold=2), dict(secret=1, holders=[0, 1], threshold=2),
                dict(secret=1, holders=[1, 1], threshold=2)]:
        with pytest.raises(ValueError):
            shamir.split(bad["secret"], bad["holders"], bad["threshold"])


def spoiled(h: int, t: int, bad: set[int], seed: int = 0) -> tuple[int, dict[int, int]]:
    """A 32-byte secret and h shares of it (holders 1..h), those of `bad` changed at random."""
    rnd = random.Random(seed)
    secret = rnd.getrandbits(256)
    shares = shamir.split(secret, range(1, h + 1), t)
    for x in bad:
        shares[x] = (shares[x] + rnd.randrange(1, shamir.PRIME)) % shamir.PRIME
    return secret, shares


@settings(max_examples=60, deadline=None)
@given(st.integers(3, 14).flatmap(lambda h: st.tuples(
    st.just(h), st.integers(max(2, h // 2 + 1) if h <= 10 else -(-2 * h // 3), h),
    st.sets(st.integers(1, h), max_size=h), st.integers(0, 2**32))))
def test_small_rounds_rebuild_every_secret_that_t_good_shares_hold(case):
    """Up to 10 holders at any threshold, up to 14 at t >= 2/3 of them (the default), the search tries
    every t-subset within MAX_TRIES: the secret comes back whenever t shares are good, and the bad ones
    are named; with fewer than t good, it fails after trying them all."""
    h, t, bad, seed = case
    assert math.comb(h, t) - 1 <= shamir.MAX_TRIES
    secret, shares = spoiled(h, t, bad, seed)
    result = shamir.rebuild(shares, t, lambda value: value == secret)
    if h - len(bad) >= t:
        assert result.secret == secret and result.bad == bad
    else:
        assert result.secret is None and result.searched_all


def test_at_fifty_holders_berlekamp_welch_finds_eight_bad_shares_in_milliseconds():
    h, t = 50, sa.default_threshold(50, 2 / 3)  # 34: e = 8 bad shares are always found
    bad = {1, 2, 3, 5, 8, 13, 21, 34}  # all but one among the first t, where they spoil the usual try
    secret, shares = spoiled(h, t, bad)
    started = time.perf_counter()
    result = shamir.rebuild(shares, t, lambda value: value == secret)
    assert result.secret == secret and result.bad == bad
    assert time.perf_counter() - started < 1.0


def test_past_the_decoding_radius_the_search_stops_at_its_bound(monkeypatch):
    monkeypatch.setattr(shamir, "MAX_TRIES", 50)
    h, t = 50, 34
    secret, shares = spoiled(h, t, set(range(1, 10)))  # 9 bad, all among the first t: 9 swaps needed
    tries = []
    result = shamir.rebuild(shares, t, lambda value: tries.append(value) or value == secret)
    assert result.secret is None and not result.searched_all
    # the first t, Berlekamp-Welch's polynomial if it found one, then the bounded search
    assert 1 + 50 <= len(tries) <= 1 + 1 + 50


def test_colluders_that_cancel_their_errors_cannot_get_good_shares_named():
    """Two bad shares made to cancel in the first t's interpolation give the right secret there, but a
    polynomial that all four spares are off (more than ⌊(h - t + 1)/2⌋ = 2), so Berlekamp-Welch
    decides, and names exactly the two: within e = 2 bad shares the naming is exact whatever they send."""
    h, t = 10, 6
    secret, shares = spoiled(h, t, set())
    weights = shamir.lagrange(tuple(range(1, t + 1)))
    error = 12345
    shares[1] = (shares[1] + error) % shamir.PRIME
    shares[2] = (shares[2] - error * weights[1] * pow(weights[2], -1, shamir.PRIME)) % shamir.PRIME
    assert shamir.combine({x: shares[x] for x in range(1, t + 1)}) == secret  # the crafted cancellation
    result = shamir.rebuild(shares, t, lambda value: value == secret)
    assert result.secret == secret and result.bad == {1, 2}


# --------------------------------------------------------------------------- quantisation and the overflow rule


def test_the_bits_rule_keeps_any_sum_inside_32_bits():
    for n in (1, 2, 3, 10, 50, 1000, 100_000):
        b = sa.bits_for(n)
        assert n * 2**b <= 2**31 - 1 < n * 2 ** (b + 1)
        extremes = np.full(n, 2**b, dtype=np.int64)
        assert -(2**31) < -extremes.sum() and extremes.sum() < 2**31


def test_settings_that_could_overflow_are_refused():
    with pytest.raises(ValueError, match="of 4001 clients a round: its key and share messages"):
        sa.check_sizes(4001, 1)
    sa.check_sizes(4000, 1)  # 19 bits a coordinate, share messages of about 840 KB: allowed
    assert sa.bits_for(4000) == 19
    with pytest.raises(ValueError, match="could sum past 2\\^32 in the masked example count"):
        sa.check_sizes(4000, 2**21)
    sa.check_sizes(1000, 60000)


def test_quantisation_is_unbiased_and_within_one_step():
    rng = np.random.default_rng(1)
    values = rng.uniform(-1, 1, 20000)
    bits = 6
    q = sa.quantize(values, bits, rng).view(np.int32).astype(np.float64) / 2**bits
    assert np.abs(q - values).max() <= 2**-bits
    many = np.mean([sa.quantize(values[:50], bits, rng).view(np.int32) / 2**bits for _ in range(4000)], axis=0)
    assert np.abs(many - values[:50]).max() < 0.1 * 2**-bits * 4  # unbiased: the mean converges


# --------------------------------------------------------------------------- the whole protocol, in-process


def federation(ids):
    """A federation key and an identity for each client id, in memory (what python -m fedsock.enrol writes)."""
    private, public = ident.new_key()
    return public, {i: ident.issue(private, i) for i in ids}


def protocol(n: int = 5, m: int = 2000, weighted: bool = True, drop_at: dict[int, str] | None = None, seed: int = 0,
             reveal: bool = True, noise_std: float = 0.05, at_clip: list[int] | None = None, identities: bool = False):
    """Run one round among n client sessions and a server round; clients in `drop_at` stop at a stage
    ("keys": never answer the setup, "shares", "masked": never send the update, "reveal"). Each delta
    is Gaussian noise of `noise_std` (C is 1), but the coordinates `at_clip`: there, every client's is 100.
    With `identities`, the clients sign their keys and the survivors run the consistency check."""
    drop_at = drop_at or {}
    rng = np.random.default_rng(seed)
    ids = list(range(1, n + 1))
    weight_bound = 500 if weighted else 1
    params = sa.Params(1, tuple(ids), sa.default_threshold(n, 2 / 3), sa.bits_for(n), 1.0, weight_bound, m, weighted,
                       identities)
    fed_key, ids_of = federation(ids) if identities else (None, {})
    sessions = {i: sa.ClientSession(i, m, ids_of.get(i)) for i in ids}
    server = sa.ServerRound(params, fed_key)
    setup = {"header": "<SECAGG_SETUP>", **params.to_json()}
    for i in ids:
        if drop_at.get(i) != "keys":
            _, keys = sessions[i].answer(setup)
            server.take_keys(i, keys)
    peers = {"header": "<SECAGG_PEERS>", **server.peers_message()}
    for i in list(server.keys):
        if drop_at.get(i) != "shares":
            _, shares = sessions[i].answer(peers)
            server.take_shares(i, shares["shares"])
    for i in server.sharers:
        sessions[i].answer({"header": "<SECAGG_ROUTED>", "round": 1, "shares": server.routed(i)})
    trained = {i: {"w": torch.from_numpy(rng.normal(0, noise_std, m)).float()} for i in ids}
    for i in ids:
        trained[i]["w"][at_clip or []] = 100.0
    deltas = {i: trained[i]["w"].double().numpy() for i in ids}
    counts = {i: int(rng.integers(50, 500)) for i in ids}
    start = {"w": torch.zeros(m)}
    masked = {}
    for i in server.sharers:
        if drop_at.get(i) != "masked":
            masked[i] = sessions[i].masked_update(1, start, trained[i], counts[i])
            server.add(i, masked[i], counts[i])
    survivors = sorted(server.survivors)
    dropped = sorted(set(server.sharers) - server.survivors)
    unmask = {"header": "<SECAGG_UNMASK>", "round": 1, "survivors": survivors, "dropped": dropped}
    if identities:
        for i in survivors:
            _, signed = sessions[i].answer({**unmask, "header": "<SECAGG_CHECK>"})
            server.take_signature(i, signed["signature"])
        unmask["signatures"] = {str(i): text for i, text in server.signatures.items()}
    reveals = {}
    for i in survivors if reveal else []:
        if drop_at.get(i) != "reveal":
            try:
                _, reveals[i] = sessions[i].answer(unmask)
            except sa.SecAggError:  # an honest client refuses (too few survivors): no reveal
                pass
    return server, sessions, reveals, counts, deltas, masked


def expected_mean(deltas, counts, survivors, weighted=True):
    if weighted:
        return sum(deltas[i] * counts[i] for i in survivors) / sum(counts[i] for i in survivors)
    return sum(deltas[i] for i in survivors)


@pytest.mark.parametrize("drop_at", [{}, {2: "keys"}, {3: "shares"}, {4: "masked"}, {1: "reveal"},
                                     {2: "masked", 5: "reveal"}], ids=["none", "after-setup", "after-keys",
                                                                         "after-shares", "during-unmasking", "two"])
def test_the_unmasked_sum_is_plain_fedavg_within_the_stated_bound(drop_at):
    server, sessions, reveals, counts, deltas, _ = protocol(n=6, drop_at=drop_at)
    weighted, total = server.unmask(reveals)
    survivors = sorted(server.survivors)
    assert total == sum(counts[i] for i in survivors)  # the masked count adds up exactly
    mean = weighted * server.params.weight_bound / total
    n, c, b, w = len(survivors), server.params.clip, server.params.bits, server.params.weight_bound
    bound = n * c * 2**-b * w / total  # the README's error bound per coordinate
    error = np.abs(mean - expected_mean(deltas, counts, survivors)).max()
    assert error <= bound, (error, bound)
    assert error > 0  # quantised, not the floats themselves


def test_unweighted_sums_for_dp_are_plain_sums():
    server, _, reveals, _, deltas, _ = protocol(n=4, weighted=False)
    weighted, total = server.unmask(reveals)
    assert total == 4
    assert np.abs(weighted - expected_mean(deltas, None, range(1, 5), weighted=False)).max() <= 4 * 2**-server.params.bits


def test_an_honest_dp_sum_at_the_clip_passes_the_bound_and_one_step_more_is_discarded():
    """With DP (every weight 1) and a noise far beyond the clip, the session clips each coordinate to
    [-C, C]: where every client is at +C the sum is exactly n·2^b, the bound, and passes. One step more,
    as a client that masked a value beyond its clip would add, and the sum is discarded."""
    n, m = 5, 2000
    server, sessions, reveals, _, deltas, _ = protocol(n=n, m=m, weighted=False, noise_std=20.0, at_clip=[0])
    weighted, total = server.unmask(reveals)
    assert total == n
    assert weighted[0] == n * server.params.clip  # every client at +C
    clipped = sum(np.clip(deltas[i], -1.0, 1.0) for i in range(1, n + 1))
    assert np.abs(weighted - clipped).max() <= n * 2 ** -server.params.bits
    server.total[0] += np.uint32(1)
    with pytest.raises(sa.Discarded, match=r"^1 coordinates of the sum lie beyond ±5, all that the survivors' "
                                           r"clipped updates allow \(coordinate 0 is 5\): a client masked values "
                                           r"outside its clip$"):
        server.unmask(reveals)


def test_a_masked_count_that_disagrees_with_the_plain_counts_is_discarded():
    server, _, reveals, counts, _, _ = protocol(n=4)
    plain = sum(counts.values())
    server.total[-1] = (int(server.total[-1]) - plain + 1) % 2**32  # the counts now add up to 1
    with pytest.raises(sa.Discarded, match=rf"^the masked example counts add up to 1, not to {plain} \(the "
                                           r"survivors' <UPDATE>s say so in all\): a client masked a false count$"):
        server.unmask(reveals)


def test_too_few_survivors_to_unmask_is_a_clear_failure():
    server, _, reveals, *_ = protocol(n=5, drop_at={1: "masked", 2: "masked", 3: "masked"})
    assert len(server.survivors) == 2 < server.params.threshold
    assert not reveals  # each survivor refused: revealing its self-mask share would expose its update
    with pytest.raises(sa.SecAggError, match="0 survivors revealed their shares; 4 are needed"):
        server.unmask(reveals)


def test_a_masked_update_is_indistinguishable_from_uniform_noise():
    """What the server receives from one client: its 32-bit words look uniform (a chi-square test on
    their top byte and on their low byte) and carry no trace of the update (no correlation)."""
    m = 200_000
    server, _, _, counts, deltas, masked = protocol(n=3, m=m)
    words = masked[1]
    for part in (words >> 24, words & 0xFF):
        histogram = np.bincount(part.astype(np.int64), minlength=256)
        chi2 = ((histogram - (m + 1) / 256) ** 2 / ((m + 1) / 256)).sum()
        assert chi2 < 350, chi2  # 255 degrees of freedom: p is about 1e-4 at 350
    assert abs(np.corrcoef(words[:-1].astype(np.float64), deltas[1])[0, 1]) < 0.01
    plain = sa.quantize(deltas[1] * counts[1] / server.params.weight_bound, server.params.bits,
                        np.random.default_rng(0))
    assert (words[:-1] == plain).mean() < 1e-3  # not the quantised update, nor near it


# --------------------------------------------------------------------------- what an honest client refuses


def test_an_honest_client_refuses_a_server_that_asks_for_both_shares_of_one_client():
    server, sessions, *_ = protocol(n=5, reveal=False)
    survivors = sorted(server.survivors)
    with pytest.raises(sa.SecAggError, match="both kinds of share of client 3"):
        sessions[1].answer({"header": "<SECAGG_UNMASK>", "round": 1, "survivors": survivors, "dropped": [3]})


@pytest.mark.parametrize("survivors, dropped, error", [
    ([1, 2, 3, 4], [], r"not exactly the clients that shared keys"),
    ([2, 3, 4, 5], [1], r"lists this client as dropped"),
    ([1, 2], [3, 4, 5], r"only 2 survivors, below the threshold 4"),
    ([1, 2, 3, 4, 5, 9], [], r"not exactly the clients that shared keys"),
])
def test_an_honest_client_refuses_inconsistent_unmasking(survivors, dropped, error):
    _, sessions, *_ = protocol(n=5, reveal=False)
    with pytest.raises(sa.SecAggError, match=error):
        sessions[1].answer({"header": "<SECAGG_UNMASK>", "round": 1, "survivors": survivors, "dropped": dropped})


def test_a_client_reveals_once_a_round():
    server, sessions, reveals, *_ = protocol(n=4)
    ask = {"header": "<SECAGG_UNMASK>", "round": 1, "survivors": sorted(server.survivors), "dropped": []}
    with pytest.raises(OutOfOrder, match="^<SECAGG_UNMASK> is not expected when the client is in state revealed$"):
        sessions[1].answer(ask)  # protocol() made every survivor reveal already


def shares_for_client_1() -> tuple[sa.ClientSession, dict[str, str]]:
    """Client 1's session after its keys and shares, and the shares its three peers addressed to it."""
    n, m = 4, 10
    params = sa.Params(1, (1, 2, 3, 4), 3, sa.bits_for(n), 1.0, 1, m)
    sessions = {i: sa.ClientSession(i, m) for i in range(1, 5)}
    server = sa.ServerRound(params)
    for i, s in sessions.items():
        server.take_keys(i, s.answer({"header": "<SECAGG_SETUP>", **params.to_json(), "weighted": False})[1])
    for i, s in sessions.items():
        server.take_shares(i, s.answer({"header": "<SECAGG_PEERS>", "round": 1, "keys": server.peers()})[1]["shares"])
    return sessions[1], server.routed(1)


def test_forged_or_misrouted_shares_do_not_decrypt():
    session, routed = shares_for_client_1()
    swapped = dict(routed)
    swapped["2"], swapped["3"] = routed["3"], routed["2"]  # a server that sends client 3's shares as client 2's
    with pytest.raises(sa.SecAggError, match="do not decrypt"):
        session.answer({"header": "<SECAGG_ROUTED>", "round": 1, "shares": swapped})
    session, routed = shares_for_client_1()
    tampered = dict(routed)
    raw = bytearray(sa.unb64(routed["2"]))
    raw[5] ^= 1
    tampered["2"] = sa.b64(bytes(raw))
    with pytest.raises(sa.SecAggError, match="do not decrypt"):
        session.answer({"header": "<SECAGG_ROUTED>", "round": 1, "shares": tampered})
    session, routed = shares_for_client_1()
    with pytest.raises(sa.SecAggError, match="not a peer"):
        session.answer({"header": "<SECAGG_ROUTED>", "round": 1, "shares": {"9": routed["2"]}})


@pytest.mark.parametrize("change, error", [
    (dict(threshold=2), r"threshold 2 of 5 clients: it must be more than half"),
    (dict(participants=[2, 3, 4, 5, 6]), r"does not list this client"),
    (dict(participants=[1, 1, 2, 3, 4]), r"distinct client ids"),
    (dict(bits=29), r"bits 29 could overflow for 5 clients \(at most 28\)"),
    (dict(length=11), r"length 11, the model has 10 coordinates"),
])
def test_an_honest_client_refuses_an_unsafe_setup(change, error):
    params = sa.Params(1, (1, 2, 3, 4, 5), 3, sa.bits_for(5), 1.0, 1, 10).to_json() | change
    with pytest.raises(sa.SecAggError, match=error):
        sa.ClientSession(1, 10).answer({"header": "<SECAGG_SETUP>", **params, "weighted": True})


def test_a_message_for_a_round_without_setup_is_refused():
    session = sa.ClientSession(1, 10)
    params = sa.Params(1, (1, 2, 3), 2, sa.bits_for(3), 1.0, 1, 10).to_json()
    session.answer({"header": "<SECAGG_SETUP>", **params, "weighted": True})
    with pytest.raises(sa.SecAggError, match="no setup of that round came"):
        session.answer({"header": "<SECAGG_PEERS>", "round": 3, "keys": {}})


# --------------------------------------------------------------------------- the round engine, with fake clients

RUN_TIMEOUT_S = 30


class SecureFake:
    """A client behind the proxy seam that runs the real client session; its update is the global
    model plus its own fixed step. `stop_at` makes it vanish at a stage, as a killed process would.
    `lie_masked` and `lie_reveal` make it hostile: they change, in place, the masked words it sends
    (masking is additive: what it adds to a masked word, it adds to the unmasked sum) or its
    <SECAGG_REVEAL>."""

    def __init__(self, client_id: int, step: float, num_examples: int, length: int):
        self.client_id, self.step, self.num_examples = client_id, step, num_examples
        self.session = sa.ClientSession(client_id, length)
        self.stop_at: str | None = None
        self.lie_masked: Callable[[np.ndarray], None] | None = None
        self.lie_reveal: Callable[[dict], None] | None = None
        self.pool: ClientPool | None = None  # it leaves the pool when it vanishes, as a closed connection does
        self.gone = False
        self.received: list = []  # everything the server sent it (for the no-leak check)
        self.sent: list = []  # everything it sent the server

    def vanish(self):
        self.gone = True
        self.pool.remove(self.client_id)
        raise Dropped("connection closed")

    async def secagg(self, header: str, fields: dict, reply: str | None):
        self.received.append((header, fields))
        if self.gone:
            raise Dropped("connection closed")
        if self.stop_at == header:
            self.vanish()
        answer = self.session.answer({"header": header, **fields})
        if answer is None:
            return None
        if header == "<SECAGG_UNMASK>" and self.lie_reveal is not None:
            self.lie_reveal(answer[1])
        self.sent.append(answer)
        return {"header": answer[0], **answer[1]}

    def train(self, model: dict) -> dict:
        return {n: t + self.step for n, t in model.items()}

    async def fit(self, ins: FitIns) -> FitRes:
        if self.gone or self.stop_at == "fit":
            self.vanish()
        trained = self.train(ins.model.tensors)
        masked = self.session.masked_update(ins.round, ins.model.tensors, trained, self.num_examples)
        if self.lie_masked is not None:
            self.lie_masked(masked)
        self.sent.append(("<UPDATE>", masked.copy()))
        return FitRes(self.client_id, ins.round, self.num_examples, {sa.MASKED: torch.from_numpy(masked)},
                      {"train_loss": 0.5, "local_test_accuracy": 0.9, "fit_seconds": 0.01})

    def acknowledge(self, result, accepted, note):
        pass

    async def finish(self, completed, rounds_completed, message):
        pass


def secure_engine(clients: list[SecureFake], template: dict, settings: sa.Settings | None = None, **changes):
    config = ServerConfig(**{"num_clients": len(clients), "model": "logreg", "time_to_wait_s": 0.0,
                             "round_timeout_s": 5, "num_rounds": 2, "round_retries": 0, "secure_aggregation": True,
                             **changes})
    pool = ClientPool(config.num_clients)
    for client in clients:
        pool.joined(client)
        pool.add(client)
        client.pool = pool
    recorder = Recorder()
    secure = sa.SecureAggregation(settings or sa.Settings(weight_bound=100, stage_timeout_s=5), template)
    engine = RoundEngine(config, Strategy(config), pool, GlobalModel.of(template),
                         lambda tensors: {"test_accuracy": float(tensors["w"].reshape(-1)[0]), "test_loss": 0.0},
                         Events([recorder]), Traffic(), secure=secure)
    return engine, recorder


def run(engine) -> int:
    async def bounded():
        return await asyncio.wait_for(engine.run(), RUN_TIMEOUT_S)
    return asyncio.run(bounded())


def test_secure_rounds_give_the_example_weighted_mean():
    template = {"w": torch.zeros(3, 4)}
    clients = [SecureFake(1, 1.0, 10, 12), SecureFake(2, 4.0, 30, 12), SecureFake(3, -2.0, 60, 12)]
    engine, recorder = secure_engine(clients, template)
    assert run(engine) == ExitStatus.OK
    step = (1 * 10 + 4 * 30 - 2 * 60) / 100  # 0.1 a round
    assert torch.allclose(engine.model.tensors["w"], torch.full((3, 4), 2 * step), atol=1e-5)
    # The server side holds, of each client, only what it sent: keys and a seed commitment, ciphertexts it
    # cannot open, a masked vector (folded into the running total at once), its plain-text count, and shares;
    # with identities its signed keys and its signature of the survivors (public, all of them); the round
    # keeps nothing else but its settings and the unmasking's lines for the log.
    assert set(vars(engine.secure.server)) == {"params", "weighted", "federation_key", "keys", "signed", "signatures",
                                               "commitments", "outbox", "total", "survivors", "counts", "left_out"}
    for client in clients:
        assert [h for h, _ in client.sent] == ["<SECAGG_KEYS>", "<SECAGG_SHARES>", "<UPDATE>", "<SECAGG_REVEAL>"] * 2


@pytest.mark.parametrize("stage", ["<SECAGG_SETUP>", "<SECAGG_PEERS>", "<SECAGG_ROUTED>", "fit", "<SECAGG_UNMASK>"])
def test_a_client_lost_at_any_stage_leaves_the_round_complete(stage):
    template = {"w": torch.zeros(8)}
    clients = [SecureFake(i, float(i), 10 * i, 8) for i in range(1, 6)]
    clients[1].stop_at = stage  # client 2
    engine, recorder = secure_engine(clients, template, num_rounds=1)
    assert run(engine) == ExitStatus.OK
    drops = recorder.of(ClientDropped)
    assert [d.client_id for d in drops] == [2], drops
    rows = recorder.rows()
    # a client lost during unmasking had sent its update: it is in the sum; otherwise it is not
    included = [1, 2, 3, 4, 5] if stage == "<SECAGG_UNMASK>" else [1, 3, 4, 5]
    expected = sum(i * 10 * i for i in included) / sum(10 * i for i in included)
    assert engine.model.tensors["w"][0].item() == pytest.approx(expected, abs=1e-5)
    assert rows[0]["clients"] == (5 if stage == "<SECAGG_UNMASK>" else 4)


def test_too_few_clients_left_fails_the_round_cleanly():
    template = {"w": torch.zeros(4)}
    clients = [SecureFake(i, 1.0, 10, 4) for i in range(1, 6)]
    for client in clients[:2]:
        client.stop_at = "fit"  # 3 of 5 left: below t = 4
    engine, recorder = secure_engine(clients, template, num_rounds=1)
    with pytest.raises(RunFailed, match="round 1 failed 1 times"):
        run(engine)
    assert recorder.of(RoundFailed)


def test_secure_aggregation_needs_three_clients_a_round():
    template = {"w": torch.zeros(2)}
    engine, _ = secure_engine([SecureFake(1, 1.0, 10, 2), SecureFake(2, 1.0, 10, 2)], template)
    assert engine.needed == 3


def test_the_server_side_gets_only_masked_words_from_each_client():
    """Everything of a client's update that reaches the server's code: one uint32 vector in which nothing
    of the update shows. The clients' plaintext here is as structured as an update can be (every
    coordinate of the delta the same, so its quantised words take at most two values, and the count
    in the clear is the client's example count); what arrives has almost every word distinct, and a
    last word that is not the count."""
    template = {"w": torch.zeros(1000)}
    clients = [SecureFake(i, 0.5 * i, 10 * i, 1000) for i in range(1, 5)]
    engine, _ = secure_engine(clients, template, num_rounds=1)
    seen = []
    add = engine.secure.add
    engine.secure.add = lambda client_id, tensors, count: (seen.append((client_id, dict(tensors))),
                                                           add(client_id, tensors, count))
    assert run(engine) == ExitStatus.OK
    assert sorted(c for c, _ in seen) == [1, 2, 3, 4]
    for client_id, tensors in seen:
        assert list(tensors) == [sa.MASKED] and tensors[sa.MASKED].dtype == torch.uint32
        words = tensors[sa.MASKED].numpy()
        assert len(np.unique(words[:-1])) > 990  # 1,000 uniform 32-bit words: a repeat is a 1-in-10^4 event
        assert int(words[-1]) != 10 * client_id
    assert engine.model.tensors["w"][0].item() == pytest.approx(sum(0.5 * i * 10 * i for i in range(1, 5))
                                                                 / sum(10 * i for i in range(1, 5)), abs=1e-4)


# --------------------------------------------------------------------------- what the server catches of hostile clients


def warnings_of(recorder) -> list[str]:
    return [e.message for e in recorder.of(Notice) if e.warning]


def a_failed_round(clients, template) -> list[str]:
    """Run one round that must fail: the warnings it logged. The global model stays as it was."""
    engine, recorder = secure_engine(clients, template, num_rounds=1)
    with pytest.raises(RunFailed, match="round 1 failed 1 times"):
        run(engine)
    assert torch.equal(engine.model.tensors["w"], template["w"])
    return warnings_of(recorder)


def five_clients(length: int) -> list[SecureFake]:
    """Clients 1..5, client i with step i and 10·i examples (150 in all), of which client 5 will lie."""
    return [SecureFake(i, float(i), 10 * i, length) for i in range(1, 6)]


def test_a_client_that_forges_its_masked_count_gets_the_round_discarded():
    """The issue's attack: counts that sum to 1 scaled the global model by about 54,000."""
    template = {"w": torch.zeros(8)}
    clients = five_clients(8)

    def counts_sum_to_one(words):
        words[-1] = (int(words[-1]) + 1 - 150) % 2**32

    clients[4].lie_masked = counts_sum_to_one
    assert a_failed_round(clients, template) == [
        "round 1: secure aggregation failed: the unmasked sum is discarded: the masked example counts add up to 1, "
        "not to 150 (the survivors' <UPDATE>s say so in all): a client masked a false count"]


def test_a_client_that_masks_coordinates_beyond_its_clip_gets_the_round_discarded():
    """The issue's attack: coordinates of 2^30 gave a mean delta of 400,360 against a clip of 10."""
    template = {"w": torch.zeros(8)}
    clients = five_clients(8)

    def far_beyond(words):
        words[:-1] += np.uint32(2**30)

    clients[4].lie_masked = far_beyond
    engine, recorder = secure_engine(clients, template, num_rounds=1)
    with pytest.raises(RunFailed, match="round 1 failed 1 times"):
        run(engine)
    # the bound: C·Σ w_u = 10·(10 + 20 + 30 + 40 + 50)/100 = 15
    [warning] = warnings_of(recorder)
    assert re.fullmatch(r"round 1: secure aggregation failed: the unmasked sum is discarded: 8 coordinates of the "
                        r"sum lie beyond ±15, all that the survivors' clipped updates allow \(coordinate 0 is "
                        r"4\d\.\d+\): a client masked values outside its clip", warning), warning
    assert torch.equal(engine.model.tensors["w"], template["w"])


class NoisyFake(SecureFake):
    """An honest client of a DP run, with noise far beyond the clip: its delta is Gaussian noise of
    `noise_std`, and coordinate 0 is 1,000 (its session clips both to [-C, C])."""

    def __init__(self, client_id: int, noise_std: float, length: int):
        super().__init__(client_id, 0.0, 1, length)
        self.noise_std = noise_std
        self.generator = torch.Generator().manual_seed(client_id)

    def train(self, model: dict) -> dict:
        delta = torch.randn(model["w"].shape, generator=self.generator) * self.noise_std
        delta[0] = 1000.0
        return {"w": model["w"] + delta}


@pytest.mark.parametrize("mode", ["central", "distributed"])
def test_an_honest_dp_round_passes_the_bound_and_one_step_beyond_it_is_discarded(mode):
    """DP's noise never gets an honest round discarded: the clients' noise (distributed mode; here far
    beyond the clip) is clipped by each session, the server's (central mode) goes on after the check.
    Every client's coordinate 0 is past the clip, so the sum there is the bound itself, n·C; one
    quantisation step more, from a client that masked it, and the round is discarded."""
    m, clip = 50, 9.0
    settings = sa.Settings(clip=clip, weight_bound=1, weighted=False, noise_std=50.0 if mode == "central" else 0.0,
                           stage_timeout_s=5)
    clients = [NoisyFake(i, 20.0 if mode == "distributed" else 0.1, m) for i in range(1, 6)]
    engine, recorder = secure_engine(clients, {"w": torch.zeros(m)}, settings)
    assert run(engine) == ExitStatus.OK
    assert not recorder.of(RoundFailed) and not warnings_of(recorder)
    if mode == "distributed":
        assert engine.model.tensors["w"][0].item() == 2 * clip  # Σ C / n, two rounds

    clients = [NoisyFake(i, 20.0 if mode == "distributed" else 0.1, m) for i in range(1, 6)]
    clients[4].lie_masked = lambda words: words.__setitem__(0, words[0] + np.uint32(1))
    engine, recorder = secure_engine(clients, {"w": torch.zeros(m)}, settings, num_rounds=1)
    with pytest.raises(RunFailed, match="round 1 failed 1 times"):
        run(engine)
    assert warnings_of(recorder) == [
        "round 1: secure aggregation failed: the unmasked sum is discarded: 1 coordinates of the sum lie beyond ±45, "
        "all that the survivors' clipped updates allow (coordinate 0 is 45): a client masked values outside its clip"]


def flip_a_bit(kind: str, owner: int, bit: int = 0) -> Callable[[dict], None]:
    """A lie for a <SECAGG_REVEAL>: one bit of its share of `owner`'s secret flipped."""
    def lie(reveal: dict) -> None:
        raw = bytearray(sa.unb64(reveal[kind][str(owner)]))
        raw[-1] ^= 1 << bit
        reveal[kind][str(owner)] = sa.b64(bytes(raw))
    return lie


@pytest.mark.parametrize("kind", ["seed_shares", "key_shares"])
def test_one_flipped_bit_in_one_share_is_left_out_using_a_spare(kind):
    """The issue's attack: one bad share built a garbage aggregate although a spare share would have
    exposed it. Client 1 is among the t = 4 whose shares are tried first; five survivors leave one spare.
    A mask key is revealed for a client that dropped: then six clients, of which client 6 drops."""
    n = 5 if kind == "seed_shares" else 6
    template = {"w": torch.zeros(8)}
    clients = [SecureFake(i, float(i), 10 * i, 8) for i in range(1, n + 1)]
    owner, what = (3, "self-mask seed") if kind == "seed_shares" else (6, "mask key")
    if kind == "key_shares":
        clients[5].stop_at = "fit"
    clients[0].lie_reveal = flip_a_bit(kind, owner)
    engine, recorder = secure_engine(clients, template, num_rounds=1)
    assert run(engine) == ExitStatus.OK
    expected = sum(i * 10 * i for i in range(1, 6)) / sum(10 * i for i in range(1, 6))
    assert engine.model.tensors["w"] == pytest.approx(torch.full((8,), expected), abs=1e-5)
    assert warnings_of(recorder) == [f"round 1: client 1 sent a bad share of client {owner}'s {what}; left out"]


def test_bad_shares_that_leave_fewer_than_t_good_fail_the_round_with_a_sentence():
    """Two bad shares of five, t = 4: every 4 of them hold a bad one. (Other bits than each other's: two
    flips of the same bit cancel out in the interpolation of clients 1, 2, 4 and 5, whose Lagrange
    weights for 1 and 2 are opposite, and rebuild the right seed.)"""
    template = {"w": torch.zeros(8)}
    clients = five_clients(8)
    clients[0].lie_reveal = flip_a_bit("seed_shares", 3, bit=0)
    clients[1].lie_reveal = flip_a_bit("seed_shares", 3, bit=3)
    assert a_failed_round(clients, template) == [
        "round 1: secure aggregation failed: unmasking failed: no 4 of the 5 shares of client 3's self-mask seed "
        "rebuild the seed it committed to: fewer than 4 of them are good (or client 3 dealt bad ones)"]


def test_the_spec_s_seed_commitment_vector_is_the_codes():
    readme = (Path(__file__).resolve().parent.parent / "docs" / "reference" / "protocol.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| `seed_commitment(5, 3, A)`"))
    assert sa.seed_commitment(5, 3, bytes(range(32))).hex() in row


def test_the_spec_s_identity_vectors_are_the_codes():
    """The protocol's identity test vectors, recomputed: a client written from the spec alone checks
    its certificate, digest and signatures against them."""
    readme = (Path(__file__).resolve().parent.parent / "docs" / "reference" / "protocol.md").read_text()
    section = readme[readme.index("Identities (`identities: true`)"):readme.index("The quantisation and the masked")]
    federation, key = bytes(range(64, 96)), bytes(range(96, 128))
    a, b = bytes(range(32)), bytes(range(32, 64))
    params = sa.Params(5, (3, 7, 9), 2, 29, 10.0, 60000, 100, True, True)
    digest = params.digest()
    values = [ident.public_of(federation), ident.public_of(key), ident.certify(federation, 3, ident.public_of(key)),
              digest, ident.sign(key, sa.keys_message(digest, 3, sa.public_key(a), sa.public_key(b),
                                                       sa.seed_commitment(5, 3, a))),
              ident.sign(key, sa.survivors_message(digest, [3, 9], [7]))]
    for value in values:
        assert f"`{value.hex()}`" in section


@pytest.mark.parametrize("lie, error", [
    ("none", r"client 2 sent no identity with its keys \(the run has --federation\)"),
    ("not enrolled", r"client 2's identity is not one this federation enrolled"),
    ("another client's", r"client 2's identity is not one this federation enrolled"),
    ("unsigned keys", r"client 2's keys are not signed by its identity"),
])
def test_the_server_leaves_out_a_client_whose_keys_no_enrolled_identity_signed(lie, error):
    """A hostile (or unenrolled) client, with --federation: left out at the key stage by the server, so
    that the honest clients are not made to refuse the whole round."""
    public, ids_of = federation([1, 2, 3])
    params = sa.Params(1, (1, 2, 3), 2, sa.bits_for(3), 1.0, 1, 8, False, True)
    server = sa.ServerRound(params, public)
    keys = sa.ClientSession(2, 8, ids_of[2]).answer({"header": "<SECAGG_SETUP>", **params.to_json()})[1]
    if lie == "none":
        del keys["identity"]
    elif lie == "not enrolled":
        keys["identity"]["certificate"] = sa.b64(ident.certify(ident.new_key()[0], 2, sa.unb64(keys["identity"]["identity_key"])))
    elif lie == "another client's":
        keys["identity"]["certificate"] = sa.b64(ids_of[3].certificate)
    else:
        keys["s_public"] = sa.b64(sa.new_keypair()[1])
    with pytest.raises(sa.SecAggError, match=error):
        server.take_keys(2, keys)
    assert 2 not in server.keys
