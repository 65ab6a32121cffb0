"""The round engine's view of its clients: a small interface, and who is here.

A `ClientProxy` is anything that can train the global model and answer: a remote
fl_client.py behind a socket (fedsock.lobby.RemoteClient), or a virtual client in
this process (fedsock.simulate). `fit()` returns the client's update or raises
`Dropped`. The engine never touches a socket, so a round can be driven, and tested,
with clients of any kind.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

import torch

from socket_methods import encode_weights


class Dropped(Exception):
    """The client left, or broke the protocol, before its update was in. The message says why."""


@dataclass
class Broadcast:
    """The global model as it goes over the wire when --compress-broadcast shrinks it."""

    layout: dict[str, Any]
    blob: bytearray
    params: dict[str, list[float]]  # int8: [scale, lo] per float tensor


@dataclass
class GlobalModel:
    """The global weights of one round, with their encoding made once for every client.

    With a compressed broadcast, `tensors` are the weights exactly as every client decodes them
    (so that the deltas they send are added to what they really started from), and `wire` is
    what is sent."""

    tensors: dict[str, torch.Tensor]
    layout: dict[str, Any]
    blob: bytearray
    wire: Broadcast | None = None

    @classmethod
    def of(cls, tensors: Mapping[str, torch.Tensor], broadcast: str = "none") -> "GlobalModel":
        tensors = {name: t.detach().cpu() for name, t in tensors.items()}
        wire = None
        if broadcast != "none":
            from fedsock.compression import encode_weights_for_broadcast

            sent, params, tensors = encode_weights_for_broadcast(tensors, broadcast)
            wire = Broadcast(*encode_weights(sent), params)
        layout, blob = encode_weights(tensors)
        return cls(tensors, layout, blob, wire)

    def wire_fields(self) -> tuple[bytearray, dict[str, Any]]:
        """The blob to send and the fields that describe it (its layout, int8's params)."""
        if self.wire is None:
            return self.blob, {"weights": self.layout}
        extra = {"broadcast_params": self.wire.params} if self.wire.params else {}
        return self.wire.blob, {"weights": self.wire.layout, **extra}


@dataclass
class FitIns:
    """What a client is asked to do: train `model` with `settings` (local_epochs, batch_size, lr,
    proximal_mu) for round `round`. `cache` lets a transport keep what it derives once per round
    (the framed <MODEL>) for every client it sends to."""

    round: int
    model: GlobalModel
    settings: dict[str, Any]
    evaluate: bool = False  # federated evaluation: first test the received model on the local test split
    cache: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class FitRes:
    """A client's update. `tensors` may be views of a receive buffer that is reused once
    `release()` is called, so an aggregator that keeps them must copy them."""

    client_id: int
    round: int
    num_examples: int
    tensors: Mapping[str, torch.Tensor]
    metrics: dict[str, float]  # train_loss, local_test_accuracy, fit_seconds
    release: Callable[[], None] = lambda: None


@dataclass
class EvalRes:
    """A client's evaluation of a model on its own test split: counts, so that they add up exactly."""

    client_id: int
    round: int
    loss_sum: float
    confusion: Any  # numpy int64, classes x classes (row: true class)


class ClientProxy(Protocol):
    client_id: int
    num_examples: int  # training examples it holds (said when it became ready)

    async def fit(self, ins: FitIns) -> FitRes:
        """Train and return the update; raise Dropped if the client is gone first."""

    def acknowledge(self, result: FitRes, accepted: bool, note: str) -> None:
        """Tell the client whether its update was used (a late one is not)."""

    async def evaluate(self, round_number: int, model: GlobalModel) -> EvalRes:
        """Evaluate `model` on the client's own test split; raise Dropped if the client is gone first."""

    async def finish(self, completed: bool, rounds_completed: int, message: str) -> None:
        """The run is over: say so and let the client go."""

    async def end_session(self, session: int, rounds_completed: int, message: str) -> None:
        """--stay: this session is over, and the client stays for another."""


class UnconnectedProxy:
    """The part of a ClientProxy that a client in this process (a simulated one, an audit's canary) has
    nothing to do for: no connection to tell whether its update was used, or that the run is over."""

    def acknowledge(self, result: FitRes, accepted: bool, note: str) -> None:
        pass

    async def finish(self, completed: bool, rounds_completed: int, message: str) -> None:
        pass

    async def end_session(self, session: int, rounds_completed: int, message: str) -> None:
        pass


class ClientPool:
    """Who is here. Clients become members once they are ready to train; `changed` is set
    whenever one comes, goes or finishes an update, so the engine can wait for conditions."""

    def __init__(self, num_clients: int):
        self.num_clients = num_clients
        self.members: dict[int, ClientProxy] = {}  # ready clients, by id
        self.connected: dict[int, ClientProxy] = {}  # every client with a live connection, ready or not yet
        self.enrolled: set[int] = set()  # ids that joined before training started: they may rejoin
        self.busy: dict[int, int] = {}  # id -> the round whose model it is training
        self.training_started = False
        self.changed = asyncio.Event()

    def refusal(self, client_id: int, next_round: int, num_rounds: int) -> str | None:
        """Why a connection claiming this id may not join, or None."""
        if not 1 <= client_id <= self.num_clients:
            return f"client id {client_id} is not part of this run (ids are 1..{self.num_clients})"
        if client_id in self.connected:
            return f"client id {client_id} is already connected to this run"
        if self.training_started and client_id not in self.enrolled:
            return f"training already started (round {next_round} of {num_rounds}); this run takes no new clients"
        return None

    def joined(self, proxy: ClientProxy) -> None:
        self.connected[proxy.client_id] = proxy
        if not self.training_started:
            self.enrolled.add(proxy.client_id)

    def add(self, proxy: ClientProxy) -> None:
        self.members[proxy.client_id] = proxy
        self.changed.set()

    def remove(self, client_id: int) -> None:
        self.connected.pop(client_id, None)
        self.members.pop(client_id, None)
        self.changed.set()

    def idle(self) -> list[int]:
        return sorted(i for i in self.members if i not in self.busy)

    async def wait_until(self, condition: Callable[[], bool], timeout_s: float | None,
                         stopping: asyncio.Event) -> bool:
        """Wait until `condition()` holds, checked whenever clients change; False at the timeout.
        Raises Stopped if `stopping` is set first."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        while not condition():
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return False
            self.changed.clear()
            await wait_any(self.changed, stopping, remaining)
            if stopping.is_set():
                raise Stopped
        return True


class Stopped(Exception):
    """SIGINT, SIGTERM or the dashboard's Stop asked the run to end."""


async def wait_any(event: asyncio.Event, stopping: asyncio.Event, timeout_s: float | None) -> None:
    """Wait for `event`, a stop request or the timeout, whichever comes first."""
    waiters = [asyncio.ensure_future(event.wait()), asyncio.ensure_future(stopping.wait())]
    try:
        await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
