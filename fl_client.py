"""fedsock client: trains on its own data and sends back only its update.

    python fl_client.py --client-id 1

Everything else (dataset, which examples are this client's, model, rounds) comes from
the server's <METADATA>. The client then loads its data, builds the model and warms
PyTorch up, and only then says <READY>: the lobby counts it once it can train, and its
first round is as fast as any other. PyTorch is imported only after the handshake, so
`--help` and the first connection do not wait for it.
"""

from __future__ import annotations

import argparse
import select
import socket
import ssl
import sys
import time
from dataclasses import dataclass
from typing import Any

from fedsock import config as settings
from fedsock import security
from fedsock.config import setting
from fedsock.console import ArgumentParser, FedsockError, HelpFormatter, RefusedError, UsageError, number, run_main, say, warn
from fedsock.order import ROLE_CLIENT, SECAGG_REQUESTS, Order
from fedsock.transport import BlockingConnection, tune_socket
from socket_methods import (
    AUTH,
    CHALLENGE,
    ERROR,
    EVALUATE,
    EVALUATION,
    FINISHED,
    HELLO,
    MAX_CONTROL_BYTES,
    MODEL,
    PROTOCOL_VERSION,
    READY,
    SECAGG_UNMASK,
    SESSION_END,
    SUCCESS,
    UPDATE,
    WAITING,
    BadMessage,
    ConnectionClosed,
    ProtocolError,
    check_finite,
    check_layout,
    encode_message,
)

# The optional protocol features this client supports (sent in <HELLO>; a run that needs
# others refuses it with a sentence, rather than letting it train without them).
FEATURES: list[str] = ["dp-local", "compression", "secagg", "sessions", "augment"]
# Reconnect backoff: first pause and the longest one.
RETRY_FIRST_S, RETRY_MAX_S = 0.1, 2.0

NETWORK, DATA, PRIVACY, OUTPUT, SECURITY = "network", "data and device", "example-level privacy (DP-SGD)", "output", "security"


