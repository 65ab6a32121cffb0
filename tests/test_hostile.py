"""Hostile peers: raw sockets that break the protocol in every way we could think of,
against a REAL federation (a server process and two honest client processes) that must
finish every round, unharmed, while it happens.

The hostile peer takes client id 3 of 3. It never joins in the lobby, so every case
"before joining" runs while the honest clients 1 and 2 wait for it; then it joins (which
starts training: all three ids are in), and every case "after joining" runs during
training. Id 3 is enrolled from then on, so after each disconnect it may rejoin. The
cases that need a <MODEL> in hand (a bad <UPDATE>) rejoin, wait for the next round's
model and answer it with garbage: each costs one round, so the run is long enough.

For each case the peer must get an <ERROR> that says what was wrong (where the
connection still allows one: not after the peer closed it), then be disconnected,
and the server must have logged the reason with the peer's address. Every socket
operation has a deadline; synchronisation is on what the server sends and prints.
"""

from __future__ import annotations

import copy
import json
import math
import pickle
import re
import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from conftest import Cluster, read_metrics
from fedsock.policy import Policy
from socket_methods import PROTOCOL_VERSION, decode_message, encode_message, frame_header

# The cases during training use 20..26 rounds here (one per bad <UPDATE>, more while a case waits
# out a deadline); logreg rounds take about a second, so the margin costs little.
NUM_ROUNDS = 45
ROUND_TIMEOUT_S = 5  # also the deadline for a frame begun by a joined client
HANDSHAKE_TIMEOUT_S = 2
HOSTILE_ID = 3
IO_TIMEOUT_S = 20.0  # a bound on every wait for the server (its replies come in milliseconds)
MAX_FRAME = 16 << 20  # the test's own limit on what it reads from the server
PRE_AUTH_LIMIT = 64 << 10
CONTROL_LIMIT = 1 << 20


# --------------------------------------------------------------------------- the hostile peer


def frame(payload: bytes) -> bytes:
    return frame_header(len(payload)) + payload


def raw_json(**fields) -> bytes:
    """A framed JSON object, without encode_message's checks (so it can be wrong)."""
    return frame(json.dumps(fields).encode())


def hello(client_id: int = HOSTILE_ID, version: int = PROTOCOL_VERSION) -> bytes:
    return encode_message("<HELLO>", protocol_version=version, client_id=client_id, features=[])


READY = encode_message("<READY>", num_examples=1000, test_examples=0)  # the hostile claims 1000 of its 20000 examples


class Peer:
    """One raw TCP connection to the server, driven by hand."""

    def __init__(self, port: int, receive_buffer: int | None = None):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer:  # before connecting, so that the advertised window is small from the start
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.settimeout(IO_TIMEOUT_S)
        self.sock.connect(("127.0.0.1", port))
        host, local_port = self.sock.getsockname()[:2]
        self.address = f"{host}:{local_port}"  # what the server calls this peer in its log
        self.received: list[dict] = []  # every control message received, in order
        self.reset = False  # the connection ended with a reset rather than a clean close
        self.model: dict | None = None
        self.blob: bytes | None = None

    def send(self, *chunks: bytes) -> None:
        self.sock.sendall(b"".join(chunks))

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def hang_up(self) -> None:
        """Close our side and wait (bounded) until the server closes its side, so that it has
        forgotten this connection before the next one joins with the same id."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
            self.read_to_end(10)
        except (OSError, AssertionError, ValueError):
            pass
        self.close()

    # ---- reading, always under a deadline
    def _recv_exact(self, nbytes: int, deadline: float) -> bytes | None:
        """nbytes, or None if the connection ended first (closed or reset)."""
        data = self._partial = bytearray()
        while len(data) < nbytes:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{self.address}: the server sent nothing more for {IO_TIMEOUT_S:g} s")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(min(nbytes - len(data), 1 << 20))
            except socket.timeout:
                continue
            except ConnectionResetError:
                self.reset = True
                return None
            if not chunk:
                return None
            data += chunk
        return bytes(data)

    def _frame(self, deadline: float, whole: bool = True) -> bytes | None:
        header = self._recv_exact(8, deadline)
        if header is None:
            return None
        (length,) = struct.unpack(">Q", header)
        assert length <= MAX_FRAME, f"the server sent a frame of {length} bytes"
        payload = self._recv_exact(length, deadline)
        assert payload is not None or length == 0 or not whole, (
            f"{self.address}: the server cut a frame short: {len(self._partial)} of {length} bytes, then the connection "
            f"was {'reset' if self.reset else 'closed'}; messages before: {[m['header'] for m in self.received]}")
        return payload if payload is not None or length else b""

    def next_message(self, deadline: float) -> dict | None:
        """The next control message (its weights frame, if any, is read too); None at the end."""
        payload = self._frame(deadline)
        if payload is None:
            return None
        message = decode_message(payload)  # the server's own messages must be valid
        self.received.append(message)
        if message["header"] == "<MODEL>":
            self.model, self.blob = message, self._frame(deadline)
        return message

    def read_to_end(self, timeout_s: float = IO_TIMEOUT_S) -> list[dict]:
        """Everything the server sends until it closes the connection (which it must, within timeout_s)."""
        deadline = time.monotonic() + timeout_s
        messages = []
        while (message := self.next_message(deadline)) is not None:
            messages.append(message)
        return messages

    def join(self, client_id: int = HOSTILE_ID, extra: bytes = b"") -> dict:
        """<HELLO> and <READY> (and `extra` in the same packet); returns the <METADATA>."""
        self.send(hello(client_id), READY, extra)
        deadline = time.monotonic() + IO_TIMEOUT_S
        message = self.next_message(deadline)
        assert message is not None, "the server closed the connection instead of answering <HELLO>"
        assert message["header"] == "<METADATA>", f"expected <METADATA>, got {message}"
        assert message["client_id"] == client_id
        return message

    def wait_for_model(self, timeout_s: float = 60.0) -> tuple[dict, bytes]:
        """Read until the next round's <MODEL> and its weights are in."""
        deadline = time.monotonic() + timeout_s
        while True:
            message = self.next_message(deadline)
            assert message is not None, "the server closed the connection while we waited for a <MODEL>"
            assert message["header"] not in ("<FINISHED>", "<ERROR>"), (
                f"no <MODEL> came: {message} (the run ended before this case: raise NUM_ROUNDS)")
            if message["header"] == "<MODEL>":
                return self.model, self.blob


