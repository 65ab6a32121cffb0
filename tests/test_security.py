"""Security with real processes: TLS, mutual TLS, token and per-client authentication,
replay, cleartext on the wire, limits before authentication, and the exposure warning.

Every certificate is made at test time with the `cryptography` package: a CA and its
server certificates (good, expired, for another name, for 127.0.0.1 only), a second
unrelated CA, and a client CA with client certificates (good and expired). Each test
checks that the refused peer gets one clear line and a non-zero exit, and that the
honest clients still finish their federation.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import select
import socket
import threading
import time
from pathlib import Path

import pytest

import client_helper
import neural_net_helper as nnh
from fedsock import security
from conftest import FAST, read_metrics
from pki import Authority
from socket_methods import FRAME_HEADER, PROTOCOL_VERSION, decode_message, encode_message, encode_weights

pytestmark = pytest.mark.processes  # every test here starts real processes

TOKEN = "s3cret-enrolment-token-7f2c9a"  # what the tests' servers and clients share
FED = [*FAST, "--num-clients", "2", "--num-rounds", "1"]  # one round of logreg already reaches ~90%
FED2 = [*FAST, "--num-clients", "2", "--num-rounds", "2"]
# One client of four (a quarter of MNIST, so a round is short) and no lobby wait.
SOLO = [*FAST, "--num-clients", "4", "--time-to-wait", "0"]


def assert_one_clear_line(proc, pattern: str) -> None:
    """The refused process said what is wrong in one line on stderr, without a traceback."""
    assert "Traceback" not in proc.output, proc.output
    errors = [line for line in proc.lines if "error:" in line]
    assert len(errors) == 1, proc.output
    assert re.search(pattern, errors[0]), proc.output


def finish_honest(cluster, server, clients, tmp_path, min_accuracy=0.85):
    assert [c.finish() for c in clients] == [0] * len(clients), "\n".join(c.output for c in clients)
    assert server.finish() == 0, server.output
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert rows[-1]["test_accuracy"] > min_accuracy
    for proc in (server, *clients):
        assert "Traceback" not in proc.output, proc.output
    return rows


# --------------------------------------------------------------------------- certificates


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """Every certificate the tests use, made once for the module."""
    folder = tmp_path_factory.mktemp("pki")
    ca, other_ca, client_ca = Authority(folder, "ca"), Authority(folder, "other-ca"), Authority(folder, "client-ca")
    return {
        "ca": ca.path,
        "other_ca": other_ca.path,
        "client_ca": client_ca.path,
        "server": ca.issue("server", dns=["localhost"], ips=["127.0.0.1"]),
        "server_expired": ca.issue("server-expired", dns=["localhost"], ips=["127.0.0.1"], expired=True),
        "server_wrong_name": ca.issue("server-wrong-name", dns=["fl.example.org"]),  # neither 127.0.0.1 nor localhost
        "server_ip_only": ca.issue("server-ip-only", ips=["127.0.0.1"]),
        "server_by_other_ca": other_ca.issue("server-other", dns=["localhost"], ips=["127.0.0.1"]),
        "client1": client_ca.issue("client1", client=True),
        "client2": client_ca.issue("client2", client=True),
        "client_expired": client_ca.issue("client-expired", client=True, expired=True),
        "client_by_other_ca": other_ca.issue("client-stranger", client=True),
    }


def cert_flags(pair: tuple[str, str]) -> list[str]:
    """--tls-cert and --tls-key for a certificate and its key (the same flags on both sides)."""
    return ["--tls-cert", pair[0], "--tls-key", pair[1]]


# --------------------------------------------------------------------------- a raw peer


class RawPeer:
    """A hand-driven fedsock connection, for what the real client would never send."""

    def __init__(self, port: int, timeout: float = 30.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)

    def send(self, header: str, **fields) -> None:
        self.sock.sendall(encode_message(header, **fields))

    def _exactly(self, count: int) -> bytes:
        data = bytearray()
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                raise ConnectionError(f"closed after {len(data)} of {count} bytes")
            data += chunk
        return bytes(data)

    def recv_frame(self) -> bytes:
        (length,) = FRAME_HEADER.unpack(self._exactly(FRAME_HEADER.size))
        return self._exactly(length)

    def recv(self, skip=("<WAITING>",)) -> dict:
        while True:
            message = decode_message(self.recv_frame())
            if message["header"] not in skip:
                return message

    def hello(self, client_id: int) -> dict:
        self.send("<HELLO>", protocol_version=PROTOCOL_VERSION, client_id=client_id, features=[])
        return self.recv()

    def closed_within(self, timeout: float) -> bool:
        """Did the peer close (EOF or reset) within `timeout` seconds? Reads and drops anything else."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([self.sock], [], [], remaining)
            if readable:
                try:
                    if not self.sock.recv(65536):
                        return True
                except ConnectionResetError:
                    return True
        return False

    def close(self) -> None:
        self.sock.close()


