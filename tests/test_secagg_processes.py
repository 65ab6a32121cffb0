"""Secure aggregation over real sockets, with real server and client processes on 127.0.0.1.

- A secure federation gives plain FedAvg's model within the quantisation bound.
- Faults: a client that vanishes at each stage of the protocol (a scripted peer that closes its
  socket right there), and a real client process killed while it trains: the round completes
  with the others. A client that comes back within the round is not asked to unmask.
- A malicious server: a relay between one real client and the real server rewrites the
  <SECAGG_UNMASK> to ask for both kinds of share of one client; the honest client refuses.
"""

from __future__ import annotations

import json
import signal
import socket
import struct
import threading

import numpy as np
import pytest
import torch

from conftest import FAST, read_metrics
from fedsock import secagg as sa
from socket_methods import PROTOCOL_VERSION, decode_message, decode_weights, encode_message, frame_header

pytestmark = pytest.mark.processes  # every test here starts real processes

IO_TIMEOUT_S = 30.0
SECURE = [*FAST, "--secure-aggregation"]


def test_a_secure_federation_gives_plain_fedavg(cluster, tmp_path):
    flags = ["--num-clients", "3", "--num-rounds", "2", "--seed", "2"]
    for name, extra in (("plain", []), ("secure", ["--secure-aggregation"])):
        server = cluster.server(*FAST, *flags, *extra, output_dir=tmp_path / name)
        clients = [cluster.client(k) for k in (1, 2, 3)]
        assert [c.finish() for c in clients] == [0, 0, 0], [c.output for c in clients]
        assert server.finish() == 0, server.output
    plain, secure = torch.load(tmp_path / "plain" / "model.pt"), torch.load(tmp_path / "secure" / "model.pt")
    # n·C·2^-b·W/Σn per coordinate per round (3 clients, C = 10, b = 29, W = 20,000, Σn = 54,000): 2e-8;
    # float32 rounding of the weights themselves dominates.
    assert max(float((plain[k] - secure[k]).abs().max()) for k in plain) < 1e-6
    p, s = read_metrics(tmp_path / "plain" / "metrics.csv"), read_metrics(tmp_path / "secure" / "metrics.csv")
    assert [r["test_accuracy"] for r in p] == [r["test_accuracy"] for r in s]
    # upload bytes: the masked vector is as long as the float32 model, plus the key traffic
    assert s[-1]["bytes_received"] < 1.1 * p[-1]["bytes_received"]


# --------------------------------------------------------------------------- a scripted client


