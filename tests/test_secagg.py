"""Secure aggregation, in-process and in milliseconds: Shamir sharing, the quantisation and its
overflow rule, the whole protocol among client sessions and the server's round (dropouts at every
stage), what a masked update looks like (uniform noise), every refusal an honest client makes, and
the round engine running secure rounds with clients behind the proxy seam. The same protocol over
real sockets and processes is in tests/test_secagg_processes.py.
"""

from __future__ import annotations

import asyncio
import secrets

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsock import secagg as sa
from fedsock.clients import ClientPool, Dropped, FitIns, FitRes, GlobalModel
from fedsock.config import ServerConfig
from fedsock.console import ExitStatus
from fedsock.events import ClientDropped, Events, RoundFailed
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
    secret = secrets.randbelow(sa.PRIME)
    holders = rnd.sample(range(1, 200), n)
    shares = sa.split(secret, holders, t)
    subset = rnd.sample(holders, t)
    assert sa.combine({x: shares[x] for x in subset}) == secret
    more = rnd.sample(holders, min(n, t + 1))
    assert sa.combine({x: shares[x] for x in more}) == secret


def test_fewer_than_t_shares_say_nothing_about_the_secret():
    """Perfect secrecy: for t - 1 shares and ANY candidate secret there is a polynomial of degree t - 1
    through them with that secret at 0; so every secret is as likely as any other."""
    t, holders = 4, [3, 7, 9, 12, 20]
    shares = sa.split(secrets.randbelow(sa.PRIME), holders, t)
    seen = {x: shares[x] for x in holders[: t - 1]}
    for candidate in (0, 1, secrets.randbelow(sa.PRIME)):
        points = {0: candidate, **seen}
        # the polynomial through these t points, evaluated back at each share's x, gives the share
        for x, y in seen.items():
            value = sum(yi * _basis(points, xi, x) for xi, yi in points.items()) % sa.PRIME
            assert value == y


def _basis(points: dict, xi: int, x: int) -> int:
    numerator = denominator = 1
    for xj in points:
        if xj != xi:
            numerator = numerator * (x - xj) % sa.PRIME
            denominator = denominator * (xi - xj) % sa.PRIME
    return numerator * pow(denominator, -1, sa.PRIME) % sa.PRIME


def test_a_wrong_share_gives_a_wrong_secret_and_bad_parameters_are_refused():
    secret = secrets.randbelow(sa.PRIME)
    shares = sa.split(secret, [1, 2, 3], 2)
    assert sa.combine({1: shares[1], 2: (shares[2] + 1) % sa.PRIME}) != secret
    for bad in [dict(secret=sa.PRIME, holders=[1, 2], threshold=2), dict(secret=1, holders=[0, 1], threshold=2),
                dict(secret=1, holders=[1, 1], threshold=2)]:
        with pytest.raises(ValueError):
            sa.split(bad["secret"], bad["holders"], bad["threshold"])


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