# --------------------------------------------------------------------------- TLS


def test_federation_over_tls_refuses_wrong_ca_and_plain_clients(cluster, tmp_path, pki):
    server = cluster.server(*FED2, *cert_flags(pki["server"]))
    assert re.search(r"listening on 127\.0\.0\.1:\d+ \(TLS, no authentication\)", server.output)
    wrong_ca = cluster.client(1, "--tls-ca", pki["other_ca"])
    started = time.monotonic()
    plain = cluster.client(2, "--connect-timeout", "60")
    assert plain.finish(timeout=60) == 3
    assert time.monotonic() - started < 20  # told at once, not after the 60 s connect timeout
    assert_one_clear_line(plain, r"the server says: this server requires TLS: start the client with --tls-ca FILE")
    assert wrong_ca.finish(timeout=60) == 1
    assert_one_clear_line(wrong_ca, r"TLS: the server's certificate was rejected \(unable to get local issuer certificate\); "
                                    r"check --tls-ca")
    honest = [cluster.client(k, "--tls-ca", pki["ca"]) for k in (1, 2)]
    finish_honest(cluster, server, honest, tmp_path)
    server.wait_for(r"plain-TCP client connected to this TLS server")


def test_expired_server_certificate_is_rejected(cluster, tmp_path, pki):
    server = cluster.server(*SOLO, "--num-rounds", "1", *cert_flags(pki["server_expired"]))
    bad = cluster.client(1, "--tls-ca", pki["ca"])
    assert bad.finish(timeout=60) == 1
    assert_one_clear_line(bad, r"TLS: the server's certificate was rejected \(certificate has expired\)")
    # The server lives on: a client that skips the check (and is warned about it) still trains.
    honest = [cluster.client(1, "--tls-insecure")]
    finish_honest(cluster, server, honest, tmp_path)
    honest[0].wait_for(r"WARNING: --tls-insecure: the server's certificate is NOT checked")


def test_certificate_for_another_name_is_rejected(cluster, tmp_path, pki):
    """A certificate that does not name the address the client dialled is refused, whatever CA signed it."""
    # A certificate for fl.example.org only: neither 127.0.0.1 nor localhost.
    elsewhere = cluster.server(*FED, *cert_flags(pki["server_wrong_name"]), output_dir=tmp_path / "elsewhere")
    by_ip = cluster.client(1, "--tls-ca", pki["ca"])
    assert by_ip.finish(timeout=60) == 1
    assert_one_clear_line(by_ip, r"TLS: the server's certificate was rejected \(IP address mismatch, certificate is not "
                                 r"valid for '127\.0\.0\.1'\.\); check --tls-ca and that --server-host 127\.0\.0\.1 is a name")
    elsewhere.kill()
    # A certificate for 127.0.0.1 only: dialled as localhost it is refused, as 127.0.0.1 it is fine.
    server = cluster.server(*SOLO, "--num-rounds", "1", *cert_flags(pki["server_ip_only"]))
    by_name = cluster.client(2, "--tls-ca", pki["ca"], "--server-host", "localhost")
    assert by_name.finish(timeout=60) == 1
    assert_one_clear_line(by_name, r"TLS: the server's certificate was rejected \(Hostname mismatch, certificate is not "
                                   r"valid for 'localhost'\.\); check --tls-ca and that --server-host localhost is a name")
    finish_honest(cluster, server, [cluster.client(1, "--tls-ca", pki["ca"])], tmp_path)


