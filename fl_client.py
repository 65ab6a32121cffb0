"""fedsock client: trains on its own partition and sends back only its weights.

    python fl_client.py --client-id 1

Everything else (dataset, partition, model, rounds) comes from the server's
<METADATA>. PyTorch is imported only after the handshake, so `--help` and the
first connection do not wait for it.
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

from fedsock import security
from fedsock.console import ArgumentParser, FedsockError, RefusedError, UsageError, number, run_main, say, warn
from socket_methods import (
    MAX_CONTROL_BYTES,
    PROTOCOL_VERSION,
    BadMessage,
    ConnectionClosed,
    ProtocolError,
    check_finite,
    check_layout,
    encode_message,
    frame_weights,
    weights_buffers,
)
from fedsock.transport import BlockingConnection, tune_socket

# Beyond the server's round timeout, how long to wait for its next message before
# concluding that it is gone (it may be evaluating, or waiting for slower clients).
SERVER_SILENCE_MARGIN_S = 60.0


@dataclass
class ClientConfig:
    client_id: int
    server_host: str = "127.0.0.1"
    server_port: int = 50052
    device: str = "auto"
    data_root: str | None = None
    connect_timeout_s: float = 30.0
    max_message_mb: float = 64.0
    threads: int = 1
    quiet: bool = False
    tls: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_insecure: bool = False
    auth_token_file: str | None = None

    @property
    def who(self) -> str:
        return f"client {self.client_id}"

    @property
    def address(self) -> str:
        return f"{self.server_host}:{self.server_port}"


_client_id = number(int, 1)
_positive_float = number(float, 0, positive=True)
_port = number(int, 1, 65535)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="fl_client.py",
        description="fedsock client: federated learning on this machine's data partition.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--client-id", type=_client_id, required=True, help="this client's id, 1..N (N is the server's --num-clients)")
    parser.add_argument("--server-host", default="127.0.0.1", help="server address (checked against its TLS certificate)")
    parser.add_argument("--server-port", type=_port, default=50052, help="server TCP port")
    parser.add_argument("--connect-timeout", dest="connect_timeout_s", type=_positive_float, default=30.0,
                        help="seconds to keep retrying the first connection (start clients before the server if you like)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where this client trains")
    parser.add_argument("--use-cuda", action=argparse.BooleanOptionalAction, default=None,
                        help="the original tool's switch: same as --device cuda / --device cpu")
    parser.add_argument("--data-root", default=None, help="folder with the dataset files (default: the project's data/)")
    parser.add_argument("--threads", type=number(int, 0), default=1,
                        help="PyTorch CPU threads; 0 keeps PyTorch's default (one per core). Several clients on one "
                             "machine run fastest with 1 each: more oversubscribes the cores")
    parser.add_argument("--max-message-mb", type=_positive_float, default=64.0, help="largest frame accepted from the server")
    parser.add_argument("--quiet", action="store_true", help="no progress bars, only a line per round")
    parser.add_argument("--traceback", action="store_true", help="show a full traceback on errors (for bug reports)")
    sec = parser.add_argument_group("security")
    sec.add_argument("--tls", action="store_true", help="use TLS, trusting the system's certificate authorities")
    sec.add_argument("--tls-ca", default=None, help="use TLS, trusting the server certificate's CA in this PEM file")
    sec.add_argument("--tls-cert", default=None, help="client certificate for mutual TLS (PEM)")
    sec.add_argument("--tls-key", default=None, help="private key of --tls-cert (PEM)")
    sec.add_argument("--tls-insecure", action="store_true", help="use TLS without checking the server's certificate (unsafe)")
    sec.add_argument("--auth-token-file", default=None, help=f"enrolment secret file (or set ${security.TOKEN_ENV})")
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
    return ClientConfig(**vars(args))


# --------------------------------------------------------------------------- connection


TLS_HINTS = {
    "WRONG_VERSION_NUMBER": "the server does not speak TLS (is it running without --tls-cert?)",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the server requires a client certificate: pass --tls-cert and --tls-key",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the server rejected this client's certificate: it has expired",
    "TLSV1_ALERT_UNKNOWN_CA": "the server does not trust this client's certificate (unknown CA)",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the server rejected this client's certificate",
}


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


def connect(config: ClientConfig, tls: ssl.SSLContext | None) -> BlockingConnection:
    """Connect, retrying with backoff for --connect-timeout seconds, so clients may start first."""
    deadline = time.monotonic() + config.connect_timeout_s
    delay, announced = 0.1, False
    while True:
        try:
            sock = socket.create_connection((config.server_host, config.server_port), timeout=max(0.1, min(5.0, deadline - time.monotonic())))
            break
        except socket.gaierror as exc:
            raise UsageError(f"cannot resolve --server-host {config.server_host}: {exc.strerror}") from exc
        except OSError as exc:
            if time.monotonic() + delay > deadline:
                raise FedsockError(f"no server at {config.address} (tried for {config.connect_timeout_s:g} s: {exc.strerror or exc})") from exc
            if not announced:
                say(config.who, f"waiting for the server at {config.address} ...")
                announced = True
            time.sleep(delay)  # backoff between connection attempts, not synchronisation
            delay = min(2 * delay, 2.0)
    tune_socket(sock)
    if tls is not None:
        try:
            sock = tls.wrap_socket(sock, server_hostname=config.server_host)
        except (ssl.SSLError, OSError) as exc:
            sock.close()
            raise FedsockError(tls_failure(exc, config)) from exc
    return BlockingConnection(sock, idle_timeout_s=max(config.connect_timeout_s, 10.0))


def expect(conn: BlockingConnection, allowed: set[str], limit: int = MAX_CONTROL_BYTES) -> dict[str, Any]:
    message = conn.recv_message(limit)
    if message["header"] == "<ERROR>":
        raise RefusedError(f"the server says: {message['message'][:300]}")
    if message["header"] not in allowed:
        raise BadMessage(f"the server sent {message['header']} where {' or '.join(sorted(allowed))} belongs")
    return message


def join(conn: BlockingConnection, config: ClientConfig, token: bytes | None) -> dict[str, Any]:
    """<HELLO>, the optional challenge, then the run's <METADATA>."""
    conn.send([encode_message("<HELLO>", protocol_version=PROTOCOL_VERSION, client_id=config.client_id)])
    message = expect(conn, {"<CHALLENGE>", "<METADATA>"})
    if message["header"] == "<CHALLENGE>":
        if token is None:
            raise UsageError(f"the server requires authentication: pass --auth-token-file or set ${security.TOKEN_ENV}")
        try:
            nonce = bytes.fromhex(message["nonce"])
        except ValueError:
            raise BadMessage("the server's challenge nonce is not hex") from None
        conn.send([encode_message("<AUTH>", mac=security.auth_mac(token, nonce, config.client_id))])
        message = expect(conn, {"<METADATA>"})
    if message["client_id"] != config.client_id:
        raise BadMessage(f"the server welcomed client {message['client_id']}, not {config.client_id}")
    return message


