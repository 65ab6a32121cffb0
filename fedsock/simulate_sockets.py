"""`fl_simulate.py --transport sockets`: virtual clients against a real fl_server.py over TCP.

The simulation starts the real server (a process of its own, on 127.0.0.1 and a free port,
with the simulation's server settings), then runs every virtual client in this process as
an asyncio connection that speaks the normal protocol: <HELLO>, its share from the
server's partition bitmap, <READY>, and an <UPDATE> for every <MODEL>. The training itself
runs on the chosen backend, as in the in-process transport. This tests the server at scale
with real training; the server writes metrics.csv, the plot, the model and checkpoints.

The speed profiles apply in real time here (the virtual clock does not: time is real). A client's
slowness (--speed-sigma, --slow-share and --slow-factor, drawn from (seed, client id) exactly as
on the virtual clock, fedsock/virtual_time.py) makes its real training take that many times as
long: it trains, then sleeps the extra without blocking the event loop, as fl_client.py --slowdown
does. With --availability, real time from the start of training is cut into periods of
--availability-period seconds; a client away in a period closes its connection, as a device that
goes offline would, losing the fit it was on, and reconnects as the same client id when it is here
again. Every client joins before training starts (a server takes no new ids after), so one away in
the first period leaves as training starts; the first round may pick it, and then goes on without it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import signal
import socket
import statistics
import subprocess
import sys
import threading
from dataclasses import replace

import torch

import client_helper
import neural_net_helper as nnh
from fedsock.clients import FitIns, GlobalModel
from fedsock.console import FedsockError, UsageError, say
from fedsock.events import id_ranges
from fedsock.identity import enrolled_identities
from fedsock.order import ROLE_CLIENT, SECAGG_REQUESTS, Order
from fedsock.secagg import FEATURE, MASKED, ClientSession
from fedsock.simulate import SharedData, availability_of, make_backend, speed_profiles
from fedsock.transport import AsyncConnection, Traffic, tune_socket
from fedsock.virtual_time import Availability, SpeedProfiles
from socket_methods import (
    ERROR,
    EVALUATE,
    FINISHED,
    HELLO,
    METADATA,
    MODEL,
    PROTOCOL_VERSION,
    READY,
    UPDATE,
    WeightsBuffer,
    check_layout,
    decode_bitmap,
    encode_message,
    encode_weights,
    frame_weights,
)

WHO = "simulation"
SERVER_START_TIMEOUT_S = 300
# Flags of fl_simulate.py that are the simulation's own, not the server's.
SIMULATION_FLAGS = ("--backend", "--workers", "--ray-address", "--client-cpus", "--client-gpus", "--transport",
                    "--drop-rate", "--straggler-rate", "--straggler-delay", "--speed-sigma", "--slow-share",
                    "--slow-factor", "--availability", "--availability-period")
VIRTUAL_CLOCK_OVER_SOCKETS = ("--virtual-clock and --virtual-examples-per-s apply to --transport inprocess; over "
                              "sockets, time is real (the speed profiles slow the clients' real training)")
# A connection of a client that comes and goes that fails this long before the server's output ends
# is a failure; one that fails as the server ends is a client that came back as the run ended.
SERVER_GONE_S = 30.0
TRAINING_STARTS = "] training starts with "  # the server's line (fedsock.events.Console): the periods' origin


def server_argv(argv: list[str]) -> list[str]:
    """The simulation's command line without its own flags: what the server is given."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in SIMULATION_FLAGS:
            skip = "=" not in arg
            continue
        out.append(arg)
    return out


