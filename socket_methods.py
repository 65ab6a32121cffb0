"""fedsock's wire protocol, sans-IO: messages to bytes and bytes to messages.

Every message travels as a frame: an 8-byte big-endian unsigned length (`>Q`),
then that many payload bytes. A control message is a UTF-8 JSON object with a
"header". A message that carries weights (<MODEL>, <UPDATE>) has a "weights"
layout and is followed by exactly one more frame: the raw little-endian tensor
bytes that the layout describes. Nothing received is ever unpickled.

No socket is touched here. The server (asyncio) and the client (a blocking
socket) both drive `FrameReader` with their own IO, so the protocol is tested
without a network and the same code serves threads and event loops alike.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

from fedsock.console import FedsockError

if TYPE_CHECKING:  # torch is imported lazily: `fl_client.py --help` must not wait for it
    import torch

PROTOCOL_VERSION = 3
FRAME_HEADER = struct.Struct(">Q")
# A JSON message is small: the largest is a <MODEL> whose layout lists every
# tensor name and shape. 1 MiB fits thousands of tensors.
MAX_CONTROL_BYTES = 1 << 20
# Before a peer has authenticated it may send only a few small messages, so a
# stranger cannot make the server allocate more than this per connection.
PRE_AUTH_CONTROL_BYTES = 64 << 10
# Tensor offsets in a weights frame are multiples of this, so every tensor can
# be viewed in place (torch.frombuffer) with its natural alignment.
ALIGNMENT = 64

@dataclass(frozen=True)
class Field:
    """One field of a control message: its JSON type and the values a receiver accepts.

    `kind` is int, float (an int is accepted too), str, bool, dict or list. Numbers must
    lie in low..high (`low_open`: low itself excluded); strings and lists have at most
    `max_len` characters or items, list items are of type `items`. `nullable` fields may
    be JSON null. An object's `keys` are checked the same way, each required unless optional;
    keys not listed are ignored, as a message's unknown fields are. Checks that depend on the
    run (a client id within 1..N, a round that was sent, an example count within what the
    client holds) are the receiver's, after these.
    """

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    max_len: int | None = None
    items: type | None = None
    nullable: bool = False
    optional: bool = False  # may be absent (present only when the run uses the feature)
    keys: Mapping[str, "Field"] | None = None  # an object's known keys
    meaning: str = ""

    def problem(self, value: Any) -> str | None:
        """Why `value` is not acceptable here, or None."""
        if value is None and self.nullable:
            return None
        if not _has_type(value, self.kind):
            return f"must be {_type_name(self.kind)}"
        if self.kind in (int, float):
            if self.low is not None and (value <= self.low if self.low_open else value < self.low):
                return f"is {value!r}, outside {self.range_text()}"
            if self.high is not None and value > self.high:
                return f"is {value!r}, outside {self.range_text()}"
        if self.max_len is not None and self.kind in (str, list) and len(value) > self.max_len:
            return f"is longer than {self.max_len} {'characters' if self.kind is str else 'items'}"
        if self.items is not None and not all(_has_type(item, self.items) for item in value):
            return f"must hold only {_type_name(self.items).split(' ', 1)[1]}s"
        for key, spec in (self.keys or {}).items():
            if key not in value:
                if spec.optional:
                    continue
                return f"lacks the key '{key}'"
            problem = spec.problem(value[key])
            if problem:
                return f"key '{key}' {problem}"
        return None

    def range_text(self) -> str:
        """The accepted values in words, as the protocol document's table gives them."""
        if self.kind in (int, float) and (self.low is not None or self.high is not None):
            low = "" if self.low is None else _number_text(self.low)
            high = "" if self.high is None else _number_text(self.high)
            if self.low_open:
                return f"> {low}" + (f" and <= {high}" if high else "")
            return f"{low}..{high}" if high else f">= {low}"
        if self.max_len is not None:
            return f"<= {self.max_len} {'chars' if self.kind is str else 'items'}"
        return ""


def _number_text(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:g}"


ID = Field(int, meaning="a client id; the server admits 1..num_clients")
ROUND = Field(int, 1, 10**6, meaning="a round number, from 1")
SECONDS = Field(float, 0, meaning="seconds, >= 0")
TEXT = Field(str, max_len=4096, meaning="a sentence for people")

# <HELLO>'s `policy`, as fedsock.policy.Policy.to_json writes it. The server only shows it, but it is
# a peer's bytes all the same: a key missing or of the wrong type is a bad <HELLO>, refused as any
# other; a key not listed is dropped (fedsock/lobby.py keeps only these), as a message's unknown
# fields are ignored, so that a newer client may state more without being refused for it. Counts
# stop at 10**6, the most clients a run may have (<METADATA>'s num_clients).
POLICY_KEYS = {
    "identity": Field(bool, meaning="secure aggregation with enrolled identities"),
    "secure_aggregation": Field(bool, meaning="the server sees only the sum of a round's updates"),
    "min_round_clients": Field(int, 1, 10**6, nullable=True, meaning="... of at least this many clients"),
    "min_threshold": Field(int, 1, 10**6, nullable=True, meaning="... with a threshold of at least this"),
    "dp": Field(bool, meaning="DP noise that the client adds itself"),
    "min_noise_multiplier": Field(float, 0, low_open=True, nullable=True, meaning="... of at least this multiplier"),
    "max_epsilon": Field(float, 0, low_open=True, nullable=True, meaning="... until its own epsilon would pass this"),
    "delta": Field(float, 0, 1, low_open=True, nullable=True, meaning="the delta of max_epsilon"),
}