class ScriptedPeer(threading.Thread):
    """A client on a raw socket that runs the real client session, and closes its socket when it
    receives `stop_at` (a header, or "<UPDATE>": just before it would send its masked update)."""

    def __init__(self, port: int, client_id: int, stop_at: str | None = None, rejoin: bool = False,
                 late_at: str | None = None):
        super().__init__(daemon=True)
        self.port, self.client_id, self.stop_at, self.rejoin = port, client_id, stop_at, rejoin
        self.late_at = late_at  # answer this header of round 1 only once `release` is set (a slow client)
        self.release = threading.Event()
        self.headers: list[str] = []  # every message it got, in order (all connections)
        self.second: list[str] = []  # those of its second connection (rejoin)
        self.error: BaseException | None = None
        self.stopped = threading.Event()

    def run(self) -> None:
        try:
            self.session()
        except BaseException as exc:  # reported by the test
            self.error = exc

    def _connect(self):
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=IO_TIMEOUT_S)
        sock.sendall(encode_message("<HELLO>", protocol_version=PROTOCOL_VERSION, client_id=self.client_id,
                                    features=["secagg", "dp-local", "compression"]))
        sock.sendall(encode_message("<READY>", num_examples=1000, test_examples=0))
        return sock

    def _read(self, sock, nbytes: int) -> bytes | None:
        data = bytearray()
        while len(data) < nbytes:
            chunk = sock.recv(nbytes - len(data))
            if not chunk:
                return None
            data += chunk
        return bytes(data)

    def _frame(self, sock) -> bytes | None:
        prefix = self._read(sock, 8)
        return None if prefix is None else self._read(sock, struct.unpack(">Q", prefix)[0])

    def session(self) -> None:
        sock = self._connect()
        meta = decode_message(self._frame(sock))
        assert meta["header"] == "<METADATA>", meta
        session = None
        while True:
            payload = self._frame(sock)
            if payload is None:
                return
            message = decode_message(payload)
            header = message["header"]
            self.headers.append(header)
            if header == "<FINISHED>":
                return
            blob = self._frame(sock) if header in ("<MODEL>", "<EVALUATE>") else None
            if header == self.stop_at:
                sock.close()
                self.stopped.set()
                if self.rejoin:
                    return self.second_connection()
                return
            if header.startswith("<SECAGG_"):
                if session is None:
                    session = sa.ClientSession(self.client_id, message["length"])
                answer = session.answer(message)
                if header == self.late_at and message["round"] == 1:
                    assert self.release.wait(IO_TIMEOUT_S), "the test never released the late answer"
                if answer is not None:
                    sock.sendall(encode_message(answer[0], **answer[1]))
            elif header == "<MODEL>":
                start = {k: v.clone() for k, v in decode_weights(message["weights"], bytearray(blob)).items()}
                trained = {k: v + 0.001 for k, v in start.items()}
                masked = session.masked_update(message["round"], start, trained, 1000)
                if self.stop_at == "<UPDATE>":
                    sock.close()
                    self.stopped.set()
                    return
                layout = sa.masked_layout(session.length)
                body = masked.tobytes() + bytes(layout["nbytes"] - masked.nbytes)
                sock.sendall(encode_message("<UPDATE>", round=message["round"], client_id=self.client_id,
                                            num_examples=1000, train_loss=0.3, local_test_accuracy=0.9,
                                            fit_seconds=0.1, weights=layout) + frame_header(len(body)) + body)
                if self.stop_at == "after <UPDATE>":
                    sock.close()
                    self.stopped.set()
                    if self.rejoin:
                        return self.second_connection()
                    return

    def second_connection(self) -> None:
        """Back within the same round, under the same id: it must not be asked to unmask that round."""
        for _ in range(100):
            sock = self._connect()
            message = decode_message(self._frame(sock))
            if message["header"] == "<METADATA>":
                break
            sock.close()  # "already connected": the server has not seen the first one close yet
        sock.settimeout(5)
        try:
            while (payload := self._frame(sock)) is not None:
                message = decode_message(payload)
                self.second.append(message["header"])
                if message["header"] in ("<MODEL>", "<EVALUATE>"):
                    self._frame(sock)
                if message["header"] in ("<FINISHED>", "<SECAGG_SETUP>"):
                    break
        except socket.timeout:
            pass
        sock.close()


def secure_server(cluster, tmp_path, *extra: str):
    return cluster.server(*SECURE, "--num-clients", "4", "--min-clients", "3", "--num-rounds", "1",
                          "--round-retries", "0", "--time-to-wait", "120", *extra, output_dir=tmp_path / "run")


@pytest.mark.parametrize("stop_at, counted", [("<SECAGG_SETUP>", 3), ("<SECAGG_PEERS>", 3), ("<SECAGG_ROUTED>", 3),
                                              ("<UPDATE>", 3), ("<SECAGG_UNMASK>", 4)],
                         ids=["before-keys", "after-keys", "after-shares", "before-its-update", "during-unmasking"])
def test_a_client_that_vanishes_at_any_stage_leaves_the_round_complete(cluster, tmp_path, stop_at, counted):
    server = secure_server(cluster, tmp_path)
    clients = [cluster.client(k) for k in (1, 2, 3)]
    peer = ScriptedPeer(cluster.port, 4, stop_at)
    peer.start()
    assert [c.finish(timeout=180) for c in clients] == [0, 0, 0], ([c.output for c in clients], server.output)
    assert server.finish(timeout=60) == 0, server.output
    peer.join(timeout=30)
    assert peer.error is None, peer.error
    assert peer.stopped.is_set(), peer.headers
    row = read_metrics(tmp_path / "run" / "metrics.csv")[0]
    assert row["clients"] == counted  # an update that arrived before its sender left is in the sum
    assert row["test_accuracy"] > 0.85
    server.wait_for(r"client 4 in round 1 \(")  # its drop is reported, with the stage


