"""Benchmark 1: a model crosses one loopback TCP connection at wire speed.

Two processes, placed by the operating system as it would place a server and a
client, and three connections between them, made alike (loopback, TCP_NODELAY):
  fedsock  the project's own code on both ends. Upload (client -> server): the peer
           takes its CPU tensors' bytes in place (weights_buffers, no copy), frames
           them with their <UPDATE> message (frame_weights) and sends them with
           BlockingConnection, as fl_client does; this process receives them as the
           server does: AsyncConnection.recv_message, check_layout, recv_blob into a
           WeightsBuffer whose tensors are views. Download (server -> client): this
           process sends a model encoded once (as the server does per round) with its
           <MODEL> message through AsyncConnection.send; the peer receives it as
           fl_client does (recv_message, check_layout, recv_blob into its WeightsBuffer).
  bare     the same number of bytes with a plain sendall / recv_into loop.
Each transfer starts with a 1-byte go and ends with a 1-byte ack, so that both modes
time the same round trip around the weights: in band for bare, on a third connection
for fedsock (so that none of fedsock's other messages is timed; this process waits
for that ack through its event loop, which must keep running to finish the send).
Modes are interleaved rep by rep, the order rotating; rep 0 warms up (page faults of
fresh buffers) and is not counted.

    python bench/wire.py --sizes 1 50 --reps 20 5
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import json
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Proc, Row, median, say  # noqa: E402

MB = 1_000_000


def torch_like_fedsock():
    """PyTorch as fl_client and fl_server set it up (--threads 1, their default)."""
    import torch

    torch.set_num_threads(1)
    return torch


def make_model(megabytes: int):
    """A float32 model of about `megabytes` MB, as a few dense layers (weights and biases)."""
    torch = torch_like_fedsock()

    floats = megabytes * MB // 4
    layers = 4 if megabytes < 10 else 8
    columns = 1000
    rows = floats // (layers * (columns + 1))
    generator = torch.Generator().manual_seed(megabytes)
    tensors = {}
    for i in range(layers):
        tensors[f"layer{i}.weight"] = torch.rand((rows, columns), generator=generator)
        tensors[f"layer{i}.bias"] = torch.rand((rows,), generator=generator)
    return tensors


MODES = {"upload": ("fedsock", "bare"), "download": ("fedsock", "bare")}
# A throughput sample moves at least this much: smaller models go back to back, as a
# server's sends to its clients and their updates to it do. A small model is also timed
# alone, go to ack, for its latency (reported, no target: it is mostly two wake-ups).
STREAM_BYTES = 16 * MB


def models_per_sample(nbytes: int) -> list[int]:
    """The throughput batch first, then 1 (latency) if the batch is larger."""
    batch = max(1, STREAM_BYTES // nbytes)
    return [batch, 1] if batch > 1 else [1]


def schedule(reps: int, nbytes: int):
    """(rep, direction, mode, models per sample) in the order both processes follow;
    rep 0 is the warm-up."""
    for rep in range(reps + 1):
        for count in models_per_sample(nbytes):
            for direction, modes in MODES.items():
                shift = rep % len(modes)
                for mode in modes[shift:] + modes[:shift]:
                    yield rep, direction, mode, count


def recv_exactly(sock: socket.socket, buffer: memoryview) -> None:
    filled = 0
    while filled < len(buffer):
        n = sock.recv_into(buffer[filled:])
        if n == 0:
            raise ConnectionError("peer closed")
        filled += n


# --------------------------------------------------------------------------- the peer (the "client" process)


def peer(port: int, sizes: list[int], reps: list[int]) -> None:
    from socket_methods import WeightsBuffer, check_layout, encode_message, frame_weights, weights_buffers, weights_layout
    from fedsock.transport import BlockingConnection, tune_socket

    fs_sock = socket.create_connection(("127.0.0.1", port))
    tune_socket(fs_sock)
    fedsock = BlockingConnection(fs_sock, idle_timeout_s=120)
    fedsock.send([encode_message("<HELLO>", protocol_version=1, client_id=1, features=[])])
    bare, signal = (socket.create_connection(("127.0.0.1", port), timeout=120) for _ in range(2))
    for sock in (bare, signal):
        tune_socket(sock)
    one = memoryview(bytearray(1))
    for megabytes, count in zip(sizes, reps):
        tensors = make_model(megabytes)
        layout = weights_layout(tensors)
        received = WeightsBuffer(layout)  # as fl_client: one buffer, its tensors viewed once
        bare_buffer = memoryview(bytearray(layout["nbytes"]))
        for rep, direction, mode, models in schedule(count, layout["nbytes"]):
            if (direction, mode) == ("upload", "fedsock"):
                recv_exactly(signal, one)  # the go
                for _ in range(models):
                    out_layout, pieces = weights_buffers(tensors)
                    fedsock.send(frame_weights(
                        "<UPDATE>", pieces, round=rep + 1, client_id=1, num_examples=100, train_loss=0.0,
                        local_test_accuracy=0.0, fit_seconds=0.0, weights=out_layout,
                    ))
            elif (direction, mode) == ("upload", "bare"):
                recv_exactly(bare, one)
                for _ in range(models):
                    bare.sendall(bare_buffer)
            elif (direction, mode) == ("download", "fedsock"):
                for _ in range(models):
                    message = fedsock.recv_message()
                    check_layout(message["weights"], layout)
                    fedsock.recv_blob(received.buffer)
                    assert received.tensors  # the new weights, already in place as tensors
                signal.sendall(b"a")
            else:
                for _ in range(models):
                    recv_exactly(bare, bare_buffer)
                bare.sendall(b"a")
        del tensors, received, bare_buffer, pieces
        gc.collect()
    fedsock.close()
    bare.close()
    signal.close()


# --------------------------------------------------------------------------- this process (the "server")


def encode_copy_check(tensors, layout, blob) -> dict:
    """encode_weights into a reused buffer vs one plain memcpy of as many bytes; a CPU
    upload sends from the tensors' own memory; decoded tensors are views."""
    from socket_methods import decode_weights, encode_weights, weights_buffers

    source = bytearray(layout["nbytes"])
    target = memoryview(blob)
    encode_times, copy_times = [], []
    for _ in range(5):
        started = time.perf_counter()
        _, out = encode_weights(tensors, out=blob)
        encode_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        target[:] = source
        copy_times.append(time.perf_counter() - started)
    encode_weights(tensors, out=blob)
    base = ctypes.addressof(ctypes.c_char.from_buffer(blob))
    decoded = decode_weights(layout, blob)
    views = all(base <= t.data_ptr() < base + len(blob) for t in decoded.values())
    _, pieces = weights_buffers(tensors)
    addresses = {ctypes.addressof(ctypes.c_char.from_buffer(p)) for p in pieces if not p.readonly}
    in_place = all(t.data_ptr() in addresses for t in tensors.values())
    return {"encode_s": median(encode_times[1:]), "memcpy_s": median(copy_times[1:]),
            "encode_in_place": out is blob, "decode_is_view": views, "upload_in_place": in_place}