@dataclass
class Federation:
    cluster: Cluster
    server: object
    honest: list
    port: int
    output_dir: Path
    joined: bool = False  # has the hostile joined (which starts training)?
    last_model_round: int = 0  # the latest round whose <MODEL> a hostile case answered
    peers: list[Peer] = field(default_factory=list)

    def connect(self) -> Peer:
        peer = Peer(self.port)
        self.peers.append(peer)
        return peer

    def join(self, extra: bytes = b"") -> Peer:
        """A connection that joins as the hostile id (rejoins: id 3 is enrolled once training started)."""
        for _ in range(20):  # only if a previous case left its connection behind: the server may not have seen it close
            peer = self.connect()
            try:
                peer.join(extra=extra)
            except AssertionError:
                refusal = [m["message"] for m in peer.received if m["header"] == "<ERROR>"]
                peer.close()
                if refusal and "already connected" in refusal[0]:
                    continue
                raise
            self.joined = True
            return peer
        raise AssertionError("client id 3 stayed 'already connected'")

    def logged(self, peer: Peer, pattern: str, joined: bool = False, timeout_s: float = IO_TIMEOUT_S) -> str:
        """The server's log line that names this peer by its address and matches `pattern`
        ("ADDRESS: ..." before joining, "client 3 (ADDRESS): ..." after)."""
        who = rf"client {HOSTILE_ID} \({re.escape(peer.address)}\): " if joined else rf"\] WARNING: {re.escape(peer.address)}: "
        return self.server.wait_for(who + ".*" + pattern, timeout=timeout_s).group(0)


def assert_refused(peer: Peer, pattern: str, timeout_s: float = IO_TIMEOUT_S) -> str:
    """The peer gets an <ERROR> matching `pattern`, then the server closes (or resets) the connection."""
    messages = peer.read_to_end(timeout_s)
    errors = [m["message"] for m in messages if m["header"] == "<ERROR>"]
    ending = "reset" if peer.reset else "closed"
    assert len(errors) == 1, f"{peer.address}: expected one <ERROR>, got {messages}, then the connection was {ending}"
    assert re.search(pattern, errors[0]), f"<ERROR> {errors[0]!r} does not match {pattern!r}"
    headers = [m["header"] for m in messages]
    assert "<FINISHED>" not in headers, "the run ended during this case"
    # Nothing after the <ERROR> but a heartbeat, or the <MODEL> of a round that started while the
    # server was sending the <ERROR> (the session is forgotten only after that send).
    after = headers[headers.index("<ERROR>") + 1:]
    assert set(after) <= {"<WAITING>", "<MODEL>"}, f"the server went on after its <ERROR>: {after}"
    return errors[0]


def assert_cut_off(peer: Peer, timeout_s: float = IO_TIMEOUT_S) -> list[dict]:
    """The server closes the connection (no <ERROR> required: the peer closed its side, or spoke no fedsock)."""
    messages = peer.read_to_end(timeout_s)
    assert not [m for m in messages if m["header"] not in ("<ERROR>", "<WAITING>", "<METADATA>", "<MODEL>")], messages
    return messages


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    cluster = Cluster(tmp)
    federation = None
    try:
        server = cluster.server(
            "--model", "logreg", "--num-clients", "3", "--min-clients", "2", "--num-rounds", str(NUM_ROUNDS),
            "--round-timeout", str(ROUND_TIMEOUT_S), "--handshake-timeout", str(HANDSHAKE_TIMEOUT_S),
            "--time-to-wait", "600", "--heartbeat-interval", "1",
        )
        honest = [cluster.client(k, quiet=False) for k in (1, 2)]
        federation = Federation(cluster, server, honest, cluster.port, tmp / "run")
        # Both honest clients have loaded their data (they show <WAITING> only from their
        # receive loop), so round 1 is not spent waiting for them.
        for client in honest:
            client.wait_for(r"server: waiting for clients", timeout=120)
        yield federation
    finally:
        for peer in federation.peers if federation else []:
            peer.close()
        cluster.close()