# --------------------------------------------------------------------------- training


# What a sane <METADATA> may say, field by field: (lowest, highest, lowest excluded).
METADATA_RANGES = {
    "num_clients": (1, 10**6, False), "num_rounds": (1, 10**9, False), "seed": (0, 2**32 - 1, False),
    "alpha": (0, 10**6, True), "round_timeout_s": (0, 10**7, True), "heartbeat_s": (0, 86400, True),
}


def check_metadata_numbers(meta: dict[str, Any], client_id: int) -> None:
    for name, (low, high, exclusive) in METADATA_RANGES.items():
        value = meta[name]
        if not (low < value if exclusive else low <= value) or value > high:
            raise BadMessage(f"the server's <METADATA> has {name} {value!r}, outside {low}..{high}")
    if client_id > meta["num_clients"]:
        raise BadMessage(f"client id {client_id} is outside the run's 1..{meta['num_clients']}")


class LocalTrainer:
    """This client's data and model, loaded once and kept for the whole run."""

    def __init__(self, config: ClientConfig, meta: dict[str, Any]):
        import torch  # heavy imports only now, after the handshake

        import client_helper
        import neural_net_helper as nnh
        from socket_methods import WeightsBuffer, weights_layout

        self.nnh, self.config = nnh, config
        if config.threads:
            torch.set_num_threads(config.threads)
        if meta["dataset"] not in client_helper.DATASETS or meta["model"] not in nnh.MODELS:
            raise BadMessage(f"the server asks for dataset {meta['dataset']!r} and model {meta['model']!r}, unknown here")
        if meta["partition"] not in client_helper.PARTITIONS:
            raise BadMessage(f"the server announced an unknown partition {meta['partition']!r}")
        check_metadata_numbers(meta, config.client_id)
        info = client_helper.DATASETS[meta["dataset"]]
        self.device = nnh.choose_device(config.device)
        train = client_helper.load_split(meta["dataset"], "train", config.data_root)
        parts = client_helper.partition_indices(train.labels, meta["num_clients"], meta["partition"], meta["alpha"], meta["seed"])
        mine, local_test = client_helper.split_local(parts[config.client_id - 1], meta["seed"], config.client_id)
        self.x, self.y = nnh.to_tensors(train.images[mine], train.labels[mine], info, self.device)
        self.test_x, self.test_y = nnh.to_tensors(train.images[local_test], train.labels[local_test], info, self.device)
        self.model = nnh.build_model(meta["model"], info, meta["seed"]).to(self.device)
        self.layout = weights_layout(nnh.get_weights(self.model))
        self.received = WeightsBuffer(self.layout)
        # CPU weights are sent from the model's own memory; others are copied out once, into this.
        self.send_buffer = bytearray(self.layout["nbytes"]) if self.device.type != "cpu" else None
        self.seed = meta["seed"]
        self.num_rounds = meta["num_rounds"]

    def fit(self, conn: BlockingConnection, message: dict[str, Any]) -> list:
        """Receive the global weights, train, test locally; the <UPDATE> frames to send."""
        number = message["round"]
        check_layout(message["weights"], self.layout)
        conn.recv_blob(self.received.buffer)
        tensors = self.received.tensors  # views of the bytes just received
        check_finite(tensors)
        if message["local_epochs"] < 1 or message["batch_size"] < 1 or not message["lr"] > 0:
            raise BadMessage("the server sent training settings out of range")
        started = time.perf_counter()
        self.nnh.set_weights(self.model, tensors)
        loss = self.nnh.train(
            self.model, self.x, self.y, epochs=message["local_epochs"], batch_size=message["batch_size"],
            lr=message["lr"], seed=hash((self.seed, self.config.client_id, number)) & 0x7FFFFFFF,
            description=f"client {self.config.client_id} round {number}/{self.num_rounds}", quiet=self.config.quiet,
        )
        accuracy, _ = self.nnh.evaluate(self.model, self.test_x, self.test_y)
        fit_seconds = time.perf_counter() - started
        layout, blob = weights_buffers(self.nnh.get_weights(self.model), out=self.send_buffer)
        say(self.config.who, f"round {number}: trained on {len(self.x)} examples, loss {loss:.4f}, "
                             f"local test acc {100 * accuracy:.2f}%, {fit_seconds:.1f} s")
        return frame_weights(
            "<UPDATE>", blob, round=number, client_id=self.config.client_id, num_examples=len(self.x),
            train_loss=loss, local_test_accuracy=accuracy, fit_seconds=fit_seconds, weights=layout,
        )


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
        if header == "<FINISHED>":
            say(self.config.who, f"server: {message['message']}")
            return True
        if header == "<SUCCESS>" and not message["accepted"]:
            warn(self.config.who, f"round {message['round']}: {message['message']}")
        if header == "<WAITING>" and message["message"] != self.last_waiting and not self.config.quiet:
            self.last_waiting = message["message"]
            say(self.config.who, f"server: {self.last_waiting}")
        return False