# Every message's header, written once: the code names a message by its constant. Which one may
# come when is fedsock/order.py's business; the fields each one carries are MESSAGES', below.
HELLO = "<HELLO>"
CHALLENGE = "<CHALLENGE>"
AUTH = "<AUTH>"
METADATA = "<METADATA>"
READY = "<READY>"
MODEL = "<MODEL>"
UPDATE = "<UPDATE>"
EVALUATE = "<EVALUATE>"
EVALUATION = "<EVALUATION>"
SECAGG_SETUP = "<SECAGG_SETUP>"
SECAGG_KEYS = "<SECAGG_KEYS>"
SECAGG_PEERS = "<SECAGG_PEERS>"
SECAGG_SHARES = "<SECAGG_SHARES>"
SECAGG_ROUTED = "<SECAGG_ROUTED>"
SECAGG_CHECK = "<SECAGG_CHECK>"
SECAGG_SIGNED = "<SECAGG_SIGNED>"
SECAGG_UNMASK = "<SECAGG_UNMASK>"
SECAGG_REVEAL = "<SECAGG_REVEAL>"
SUCCESS = "<SUCCESS>"
WAITING = "<WAITING>"
PROGRESS = "<PROGRESS>"
FINISHED = "<FINISHED>"
SESSION_END = "<SESSION_END>"
ERROR = "<ERROR>"