def test_tls_client_to_a_plain_server_fails_fast(cluster, tmp_path, pki):
    server = cluster.server(*FED)
    started = time.monotonic()
    tls_client = cluster.client(1, "--tls-ca", pki["ca"], "--connect-timeout", "60")
    assert tls_client.finish(timeout=60) == 1
    assert time.monotonic() - started < 20
    assert_one_clear_line(tls_client, r"TLS: the server does not speak TLS \(is it running without --tls-cert\?\)")
    server.wait_for(r"the peer started a TLS handshake, but this server runs without --tls-cert")
    server.kill()


def test_mutual_tls_refuses_clients_without_a_trusted_certificate(cluster, tmp_path, pki):
    server = cluster.server(*FED, *cert_flags(pki["server"]), "--tls-client-ca", pki["client_ca"])
    assert "(TLS with client certificates, no authentication)" in server.output
    no_cert = cluster.client(1, "--tls-ca", pki["ca"])
    # A rejected certificate: the handshake fails without the TLS alert that would say why (asyncio
    # does not send it), which looks like a busy server hanging up: the client tries again until
    # --connect-timeout, then infers why (exit 1). No certificate: told in a frame (exit 3).
    expired = cluster.client(1, "--tls-ca", pki["ca"], *cert_flags(pki["client_expired"]), "--connect-timeout", "3")
    stranger = cluster.client(2, "--tls-ca", pki["ca"], *cert_flags(pki["client_by_other_ca"]), "--connect-timeout", "3")
    assert [p.finish(timeout=60) for p in (no_cert, expired, stranger)] == [3, 1, 1]
    honest = [cluster.client(k, "--tls-ca", pki["ca"], *cert_flags(pki[f"client{k}"])) for k in (1, 2)]
    finish_honest(cluster, server, honest, tmp_path)
    server.wait_for(r"a client without a certificate connected to this mutual-TLS server; told it to use --tls-cert")
    server.wait_for(r"TLS handshake failed: client certificate rejected \(certificate has expired\)")
    server.wait_for(r"TLS handshake failed: client certificate rejected \(unable to get local issuer certificate\)")
    # Each refused client is told that its certificate is the problem.
    assert_one_clear_line(no_cert, r"this server requires a client certificate: start the client with --tls-cert and --tls-key")
    assert_one_clear_line(expired, r"TLS: .*client('s)? certificate")
    assert_one_clear_line(stranger, r"TLS: .*client('s)? certificate")


def test_a_flood_of_silent_connections_does_not_lock_a_tls_lobby(cluster, tmp_path, pki):
    """Over TLS a silent peer stalls the handshake itself (the server waits for its ClientHello):
    300 of them, re-opened as they are shed, while five TLS clients with a token join and finish."""
    token_file = secret_file(tmp_path / "token", TOKEN)
    server = cluster.server(*FAST, "--num-clients", "5", "--num-rounds", "2", "--time-to-wait", "120",
                            *cert_flags(pki["server"]), "--auth-token-file", token_file)
    flood = cluster.flood(300)
    # A client whose ClientHello comes late (a busy machine: the suite runs on 4 workers) looks silent
    # too, is shed, and tries again: the joins may take a while, never for ever.
    clients = [cluster.client(k, "--tls-ca", pki["ca"], "--auth-token-file", token_file, "--connect-timeout", "150")
               for k in range(1, 6)]
    codes = [c.finish(timeout=300) for c in clients]
    assert codes == [0] * 5, "\n\n".join(c.output for c, code in zip(clients, codes) if code)
    opened = cluster.stop_flood(flood)
    assert server.finish(timeout=60) == 0 and opened > 300
    server.wait_for(r"evicted: 64 connections were in their handshake and this one had sent nothing")


# --------------------------------------------------------------------------- tokens


def secret_file(path: Path, text: str, mode: int = 0o600) -> str:
    path.write_text(text)
    path.chmod(mode)
    return str(path)


def assert_token_not_exposed(cluster, *secrets: str) -> None:
    """No secret in any process's argv (what `ps` shows) or in anything it printed."""
    for proc in cluster.procs:
        argv = " ".join(map(str, proc.popen.args))
        for secret in secrets:
            assert secret not in argv, argv
            assert secret not in proc.output, proc.output