CONTROL = {"<SUCCESS>", "<WAITING>", "<FINISHED>"}


def run_client(config: ClientConfig) -> int:
    tls = security.client_tls_context(config.tls, config.tls_ca, config.tls_cert, config.tls_key, config.tls_insecure, config.who)
    token = security.load_token(config.auth_token_file, config.who)
    conn = connect(config, tls)
    try:
        try:
            meta = join(conn, config, token)
        except (ConnectionClosed, ssl.SSLError, ConnectionResetError) as exc:
            if not config.tls_cert or (isinstance(exc, ssl.SSLError) and getattr(exc, "reason", None) in TLS_HINTS):
                raise
            # Python's asyncio closes a failed TLS 1.3 handshake without the alert that
            # would say why; by then the only likely reason is this client's certificate.
            raise FedsockError(
                "TLS: the server closed the connection before welcoming this client: it did not accept this "
                "client's certificate (expired, or not signed by the server's --tls-client-ca?)"
            ) from exc
        say(config.who, f"joined the server at {config.address}: {meta['model']} on {meta['dataset']}, "
                        f"{meta['partition']} partition {config.client_id} of {meta['num_clients']}")
        try:
            trainer = LocalTrainer(config, meta)
        except (FedsockError, KeyboardInterrupt) as exc:  # tell the server why this client leaves
            reason = str(exc) if isinstance(exc, FedsockError) else "interrupted"
            conn.send([encode_message("<ERROR>", message=f"client setup failed: {reason}")])
            raise
        # The server sends <WAITING> every heartbeat while we wait: three missed ones and it is gone.
        conn.sock.settimeout(3 * meta["heartbeat_s"] + 2)
        limit, status = int(config.max_message_mb * 2**20), Status(config)
        while True:
            message = expect(conn, CONTROL | {"<MODEL>"}, limit)
            if message["header"] != "<MODEL>":
                if status.finished(message):
                    return 0
                continue
            update = trainer.fit(conn, message)
            while server_spoke(conn):  # a stopped server's <FINISHED> is read, not answered
                if status.finished(expect(conn, CONTROL)):
                    return 0
            conn.send(update, timeout_s=meta["round_timeout_s"])
    except socket.timeout as exc:
        raise FedsockError(f"the server at {config.address} sent nothing for {conn.sock.gettimeout():g} s; giving up") from exc
    except ConnectionClosed as exc:
        raise FedsockError(f"the server at {config.address} closed the connection (it stopped or crashed)") from exc
    except ProtocolError as exc:
        raise FedsockError(f"bad data from the server at {config.address}: {exc}") from exc
    except ssl.SSLError as exc:
        raise FedsockError(tls_failure(exc, config)) from exc
    except (ConnectionResetError, BrokenPipeError) as exc:
        raise FedsockError(f"the server at {config.address} dropped the connection ({exc.strerror})") from exc
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    return run_client(parse_config(argv))


def cli() -> int:
    return run_main("fl_client.py", main)


if __name__ == "__main__":
    sys.exit(cli())