# Every message, its required fields and what a receiver accepts in them. Fields not
# listed are ignored, so that newer peers can add information. The protocol document's
# table is checked against this (tests/test_protocol_doc.py).
MESSAGES: dict[str, dict[str, Field]] = {
    HELLO: {
        "protocol_version": Field(int, meaning=f"{PROTOCOL_VERSION}; any other is refused"),
        "client_id": ID,
        "features": Field(list, max_len=64, items=str, meaning="the optional features this client supports"),
        "policy": Field(dict, optional=True, keys=POLICY_KEYS,
                        meaning="the client's privacy policy, for the server to show (see Privacy policy)"),
    },
    CHALLENGE: {"nonce": Field(str, max_len=64, meaning="32 random bytes as 64 lower-case hex digits")},
    AUTH: {"mac": Field(str, max_len=64, meaning="HMAC-SHA256 as 64 hex digits (either case)")},
    METADATA: {
        "client_id": ID,
        "num_clients": Field(int, 1, 10**6, meaning="N"),
        "dataset": Field(str, max_len=64, meaning="the dataset's name; empty when the clients bring their own data"),
        "partition": Field(str, max_len=64, meaning="iid, dirichlet or shards: how the server split the data; own"),
        "alpha": Field(float, 0, 10**6, low_open=True, meaning="Dirichlet concentration (informative)"),
        "seed": Field(int, 0, 2**32 - 1, meaning="seeds the client's shuffling and local test split"),
        "model": Field(str, max_len=64, meaning="the model's name"),
        "num_rounds": Field(int, 1, 10**6, meaning="rounds in this run"),
        "round_timeout_s": Field(float, 0, 86400, low_open=True, meaning="how long a round waits for updates"),
        "heartbeat_s": Field(float, 0, 600, low_open=True, meaning="the server speaks at least this often"),
        "next_round": Field(int, 1, 10**6 + 1, meaning="the first round this client can take part in"),
        "train_size": Field(int, 0, 10**9, meaning="examples in the dataset's training split (0: own data)"),
        "partition_bitmap": Field(str, nullable=True, meaning="this client's training examples, base64 bitmap; "
                                                                 "null: own data"),
        "task": Field(dict, meaning="what an example is, and the class names (see Tasks)"),
        "federated_evaluation": Field(bool, meaning="evaluate each received model on the local test split and "
                                                    "report it in the <UPDATE>"),
        "required_features": Field(list, max_len=64, items=str, meaning="features a client must support"),
        "compression": Field(dict, meaning="{kind, topk_fraction, broadcast}: how updates and the model are "
                                           "encoded (see Compressed updates)"),
        "secure_aggregation": Field(bool, meaning="each round begins with <SECAGG_SETUP> (see Secure aggregation)"),
        "identities": Field(bool, meaning="secure aggregation's keys are signed by enrolled identities (--federation)"),
        "dp_mode": Field(str, max_len=16, meaning="none, central, local or distributed: where the DP noise is added"),
        "dp_noise_multiplier": Field(float, 0, 10**6, meaning="z: the noise on each round's sum is z times the clip "
                                                              "(0 without DP)"),
        "progress_every_s": Field(float, 0, 3600, low_open=True, optional=True,
                                  meaning="the client may report its training with <PROGRESS>, at most this "
                                          "often; absent: it must not"),
    },
    READY: {
        "num_examples": Field(int, 1, 10**9, meaning="training examples this client holds"),
        "test_examples": Field(int, 0, 10**9, meaning="examples in its local test split"),
        "label_counts": Field(list, max_len=1000, items=int, optional=True,
                              meaning="its training examples per class, counts only (the task's classes in "
                                      "order; they add up to num_examples)"),
    },
    MODEL: {
        "round": ROUND,
        "local_epochs": Field(int, 1, 1000, meaning="epochs to train"),
        "batch_size": Field(int, 1, 10**7, meaning="minibatch size"),
        "lr": Field(float, 0, 1000, low_open=True, meaning="SGD learning rate, for this round"),
        "proximal_mu": Field(float, 0, 10**6, meaning="FedProx: add (mu/2)·‖w − w_global‖² to the loss; 0 = off"),
        "dp_clip": Field(float, 0, 10**6, low_open=True, optional=True,
                         meaning="feature dp-local: clip the update's delta to this L2 norm"),
        "dp_noise_std": Field(float, 0, 10**6, optional=True,
                              meaning="feature dp-local: then add Gaussian noise of this std to every coordinate"),
        "augment": Field(str, max_len=64, optional=True,
                         meaning='feature augment: "affine" (see Augmentation); absent: train on the images as they are'),
        "weights": Field(dict, meaning="the layout of the weights frame that follows (compressed with the "
                                       "broadcast's encoding)"),
        "broadcast_params": Field(dict, optional=True, meaning="broadcast int8: [scale, lo] per float tensor"),
    },
    UPDATE: {
        "round": ROUND,
        "client_id": ID,
        "num_examples": Field(int, 1, 10**9, meaning="examples trained on; at most the <READY> count"),
        "train_loss": Field(float, 0, meaning="mean loss over every example of every local epoch"),
        "local_test_accuracy": Field(float, 0, 1, meaning="accuracy on the client's held-out split, 0..1"),
        "fit_seconds": SECONDS,
        "dp_sgd_epsilon": Field(float, 0, optional=True,
                                meaning="the client's own example-level epsilon so far, if it trains with DP-SGD"),
        "eval_round": Field(int, 0, 10**6, optional=True,
                            meaning="federated evaluation: the round whose model was evaluated (this one - 1)"),
        "eval_loss_sum": Field(float, 0, optional=True, meaning="its summed cross-entropy on the local test split"),
        "eval_confusion": Field(list, max_len=1000, items=list, optional=True,
                                meaning="its confusion matrix there: row = true class, column = predicted"),
        "compression_params": Field(dict, optional=True, meaning="compression int8: [scale, lo] per float tensor"),
        "weights": Field(dict, meaning="the layout: exactly the model's, or its compressed one (see Compressed "
                                       "updates)"),
    },
    EVALUATE: {
        "round": Field(int, 0, 10**6, meaning="the round whose model this is"),
        "weights": Field(dict, meaning="the layout of the weights frame that follows (as in <MODEL>)"),
        "broadcast_params": Field(dict, optional=True, meaning="broadcast int8: [scale, lo] per float tensor"),
    },
    EVALUATION: {
        "round": Field(int, 0, 10**6, meaning="the round of the model evaluated"),
        "eval_loss_sum": Field(float, 0, meaning="summed cross-entropy on the local test split"),
        "eval_confusion": Field(list, max_len=1000, items=list, meaning="confusion matrix: row = true, column = predicted"),
    },
    # Secure aggregation, in this order each round (fedsock/order.py's SECURE_STAGES).
    SECAGG_SETUP: {
        "round": ROUND,
        "participants": Field(list, max_len=10**5, items=int, meaning="the ids of the round's clients, n of them"),
        "threshold": Field(int, 2, 10**5, meaning="t: shares needed to rebuild a secret; > n/2"),
        "bits": Field(int, 1, 31, meaning="b: fractional bits of each quantised coordinate"),
        "clip": Field(float, 0, 10**9, low_open=True, meaning="C: each coordinate of a delta is clipped to [-C, C]"),
        "weight_bound": Field(int, 1, 2**32 - 1, meaning="W: a client's weight is its examples / W (1: unweighted)"),
        "weighted": Field(bool, meaning="false (with DP): every client's weight and count are 1"),
        "length": Field(int, 1, 2**31, meaning="m: the model's coordinates; the vector has m + 1"),
        "identities": Field(bool, meaning="true (the server's --federation): keys are signed by enrolled identities, "
                                          "and the round has a consistency check"),
    },
    SECAGG_KEYS: {
        "round": ROUND,
        "c_public": Field(str, max_len=64, meaning="X25519 public key for the share encryption, base64 of 32 bytes"),
        "s_public": Field(str, max_len=64, meaning="X25519 public key for the pairwise masks, base64 of 32 bytes"),
        "seed_commitment": Field(str, max_len=64,
                                 meaning="SHA-256 commitment to the self-mask seed, base64 of 32 bytes"),
        "identity": Field(dict, optional=True, meaning="with identities: {identity_key, certificate, signature}, "
                                                       "base64 (see Identities)"),
    },
    SECAGG_PEERS: {"round": ROUND,
                   "keys": Field(dict, meaning='{"ID": [c_public, s_public]} of U1'),
                   "signed": Field(dict, optional=True, meaning='with identities: {"ID": {seed_commitment, '
                                                                'identity_key, certificate, signature}} of U1')},
    SECAGG_SHARES: {"round": ROUND, "shares": Field(dict, meaning='{"ID": ciphertext} for each other client of U1')},
    SECAGG_ROUTED: {"round": ROUND, "shares": Field(dict, meaning='{"ID": ciphertext} addressed to this client')},
    SECAGG_CHECK: {  # with identities only: the consistency check
        "round": ROUND,
        "survivors": Field(list, max_len=10**5, items=int, meaning="U3: the clients whose masked update arrived"),
        "dropped": Field(list, max_len=10**5, items=int, meaning="U2 minus U3: those that shared keys, then left"),
    },
    SECAGG_SIGNED: {"round": ROUND, "signature": Field(str, max_len=128, meaning="the client's identity signature "
                                                                                "of U3 and U2 minus U3, base64")},
    SECAGG_UNMASK: {
        "round": ROUND,
        "survivors": Field(list, max_len=10**5, items=int, meaning="U3: the clients whose masked update arrived"),
        "dropped": Field(list, max_len=10**5, items=int, meaning="U2 minus U3: those that shared keys, then left"),
        "signatures": Field(dict, optional=True, meaning='with identities: {"ID": signature} of the survivors '
                                                         'that signed this U3 in <SECAGG_SIGNED>'),
    },
    SECAGG_REVEAL: {
        "round": ROUND,
        "seed_shares": Field(dict, meaning='{"ID": share} of each survivor\'s self-mask seed, base64 of 66 bytes'),
        "key_shares": Field(dict, meaning='{"ID": share} of each dropped client\'s mask key, base64 of 66 bytes'),
    },
    SUCCESS: {"round": ROUND, "accepted": Field(bool, meaning="false: the round had closed"), "message": TEXT},
    WAITING: {"message": TEXT},
    # Optional, and only to a server whose <METADATA> has progress_every_s (which also bounds how often):
    # how far the client's training of the round it was sent has come, for the server's dashboard.
    PROGRESS: {"round": ROUND, "done": Field(float, 0, 1, meaning="the share of the round's local training done, "
                                                                  "0..1")},
    FINISHED: {
        "completed": Field(bool, meaning="false: stopped or gave up"),
        "rounds_completed": Field(int, 0, 10**6, meaning="rounds aggregated in this run"),
        "message": TEXT,
    },
    SESSION_END: {  # feature sessions (the server's --stay): the client stays connected
        "session": Field(int, 1, 10**6, meaning="the session that ended (1, 2, ...)"),
        "rounds_completed": Field(int, 0, 10**6, meaning="rounds aggregated so far in this run"),
        "message": TEXT,
    },
    ERROR: {"message": TEXT},
}
# The same, as JSON types only.
MESSAGE_FIELDS: dict[str, dict[str, type]] = {h: {n: f.kind for n, f in fs.items()} for h, fs in MESSAGES.items()}

