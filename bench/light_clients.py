"""Many light fedsock clients in one process, written from the protocol spec alone.

No project module and no PyTorch: numpy, asyncio, struct, json (and socket, zlib).
Each client joins, then answers every <MODEL> with an <UPDATE> that echoes the
weights it received, slightly scaled, and stops at <FINISHED>. A few processes
of these stand in for a thousand clients.

Frames: 8-byte big-endian length, then the payload. Control messages are JSON
objects with a "header"; <MODEL> and <UPDATE> are followed by one raw frame of
little-endian tensor bytes described by their "weights" layout.

    python bench/light_clients.py --port 50052 --first-id 1 --count 250

Every client reads its model at once, as a real client does, but a thousand
6.6 MB buffers would not fit beside everything else on one machine. So the
first client of a process to get a round's model keeps it; the others stream
theirs through a small scratch buffer, check that their CRC-32 equals the kept
copy's, and send that copy back (scaled once per process).

A real client's socket buffers live in its own machine's kernel; here they all
share one kernel with the server, whose TCP memory is a global limit (tcp_mem).
Each light client therefore caps its own socket buffers (SOCKET_BUFFER_BYTES);
the server's sockets are left as the server sets them.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import socket
import struct
import sys
import zlib

import numpy as np

HEADER = struct.Struct(">Q")
MAX_CONTROL_BYTES = 1 << 20
PROTOCOL_VERSION = 3
SOCKET_BUFFER_BYTES = 128 << 10
SCRATCH_BYTES = 64 << 10
NUMPY_DTYPES = {"float32": "<f4", "float64": "<f8", "float16": "<f2", "int64": "<i8", "int32": "<i4",
                "int16": "<i2", "int8": "i1", "uint8": "u1", "bool": "?"}


def frame(header: str, **fields) -> bytes:
    payload = json.dumps({"header": header, **fields}, separators=(",", ":")).encode()
    return HEADER.pack(len(payload)) + payload


class Peer:
    """One connection: exact reads and whole-frame writes on a non-blocking socket."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.loop = asyncio.get_running_loop()

    async def read_into(self, view: memoryview) -> None:
        filled = 0
        while filled < len(view):
            n = await self.loop.sock_recv_into(self.sock, view[filled:])
            if n == 0:
                raise ConnectionError(f"server closed the connection ({filled} of {len(view)} bytes read)")
            filled += n

    async def read_length(self, limit: int) -> int:
        header = bytearray(HEADER.size)
        await self.read_into(memoryview(header))
        (length,) = HEADER.unpack(header)
        if length > limit:
            raise ConnectionError(f"frame of {length} bytes is over the {limit}-byte limit")
        return length

    async def recv_message(self) -> dict:
        payload = bytearray(await self.read_length(MAX_CONTROL_BYTES))
        await self.read_into(memoryview(payload))
        message = json.loads(payload)
        if not isinstance(message, dict) or "header" not in message:
            raise ConnectionError("the server sent a message without a header")
        return message

    async def send(self, *buffers) -> None:
        for buffer in buffers:
            await self.loop.sock_sendall(self.sock, buffer)


def scale_in_place(blob: bytearray, layout: dict, factor: float) -> None:
    """The 'training': multiply every floating-point tensor of the weights frame by `factor`."""
    for entry in layout["tensors"]:
        if entry["dtype"] in ("float32", "float64"):
            count = entry["nbytes"] // np.dtype(NUMPY_DTYPES[entry["dtype"]]).itemsize
            values = np.frombuffer(blob, dtype=NUMPY_DTYPES[entry["dtype"]], count=count, offset=entry["offset"])
            values *= factor


class RoundCopy:
    """A round's model as the first client of this process received it (scaled once when complete)."""

    def __init__(self, nbytes: int):
        self.buffer = bytearray(nbytes)
        self.claimed = False
        self.crc: int | None = None
        self.complete = asyncio.Event()


async def stream_crc(peer: Peer, nbytes: int) -> int:
    """Read `nbytes` through a small scratch buffer; their CRC-32."""
    scratch = memoryview(bytearray(SCRATCH_BYTES))
    crc, remaining = 0, nbytes
    while remaining:
        n = await peer.loop.sock_recv_into(peer.sock, scratch[: min(remaining, len(scratch))])
        if n == 0:
            raise ConnectionError(f"server closed the connection with {remaining} weights bytes to go")
        crc = zlib.crc32(scratch[:n], crc)
        remaining -= n
    return crc