@dataclass
class ClientConfig:
    client_id: int = setting(None, "this client's id, 1..N (N is the server's --num-clients)", group=NETWORK,
                             type=number(int, 1), required=True, metavar="K")
    server_host: str = setting("127.0.0.1", "server address (checked against its TLS certificate)", group=NETWORK,
                               metavar="HOST")
    server_port: int = setting(50052, "server TCP port", group=NETWORK, type=number(int, 1, 65535), metavar="PORT")
    connect_timeout_s: float = setting(
        30.0, "seconds to keep trying to join: while no server listens, or a busy one closes the connection before "
              "welcoming this client (start clients before the server if you like)", group=NETWORK,
        flag="--connect-timeout", type=settings.positive_float)
    data: str | None = setting(None, "this client's own data, for a server started with --task image or text: an image "
                                     "folder (PATH/train/<class>/...), a .tsv/.csv of label and text, or an .npz",
                               group=DATA, metavar="PATH")
    data_format: str | None = setting(None, "what --data is, when its name does not say", group=DATA,
                                      choices=("imagefolder", "table", "npz"))
    label_column: str | None = setting(None, "text table: the label's column, a name or a 0-based index (default: "
                                             "found by name, else the first)", group=DATA, metavar="COLUMN")
    text_column: str | None = setting(None, "text table: the text's column (default: found by name, else the second)",
                                      group=DATA, metavar="COLUMN")
    device: str = setting("auto", "where this client trains", group=DATA, choices=("auto", "cpu", "cuda"))
    data_root: str | None = setting(None, "folder with the dataset files (default: the one shipped in fedsock/data/)",
                                    group=DATA, metavar="DIR")
    threads: int = setting(1, "PyTorch CPU threads; 0 keeps PyTorch's default (one per core). Several clients on one "
                              "machine run fastest with 1 each: more oversubscribes the cores", group=DATA,
                           type=settings.non_negative_int, metavar="N")
    max_message_mb: float = setting(64.0, "largest model this client accepts, in MB of weights", group=DATA,
                                    type=settings.positive_float, metavar="MB")
    dp_sgd: bool = setting(False, "train with DP-SGD (Opacus): per-example clipping and noise, and this client's own "
                                  "epsilon for its examples in every round line", group=PRIVACY)
    dp_sgd_noise_multiplier: float = setting(1.0, "DP-SGD: noise std as a multiple of --dp-sgd-clip", group=PRIVACY,
                                             type=settings.positive_float, metavar="Z")
    dp_sgd_clip: float = setting(1.0, "DP-SGD: clip each example's gradient to this L2 norm", group=PRIVACY,
                                 type=settings.positive_float, metavar="C")
    dp_sgd_delta: float = setting(1e-5, "DP-SGD: delta of this client's guarantee (below 1/its examples)",
                                  group=PRIVACY, type=number(float, 0, 1, positive=True), metavar="DELTA")
    quiet: bool = setting(False, "no progress bar and no <WAITING> lines, only a line per round", group=OUTPUT)
    progress_every: int | None = setting(
        None, "a progress line each time this many percent of a round's training is done (for logs and demos, "
              "where a bar cannot be drawn)", group=OUTPUT, type=number(int, 1, 100), metavar="PERCENT")
    tls: bool = setting(False, "use TLS, trusting the system's certificate authorities", group=SECURITY)
    tls_ca: str | None = setting(None, "use TLS, trusting the server certificate's CA in this PEM file", group=SECURITY,
                                 metavar="PEM")
    tls_cert: str | None = setting(None, "client certificate for mutual TLS (PEM)", group=SECURITY, metavar="PEM")
    tls_key: str | None = setting(None, "private key of --tls-cert (PEM)", group=SECURITY, metavar="PEM")
    tls_insecure: bool = setting(False, "use TLS without checking the server's certificate (unsafe)", group=SECURITY)
    auth_token_file: str | None = setting(None, f"enrolment secret file (or set ${security.TOKEN_ENV})", group=SECURITY,
                                          metavar="FILE")

    @property
    def who(self) -> str:
        return f"client {self.client_id}"

    @property
    def address(self) -> str:
        return f"{self.server_host}:{self.server_port}"


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="fl_client.py",
        description="fedsock client: federated learning on this machine's data.",
        formatter_class=HelpFormatter,
    )
    settings.add_settings(parser, ClientConfig)
    parser.add_argument("--use-cuda", action=argparse.BooleanOptionalAction, default=None,
                        help="the original tool's switch: same as --device cuda / --device cpu")
    parser.add_argument("--traceback", action="store_true", help="show a full traceback on errors (for bug reports)")
    return parser


def parse_config(argv: list[str] | None) -> ClientConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.use_cuda is not None:
        wanted = "cuda" if args.use_cuda else "cpu"
        if args.device not in ("auto", wanted):
            parser.error("--use-cuda/--no-use-cuda contradicts --device")
        args.device = wanted
    del args.use_cuda, args.traceback
    given = settings.given_flags(build_parser, argv)
    stray = [name for name in ("dp_sgd_noise_multiplier", "dp_sgd_clip", "dp_sgd_delta") if name in given]
    if stray and not args.dp_sgd:
        parser.error(f"--{stray[0].replace('_', '-')} applies to --dp-sgd")
    return ClientConfig(**vars(args))


# --------------------------------------------------------------------------- joining


TLS_HINTS = {
    "WRONG_VERSION_NUMBER": "the server does not speak TLS (is it running without --tls-cert?)",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the server requires a client certificate: pass --tls-cert and --tls-key",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the server rejected this client's certificate: it has expired",
    "TLSV1_ALERT_UNKNOWN_CA": "the server does not trust this client's certificate (unknown CA)",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the server rejected this client's certificate",
}


