"""The client against a hostile or broken server: a fake server written here (a raw listening
socket in a thread) that fl_client.py's main connects to over a real socket, running in another
thread of this process (tests/support.py's InProcessClient: the same exit status and lines as a
process, without importing PyTorch again for every case).

Whatever the server sends, the client must exit non-zero with ONE line that says what went
wrong (`fl_client.py: error: ...`), no traceback, and never train on garbage. A valid
exchange (the control case) shows that the fake server speaks the protocol correctly, so
each refusal is the client's answer to the one thing that is wrong.
"""

from __future__ import annotations

import json
import math
import re
import socket
import struct
import threading
from typing import Callable

import pytest

from support import InProcessClient

from socket_methods import (
    MAX_CONTROL_BYTES,
    MESSAGES,
    PROTOCOL_VERSION,
    decode_message,
    encode_bitmap,
    encode_message,
    frame_header,
)


CLIENT_ID = 1
IO_TIMEOUT_S = 60.0  # the client imports PyTorch and loads MNIST after <METADATA>: seconds on a busy machine
CLIENT_EXIT_S = 120.0


def frame(payload: bytes) -> bytes:
    return frame_header(len(payload)) + payload


HALF_OF_MNIST = encode_bitmap(range(0, 60000, 2), 60000)
MNIST_TASK = {"kind": "image", "classes": [str(i) for i in range(10)], "channels": 1, "size": 28, "mean": [0.1307],
              "std": [0.3081], "max_tokens": 30, "buckets": 32768, "positive": None}


def metadata(**changes) -> dict:
    fields = dict(client_id=CLIENT_ID, num_clients=2, dataset="mnist", partition="iid", alpha=0.5, seed=0,
                  model="logreg", num_rounds=1, round_timeout_s=30.0, heartbeat_s=10.0, next_round=1,
                  train_size=60000, partition_bitmap=HALF_OF_MNIST, required_features=[], task=MNIST_TASK,
                  federated_evaluation=False, secure_aggregation=False, identities=False, dp_mode="none",
                  dp_noise_multiplier=0.0,
                  compression={"kind": "none", "topk_fraction": 0.01, "broadcast": "none"})
    assert {name for name, spec in MESSAGES["<METADATA>"].items() if not spec.optional} <= set(fields)
    fields.update(changes)
    return fields


def metadata_frame(**changes) -> bytes:
    return encode_message("<METADATA>", **metadata(**changes))


def logreg_weights() -> tuple[dict, bytes]:
    """The layout and bytes of the model the client builds from metadata(): logreg, seed 0."""
    import client_helper
    import neural_net_helper as nnh
    from socket_methods import encode_weights

    model = nnh.build_model("logreg", client_helper.DATASETS["mnist"], seed=0)
    layout, blob = encode_weights(nnh.get_weights(model))
    return layout, bytes(blob)


def model_frames(layout: dict, blob: bytes, number: int = 1, **settings) -> bytes:
    return encode_message("<MODEL>", round=number, local_epochs=1, batch_size=32, lr=0.05, proximal_mu=0.0,
                          weights=layout, **settings) + frame(blob)


def recv_exact(sock: socket.socket, nbytes: int) -> bytes | None:
    data = bytearray()
    while len(data) < nbytes:
        try:
            chunk = sock.recv(nbytes - len(data))
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def recv_frame(sock: socket.socket, limit: int = 64 << 20) -> bytes | None:
    header = recv_exact(sock, 8)
    if header is None:
        return None
    (length,) = struct.unpack(">Q", header)
    assert length <= limit, f"the client sent a frame of {length} bytes"
    return recv_exact(sock, length) if length else b""