class ServerSignals:
    """What the server's lines tell the virtual clients: when training started (the origin of the
    --availability periods) and when the server is gone. `relay` runs in a thread of its own."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.started, self.over = asyncio.Event(), asyncio.Event()
        self.origin_s: float | None = None  # the loop's time when training started

    def relay(self, lines) -> None:
        for line in lines:
            print(line, end="", flush=True)
            if TRAINING_STARTS in line:
                self._soon(self._start)
        self._soon(self.over.set)

    def _soon(self, callback) -> None:
        try:
            self.loop.call_soon_threadsafe(callback)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    def _start(self) -> None:
        if self.origin_s is None:
            self.origin_s = self.loop.time()
        self.started.set()


class Presence:
    """--availability in real time: each period of `availability.period_s` real seconds from the start of
    training, a client is here or away, drawn as on the virtual clock (fedsock/virtual_time.py)."""

    def __init__(self, availability: Availability, signals: ServerSignals):
        self.availability, self.signals = availability, signals
        self.back: dict[int, int] = {}  # client id -> the period it came back in (a timer may fire a tick early)

    def start_of(self, period: int) -> float:
        return self.signals.origin_s + period * self.availability.period_s

    async def until_away(self, client_id: int) -> int | None:
        """Return when the client goes away (at once if it is away already): the period it is away in.
        None once the server is gone, for a client that is never away."""
        await self.signals.started.wait()
        loop = asyncio.get_running_loop()
        now = max(self.availability.period(loop.time() - self.signals.origin_s), self.back.get(client_id, 0))
        period = self.availability.next_period(client_id, now, here=False)
        if period is None:
            await self.signals.over.wait()
            return None
        await asyncio.sleep(max(0.0, self.start_of(period) - loop.time()))
        return period

    async def server_gone_within(self, seconds: float) -> bool:
        """Whether the server's output ends within `seconds` (at once if it has)."""
        try:
            async with asyncio.timeout(seconds):
                await self.signals.over.wait()
            return True
        except TimeoutError:
            return False

    async def until_here(self, client_id: int, period: int) -> bool:
        """Wait for the first period from `period` on in which the client is here: True then, False if the
        server is gone first (or the client is never here again)."""
        back = self.availability.next_period(client_id, period, here=True)
        if back is None:
            return False
        self.back[client_id] = back
        return not await self.server_gone_within(max(0.0, self.start_of(back) - asyncio.get_running_loop().time()))