class TryAgain(Exception):
    """The connection ended before the server welcomed this client: no server yet, or a busy one
    that closed it. Worth another try until --connect-timeout; the message says what happened."""


def tls_failure(exc: ssl.SSLError | OSError, config: ClientConfig) -> str:
    """A sentence that says what is wrong with a TLS connection, and what to change."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"TLS: the server's certificate was rejected ({exc.verify_message}); "
                f"check --tls-ca and that --server-host {config.server_host} is a name in the certificate")
    reason = getattr(exc, "reason", None) or ""
    if reason in TLS_HINTS:
        return f"TLS: {TLS_HINTS[reason]}"
    if isinstance(exc, (ssl.SSLEOFError, ConnectionResetError, BrokenPipeError)):
        return ("TLS: the server closed the connection during the handshake "
                "(it may run without TLS, or require a client certificate)")
    return f"TLS: {reason or exc}"


def connect(config: ClientConfig, tls: ssl.SSLContext | None, timeout_s: float) -> BlockingConnection:
    """One connection attempt (TCP, then TLS); TryAgain when there is no server, or it hung up."""
    try:
        sock = socket.create_connection((config.server_host, config.server_port), timeout=max(0.1, min(5.0, timeout_s)))
    except socket.gaierror as exc:
        raise UsageError(f"cannot resolve --server-host {config.server_host}: {exc.strerror}") from exc
    except OSError as exc:
        raise TryAgain(f"no server at {config.address} ({exc.strerror or exc})") from exc
    tune_socket(sock)
    if tls is not None:
        try:
            sock = tls.wrap_socket(sock, server_hostname=config.server_host)
        except (ssl.SSLEOFError, ConnectionResetError, BrokenPipeError, socket.timeout) as exc:
            sock.close()
            raise TryAgain(tls_failure(exc, config)) from exc
        except (ssl.SSLError, OSError) as exc:
            sock.close()
            raise FedsockError(tls_failure(exc, config)) from exc
    return BlockingConnection(sock, idle_timeout_s=max(config.connect_timeout_s, 10.0))


def expect(conn: BlockingConnection, order: Order, limit: int = MAX_CONTROL_BYTES) -> dict[str, Any]:
    """The server's next message, if the order allows it now (fedsock.order); its <ERROR> as RefusedError."""
    message = conn.recv_message(limit)
    if message["header"] == ERROR:  # the server's last word, whatever the state: say it
        raise RefusedError(f"the server says: {message['message'][:300]}")
    order.receive(message["header"])
    return message


def hello(conn: BlockingConnection, config: ClientConfig, token: bytes | None) -> tuple[Order, dict[str, Any]]:
    """<HELLO>, the optional challenge, then the run's <METADATA>; and where the connection stands."""
    order = Order(ROLE_CLIENT)
    order.send(HELLO)
    conn.send([encode_message(HELLO, protocol_version=PROTOCOL_VERSION, client_id=config.client_id, features=FEATURES)])
    message = expect(conn, order)
    if message["header"] == CHALLENGE:
        if token is None:
            conn.send([encode_message(ERROR, message="this client has no token")])
            raise UsageError(f"the server requires authentication: pass --auth-token-file or set ${security.TOKEN_ENV}")
        try:
            nonce = bytes.fromhex(message["nonce"])
        except ValueError:
            raise BadMessage("the server's challenge nonce is not hex") from None
        order.send(AUTH)
        conn.send([encode_message(AUTH, mac=security.auth_mac(token, nonce, config.client_id))])
        message = expect(conn, order)
    if message["client_id"] != config.client_id:
        raise BadMessage(f"the server welcomed client {message['client_id']}, not {config.client_id}")
    return order, message