class FakeServer:
    """Accepts one client, reads its <HELLO>, runs `script` on the connection, then records
    whatever the client still sends until it closes (unless the script closed first)."""

    def __init__(self, script: Callable[["FakeServer", socket.socket], None]):
        self.script = script
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(IO_TIMEOUT_S)
        self.port = self.listener.getsockname()[1]
        self.received: list[dict] = []  # control messages from the client, in order
        self.closed_by_us = False
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def message(self, sock: socket.socket) -> dict | None:
        payload = recv_frame(sock)
        if payload is None:
            return None
        message = decode_message(payload)
        self.received.append(message)
        return message

    def _serve(self) -> None:
        try:
            sock, _ = self.listener.accept()
            with sock:
                sock.settimeout(IO_TIMEOUT_S)
                hello = self.message(sock)
                assert hello is not None and hello["header"] == "<HELLO>", hello
                assert hello["client_id"] == CLIENT_ID
                self.script(self, sock)
                if not self.closed_by_us:
                    while self.message(sock) is not None:
                        pass
        except BaseException as exc:  # reported by finish(), in the test's thread
            self.failure = exc
        finally:
            self.listener.close()

    def finish(self) -> None:
        self.thread.join(timeout=IO_TIMEOUT_S + 10)
        assert not self.thread.is_alive(), "the fake server is still waiting for the client"
        if self.failure is not None:
            raise self.failure

    def headers(self) -> list[str]:
        return [m["header"] for m in self.received]


def send(*chunks: bytes, close: bool = False) -> Callable[[FakeServer, socket.socket], None]:
    """A script: send these bytes, then optionally close at once."""

    def script(server: FakeServer, sock: socket.socket) -> None:
        sock.sendall(b"".join(chunks))
        if close:
            server.closed_by_us = True
            sock.shutdown(socket.SHUT_RDWR)

    return script


def assert_one_line_error(proc, status: int, pattern: str) -> str:
    """Exit `status`, exactly one `fl_client.py: error:` line matching `pattern`, nothing else but log lines."""
    code = proc.finish(timeout=CLIENT_EXIT_S)
    assert code == status, f"exit {code}, not {status}:\n{proc.output}"
    errors = [line for line in proc.lines if line.startswith("fl_client.py: error: ")]
    assert len(errors) == 1, proc.output
    assert re.search(pattern, errors[0]), f"{errors[0]!r} does not match {pattern!r}"
    assert "Traceback" not in proc.output, proc.output
    others = [line for line in proc.lines if line not in errors]
    assert all(re.match(rf"\d\d:\d\d:\d\d \[client {CLIENT_ID}\] ", line) for line in others), proc.output
    assert not re.search(r"round \d+: trained", proc.output), "the client trained on garbage"
    return errors[0]


def run_against(script, *args: str) -> tuple[FakeServer, InProcessClient]:
    server = FakeServer(script)
    return server, client_of(server, "--connect-timeout", "10", *args)


def client_of(server: FakeServer, *args: str) -> InProcessClient:
    """fl_client.py's main in a thread of this process, against the fake server's real socket."""
    return InProcessClient(["--client-id", str(CLIENT_ID), "--server-port", str(server.port), "--quiet", *args])


# --------------------------------------------------------------------------- the control case


@pytest.mark.parametrize("changes, settings", [({}, {}), (dict(num_clients=10**6, partition="dirichlet", alpha=0.01), {}),
                                               (dict(required_features=["augment"]), dict(augment="affine"))],
                         ids=["two clients", "a million clients", "augmented"])
def test_a_valid_exchange_with_the_fake_server_trains_and_finishes(changes, settings):
    """The control case. With a million clients announced, the client's work is the same: the server
    says which examples are its own, so nothing the client computes grows with what is announced.
    An augmented round is trained the same way (the client knows the feature)."""
    layout, blob = logreg_weights()

    def script(server: FakeServer, sock: socket.socket) -> None:
        sock.sendall(metadata_frame(**changes))
        ready = server.message(sock)  # the client loaded its data and warmed up
        assert ready is not None and ready["header"] == "<READY>" and ready["num_examples"] == 27000, ready
        sock.sendall(model_frames(layout, blob, **settings))
        update = server.message(sock)
        assert update is not None and update["header"] == "<UPDATE>", update
        assert update["round"] == 1 and update["client_id"] == CLIENT_ID and update["weights"] == layout
        weights = recv_frame(sock)
        assert weights is not None and len(weights) == layout["nbytes"]
        sock.sendall(encode_message("<SUCCESS>", round=1, accepted=True, message="update accepted")
                     + encode_message("<FINISHED>", completed=True, rounds_completed=1, message="training finished"))

    server, client = run_against(script)
    assert client.finish(timeout=CLIENT_EXIT_S) == 0, client.output
    server.finish()
    client.wait_for(r"round 1: trained on \d+ examples")
    client.wait_for(r"server: training finished")
    assert "Traceback" not in client.output