# Wire names of the tensor dtypes fedsock sends, with their sizes in bytes.
DTYPE_SIZES = {
    "float32": 4, "float64": 8, "float16": 2, "bfloat16": 2,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint32": 4, "uint8": 1, "bool": 1,
}


class ProtocolError(FedsockError):
    """A peer broke the protocol, or the connection ended unexpectedly."""


class ConnectionClosed(ProtocolError):
    """The peer closed the connection cleanly, between two frames."""


class TruncatedFrame(ProtocolError):
    """The connection ended in the middle of a frame."""


class FrameTooLarge(ProtocolError):
    """A length prefix above the receiver's limit; nothing was allocated for it."""


class BadMessage(ProtocolError):
    """A control message that is not valid JSON, lacks fields, or comes out of order."""


class BadWeights(ProtocolError):
    """A weights frame that does not match its layout, or holds NaN or Inf."""


# --------------------------------------------------------------------------- frames


def frame_header(payload_bytes: int) -> bytes:
    return FRAME_HEADER.pack(payload_bytes)


def _json(value: Any) -> str:
    """Compact JSON; NaN and Inf are refused, never sent."""
    return json.dumps(value, allow_nan=False, separators=(",", ":"))


def _framed(text: str) -> bytes:
    payload = text.encode()
    return frame_header(len(payload)) + payload