def join(config: ClientConfig, tls: ssl.SSLContext | None,
         token: bytes | None) -> tuple[BlockingConnection, Order, dict]:
    """Connect and be welcomed, trying again with backoff for --connect-timeout seconds: while no
    server listens, and while a busy one refuses or resets the connection before its welcome."""
    deadline = time.monotonic() + config.connect_timeout_s
    delay, announced, hung_up = RETRY_FIRST_S, False, None
    while True:
        conn = None
        try:
            conn = connect(config, tls, deadline - time.monotonic())
            return conn, *hello(conn, config, token)
        except (TryAgain, ConnectionClosed, ConnectionResetError, BrokenPipeError, ssl.SSLEOFError) as exc:
            if conn is not None:
                conn.close()
            if not (isinstance(exc, TryAgain) and str(exc).startswith("no server")):
                hung_up = exc  # a server was there and hung up: that says more than a later refusal
            if time.monotonic() + delay > deadline:
                raise FedsockError(gave_up(hung_up or exc, config)) from exc
            if not announced:
                say(config.who, f"waiting for the server at {config.address} ...")
                announced = True
            time.sleep(delay)  # backoff between attempts, not synchronisation
            delay = min(2 * delay, RETRY_MAX_S)
        except BaseException:
            if conn is not None:
                conn.close()
            raise


def gave_up(exc: BaseException, config: ClientConfig) -> str:
    tried = f"tried for {config.connect_timeout_s:g} s"
    if isinstance(exc, TryAgain) and str(exc).startswith("no server"):
        return f"no server at {config.address} ({tried}: {str(exc).split('(', 1)[1].rstrip(')')})"
    if isinstance(exc, TryAgain):
        return f"{exc} ({tried})"
    if config.tls_cert:
        # Python's asyncio closes a failed TLS 1.3 handshake without the alert that would say
        # why; by then the likeliest reason is this client's certificate.
        return ("TLS: the server closed the connection before welcoming this client: it did not accept this "
                f"client's certificate (expired, or not signed by the server's --tls-client-ca?) ({tried})")
    return (f"the server at {config.address} closed the connection before welcoming this client, every time "
            f"({tried}: it may be full of other connections, or not a fedsock server)")


# --------------------------------------------------------------------------- training