def test_waiting_notes_that_arrived_while_the_client_was_busy_are_not_shown():
    """A <WAITING> already in the socket when the client comes back from loading its data or training
    describes the past ("0 of 2 ready" once this client is ready, "0 of 2 updates in" as it sends its
    own): the client shows only what is still true."""
    layout, blob = logreg_weights()
    waiting = lambda text: encode_message("<WAITING>", message=text)  # noqa: E731

    def script(server: FakeServer, sock: socket.socket) -> None:
        sock.sendall(metadata_frame() + waiting("waiting for clients: 0 of 2 ready"))  # before it loads its data
        assert server.message(sock)["header"] == "<READY>"
        sock.sendall(model_frames(layout, blob) + waiting("round 1: 0 of 2 updates in"))  # before it trains
        assert server.message(sock)["header"] == "<UPDATE>"
        recv_frame(sock)
        sock.sendall(encode_message("<SUCCESS>", round=1, accepted=True, message="update accepted")
                     + encode_message("<FINISHED>", completed=True, rounds_completed=1, message="training finished"))

    server = FakeServer(script)
    client = InProcessClient(["--client-id", str(CLIENT_ID), "--server-port", str(server.port), "--connect-timeout",
                              "10"])  # not --quiet: the notes are shown
    assert client.finish(timeout=CLIENT_EXIT_S) == 0, client.output
    server.finish()
    assert "0 of 2 ready" not in client.output and "0 of 2 updates in" not in client.output, client.output
    client.wait_for(r"server: training finished")


def test_a_fresh_waiting_note_is_shown_once(capsys):
    from fedsock.client import Status
    from fedsock.config import ClientConfig

    status = Status(ClientConfig(client_id=1))
    note = {"header": "<WAITING>", "message": "round 2: 1 of 2 updates in"}
    assert not status.finished(note) and not status.finished(note)
    assert not status.finished({**note, "message": "round 2: 0 of 2 updates in"}, stale=True)
    shown = capsys.readouterr().out
    assert shown.count("server: round 2: 1 of 2 updates in") == 1 and "0 of 2" not in shown


@pytest.mark.parametrize("flags, sends_counts", [([], True), (["--require-secure-aggregation"], False)],
                         ids=["no policy", "a policy"])
def test_label_counts_go_only_from_a_client_whose_policy_asks_for_nothing(flags, sends_counts):
    """<READY>'s label_counts say something of the client's data: a client that states any privacy
    policy keeps them to itself, whatever the server asks."""
    seen = []

    def script(server: FakeServer, sock: socket.socket) -> None:
        sock.sendall(metadata_frame(secure_aggregation=True))
        seen.append(server.message(sock))
        sock.sendall(encode_message("<FINISHED>", completed=True, rounds_completed=0, message="done"))

    server, client = run_against(script, *flags)
    assert client.finish(timeout=CLIENT_EXIT_S) == 0, client.output
    server.finish()
    ready = seen[0]
    assert ready["header"] == "<READY>" and ("label_counts" in ready) == sends_counts, ready
    if sends_counts:
        assert sum(ready["label_counts"]) == ready["num_examples"]


# --------------------------------------------------------------------------- before <METADATA>

HTTP_RESPONSE = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"