class SocketClient:
    """One virtual client over TCP: the protocol here, its training on the backend; in real time, as slow as
    its speed profile says (`slowdown`), and here when its `presence` says."""

    def __init__(self, client_id: int, port: int, data, backend, model_length: int, identity=None,
                 slowdown: float = 1.0, presence: Presence | None = None):
        self.client_id, self.port, self.data, self.backend = client_id, port, data, backend
        self.model_length = model_length  # the model's coordinates: what a secure round's vector holds
        self.identity = identity  # fedsock.identity.Identity: what it signs its secure-aggregation keys with
        self.slowdown, self.presence = slowdown, presence
        self.rounds = 0
        self.fit_real_s: list[float] = []  # each fit's real seconds: its training, then its slowdown's sleep
        self.departures = 0  # how often it went away (--availability)

    async def run(self) -> None:
        """Its sessions: one, or with --availability one each time it is here, until the run is over."""
        if self.presence is None:
            await self.session()
            return
        while True:
            session = asyncio.ensure_future(self.session())
            leaving = asyncio.ensure_future(self.presence.until_away(self.client_id))
            try:
                await asyncio.wait({session, leaving}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                session.cancel()
                leaving.cancel()
                raise
            if session.done() or leaving.result() is None:
                leaving.cancel()
                try:
                    await session  # the run is over (<FINISHED>), or its failure
                except Exception:
                    if await self.presence.server_gone_within(SERVER_GONE_S):
                        return  # it came back as the run ended: the server's exit status tells how that went
                    raise
                return
            session.cancel()  # it goes away: its connection closes, and the fit it was on is lost
            await asyncio.gather(session, return_exceptions=True)
            self.departures += 1
            if not await self.presence.until_here(self.client_id, leaving.result() + 1):
                return  # the server is gone while it was away

    async def session(self) -> None:
        """One connection: handshake, <READY>, and an <UPDATE> for every <MODEL> until <FINISHED>."""
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", self.port))
        tune_socket(sock)
        _, conn = await loop.create_connection(lambda: AsyncConnection(Traffic()), sock=sock)
        order = Order(ROLE_CLIENT)  # what the server may send now, kept as fl_client.py keeps it
        try:
            order.send(HELLO)
            await conn.send([encode_message(HELLO, protocol_version=PROTOCOL_VERSION, client_id=self.client_id,
                                            features=[FEATURE, "augment"])])
            meta = await self.next(conn, order)
            if meta["header"] != METADATA:
                raise FedsockError(f"client {self.client_id}: the server sent {meta['header']}, but a virtual client "
                                   f"has no token to authenticate with")
            # secure aggregation: the client's side of it, as fl_client.py runs it
            session = ClientSession(self.client_id, self.model_length, self.identity) if meta["secure_aggregation"] else None
            indices = decode_bitmap(meta["partition_bitmap"], meta["train_size"])
            self.data.set_share(self.client_id, indices, meta["seed"])
            order.send(READY)
            await conn.send([encode_message(READY, num_examples=self.data.num_examples(self.client_id),
                                            test_examples=len(self.data.shares[self.client_id][1]))])
            received, layout = None, None
            while True:
                message = await self.next(conn, order)
                header = message["header"]
                if header == FINISHED:
                    return
                if header == EVALUATE or (header in SECAGG_REQUESTS and session is None):
                    raise FedsockError(f"client {self.client_id}: the server sent {header}, which a virtual client "
                                       f"of this run does not take")
                if header in SECAGG_REQUESTS:
                    answer = session.answer(message)
                    if answer is not None:
                        order.send(answer[0])
                        await conn.send([encode_message(answer[0], **answer[1])])
                    continue
                if header != MODEL:
                    continue
                if received is None:  # the first model: its layout is this run's
                    layout = message["weights"]
                    received = WeightsBuffer(layout)
                check_layout(message["weights"], layout)
                await conn.recv_blob(received.buffer)
                settings = {k: message[k] for k in ("local_epochs", "batch_size", "lr", "proximal_mu")}
                settings["augment"] = message.get("augment", "none")
                model = GlobalModel(received.tensors, message["weights"], received.buffer)
                tensors, metrics = await self.backend.fit(self.client_id, FitIns(message["round"], model, settings))
                slept_from_s = loop.time()
                if self.slowdown > 1:  # a slow device, as fl_client.py --slowdown makes one, without blocking the loop
                    await asyncio.sleep((self.slowdown - 1) * metrics["fit_seconds"])
                self.fit_real_s.append(metrics["fit_seconds"] + loop.time() - slept_from_s)
                metrics = {**metrics, "fit_seconds": metrics["fit_seconds"] * self.slowdown}
                if session is not None:  # weighted, quantised and masked: all the server sees of it
                    tensors = {MASKED: torch.from_numpy(session.masked_update(
                        message["round"], received.tensors, tensors, self.data.num_examples(self.client_id)))}
                update_layout, blob = encode_weights(tensors)
                order.send(UPDATE)
                await conn.send(frame_weights(UPDATE, blob, round=message["round"], client_id=self.client_id,
                                              num_examples=self.data.num_examples(self.client_id),
                                              weights=update_layout, **metrics))
                self.rounds += 1
        finally:
            await conn.close()

    async def next(self, conn: AsyncConnection, order: Order) -> dict:
        """The server's next message, if the order allows it now (fedsock.order)."""
        message = await conn.recv_message()
        if message["header"] == ERROR:
            raise FedsockError(f"client {self.client_id}: the server says: {message['message']}")
        order.receive(message["header"])
        return message


def real_profiles(config) -> tuple[SpeedProfiles | None, Availability | None]:
    """The virtual clock's speed profiles and availability for the same seed (fedsock/simulate.py), applied
    here in real seconds; None where a run has none."""
    clocked = replace(config, virtual_clock=True)
    speeds = speed_profiles(clocked) if config.speed_sigma or config.slow_share else None
    return speeds, availability_of(clocked)


def profile_line(config, speeds: SpeedProfiles | None) -> str:
    """What the profiles do over sockets, in one line."""
    parts = []
    if config.slow_share:
        parts.append(f"clients {id_ranges(sorted(speeds.slow_clients))} {config.slow_factor:g}x slower")
    if config.speed_sigma:
        parts.append(f"slowness lognormal(0, {config.speed_sigma:g}), over the fastest client's "
                     f"({speeds.fastest:.2g}) where that is under 1")
    if speeds is not None:
        parts.append("each trains, then sleeps the rest of its slowness")
    if config.availability < 1:
        parts.append(f"each here with probability {config.availability:g} in every {config.availability_period_s:g} s "
                     f"from the start of training, closing its connection while away")
    return "time is real: " + "; ".join(parts)


def speed_summary(clients: list[SocketClient], speeds: SpeedProfiles) -> str:
    """The real seconds of the slowed clients' fits beside the others' (medians): the training itself, timed
    where it ran (not its wait for a worker), and then the sleep, timed here."""
    def median_of(group: list[SocketClient]) -> str:
        times = [t for c in group for t in c.fit_real_s]
        return f"{statistics.median(times):.2f} s ({len(times)} fits)" if times else "no fits"

    slow = [c for c in clients if c.client_id in speeds.slow_clients]
    others = [c for c in clients if c.client_id not in speeds.slow_clients]
    if slow:
        return f"real seconds a fit took, training and sleep (median): slowed clients {median_of(slow)}, the others " \
               f"{median_of(others)}"
    shown = sorted(clients, key=lambda c: speeds.real_slowdown(c.client_id))
    return "real seconds a fit took, training and sleep (median): " + ", ".join(
        f"client {c.client_id} ({speeds.real_slowdown(c.client_id):.2g}x) {median_of([c])}"
        for c in (shown[:2] + shown[-2:] if len(shown) > 4 else shown))


def run_over_sockets(config, argv: list[str] | None) -> int:
    if config.drop_rate or config.straggler_rate:
        raise UsageError("--drop-rate and --straggler-rate apply to --transport inprocess; over sockets, kill or "
                         "stop client processes instead (a real fault)")
    if config.virtual_clock:  # a resumed in-process run's setting
        raise UsageError(VIRTUAL_CLOCK_OVER_SOCKETS)
    argv = list(sys.argv[1:] if argv is None else argv)
    spec = importlib.util.find_spec("fl_server")
    command = [sys.executable, "-u", spec.origin, *server_argv(argv), "--server-port", "0", "--time-to-wait", "60",
               "--max-pending", str(max(64, min(config.num_clients, 1024)))]
    train = client_helper.load_split(config.dataset, "train", config.data_root)
    data = SharedData(train, client_helper.DATASETS[config.dataset], [], config.seed)
    backend = make_backend(config, data)
    speeds, availability = real_profiles(config)
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        port = None
        for line in server.stdout:
            print(line, end="", flush=True)
            if "listening on " in line:
                port = int(line.split("listening on ", 1)[1].split()[0].rsplit(":", 1)[1])
                break
        if port is None:
            return server.wait(timeout=30) or 1
        say(WHO, f"{config.num_clients} virtual clients connecting to the server at 127.0.0.1:{port}, training on the "
                 f"{backend.name} backend")
        if speeds is not None or availability is not None:
            say(WHO, profile_line(config, speeds))
        length = sum(t.numel() for t in nnh.get_weights(nnh.build_model(config.model, data.info, config.seed)).values())
        ids = range(1, config.num_clients + 1)
        identities = enrolled_identities(config.federation, ids) if config.secure_aggregation and config.federation else {}
        clients: list[SocketClient] = []

        async def everyone() -> list:
            signals = ServerSignals(asyncio.get_running_loop())
            presence = Presence(availability, signals) if availability is not None else None
            clients.extend(SocketClient(k, port, data, backend, length, identities.get(k),
                                        speeds.real_slowdown(k) if speeds is not None else 1.0, presence) for k in ids)
            relaying = threading.Thread(target=signals.relay, args=(server.stdout,), daemon=True)
            relaying.start()
            relays.append(relaying)
            return await asyncio.gather(*(c.run() for c in clients), return_exceptions=True)

        relays: list[threading.Thread] = []
        outcomes = asyncio.run(everyone())
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        if failures and server.poll() is None:  # what is left cannot finish the run: stop it, as Ctrl-C would
            server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()
            code = server.wait(timeout=10)
            say(WHO, "WARNING: the server did not exit within 120 s after its clients; it was killed")
        for relaying in relays:
            relaying.join(timeout=10)
        say(WHO, f"{config.num_clients - len(failures)} of {config.num_clients} virtual clients finished; "
                 f"{sum(c.rounds for c in clients)} client-rounds trained; server exit {code}")
        if speeds is not None:
            say(WHO, speed_summary(clients, speeds))
        if availability is not None:
            say(WHO, f"the clients went away {sum(c.departures for c in clients)} times in all (--availability)")
        for failure in failures[:3]:
            say(WHO, f"a virtual client failed: {failure}")
        return code if not failures else (code or 1)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=10)
        backend.close()
