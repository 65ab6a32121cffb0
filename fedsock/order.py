"""The order of fedsock's messages, in one place, as transition tables (h11's "Rule 1").

Which message may come when is decided here and nowhere else. The server's reader
(fedsock/lobby.py), fl_client.py, the sockets simulation's virtual client and the secure-
aggregation session of a client (fedsock/secagg.py) each keep an `Order`, check every message
they receive against it, and tell it the requests and answers they send. A message received
out of order raises OutOfOrder, always with the same sentence: "<X> is not expected when the
client is in state Y". The protocol document's tables of the order are rendered from these ones
(`markdown`), and a test checks that they are the same.

Two tables, state -> {message: next state}:
- CONVERSATION: one connection, which both ends walk together. Each end has its role: the
  server checks what the client sends (ROLE_SERVER), a client what the server sends
  (ROLE_CLIENT), and each tells the table its own requests and answers, so that both stand in
  the same state. (Heartbeats and an <ERROR> sent need no telling. Nor does the server's
  <FINISHED>: an update or an answer that crosses it is still read while the connection closes.)
- SECURE_STAGES: a client's secure aggregation of one round (ROLE_SECURE_CLIENT):
  <SECAGG_SETUP>, exactly one <SECAGG_PEERS>, <SECAGG_ROUTED>, <MODEL>, with identities the
  consistency check <SECAGG_CHECK>, then <SECAGG_UNMASK>. A new setup may come at any stage (a
  round that failed, or went on without this client, is set up afresh, with fresh keys);
  anything else out of this order is refused. So a client never shares twice under one key
  and nonce, and never reveals a share before its update is masked. (The one step the table
  lets a setup skip: without identities there is no check. With them, a client refuses an
  unmask whose survivors it did not sign: fedsock.secagg.ClientRound.reveal.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from socket_methods import (
    AUTH,
    CHALLENGE,
    ERROR,
    EVALUATE,
    EVALUATION,
    FINISHED,
    HELLO,
    METADATA,
    MODEL,
    PROGRESS,
    READY,
    SECAGG_KEYS,
    SECAGG_PEERS,
    SECAGG_REVEAL,
    SECAGG_CHECK,
    SECAGG_ROUTED,
    SECAGG_SETUP,
    SECAGG_SHARES,
    SECAGG_SIGNED,
    SECAGG_UNMASK,
    SESSION_END,
    SUCCESS,
    UPDATE,
    WAITING,
    BadMessage,
)


class OutOfOrder(BadMessage):
    """A message that the protocol's order does not allow in the current state."""


REFUSAL = "{event} is not expected when the client is in state {state}"  # the one text of an OutOfOrder


# Who sends each message; <ERROR> comes from either side.
FROM_CLIENT = frozenset({HELLO, AUTH, READY, UPDATE, PROGRESS, EVALUATION, SECAGG_KEYS, SECAGG_SHARES,
                         SECAGG_SIGNED, SECAGG_REVEAL})
FROM_SERVER = frozenset({CHALLENGE, METADATA, MODEL, EVALUATE, SECAGG_SETUP, SECAGG_PEERS, SECAGG_ROUTED, SECAGG_CHECK,
                         SECAGG_UNMASK, SUCCESS, WAITING, SESSION_END, FINISHED})
# What the server asks of a client's secure aggregation (fedsock.secagg.ClientSession answers them).
SECAGG_REQUESTS = frozenset({SECAGG_SETUP, SECAGG_PEERS, SECAGG_ROUTED, SECAGG_CHECK, SECAGG_UNMASK})
# Not a message: the server stops waiting for an answer (its stage timeout, or the evaluation's, passed).
NO_ANSWER = "(no answer in time)"

# ---------------------------------------------------------------- one connection

CONNECTED, GREETED, CHALLENGED, AUTHENTICATED = "connected", "greeted", "challenged", "authenticated"
WELCOMED, IDLE, TRAINING, EVALUATING = "welcomed", "idle", "training", "evaluating"
KEYING, SHARING, SIGNING, REVEALING, CLOSED = "keying", "sharing", "signing", "revealing", "closed"

MEANING = {  # each state in words, for the protocol's document
    CONNECTED: "it has said nothing yet",
    GREETED: "it said hello; the server lets it in, asks for a proof, or refuses it",
    CHALLENGED: "it owes the proof of its token",
    AUTHENTICATED: "its proof is in; the server lets it in or refuses it",
    WELCOMED: "it sets itself up (data, model) and owes `<READY>`",
    IDLE: "ready, and asked for nothing",
    TRAINING: "it trains the model it was sent, and owes its `<UPDATE>`",
    EVALUATING: "it evaluates the model it was sent, and owes its `<EVALUATION>`",
    KEYING: "it owes its secure-aggregation keys",
    SHARING: "it owes its secure-aggregation shares",
    SIGNING: "it owes its signature of the round's survivors (the consistency check)",
    REVEALING: "it owes the shares that unmask the round",
    CLOSED: "the connection is over",
}