BEFORE_METADATA = [
    ("invalid JSON", frame(b'{"header": "<METADATA>", '), 1, r"bad data from the server at 127\.0\.0\.1:\d+: message is not valid JSON"),
    ("invalid UTF-8", frame(b'{"header": "<METADATA\xff>"}'), 1, r"message is not valid UTF-8"),
    ("JSON not an object", frame(b'["<METADATA>"]'), 1, r"message is a JSON list, not an object"),
    ("oversize length prefix", frame_header(MAX_CONTROL_BYTES + 1), 1,
     rf"frame of {MAX_CONTROL_BYTES + 1} bytes is over the {MAX_CONTROL_BYTES}-byte limit"),
    ("length prefix of 2**64-1", frame_header(2**64 - 1), 1, r"frame of 18446744073709551615 bytes is over"),
    ("an HTTP server", HTTP_RESPONSE, 1, r"frame of \d+ bytes is over"),
    ("an <ERROR>", encode_message("<ERROR>", message="client id 1 is already connected to this run"), 3,
     r"the server says: client id 1 is already connected to this run"),
    ("unknown header", frame(json.dumps({"header": "<WELCOME>"}).encode()), 1, r"unknown header '<WELCOME>'"),
    ("<MODEL> instead of <METADATA>", encode_message("<MODEL>", round=1, local_epochs=1, batch_size=32, lr=0.1,
                                                     proximal_mu=0.0, weights={}), 1,
     r"<MODEL> is not expected when the client is in state greeted"),
    ("<HELLO> echoed back", encode_message("<HELLO>", protocol_version=PROTOCOL_VERSION, client_id=1, features=[]), 1,
     r"<HELLO> is not expected when the client is in state greeted"),
    ("<METADATA> lacking a field", frame(json.dumps({"header": "<METADATA>", **{k: v for k, v in metadata().items() if k != "seed"}}).encode()),
     1, r"<METADATA> lacks the field 'seed'"),
    ("<METADATA> with a wrong-typed field", frame(json.dumps({"header": "<METADATA>", **metadata(), "model": None}).encode()), 1,
     r"<METADATA> field 'model' must be a string"),
    ("<METADATA> with NaN", frame(json.dumps({"header": "<METADATA>", **metadata(), "alpha": math.nan}).encode()), 1,
     r"NaN is not allowed"),
    ("<METADATA> for another client", metadata_frame(client_id=2), 1, r"the server welcomed client 2, not 1"),
    ("a truncated <METADATA>, then close", metadata_frame()[:40], 1, r"connection closed after 32 of \d+ frame payload bytes"),
]
CLOSE_AFTER = {"a truncated <METADATA>, then close"}  # the fake server closes right after sending


@pytest.mark.parametrize("case, sent, status, error", BEFORE_METADATA, ids=[c[0] for c in BEFORE_METADATA])
def test_bad_first_answer(case, sent, status, error):
    server, client = run_against(send(sent, close=case in CLOSE_AFTER))
    assert_one_line_error(client, status, error)
    server.finish()
    assert server.headers() == ["<HELLO>"], "the client sent something after a bad first answer"


def test_an_error_after_the_welcome_ends_the_client_with_exit_3():
    """An <ERROR> is the server's last word at any point: after the welcome as before it, the client exits 3
    (refused) with the server's sentence, and answers nothing."""

    def script(server: FakeServer, sock: socket.socket) -> None:
        sock.sendall(metadata_frame())
        ready = server.message(sock)
        assert ready is not None and ready["header"] == "<READY>", ready
        sock.sendall(encode_message("<ERROR>", message="<UPDATE> of round 3, but this client was sent round 2"))

    server, client = run_against(script)
    assert_one_line_error(client, 3, r"^fl_client\.py: error: the server says: <UPDATE> of round 3, but this client "
                                     r"was sent round 2$")
    server.finish()
    assert server.headers() == ["<HELLO>", "<READY>"]


def test_server_closes_after_hello():
    """A connection closed before the welcome may be a busy server's: the client tries again until
    --connect-timeout, then says what happened."""
    server = FakeServer(send(close=True))
    client = client_of(server, "--connect-timeout", "2")
    assert_one_line_error(client, 1, r"the server at 127\.0\.0\.1:\d+ closed the connection before welcoming this "
                                     r"client, every time \(tried for 2 s")
    server.finish()


# --------------------------------------------------------------------------- after <METADATA>