def encode_message(header: str, **fields: Any) -> bytes:
    """One framed JSON control message. NaN and Inf are refused, never sent."""
    return _framed(_json({"header": header, **fields}))


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not allowed")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _type_name(kind: type) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "an object",
            list: "a list"}[kind]


def _has_type(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


# One decoder for every message (json.loads with options would build a new one each call).
_JSON_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


def decode_message(payload: bytes | bytearray | memoryview) -> dict[str, Any]:
    """Parse and check one control message; raise BadMessage with the reason."""
    try:
        message = _JSON_DECODER.decode(bytes(payload).decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise BadMessage(f"message is not valid UTF-8 (byte {exc.start})") from exc
    except RecursionError as exc:
        raise BadMessage("message JSON is nested too deeply") from exc
    except ValueError as exc:  # json.JSONDecodeError is a ValueError, and so are the checks above
        raise BadMessage(f"message is not valid JSON: {exc}") from exc
    if not isinstance(message, dict):
        raise BadMessage(f"message is a JSON {type(message).__name__}, not an object")
    header = message.get("header")
    if not isinstance(header, str):
        raise BadMessage("message has no 'header' string")
    fields = MESSAGES.get(header)
    if fields is None:
        raise BadMessage(f"unknown header {header[:40]!r}")
    for name, spec in fields.items():
        if name not in message:
            if spec.optional:
                continue
            raise BadMessage(f"{header} lacks the field '{name}'")
        problem = spec.problem(message[name])
        if problem:
            raise BadMessage(f"{header} field '{name}' {problem}")
    return message


class FrameReader:
    """Says where the next received bytes go, one frame at a time.

    The IO side asks for a frame with `expect_message(limit)` or `expect_blob(buffer)`,
    then loops `n = read_into(reader.buffer()); reader.advance(n)` until `reader.done`
    (which may already be true: see below). `advance(0)` means end of file. The length
    prefix is checked against the limit before any memory is allocated, and a blob is
    read straight into the caller's preallocated buffer (no chunks joined).

    Reading ahead: a frame's 8-byte length is read into a small stage of STAGE_BYTES,
    in one read with whatever follows it. A small message is then usually complete in
    that same read, and the bytes of the frames after it wait in the stage for the next
    `expect_*`. Without it every frame costs two reads (length, then payload), each an
    event-loop turn on the server. At most STAGE_BYTES of a blob's first bytes are
    copied from the stage; the rest is read into the blob directly.
    """

    STAGE_BYTES = 8 << 10

    def __init__(self) -> None:
        self._header = bytearray(FRAME_HEADER.size)
        self._stage = bytearray(self.STAGE_BYTES)
        self._staged = memoryview(self._stage)[:0]  # received, not yet taken by a frame
        self._target: memoryview = memoryview(self._header)
        self._filled = 0
        self._in_header = True
        self._limit = 0
        self._blob: memoryview | None = None
        self._sink: Callable[[memoryview], None] | None = None  # windowed blobs: where each full window goes
        self._remaining = 0  # windowed blobs: payload bytes not yet handed to the sink
        self.payload: bytes | bytearray | memoryview | None = None
        self.done = True

    def expect_message(self, limit: int) -> None:
        """Next frame is a control message of at most `limit` bytes."""
        self._start(limit, None)

    def expect_blob(self, buffer: bytearray | memoryview) -> None:
        """Next frame is weights of exactly len(buffer) bytes, read into buffer."""
        view = memoryview(buffer).cast("B")
        self._start(len(view), view)

    def expect_blob_in_windows(self, window: bytearray | memoryview, total: int,
                               sink: Callable[[memoryview], None]) -> None:
        """Next frame is weights of exactly `total` bytes, read `window` bytes at a time: each time
        the window is full (and at the end), `sink(filled_part)` takes its bytes."""
        self._start(total, memoryview(window).cast("B"), sink)

    def _start(self, limit: int, blob: memoryview | None, sink: Callable[[memoryview], None] | None = None) -> None:
        self._limit, self._blob, self._sink, self._remaining = limit, blob, sink, limit
        self._target, self._filled, self._in_header = memoryview(self._header), 0, True
        self.payload, self.done = None, False
        self._take_staged()

    @property
    def staged(self) -> int:
        """Bytes already received for the frames after this one."""
        return len(self._staged)

    @property
    def progress(self) -> int:
        """Payload bytes of the frame being read received so far (0 while its length is read)."""
        if self._in_header:
            return 0
        return self._limit - self._remaining + self._filled if self._sink is not None else self._filled

    def buffer(self) -> memoryview:
        # While a frame is not done, the stage is empty (`_take_staged` took it all).
        return memoryview(self._stage) if self._in_header else self._target[self._filled:]

    def fill_from(self, read_into: Callable[[memoryview], int]) -> None:
        """Drive this reader with a blocking `read_into` (socket.recv_into, file.readinto) until the frame is in."""
        while not self.done:
            self.advance(read_into(self.buffer()))

    def advance(self, nbytes: int) -> None:
        if nbytes == 0:
            raise self._eof_error()
        if self._in_header:  # the bytes went to the stage
            self._staged = memoryview(self._stage)[:nbytes]
            self._take_staged()
            return
        self._filled += nbytes
        if self._filled == len(self._target):
            self._end_part()

    def _take_staged(self) -> None:
        """Move staged bytes into the current frame until it is done or the stage is empty."""
        while self._staged and not self.done:
            take = min(len(self._target) - self._filled, len(self._staged))
            self._target[self._filled : self._filled + take] = self._staged[:take]
            self._staged = self._staged[take:]
            self._filled += take
            if self._filled == len(self._target):
                self._end_part()

    def _end_part(self) -> None:
        if not self._in_header:
            if self._sink is None:
                self.done = True
                return
            self._sink(self._target[: self._filled])  # a window is full: hand it on, start it over
            self._remaining -= self._filled
            self._filled = 0
            self._target = self._blob[: min(len(self._blob), self._remaining)]
            self.done = self._remaining == 0
            return
        (length,) = FRAME_HEADER.unpack(self._header)
        expected = self._limit if self._sink is not None else len(self._blob) if self._blob is not None else None
        if expected is not None and length != expected:
            raise BadWeights(f"weights frame has {length} bytes, its layout says {expected}")
        if length > self._limit:
            raise FrameTooLarge(f"frame of {length} bytes is over the {self._limit}-byte limit")
        self._in_header, self._filled = False, 0
        if self._sink is not None:
            self._target = self._blob[: min(len(self._blob), length)]
            self.done = length == 0
            return
        if self._blob is None and length <= len(self._staged):  # a small message, all in the stage
            self.payload, self._staged = bytes(self._staged[:length]), self._staged[length:]
            self.done = True
            return
        self.payload = self._blob if self._blob is not None else bytearray(length)
        self._target = memoryview(self.payload)
        self.done = length == 0

    def _eof_error(self) -> ProtocolError:
        if self._in_header and self._filled == 0:
            return ConnectionClosed("connection closed")
        part = "header" if self._in_header else "payload"
        if self._sink is not None and not self._in_header:
            received = self._limit - self._remaining + self._filled
            return TruncatedFrame(f"connection closed after {received} of {self._limit} frame payload bytes")
        return TruncatedFrame(
            f"connection closed after {self._filled} of {len(self._target)} frame {part} bytes"
        )


# --------------------------------------------------------------------------- partitions


def encode_bitmap(indices: Any, total: int) -> str:
    """A client's share of a dataset as <METADATA>'s `partition_bitmap`: bit i set (least
    significant bit first within each byte) when example i of the training split is its
    own, ceil(total / 8) bytes, in base64."""
    import base64

    import numpy as np

    bits = np.zeros(total, dtype=bool)
    bits[np.asarray(indices, dtype=np.int64)] = True
    return base64.b64encode(np.packbits(bits, bitorder="little").tobytes()).decode("ascii")


def check_confusion(value: Any, num_classes: int) -> Any:
    """An evaluation's confusion matrix as numpy int64 (num_classes x num_classes); BadMessage otherwise."""
    import numpy as np

    if (not isinstance(value, list) or len(value) != num_classes
            or not all(isinstance(row, list) and len(row) == num_classes for row in value)
            or not all(type(v) is int and 0 <= v <= 10**12 for row in value for v in row)):
        raise BadMessage(f"eval_confusion must be {num_classes} lists of {num_classes} counts (0..10^12)")
    return np.asarray(value, dtype=np.int64)


def decode_bitmap(text: str, total: int) -> Any:
    """The sorted example indices in a `partition_bitmap` of a `total`-example split; BadMessage if malformed."""
    import base64
    import binascii

    import numpy as np

    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadMessage(f"partition_bitmap is not base64 ({exc})") from exc
    if len(raw) != (total + 7) // 8:
        raise BadMessage(f"partition_bitmap has {len(raw)} bytes; {total} examples need {(total + 7) // 8}")
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")
    if bits[total:].any():
        raise BadMessage("partition_bitmap has bits set past the end of the training set")
    return np.flatnonzero(bits[:total])


# --------------------------------------------------------------------------- weights


def _torch_dtype(name: str) -> "torch.dtype":
    import torch

    return getattr(torch, name)


def _wire_dtype(tensor: "torch.Tensor") -> str:
    name = str(tensor.dtype).removeprefix("torch.")
    if name not in DTYPE_SIZES:
        raise ValueError(f"dtype {name} cannot be sent; fedsock sends {', '.join(DTYPE_SIZES)}")
    return name


def weights_layout(tensors: Mapping[str, "torch.Tensor"]) -> dict[str, Any]:
    """The JSON description of a weights frame: names, dtypes, shapes, offsets."""
    entries, offset = [], 0
    for name, tensor in tensors.items():
        dtype = _wire_dtype(tensor)
        nbytes = tensor.numel() * DTYPE_SIZES[dtype]
        entries.append({"name": name, "dtype": dtype, "shape": list(tensor.shape), "offset": offset, "nbytes": nbytes})
        offset += -(-nbytes // ALIGNMENT) * ALIGNMENT
    return {"byte_order": "little", "nbytes": offset, "tensors": entries}


def encode_weights(
    tensors: Mapping[str, "torch.Tensor"], out: bytearray | None = None
) -> tuple[dict[str, Any], bytearray]:
    """Layout and bytes of a set of tensors: one copy, straight from the tensors (CPU or GPU).

    `out`, if given and of the right size, is reused instead of allocating a new buffer.
    """
    import torch

    layout = weights_layout(tensors)
    blob = out if out is not None and len(out) == layout["nbytes"] else bytearray(layout["nbytes"])
    for entry, tensor in zip(layout["tensors"], tensors.values()):
        if tensor.numel():
            target = torch.frombuffer(blob, dtype=tensor.dtype, count=tensor.numel(), offset=entry["offset"])
            target.copy_(tensor.detach().reshape(-1))
    return layout, blob


_ZEROS = bytes(ALIGNMENT)


class WeightsSender:
    """Frames one sender's model for sending, again and again, without copying its tensors.

    A client sends the same tensors every round (training and load_state_dict update
    them in place), so their layout, their views and the layout's JSON are worked out
    once, and again only if a tensor moved, changed shape or dtype, or was renamed. The
    views keep those tensors' memory alive, so an address seen again is the same tensor.
    The memo belongs to the sender: two senders in one process (threads, virtual
    clients) never see each other's frames.
    """

    def __init__(self) -> None:
        self._key: tuple = ()
        self._layout: dict[str, Any] = {}
        self._pieces: list[memoryview] = []
        self._layout_json = ""

    def buffers(
        self, tensors: Mapping[str, "torch.Tensor"], out: bytearray | None = None
    ) -> tuple[dict[str, Any], list[memoryview]]:
        """Layout and bytes of a set of tensors, ready to send without building a blob.

        Contiguous CPU tensors are sent from their own memory: zero copies, each
        followed by its zero padding. Anything else (a GPU tensor, a strided view) is
        copied once, by encode_weights, into `out` (reused when it has the right size).
        """
        import torch

        key = tuple((name, t.data_ptr(), t.dtype, t.shape, t.is_cpu and t.is_contiguous()) for name, t in tensors.items())
        if key == self._key:
            return self._layout, self._pieces
        if not all(in_place for *_, in_place in key):
            layout, blob = encode_weights(tensors, out)
            return layout, [memoryview(blob)]
        layout, pieces = weights_layout(tensors), []
        for entry, tensor in zip(layout["tensors"], tensors.values()):
            if tensor.numel():
                tensor = tensor.detach()
                if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: see its bytes as uint8
                    tensor = tensor.reshape(-1).view(torch.uint8)
                pieces.append(memoryview(tensor.numpy()).cast("B"))
            padding = -entry["nbytes"] % ALIGNMENT
            if padding:
                pieces.append(memoryview(_ZEROS)[:padding])
        self._key, self._layout, self._pieces, self._layout_json = key, layout, pieces, _json(layout)
        return layout, pieces

    def frames(self, header: str, tensors: Mapping[str, "torch.Tensor"], out: bytearray | None = None,
               **fields: Any) -> list[bytes | memoryview]:
        """The buffers of a weights message for these tensors: JSON frame, blob frame."""
        layout, pieces = self.buffers(tensors, out)
        known = self._layout_json if layout is self._layout else None
        return frame_weights(header, pieces, layout_json=known, weights=layout, **fields)


def weights_buffers(
    tensors: Mapping[str, "torch.Tensor"], out: bytearray | None = None
) -> tuple[dict[str, Any], list[memoryview]]:
    """Layout and in-place buffers of a set of tensors, worked out afresh (see WeightsSender)."""
    return WeightsSender().buffers(tensors, out)


def _check_entry(entry: Any, blob_bytes: int) -> tuple[str, str, list[int], int]:
    if not isinstance(entry, dict):
        raise BadWeights("weights layout entry is not an object")
    name, dtype, shape, offset = entry.get("name"), entry.get("dtype"), entry.get("shape"), entry.get("offset")
    if not isinstance(name, str) or dtype not in DTYPE_SIZES:
        raise BadWeights(f"weights layout entry {str(name)[:40]!r} has no valid name and dtype")
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 2**40 for d in shape):
        raise BadWeights(f"tensor {name!r}: shape must be a list of non-negative integers")
    numel = math.prod(shape)
    if type(offset) is not int or offset < 0 or offset % ALIGNMENT or entry.get("nbytes") != numel * DTYPE_SIZES[dtype]:
        raise BadWeights(f"tensor {name!r}: offset or byte count does not fit its shape and dtype")
    if offset + numel * DTYPE_SIZES[dtype] > blob_bytes:
        raise BadWeights(f"tensor {name!r} ends past the {blob_bytes}-byte weights frame")
    return name, dtype, shape, offset


def decode_weights(layout: Any, blob: bytearray | memoryview) -> dict[str, "torch.Tensor"]:
    """Tensors that are views of `blob` (no copy), after checking every entry of the layout."""
    import torch

    if not isinstance(layout, dict) or layout.get("byte_order") != "little" or not isinstance(layout.get("tensors"), list):
        raise BadWeights("weights layout must be an object with byte_order 'little' and a list of tensors")
    if layout.get("nbytes") != len(blob):
        raise BadWeights(f"weights layout says {layout.get('nbytes')!r} bytes, the frame has {len(blob)}")
    tensors: dict[str, torch.Tensor] = {}
    for entry in layout["tensors"]:
        name, dtype, shape, offset = _check_entry(entry, len(blob))
        if name in tensors:
            raise BadWeights(f"tensor {name!r} appears twice in the layout")
        numel = math.prod(shape)
        if numel == 0:
            tensors[name] = torch.empty(shape, dtype=_torch_dtype(dtype))
        else:
            tensors[name] = torch.frombuffer(blob, dtype=_torch_dtype(dtype), count=numel, offset=offset).view(shape)
    return tensors


class WeightsBuffer:
    """A buffer that the weights frames of one model are received into, again and again.

    Its tensors are views of the buffer, made once when it is created (which checks the
    layout), so a weights frame received into it needs no decoding at all: `tensors`
    already show the new values. The server keeps a few for the updates in flight, a
    client one for the global model.
    """

    def __init__(self, layout: dict[str, Any], buffer: bytearray | memoryview | None = None):
        self.buffer = bytearray(layout["nbytes"]) if buffer is None else buffer
        self.tensors = decode_weights(layout, self.buffer)


# The keys of a weights layout and of each of its tensor entries: all of them, and nothing else.
LAYOUT_KEYS = frozenset({"byte_order", "nbytes", "tensors"})
TENSOR_KEYS = frozenset({"name", "dtype", "shape", "offset", "nbytes"})


def check_layout(received: Any, expected: Mapping[str, Any]) -> None:
    """Refuse weights whose names, dtypes, shapes or offsets differ from the model's own."""
    if received == expected:
        return
    wanted = {entry["name"]: entry for entry in expected["tensors"]}
    try:
        got = {entry["name"]: entry for entry in received["tensors"]}
    except (KeyError, TypeError) as exc:
        raise BadWeights("weights layout is not an object with a list of named tensors") from exc
    # A layout says where bytes lie and what they are, so a key this side does not know could change how
    # they must be read (an encoding, a scale): refused, not ignored as a message's unknown fields are.
    # Something new in the weights comes with a feature of its own (<HELLO>'s features).
    unknown = sorted(map(str, received.keys() - LAYOUT_KEYS))
    if unknown:
        raise BadWeights(f"weights layout has keys the protocol does not define: {unknown[:3]}")
    missing, extra = wanted.keys() - got.keys(), got.keys() - wanted.keys()
    if missing or extra:
        raise BadWeights(f"weights names differ from the model: missing {sorted(missing)[:3]}, unexpected {sorted(map(str, extra))[:3]}")
    for name, entry in wanted.items():
        unknown = sorted(map(str, got[name].keys() - TENSOR_KEYS)) if isinstance(got[name], dict) else []
        if unknown:
            raise BadWeights(f"tensor {name!r} has keys the protocol does not define: {unknown[:3]}")
        for key in ("dtype", "shape", "offset", "nbytes"):
            if got[name].get(key) != entry[key]:
                raise BadWeights(f"tensor {name!r}: {key} {got[name].get(key)!r}, the model has {entry[key]!r}")
    for key in ("byte_order", "nbytes"):
        if received.get(key) != expected[key]:
            raise BadWeights(f"weights layout: {key} {received.get(key)!r}, the model has {expected[key]!r}")
    raise BadWeights("weights layout differs from the model's (order or byte count)")


def check_finite(tensors: Mapping[str, "torch.Tensor"]) -> None:
    import torch

    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise BadWeights(f"tensor {name!r} holds NaN or Inf")


def frame_weights(
    header: str, blob: bytearray | memoryview | list[memoryview], layout_json: str | None = None, **fields: Any
) -> list[bytes | memoryview]:
    """The buffers of a weights message: JSON frame, then the blob frame, given as one
    buffer or as pieces (nothing is copied). `layout_json`, the "weights" layout already
    as JSON, is spliced in instead of being encoded again."""
    pieces = [memoryview(blob)] if not isinstance(blob, list) else blob
    if layout_json is not None:
        del fields["weights"]
        message = _framed(f'{_json({"header": header, **fields})[:-1]},"weights":{layout_json}}}')
    else:
        message = encode_message(header, **fields)
    return [message, frame_header(sum(p.nbytes for p in pieces)), *pieces]
