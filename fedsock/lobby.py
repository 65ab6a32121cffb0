"""The server's socket side: accept, hand-shake, admit, read each client, send heartbeats.

Each joined client becomes a `RemoteClient`, the round engine's `ClientProxy` for a
peer at the end of a socket. Its reader task (`RemoteClient.serve`) reads everything
the client sends, checks it, and hands a valid update to the `fit()` that waits for it.

Two limits keep strangers and slow peers from hurting everyone else:
- **Pending connections.** At most --max-pending connections may be in their handshake.
  A real client speaks at once (its <HELLO>, or its TLS ClientHello), so a connection
  that has said nothing is "silent", and a silent one is cut off after a short deadline
  (FIRST_BYTE_TIMEOUT_S). When a new connection arrives and every place is taken, the
  oldest silent connection is evicted to make room (the oldest pending one if none is
  silent): a flood of mute sockets cannot lock honest clients out; it only ever
  evicts itself.
- **Receive buffers.** Updates are received into a few pooled model-sized buffers. While
  the updates holding them arrive fast, a buffer frees within milliseconds and the next
  update waits for it (in TCP). When all have been held for a while by updates still
  arriving (slow senders), the next update goes into a temporary file of its own instead,
  written a 64 KB window at a time: no update waits for another client's slow transfer,
  and the server's memory stays flat however many updates are in flight.
"""

from __future__ import annotations

import asyncio
import collections
import mmap
import socket
import ssl
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from fedsock import security
from fedsock.clients import ClientPool, Dropped, EvalRes, FitIns, FitRes, GlobalModel
from fedsock.compression import Compression, decoded_update, scratch_for
from fedsock.events import (ClientJoined, ClientLeft, ClientProgress, ClientReady, ConnectionRefused, Events,
                            UpdateArriving, UpdateDiscarded)
from fedsock.order import ROLE_SERVER, Order
from fedsock.transport import AsyncConnection, Traffic, open_accepted, send_error, send_plain_error
from socket_methods import (
    CHALLENGE,
    ERROR,
    EVALUATE,
    EVALUATION,
    FINISHED,
    METADATA,
    MODEL,
    POLICY_KEYS,
    PRE_AUTH_CONTROL_BYTES,
    PROGRESS,
    PROTOCOL_VERSION,
    READY,
    SESSION_END,
    SUCCESS,
    UPDATE,
    WAITING,
    BadMessage,
    ConnectionClosed,
    ProtocolError,
    WeightsBuffer,
    check_confusion,
    check_finite,
    check_layout,
    decode_weights,
    encode_message,
    frame_weights,
)

# A client's first byte comes one network trip after its connect; 3 s allows a slow
# link, and sheds a silent connection long before --handshake-timeout (10 s).
FIRST_BYTE_TIMEOUT_S = 3.0
# Updates received into memory at once. Past these, an update waits for one of them, unless
# every one is held by a slow update (held for SPOOL_AFTER_S, and arriving at less than
# SLOW_BYTES_PER_S, 32 Mbit/s): then it goes to a file of its own. A 6.7 MB cnn update at
# 4 MB/s takes under 2 s; on loopback, or a fast link, one takes milliseconds.
RECEIVE_BUFFERS = 4
SPOOL_AFTER_S = 0.25
SLOW_BYTES_PER_S = 4 << 20
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
# How often a client may report its training (<PROGRESS>; said in <METADATA> when the server has a dashboard).
# Clients also wait for 5% more between reports, so a thousand of them send at most 20 each a round. Reports
# that come faster than half this are dropped unread beyond their decoding: one event per report, O(1).
PROGRESS_EVERY_S = 0.5