def test_token_authentication(cluster, tmp_path):
    token_file = secret_file(tmp_path / "token", TOKEN + "\n")
    readable_wrong = secret_file(tmp_path / "wrong-token", "not-the-token\n", 0o644)
    server = cluster.server(*FED, env={security.TOKEN_ENV: TOKEN})
    assert "(plain TCP, token authentication)" in server.output
    wrong = cluster.client(1, "--auth-token-file", readable_wrong, env={security.TOKEN_ENV: ""})
    missing = cluster.client(2, env={security.TOKEN_ENV: ""})
    assert wrong.finish(timeout=60) == 3
    assert_one_clear_line(wrong, r"error: the server says: authentication failed for client id 1$")
    wrong.wait_for(r"WARNING: .*wrong-token can be read by other users; chmod 600 it")
    assert missing.finish(timeout=60) == 2
    assert_one_clear_line(missing, r"error: the server requires authentication: pass --auth-token-file or set \$FEDSOCK_TOKEN")
    honest = [
        cluster.client(1, env={security.TOKEN_ENV: TOKEN}),
        cluster.client(2, "--auth-token-file", token_file, env={security.TOKEN_ENV: ""}),
    ]
    finish_honest(cluster, server, honest, tmp_path)
    server.wait_for(r"authentication failed for client id 1; disconnected")
    assert "chmod 600" not in honest[1].output
    assert_token_not_exposed(cluster, TOKEN)


def test_the_challenge_answer_as_the_readme_writes_it(cluster, tmp_path):
    """A third party's client computes the answer from the README alone: the secret is the token file's
    first line, stripped, as UTF-8 bytes; the HMAC is over the nonce's 32 bytes, not its hex; the hex
    of the answer may be upper case."""
    token_file = secret_file(tmp_path / "token", "  s3cret with spaces inside \n# not part of it\n")
    server = cluster.server(*FED, "--auth-token-file", token_file)
    secret = b"s3cret with spaces inside"
    for client_id, case in ((1, str.upper), (2, str.lower)):
        peer = RawPeer(cluster.port)
        nonce = bytes.fromhex(peer.hello(client_id)["nonce"])
        mac = hmac.new(secret, b"fedsock-auth-v1\x00" + nonce + b"\x00" + str(client_id).encode("ascii"), hashlib.sha256)
        peer.send("<AUTH>", mac=case(mac.hexdigest()))
        assert peer.recv()["header"] == "<METADATA>"
        peer.close()
    wrong = RawPeer(cluster.port)
    nonce_hex = wrong.hello(1)["nonce"]
    over_hex = hmac.new(secret, b"fedsock-auth-v1\x00" + nonce_hex.encode() + b"\x00" + b"1", hashlib.sha256)
    wrong.send("<AUTH>", mac=over_hex.hexdigest())  # the HMAC over the nonce's hex text is not the answer
    assert wrong.recv() == {"header": "<ERROR>", "message": "authentication failed for client id 1"}
    wrong.close()
    server.kill()


def test_per_client_secrets_do_not_open_other_ids(cluster, tmp_path):
    one, two = "alpha-secret-of-client-one", "bravo-secret-of-client-two"
    secrets_file = secret_file(tmp_path / "clients.tokens", f"# CLIENT_ID SECRET\n1 {one}\n2 {two}  # second\n")
    server = cluster.server(*FED, "--auth-tokens-file", secrets_file)
    assert "token authentication" in server.output and "chmod 600" not in server.output
    impostor = cluster.client(2, env={security.TOKEN_ENV: one})  # client 1's secret, client 2's id
    unknown = cluster.client(3, env={security.TOKEN_ENV: one})  # an id the file does not name
    assert impostor.finish(timeout=60) == 3 and unknown.finish(timeout=60) == 3
    assert_one_clear_line(impostor, r"the server says: authentication failed for client id 2$")
    # An unknown id gets the same answer as a wrong secret: nothing tells which ids exist.
    assert_one_clear_line(unknown, r"the server says: authentication failed for client id 3$")
    honest = [cluster.client(1, env={security.TOKEN_ENV: one}), cluster.client(2, env={security.TOKEN_ENV: two})]
    finish_honest(cluster, server, honest, tmp_path)
    assert_token_not_exposed(cluster, one, two)