@pytest.fixture(autouse=True)
def hang_up_after_each_case(fed):
    """A case that failed half-way leaves no connection behind to hold id 3."""
    yield
    while fed.peers:
        fed.peers.pop().hang_up()


# --------------------------------------------------------------------------- before joining
# In the lobby: clients 1 and 2 are in, the server waits for id 3.

POLICY = Policy(require_dp=True, max_epsilon=8.0).to_json()  # as fl_client.py states it


def stating(policy) -> bytes:
    """A <HELLO> with this `policy`: shown by the server, but checked as any field is."""
    return raw_json(header="<HELLO>", protocol_version=PROTOCOL_VERSION, client_id=3, features=[], policy=policy)


UPDATE_FIELDS = dict(round=1, client_id=HOSTILE_ID, num_examples=100, train_loss=0.5, local_test_accuracy=0.9,
                     fit_seconds=1.0, weights={"byte_order": "little", "nbytes": 0, "tensors": []})

# (case, bytes sent instead of a valid <HELLO>, the <ERROR> it must earn)
BEFORE_JOINING = [
    ("length prefix just over the pre-auth limit", frame_header(PRE_AUTH_LIMIT + 1),
     rf"frame of {PRE_AUTH_LIMIT + 1} bytes is over the {PRE_AUTH_LIMIT}-byte limit"),
    ("length prefix of 2**64-1", frame_header(2**64 - 1), rf"frame of {2**64 - 1} bytes is over the {PRE_AUTH_LIMIT}-byte limit"),
    ("length prefix of 1 TiB", frame_header(1 << 40), r"frame of 1099511627776 bytes is over"),
    ("empty frame", frame(b""), r"message is not valid JSON"),
    ("invalid UTF-8", frame(b'{"header": "<HELLO>", "client_id": "\xff\xfe"}'), r"message is not valid UTF-8 \(byte \d+\)"),
    ("invalid JSON", frame(b'{"header": "<HELLO>", "protocol_version": 1,'), r"message is not valid JSON"),
    ("JSON list", frame(b'["<HELLO>", 1, 3]'), r"message is a JSON list, not an object"),
    ("JSON string", frame(b'"<HELLO>"'), r"message is a JSON str, not an object"),
    ("JSON number", frame(b"3"), r"message is a JSON int, not an object"),
    ("JSON nested too deeply", frame(b"[" * 30000 + b"]" * 30000), r"nested too deeply"),
    ("NaN in JSON", frame(b'{"header": "<HELLO>", "protocol_version": NaN, "client_id": 3}'), r"NaN is not allowed"),
    ("number out of range", frame(b'{"header": "<HELLO>", "protocol_version": 1e999, "client_id": 3}'), r"out of range"),
    ("no header", raw_json(protocol_version=1, client_id=3), r"message has no 'header' string"),
    ("header not a string", raw_json(header=7, protocol_version=1, client_id=3), r"message has no 'header' string"),
    ("missing protocol_version", raw_json(header="<HELLO>", client_id=3), r"<HELLO> lacks the field 'protocol_version'"),
    ("missing client_id", raw_json(header="<HELLO>", protocol_version=1), r"<HELLO> lacks the field 'client_id'"),
    ("protocol_version a string", raw_json(header="<HELLO>", protocol_version="1", client_id=3),
     r"<HELLO> field 'protocol_version' must be an integer"),
    ("client_id a float", raw_json(header="<HELLO>", protocol_version=1, client_id=3.0), r"<HELLO> field 'client_id' must be an integer"),
    ("client_id a bool", raw_json(header="<HELLO>", protocol_version=1, client_id=True), r"<HELLO> field 'client_id' must be an integer"),
    ("client_id null", raw_json(header="<HELLO>", protocol_version=1, client_id=None), r"<HELLO> field 'client_id' must be an integer"),
    ("unknown header", raw_json(header="<GIMME>", client_id=3), r"unknown header '<GIMME>'"),
    ("<AUTH> with no challenge", encode_message("<AUTH>", mac="00" * 32), r"<AUTH> is not expected when the client is in state connected"),
    ("<MODEL> from a client", encode_message("<MODEL>", round=1, local_epochs=1, batch_size=32, lr=0.1, proximal_mu=0.0,
                                             weights={}), r"<MODEL> is not expected when the client is in state connected"),
    ("<READY> before <HELLO>", READY, r"<READY> is not expected when the client is in state connected"),
    ("features not a list", raw_json(header="<HELLO>", protocol_version=PROTOCOL_VERSION, client_id=3, features="all"),
     r"<HELLO> field 'features' must be a list"),
    ("features not strings", raw_json(header="<HELLO>", protocol_version=PROTOCOL_VERSION, client_id=3, features=[1]),
     r"<HELLO> field 'features' must hold only strings"),
    ("policy not an object", stating("secure aggregation"), r"<HELLO> field 'policy' must be an object"),
    ("policy with a key of the wrong type", stating({**POLICY, "dp": "yes"}),
     r"<HELLO> field 'policy' key 'dp' must be true or false"),
    ("policy with a count as a float", stating({**POLICY, "min_round_clients": 5.0}),
     r"<HELLO> field 'policy' key 'min_round_clients' must be an integer"),
    ("policy with a count out of range", stating({**POLICY, "min_threshold": 0}),
     r"<HELLO> field 'policy' key 'min_threshold' is 0, outside 1\.\.1000000"),
    ("policy without a key", stating({k: v for k, v in POLICY.items() if k != "max_epsilon"}),
     r"<HELLO> field 'policy' lacks the key 'max_epsilon'"),
    ("<UPDATE> before <HELLO>", encode_message("<UPDATE>", **UPDATE_FIELDS), r"<UPDATE> is not expected when the client is in state connected"),
    ("<ERROR> before <HELLO>", encode_message("<ERROR>", message="hi"), r"<ERROR> is not expected when the client is in state connected"),
    ("protocol version 1", hello(version=1), rf"protocol version 1 is not supported; this server speaks {PROTOCOL_VERSION}"),
    ("protocol version 2", hello(version=2), rf"protocol version 2 is not supported; this server speaks {PROTOCOL_VERSION}"),
    ("protocol version 4", hello(version=4), rf"protocol version 4 is not supported; this server speaks {PROTOCOL_VERSION}"),
    ("protocol version 0", hello(version=0), r"protocol version 0 is not supported"),
    ("protocol version -1", hello(version=-1), r"protocol version -1 is not supported"),
]


