"""The order of the protocol's messages (fedsock/order.py), in-process and in milliseconds: the
tables themselves, every legal conversation walked by both ends at once, each kind of violation
refused with the one sentence, the secure-aggregation stages of a real ClientSession, the
server's reader and the client's `expect` fed by hand, (the protocol document's tables against the code: tests/test_protocol_doc.py).
"""

from __future__ import annotations

import asyncio
import re
from types import SimpleNamespace

import pytest
import torch

import socket_methods
from fedsock import order
from fedsock import secagg as sa
from fedsock.clients import ClientPool
from fedsock.console import RefusedError
from fedsock.events import Events, Notice, Observer
from fedsock.lobby import RemoteClient
from fedsock.order import (CLOSED, CONNECTED, CONVERSATION, FROM_CLIENT, FROM_SERVER, IDLE, NO_ANSWER, ROLE_CLIENT,
                           ROLE_SECURE_CLIENT, ROLE_SERVER, SECURE_STAGES, Order, OutOfOrder)
from socket_methods import (AUTH, decode_message, CHALLENGE, ERROR, EVALUATE, EVALUATION, FINISHED, HELLO, MESSAGES, METADATA, MODEL,
                            READY, SECAGG_KEYS, SECAGG_PEERS, SECAGG_REVEAL, SECAGG_ROUTED, SECAGG_SETUP,
                            SECAGG_SHARES, SECAGG_UNMASK, SESSION_END, SUCCESS, UPDATE, WAITING, ConnectionClosed)

def refusal(header: str, state: str) -> str:
    """The one text of a message out of order, as a regular expression that matches it whole."""
    return "^" + re.escape(f"{header} is not expected when the client is in state {state}") + "$"


# --------------------------------------------------------------------------- the tables


def test_every_header_is_a_constant_named_after_it_and_has_one_sender():
    for header in MESSAGES:
        assert getattr(socket_methods, header.strip("<>")) == header
    assert FROM_CLIENT | FROM_SERVER | {ERROR} == set(MESSAGES)
    assert not FROM_CLIENT & FROM_SERVER and ERROR not in FROM_CLIENT | FROM_SERVER


@pytest.mark.parametrize("table, meaning, start", [
    (CONVERSATION, order.MEANING, CONNECTED), (SECURE_STAGES, order.STAGE_MEANING, order.NEW)])
def test_a_table_is_whole_every_state_reachable_and_explained(table, meaning, start):
    events = set(MESSAGES) | {NO_ANSWER}
    for state, moves in table.items():
        assert set(moves) <= events, state
        assert set(moves.values()) <= set(table), state
    reached, frontier = {start}, [start]
    while frontier:
        for target in table[frontier.pop()].values():
            if target not in reached:
                reached.add(target)
                frontier.append(target)
    assert reached == set(table)
    assert set(meaning) == set(table)


# --------------------------------------------------------------------------- legal conversations, both ends at once

# (who sends, header): a whole conversation as the server and the client both see it.
PLAIN_RUN = [("client", HELLO), ("server", METADATA), ("server", WAITING), ("client", READY), ("server", WAITING),
             ("server", MODEL), ("server", WAITING), ("client", UPDATE), ("server", SUCCESS),
             ("server", MODEL), ("client", UPDATE), ("server", SUCCESS),
             ("server", EVALUATE), ("client", EVALUATION), ("server", SESSION_END),
             ("server", MODEL), ("client", UPDATE), ("server", SUCCESS), ("server", FINISHED)]
WITH_A_TOKEN = [("client", HELLO), ("server", CHALLENGE), ("client", AUTH), ("server", METADATA), ("client", READY)]
SECURE_ROUND = [*WITH_A_TOKEN,
                ("server", SECAGG_SETUP), ("client", SECAGG_KEYS), ("server", SECAGG_PEERS), ("client", SECAGG_SHARES),
                ("server", SECAGG_ROUTED), ("server", MODEL), ("client", UPDATE), ("server", SUCCESS),
                ("server", SECAGG_UNMASK), ("client", SECAGG_REVEAL), ("server", WAITING), ("client", ERROR)]
# A client that trains past the round's deadline: the server sends it nothing new until its late
# update has come, and answers that with <SUCCESS> (accepted: false); a <SUCCESS> may cross a request.
A_LATE_UPDATE = [("client", HELLO), ("server", METADATA), ("client", READY), ("server", MODEL), ("server", WAITING),
                 ("server", WAITING), ("client", UPDATE), ("server", MODEL), ("server", SUCCESS), ("client", UPDATE)]


