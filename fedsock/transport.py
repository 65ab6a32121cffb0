"""The IO edges of the protocol: an asyncio connection for the server, a blocking one for the client.

Both drive the same sans-IO `FrameReader` from socket_methods; this module only
moves bytes. The server side is an asyncio `BufferedProtocol`, so the kernel
writes a weights frame straight into its final buffer (`recv_into`), one event
loop serves a thousand connections, and a slow peer blocks nobody.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from dataclasses import dataclass
from typing import Any, Iterable

from socket_methods import (
    ERROR,
    MAX_CONTROL_BYTES,
    ConnectionClosed,
    FrameReader,
    ProtocolError,
    TruncatedFrame,
    decode_message,
    encode_message,
)

# asyncio's transport (Python 3.11) copies whatever the socket does not take at
# once into its own buffer. A model is written in slices, each one only after the
# one before has gone to the kernel, so a slice goes from the model's bytes
# straight to the socket and at most the rest of one slice per connection is ever
# copied: a broadcast to 1,000 clients does not hold 1,000 models. A slice is 1 MB
# (smaller slices cost an event-loop turn each: 256 KB sent a 50 MB model at ~75%
# of a bare sendall, 1 MB at ~100%), or the connection's socket buffer when the
# server fixes that to share a budget among many clients.
SEND_CHUNK_BYTES = 1 << 20
# What a connection reads at once on its own (_read_available) before it leaves the
# rest to the event loop's turns, so that a fast peer cannot hold the loop for a whole
# 400 MB update while the other clients wait.
READ_AT_ONCE_BYTES = 4 << 20
TLS_RECORD_TYPE_HANDSHAKE = 0x16  # first byte of every TLS ClientHello


@dataclass
class Traffic:
    """Bytes moved by all connections of a server (read for the metrics of each round)."""

    sent: int = 0
    received: int = 0


def tune_socket(sock: socket.socket, unacknowledged_s: float | None = None) -> None:
    """No Nagle delay (a small frame after a large one must not wait for an ACK), and
    TCP keepalive so that a peer whose machine vanished is noticed in about a minute.

    `unacknowledged_s` (the server's --stall-timeout) is Linux's TCP_USER_TIMEOUT: the kernel
    closes the connection when bytes it sent stay unacknowledged that long. A peer on a live
    link acknowledges within a round trip even while it trains (the kernel does it), so this
    catches what no read can: a link that died while the server's bytes to it (a model that
    fit in the socket buffers, a heartbeat) were in flight."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
    if unacknowledged_s and hasattr(socket, "TCP_USER_TIMEOUT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(unacknowledged_s * 1000))


class AsyncConnection(asyncio.BufferedProtocol):
    """One peer of the server. Reads one frame at a time, only when asked to.

    Slow is not dead. A frame, once begun (a weights frame: once asked for), is cut off
    when no byte of it has come for `stall_timeout_s`: a peer that sends half a frame and
    goes silent cannot hold its buffer for long, while a frame arriving steadily over a
    slow link, however long it takes, is never cut off for its length. (What it may not
    outlast is `frame_timeout_s`, the run's round timeout: by then its round has closed.)
    The same holds for sending: a peer that takes no byte for `stall_timeout_s` while
    a frame waits for it has stalled, and the connection is aborted.
    """

    def __init__(
        self, traffic: Traffic, frame_timeout_s: float | None = None, send_chunk_bytes: int = SEND_CHUNK_BYTES,
        plain_socket: socket.socket | None = None, stall_timeout_s: float | None = None,
    ):
        self.traffic = traffic
        self._sock = plain_socket  # plain TCP only: read at once what is already there (_read_available)
        self.send_chunk_bytes = send_chunk_bytes
        self.frame_timeout_s = frame_timeout_s
        self.stall_timeout_s = stall_timeout_s if stall_timeout_s is not None else frame_timeout_s
        self._deadline: asyncio.TimerHandle | None = None
        self._frame_began = self._last_byte = 0.0  # loop times: when the frame began, when a byte last came
        self.reader = FrameReader()
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self._frame_done: asyncio.Future[None] | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self._send_lock = asyncio.Lock()
        self._lost: ProtocolError | None = None
        self._closing = False  # close() has begun: nothing more may be written
        self._closed = asyncio.get_running_loop().create_future()
        self._discard: memoryview | None = None  # while closing: where unread input goes to be dropped

    # ---- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.pause_reading()  # type: ignore[attr-defined]  # nothing is read until a frame is asked for
        # Plain TCP: pause_writing as soon as anything waits in the transport's buffer and
        # resume_writing once it is empty, so that each slice goes to the kernel first. TLS
        # encrypts every write into a buffer of its own, and pauses at size >= high: a tiny mark
        # would pause it for good while the handshake's last bytes wait there. It keeps a slice.
        if transport.get_extra_info("ssl_object") is None:
            transport.set_write_buffer_limits(high=1, low=0)  # type: ignore[attr-defined]
        else:
            transport.set_write_buffer_limits(high=self.send_chunk_bytes)  # type: ignore[attr-defined]
        host, port = transport.get_extra_info("peername")[:2]
        self.peer = f"{host}:{port}"

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._discard if self._discard is not None else self.reader.buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.traffic.received += nbytes
        self._last_byte = self._now()
        if self._discard is not None:
            return
        try:
            self.reader.advance(nbytes)
        except ProtocolError as exc:
            self._end_frame(exc)
            return
        if self.reader.done:
            self._end_frame(None)
        elif self._deadline is None:  # a frame has begun: it must end in time
            self._arm_deadline()

    def eof_received(self) -> bool:
        if self._discard is not None:
            return False  # the peer has closed too: the transport closes
        try:
            self.reader.advance(0)  # always raises: clean close or cut-off frame
        except ProtocolError as exc:
            self._end_frame(exc)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f": {exc}" if exc else ""
        self._lost = self._lost or ConnectionClosed(f"connection closed{reason}")
        self._writable.set()
        self._end_frame(self._lost)
        if not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    def _arm_deadline(self) -> None:
        """A frame begins (or is asked for): watch it for stalls, with one timer per frame."""
        if self.frame_timeout_s is not None:
            self._frame_began = self._last_byte = self._now()
            first_look = min(self.stall_timeout_s, self.frame_timeout_s)
            self._deadline = asyncio.get_running_loop().call_later(first_look, self._check_frame)

    def _check_frame(self) -> None:
        """The timer: cut the frame off if it stalled or ran out of time, else look again when it could."""
        now = self._now()
        stalled_at, ends_at = self._last_byte + self.stall_timeout_s, self._frame_began + self.frame_timeout_s
        if now < min(stalled_at, ends_at):
            self._deadline = asyncio.get_running_loop().call_at(min(stalled_at, ends_at), self._check_frame)
            return
        self._deadline = None
        if now >= ends_at:
            self._end_frame(TruncatedFrame(f"a frame was not complete within {self.frame_timeout_s:g} s"))
        else:
            self._end_frame(TruncatedFrame(f"stalled: no byte of a frame for {self.stall_timeout_s:g} s "
                                           f"({self.reader.progress} bytes in)"))

    def _end_frame(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
        waiter, self._frame_done = self._frame_done, None
        if waiter is not None and not waiter.done():
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)

    # ---- what the server calls
    async def _read_frame(self) -> None:
        if self.reader.done:  # it came with the frame before (FrameReader reads ahead)
            return
        if self._lost is not None:
            raise self._lost
        self._frame_done = done = asyncio.get_running_loop().create_future()
        self._read_available()
        if not done.done():
            self.transport.resume_reading()
        await done

    def _read_available(self) -> None:
        """Plain TCP: take what the socket holds already (the weights behind an <UPDATE>
        usually are), instead of waiting a turn of the event loop to be told so. An end
        of file or an error is left in the socket for the transport's own read to report."""
        if self._sock is None:
            return
        budget = READ_AT_ONCE_BYTES
        try:
            while self._frame_done is not None and budget > 0:
                nbytes = self._sock.recv_into(self.reader.buffer()[:budget])
                if not nbytes:
                    return
                budget -= nbytes
                self.buffer_updated(nbytes)
        except OSError:  # BlockingIOError: nothing more there yet
            return

    async def recv_message(self, limit: int = MAX_CONTROL_BYTES) -> dict[str, Any]:
        self.reader.expect_message(limit)
        await self._read_frame()
        return decode_message(self.reader.payload)

    async def recv_blob(self, buffer: bytearray | memoryview) -> None:
        self.reader.expect_blob(buffer)
        if not self.reader.done:
            self._arm_deadline()  # the weights must follow their <UPDATE> promptly
        await self._read_frame()

    async def recv_blob_in_windows(self, window: bytearray, total: int, sink) -> None:
        """A weights frame of `total` bytes, through `window`: `sink` takes each part (see FrameReader)."""
        self.reader.expect_blob_in_windows(window, total, sink)
        if not self.reader.done:
            self._arm_deadline()
        await self._read_frame()

    @property
    def sending(self) -> bool:
        return self._send_lock.locked()

    async def send(self, buffers: Iterable[bytes | bytearray | memoryview]) -> None:
        """Send whole frames; concurrent senders take turns, so frames never interleave."""
        async with self._send_lock:
            for view in self._send_available(byte_views(buffers)):
                for start in range(0, len(view), self.send_chunk_bytes):
                    if not self._writable.is_set():
                        await self._wait_writable()
                    if self._lost is not None:
                        raise self._lost
                    if self._closing:  # a send that waited while close() began: the transport takes no more
                        raise ConnectionClosed("the connection was closed before this message went out")
                    chunk = view[start : start + self.send_chunk_bytes]
                    self.transport.write(chunk)
                    self.traffic.sent += len(chunk)

    async def _wait_writable(self) -> None:
        """Wait for the peer to take what is queued; abort if it takes nothing for stall_timeout_s."""
        while True:
            queued = self.transport.get_write_buffer_size()
            try:
                await asyncio.wait_for(self._writable.wait(), self.stall_timeout_s)
                return
            except asyncio.TimeoutError:
                if self._lost is not None or self.transport.get_write_buffer_size() < queued:
                    continue  # it is taking the bytes, slowly: not a stall
                self._lost = ConnectionClosed(f"stalled: the peer took no byte for {self.stall_timeout_s:g} s")
                self.transport.abort()

    def _send_available(self, views: list[memoryview]) -> list[memoryview]:
        """Plain TCP with nothing queued: hand the kernel all the buffers in one sendmsg
        (no joining, one system call, one wake-up of the peer); return what it did not take."""
        if self._sock is None or self._lost is not None or self._closing or self.transport.get_write_buffer_size():
            return views
        try:
            sent = self._sock.sendmsg(views[:IOV_MAX])
        except OSError:  # BlockingIOError: the socket is full; any other error: the transport reports it
            return views
        self.traffic.sent += sent
        return after_sent(views, sent)

    async def close(self, timeout_s: float = 5.0) -> None:
        """Close gracefully, or abort if the peer takes more than `timeout_s`.

        Plain TCP: send what is buffered, then FIN, then read and drop whatever the peer
        still sends until it closes too. Closing with unread input would make the kernel
        answer with a reset, which destroys an <ERROR> still on its way to the peer.
        TLS: close_notify, with reading resumed too: asyncio's TLS layer keeps an end of
        file that arrived while reading was paused to itself, and would not finish a
        close that the peer had already begun.
        """
        if self.transport is None:
            return
        self._closing = True
        self._writable.set()  # a send waiting for room wakes up, and stops (see send)
        if not self.transport.is_closing():
            self._discard = memoryview(bytearray(64 << 10))
            self.transport.resume_reading()
            try:
                if self.transport.can_write_eof():  # plain TCP (TLS has its own close_notify)
                    self.transport.write_eof()
                else:
                    self.transport.close()
            except OSError:  # the peer reset the connection already (ENOTCONN): nothing left to say
                self.transport.abort()
        try:
            await asyncio.wait_for(asyncio.shield(self._closed), timeout_s)
        except asyncio.TimeoutError:
            self.transport.abort()


async def _wait_readable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_reader(sock.fileno(), lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())


async def send_error(conn: AsyncConnection, message: str) -> None:
    """Tell the peer why it is being dropped, if the connection still allows it (for at most 5 s)."""
    try:
        await asyncio.wait_for(conn.send([encode_message(ERROR, message=message)]), 5)
    except (ProtocolError, OSError, asyncio.TimeoutError):
        pass


def send_plain_error(sock: socket.socket, message: str) -> None:
    try:  # a fresh socket's send buffer takes this small frame at once
        sock.send(encode_message(ERROR, message=message))
    except OSError:
        pass


class SilentPeer(ProtocolError):
    """A new connection that sent nothing within its first-byte deadline."""


async def open_accepted(
    sock: socket.socket, traffic: Traffic, tls: ssl.SSLContext | None, handshake_timeout_s: float,
    frame_timeout_s: float, require_client_cert: bool = False, socket_buffer_bytes: int | None = None,
    first_byte_timeout_s: float | None = None, on_first_byte=None, stall_timeout_s: float | None = None,
) -> AsyncConnection:
    """Wrap an accepted socket, after checking that the peer speaks TLS exactly when we do.

    The first byte tells: a TLS ClientHello starts with 0x16, while a fedsock frame
    starts with the high byte of its length, which is 0. A plain client at a TLS
    server gets a plain <ERROR> that says what to change instead of a hang; a TLS
    client at a plain server gets a plain frame, which its TLS layer reports as
    "not TLS" at once. `socket_buffer_bytes`, if given, fixes the kernel's send and
    receive buffers of this connection at that size instead of letting them grow, and
    the slices its sends are written in. A real client speaks at once (its <HELLO>, or
    its TLS ClientHello), so a peer silent for `first_byte_timeout_s` is cut off early;
    `on_first_byte` is told when the peer has spoken.
    """
    tune_socket(sock, stall_timeout_s)
    if socket_buffer_bytes:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, socket_buffer_bytes)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, socket_buffer_bytes)
    wait_s = min(handshake_timeout_s, first_byte_timeout_s or handshake_timeout_s)
    try:
        await asyncio.wait_for(_wait_readable(sock), wait_s)
    except asyncio.TimeoutError:
        raise SilentPeer(f"sent nothing within {wait_s:g} s of connecting") from None
    first = sock.recv(1, socket.MSG_PEEK)
    if not first:
        raise ConnectionClosed("the peer closed the connection before saying anything")
    if on_first_byte is not None:
        on_first_byte()
    if tls is not None and first[0] != TLS_RECORD_TYPE_HANDSHAKE:
        send_plain_error(sock, "this server requires TLS: start the client with --tls-ca FILE")
        raise ProtocolError("a plain-TCP client connected to this TLS server; told it to use --tls-ca")
    if tls is None and first[0] == TLS_RECORD_TYPE_HANDSHAKE:
        send_plain_error(sock, "this server does not use TLS")
        raise ProtocolError("the peer started a TLS handshake, but this server runs without --tls-cert")
    loop = asyncio.get_running_loop()
    try:
        transport, conn = await loop.connect_accepted_socket(
            lambda: AsyncConnection(traffic, frame_timeout_s, socket_buffer_bytes or SEND_CHUNK_BYTES, None if tls else sock,
                                    stall_timeout_s),
            sock, ssl=tls, ssl_handshake_timeout=handshake_timeout_s if tls else None,
        )
    except ssl.SSLCertVerificationError as exc:
        raise ProtocolError(f"TLS handshake failed: client certificate rejected ({exc.verify_message})") from exc
    except ssl.SSLError as exc:
        raise ProtocolError(f"TLS handshake failed: {exc.reason or exc}") from exc
    except OSError as exc:  # reset by the peer, or asyncio's handshake timeout
        raise ProtocolError(f"TLS handshake failed: {exc}") from exc
    # Mutual TLS asks for a certificate without demanding one in the handshake (CERT_OPTIONAL;
    # a certificate that is sent is still verified there), so that a client which has none
    # is told why here, in a frame it can read, instead of by a silently closed connection.
    if require_client_cert and not transport.get_extra_info("peercert"):
        await send_error(conn, "this server requires a client certificate: start the client with --tls-cert and --tls-key")
        await conn.close()
        raise ProtocolError("a client without a certificate connected to this mutual-TLS server; told it to use --tls-cert")
    return conn