def authenticated_peer(port: int, client_id: int, token: str = TOKEN) -> RawPeer:
    peer = RawPeer(port)
    challenge = peer.hello(client_id)
    assert challenge["header"] == "<CHALLENGE>", challenge
    peer.send("<AUTH>", mac=security.auth_mac(token.encode(), bytes.fromhex(challenge["nonce"]), client_id))
    meta = peer.recv()
    assert meta["header"] == "<METADATA>" and meta["client_id"] == client_id, meta
    peer.send("<READY>", num_examples=100, test_examples=0)
    return peer


def bad_update(peer: RawPeer, **changes) -> dict:
    """Wait for a <MODEL>, then answer it with an <UPDATE> altered by `changes` (the weights stay unsent:
    the server must refuse on the header alone)."""
    model = peer.recv()
    assert model["header"] == "<MODEL>", model
    assert len(peer.recv_frame()) == model["weights"]["nbytes"]
    fields = dict(round=model["round"], num_examples=100, train_loss=0.5, local_test_accuracy=0.9,
                  fit_seconds=1.0, weights=model["weights"])
    peer.send("<UPDATE>", **{**fields, **changes})
    return model


def test_replayed_answers_and_forged_updates_are_refused(cluster, tmp_path):
    """Hostile peers that know the protocol, on one server (token from --auth-token-file): a replayed
    challenge answer, then enrolled peers that send an update for the wrong round or another id."""
    token_file = secret_file(tmp_path / "token", TOKEN)
    server = cluster.server(*FAST, "--num-clients", "4", "--num-rounds", "1", "--auth-token-file", token_file)
    # A valid exchange, as an eavesdropper on a plain connection would record it.
    first = RawPeer(cluster.port)
    challenge = first.hello(3)
    nonce_a = bytes.fromhex(challenge["nonce"])
    assert challenge["header"] == "<CHALLENGE>" and len(nonce_a) == security.NONCE_BYTES
    recorded = security.auth_mac(TOKEN.encode(), nonce_a, 3)
    first.send("<AUTH>", mac=recorded)
    assert first.recv()["header"] == "<METADATA>"  # the answer was good for that connection
    first.close()
    server.wait_for(r"client 3 left \(connection closed\)")
    # Replayed on a new connection, against a new nonce, it is worthless.
    replay = RawPeer(cluster.port)
    challenge_b = replay.hello(3)
    assert challenge_b["header"] == "<CHALLENGE>" and bytes.fromhex(challenge_b["nonce"]) != nonce_a
    replay.send("<AUTH>", mac=recorded)
    assert replay.recv() == {"header": "<ERROR>", "message": "authentication failed for client id 3"}
    assert replay.closed_within(30)
    replay.close()
    server.wait_for(r"authentication failed for client id 3; disconnected")

    # Enrolled peers (they know the token) join as 3 and 4 and misbehave in round 1.
    wrong_round, wrong_id = authenticated_peer(cluster.port, 3), authenticated_peer(cluster.port, 4)
    honest = [cluster.client(k, env={security.TOKEN_ENV: TOKEN}) for k in (1, 2)]
    server.wait_for(r"training starts with 4 client\(s\) \[1-4\]")
    model = bad_update(wrong_round, client_id=3, round=2)
    bad_update(wrong_id, client_id=1)
    assert model["round"] == 1
    assert wrong_round.recv() == {"header": "<ERROR>", "message": "update for round 2, but this client was sent round 1"}
    assert wrong_id.recv() == {"header": "<ERROR>", "message": "update carries client id 1, but this connection is client 4"}
    assert wrong_round.closed_within(30) and wrong_id.closed_within(30)
    rows = finish_honest(cluster, server, honest, tmp_path)
    assert [r["clients"] for r in rows] == [2]
    server.wait_for(r"round 1/1  clients 2/4")  # both were expected, neither was counted
    server.wait_for(r"dropped: .*client 3 in round 1 \(update for round 2, but this client was sent round 1\)")
    server.wait_for(r"dropped: .*client 4 in round 1 \(update carries client id 1")
    assert_token_not_exposed(cluster, TOKEN)