def walk(conversation: list[tuple[str, str]]) -> tuple[Order, Order]:
    """Both ends through one conversation: each receives what the other sends. They must agree."""
    server, client = Order(ROLE_SERVER), Order(ROLE_CLIENT)
    for sender, header in conversation:
        (server.receive if sender == "client" else server.send)(header)
        (client.receive if sender == "server" else client.send)(header)
        assert server.state == client.state, (sender, header)
    return server, client


@pytest.mark.parametrize("conversation, end", [(PLAIN_RUN, CLOSED), (WITH_A_TOKEN, IDLE), (SECURE_ROUND, CLOSED),
                                               (A_LATE_UPDATE, IDLE)],
                         ids=["plain run", "with a token", "secure round", "a late update"])
def test_both_ends_walk_a_legal_conversation_in_step(conversation, end):
    server, client = walk(conversation)
    assert server.state == client.state == end


def test_a_refused_client_reads_the_server_s_error():
    server, client = walk([("client", HELLO), ("server", ERROR)])
    assert client.state == CLOSED


# --------------------------------------------------------------------------- what each end refuses

WELCOMED_AT = [("client", HELLO), ("server", METADATA)]
READY_AT = [*WELCOMED_AT, ("client", READY)]
TRAINING_AT = [*READY_AT, ("server", MODEL)]
KEYING_AT = [*READY_AT, ("server", SECAGG_SETUP)]


@pytest.mark.parametrize("before, sent, state", [
    ([], AUTH, "connected"),
    ([], READY, "connected"),
    ([], ERROR, "connected"),
    (WELCOMED_AT, UPDATE, "welcomed"),
    (WELCOMED_AT, AUTH, "welcomed"),
    (READY_AT, READY, "idle"),  # a second <READY>
    (READY_AT, HELLO, "idle"),  # a second <HELLO>
    (READY_AT, UPDATE, "idle"),  # an <UPDATE> without a model
    (READY_AT, EVALUATION, "idle"),  # an <EVALUATION> never asked for
    (READY_AT, SECAGG_KEYS, "idle"),  # keys never asked for
    (READY_AT, MODEL, "idle"),  # a server's message from a client
    (READY_AT, WAITING, "idle"),
    (TRAINING_AT, EVALUATION, "training"),
    (TRAINING_AT, READY, "training"),
    (KEYING_AT, SECAGG_SHARES, "keying"),  # an answer of another kind than asked
    (KEYING_AT, UPDATE, "keying"),
], ids=lambda value: value if isinstance(value, str) else None)
def test_the_server_refuses_what_the_client_may_not_send_now(before, sent, state):
    server, _ = walk(before)
    with pytest.raises(OutOfOrder, match=refusal(sent, state)):
        server.receive(sent)


@pytest.mark.parametrize("before, sent, state", [
    ([("client", HELLO)], READY, "greeted"),  # a client's message from the server
    ([("client", HELLO)], MODEL, "greeted"),
    ([("client", HELLO), ("server", CHALLENGE), ("client", AUTH)], CHALLENGE, "authenticated"),
    (READY_AT, METADATA, "idle"),  # a second welcome
    (TRAINING_AT, MODEL, "training"),  # a new model while it trains
    (TRAINING_AT, EVALUATE, "training"),
    (TRAINING_AT, SECAGG_SETUP, "training"),
], ids=lambda value: value if isinstance(value, str) else None)
def test_a_client_refuses_what_the_server_may_not_send_now(before, sent, state):
    _, client = walk(before)
    with pytest.raises(OutOfOrder, match=refusal(sent, state)):
        client.receive(sent)


def test_after_the_end_nothing_more_is_expected():
    _, client = walk([*READY_AT, ("server", FINISHED)])
    with pytest.raises(OutOfOrder, match=refusal(WAITING, "closed")):
        client.receive(WAITING)


# --------------------------------------------------------------------------- the server's patience


def test_a_late_answer_to_a_stage_that_timed_out_is_dropped_once():
    server, _ = walk(KEYING_AT)
    server.time_out(3)
    assert server.state == IDLE
    server.send(SECAGG_SETUP)  # the next round, or the same one again, sets up afresh
    assert server.receive(SECAGG_KEYS, 3) is False  # the slow answer: no fault, no use
    assert server.receive(SECAGG_KEYS, 4) is True  # the answer to this setup
    with pytest.raises(OutOfOrder, match=refusal(SECAGG_KEYS, "idle")):
        server.receive(SECAGG_KEYS, 3)  # dropped once, not twice


@pytest.mark.parametrize("request_, answer", [(SECAGG_PEERS, SECAGG_SHARES), (SECAGG_UNMASK, SECAGG_REVEAL)])
def test_every_stage_that_times_out_drops_its_late_answer(request_, answer):
    server, _ = walk([*READY_AT, ("server", request_)])
    server.time_out(7)
    assert server.receive(answer, 7) is False
    assert server.state == IDLE