def coalesced(buffers: Iterable[bytes | bytearray | memoryview], small: int = 64 << 10) -> Iterable[memoryview]:
    """The buffers with each run of small ones (a JSON frame, a length prefix, a small
    tensor, padding) joined into one, so that they cost one system call, not one each."""
    run: list[memoryview] = []
    for buffer in buffers:
        view = memoryview(buffer)
        if view.nbytes < small:
            run.append(view)
            continue
        if run:
            yield memoryview(b"".join(run))
            run = []
        yield view
    if run:
        yield memoryview(b"".join(run))


IOV_MAX = 1024  # buffers per sendmsg call (the POSIX minimum for writev is 16; Linux and macOS take 1024)


def byte_views(buffers: Iterable[bytes | bytearray | memoryview]) -> list[memoryview]:
    return [view for view in (memoryview(b).cast("B") for b in buffers) if view.nbytes]


def after_sent(views: list[memoryview], sent: int) -> list[memoryview]:
    """What is left of `views` once their first `sent` bytes have gone out."""
    first = 0
    while first < len(views) and sent >= views[first].nbytes:
        sent -= views[first].nbytes
        first += 1
    rest = views[first:]
    if sent:
        rest[0] = rest[0][sent:]
    return rest


def send_gathered(sock: socket.socket, buffers: Iterable[bytes | bytearray | memoryview]) -> int:
    """Send all the buffers (a blocking socket) in as few system calls as the kernel
    allows, without joining them: sendmsg (writev) takes a list of buffers, here a frame,
    its length prefix and every tensor of a model in place. Returns the bytes sent."""
    views = byte_views(buffers)
    total = sum(view.nbytes for view in views)
    while views:
        views = after_sent(views, sock.sendmsg(views[:IOV_MAX]))
    return total