def poke(blob: bytes, offset: int, value: float) -> bytes:
    data = bytearray(blob)
    struct.pack_into("<f", data, offset, value)
    return bytes(data)


def transposed(layout: dict) -> dict:
    layout = json.loads(json.dumps(layout))
    layout["tensors"][0]["shape"] = layout["tensors"][0]["shape"][::-1]
    return layout


def model_cases():
    layout, blob = logreg_weights()
    bias = layout["tensors"][1]["offset"]
    return [
        ("layout of another model", model_frames(transposed(layout), blob), False,
         r"tensor 'linear.weight': shape \[784, 10\], the model has \[10, 784\]"),
        ("weights with NaN", model_frames(layout, poke(blob, 0, math.nan)), False, r"tensor 'linear.weight' holds NaN or Inf"),
        ("weights with Inf", model_frames(layout, poke(blob, bias, math.inf)), False, r"tensor 'linear.bias' holds NaN or Inf"),
        ("weights frame of the wrong size", model_frames(layout, blob)[:-len(blob) - 8] + frame(blob[:-64]), False,
         rf"weights frame has {len(blob) - 64} bytes, its layout says {len(blob)}"),
        ("truncated weights, then close", model_frames(layout, blob)[:-1000], True,
         rf"connection closed after {len(blob) - 1000} of {len(blob)} frame payload bytes"),
        ("settings out of range", encode_message("<MODEL>", round=1, local_epochs=0, batch_size=32, lr=0.05,
                                                 proximal_mu=0.0, weights=layout)
         + frame(blob), False, r"<MODEL> field 'local_epochs' is 0, outside 1\.\.1000"),
        ("an unknown augmentation", model_frames(layout, blob, augment="mixup"), False,
         r"<MODEL> asks for augmentation 'mixup', which this client does not know for image examples"),
        ("<HELLO> instead of <MODEL>", encode_message("<HELLO>", protocol_version=PROTOCOL_VERSION, client_id=1, features=[]), False,
         r"<HELLO> is not expected when the client is in state idle"),
        ("oversize frame", frame_header(2**40), False, r"frame of 1099511627776 bytes is over the 1048576-byte limit"),
        ("a 60 MB <WAITING>", frame_header(60 << 20), False,
         r"frame of 62914560 bytes is over the 1048576-byte limit"),
    ]


MODEL_CASES = model_cases()


@pytest.mark.parametrize("sent, close, error", [c[1:] for c in MODEL_CASES], ids=[c[0] for c in MODEL_CASES])
def test_bad_model_after_metadata(sent, close, error):
    server, client = run_against(send(metadata_frame(), sent, close=close))
    assert_one_line_error(client, 1, error)
    client.wait_for(r"joined the server")
    server.finish()
    assert "<UPDATE>" not in server.headers(), "the client answered garbage with an update"


@pytest.mark.parametrize("settings, what", [(dict(proximal_mu=0.01), "FedProx proximal term"),
                                            (dict(augment="affine"), "augmentation"),
                                            (dict(dp_clip=1.0, dp_noise_std=0.1), "client-side update noise")],
                         ids=["fedprox", "augmentation", "local DP"])
def test_a_dp_sgd_client_refuses_a_setting_it_cannot_train_with(settings, what):
    """A client must refuse a setting it cannot apply, never train without it."""
    layout, blob = logreg_weights()
    frames = encode_message("<MODEL>", **{"round": 1, "local_epochs": 1, "batch_size": 32, "lr": 0.05,
                                          "proximal_mu": 0.0, "weights": layout, **settings}) + frame(blob)
    server, client = run_against(send(metadata_frame(), frames), "--dp-sgd")
    assert_one_line_error(client, 1, rf"this client trains with --dp-sgd, which it cannot combine with the run's {what}")
    server.finish()
    assert server.headers()[-1] == "<ERROR>"


