"""Slow is not dead: a frame arriving steadily, however slowly, is never cut off, while a peer
that stalls is, after --stall-timeout, long before the round's timeout. On 127.0.0.1 a raw
peer paces its bytes itself; tests/test_netns.py does the same over shaped links between
network namespaces.

How the two are told apart: the server notes when each byte of a frame arrives (one number),
and one timer per frame looks at it; a frame with no byte for --stall-timeout seconds is cut
off, whatever its length. Sending, the server aborts a peer that took no byte for as long.
"""

from __future__ import annotations

import time

import pytest

from conftest import FAST, Cluster
from socket_methods import PROTOCOL_VERSION, encode_message, frame_header
from test_hostile import Peer

pytestmark = pytest.mark.processes  # every test here starts real processes

STALL_S = 1.0
ROUND_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def slow_fed(tmp_path_factory):
    """Client 1 honest, id 2 the hand-paced peer; rounds need one update and wait 30 s for the rest."""
    cluster = Cluster(tmp_path_factory.mktemp("slow"))
    try:
        server = cluster.server(*FAST, "--num-clients", "2", "--min-clients", "1", "--num-rounds", "20",
                                "--stall-timeout", str(STALL_S), "--round-timeout", str(ROUND_TIMEOUT_S),
                                "--time-to-wait", "600", "--heartbeat-interval", "1")
        cluster.client(1, quiet=False).wait_for(r"server: waiting for clients", timeout=120)
        yield cluster, server
    finally:
        cluster.close()


def joined_peer(cluster: Cluster) -> Peer:
    for _ in range(40):  # the last test's connection may not be forgotten yet
        peer = Peer(cluster.port)
        try:
            peer.join(client_id=2)
            return peer
        except AssertionError:
            peer.close()
    raise AssertionError("client id 2 could not join")


def update_fields(model: dict) -> dict:
    return dict(round=model["round"], client_id=2, num_examples=1000, train_loss=0.3, local_test_accuracy=0.9,
                fit_seconds=1.0, weights=model["weights"])


def test_a_slow_steady_update_is_taken_whole(slow_fed):
    cluster, server = slow_fed
    peer = joined_peer(cluster)
    model, blob = peer.wait_for_model()
    peer.send(encode_message("<UPDATE>", **update_fields(model)), frame_header(len(blob)))
    started, piece = time.monotonic(), 1024
    for start in range(0, len(blob), piece):  # 31 KB at 10 KB/s: three times the stall timeout, never a pause of one
        peer.send(blob[start:start + piece])
        time.sleep(0.1)
    took = time.monotonic() - started
    assert took > 2.5 * STALL_S
    deadline = time.monotonic() + 20
    while (message := peer.next_message(deadline)) is not None and message["header"] != "<SUCCESS>":
        assert message["header"] != "<ERROR>", message
    assert message is not None and message["accepted"], message
    peer.hang_up()


def test_a_stalled_update_is_cut_off_after_the_stall_timeout(slow_fed):
    cluster, server = slow_fed
    peer = joined_peer(cluster)
    model, blob = peer.wait_for_model()
    peer.send(encode_message("<UPDATE>", **update_fields(model)), frame_header(len(blob)), blob[:len(blob) // 2])
    started = time.monotonic()
    messages = peer.read_to_end(timeout_s=20)
    waited = time.monotonic() - started
    errors = [m["message"] for m in messages if m["header"] == "<ERROR>"]
    assert errors and errors[0].startswith(f"stalled: no byte of a frame for {STALL_S:g} s"), messages
    assert STALL_S - 0.2 <= waited < ROUND_TIMEOUT_S / 3, waited  # the stall timeout, not the round's
    server.wait_for(rf"client 2 \({peer.address}\): stalled: no byte of a frame for {STALL_S:g} s .*; disconnected")


def test_a_peer_that_stops_reading_is_cut_off_after_the_stall_timeout(tmp_path):
    """The server sends a cnn model (6.7 MB, more than the socket buffers hold) to a peer that reads nothing."""
    cluster = Cluster(tmp_path)
    try:
        server = cluster.server("--model", "cnn", "--num-clients", "1", "--num-rounds", "1", "--round-retries", "0",
                                "--stall-timeout", str(STALL_S), "--round-timeout", str(ROUND_TIMEOUT_S),
                                "--time-to-wait", "0")
        peer = Peer(cluster.port, receive_buffer=4096)
        peer.send(*[encode_message("<HELLO>", protocol_version=PROTOCOL_VERSION, client_id=1, features=[]),
                    encode_message("<READY>", num_examples=1000, test_examples=0)])
        started = time.monotonic()
        server.wait_for(r"client 1 in round 1 \(stalled: the peer took no byte for 1 s\)", timeout=ROUND_TIMEOUT_S / 2)
        assert time.monotonic() - started < ROUND_TIMEOUT_S / 2
        peer.close()
    finally:
        cluster.close()