# --------------------------------------------------------------------------- what the wire shows


class Relay:
    """A TCP relay on 127.0.0.1 that forwards to a server and records every byte, both ways."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.to_server, self.to_client = bytearray(), bytearray()
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while True:
            try:
                inside, _ = self.listener.accept()
            except OSError:
                return  # closed
            outside = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=30)
            outside.settimeout(None)
            self.sockets += [inside, outside]
            for source, target, record in ((inside, outside, self.to_server), (outside, inside, self.to_client)):
                thread = threading.Thread(target=self._pump, args=(source, target, record), daemon=True)
                self.threads.append(thread)
                thread.start()

    def _pump(self, source: socket.socket, target: socket.socket, record: bytearray) -> None:
        try:
            while data := source.recv(65536):
                with self.lock:
                    record += data
                target.sendall(data)
            target.shutdown(socket.SHUT_WR)
        except OSError:
            for sock in (source, target):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        for sock in (self.listener, *self.sockets):
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept() or recv()
            except OSError:
                pass
            sock.close()
        for thread in self.threads:
            thread.join(timeout=10)


def weight_slices(tensors, step: int = 32, size: int = 64) -> list[bytes]:
    """64-byte runs of a model's wire bytes (the ones that are not all one byte, like alignment padding)."""
    _, blob = encode_weights(tensors)
    slices = [bytes(blob[i : i + size]) for i in range(0, len(blob) - size, step)]
    return [s for s in slices if len(set(s)) > 4]


def initial_weights():
    return nnh.get_weights(nnh.build_model("logreg", client_helper.DATASETS["mnist"], 0))


def relayed_federation(cluster, tmp_path, server_flags, client_flags, rounds):
    token_file = secret_file(tmp_path / "token", TOKEN)
    server = cluster.server(*SOLO, "--num-rounds", str(rounds), "--auth-token-file", token_file,
                            *server_flags)
    relay = Relay(cluster.port)
    try:
        client = cluster.client(1, *client_flags, "--auth-token-file", token_file, port=relay.port)
        assert client.finish() == 0, client.output
        assert server.finish() == 0, server.output
    finally:
        relay.close()
    server.wait_for(r"client 1 joined from 127\.0\.0\.1")
    return relay


def test_no_cleartext_on_the_wire_with_tls(cluster, tmp_path, pki):
    import torch

    relay = relayed_federation(cluster, tmp_path, cert_flags(pki["server"]), ["--tls-ca", pki["ca"]], rounds=2)
    wire = bytes(relay.to_server) + b"\x00" + bytes(relay.to_client)
    assert len(relay.to_client) > 2 * 31_000 and len(relay.to_server) > 2 * 31_000  # both models and updates passed
    assert wire[:1] == b"\x16"  # a TLS handshake record, from the very first byte
    for clear in (TOKEN.encode(), b"<MODEL>", b"<UPDATE>", b"<HELLO>", b"<CHALLENGE>", b"header"):
        assert clear not in wire, clear
    final = torch.load(tmp_path / "run" / "model.pt")
    for tensors in (initial_weights(), final):
        slices = weight_slices(tensors)
        assert len(slices) > 500
        assert not [s for s in slices if s in wire]


def test_without_tls_the_wire_shows_the_model_but_never_the_token(cluster, tmp_path):
    """The control for the test above: the same relay does see the protocol in clear without TLS."""
    relay = relayed_federation(cluster, tmp_path, [], [], rounds=1)
    assert b"<MODEL>" in relay.to_client and b"<CHALLENGE>" in relay.to_client and b"<UPDATE>" in relay.to_server
    slices = weight_slices(initial_weights())
    assert all(s in relay.to_client for s in slices)  # the search does find weights when they are there
    assert TOKEN.encode() not in relay.to_server + relay.to_client  # only an HMAC of a fresh nonce is sent


# --------------------------------------------------------------------------- before authentication