def test_a_late_evaluation_is_refused():
    server, _ = walk([*READY_AT, ("server", EVALUATE)])
    server.time_out(5)
    with pytest.raises(OutOfOrder, match=refusal(EVALUATION, "idle")):
        server.receive(EVALUATION, 5)


def test_a_round_s_deadline_leaves_a_training_client_training():
    server, _ = walk(TRAINING_AT)
    server.time_out(2)  # the round closed without it
    assert server.state == "training"
    assert server.receive(UPDATE, 2) is True  # its late update is read (and answered, not used)


def test_a_time_out_after_the_answer_came_changes_nothing():
    server, _ = walk([*KEYING_AT, ("client", SECAGG_KEYS)])
    server.time_out(1)
    assert server.state == IDLE and server.late is None


# --------------------------------------------------------------------------- a client's secure-aggregation stages

ONE_ROUND = [SECAGG_SETUP, SECAGG_PEERS, SECAGG_ROUTED, MODEL, SECAGG_UNMASK]


@pytest.mark.parametrize("stages", [
    ONE_ROUND + ONE_ROUND,
    [SECAGG_SETUP, SECAGG_SETUP, *ONE_ROUND],  # too few keys: the round is set up again
    [SECAGG_SETUP, SECAGG_PEERS, *ONE_ROUND],  # too few shares
    [SECAGG_SETUP, SECAGG_PEERS, SECAGG_ROUTED, *ONE_ROUND],  # it got its shares, but no model
    [SECAGG_SETUP, SECAGG_PEERS, SECAGG_ROUTED, MODEL, *ONE_ROUND],  # its update was late: no unmask
], ids=["two rounds", "again after keys", "again after shares", "again after routing", "again after training"])
def test_the_legal_stage_orders(stages):
    session = Order(ROLE_SECURE_CLIENT)
    for header in stages:
        session.receive(header)
    assert session.state == order.REVEALED


@pytest.mark.parametrize("before, sent, stage", [
    ([], SECAGG_PEERS, "new"),
    ([], MODEL, "new"),
    ([SECAGG_SETUP, SECAGG_PEERS], SECAGG_PEERS, "shared"),  # a second <SECAGG_PEERS>: key and nonce again
    ([SECAGG_SETUP, SECAGG_PEERS], MODEL, "shared"),  # a model before the shares
    ([SECAGG_SETUP, SECAGG_PEERS, SECAGG_ROUTED], SECAGG_UNMASK, "routed"),  # an unmask before the model
    ([SECAGG_SETUP, SECAGG_PEERS, SECAGG_ROUTED], SECAGG_ROUTED, "routed"),
    ([SECAGG_SETUP], SECAGG_UNMASK, "keyed"),
    (ONE_ROUND, SECAGG_UNMASK, "revealed"),  # a second unmask
    (ONE_ROUND, MODEL, "revealed"),
])
def test_the_stages_out_of_order_are_refused(before, sent, stage):
    session = Order(ROLE_SECURE_CLIENT)
    for header in before:
        session.receive(header)
    with pytest.raises(OutOfOrder, match=refusal(sent, stage)):
        session.receive(sent)