async def measure(sizes: list[int], reps: list[int]) -> dict:
    from socket_methods import WeightsBuffer, check_layout, encode_weights, frame_weights
    from fedsock.transport import Traffic, open_accepted, tune_socket

    loop = asyncio.get_running_loop()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(120)
    port = listener.getsockname()[1]
    args = ["bench/wire.py", "--peer", str(port), "--sizes", *map(str, sizes), "--reps", *map(str, reps)]
    proc = Proc(args, "wire peer")
    results: dict = {}
    try:
        fs_sock, _ = listener.accept()
        fs_sock.setblocking(False)
        conn = await open_accepted(fs_sock, Traffic(), None, 60, 120)
        hello = await conn.recv_message()
        assert hello["header"] == "<HELLO>"
        bare, _ = listener.accept()
        tune_socket(bare)
        bare.settimeout(120)
        signal, _ = listener.accept()  # fedsock's go and ack, waited for through the event loop
        tune_socket(signal)
        signal.setblocking(False)
        one = bytearray(1)
        for megabytes, count in zip(sizes, reps):
            tensors = make_model(megabytes)
            layout, blob = encode_weights(tensors)  # the server encodes a model once for all its clients
            copies = encode_copy_check(tensors, layout, blob)
            del tensors
            nbytes = layout["nbytes"]
            model_frames = frame_weights("<MODEL>", blob, round=1, local_epochs=1, batch_size=32, lr=0.05, proximal_mu=0.0,
                                         weights=layout)
            received = WeightsBuffer(layout)  # as fl_server: a pooled buffer, its tensors viewed once
            bare_buffer = memoryview(bytearray(nbytes))
            times: dict[tuple[str, str, int], list[float]] = {}
            for rep, direction, mode, models in schedule(count, nbytes):
                started = time.perf_counter()
                if (direction, mode) == ("upload", "fedsock"):
                    signal.send(b"g")
                    for _ in range(models):
                        update = await conn.recv_message()
                        check_layout(update["weights"], layout)
                        await conn.recv_blob(received.buffer)
                        assert received.tensors  # the update, already in place as tensors
                elif (direction, mode) == ("upload", "bare"):
                    bare.sendall(b"g")
                    for _ in range(models):
                        recv_exactly(bare, bare_buffer)
                elif (direction, mode) == ("download", "fedsock"):
                    for _ in range(models):
                        await conn.send(model_frames)
                    await loop.sock_recv_into(signal, one)
                else:
                    for _ in range(models):
                        bare.sendall(bare_buffer)
                    recv_exactly(bare, memoryview(bytearray(1)))
                elapsed = time.perf_counter() - started
                if rep:
                    times.setdefault((direction, mode, models), []).append(elapsed)
            results[megabytes] = {
                "nbytes": nbytes,
                "copies": copies,
                "samples": {f"{d}_{m}_{n}": ts for (d, m, n), ts in times.items()},
            }
            say(f"wire {megabytes} MB: " + ", ".join(
                f"{d} {m} x{n} {n * nbytes / median(ts) / MB:.0f} MB/s" for (d, m, n), ts in sorted(times.items())))
            del model_frames, blob, received, bare_buffer
            gc.collect()
        await conn.close()
        bare.close()
        signal.close()
        if proc.finish(timeout=60) != 0:
            raise RuntimeError("wire peer failed:\n" + proc.tail())
    finally:
        proc.kill()
        listener.close()
    return results