@pytest.mark.parametrize("sent, error", [c[1:] for c in BEFORE_JOINING], ids=[c[0] for c in BEFORE_JOINING])
def test_bad_input_before_joining(fed, sent, error):
    peer = fed.connect()
    peer.send(sent)
    assert_refused(peer, error)
    fed.logged(peer, error + r".*; disconnected")


@pytest.mark.parametrize("client_id, error", [
    (0, r"client id 0 is not part of this run \(ids are 1\.\.3\)"),
    (-7, r"client id -7 is not part of this run"),
    (4, r"client id 4 is not part of this run"),
    (10**30, rf"client id {10**30} is not part of this run"),
    (1, r"client id 1 is already connected to this run"),
])
def test_ids_outside_the_run_or_taken_are_refused(fed, client_id, error):
    peer = fed.connect()
    peer.send(hello(client_id))
    assert_refused(peer, error)
    fed.logged(peer, rf"refused client {client_id}: " + error)


@pytest.mark.parametrize("sent, logged", [
    (frame_header(100)[:3], r"connection closed after 3 of 8 frame header bytes"),
    (frame_header(100) + b"{" * 10, r"connection closed after 10 of 100 frame payload bytes"),
    (hello()[:-5], r"connection closed after \d+ of \d+ frame payload bytes"),
], ids=["half a length prefix", "half a payload", "half a hello"])
def test_truncated_frame_then_close_before_joining(fed, sent, logged):
    peer = fed.connect()
    peer.send(sent)
    peer.sock.shutdown(socket.SHUT_WR)  # the end of our data; we still read what the server says
    assert_cut_off(peer)
    fed.logged(peer, logged + r"; disconnected")


def test_tls_hello_to_a_plain_server_is_told_so(fed):
    peer = fed.connect()
    peer.send(bytes.fromhex("160301") + b"\x00" * 60)  # the start of a TLS ClientHello
    assert_refused(peer, r"this server does not use TLS")
    fed.logged(peer, r"the peer started a TLS handshake, but this server runs without --tls-cert; disconnected")


def test_silent_peers_before_joining_are_cut_off_after_the_handshake_timeout(fed):
    """Slowloris: half a frame, or nothing at all, then silence. Neither holds a connection for
    longer than --handshake-timeout. (The two peers wait side by side.)"""
    started = time.monotonic()
    half, mute = fed.connect(), fed.connect()
    half.send(frame_header(100) + b"{" * 10)
    for name, peer in (("half a frame", half), ("nothing", mute)):
        assert_cut_off(peer, HANDSHAKE_TIMEOUT_S + 15)
        elapsed = time.monotonic() - started
        assert HANDSHAKE_TIMEOUT_S - 0.5 <= elapsed <= HANDSHAKE_TIMEOUT_S + 15, f"{name}: cut off after {elapsed:.1f} s"
        fed.logged(peer, rf"no complete handshake within {HANDSHAKE_TIMEOUT_S:g} s; disconnected")


def test_a_silent_peer_before_joining_is_told_why_it_is_cut_off(fed):
    """After --handshake-timeout the connection is still open both ways, so the peer is owed an
    <ERROR> that says why it is dropped, like a joined peer cut off at its frame deadline."""
    peer = fed.connect()
    peer.send(frame_header(100) + b"{" * 10)
    assert_refused(peer, rf"handshake.*{HANDSHAKE_TIMEOUT_S:g} s", timeout_s=HANDSHAKE_TIMEOUT_S + 15)


