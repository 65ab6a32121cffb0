"""fedsock server: waits for clients, then runs rounds of federated averaging.

One round, as a student would follow it:
  1. start_round()      encodes nothing new: the global model was encoded once when
                        it was made, and the same bytes go to every idle client.
  2. each client trains and sends an <UPDATE>; serve_client() reads it,
     receive_update() checks it and folds it into the round's running average.
  3. run_rounds()       waits until every client answered, dropped, or the round
                        timed out, then averages, encodes the new global model,
                        and starts the next round at once; the evaluation and the
                        round's report run in a worker thread meanwhile.

    python fl_server.py --num-rounds 10 --time-to-wait 10
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import resource
import signal
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

import client_helper
import neural_net_helper as nnh
from fedsock import run_files
from fedsock import security
from fedsock.console import ArgumentParser, ExitStatus, FedsockError, UsageError, number, run_main, say, warn
from fedsock.fedavg import RunningAverage
from socket_methods import (
    PRE_AUTH_CONTROL_BYTES,
    PROTOCOL_VERSION,
    BadMessage,
    ConnectionClosed,
    ProtocolError,
    WeightsBuffer,
    check_finite,
    check_layout,
    decode_weights,
    encode_message,
    encode_weights,
    frame_weights,
    weights_layout,
)
from fedsock.transport import AsyncConnection, Traffic, open_accepted, send_plain_error

WHO = "server"
# Updates being received at once. Each needs a model-sized buffer, so this, not the
# number of clients, sets the server's memory; the other clients wait in TCP.
RECEIVE_BUFFERS = 4
# Waiting in TCP costs kernel memory, though: Linux grows each connection's socket
# buffers by itself, up to several MB, so a thousand clients sending their updates at
# once can pin gigabytes, past the kernel's TCP memory limit (tcp_mem), where it drops
# packets and connections stall in retransmission back-off for minutes. So with more
# than 64 clients each connection's buffers are fixed at an equal share of this budget
# (at least SOCKET_BUFFER_MIN_BYTES); with fewer, a share would be no cap and the
# kernel's tuning is kept. 256 MB in flight still carry 2.5 GB/s at 100 ms round trips.
SOCKET_BUFFER_BUDGET_BYTES = 256 << 20
SOCKET_BUFFER_MIN_BYTES = 256 << 10
SOCKET_BUFFER_AUTOTUNED_BYTES = 4 << 20
# Settings that decide each client's data and model: a resumed run must keep them.
FIXED_ON_RESUME = ("model", "dataset", "num_clients", "partition", "alpha", "seed")


def id_ranges(ids: Iterable[int]) -> str:
    """Client IDs as runs, "1-3, 5, 7-9", so that a thousand of them fit on a line."""
    runs: list[list[int]] = []
    for i in sorted(ids):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    server_port: int = 50052
    num_clients: int = 5
    min_clients: int = 1
    time_to_wait_s: float = 10.0
    num_rounds: int = 10
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    model: str = "cnn"
    dataset: str = "mnist"
    data_root: str | None = None
    partition: str = "iid"
    alpha: float = 0.5
    seed: int = 0
    device: str = "auto"
    output_dir: str | None = None
    round_timeout_s: float = 600.0
    round_retries: int = 3
    handshake_timeout_s: float = 10.0
    heartbeat_s: float = 10.0
    max_message_mb: float = 64.0
    max_pending: int = 64
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    auth_token_file: str | None = None
    auth_tokens_file: str | None = None
    resume: str | None = None
    threads: int = 1
    quiet: bool = False


# --------------------------------------------------------------------------- flags


_positive_int = number(int, 1)
_positive_float = number(float, 0, positive=True)
_non_negative_float = number(float, 0)
_port = number(int, 0, 65535)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="fl_server.py",
        description="fedsock server: federated averaging over plain TCP (or TLS).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    net = parser.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    net.add_argument("--server-port", type=_port, default=50052, help="TCP port; 0 picks a free one")
    fed = parser.add_argument_group("federation")
    fed.add_argument("--num-clients", type=_positive_int, default=5, help="N: clients have ids 1..N, one data partition each")
    fed.add_argument("--min-clients", type=_positive_int, default=1, help="fewest clients to start with, and fewest updates a round needs")
    fed.add_argument("--time-to-wait", dest="time_to_wait_s", type=_non_negative_float, default=10.0,
                     help="seconds to wait for more clients after the first joins")
    fed.add_argument("--num-rounds", type=_positive_int, default=10, help="rounds of federated averaging")
    train = parser.add_argument_group("training (sent to the clients every round)")
    train.add_argument("--model", choices=nnh.MODELS, default="cnn", help="logreg, mlp (2NN) or cnn (McMahan et al. 2017)")
    train.add_argument("--local-epochs", type=_positive_int, default=1, help="epochs each client trains per round")
    train.add_argument("--batch-size", type=_positive_int, default=32, help="client minibatch size")
    train.add_argument("--lr", type=_positive_float, default=0.05, help="client SGD learning rate")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=tuple(client_helper.DATASETS), default="mnist", help="dataset (MNIST ships with fedsock)")
    data.add_argument("--data-root", default=None, help="folder with the dataset files (default: the project's data/)")
    data.add_argument("--partition", choices=client_helper.PARTITIONS, default="iid", help="how the training set is split among clients")
    data.add_argument("--alpha", type=_positive_float, default=0.5, help="Dirichlet concentration for --partition dirichlet (smaller: more label skew)")
    data.add_argument("--seed", type=number(int, 0, 2**32 - 1), default=0, help="seed for the partition, the initial model and client shuffling")
    data.add_argument("--device", choices=nnh.DEVICES, default="auto", help="where the server evaluates the global model")
    data.add_argument("--threads", type=number(int, 0), default=1,
                      help="PyTorch CPU threads for evaluation; 0 keeps PyTorch's default. 1 leaves the cores to local clients")
    data.add_argument("--use-cuda", action=argparse.BooleanOptionalAction, default=None,
                      help="the original tool's switch: same as --device cuda / --device cpu")
    out = parser.add_argument_group("output")
    out.add_argument("--output-dir", default=None, help="where metrics.csv, the model, the plot and checkpoints go (default: runs/<timestamp>/)")
    out.add_argument("--resume", default=None, metavar="CHECKPOINT", help="continue a run from its checkpoint.fsck")
    out.add_argument("--quiet", action="store_true", help="print only the round lines and errors")
    out.add_argument("--traceback", action="store_true", help="show a full traceback on errors (for bug reports)")
    fault = parser.add_argument_group("fault tolerance")
    fault.add_argument("--round-timeout", dest="round_timeout_s", type=_positive_float, default=600.0,
                       help="seconds a round waits for updates; late clients are left out of it")
    fault.add_argument("--round-retries", type=number(int, 0), default=3, help="times a round that got too few updates is retried before the run stops")
    fault.add_argument("--handshake-timeout", dest="handshake_timeout_s", type=_positive_float, default=10.0,
                       help="seconds a new connection has to complete TLS, hello and authentication")
    fault.add_argument("--heartbeat-interval", dest="heartbeat_s", type=_positive_float, default=10.0,
                       help="seconds between <WAITING> messages to connected clients; a client gives up on a server "
                            "silent for three intervals")
    fault.add_argument("--max-message-mb", type=_positive_float, default=64.0, help="largest frame accepted; also caps the model size")
    fault.add_argument("--max-pending", type=_positive_int, default=64, help="most connections that may be in their handshake at once")
    sec = parser.add_argument_group("security")
    sec.add_argument("--tls-cert", default=None, help="server certificate (PEM); enables TLS")
    sec.add_argument("--tls-key", default=None, help="private key of --tls-cert (PEM)")
    sec.add_argument("--tls-client-ca", default=None, help="require client certificates signed by this CA (mutual TLS)")
    sec.add_argument("--auth-token-file", default=None, help=f"shared enrolment secret (or set ${security.TOKEN_ENV})")
    sec.add_argument("--auth-tokens-file", default=None, help="per-client secrets, lines of 'CLIENT_ID SECRET'")
    return parser


def parse_config(argv: list[str] | None) -> tuple[ServerConfig, dict | None, bytearray | None]:
    """Flags to a config; with --resume, the checkpoint's settings under the flags given now."""
    parser = build_parser()
    args = parser.parse_args(argv)
    given = vars(build_parser_suppressed().parse_args(argv))
    if args.use_cuda is not None:
        if "device" in given and args.device != ("cuda" if args.use_cuda else "cpu"):
            parser.error("--use-cuda/--no-use-cuda contradicts --device")
        args.device = "cuda" if args.use_cuda else "cpu"
        given["device"] = args.device
    names = {f.name for f in fields(ServerConfig)}
    config = ServerConfig(**{k: v for k, v in vars(args).items() if k in names})
    state = blob = None
    if config.resume:
        state, blob = run_files.read_checkpoint(config.resume)
        saved = {k: v for k, v in state["config"].items() if k in names}
        for name in FIXED_ON_RESUME:
            if name in given and given[name] != saved.get(name):
                raise UsageError(f"--{name.replace('_', '-')} cannot change on --resume (the run used {saved.get(name)!r})")
        merged = {**saved, **{k: v for k, v in given.items() if k in names}}
        merged["resume"] = config.resume
        if "output_dir" not in given:
            merged["output_dir"] = str(Path(config.resume).resolve().parent)
        config = ServerConfig(**merged)
    if config.min_clients > config.num_clients:
        parser.error(f"--min-clients {config.min_clients} is more than --num-clients {config.num_clients}")
    return config, state, blob