def test_a_killed_client_process_during_training_leaves_the_round_complete(cluster, tmp_path):
    server = cluster.server(*SECURE, "--num-clients", "4", "--min-clients", "3", "--num-rounds", "2",
                            "--round-retries", "0", "--time-to-wait", "120", output_dir=tmp_path / "run")
    victim = cluster.client(4, "--progress-every", "25", quiet=False)
    clients = [cluster.client(k) for k in (1, 2, 3)]
    victim.wait_for(r"round 1/2: 25% trained", timeout=120)
    victim.signal(signal.SIGKILL)
    assert [c.finish(timeout=180) for c in clients] == [0, 0, 0], ([c.output for c in clients], server.output)
    assert server.finish(timeout=60) == 0, server.output
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert [r["clients"] for r in rows] == [3, 3]
    server.wait_for(r"client 4 in round 1 \(connection closed")


def test_a_client_back_within_the_round_is_not_asked_to_unmask(cluster, tmp_path):
    server = secure_server(cluster, tmp_path)
    clients = [cluster.client(k) for k in (1, 2, 3)]
    peer = ScriptedPeer(cluster.port, 4, "after <UPDATE>", rejoin=True)
    peer.start()
    assert [c.finish(timeout=180) for c in clients] == [0, 0, 0], ([c.output for c in clients], server.output)
    assert server.finish(timeout=60) == 0, server.output
    peer.join(timeout=60)
    assert peer.error is None, peer.error
    assert "<SECAGG_UNMASK>" not in peer.second, peer.second
    assert read_metrics(tmp_path / "run" / "metrics.csv")[0]["clients"] == 4  # its masked update counts


def test_a_client_too_slow_for_a_key_stage_misses_that_round_only(cluster, tmp_path):
    """Its answer comes after the stage's timeout (here the round timeout, 10 s): it is left out of
    round 1, its late answer is no fault, and it takes part in round 2."""
    server = cluster.server(*SECURE, "--num-clients", "4", "--min-clients", "3", "--num-rounds", "2",
                            "--round-retries", "0", "--round-timeout", "10", "--time-to-wait", "120",
                            output_dir=tmp_path / "run")
    clients = [cluster.client(k) for k in (1, 2, 3)]
    peer = ScriptedPeer(cluster.port, 4, late_at="<SECAGG_PEERS>")
    peer.start()
    server.wait_for(r"client 4 in round 1 \(secure aggregation, <SECAGG_PEERS>: no answer within 10 s", timeout=120)
    peer.release.set()
    assert [c.finish(timeout=180) for c in clients] == [0, 0, 0], ([c.output for c in clients], server.output)
    assert server.finish(timeout=60) == 0, server.output
    peer.join(timeout=30)
    assert peer.error is None, peer.error
    assert [r["clients"] for r in read_metrics(tmp_path / "run" / "metrics.csv")] == [3, 4], (server.output, peer.headers)
    assert "disconnected" not in server.output, server.output


# --------------------------------------------------------------------------- a malicious server