# --------------------------------------------------------------------------- after joining
# The first join starts training (ids 1, 2 and 3 are all in); later ones are rejoins.

AFTER_JOINING = [
    ("length prefix of 1 TiB", frame_header(1 << 40), rf"frame of 1099511627776 bytes is over the {CONTROL_LIMIT}-byte limit"),
    ("length prefix just over 1 MiB", frame_header(CONTROL_LIMIT + 1), rf"frame of {CONTROL_LIMIT + 1} bytes is over the {CONTROL_LIMIT}-byte limit"),
    ("invalid UTF-8", frame(b'{"header": "<UPDATE>\xc3\x28"}'), r"message is not valid UTF-8"),
    ("invalid JSON", frame(b"{'header': '<UPDATE>'}"), r"message is not valid JSON"),
    ("JSON list", frame(b"[]"), r"message is a JSON list, not an object"),
    ("JSON null", frame(b"null"), r"message is a JSON NoneType, not an object"),
    ("NaN in JSON", frame(b'{"header": "<UPDATE>", "train_loss": NaN}'), r"NaN is not allowed"),
    ("missing fields", raw_json(header="<UPDATE>", round=1, client_id=3), r"<UPDATE> lacks the field 'num_examples'"),
    ("round a string", raw_json(**{**UPDATE_FIELDS, "header": "<UPDATE>", "round": "1"}), r"<UPDATE> field 'round' must be an integer"),
    ("weights a list", raw_json(**{**UPDATE_FIELDS, "header": "<UPDATE>", "weights": []}), r"<UPDATE> field 'weights' must be an object"),
    ("train_loss a string", raw_json(**{**UPDATE_FIELDS, "header": "<UPDATE>", "train_loss": "low"}),
     r"<UPDATE> field 'train_loss' must be a number"),
    ("unknown header", raw_json(header="<UPDATE2>"), r"unknown header '<UPDATE2>'"),
    ("<AUTH> with no challenge", encode_message("<AUTH>", mac="ab" * 32), r"<AUTH> is not expected when the client is in state (idle|training)"),
    ("<MODEL> from a client", encode_message("<MODEL>", round=1, local_epochs=1, batch_size=32, lr=0.1, proximal_mu=0.0,
                                             weights={}), r"<MODEL> is not expected when the client is in state (idle|training)"),
    ("a second <HELLO>", hello(), r"<HELLO> is not expected when the client is in state (idle|training)"),
    ("a second <HELLO> of protocol version 1", hello(version=1), r"<HELLO> is not expected when the client is in state (idle|training)"),
    ("a second <READY>", READY, r"<READY> is not expected when the client is in state (idle|training)"),
    ("<METADATA> from a client", encode_message("<METADATA>", client_id=3, num_clients=3, dataset="mnist", partition="iid",
                                                alpha=0.5, seed=0, model="logreg", num_rounds=1, round_timeout_s=1.0,
                                                heartbeat_s=1.0, next_round=1, train_size=60000, partition_bitmap="",
                                                required_features=[], task={}, federated_evaluation=False,
                                                compression={}, secure_aggregation=False, identities=False,
                                                dp_mode="none", dp_noise_multiplier=0.0),
     r"<METADATA> is not expected when the client is in state (idle|training)"),
    ("<SUCCESS> from a client", encode_message("<SUCCESS>", round=1, accepted=True, message="x"), r"<SUCCESS> is not expected when the client is in state (idle|training)"),
    ("<UPDATE> for a round never sent", encode_message("<UPDATE>", **{**UPDATE_FIELDS, "round": 10**6}),
     r"(<UPDATE> is not expected when the client is in state idle|update for round 1000000, but this client was sent "
     r"round \d+)"),
    ("a <SECAGG_KEYS> never asked for", encode_message("<SECAGG_KEYS>", round=7, c_public="AA", s_public="AA",
                                                       seed_commitment="AA"),
     r"<SECAGG_KEYS> is not expected when the client is in state (idle|training)"),
]


@pytest.mark.parametrize("mode", ["after <METADATA>", "in the <HELLO> packet"])
@pytest.mark.parametrize("sent, error", [c[1:] for c in AFTER_JOINING], ids=[c[0] for c in AFTER_JOINING])
def test_bad_input_after_joining(fed, mode, sent, error):
    if mode == "after <METADATA>":
        peer = fed.join()
        peer.send(sent)
    else:
        peer = fed.join(extra=sent)
    assert_refused(peer, error)
    fed.logged(peer, error + r".*; disconnected", joined=True)


def test_truncated_frame_then_close_after_joining(fed):
    peer = fed.join()
    peer.send(frame_header(100) + b"{" * 10)
    peer.sock.shutdown(socket.SHUT_WR)
    assert_cut_off(peer)
    fed.logged(peer, r"connection closed after 10 of 100 frame payload bytes; disconnected", joined=True)