def keyed_sessions(n: int = 3, m: int = 10) -> tuple[dict[int, sa.ClientSession], sa.ServerRound]:
    """n real client sessions after <SECAGG_SETUP>, and the server's round holding their keys."""
    params = sa.Params(1, tuple(range(1, n + 1)), n // 2 + 1, sa.bits_for(n), 1.0, 1, m)
    sessions = {i: sa.ClientSession(i, m) for i in params.participants}
    server = sa.ServerRound(params)
    for i, session in sessions.items():
        server.take_keys(i, session.answer({"header": SECAGG_SETUP, **params.to_json(), "weighted": False})[1])
    return sessions, server


def test_a_client_session_shares_once_a_setup():
    sessions, server = keyed_sessions()
    peers = {"header": SECAGG_PEERS, "round": 1, "keys": server.peers()}
    sessions[1].answer(peers)
    with pytest.raises(OutOfOrder, match=refusal(SECAGG_PEERS, "shared")):
        sessions[1].answer(peers)  # a second sharing would seal under the same key and nonce


def test_a_client_session_reveals_nothing_before_its_update_is_masked():
    sessions, server = keyed_sessions()
    for i, session in sessions.items():
        server.take_shares(i, session.answer({"header": SECAGG_PEERS, "round": 1, "keys": server.peers()})[1]["shares"])
    sessions[1].answer({"header": SECAGG_ROUTED, "round": 1, "shares": server.routed(1)})
    with pytest.raises(OutOfOrder, match=refusal(SECAGG_UNMASK, "routed")):
        sessions[1].answer({"header": SECAGG_UNMASK, "round": 1, "survivors": [1, 2, 3], "dropped": []})


def test_a_client_session_refuses_a_model_before_its_peers_shares():
    sessions, _ = keyed_sessions()
    with pytest.raises(OutOfOrder, match=refusal(MODEL, "keyed")):
        sessions[1].masked_update(1, {"w": torch.zeros(10)}, {"w": torch.ones(10)}, 5)


# --------------------------------------------------------------------------- the ends that use the table


class FakeConnection:
    """What the server's reader and the client's `expect` read from: messages handed in by the test."""

    def __init__(self, messages: list[dict]):
        self.incoming = list(messages)
        self.sent: list = []
        self.errors: list[str] = []
        self.peer = "127.0.0.1:9"

    async def recv_message(self, limit: int = 0) -> dict:
        await asyncio.sleep(0)  # a turn of the loop, as a socket read takes
        if not self.incoming:
            raise ConnectionClosed("connection closed")
        return self.incoming.pop(0)

    async def send(self, frames: list) -> None:
        self.sent.append(frames)
        for frame in frames:  # the <ERROR>s that fedsock.transport.send_error sends
            message = decode_message(bytes(frame)[8:])
            if message["header"] == ERROR:
                self.errors.append(message["message"])

    async def close(self) -> None:
        pass


class Lines(Observer):
    def __init__(self):
        self.events: list = []

    def notify(self, event) -> None:
        self.events.append(event)


def reader(messages: list[dict], state: str = order.WELCOMED) -> tuple[RemoteClient, FakeConnection, Lines]:
    """A joined client's reader on the server, with only what these messages need of a lobby."""
    lines = Lines()
    lobby = SimpleNamespace(pool=ClientPool(3), events=Events([lines]), closing=False)
    conn = FakeConnection(messages)
    return RemoteClient(lobby, 2, conn, 100, Order(ROLE_SERVER, state)), conn, lines


def ready(num_examples: int = 50) -> dict:
    return {"header": READY, "num_examples": num_examples, "test_examples": 5}


@pytest.mark.parametrize("messages, text", [
    ([ready(), ready()], f"{READY} is not expected when the client is in state idle"),
    ([ready(), {"header": EVALUATION, "round": 0, "eval_loss_sum": 1.0, "eval_confusion": []}],
     f"{EVALUATION} is not expected when the client is in state idle"),
    ([ready(), {"header": SECAGG_KEYS, "round": 7, "c_public": "AA", "s_public": "AA"}],
     f"{SECAGG_KEYS} is not expected when the client is in state idle"),
    ([{"header": MODEL, "round": 1}], f"{MODEL} is not expected when the client is in state welcomed"),
], ids=["a second <READY>", "an unsolicited <EVALUATION>", "keys never asked for", "a <MODEL> from a client"])
def test_the_server_s_reader_refuses_with_the_one_text_and_drops_the_client(messages, text):
    client, conn, lines = reader(messages)
    asyncio.run(client.serve())
    assert conn.errors == [text]
    assert client.gone == text
    assert any(isinstance(e, Notice) and text in e.message for e in lines.events)


def test_the_server_s_reader_drops_a_slow_answer_quietly_and_keeps_the_client():
    async def scenario():
        client, conn, lines = reader([], state=IDLE)
        setup = {"round": 4, "participants": [1, 2, 3]}
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(client.secagg(SECAGG_SETUP, setup, SECAGG_KEYS), 0.01)
        conn.incoming = [{"header": SECAGG_KEYS, "round": 4, "c_public": "AA", "s_public": "AA"}]
        await client.serve()
        return client, conn

    client, conn = asyncio.run(scenario())
    assert conn.errors == [] and client.gone == "connection closed"
    assert client.order.state == IDLE


class BlockingFake:
    """The blocking connection fl_client.py's `expect` reads from."""

    def __init__(self, messages: list[dict]):
        self.incoming = list(messages)

    def recv_message(self, limit: int = 0) -> dict:
        return self.incoming.pop(0)


def test_the_client_s_expect_follows_the_table():
    from fedsock.client import expect

    _, client = walk(TRAINING_AT)
    conn = BlockingFake([{"header": WAITING, "message": "x"}, {"header": MODEL, "round": 2}])
    assert expect(conn, client)["header"] == WAITING
    with pytest.raises(OutOfOrder, match=refusal(MODEL, "training")):
        expect(conn, client)


def test_the_client_s_expect_says_the_server_s_error_in_any_state():
    from fedsock.client import expect

    _, client = walk(TRAINING_AT)
    with pytest.raises(RefusedError, match="the server says: full"):
        expect(BlockingFake([{"header": ERROR, "message": "full"}]), client)
