"""A client's life over the network: join (with retries), set up, say <READY>, then answer the
server until it says the run is over. fl_client.py parses the flags and calls `run_client`.

Everything about the run (dataset, which examples are this client's, model, rounds) comes
from the server's <METADATA>. The client then loads its data, builds the model and warms
PyTorch up (fedsock/local_training.py), and only then says <READY>: the lobby counts it
once it can train, and its first round is as fast as any other. Which message may come
when is fedsock/order.py's to say.
"""

from __future__ import annotations

import select
import socket
import ssl
import time
from typing import Any

from fedsock import security
from fedsock.config import ClientConfig
from fedsock.console import FedsockError, RefusedError, UsageError, say, warn
from fedsock.identity import load_identity
from fedsock.order import ROLE_CLIENT, SECAGG_REQUESTS, Order
from fedsock.policy import Policy, PolicyRefused
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
    SESSION_END,
    SUCCESS,
    UPDATE,
    WAITING,
    BadMessage,
    ConnectionClosed,
    ProtocolError,
    encode_message,
)

# The optional protocol features this client supports (sent in <HELLO>; a run that needs
# others refuses it with a sentence, rather than letting it train without them).
FEATURES: list[str] = ["dp-local", "compression", "secagg", "sessions", "augment"]
# Reconnect backoff: first pause and the longest one.
RETRY_FIRST_S, RETRY_MAX_S = 0.1, 2.0


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
    conn.send([encode_message(HELLO, protocol_version=PROTOCOL_VERSION, client_id=config.client_id, features=FEATURES,
                              policy=Policy.of(config).to_json())])
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

    def finished(self, message: dict[str, Any], stale: bool = False) -> bool:
        """Show a control message; True when the run is over. A `stale` <WAITING> (it was waiting in the
        socket while this client loaded its data or trained) describes the past ("0 of 5 ready" when all
        are) and is not shown: the next heartbeat says what is true now."""
        header = message["header"]
        if header == FINISHED:
            say(self.config.who, f"server: {message['message']}")
            return True
        if header == SESSION_END:
            say(self.config.who, f"server: {message['message']}")
            return False
        if header == SUCCESS and not message["accepted"]:
            warn(self.config.who, f"round {message['round']}: {message['message']}")
        if header == WAITING and not stale and message["message"] != self.last_waiting and not self.config.quiet:
            self.last_waiting = message["message"]
            say(self.config.who, f"server: {self.last_waiting}")
        return False


def send_or_give_up(conn: BlockingConnection, frames: list, config: ClientConfig) -> None:
    try:
        conn.send(frames)
    except socket.timeout as exc:
        raise FedsockError(f"the server at {config.address} took no byte of this client's answer for "
                           f"{conn.sock.gettimeout():g} s; giving up") from exc


def tell_server(conn: BlockingConnection | None, why: str) -> None:
    """This client's last word, an <ERROR> that says why it leaves: sent if it can be, in 5 s."""
    if conn is None:
        return
    try:
        conn.send([encode_message(ERROR, message=why[:4000])], timeout_s=5)
    except OSError:
        pass


def run_client(config: ClientConfig) -> int:
    tls = security.client_tls_context(config.tls, config.tls_ca, config.tls_cert, config.tls_key, config.tls_insecure, config.who)
    token = security.load_token(config.auth_token_file, config.who)
    policy = Policy.of(config)
    me = load_identity(config.identity, config.client_id) if config.identity else None  # a bad file: before connecting
    conn, told_server, joined = None, False, False
    try:
        conn, order, meta = join(config, tls, token)
        joined = True
        where = (f"{meta['dataset']}, {meta['partition']} partition {config.client_id} of {meta['num_clients']}"
                 if meta["dataset"] else "its own data")
        slowed = (f"; --slowdown {config.slowdown:g}: each round's training is made to take {config.slowdown:g} times "
                  f"as long" if config.slowdown > 1 else "")
        say(config.who, f"joined the server at {config.address}: {meta['model']} on {where}{slowed}")
        if not (policy.empty and config.quiet):
            say(config.who, f"privacy policy: {policy.describe()}")
        try:
            policy.check_welcome(meta)
            from fedsock.local_training import LocalTrainer  # PyTorch and the data: only now, after the welcome

            trainer = LocalTrainer(config, meta, policy, me)
        except (FedsockError, KeyboardInterrupt) as exc:  # tell the server why this client leaves
            reason = str(exc) if isinstance(exc, FedsockError) else "interrupted"
            conn.send([encode_message(ERROR, message=f"client setup failed: {reason}")])
            told_server = True
            raise
        order.send(READY)
        # Its label balance, for the server's dashboard: counts, but still a fact about its data, so a client
        # whose policy asks for any protection keeps it to itself.
        counts = {"label_counts": trainer.label_counts()} if policy.empty else {}
        conn.send([encode_message(READY, num_examples=trainer.num_examples, test_examples=len(trainer.data.test_y),
                                  **counts)])
        # The server sends <WAITING> every heartbeat while we wait: three missed ones and it is gone.
        # The same bound holds for each send: a server that takes no byte for that long is gone
        # (a slow link moves bytes all the time; only a dead one stops).
        conn.sock.settimeout(3 * meta["heartbeat_s"] + 2)
        status = Status(config)
        while True:  # what may come when is the order's to say; here each message is answered
            backlog = server_spoke(conn)  # already here: sent while this client was busy
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
                update = trainer.fit(conn, message, order)
                while server_spoke(conn):  # a stopped server's <FINISHED> is read, not answered
                    if status.finished(expect(conn, order), stale=True):
                        return 0
                order.send(UPDATE)
                send_or_give_up(conn, update, config)
            elif status.finished(message, stale=backlog):
                return 0
    except PolicyRefused as exc:
        if not told_server:
            tell_server(conn, f"this client's privacy policy refuses: {exc}")
        raise PolicyRefused(f"this client's privacy policy refuses the run: {exc}") from exc
    except socket.timeout as exc:
        waited = f" for {conn.sock.gettimeout():g} s" if conn is not None else ""
        raise FedsockError(f"the server at {config.address} sent nothing{waited}; giving up") from exc
    except ConnectionClosed as exc:
        raise FedsockError(f"the server at {config.address} closed the connection (it stopped or crashed)") from exc
    except ProtocolError as exc:
        if not told_server and not isinstance(exc, ConnectionClosed):
            tell_server(conn, f"bad data from the server: {exc}")  # as it would tell us
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