def test_silent_half_frame_after_joining_is_cut_off_at_the_frame_deadline(fed):
    peer = fed.join()
    started = time.monotonic()
    peer.send(frame_header(100) + b"{" * 10)
    assert_refused(peer, rf"a frame was not complete within {ROUND_TIMEOUT_S:g} s", timeout_s=ROUND_TIMEOUT_S + 20)
    assert time.monotonic() - started >= ROUND_TIMEOUT_S - 0.5
    fed.logged(peer, rf"a frame was not complete within {ROUND_TIMEOUT_S:g} s; disconnected", joined=True)


# --------------------------------------------------------------------------- bad updates (one round each)


def update(model: dict, **changes) -> dict:
    fields = dict(round=model["round"], client_id=HOSTILE_ID, num_examples=1000, train_loss=0.3,
                  local_test_accuracy=0.9, fit_seconds=1.0, weights=copy.deepcopy(model["weights"]))
    fields.update(changes)
    return fields


def with_entry(layout: dict, tensor: str, **changes) -> dict:
    layout = copy.deepcopy(layout)
    for entry in layout["tensors"]:
        if entry["name"] == tensor:
            entry.update(changes)
    return layout


def poke(blob: bytes, offset: int, value: float) -> bytes:
    data = bytearray(blob)
    struct.pack_into("<f", data, offset, value)
    return bytes(data)


def bias_offset(model: dict) -> int:
    return next(e["offset"] for e in model["weights"]["tensors"] if e["name"] == "linear.bias")


@dataclass
class BadUpdate:
    """What the hostile sends in answer to a <MODEL>: the <UPDATE> fields, then the bytes of its weights frame.

    The hostile sends only what the server reads before it refuses: the <UPDATE> alone when the
    refusal comes from its fields or layout, the length prefix alone when it comes from the prefix.
    Bytes the server never reads would make its close a TCP reset, which can destroy the <ERROR>
    before it leaves (see test_an_error_is_not_destroyed_by_input_left_unread).
    """

    fields: Callable[[dict], dict]
    weights: Callable[[dict, bytes], bytes] = lambda model, blob: b""
    error: Callable[[dict], str] | None = None  # None: the peer closes its side, so no <ERROR> is owed
    ending: str = "read"  # "read": read to the end; "close": shut our side down after sending; "silent"


BAD_UPDATES = {
    "stale round": BadUpdate(  # in round 1 (this test alone) the round before is 0: out of range, a text of its own
        lambda m: update(m, round=m["round"] - 1),
        error=lambda m: (rf"update for round {m['round'] - 1}, but this client was sent round {m['round']}"
                         if m["round"] > 1 else r"<UPDATE> field 'round' is 0, outside 1\.\.1000000")),
    "future round": BadUpdate(
        lambda m: update(m, round=m["round"] + 1),
        error=lambda m: rf"update for round {m['round'] + 1}, but this client was sent round {m['round']}"),
    "another client's id": BadUpdate(
        lambda m: update(m, client_id=1),
        error=lambda m: r"update carries client id 1, but this connection is client 3"),
    "negative num_examples": BadUpdate(
        lambda m: update(m, num_examples=-5), error=lambda m: r"<UPDATE> field 'num_examples' is -5, outside 1\.\.1000000000"),
    "absurd num_examples": BadUpdate(
        lambda m: update(m, num_examples=10**15),
        error=lambda m: r"<UPDATE> field 'num_examples' is 1000000000000000, outside 1\.\.1000000000"),
    "more examples than it said it holds": BadUpdate(
        lambda m: update(m, num_examples=1001),
        error=lambda m: r"num_examples 1001 is outside 1\.\.1000 \(the examples this client said it holds\)"),
    "accuracy above 1": BadUpdate(
        lambda m: update(m, local_test_accuracy=1.5), error=lambda m: r"field 'local_test_accuracy' is 1.5, outside 0\.\.1"),
    "negative fit seconds": BadUpdate(
        lambda m: update(m, fit_seconds=-1.0), error=lambda m: r"field 'fit_seconds' is -1.0, outside >= 0"),
    "wrong tensor names": BadUpdate(
        lambda m: update(m, weights=with_entry(m["weights"], "linear.weight", name="linear.evil")),
        error=lambda m: r"weights names differ from the model: missing \['linear.weight'\], unexpected \['linear.evil'\]"),
    "transposed shape": BadUpdate(
        lambda m: update(m, weights=with_entry(m["weights"], "linear.weight", shape=[784, 10])),
        error=lambda m: r"tensor 'linear.weight': shape \[784, 10\], the model has \[10, 784\]"),
    "wrong dtype": BadUpdate(
        lambda m: update(m, weights=with_entry(m["weights"], "linear.bias", dtype="float64", nbytes=80)),
        error=lambda m: r"tensor 'linear.bias': dtype 'float64', the model has 'float32'"),
    "wrong tensor byte count": BadUpdate(
        lambda m: update(m, weights=with_entry(m["weights"], "linear.weight", nbytes=31364)),
        error=lambda m: r"tensor 'linear.weight': nbytes 31364, the model has 31360"),
    "wrong total byte count": BadUpdate(
        lambda m: update(m, weights={**m["weights"], "nbytes": m["weights"]["nbytes"] + 64}),
        error=lambda m: rf"weights layout: nbytes {len_of(m) + 64}, the model has {len_of(m)}"),
    "an unknown key in a tensor entry": BadUpdate(
        lambda m: update(m, weights=with_entry(m["weights"], "linear.bias", scale=2.0)),
        error=lambda m: r"tensor 'linear.bias' has keys the protocol does not define: \['scale'\]"),
    "an unknown key in the layout": BadUpdate(
        lambda m: update(m, weights={**m["weights"], "compression": "zstd"}),
        error=lambda m: r"weights layout has keys the protocol does not define: \['compression'\]"),
    "layout without a tensor list": BadUpdate(
        lambda m: update(m, weights={"byte_order": "little", "nbytes": 64, "tensors": "linear.weight"}),
        error=lambda m: r"weights layout is not an object with a list of named tensors"),
    "weights frame shorter than its layout": BadUpdate(
        update, weights=lambda m, blob: frame_header(len(blob) - 64),
        error=lambda m: rf"weights frame has {len_of(m) - 64} bytes, its layout says {len_of(m)}"),
    "weights frame longer than its layout": BadUpdate(
        update, weights=lambda m, blob: frame_header(len(blob) + 64),
        error=lambda m: rf"weights frame has {len_of(m) + 64} bytes, its layout says {len_of(m)}"),
    "weights frame of 2**64-1 bytes": BadUpdate(
        update, weights=lambda m, blob: frame_header(2**64 - 1),
        error=lambda m: rf"weights frame has {2**64 - 1} bytes, its layout says {len_of(m)}"),
    "NaN in weights": BadUpdate(
        update, weights=lambda m, blob: frame(poke(blob, 4 * 123, math.nan)),
        error=lambda m: r"tensor 'linear.weight' holds NaN or Inf"),
    "Inf in weights": BadUpdate(
        update, weights=lambda m, blob: frame(poke(blob, bias_offset(m) + 4, -math.inf)),
        error=lambda m: r"tensor 'linear.bias' holds NaN or Inf"),
    "truncated weights, then close": BadUpdate(
        update, weights=lambda m, blob: frame(blob)[:5000], ending="close"),
    "half the weights, then silence": BadUpdate(
        update, weights=lambda m, blob: frame(blob)[:5000], ending="silent",
        error=lambda m: rf"a frame was not complete within {ROUND_TIMEOUT_S:g} s"),
}