def test_a_text_client_refuses_augmentation(tmp_path):
    """Augmentation is for images: a <MODEL> that asks a text client for it is refused, not half-applied."""
    data = tmp_path / "mine.tsv"
    data.write_text("".join(f"{'spam' if i % 4 == 0 else 'ham'}\tmessage number {i}\n" for i in range(40)))
    task = {**MNIST_TASK, "kind": "text", "classes": ["ham", "spam"], "positive": "spam"}
    own = dict(dataset="", partition="own", train_size=0, partition_bitmap=None, model="textcnn", task=task)
    frames = encode_message("<MODEL>", round=1, local_epochs=1, batch_size=32, lr=0.05, proximal_mu=0.0,
                            augment="affine", weights={})
    server, client = run_against(send(metadata_frame(**own), frames), "--data", str(data))
    assert_one_line_error(client, 1, r"<MODEL> asks for augmentation 'affine', which this client does not know for "
                                     r"text examples")
    server.finish()
    assert server.headers()[-1] == "<ERROR>"


def test_a_dp_sgd_client_refuses_an_augmented_run_before_it_is_ready():
    """The run requires the feature augment: every round will ask for it, so the client says so at once."""
    server, client = run_against(send(metadata_frame(required_features=["augment"])), "--dp-sgd")
    assert_one_line_error(client, 2, r"this client trains with --dp-sgd, which it cannot combine with the run's "
                                     r"augmentation \(the server's --augment\)")
    server.finish()
    assert server.headers() == ["<HELLO>", "<ERROR>"]


EMPTY_PARTITION = encode_bitmap([], 60000)


@pytest.mark.parametrize("changes, error", [
    (dict(model="resnet"), r"the server asks for model 'resnet', unknown here"),
    (dict(dataset="imagenet"), r"the server asks for dataset 'imagenet'"),
    (dict(task={**MNIST_TASK, "kind": "video"}), r"the task's kind 'video' is not one of image, text"),
    (dict(model="textcnn"), r"the server asks for model 'textcnn' for a image task"),
    (dict(partition_bitmap=EMPTY_PARTITION), r"the server gave this client no training examples \(an empty partition\)"),
    (dict(train_size=59999, partition_bitmap=encode_bitmap([1], 59999)),
     r"the server's mnist has 59999 training examples, this client's copy has 60000"),
    (dict(partition_bitmap=HALF_OF_MNIST[:-8]), r"partition_bitmap has 7494 bytes; 60000 examples need 7500"),
    (dict(partition_bitmap="not base64!"), r"partition_bitmap is not base64"),
], ids=["unknown model", "unknown dataset", "a task of another kind", "a model for another task", "empty partition",
        "another dataset", "short bitmap", "not base64"])
def test_metadata_the_client_cannot_use(changes, error):
    server, client = run_against(send(metadata_frame(**changes)))
    assert_one_line_error(client, 1, error)
    server.finish()
    assert server.headers()[-1] == "<ERROR>" and "client setup failed" in server.received[-1]["message"], (
        "the client did not tell the server why it leaves")


@pytest.mark.parametrize("changes, error", [
    (dict(seed=-1), r"seed"),
    (dict(heartbeat_s=-10.0), r"heartbeat"),
    (dict(heartbeat_s=1e300), r"heartbeat"),
    (dict(round_timeout_s=-1.0), r"round.timeout"),
    (dict(heartbeat_s=86400.0), r"heartbeat_s' is 86400.0, outside > 0 and <= 600"),
    (dict(num_clients=0), r"<METADATA> field 'num_clients' is 0, outside 1\.\.1000000"),
    (dict(alpha=-1.0), r"<METADATA> field 'alpha' is -1.0, outside > 0"),
], ids=["negative seed", "negative heartbeat", "absurd heartbeat", "negative round timeout", "a day's heartbeat",
        "no clients", "negative alpha"])
def test_metadata_numbers_out_of_range(changes, error):
    """Numbers of the right JSON type but out of range are refused in one line that names
    them, before any training, rather than crashing the client with a traceback."""
    layout, blob = logreg_weights()
    server, client = run_against(send(metadata_frame(**changes), model_frames(layout, blob)))
    assert_one_line_error(client, 1, error)
    server.finish()
    assert server.headers() == ["<HELLO>"], "the client sent something after a bad first answer"