def test_unauthenticated_connections_are_capped_and_timed_out(cluster, tmp_path):
    """--max-pending 2: a third connection evicts the oldest silent one instead of being refused; a
    silent connection is cut off after the first-byte deadline (3 s), one that spoke and stalled at
    --handshake-timeout; a real client still joins."""
    server = cluster.server(*SOLO, "--num-rounds", "1", "--max-pending", "2",
                            "--handshake-timeout", "5", env={security.TOKEN_ENV: TOKEN})
    talking = RawPeer(cluster.port)
    assert talking.hello(3)["header"] == "<CHALLENGE>"  # it has spoken; it never answers the challenge
    silent = [RawPeer(cluster.port) for _ in range(2)]  # accepted in this order, the second one finds no place
    resumed = time.monotonic()
    # Taking the second place evicted the oldest silent connection: there was none but the first.
    assert silent[0].closed_within(2), "the oldest silent connection was not evicted for the new one"
    server.wait_for(r"evicted: 2 connections were in their handshake and this one had sent nothing")
    assert silent[1].closed_within(15) and 2 <= time.monotonic() - resumed < 15
    server.wait_for(r"sent nothing within 3 s of connecting; disconnected")
    assert talking.closed_within(15)
    server.wait_for(r"no complete handshake within 5 s; disconnected")
    client = cluster.client(1, env={security.TOKEN_ENV: TOKEN})
    assert client.finish() == 0 and server.finish() == 0
    for peer in (talking, *silent):
        peer.close()


def test_listening_beyond_loopback_without_tls_and_token_warns(cluster, tmp_path, pki):
    exposed = cluster.server(*FED, "--host", "0.0.0.0")
    exposed.wait_for(r"WARNING: listening on 0\.0\.0\.0 without TLS and a token: anyone who can reach this port "
                     r"can join and read the model")
    exposed.kill()
    guarded = cluster.server(*FED, "--host", "0.0.0.0", *cert_flags(pki["server"]), env={security.TOKEN_ENV: TOKEN},
                             output_dir=tmp_path / "guarded")
    assert "(TLS, token authentication)" in guarded.output
    assert "WARNING" not in guarded.output
    guarded.kill()


# --------------------------------------------------------------------------- the TLS transport itself


def test_a_tls_connection_closed_twice_closes_at_once(pki):
    """At the end of a run the server closes each client's connection twice (say_goodbye and
    serve_client). Over TLS that must neither raise inside asyncio, nor leave a read pending
    forever, nor wait for the close timeout."""
    from socket_methods import ProtocolError
    from fedsock.transport import Traffic, open_accepted

    server_tls = security.server_tls_context(*pki["server"], None)
    client_tls = security.client_tls_context(False, pki["ca"], None, None, False, "test")
    problems = []

    async def scenario() -> tuple[float, object]:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _, context: problems.append(f"{context.get('message')} {context.get('exception')!r}"))
        with socket.create_server(("127.0.0.1", 0)) as listener:
            listener.setblocking(False)

            def dial() -> socket.socket:
                raw = socket.create_connection(listener.getsockname(), timeout=10)
                return client_tls.wrap_socket(raw, server_hostname="127.0.0.1")

            dialing = loop.run_in_executor(None, dial)
            sock, _ = await asyncio.wait_for(loop.sock_accept(listener), 10)
            conn = await open_accepted(sock, Traffic(), server_tls, 10, 10)
            client = await asyncio.wait_for(dialing, 10)
            # As at the end of a run: serve_client has a read pending when it and say_goodbye
            # both close the connection; then the client goes.
            reading = asyncio.ensure_future(conn.recv_message())
            closing = [asyncio.ensure_future(conn.close()) for _ in range(2)]
            await asyncio.sleep(0)  # a yield, so that both closes begin
            started = time.monotonic()
            await asyncio.wait_for(loop.run_in_executor(None, client.close), 10)
            await asyncio.wait_for(asyncio.gather(*closing), 30)
            elapsed = time.monotonic() - started
            await asyncio.wait([reading], timeout=5)
            if not reading.done():
                reading.cancel()
                return elapsed, "still pending"
            return elapsed, reading.exception()

    elapsed, read_outcome = asyncio.run(scenario())
    assert not problems, problems
    # The pending read learns that the connection is gone, instead of waiting forever.
    assert isinstance(read_outcome, ProtocolError), f"the pending read: {read_outcome!r}"
    assert elapsed < 2, f"closing took {elapsed:.1f} s: the close timeout ran out"