def build_parser_suppressed() -> argparse.ArgumentParser:
    """The same flags with no defaults: parsing with it tells which flags were given."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return parser


# --------------------------------------------------------------------------- state


class Stopped(Exception):
    """SIGINT or SIGTERM asked the server to stop."""


class RunFailed(FedsockError):
    """The federation cannot go on (too many failed rounds)."""


@dataclass
class ClientSession:
    client_id: int
    conn: AsyncConnection
    busy_round: int | None = None  # the round whose model it got and has not answered yet


@dataclass
class RoundState:
    number: int
    expected: set[int]
    running: RunningAverage
    started: float
    traffic_at_start: tuple[int, int]
    reported: dict[int, dict[str, Any]] = field(default_factory=dict)  # id -> the <UPDATE> message
    dropped: dict[int, str] = field(default_factory=dict)  # id -> why
    complete: asyncio.Event = field(default_factory=asyncio.Event)
    open: bool = True
    seconds: float = 0.0  # from the first byte of the broadcast to the round's close

    def settle(self) -> None:
        if self.expected <= self.reported.keys() | self.dropped.keys():
            self.complete.set()


class Federation:
    def __init__(self, config: ServerConfig, listener: socket.socket, output_dir: Path, setup: dict[str, Any]):
        self.config = config
        self.listener = listener
        self.output_dir = output_dir
        self.info: client_helper.DatasetInfo = setup["info"]
        self.tls = setup["tls"]
        self.auth: security.Authenticator = setup["auth"]
        self.eval_model: torch.nn.Module = setup["model"]
        self.test_x, self.test_y = setup["test"]
        self.metrics: list[dict[str, Any]] = setup["metrics"]
        self.rounds_done: int = setup["rounds_done"]
        self.weights: dict[str, torch.Tensor] = setup["weights"]
        self.layout, self.blob = encode_weights(self.weights)
        self.traffic = Traffic()
        self.clients: dict[int, ClientSession] = {}
        self.enrolled: set[int] = set()
        self.training_started = False
        self.current: RoundState | None = None
        self.changed = asyncio.Event()  # a client joined, left or became idle
        self.stopping = asyncio.Event()
        self.stop_signal: signal.Signals | None = None
        self.pending = 0
        self.drop_log: list[str] = []
        self.buffers: asyncio.Queue[WeightsBuffer] = asyncio.Queue()
        for _ in range(min(RECEIVE_BUFFERS, config.num_clients)):
            self.buffers.put_nowait(WeightsBuffer(self.layout))
        share = SOCKET_BUFFER_BUDGET_BYTES // config.num_clients
        self.socket_buffer_bytes = max(share, SOCKET_BUFFER_MIN_BYTES) if share < SOCKET_BUFFER_AUTOTUNED_BYTES else None
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="evaluate")
        self.report_task: asyncio.Task | None = None
        self.tasks: set[asyncio.Task] = set()
        self.finishing = False

    def log(self, message: str) -> None:
        if not self.config.quiet:
            say(WHO, message)

    def spawn(self, coroutine) -> asyncio.Task:
        task = asyncio.create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # ---- waiting, always bounded by a stop request
    def request_stop(self, signum: signal.Signals) -> None:
        if self.stopping.is_set():
            say(WHO, "second signal: exiting at once (the last checkpoint is intact)")
            os._exit(128 + signum)
        self.stop_signal = signum
        self.stopping.set()

    async def wait_event(self, event: asyncio.Event, timeout_s: float | None) -> bool:
        """Wait for `event` or the timeout; raise Stopped on SIGINT/SIGTERM."""
        waiters = [asyncio.ensure_future(event.wait()), asyncio.ensure_future(self.stopping.wait())]
        try:
            await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        if self.stopping.is_set():
            raise Stopped
        return event.is_set()

    async def wait_until(self, condition: Callable[[], bool], timeout_s: float | None) -> bool:
        """Wait until `condition()` holds (checked whenever clients come, go or finish)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not condition():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            self.changed.clear()
            await self.wait_event(self.changed, remaining)
        return True

    def idle_clients(self) -> list[ClientSession]:
        return [s for s in self.clients.values() if s.busy_round is None]

    # ---- the run
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self.request_stop, signum)
        loop.set_exception_handler(lambda _, context: warn(WHO, f"internal: {context.get('message')} {context.get('exception') or ''}"))
        accepting = self.spawn(self.accept_loop())
        beating = self.spawn(self.heartbeat_loop())
        try:
            await self.lobby()
            await self.run_rounds()
            await self.finish(True, f"training finished after {self.rounds_done} rounds")
            return ExitStatus.OK
        except Stopped:
            name = signal.Signals(self.stop_signal).name
            self.log(f"{name}: stopping after round {self.rounds_done}")
            await self.finish(False, f"the server was stopped ({name}) after round {self.rounds_done}; it can resume from its checkpoint")
            return ExitStatus.INTERRUPTED if self.stop_signal == signal.SIGINT else ExitStatus.TERMINATED
        except RunFailed as exc:
            await self.finish(False, str(exc))
            raise
        finally:
            accepting.cancel()
            beating.cancel()
            self.listener.close()
            self.worker.shutdown(wait=True)

    async def lobby(self) -> None:
        config = self.config
        await self.wait_until(lambda: bool(self.clients), None)
        if config.time_to_wait_s and len(self.clients) < config.num_clients:
            self.log(f"first client is in; waiting {config.time_to_wait_s:g} s for more (up to {config.num_clients})")
            await self.wait_until(lambda: len(self.clients) >= config.num_clients, config.time_to_wait_s)
        if len(self.clients) < config.min_clients:
            self.log(f"{len(self.clients)} client(s) here, --min-clients is {config.min_clients}: waiting for more")
            await self.wait_until(lambda: len(self.clients) >= config.min_clients, None)
        self.training_started = True
        ids = id_ranges(self.clients)
        first = self.rounds_done + 1
        say(WHO, f"training starts with {len(self.clients)} client(s) [{ids}]: rounds {first}..{config.num_rounds} "
                 f"of {config.model} on {config.dataset}")

    async def run_rounds(self) -> None:
        config, failures = self.config, 0
        while self.rounds_done < config.num_rounds:
            number = self.rounds_done + 1
            state = None
            if await self.wait_until(lambda: len(self.idle_clients()) >= config.min_clients, config.round_timeout_s):
                state = self.start_round(number)
                if self.report_task:  # the previous round's evaluation ran while this model went out
                    await self.report_task
                    self.report_task = None
                await self.wait_event(state.complete, config.round_timeout_s)
                self.close_round(state)
            got = len(state.reported) if state else 0
            if got < config.min_clients:
                failures += 1
                say(WHO, f"round {number}: {got} update(s) arrived, {config.min_clients} needed (--min-clients); "
                         f"the global model stays as it was")
                if failures > config.round_retries:
                    raise RunFailed(f"round {number} failed {failures} times; the last good model is round {self.rounds_done}")
                say(WHO, f"retrying round {number} (retry {failures} of {config.round_retries})")
                continue
            failures = 0
            self.weights = state.running.result()
            self.layout, self.blob = encode_weights(self.weights)  # once per round, for every client and the checkpoint
            self.rounds_done = number
            loop = asyncio.get_running_loop()
            self.report_task = asyncio.ensure_future(
                loop.run_in_executor(self.worker, self.report_round, state, self.weights, self.layout, self.blob, self.round_row(state))
            )
        if self.report_task:
            await self.report_task
            self.report_task = None

    def start_round(self, number: int) -> RoundState:
        """Send the global model, encoded once, to every idle client."""
        participants = self.idle_clients()
        state = RoundState(
            number=number,
            expected={s.client_id for s in participants},
            running=RunningAverage(self.weights),
            started=time.perf_counter(),
            traffic_at_start=(self.traffic.sent, self.traffic.received),
        )
        self.current = state
        frames = frame_weights(
            "<MODEL>", self.blob, round=number, local_epochs=self.config.local_epochs,
            batch_size=self.config.batch_size, lr=self.config.lr, weights=self.layout,
        )
        for session in participants:
            session.busy_round = number
            self.spawn(self.send_or_drop(session, frames))
        return state

    def close_round(self, state: RoundState) -> None:
        state.open = False
        state.seconds = time.perf_counter() - state.started
        self.current = None
        for client_id in sorted(state.expected - state.reported.keys() - state.dropped.keys()):
            self.note_drop(f"client {client_id} sent no update within {self.config.round_timeout_s:g} s in round {state.number}; "
                           f"left out of that round")

    def round_row(self, state: RoundState) -> dict[str, Any]:
        updates = list(state.reported.values())
        examples = sum(u["num_examples"] for u in updates)
        return {
            "round": state.number,
            "clients": len(updates),
            "expected": len(state.expected),
            "train_loss": sum(u["train_loss"] * u["num_examples"] for u in updates) / examples,
            "seconds": state.seconds,
            "bytes_sent": self.traffic.sent - state.traffic_at_start[0],
            "bytes_received": self.traffic.received - state.traffic_at_start[1],
            "max_fit_seconds": max(u["fit_seconds"] for u in updates),
        }

    def report_round(self, state: RoundState, weights, layout, blob, row: dict[str, Any]) -> None:
        """In the worker thread: evaluate the round's model, print its line, save metrics and a checkpoint."""
        nnh.set_weights(self.eval_model, weights)
        accuracy, loss = nnh.evaluate(self.eval_model, self.test_x, self.test_y)
        row.update(test_accuracy=accuracy, test_loss=loss)
        self.metrics.append({k: row[k] for k in run_files.METRIC_COLUMNS})
        run_files.write_metrics(self.output_dir / "metrics.csv", self.metrics)
        run_files.write_checkpoint(
            self.output_dir / run_files.CHECKPOINT_NAME, asdict(self.config), state.number, self.metrics, layout, blob
        )
        say(WHO, f"round {state.number}/{self.config.num_rounds}  clients {row['clients']}/{row['expected']}  "
                 f"test acc {100 * accuracy:.2f}%  loss {loss:.4f}  {row['seconds']:.1f} s")

    async def finish(self, completed: bool, message: str) -> None:
        if self.report_task:
            await self.report_task
        if self.metrics:
            message += f"; final test accuracy {100 * self.metrics[-1]['test_accuracy']:.2f}%"
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.worker, self.write_outputs)
        finished = encode_message("<FINISHED>", completed=completed, rounds_completed=self.rounds_done, message=message)
        self.finishing = True
        sessions = list(self.clients.values())
        await asyncio.gather(*(self.say_goodbye(s, finished) for s in sessions))
        for line in self.drop_log:
            say(WHO, f"dropped: {line}")
        say(WHO, f"{message}. Outputs in {self.output_dir}")

    async def say_goodbye(self, session: ClientSession, finished: bytes) -> None:
        try:
            await asyncio.wait_for(session.conn.send([finished]), 5)
        except (ProtocolError, asyncio.TimeoutError):
            pass
        await session.conn.close()

    def write_outputs(self) -> None:
        run_files.write_model(self.output_dir / "model.pt", self.weights)
        title = f"fedsock: {self.config.model} on {self.config.dataset}, {self.config.num_clients} clients, {self.config.partition}"
        run_files.write_plot(self.output_dir / "accuracy.png", self.metrics, title)

    def status(self) -> str:
        """What the server is waiting for, in words: the text of <WAITING>."""
        state, config = self.current, self.config
        if state is not None:
            return f"round {state.number}: {len(state.reported)} of {len(state.expected)} updates in"
        if not self.training_started:
            return (f"waiting for clients: {len(self.clients)} of {config.num_clients} connected, "
                    f"training starts with at least {config.min_clients}")
        return f"between rounds: {len(self.idle_clients())} client(s) ready, {config.min_clients} needed"

    async def heartbeat_loop(self) -> None:
        """Tell every connected client, now and then, that the server is alive and what it waits for,
        so that a client can tell a slow round from a server that is gone."""
        while True:
            await asyncio.sleep(self.config.heartbeat_s)  # a period, not synchronisation
            frame = encode_message("<WAITING>", message=self.status())
            for session in list(self.clients.values()):
                if not session.conn.sending:  # a model on its way says the same
                    self.spawn(self.send_or_drop(session, [frame]))

    # ---- connections
    async def accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, address = await loop.sock_accept(self.listener)
            except OSError as exc:  # out of file descriptors, say: keep serving the others
                warn(WHO, f"accept failed: {exc}")
                await asyncio.sleep(0.5)
                continue
            if self.pending >= self.config.max_pending:
                warn(WHO, f"{address[0]}:{address[1]}: {self.pending} connections already in their handshake; refused")
                sock.close()
                continue
            self.pending += 1  # counted here: sock_accept does not yield while a burst waits in the backlog
            self.spawn(self.handle_connection(sock, f"{address[0]}:{address[1]}"))

    async def handle_connection(self, sock: socket.socket, peer: str) -> None:
        """Handshake within --handshake-timeout, then serve the client until it leaves."""
        conn = session = None
        try:
            async with asyncio.timeout(self.config.handshake_timeout_s):
                conn = await open_accepted(
                    sock, self.traffic, self.tls, self.config.handshake_timeout_s, self.config.round_timeout_s,
                    require_client_cert=bool(self.config.tls_client_ca), socket_buffer_bytes=self.socket_buffer_bytes,
                )
                session = await self.handshake(conn)
        except (TimeoutError, asyncio.TimeoutError):
            message = f"no complete handshake within {self.config.handshake_timeout_s:g} s"
            warn(WHO, f"{peer}: {message}; disconnected")
            if conn is not None:
                await conn.send_error(message)
            elif self.tls is None:  # before TLS we can only answer in plain frames
                send_plain_error(sock, message)
        except ProtocolError as exc:
            warn(WHO, f"{peer}: {exc}; disconnected")
            if conn is not None and not isinstance(exc, ConnectionClosed):
                await conn.send_error(str(exc))
        except OSError as exc:
            warn(WHO, f"{peer}: {exc}; disconnected")
        finally:
            self.pending -= 1
        if session is None:
            if conn is not None:
                await conn.close()
            else:
                sock.close()
            return
        await self.serve_client(session)

    async def handshake(self, conn: AsyncConnection) -> ClientSession | None:
        hello = await conn.recv_message(PRE_AUTH_CONTROL_BYTES)
        if hello["header"] != "<HELLO>":
            raise BadMessage(f"expected <HELLO> first, got {hello['header']}")
        if hello["protocol_version"] != PROTOCOL_VERSION:
            raise BadMessage(f"protocol version {hello['protocol_version']} is not supported; this server speaks {PROTOCOL_VERSION}")
        client_id = hello["client_id"]
        if self.auth.required:
            nonce = security.new_nonce()
            await conn.send([encode_message("<CHALLENGE>", nonce=nonce.hex())])
            answer = await conn.recv_message(PRE_AUTH_CONTROL_BYTES)
            if answer["header"] != "<AUTH>" or not self.auth.verify(client_id, nonce, answer["mac"]):
                raise BadMessage(f"authentication failed for client id {client_id}")
        refusal = self.admission_refusal(client_id)
        if refusal:
            warn(WHO, f"{conn.peer}: refused client {client_id}: {refusal}")
            await conn.send_error(refusal)
            await conn.close()
            return None
        session = ClientSession(client_id, conn)
        self.clients[client_id] = session
        self.enrolled.add(client_id)
        self.changed.set()
        config = self.config
        await conn.send([encode_message(
            "<METADATA>", client_id=client_id, num_clients=config.num_clients, dataset=config.dataset,
            partition=config.partition, alpha=config.alpha, seed=config.seed, model=config.model,
            num_rounds=config.num_rounds, round_timeout_s=config.round_timeout_s, heartbeat_s=config.heartbeat_s,
            next_round=self.rounds_done + 1,
        )])
        rejoined = " (rejoined)" if self.training_started else ""
        self.log(f"client {client_id} joined from {conn.peer}{rejoined} ({len(self.clients)}/{config.num_clients} connected)")
        return session

    def admission_refusal(self, client_id: int) -> str | None:
        if not 1 <= client_id <= self.config.num_clients:
            return f"client id {client_id} is not part of this run (ids are 1..{self.config.num_clients})"
        if client_id in self.clients:
            return f"client id {client_id} is already connected to this run"
        if self.training_started and client_id not in self.enrolled:
            return (f"training already started (round {self.rounds_done + 1} of {self.config.num_rounds}); "
                    f"this run takes no new clients")
        return None

    async def serve_client(self, session: ClientSession) -> None:
        """Read everything a joined client sends, for as long as it stays."""
        conn, reason = session.conn, "connection closed"
        try:
            while True:
                message = await conn.recv_message()
                if message["header"] == "<UPDATE>":
                    await self.receive_update(session, message)
                elif message["header"] == "<ERROR>":
                    reason = f"it reported an error: {message['message'][:200]}"
                    break
                else:
                    raise BadMessage(f"unexpected {message['header']} from a joined client")
        except ConnectionClosed:
            pass
        except ProtocolError as exc:
            reason = str(exc)
            warn(WHO, f"client {session.client_id} ({conn.peer}): {exc}; disconnected")
            self.forget(session, reason)  # before the await: no new round may pick this client
            await conn.send_error(str(exc))
        self.forget(session, reason)
        await conn.close()

    async def receive_update(self, session: ClientSession, update: dict[str, Any]) -> None:
        number = update["round"]
        if session.busy_round is None or number != session.busy_round:
            sent = f"round {session.busy_round}" if session.busy_round else "no model"
            raise BadMessage(f"update for round {number}, but this client was sent {sent}")
        if update["client_id"] != session.client_id:
            raise BadMessage(f"update carries client id {update['client_id']}, but this connection is client {session.client_id}")
        if not 1 <= update["num_examples"] <= self.info.train_size:
            raise BadMessage(f"num_examples {update['num_examples']} is outside 1..{self.info.train_size}")
        if not 0 <= update["local_test_accuracy"] <= 1 or update["fit_seconds"] < 0:
            raise BadMessage("local_test_accuracy must be within 0..1 and fit_seconds >= 0")
        check_layout(update["weights"], self.layout)
        buffer = await self.buffers.get()
        try:
            await session.conn.recv_blob(buffer.buffer)
            tensors = buffer.tensors  # views of the bytes just received
            check_finite(tensors)
            state = self.current
            accepted = state is not None and state.number == number and state.open
            if accepted:
                state.running.add(tensors, update["num_examples"])
        finally:
            self.buffers.put_nowait(buffer)
        session.busy_round = None
        if accepted:
            # A retried round keeps the same model, so an update trained in a failed attempt of
            # this round is as good as any: it counts, and so does the model it was sent.
            state.expected.add(session.client_id)
            state.reported[session.client_id] = {k: v for k, v in update.items() if k != "weights"}
            state.settle()
            note = "update accepted"
        else:
            note = f"round {number} had closed before this update arrived; it was not used"
            self.log(f"client {session.client_id}: late update for round {number} discarded")
        self.changed.set()
        await session.conn.send([encode_message("<SUCCESS>", round=number, accepted=accepted, message=note)])

    async def send_or_drop(self, session: ClientSession, frames: list) -> None:
        try:
            await session.conn.send(frames)
        except ProtocolError:
            pass  # serve_client sees the same closed connection and drops the client

    def forget(self, session: ClientSession, reason: str) -> None:
        if self.clients.get(session.client_id) is not session:
            return
        del self.clients[session.client_id]
        state = self.current
        if state is not None and session.busy_round == state.number and session.client_id not in state.reported:
            state.dropped[session.client_id] = reason
            state.settle()
            self.note_drop(f"client {session.client_id} in round {state.number} ({reason}); the round goes on without it")
        elif not self.finishing:
            self.log(f"client {session.client_id} left ({reason})")
        self.changed.set()

    def note_drop(self, line: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        self.drop_log.append(f"{stamp} {line}")
        warn(WHO, line)


# --------------------------------------------------------------------------- setup


def open_listener(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UsageError(f"--host {host}: {exc.strerror}") from exc
    family, _, _, _, address = infos[0]
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(address)
        listener.listen(1024)
    except OSError as exc:
        listener.close()
        if exc.errno == 98:  # EADDRINUSE
            raise UsageError(f"port {port} on {host} is already in use (another server?); pick another --server-port") from exc
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    listener.setblocking(False)
    return listener


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def raise_file_limit() -> None:
    """A thousand clients need a thousand file descriptors; many systems start at 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def make_output_dir(requested: str | None) -> Path:
    path = Path(requested) if requested else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    if not requested:
        suffix = 1
        while path.exists():
            suffix += 1
            path = Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{suffix}"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create --output-dir {path}: {exc.strerror}") from exc
    return path


def prepare(config: ServerConfig, checkpoint: dict | None, checkpoint_blob: bytearray | None) -> dict[str, Any]:
    """Everything that can fail on bad flags or files, done before the server listens."""
    info = client_helper.DATASETS[config.dataset]
    device = nnh.choose_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    tls = security.server_tls_context(config.tls_cert, config.tls_key, config.tls_client_ca)
    if config.auth_token_file and config.auth_tokens_file:
        raise UsageError("use --auth-token-file or --auth-tokens-file, not both")
    per_client = security.read_client_secrets(config.auth_tokens_file, WHO) if config.auth_tokens_file else None
    shared = None if per_client else security.load_token(config.auth_token_file, WHO)
    train = client_helper.load_split(config.dataset, "train", config.data_root)
    parts = client_helper.partition_indices(train.labels, config.num_clients, config.partition, config.alpha, config.seed)
    test = client_helper.load_split(config.dataset, "test", config.data_root)
    model = nnh.build_model(config.model, info, config.seed).to(device)
    if checkpoint is not None:
        weights = {k: v.clone() for k, v in decode_weights(checkpoint["weights"], checkpoint_blob).items()}
        check_layout(checkpoint["weights"], weights_layout(nnh.get_weights(model)))
    else:
        weights = {k: v.cpu().clone() for k, v in nnh.get_weights(model).items()}
    model_bytes = sum(t.numel() * t.element_size() for t in weights.values())
    if model_bytes > config.max_message_mb * 2**20:
        raise UsageError(f"the {config.model} model has {model_bytes / 2**20:.1f} MB of weights, over --max-message-mb {config.max_message_mb:g}")
    skew = client_helper.label_skew(train.labels, parts)
    sizes = sorted(len(p) for p in parts)
    say(WHO, f"{config.dataset}: {len(train.labels)} training examples in {config.num_clients} {config.partition} partitions "
             f"of {sizes[0]}..{sizes[-1]} (label skew {skew:.2f}); {len(test.labels)} test examples on {device}")
    return {
        "info": info,
        "tls": tls,
        "auth": security.Authenticator(shared, per_client),
        "model": model,
        "test": nnh.to_tensors(test.images, test.labels, info, device),
        "weights": weights,
        "metrics": list(checkpoint["metrics"]) if checkpoint else [],
        "rounds_done": checkpoint["round"] if checkpoint else 0,
    }


async def serve(config: ServerConfig, setup: dict[str, Any], output_dir: Path) -> int:
    listener = open_listener(config.host, config.server_port)
    host, port = listener.getsockname()[:2]
    federation = Federation(config, listener, output_dir, setup)
    transport = "TLS" + (" with client certificates" if config.tls_client_ca else "") if setup["tls"] else "plain TCP"
    auth = "token authentication" if setup["auth"].required else "no authentication"
    if not is_loopback(config.host) and not (setup["tls"] and setup["auth"].required):
        warn(WHO, f"listening on {config.host} without TLS and a token: anyone who can reach this port can join and read the model")
    say(WHO, f"listening on {host}:{port} ({transport}, {auth}); output in {output_dir}")
    return await federation.run()


def main(argv: list[str] | None = None) -> int:
    config, checkpoint, blob = parse_config(argv)
    raise_file_limit()
    setup = prepare(config, checkpoint, blob)
    output_dir = make_output_dir(config.output_dir)
    (output_dir / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    if checkpoint is not None:
        run_files.write_metrics(output_dir / "metrics.csv", setup["metrics"])
        say(WHO, f"resuming from {config.resume}: round {checkpoint['round']} of {config.num_rounds} was the last completed")
        if setup["rounds_done"] >= config.num_rounds:
            raise UsageError(f"the checkpoint already has all {config.num_rounds} rounds; raise --num-rounds to go on")
    return asyncio.run(serve(config, setup, output_dir))


def cli() -> int:
    return run_main("fl_server.py", main)


if __name__ == "__main__":
    sys.exit(cli())