class Progress:
    """How a round's training shows: a bar on a terminal, lines every N% for logs, or nothing."""

    def __init__(self, config: ClientConfig):
        self.config = config
        self.bar = None

    def start(self, total: int, description: str):
        if self.config.progress_every:
            every = self.config.progress_every
            marks = {-(-total * pct // 100): pct for pct in range(every, 100, every)}  # batch -> percent
            started = time.perf_counter()

            def line(done: int) -> None:
                if done in marks:
                    say(self.config.who, f"{description}: {marks[done]}% trained ({done}/{total} batches, "
                                         f"{time.perf_counter() - started:.1f} s)")

            return line
        if self.config.quiet or not sys.stderr.isatty():
            return None
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=f"{self.config.who} {description}", unit="batch", leave=False)
        return lambda done: self.bar.update(done - self.bar.n)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class LocalTrainer:
    """This client's data and model, loaded once and kept for the whole run."""

    def __init__(self, config: ClientConfig, meta: dict[str, Any]):
        import torch  # heavy imports only now, after the handshake

        import client_helper
        import neural_net_helper as nnh
        from socket_methods import WeightsBuffer, WeightsSender, decode_bitmap, weights_layout

        import numpy as np

        from fedsock import compression
        from fedsock.own_data import load_own_data
        from fedsock.tasks import Task

        self.nnh, self.config, self.compress = nnh, config, compression
        if config.threads:
            torch.set_num_threads(config.threads)
        if meta["model"] not in nnh.MODELS:
            raise BadMessage(f"the server asks for model {meta['model']!r}, unknown here")
        self.task = task = Task.from_json(meta["task"])
        if not nnh.model_fits(meta["model"], task.kind):
            raise BadMessage(f"the server asks for model {meta['model']!r} for a {task.kind} task")
        self.device = nnh.choose_device(config.device)
        if meta["dataset"]:  # a dataset every party has: the server says which examples are this client's
            if config.data:
                raise UsageError(f"this run trains on {meta['dataset']}, split by the server; --data is for runs whose "
                                 f"server was started with --task image or text")
            if meta["dataset"] not in client_helper.DATASETS:
                raise BadMessage(f"the server asks for dataset {meta['dataset']!r} and model {meta['model']!r}, "
                                 f"unknown here")
            train = client_helper.load_split(meta["dataset"], "train", config.data_root)
            if len(train.labels) != meta["train_size"]:
                raise BadMessage(f"the server's {meta['dataset']} has {meta['train_size']} training examples, this "
                                 f"client's copy has {len(train.labels)}: not the same dataset")
            if meta["partition_bitmap"] is None:
                raise BadMessage("the server named a dataset but gave this client no partition_bitmap")
            indices = decode_bitmap(meta["partition_bitmap"], len(train.labels))
            if not len(indices):
                raise BadMessage("the server gave this client no training examples (an empty partition)")
            mine, local_test = client_helper.split_local(indices, meta["seed"], config.client_id)
            xs, ys, test_x, test_y = train.images[mine], train.labels[mine], train.images[local_test], train.labels[local_test]
        else:  # its own files, checked against the task
            if not config.data:
                raise UsageError(f"this run's clients bring their own data ({task.describe()}): pass --data PATH")
            own = load_own_data(config.data, task, config.data_format, config.label_column, config.text_column)
            if own.test_x is None:  # no test split of its own: hold out 10%, as every client does
                mine, local_test = client_helper.split_local(np.arange(len(own.y)), meta["seed"], config.client_id)
                xs, ys, test_x, test_y = own.x[mine], own.y[mine], own.x[local_test], own.y[local_test]
            else:
                xs, ys, test_x, test_y = own.x, own.y, own.test_x, own.test_y
            if not len(ys):
                raise UsageError(f"--data {config.data} leaves no training examples")
            say(config.who, f"own data: {len(ys)} training and {len(test_y)} test examples from {own.source}")
        self.data = nnh.LocalData(*nnh.to_tensors(xs, ys, task, self.device),
                                  *nnh.to_tensors(test_x, test_y, task, self.device))
        self.model = nnh.build_model(meta["model"], task, meta["seed"]).to(self.device)
        self.federated_evaluation = meta["federated_evaluation"]
        self.layout = weights_layout(nnh.get_weights(self.model))
        if self.layout["nbytes"] > config.max_message_mb * 2**20:
            raise BadMessage(f"the {meta['model']} model has {self.layout['nbytes'] / 2**20:.1f} MB of weights, over "
                             f"this client's --max-message-mb {config.max_message_mb:g}")
        self.compression = compression.Compression.from_json(meta["compression"])
        self.secagg = None  # secure aggregation: this client's side of each round's protocol
        if meta["secure_aggregation"]:
            from fedsock.secagg import ClientSession

            self.secagg = ClientSession(config.client_id, sum(t.numel() for t in nnh.get_weights(self.model).values()))
        # what the model arrives as: its own layout, or the compressed broadcast's
        self.model_wire_layout = compression.update_layout(self.layout, self.compression.broadcast)
        self.received = WeightsBuffer(self.model_wire_layout)
        self.residual: dict = {}  # topk's error feedback: what was not sent yet
        self.torch = torch
        self.sender = WeightsSender()
        # CPU weights are sent from the model's own memory; others are copied out once, into this.
        self.send_buffer = bytearray(self.layout["nbytes"]) if self.device.type != "cpu" else None
        self.seed = meta["seed"]
        self.num_rounds = meta["num_rounds"]
        self.progress = Progress(config)
        nnh.warm_up(self.model, self.data.x, self.data.y)
        self.dp_sgd = None
        if config.dp_sgd:
            from fedsock.privacy import ExampleLevelDP

            if "augment" in meta["required_features"]:  # every <MODEL> of this run will ask for it
                raise UsageError("this client trains with --dp-sgd, which it cannot combine with the run's "
                                 "augmentation (the server's --augment)")

            self.dp_sgd = ExampleLevelDP(self.model, config.dp_sgd_noise_multiplier, config.dp_sgd_clip,
                                         config.dp_sgd_delta)

    @property
    def num_examples(self) -> int:
        return len(self.data.x)

    def fit(self, conn: BlockingConnection, message: dict[str, Any]) -> list:
        """Receive the global weights, train, test locally; the <UPDATE> frames to send."""
        number = message["round"]
        augment = message.get("augment", "none")
        if augment not in self.nnh.AUGMENTATIONS or (augment != "none" and self.task.kind == "text"):
            raise BadMessage(f"<MODEL> asks for augmentation {augment[:40]!r}, which this client does not know for "
                             f"{self.task.kind} examples")
        if self.dp_sgd is not None and (message["proximal_mu"] > 0 or "dp_clip" in message or augment != "none"):
            reason = ("this client trains with --dp-sgd, which it cannot combine with the run's "
                      + ("FedProx proximal term" if message["proximal_mu"] > 0 else
                         "augmentation" if augment != "none" else "client-side update noise"))
            conn.send([encode_message(ERROR, message=reason)])
            raise FedsockError(reason)
        tensors = self.receive_model(conn, message)
        evaluation = {}
        if self.federated_evaluation:  # what the received model (last round's) scores on this client's test split
            self.nnh.set_weights(self.model, tensors)
            loss_sum, confusion = self.nnh.evaluate_counts(self.model, self.data.test_x, self.data.test_y,
                                                           self.task.num_classes)
            evaluation = dict(eval_round=number - 1, eval_loss_sum=loss_sum, eval_confusion=confusion.tolist())
        description = f"round {number}/{self.num_rounds}" if number <= self.num_rounds else f"round {number}"
        batches = self.nnh.batches_per_round(self.num_examples, message["local_epochs"], message["batch_size"])
        try:
            metrics = self.nnh.local_round(
                self.model, self.data, tensors, epochs=message["local_epochs"], batch_size=message["batch_size"],
                lr=message["lr"], proximal_mu=message["proximal_mu"], augment=augment, dp_clip=message.get("dp_clip"),
                dp_noise_std=message.get("dp_noise_std", 0.0), dp_sgd=self.dp_sgd,
                seed=hash((self.seed, self.config.client_id, number)) & 0x7FFFFFFF,
                progress=self.progress.start(batches, description),
            )
        finally:
            self.progress.stop()
        privacy = ""
        if self.dp_sgd is not None:
            metrics["dp_sgd_epsilon"] = self.dp_sgd.epsilon()
            privacy = f", DP-SGD epsilon {metrics['dp_sgd_epsilon']:.3g} at delta {self.config.dp_sgd_delta:g}"
        augmented = f" ({augment} augmentation)" if augment != "none" else ""
        say(self.config.who, f"round {number}: trained on {self.num_examples} examples{augmented}, loss {metrics['train_loss']:.4f}, "
                             f"local test acc {100 * metrics['local_test_accuracy']:.2f}%, {metrics['fit_seconds']:.1f} s"
                             f"{privacy}")
        weights, extra = self.nnh.get_weights(self.model), {}
        if self.secagg is not None:  # the delta, weighted, quantised and masked: all the server sees of it
            from fedsock.secagg import MASKED

            masked = self.secagg.masked_update(number, tensors, weights, self.num_examples)
            weights = {MASKED: self.torch.from_numpy(masked)}
        elif self.compression.kind != "none":  # the delta from the model received, made small
            # int8's stochastic rounding: seeded by (seed, client, round), as a simulation's is
            rounding = self.torch.Generator().manual_seed(hash((self.seed, self.config.client_id, number, 8)) & 0x7FFFFFFF)
            weights, params = self.compress.compress_update(tensors, weights, self.compression, self.residual, rounding)
            extra = {"compression_params": params} if params else {}
        return self.sender.frames(
            UPDATE, weights, out=self.send_buffer, round=number, client_id=self.config.client_id,
            num_examples=self.num_examples, **metrics, **evaluation, **extra,
        )

    def receive_model(self, conn: BlockingConnection, message: dict[str, Any]) -> dict:
        """The weights frame behind a <MODEL> or <EVALUATE>, checked; decoded if the broadcast is compressed."""
        check_layout(message["weights"], self.model_wire_layout)
        conn.recv_blob(self.received.buffer)
        tensors = self.received.tensors  # views of the bytes just received
        check_finite(tensors)
        kind = self.compression.broadcast
        if kind == "none":
            if "broadcast_params" in message:
                raise BadMessage("broadcast_params with a model that is not compressed")
            return tensors
        params = self.compress.check_params(kind, message.get("broadcast_params"), self.layout, "broadcast_params")
        return self.compress.decode_broadcast(kind, tensors, params, self.nnh.get_weights(self.model))

    def secure_aggregation(self, message: dict[str, Any]) -> tuple[str, dict] | None:
        """A secure-aggregation message from the server; the answer to send, if any."""
        if self.secagg is None:
            raise BadMessage(f"{message['header']} in a run without secure aggregation")
        answer = self.secagg.answer(message)
        if message["header"] == SECAGG_UNMASK and not self.config.quiet:
            say(self.config.who, f"round {message['round']}: revealed the shares to unmask {len(message['survivors'])} "
                                 f"updates ({len(message['dropped'])} dropped)")
        return answer

    def evaluate(self, conn: BlockingConnection, message: dict[str, Any]) -> list:
        """<EVALUATE>: the model of the run's last round, on this client's test split; the <EVALUATION>."""
        self.nnh.set_weights(self.model, self.receive_model(conn, message))
        loss_sum, confusion = self.nnh.evaluate_counts(self.model, self.data.test_x, self.data.test_y,
                                                       self.task.num_classes)
        accuracy = float(confusion.trace()) / max(int(confusion.sum()), 1)
        say(self.config.who, f"evaluated round {message['round']}'s model on {int(confusion.sum())} test examples: "
                             f"acc {100 * accuracy:.2f}%")
        return [encode_message(EVALUATION, round=message["round"], eval_loss_sum=loss_sum,
                               eval_confusion=confusion.tolist())]


def server_spoke(conn: BlockingConnection) -> bool:
    """Has the server sent something while we trained (a <WAITING>, or the <FINISHED> of a stopped run)?"""
    if conn.reader.staged or (isinstance(conn.sock, ssl.SSLSocket) and conn.sock.pending()):
        return True
    readable, _, _ = select.select([conn.sock], [], [], 0)
    return bool(readable)


class Status:
    """Shows the server's control messages; says when the run is over."""

    def __init__(self, config: ClientConfig):
        self.config = config
        self.last_waiting = ""

    def finished(self, message: dict[str, Any]) -> bool:
        header = message["header"]
        if header == FINISHED:
            say(self.config.who, f"server: {message['message']}")
            return True
        if header == SESSION_END:
            say(self.config.who, f"server: {message['message']}")
            return False
        if header == SUCCESS and not message["accepted"]:
            warn(self.config.who, f"round {message['round']}: {message['message']}")
        if header == WAITING and message["message"] != self.last_waiting and not self.config.quiet:
            self.last_waiting = message["message"]
            say(self.config.who, f"server: {self.last_waiting}")
        return False


def send_or_give_up(conn: BlockingConnection, frames: list, config: ClientConfig) -> None:
    try:
        conn.send(frames)
    except socket.timeout as exc:
        raise FedsockError(f"the server at {config.address} took no byte of this client's answer for "
                           f"{conn.sock.gettimeout():g} s; giving up") from exc


def run_client(config: ClientConfig) -> int:
    tls = security.client_tls_context(config.tls, config.tls_ca, config.tls_cert, config.tls_key, config.tls_insecure, config.who)
    token = security.load_token(config.auth_token_file, config.who)
    conn, told_server, joined = None, False, False
    try:
        conn, order, meta = join(config, tls, token)
        joined = True
        where = (f"{meta['dataset']}, {meta['partition']} partition {config.client_id} of {meta['num_clients']}"
                 if meta["dataset"] else "its own data")
        say(config.who, f"joined the server at {config.address}: {meta['model']} on {where}")
        try:
            trainer = LocalTrainer(config, meta)
        except (FedsockError, KeyboardInterrupt) as exc:  # tell the server why this client leaves
            reason = str(exc) if isinstance(exc, FedsockError) else "interrupted"
            conn.send([encode_message(ERROR, message=f"client setup failed: {reason}")])
            told_server = True
            raise
        order.send(READY)
        conn.send([encode_message(READY, num_examples=trainer.num_examples, test_examples=len(trainer.data.test_y))])
        # The server sends <WAITING> every heartbeat while we wait: three missed ones and it is gone.
        # The same bound holds for each send: a server that takes no byte for that long is gone
        # (a slow link moves bytes all the time; only a dead one stops).
        conn.sock.settimeout(3 * meta["heartbeat_s"] + 2)
        status = Status(config)
        while True:  # what may come when is the order's to say; here each message is answered
            message = expect(conn, order)
            header = message["header"]
            if header in SECAGG_REQUESTS:
                answer = trainer.secure_aggregation(message)
                if answer is not None:
                    order.send(answer[0])
                    send_or_give_up(conn, [encode_message(answer[0], **answer[1])], config)
            elif header == EVALUATE:
                evaluation = trainer.evaluate(conn, message)
                order.send(EVALUATION)
                send_or_give_up(conn, evaluation, config)
            elif header == MODEL:
                update = trainer.fit(conn, message)
                while server_spoke(conn):  # a stopped server's <FINISHED> is read, not answered
                    if status.finished(expect(conn, order)):
                        return 0
                order.send(UPDATE)
                send_or_give_up(conn, update, config)
            elif status.finished(message):
                return 0
    except socket.timeout as exc:
        waited = f" for {conn.sock.gettimeout():g} s" if conn is not None else ""
        raise FedsockError(f"the server at {config.address} sent nothing{waited}; giving up") from exc
    except ConnectionClosed as exc:
        raise FedsockError(f"the server at {config.address} closed the connection (it stopped or crashed)") from exc
    except ProtocolError as exc:
        if conn is not None and not told_server and not isinstance(exc, ConnectionClosed):
            try:  # tell the server what was wrong with what it sent, as it would tell us
                conn.send([encode_message(ERROR, message=f"bad data from the server: {exc}"[:4000])], timeout_s=5)
            except OSError:
                pass
        raise FedsockError(f"bad data from the server at {config.address}: {exc}") from exc
    except ssl.SSLError as exc:
        if joined:  # the handshake was long done: the connection broke (a reset, a server gone)
            raise FedsockError(f"the server at {config.address} dropped the connection (TLS: "
                               f"{getattr(exc, 'reason', None) or exc})") from exc
        raise FedsockError(tls_failure(exc, config)) from exc
    except (ConnectionResetError, BrokenPipeError) as exc:
        raise FedsockError(f"the server at {config.address} dropped the connection ({exc.strerror})") from exc
    finally:
        if conn is not None:
            conn.close()


def main(argv: list[str] | None = None) -> int:
    return run_client(parse_config(argv))


def cli() -> int:
    return run_main("fl_client.py", main)


if __name__ == "__main__":
    sys.exit(cli())