class BlockingConnection:
    """The client's end: a blocking socket (plain or TLS) driving the same FrameReader."""

    def __init__(self, sock: socket.socket, idle_timeout_s: float | None = None):
        self.sock = sock
        self.reader = FrameReader()
        self.sock.settimeout(idle_timeout_s)
        # One sendmsg per message on plain sockets; TLS (and Windows) lack it: join small pieces.
        self._gather = not isinstance(sock, ssl.SSLSocket) and hasattr(sock, "sendmsg")
        self.bytes_sent = 0
        self.bytes_received = 0

    def _recv_into(self, buffer: memoryview) -> int:
        nbytes = self.sock.recv_into(buffer)
        self.bytes_received += nbytes
        return nbytes

    def _read_frame(self) -> None:
        self.reader.fill_from(self._recv_into)

    def recv_message(self, limit: int = MAX_CONTROL_BYTES) -> dict[str, Any]:
        self.reader.expect_message(limit)
        self._read_frame()
        return decode_message(self.reader.payload)

    def recv_blob(self, buffer: bytearray | memoryview) -> None:
        self.reader.expect_blob(buffer)
        self._read_frame()

    def send(self, buffers: Iterable[bytes | bytearray | memoryview], timeout_s: float | None = None) -> None:
        """Send whole frames; `timeout_s` replaces the idle timeout while they go out."""
        idle_timeout = self.sock.gettimeout()
        if timeout_s is not None:
            self.sock.settimeout(timeout_s)
        try:
            if self._gather:
                self.bytes_sent += send_gathered(self.sock, buffers)
            else:
                for buffer in coalesced(buffers):
                    self.sock.sendall(buffer)
                    self.bytes_sent += buffer.nbytes
        finally:
            self.sock.settimeout(idle_timeout)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