class SpooledUpdate:
    """An update received into a temporary file of its own (see the module's doc).

    Its bytes are written to the file a window at a time as they arrive, so the server
    holds only the window; when the update is whole, the file is mapped (privately, for
    reading) and its tensors are views of the map, for as long as it takes to fold them
    in. The file is unlinked from the start (O_TMPFILE): nothing is left behind. A write
    that fails (a full disk) is kept, and reported when the update is opened."""

    WINDOW_BYTES = 64 << 10

    def __init__(self, layout: dict[str, Any], directory: Path):
        self.layout = layout
        self.file = tempfile.TemporaryFile(dir=directory, prefix=".fedsock-update-")
        self.window = bytearray(self.WINDOW_BYTES)
        self.error: OSError | None = None
        self.tensors: dict[str, Any] = {}
        self.opening: asyncio.Semaphore | None = None

    def write(self, part: memoryview) -> None:
        if self.error is None:
            try:
                self.file.write(part)
            except OSError as exc:
                self.error = exc

    async def open(self, opening: asyncio.Semaphore) -> dict[str, Any]:
        """The update's tensors, mapped from its file. At most a few are open at once (`opening`,
        held until close): a whole update is in memory only while it is checked and folded in."""
        if self.error is not None:
            raise self.error
        await opening.acquire()
        self.opening = opening
        self.file.flush()
        mapped = mmap.mmap(self.file.fileno(), self.layout["nbytes"], access=mmap.ACCESS_COPY)
        self.tensors = decode_weights(self.layout, mapped)
        return self.tensors

    def close(self) -> None:
        # The map goes when its last tensor view does; the file's blocks are freed then.
        self.tensors = {}
        self.file.close()
        if self.opening is not None:
            self.opening.release()
            self.opening = None


class ReceiveBuffers:
    """Buffers for the updates in flight: RECEIVE_BUFFERS in memory, then one file each.

    An update waits for a pooled buffer while the updates holding them are arriving fast:
    a buffer then frees soon, and waiting (in TCP) costs nothing. When every pooled buffer is
    held by a slow update (see SLOW_BYTES_PER_S), the next update goes to a file of its own
    at once. The waiting is one future per waiting update, handed a buffer when one is given
    back, and one timer for all of them (when to look at the holders' pace again)."""

    def __init__(self, layout: dict[str, Any], count: int, spool_dir: Path):
        self.layout, self.spool_dir = layout, spool_dir
        self.free: list[WeightsBuffer] = [WeightsBuffer(layout) for _ in range(count)]
        # id(buffer) -> (when taken, how many bytes of its update are in); None once the update is whole
        self.held: dict[int, tuple[float, Callable[[], int]] | None] = {}
        self.waiters: collections.deque[asyncio.Future] = collections.deque()
        self.alarm: asyncio.TimerHandle | None = None
        self.spool_failed_at = -1e9  # when a file last could not be made (then: wait for a buffer for a while)
        self.spooled = 0  # updates received into files so far
        self.receiving = 0  # updates whose weights are arriving now (said in <WAITING>)
        self.opening = asyncio.Semaphore(count)  # spooled updates open in memory at once

    async def take(self, progress: Callable[[], int]) -> WeightsBuffer | SpooledUpdate:
        """A buffer for an update whose bytes received so far `progress()` tells."""
        self.receiving += 1
        try:
            while True:
                if self.free:
                    return self._hold(self.free.pop(), progress)
                if self.until_all_slow_s() <= 0:
                    try:
                        buffer = SpooledUpdate(self.layout, self.spool_dir)
                    except OSError:  # no file can be made here: wait for a buffer in memory for a while
                        self.spool_failed_at = time.monotonic()
                    else:
                        self.spooled += 1
                        return buffer
                waiter = asyncio.get_running_loop().create_future()
                self.waiters.append(waiter)
                self._arm_alarm()
                try:
                    buffer = await waiter
                except asyncio.CancelledError:
                    if waiter.done() and waiter.result() is not None:
                        self.give_back(waiter.result(), taken=False)  # handed over as we were cancelled
                    raise
                if buffer is not None:
                    return self._hold(buffer, progress)
                # None: the holders have turned slow: look again (and go to a file)
        except BaseException:
            self.receiving -= 1
            raise

    def _hold(self, buffer: WeightsBuffer, progress: Callable[[], int]) -> WeightsBuffer:
        self.held[id(buffer)] = (time.monotonic(), progress)
        return buffer

    def until_all_slow_s(self) -> float:
        """0 when every pooled buffer is held by a slow update: one held for SPOOL_AFTER_S and arriving
        at less than SLOW_BYTES_PER_S. Otherwise when to look again; infinite while one of them holds a
        whole update, about to be folded in and freed."""
        now, again = time.monotonic(), 0.0
        if now - self.spool_failed_at < 1.0:
            return float("inf")
        for holder in self.held.values():
            if holder is None:
                return float("inf")
            since, progress = holder
            held_s = now - since
            if held_s < SPOOL_AFTER_S:
                again = max(again, SPOOL_AFTER_S - held_s)
            elif progress() >= SLOW_BYTES_PER_S * held_s:  # arriving fast: its buffer frees soon
                again = max(again, SPOOL_AFTER_S)
        return again

    def _arm_alarm(self) -> None:
        if self.alarm is None and self.waiters:
            delay = self.until_all_slow_s()
            if delay != float("inf"):
                self.alarm = asyncio.get_running_loop().call_later(max(delay, 0.0), self._ring)

    def _ring(self) -> None:
        self.alarm = None
        if self.until_all_slow_s() > 0:
            self._arm_alarm()
            return
        waiters, self.waiters = self.waiters, collections.deque()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def received(self, buffer: WeightsBuffer | SpooledUpdate) -> None:
        """The update in `buffer` is whole: the buffer is back as soon as it is folded in."""
        if id(buffer) in self.held:
            self.held[id(buffer)] = None

    def give_back(self, buffer: WeightsBuffer | SpooledUpdate, taken: bool = True) -> None:
        if taken:
            self.receiving -= 1
        if isinstance(buffer, SpooledUpdate):
            buffer.close()
            return
        self.held.pop(id(buffer), None)
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(buffer)  # straight to the longest waiting update
                return
        self.free.append(buffer)