def len_of(model: dict) -> int:
    return model["weights"]["nbytes"]


def answer_a_model_with(fed: Federation, bad: BadUpdate) -> None:
    peer = fed.join()
    model, blob = peer.wait_for_model()
    fed.last_model_round = model["round"]
    started = time.monotonic()
    peer.send(encode_message("<UPDATE>", **bad.fields(model)), bad.weights(model, blob))
    if bad.ending == "close":
        peer.sock.shutdown(socket.SHUT_WR)
        assert_cut_off(peer)
        fed.logged(peer, r"connection closed after \d+ of \d+ frame payload bytes; disconnected", joined=True)
        return
    timeout = ROUND_TIMEOUT_S + 20 if bad.ending == "silent" else IO_TIMEOUT_S
    error = bad.error(model)
    assert_refused(peer, error, timeout_s=timeout)
    if bad.ending == "silent":
        assert time.monotonic() - started >= ROUND_TIMEOUT_S - 0.5
    fed.logged(peer, error + r".*; disconnected", joined=True)


@pytest.mark.parametrize("case", list(BAD_UPDATES))
def test_bad_update_for_a_model_in_hand(fed, case):
    answer_a_model_with(fed, BAD_UPDATES[case])


# --------------------------------------------------------------------------- pickles are never loaded