class Swarm:
    def __init__(self, port: int, first_id: int, joining: int, timeout_s: float):
        self.port = port
        self.factor = 1.0 + 1e-4 * ((first_id % 7) - 3)
        self.joining = asyncio.Semaphore(joining)
        self.timeout_s = timeout_s
        self.copies: dict[int, RoundCopy] = {}
        self.finished = 0
        self.rounds: list[int] = []
        self.errors: list[str] = []

    async def receive_weights(self, peer: Peer, number: int, layout: dict) -> RoundCopy:
        nbytes = layout["nbytes"]
        if await peer.read_length(nbytes) != nbytes:
            raise ConnectionError("weights frame size differs from its layout")
        if number not in self.copies:
            self.copies = {r: c for r, c in self.copies.items() if r >= number - 1}
            self.copies[number] = RoundCopy(nbytes)
        copy = self.copies[number]
        if not copy.claimed:
            copy.claimed = True
            try:
                await peer.read_into(memoryview(copy.buffer))
                copy.crc = zlib.crc32(copy.buffer)
                scale_in_place(copy.buffer, layout, self.factor)
            finally:
                copy.complete.set()  # also on failure, so that no client waits forever
            return copy
        crc = await stream_crc(peer, nbytes)
        await copy.complete.wait()
        if copy.crc is None or len(copy.buffer) != nbytes:
            raise ConnectionError(f"round {number}: the kept copy of the model is missing")
        if crc != copy.crc:
            raise ConnectionError(f"round {number}: this client's weights differ from another client's")
        return copy

    async def join(self, client_id: int) -> tuple[Peer, dict]:
        """Connect and say <HELLO>; retry a few times if the server is busy with other handshakes."""
        for attempt in range(20):
            async with self.joining:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
                try:
                    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.port))
                    peer = Peer(sock)
                    await peer.send(frame("<HELLO>", protocol_version=PROTOCOL_VERSION, client_id=client_id,
                                          features=[]))
                    message = await peer.recv_message()
                except (ConnectionError, OSError):
                    sock.close()
                    await asyncio.sleep(0.2 * (attempt + 1))  # backoff before trying again
                    continue
            if message["header"] == "<METADATA>":
                # Ready at once (a real client loads its data first): its examples are the bits set.
                bitmap = np.frombuffer(base64.b64decode(message["partition_bitmap"]), dtype=np.uint8)
                message["num_examples"] = int(np.unpackbits(bitmap).sum())
                await peer.send(frame("<READY>", num_examples=message["num_examples"], test_examples=0))
                return peer, message
            sock.close()
            raise ConnectionError(f"client {client_id} refused: {message}")
        raise ConnectionError(f"client {client_id} could not join after 20 attempts")

    async def client(self, client_id: int) -> None:
        peer, meta = await self.join(client_id)
        try:
            while True:
                message = await peer.recv_message()
                header = message["header"]
                if header == "<FINISHED>":
                    self.finished += 1
                    self.rounds.append(message["rounds_completed"])
                    return
                if header == "<ERROR>":
                    raise ConnectionError(f"server error: {message['message']}")
                if header != "<MODEL>":
                    continue  # <WAITING>, <SUCCESS>
                copy = await self.receive_weights(peer, message["round"], message["weights"])
                update = frame(
                    "<UPDATE>", round=message["round"], client_id=client_id, num_examples=meta["num_examples"], train_loss=0.0,
                    local_test_accuracy=0.0, fit_seconds=0.0, weights=message["weights"],
                )
                await peer.send(update, HEADER.pack(len(copy.buffer)), copy.buffer)
        finally:
            peer.sock.close()

    async def run(self, ids: range) -> None:
        async def guarded(client_id: int) -> None:
            try:
                await self.client(client_id)
            except (ConnectionError, OSError, ValueError, KeyError) as exc:
                self.errors.append(f"client {client_id}: {exc}")

        async with asyncio.timeout(self.timeout_s):
            await asyncio.gather(*(guarded(i) for i in ids))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True, help="the fedsock server's port on 127.0.0.1")
    parser.add_argument("--first-id", type=int, default=1, help="id of the first client")
    parser.add_argument("--count", type=int, default=10, help="clients in this process")
    parser.add_argument("--joining", type=int, default=8, help="clients of this process in their handshake at once")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before this process gives up")
    args = parser.parse_args()
    swarm = Swarm(args.port, args.first_id, args.joining, args.timeout)
    ids = range(args.first_id, args.first_id + args.count)
    try:
        asyncio.run(swarm.run(ids))
    except TimeoutError:
        swarm.errors.append(f"timed out after {args.timeout:g} s")
    summary = {"first_id": args.first_id, "count": args.count, "finished": swarm.finished,
               "rounds": sorted(set(swarm.rounds)), "errors": swarm.errors[:5], "error_count": len(swarm.errors)}
    print("light clients: " + json.dumps(summary), flush=True)
    return 0 if swarm.finished == args.count and not swarm.errors else 1


if __name__ == "__main__":
    sys.exit(main())