def protocol(n: int = 5, m: int = 2000, weighted: bool = True, drop_at: dict[int, str] | None = None, seed: int = 0,
             reveal: bool = True):
    """Run one round among n client sessions and a server round; clients in `drop_at` stop at a stage
    ("keys": never answer the setup, "shares", "masked": never send the update, "reveal")."""
    drop_at = drop_at or {}
    rng = np.random.default_rng(seed)
    ids = list(range(1, n + 1))
    weight_bound = 500 if weighted else 1
    params = sa.Params(1, tuple(ids), sa.default_threshold(n, 2 / 3), sa.bits_for(n), 1.0, weight_bound, m)
    sessions = {i: sa.ClientSession(i, m) for i in ids}
    server = sa.ServerRound(params)
    setup = {"header": "<SECAGG_SETUP>", **params.to_json(), "weighted": weighted}
    for i in ids:
        if drop_at.get(i) != "keys":
            _, keys = sessions[i].answer(setup)
            server.take_keys(i, keys)
    peers = {"header": "<SECAGG_PEERS>", "round": 1, "keys": server.peers()}
    for i in list(server.keys):
        if drop_at.get(i) != "shares":
            _, shares = sessions[i].answer(peers)
            server.take_shares(i, shares["shares"])
    for i in server.sharers:
        sessions[i].answer({"header": "<SECAGG_ROUTED>", "round": 1, "shares": server.routed(i)})
    trained = {i: {"w": torch.from_numpy(rng.normal(0, 0.05, m)).float()} for i in ids}
    deltas = {i: trained[i]["w"].double().numpy() for i in ids}
    counts = {i: int(rng.integers(50, 500)) for i in ids}
    start = {"w": torch.zeros(m)}
    masked = {}
    for i in server.sharers:
        if drop_at.get(i) != "masked":
            masked[i] = sessions[i].masked_update(1, start, trained[i], counts[i])
            server.add(i, masked[i])
    survivors = sorted(server.survivors)
    dropped = sorted(set(server.sharers) - server.survivors)
    unmask = {"header": "<SECAGG_UNMASK>", "round": 1, "survivors": survivors, "dropped": dropped}
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
    model plus its own fixed step. `stop_at` makes it vanish at a stage, as a killed process would."""

    def __init__(self, client_id: int, step: float, num_examples: int, length: int):
        self.client_id, self.step, self.num_examples = client_id, step, num_examples
        self.session = sa.ClientSession(client_id, length)
        self.stop_at: str | None = None
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
        self.sent.append(answer)
        return {"header": answer[0], **answer[1]}

    async def fit(self, ins: FitIns) -> FitRes:
        if self.gone or self.stop_at == "fit":
            self.vanish()
        trained = {n: t + self.step for n, t in ins.model.tensors.items()}
        masked = self.session.masked_update(ins.round, ins.model.tensors, trained, self.num_examples)
        self.sent.append(("<UPDATE>", masked.copy()))
        return FitRes(self.client_id, ins.round, self.num_examples, {sa.MASKED: torch.from_numpy(masked)},
                      {"train_loss": 0.5, "local_test_accuracy": 0.9, "fit_seconds": 0.01})

    def acknowledge(self, result, accepted, note):
        pass

    async def finish(self, completed, rounds_completed, message):
        pass


def secure_engine(clients: list[SecureFake], template: dict, **changes):
    config = ServerConfig(**{"num_clients": len(clients), "model": "logreg", "time_to_wait_s": 0.0,
                             "round_timeout_s": 5, "num_rounds": 2, "round_retries": 0, "secure_aggregation": True,
                             **changes})
    pool = ClientPool(config.num_clients)
    for client in clients:
        pool.joined(client)
        pool.add(client)
        client.pool = pool
    recorder = Recorder()
    secure = sa.SecureAggregation(sa.Settings(weight_bound=100, stage_timeout_s=5), template)
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
    # The server side holds, of each client, only what it sent: keys, ciphertexts it cannot open, a masked
    # vector (folded into the running total at once) and shares; the round keeps nothing else.
    assert set(vars(engine.secure.server)) == {"params", "keys", "outbox", "total", "survivors"}
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
    engine.secure.add = lambda client_id, tensors: (seen.append((client_id, dict(tensors))), add(client_id, tensors))
    assert run(engine) == ExitStatus.OK
    assert sorted(c for c, _ in seen) == [1, 2, 3, 4]
    for client_id, tensors in seen:
        assert list(tensors) == [sa.MASKED] and tensors[sa.MASKED].dtype == torch.uint32
        words = tensors[sa.MASKED].numpy()
        assert len(np.unique(words[:-1])) > 990  # 1,000 uniform 32-bit words: a repeat is a 1-in-10^4 event
        assert int(words[-1]) != 10 * client_id
    assert engine.model.tensors["w"][0].item() == pytest.approx(sum(0.5 * i * 10 * i for i in range(1, 5))
                                                                 / sum(10 * i for i in range(1, 5)), abs=1e-4)