class Evil:
    """Unpickling this calls open(path, "w"): the marker file appears if anyone ever unpickles it."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def padded_pickle(path: Path, nbytes: int) -> bytes:
    """The Evil pickle, padded with NaN float32s to exactly nbytes."""
    data = pickle.dumps(Evil(path), protocol=pickle.HIGHEST_PROTOCOL)
    data += bytes(-len(data) % 4)
    data += struct.pack("<f", math.nan) * ((nbytes - len(data)) // 4)
    assert len(data) == nbytes
    return data


def test_a_malicious_pickle_is_never_loaded(fed, tmp_path):
    marker = tmp_path / "pwned"
    probe = tmp_path / "probe"
    payloads = {protocol: pickle.dumps(Evil(marker), protocol=protocol) for protocol in (0, pickle.HIGHEST_PROTOCOL)}
    pickle.loads(pickle.dumps(Evil(probe), protocol=pickle.HIGHEST_PROTOCOL)).close()
    assert probe.exists()  # the payload is live: whoever unpickles it runs open()
    probe.unlink()

    expected = {0: r"message is not valid JSON", pickle.HIGHEST_PROTOCOL: r"message is not valid UTF-8"}
    for protocol, payload in payloads.items():
        peer = fed.connect()  # as the first message, before joining
        peer.send(frame(payload))
        assert_refused(peer, expected[protocol])
        peer = fed.join()  # as a control message after joining
        peer.send(frame(payload))
        assert_refused(peer, expected[protocol])
        fed.logged(peer, expected[protocol], joined=True)

    # As the weights frame of a valid <UPDATE>, at the pickle's own length: refused from the
    # length prefix, before a byte of the payload is read.
    pickled = payloads[pickle.HIGHEST_PROTOCOL]
    peer = fed.join()
    model, blob = peer.wait_for_model()
    peer.send(encode_message("<UPDATE>", **update(model)), frame_header(len(pickled)))
    assert_refused(peer, rf"weights frame has {len(pickled)} bytes, its layout says {len_of(model)}")
    fed.logged(peer, rf"weights frame has {len(pickled)} bytes", joined=True)

    # As a weights frame of exactly the right size that is still a working pickle (pickle ignores
    # what follows its STOP opcode): the server reads all of it as float32 and never unpickles.
    # The padding is NaN, so the weights are refused rather than averaged in.
    peer = fed.join()
    model, blob = peer.wait_for_model()
    padded = padded_pickle(marker, len_of(model))
    pickle.loads(padded_pickle(probe, len_of(model))).close()
    assert probe.exists()  # a full-size frame like this one is a live pickle too
    peer.send(encode_message("<UPDATE>", **update(model)), frame(padded))
    assert_refused(peer, r"holds NaN or Inf")
    fed.logged(peer, r"holds NaN or Inf", joined=True)
    assert not marker.exists()


TCP_CLOSE = 7  # tcpi_state of a connection that was reset


def was_reset(peer: Peer, within_s: float) -> bool:
    """Has the connection been reset (polled for at most within_s, without reading from it)?"""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if peer.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0] == TCP_CLOSE:
            return True
        time.sleep(0.01)  # polling the socket's state, bounded
    return False


def test_an_error_is_not_destroyed_by_input_left_unread(fed):
    """A peer answers a <MODEL> with an <UPDATE> that is refused from its fields, with the weights
    right behind it (as fl_client sends them), while the end of the <MODEL> is still on its way to
    the peer (a small receive window: a slow link or a slow reader). The server refuses after
    reading only the <UPDATE>, so the weights stay unread; it then closes, and promises to wait
    up to 5 s for the peer to take what it still has to send (AsyncConnection.close). The peer
    starts reading at once after the refusal (after at most 2 s) and must get the rest of the
    <MODEL> and the <ERROR>. A close with unread input is a TCP reset, though, and a reset
    throws away everything the server's kernel has not sent yet: the <ERROR> never arrives."""
    peer = Peer(fed.port, receive_buffer=4096)
    fed.peers.append(peer)
    peer.join()
    deadline = time.monotonic() + 60
    while True:  # read control messages up to the <MODEL>, but not its weights frame
        payload = peer._frame(deadline)
        assert payload is not None, "closed before a <MODEL> came"
        model = decode_message(payload)
        assert model["header"] != "<FINISHED>", "the run ended before this case: raise NUM_ROUNDS"
        if model["header"] == "<MODEL>":
            break
    peer.send(encode_message("<UPDATE>", **update(model, client_id=1)), frame(bytes(len_of(model))))
    refusal = r"update carries client id 1, but this connection is client 3"
    fed.logged(peer, refusal + r".*; disconnected", joined=True)
    reset = was_reset(peer, within_s=2)
    weights = peer._frame(time.monotonic() + IO_TIMEOUT_S, whole=False)
    remaining = peer.read_to_end() if weights is not None else []
    errors = [m["message"] for m in remaining if m["header"] == "<ERROR>"]
    assert errors and re.search(refusal, errors[0]), (
        f"no <ERROR> reached the peer: the connection was {'reset' if reset or peer.reset else 'closed'} "
        f"{'after' if weights is not None else 'before'} the <MODEL>'s weights were in")


# --------------------------------------------------------------------------- the federation survived


def test_the_federation_finished_every_round_unharmed(fed):
    if not fed.joined:  # only when this test runs alone: end the lobby
        fed.join().close()
    server = fed.server
    print(f"the last bad update answered round {fed.last_model_round} of {NUM_ROUNDS}")
    assert server.finish(timeout=240) == 0, server.output
    assert [client.finish(timeout=60) for client in fed.honest] == [0, 0]
    rows = read_metrics(fed.output_dir / "metrics.csv")
    assert [int(r["round"]) for r in rows] == list(range(1, NUM_ROUNDS + 1))
    # Every round averaged exactly the two honest updates: nothing the hostile sent was used.
    assert all(r["clients"] == 2 for r in rows), [r["clients"] for r in rows]
    assert rows[-1]["test_accuracy"] >= 0.91, rows[-1]
    server.wait_for(rf"training finished after {NUM_ROUNDS} rounds")
    for proc in (server, *fed.honest):
        assert "Traceback" not in proc.output, proc.output
    assert "internal:" not in server.output, server.output  # no exception escaped to the event loop
    for client in fed.honest:
        client.wait_for(rf"server: training finished after {NUM_ROUNDS} rounds")