# Once a client is welcomed, the server may at any time send its heartbeat, its answer to an update
# (which may cross the next request), or the end of a session (the state stays as it is), or the end
# of the run; and either side may send an <ERROR>, which ends the connection.
STAYING = (WAITING, SUCCESS, SESSION_END)
ENDING = (FINISHED, ERROR)


def _and_at_any_time(state: str, moves: dict[str, str]) -> dict[str, str]:
    return {**moves, **{event: state for event in STAYING}, **{event: CLOSED for event in ENDING}}


def _at_any_time(state: str, moves: Mapping[str, str]) -> bool:
    return all(moves.get(e) == state for e in STAYING) and all(moves.get(e) == CLOSED for e in ENDING)


CONVERSATION: dict[str, dict[str, str]] = {
    CONNECTED: {HELLO: GREETED},
    GREETED: {CHALLENGE: CHALLENGED, METADATA: WELCOMED, ERROR: CLOSED},
    CHALLENGED: {AUTH: AUTHENTICATED, ERROR: CLOSED},
    AUTHENTICATED: {METADATA: WELCOMED, ERROR: CLOSED},
    WELCOMED: _and_at_any_time(WELCOMED, {READY: IDLE}),
    IDLE: _and_at_any_time(IDLE, {MODEL: TRAINING, EVALUATE: EVALUATING, SECAGG_SETUP: KEYING,
                                  SECAGG_PEERS: SHARING, SECAGG_ROUTED: IDLE, SECAGG_CHECK: SIGNING,
                                  SECAGG_UNMASK: REVEALING}),
    # No NO_ANSWER here: a client that misses a round's deadline stays in training, and is sent
    # nothing new until its late update has come (it is then answered `accepted: false`).
    TRAINING: _and_at_any_time(TRAINING, {UPDATE: IDLE, PROGRESS: TRAINING}),
    EVALUATING: _and_at_any_time(EVALUATING, {EVALUATION: IDLE, NO_ANSWER: IDLE}),
    KEYING: _and_at_any_time(KEYING, {SECAGG_KEYS: IDLE, NO_ANSWER: IDLE}),
    SHARING: _and_at_any_time(SHARING, {SECAGG_SHARES: IDLE, NO_ANSWER: IDLE}),
    SIGNING: _and_at_any_time(SIGNING, {SECAGG_SIGNED: IDLE, NO_ANSWER: IDLE}),
    REVEALING: _and_at_any_time(REVEALING, {SECAGG_REVEAL: IDLE, NO_ANSWER: IDLE}),
    CLOSED: {},
}
# A slow client's answer to a secure-aggregation stage that timed out may still come: it is dropped
# without a word, and the client stays for the next round. (A late <EVALUATION> is refused.)
LATE_ANSWERS = {KEYING: SECAGG_KEYS, SHARING: SECAGG_SHARES, SIGNING: SECAGG_SIGNED, REVEALING: SECAGG_REVEAL}

# ---------------------------------------------------------------- a client's secure aggregation of one round

NEW, KEYED, SHARED, ROUTED, MASKED, CHECKED, REVEALED = "new", "keyed", "shared", "routed", "masked", "checked", "revealed"

STAGE_MEANING = {
    NEW: "no setup has come yet",
    KEYED: "it made fresh keys and sent their public halves",
    SHARED: "it sent its shares, sealed for each peer",
    ROUTED: "it holds its peers' shares",
    MASKED: "it trained and masked its update",
    CHECKED: "it signed the survivors it was told (identities only)",
    REVEALED: "it revealed the shares that unmask the round",
}

SECURE_STAGES: dict[str, dict[str, str]] = {
    NEW: {SECAGG_SETUP: KEYED},
    KEYED: {SECAGG_PEERS: SHARED, SECAGG_SETUP: KEYED},
    SHARED: {SECAGG_ROUTED: ROUTED, SECAGG_SETUP: KEYED},
    ROUTED: {MODEL: MASKED, SECAGG_SETUP: KEYED},
    MASKED: {SECAGG_CHECK: CHECKED, SECAGG_UNMASK: REVEALED, SECAGG_SETUP: KEYED},
    CHECKED: {SECAGG_UNMASK: REVEALED, SECAGG_SETUP: KEYED},
    REVEALED: {SECAGG_SETUP: KEYED},
}


@dataclass(frozen=True)
class Role:
    """One end's part in a table: where it starts, and which messages its peer sends (those it checks)."""

    table: Mapping[str, Mapping[str, str]]
    start: str
    incoming: frozenset[str]