@dataclass
class Pending:
    """A connection in its handshake: since when, and whether it has said anything yet."""

    since: float
    peer: str
    talking: bool = False
    conn: AsyncConnection | None = None


class RemoteClient:
    """A joined client at the end of a socket: the engine's ClientProxy, and its reader."""

    def __init__(self, lobby: "Lobby", client_id: int, conn: AsyncConnection, max_examples: int, order: Order):
        self.lobby, self.client_id, self.conn = lobby, client_id, conn
        self.max_examples = max_examples
        self.num_examples = 0  # said in its <READY>
        self.order = order  # what it may send now (fedsock.order), moved by every message either side sends
        self.asked_round = 0  # the round of the model, evaluation or secure-aggregation stage it was last sent
        self.sent: GlobalModel | None = None  # the model it was last sent: a compressed update is a delta from it
        self.result: asyncio.Future[FitRes] | None = None  # fit() waits here for its update
        self.answer: asyncio.Future | None = None  # evaluate() or a secure-aggregation stage waits here
        self.gone: str | None = None
        self.finished = False  # told <FINISHED>: its leaving is no news
        self.progress_at = -1e9  # when its last <PROGRESS> was passed on

    # ---- ClientProxy
    async def fit(self, ins: FitIns) -> FitRes:
        if self.gone:
            raise Dropped(self.gone)
        frames = ins.cache.get(MODEL)
        if frames is None:  # framed once per round, for every client
            blob, described = ins.model.wire_fields()
            frames = ins.cache[MODEL] = frame_weights(MODEL, blob, round=ins.round, **described, **ins.settings)
        self.order.send(MODEL)
        self.asked_round, self.sent = ins.round, ins.model
        self.result = asyncio.get_running_loop().create_future()
        await self.send(frames)
        try:
            return await self.result
        finally:
            self.result = None  # the update's buffer must not stay referenced from here

    def acknowledge(self, result: FitRes, accepted: bool, note: str) -> None:
        self.lobby.send_soon(self, [encode_message(SUCCESS, round=result.round, accepted=accepted, message=note)])

    async def evaluate(self, round_number: int, model: GlobalModel) -> EvalRes:
        if self.gone:
            raise Dropped(self.gone)
        blob, described = model.wire_fields()
        return await self.ask(EVALUATE, round_number, frame_weights(EVALUATE, blob, round=round_number, **described))

    async def secagg(self, header: str, fields: dict[str, Any], reply: str | None) -> dict[str, Any] | None:
        """Send one secure-aggregation message; with `reply`, wait for the client's answer of that kind."""
        if self.gone:
            raise Dropped(self.gone)
        frames = [encode_message(header, **fields)]
        if reply is None:
            self.order.send(header)
            await self.send(frames)
            return None
        return await self.ask(header, fields["round"], frames)

    async def ask(self, header: str, round_number: int, frames: list) -> Any:
        """Send a request that the client answers (<EVALUATE>, a secure-aggregation stage), and wait for
        the answer. If the caller stops waiting first (its timeout), the order says what a late answer gets."""
        self.order.send(header)
        self.asked_round = round_number
        waiter = self.answer = asyncio.get_running_loop().create_future()
        try:
            await self.send(frames)
            return await waiter
        finally:
            self.answer = None
            if not waiter.done() or waiter.cancelled():
                self.order.time_out(round_number)

    async def send(self, frames: list) -> None:
        try:
            await self.conn.send(frames)
        except ProtocolError:
            pass  # the reader sees the same closed connection, drops the client and fails what waits

    async def finish(self, completed: bool, rounds_completed: int, message: str) -> None:
        self.finished = True
        finished = encode_message(FINISHED, completed=completed, rounds_completed=rounds_completed, message=message)
        try:
            await asyncio.wait_for(self.conn.send([finished]), 5)
        except (ProtocolError, asyncio.TimeoutError):
            pass
        await self.conn.close()

    async def end_session(self, session: int, rounds_completed: int, message: str) -> None:
        frame = encode_message(SESSION_END, session=session, rounds_completed=rounds_completed, message=message)
        try:
            await asyncio.wait_for(self.conn.send([frame]), 5)
        except (ProtocolError, asyncio.TimeoutError):
            pass  # the reader sees a broken connection and the client leaves

    # ---- the reader
    async def serve(self) -> None:
        """Read everything the client sends, for as long as it stays. Whether a message may come now
        is the order's to say (fedsock.order); here each one is checked and handed on."""
        reason = "connection closed"
        try:
            while True:
                message = await self.conn.recv_message()
                header = message["header"]
                if not self.order.receive(header, message.get("round")):
                    continue  # a slow client's answer to a stage that timed out: no fault, and no use
                if header == UPDATE:
                    await self.receive_update(message)
                elif header == PROGRESS:
                    self.report_progress(message)
                elif header == READY:
                    self.become_ready(message)
                elif header == ERROR:
                    reason = f"it reported an error: {message['message'][:200]}"
                    break
                else:  # <EVALUATION> or a secure-aggregation answer
                    self.receive_answer(message)
        except ConnectionClosed as exc:
            reason = str(exc)  # "connection closed", or why it was aborted ("stalled: ...")
        except ProtocolError as exc:
            reason = str(exc)
            if not self.finished:
                self.lobby.events.notice(f"client {self.client_id} ({self.conn.peer}): {exc}; disconnected", warning=True)
            self.leave(reason)  # before the await: no new round may pick this client
            await send_error(self.conn, str(exc))
        self.leave(reason)
        await self.conn.close()

    def num_classes(self) -> int:
        return self.lobby.welcome.setup.task.num_classes

    def receive_answer(self, message: dict[str, Any]) -> None:
        """An <EVALUATION> or a secure-aggregation answer: for the round asked, to the one waiting."""
        header, number = message["header"], message["round"]
        if number != self.asked_round:
            raise BadMessage(f"{header} of round {number}, but this client was asked for round {self.asked_round}")
        answer: Any = message
        if header == EVALUATION:
            confusion = check_confusion(message["eval_confusion"], self.num_classes())
            answer = EvalRes(self.client_id, number, message["eval_loss_sum"], confusion)
        if self.answer is not None and not self.answer.done():
            self.answer.set_result(answer)

    def become_ready(self, message: dict[str, Any]) -> None:
        if message["num_examples"] > self.max_examples:
            raise BadMessage(f"{READY} num_examples {message['num_examples']} is more than this client's "
                             f"{self.max_examples}")
        self.num_examples = message["num_examples"]
        counts = message.get("label_counts")
        if counts is not None and (len(counts) != self.num_classes() or min(counts) < 0
                                   or sum(counts) != self.num_examples):
            raise BadMessage(f"{READY} label_counts must be {self.num_classes()} counts (>= 0) that add up to "
                             f"num_examples {self.num_examples}")
        pool = self.lobby.pool
        pool.add(self)
        self.lobby.events.emit(ClientReady(self.client_id, self.num_examples, len(pool.members), pool.num_clients,
                                           counts))

    def report_progress(self, message: dict[str, Any]) -> None:
        """<PROGRESS>: passed on as an event, unless it came too soon after the last (see PROGRESS_EVERY_S)."""
        if message["round"] != self.asked_round:
            raise BadMessage(f"{PROGRESS} for round {message['round']}, but this client was sent round "
                             f"{self.asked_round}")
        now = time.monotonic()
        if now - self.progress_at < PROGRESS_EVERY_S / 2:
            return
        self.progress_at = now
        self.lobby.events.emit(ClientProgress(self.asked_round, self.client_id, message["done"]))

    def upload_progress(self) -> float:
        """The share of its update's weights received so far (while one arrives; read by the dashboard)."""
        nbytes = self.lobby.buffers.layout["nbytes"]
        return min(self.conn.reader.progress / nbytes, 1.0) if nbytes else 0.0

    async def receive_update(self, update: dict[str, Any]) -> None:
        number = update["round"]
        if number != self.asked_round:
            raise BadMessage(f"update for round {number}, but this client was sent round {self.asked_round}")
        if update["client_id"] != self.client_id:
            raise BadMessage(f"update carries client id {update['client_id']}, but this connection is client {self.client_id}")
        if update["num_examples"] > self.num_examples:
            raise BadMessage(f"num_examples {update['num_examples']} is outside 1..{self.num_examples} "
                             f"(the examples this client said it holds)")
        buffers = self.lobby.buffers
        check_layout(update["weights"], buffers.layout)
        self.lobby.events.emit(UpdateArriving(number, self.client_id))
        buffer = await buffers.take(lambda: self.conn.reader.progress)
        try:
            if isinstance(buffer, SpooledUpdate):
                await self.conn.recv_blob_in_windows(buffer.window, buffers.layout["nbytes"], buffer.write)
                tensors = await buffer.open(buffers.opening)
            else:
                await self.conn.recv_blob(buffer.buffer)
                tensors = buffer.tensors  # views of the bytes just received
            buffers.received(buffer)
            check_finite(tensors)
            compression = self.lobby.compression
            if compression.kind != "none":
                tensors = decoded_update(compression, tensors, update.get("compression_params"), self.sent.tensors,
                                         self.lobby.scratch, self.sent.layout)
            elif "compression_params" in update:
                raise BadMessage("compression_params in an update of a run without --compression")
        except OSError as exc:  # the file for this update could not be written: the update is lost, not the client
            buffers.give_back(buffer)
            self.lost_update(number, f"the server could not store this update ({exc.strerror or exc})")
            return
        except BaseException:
            buffers.give_back(buffer)
            raise
        metrics = {k: update[k] for k in ("train_loss", "local_test_accuracy", "fit_seconds", "dp_sgd_epsilon")
                   if k in update}
        if "eval_confusion" in update:  # its federated evaluation of the model it was sent
            if update.get("eval_round", number - 1) != number - 1 or "eval_loss_sum" not in update:
                raise BadMessage(f"an {UPDATE} for round {number} evaluates round {update.get('eval_round')}'s model "
                                 f"(it must be {number - 1}'s, with eval_loss_sum)")
            metrics.update(eval_round=number - 1, eval_loss_sum=update.get("eval_loss_sum", 0.0),
                           eval_confusion=check_confusion(update["eval_confusion"], self.num_classes()))
        result = FitRes(self.client_id, number, update["num_examples"], tensors, metrics,
                        release=lambda: buffers.give_back(buffer))
        if self.result is not None and not self.result.done():
            self.result.set_result(result)
        else:  # nobody waits any more (its fit was cancelled): do not keep the buffer
            result.release()

    def lost_update(self, number: int, reason: str) -> None:
        """An update the server could not keep: the round goes on without it, the client stays."""
        self.lobby.events.emit(UpdateDiscarded(number, self.client_id, reason, warning=True))
        self.lobby.send_soon(self, [encode_message(SUCCESS, round=number, accepted=False, message=reason)])
        if self.result is not None and not self.result.done():
            self.result.set_exception(Dropped(reason))

    def leave(self, reason: str) -> None:
        if self.gone:
            return
        self.gone = reason
        self.lobby.pool.remove(self.client_id)
        if self.answer is not None and not self.answer.done():
            self.answer.set_exception(Dropped(reason))
        if self.result is not None and not self.result.done():
            self.result.set_exception(Dropped(reason))  # the engine reports it as a drop
        elif not self.finished and not self.lobby.closing:
            self.lobby.events.emit(ClientLeft(self.client_id, reason))


