"""`fl_simulate.py --transport sockets`: virtual clients against a real fl_server.py over TCP.

The simulation starts the real server (a process of its own, on 127.0.0.1 and a free port,
with the simulation's server settings), then runs every virtual client in this process as
an asyncio connection that speaks the normal protocol: <HELLO>, its share from the
server's partition bitmap, <READY>, and an <UPDATE> for every <MODEL>. The training itself
runs on the chosen backend, as in the in-process transport. This tests the server at scale
with real training; the server writes metrics.csv, the plot, the model and checkpoints.
"""

from __future__ import annotations

import asyncio
import importlib.util
import signal
import socket
import subprocess
import sys
import threading

import torch

import client_helper
import neural_net_helper as nnh
from fedsock.clients import FitIns, GlobalModel
from fedsock.console import FedsockError, UsageError, say
from fedsock.identity import enrolled_identities
from fedsock.order import ROLE_CLIENT, SECAGG_REQUESTS, Order
from fedsock.secagg import FEATURE, MASKED, ClientSession
from fedsock.simulate import SharedData, make_backend
from fedsock.transport import AsyncConnection, Traffic, tune_socket
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
                    "--drop-rate", "--straggler-rate", "--straggler-delay")


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


class SocketClient:
    """One virtual client over TCP: the protocol here, its training on the backend."""

    def __init__(self, client_id: int, port: int, data, backend, model_length: int, identity=None):
        self.client_id, self.port, self.data, self.backend = client_id, port, data, backend
        self.model_length = model_length  # the model's coordinates: what a secure round's vector holds
        self.identity = identity  # fedsock.identity.Identity: what it signs its secure-aggregation keys with
        self.rounds = 0

    async def run(self) -> None:
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


def run_over_sockets(config, argv: list[str] | None) -> int:
    if config.drop_rate or config.straggler_rate:
        raise UsageError("--drop-rate and --straggler-rate apply to --transport inprocess; over sockets, kill or "
                         "stop client processes instead (a real fault)")
    if config.virtual_clock:
        raise UsageError("--virtual-clock and the speed profiles apply to --transport inprocess; over sockets, time "
                         "is real")
    argv = list(sys.argv[1:] if argv is None else argv)
    spec = importlib.util.find_spec("fl_server")
    command = [sys.executable, "-u", spec.origin, *server_argv(argv), "--server-port", "0", "--time-to-wait", "60",
               "--max-pending", str(max(64, min(config.num_clients, 1024)))]
    train = client_helper.load_split(config.dataset, "train", config.data_root)
    data = SharedData(train, client_helper.DATASETS[config.dataset], [], config.seed)
    backend = make_backend(config, data)
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
        length = sum(t.numel() for t in nnh.get_weights(nnh.build_model(config.model, data.info, config.seed)).values())
        ids = range(1, config.num_clients + 1)
        identities = enrolled_identities(config.federation, ids) if config.secure_aggregation and config.federation else {}
        clients = [SocketClient(k, port, data, backend, length, identities.get(k)) for k in ids]

        async def everyone() -> list:
            return await asyncio.gather(*(c.run() for c in clients), return_exceptions=True)

        def relay() -> None:
            for line in server.stdout:
                print(line, end="", flush=True)

        relaying = threading.Thread(target=relay, daemon=True)
        relaying.start()
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
        relaying.join(timeout=10)
        say(WHO, f"{config.num_clients - len(failures)} of {config.num_clients} virtual clients finished; "
                 f"{sum(c.rounds for c in clients)} client-rounds trained; server exit {code}")
        for failure in failures[:3]:
            say(WHO, f"a virtual client failed: {failure}")
        return code if not failures else (code or 1)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=10)
        backend.close()