ROLE_SERVER = Role(CONVERSATION, CONNECTED, FROM_CLIENT | {ERROR})
ROLE_CLIENT = Role(CONVERSATION, CONNECTED, FROM_SERVER | {ERROR})
ROLE_SECURE_CLIENT = Role(SECURE_STAGES, NEW, SECAGG_REQUESTS | {MODEL})


def next_state(table: Mapping[str, Mapping[str, str]], state: str, event: str) -> str:
    """The one lookup: the state that `event` leads to from `state`, or OutOfOrder."""
    moves = table.get(state, {})
    if event not in moves:
        raise OutOfOrder(REFUSAL.format(event=event, state=state))
    return moves[event]


class Order:
    """Where one connection (or one client's secure aggregation) stands in its role's table."""

    def __init__(self, role: Role, state: str | None = None):
        self.role = role
        self.state = state or role.start
        self.late: tuple[str, int] | None = None  # (header, round) of an answer given up on (LATE_ANSWERS)

    def receive(self, header: str, round_number: int | None = None) -> bool:
        """The peer sent `header` (of `round_number`): move on. False: the message is a late answer,
        to be dropped without a word. OutOfOrder if the table does not allow it now."""
        if self.late == (header, round_number):
            self.late = None
            return False
        if header not in self.role.incoming:  # the peer sent what only this end may send
            raise OutOfOrder(REFUSAL.format(event=header, state=self.state))
        self.state = next_state(self.role.table, self.state, header)
        return True

    def send(self, header: str) -> None:
        """This end sends `header`: move on (OutOfOrder here is a bug in this end's own code)."""
        self.state = next_state(self.role.table, self.state, header)

    def time_out(self, round_number: int) -> None:
        """The server stops waiting for the answer of round `round_number` that the client owes (NO_ANSWER).
        A wait that ended otherwise (the answer came, the client left) leaves the state as it is."""
        if NO_ANSWER not in self.role.table[self.state]:
            return
        late = LATE_ANSWERS.get(self.state)
        if late is not None:
            self.late = (late, round_number)
        self.state = next_state(self.role.table, self.state, NO_ANSWER)


# ---------------------------------------------------------------- the protocol document's tables


def _moves_text(moves: Mapping[str, str], state: str) -> str:
    def name(event: str) -> str:
        return f"`{event}`" if event.startswith("<") else event

    return ", ".join(name(e) if target == state else f"{name(e)} → {target}" for e, target in moves.items())


def markdown(table: Mapping[str, Mapping[str, str]], meaning: Mapping[str, str]) -> str:
    """A table as docs/reference/protocol.md shows it: a row per state, with what each side may send in it and the
    state that leads to (a message without an arrow leaves the state as it is). What may come in
    many states (an <ERROR>, the server's heartbeat, ...) is said once, below the rows."""
    welcomed_on = [state for state, moves in table.items() if _at_any_time(state, moves)]
    rows = {}
    for state, moves in table.items():
        said_below = ENDING if state in welcomed_on else (ERROR,)
        own = {e: t for e, t in moves.items() if e not in said_below and not (state in welcomed_on and e in STAYING)}
        rows[state] = ({e: t for e, t in own.items() if e in FROM_CLIENT},
                       {e: t for e, t in own.items() if e not in FROM_CLIENT})
    senders = [i for i in (0, 1) if any(row[i] for row in rows.values())]
    lines = ["| state | meaning | " + " | ".join(("the client sends", "the server sends")[i] for i in senders) + " |",
             "|---|---|" + "---|" * len(senders)]
    for state, row in rows.items():
        lines.append(f"| {state} | {meaning[state]} | " + " | ".join(_moves_text(row[i], state) for i in senders) + " |")
    if welcomed_on:
        lines += ["", f"In every state from {welcomed_on[0]} on, the server may also send "
                      f"{_moves_text(dict.fromkeys(STAYING, ''), '')} (the state stays) and `{FINISHED}` → {CLOSED}."]
    if any(ERROR in moves for moves in table.values()):
        never = [state for state, moves in table.items() if ERROR not in moves]
        lines += ["", f"Either side may send `{ERROR}` → {CLOSED}, in every state but {' and '.join(never)}."]
    if any(NO_ANSWER in moves for moves in table.values()):
        late = ", ".join(f"`{answer}` in {state}" for state, answer in LATE_ANSWERS.items())
        lines += ["", f"{NO_ANSWER}: the server stops waiting. A late answer to a secure-aggregation stage ({late}) "
                      f"may still come, once: the server drops it without a word. A late `{EVALUATION}` is refused."]
    return "\n".join(lines)