def rows_from(results: dict) -> list[Row]:
    rows = []
    for megabytes, r in results.items():
        nbytes, copies = r["nbytes"], r["copies"]
        batch, *_ = sizes = models_per_sample(nbytes)
        for direction, path, note in (
            ("upload", "client weights_buffers+send -> server recv_blob into views",
             "sent from the tensors' own memory: "
             f"{'yes, no copy' if copies['upload_in_place'] else 'NO'}"),
            ("download", "server AsyncConnection.send -> client recv_blob into views",
             "the model is encoded once per round for all clients, so encoding is not timed here"),
        ):
            for models in sizes:
                fedsock, bare = (r["samples"][f"{direction}_{mode}_{models}"] for mode in ("fedsock", "bare"))
                fedsock_s, bare_s = median(fedsock), median(bare)
                ratio = bare_s / fedsock_s
                if models == batch:
                    shape = f"{models} models back to back, then the ack" if models > 1 else "go, the model, ack"
                    rows.append(Row(
                        "1 wire speed", f"{megabytes} MB {direction}: {path}", models * nbytes / fedsock_s / MB, "MB/s",
                        models * nbytes / bare_s / MB, "bare sendall/recv_into", ratio, ">= 0.80", ratio >= 0.8,
                        f"median of {len(fedsock)} interleaved samples ({shape}); {note}",
                    ))
                else:
                    rows.append(Row(
                        "1 wire speed", f"{megabytes} MB {direction}, one model alone: go -> model -> ack (latency)",
                        fedsock_s * 1e6, "us", bare_s * 1e6, "bare", ratio, "", None,
                        f"median of {len(fedsock)}; a round trip this short is mostly the two processes waking "
                        f"each other up (see bench/README.md)",
                    ))
        one_copy = copies["encode_in_place"] and copies["decode_is_view"] and copies["upload_in_place"]
        rows.append(Row(
            "1 wire speed", f"{megabytes} MB encode_weights (server, GPU client) into a reused buffer", copies["encode_s"] * 1e3, "ms",
            copies["memcpy_s"] * 1e3, "one memcpy of as many bytes", copies["memcpy_s"] / copies["encode_s"],
            "encode <= 1 copy, decode 0", one_copy,
            f"encode writes straight into the caller's buffer: {'yes' if copies['encode_in_place'] else 'NO'}; "
            f"decoded tensors are views of the receive buffer: {'yes' if copies['decode_is_view'] else 'NO'}",
        ))
    return rows


def run(quick: bool) -> list[Row]:
    sizes = [1, 50, 400]
    reps = [30, 8, 3] if quick else [200, 40, 15]
    return rows_from(asyncio.run(measure(sizes, reps)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 50, 400], help="model sizes in MB")
    parser.add_argument("--reps", type=int, nargs="+", default=[200, 40, 15], help="repetitions per size")
    args = parser.parse_args()
    if args.peer is not None:
        peer(args.peer, args.sizes, args.reps)
        return
    results = asyncio.run(measure(args.sizes, args.reps))
    for row in rows_from(results):
        print(json.dumps(row.__dict__))


if __name__ == "__main__":
    main()