class Lobby:
    """Accepts connections, shakes hands and admits clients into the pool; heartbeats."""

    def __init__(self, *, listener: socket.socket, pool: ClientPool, events: Events, traffic: Traffic,
                 tls: ssl.SSLContext | None, auth: security.Authenticator, welcome, buffers: ReceiveBuffers,
                 status: Callable[[], str], handshake_timeout_s: float, round_timeout_s: float, heartbeat_s: float,
                 max_pending: int, require_client_cert: bool, required_features: list[str],
                 compression: Compression = Compression(), stall_timeout_s: float = 30.0):
        self.listener, self.pool, self.events, self.traffic = listener, pool, events, traffic
        self.tls, self.auth, self.welcome, self.buffers, self.status = tls, auth, welcome, buffers, status
        self.handshake_timeout_s, self.round_timeout_s, self.heartbeat_s = handshake_timeout_s, round_timeout_s, heartbeat_s
        self.max_pending, self.require_client_cert = max_pending, require_client_cert
        self.required_features = required_features
        self.compression, self.stall_timeout_s = compression, stall_timeout_s
        # compressed updates are decoded, tensor by tensor, into this as they are folded in (one at a time)
        self.scratch = scratch_for(welcome.setup.model.tensors) if compression.kind != "none" else {}
        self.pending: dict[asyncio.Task, Pending] = {}  # in arrival order
        self.evicted = 0
        self.tasks: set[asyncio.Task] = set()
        self.closing = False
        share = SOCKET_BUFFER_BUDGET_BYTES // pool.num_clients
        self.socket_buffer_bytes = max(share, SOCKET_BUFFER_MIN_BYTES) if share < SOCKET_BUFFER_AUTOTUNED_BYTES else None

    def start(self) -> None:
        self.spawn(self.accept_loop())
        self.spawn(self.heartbeat_loop())

    def close(self) -> None:
        self.closing = True
        for task in list(self.tasks):
            task.cancel()
        self.listener.close()

    def spawn(self, coroutine) -> asyncio.Task:
        task = asyncio.ensure_future(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:  # a bug: say so, with what it was
            exc = task.exception()
            self.events.notice(f"internal error in the server's connection handling: {type(exc).__name__}: {exc}",
                               warning=True)

    def send_soon(self, client: RemoteClient, frames: list) -> None:
        self.spawn(client.send(frames))

    # ---- connections
    async def accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, address = await loop.sock_accept(self.listener)
            except OSError as exc:  # out of file descriptors, say: keep serving the others
                self.events.notice(f"accept failed: {exc}", warning=True)
                await asyncio.sleep(0.5)  # a pause before trying again, not synchronisation
                continue
            peer = f"{address[0]}:{address[1]}"
            if len(self.pending) >= self.max_pending:
                self.evict_one()
            state = Pending(time.monotonic(), peer)
            # Counted here: sock_accept does not yield while a burst waits in the backlog.
            self.pending[self.spawn(self.handle_connection(sock, state))] = state

    def evict_one(self) -> None:
        """Make room: end the oldest silent pending connection, or the oldest pending one."""
        victim = next((task for task, p in self.pending.items() if not p.talking), None) or next(iter(self.pending))
        state = self.pending.pop(victim)
        victim.cancel()
        self.evicted += 1
        what = "had sent nothing" if not state.talking else "was the oldest handshake"
        self.events.emit(ConnectionRefused(state.peer, f"evicted: {self.max_pending} connections were in their "
                                                       f"handshake and this one {what}"))

    async def handle_connection(self, sock: socket.socket, state: Pending) -> None:
        """Handshake within --handshake-timeout, then serve the client until it leaves."""
        try:
            client = await self.admit(sock, state)
        except asyncio.CancelledError:  # evicted, or the server is closing
            if state.conn is not None:
                state.conn.transport.abort()
            else:
                sock.close()
            raise
        finally:
            self.pending.pop(asyncio.current_task(), None)
        if client is None:
            if state.conn is not None:
                await state.conn.close()
            else:
                sock.close()
            return
        await client.serve()

    async def admit(self, sock: socket.socket, state: Pending) -> RemoteClient | None:
        """The handshake, with every way it can fail answered and logged; the client if it joined."""
        peer = state.peer
        try:
            async with asyncio.timeout(self.handshake_timeout_s):
                state.conn = await open_accepted(
                    sock, self.traffic, self.tls, self.handshake_timeout_s, self.round_timeout_s,
                    require_client_cert=self.require_client_cert, socket_buffer_bytes=self.socket_buffer_bytes,
                    first_byte_timeout_s=FIRST_BYTE_TIMEOUT_S, on_first_byte=lambda: setattr(state, "talking", True),
                    stall_timeout_s=self.stall_timeout_s,
                )
                return await self.handshake(state.conn)
        except (TimeoutError, asyncio.TimeoutError):
            message = f"no complete handshake within {self.handshake_timeout_s:g} s"
            self.events.emit(ConnectionRefused(peer, f"{message}; disconnected"))
            if state.conn is not None:
                await send_error(state.conn, message)
            elif self.tls is None:  # before TLS we can only answer in plain frames
                send_plain_error(sock, message)
        except ProtocolError as exc:  # SilentPeer included
            self.events.emit(ConnectionRefused(peer, f"{exc}; disconnected"))
            if state.conn is not None and not isinstance(exc, ConnectionClosed):
                await send_error(state.conn, str(exc))
        except OSError as exc:
            self.events.emit(ConnectionRefused(peer, f"{exc}; disconnected"))
        return None

    async def handshake(self, conn: AsyncConnection) -> RemoteClient | None:
        order = Order(ROLE_SERVER)
        hello = await conn.recv_message(PRE_AUTH_CONTROL_BYTES)
        order.receive(hello["header"])
        if hello["protocol_version"] != PROTOCOL_VERSION:
            raise BadMessage(f"protocol version {hello['protocol_version']} is not supported; this server speaks "
                             f"{PROTOCOL_VERSION} (update the client)")
        client_id = hello["client_id"]
        if self.auth.required:
            nonce = security.new_nonce()
            order.send(CHALLENGE)
            await conn.send([encode_message(CHALLENGE, nonce=nonce.hex())])
            answer = await conn.recv_message(PRE_AUTH_CONTROL_BYTES)
            order.receive(answer["header"])
            if answer["header"] == ERROR:
                raise ConnectionClosed(f"client {client_id} gave up at the challenge: {answer['message'][:200]}")
            if not self.auth.verify(client_id, nonce, answer["mac"]):
                raise BadMessage(f"authentication failed for client id {client_id}")
        missing = [f for f in self.required_features if f not in hello["features"]]
        refusal = self.pool.refusal(client_id, self.welcome.round_now(), self.welcome.num_rounds)
        if missing and not refusal:
            refusal = (f"this run needs the client features {', '.join(missing)}, which this client does not have "
                       f"(update it)")
        if refusal:
            self.events.emit(ConnectionRefused(conn.peer, refusal, client_id))
            await send_error(conn, refusal)
            await conn.close()
            return None
        order.send(METADATA)
        client = RemoteClient(self, client_id, conn, self.welcome.max_examples(client_id), order)
        rejoined = self.pool.training_started
        self.pool.joined(client)
        await conn.send([encode_message(METADATA, **self.welcome.fields(client_id))])
        stated = hello.get("policy")  # checked by decode_message; the keys this server does not know are dropped
        policy = None if stated is None else {key: stated[key] for key in POLICY_KEYS}
        self.events.emit(ClientJoined(client_id, conn.peer, rejoined, policy))
        return client

    # ---- heartbeats
    async def heartbeat_loop(self) -> None:
        """Tell every connected client, now and then, that the server is alive and what it waits for,
        so that a client can tell a slow round from a server that is gone."""
        while True:
            await asyncio.sleep(self.heartbeat_s)  # a period, not synchronisation
            status = self.status()
            if self.buffers.receiving:
                status += f"; {self.buffers.receiving} update(s) arriving"
            frame = encode_message(WAITING, message=status)
            for client in list(self.pool.connected.values()):
                if not client.conn.sending:  # a model on its way says the same
                    self.send_soon(client, [frame])