class UnmaskRewriter(threading.Thread):
    """A relay between one real client and the real server that, as a malicious server would, lists
    a surviving client as dropped too in <SECAGG_UNMASK>: both kinds of share of it."""

    def __init__(self, server_port: int):
        super().__init__(daemon=True)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.server_port = server_port
        self.rewritten = threading.Event()

    def run(self) -> None:
        self.listener.settimeout(IO_TIMEOUT_S)
        client, _ = self.listener.accept()
        upstream = socket.create_connection(("127.0.0.1", self.server_port), timeout=IO_TIMEOUT_S)
        threading.Thread(target=self.pump, args=(client, upstream), daemon=True).start()
        self.downstream(upstream, client)

    @staticmethod
    def pump(source, target) -> None:
        try:
            while data := source.recv(1 << 16):
                target.sendall(data)
        except OSError:
            pass
        finally:
            try:
                target.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def downstream(self, source, target) -> None:
        """Frame by frame from the server to the client, rewriting the one message."""
        raw_next = False
        try:
            while True:
                prefix = _exact(source, 8)
                if prefix is None:
                    break
                payload = _exact(source, struct.unpack(">Q", prefix)[0])
                if not raw_next:
                    message = json.loads(payload)
                    raw_next = message["header"] in ("<MODEL>", "<EVALUATE>")
                    if message["header"] == "<SECAGG_UNMASK>":
                        message["dropped"] = message["dropped"] + [message["survivors"][-1]]
                        payload = json.dumps(message).encode()
                        self.rewritten.set()
                else:
                    raw_next = False
                target.sendall(frame_header(len(payload)) + payload)
        except OSError:
            pass
        finally:
            target.close()


def _exact(sock, nbytes: int) -> bytes | None:
    data = bytearray()
    while len(data) < nbytes:
        chunk = sock.recv(min(nbytes - len(data), 1 << 20))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def test_an_honest_client_refuses_a_server_that_asks_for_both_shares(cluster, tmp_path):
    server = secure_server(cluster, tmp_path)
    relay = UnmaskRewriter(cluster.port)
    relay.start()
    honest = [cluster.client(k) for k in (2, 3, 4)]
    tricked = cluster.client(1, port=relay.port)
    assert tricked.finish(timeout=180) != 0
    assert relay.rewritten.is_set()
    lines = [line for line in tricked.lines if "error" in line]
    assert len(lines) == 1 and "asked for both kinds of share of client 4" in lines[0], tricked.output
    assert "Traceback" not in tricked.output
    # the server was told why; the other three revealed, which is enough (t = 3 of 4)
    server.wait_for(r"client 1.*both kinds of share of client 4")
    assert [c.finish(timeout=120) for c in honest] == [0, 0, 0]
    assert server.finish(timeout=60) == 0, server.output
    assert np.isfinite(read_metrics(tmp_path / "run" / "metrics.csv")[0]["test_accuracy"])


# --------------------------------------------------------------------------- identities, end to end


def test_an_enrolled_federation_runs_from_the_readme_s_commands(cluster, tmp_path):
    """The README's commands as a newcomer copies them: python -m fedsock.enrol, then the server with
    --federation and each client with its --identity (one of them with its policy in a TOML file).
    Every client signs, and checks its peers and the survivors, and every round completes."""
    from support import Proc

    enrol = Proc(["-m", "fedsock.enrol", "--clients", "3"], "enrol", cwd=tmp_path)
    assert enrol.finish(timeout=60) == 0, enrol.output
    enrol.wait_for(r"server:   python fl_server\.py --secure-aggregation --federation federation/federation\.pub")
    federation = tmp_path / "federation"
    policy = tmp_path / "policy.toml"
    policy.write_text('require_secure_aggregation = true\nmin_round_clients = 3\nmin_threshold = 2\n')
    server = cluster.server(*SECURE, "--num-clients", "3", "--min-clients", "3", "--num-rounds", "2",
                            "--federation", str(federation / "federation.pub"), output_dir=tmp_path / "run")
    server.wait_for(r"secure aggregation with identities of federation SHA256:\S+: a server that lies learns no one "
                    r"update unless it colludes with 1 of the 3 clients")
    clients = [cluster.client(k, "--identity", str(federation / f"client-{k}.identity"),
                              *(["--config", str(policy)] if k == 3 else []), quiet=False) for k in (1, 2, 3)]
    assert [c.finish(timeout=300) for c in clients] == [0, 0, 0], [c.output for c in clients]
    assert server.finish(timeout=60) == 0, server.output
    clients[2].wait_for(r"privacy policy: requires secure aggregation with enrolled identities of at least 3 clients "
                        r"and a threshold of at least 2 a round")
    clients[0].wait_for(r"round 2: revealed the shares to unmask 3 updates")
    assert [r["clients"] for r in read_metrics(tmp_path / "run" / "metrics.csv")] == [3, 3]
