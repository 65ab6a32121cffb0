"""The IO edges over real loopback sockets, with socket buffers far smaller than the
frames, so that every sendmsg, write and read of a model is partial."""

import asyncio
import socket
import threading

import torch

from socket_methods import (PROTOCOL_VERSION, WeightsBuffer, encode_message, encode_weights, frame_header, frame_weights,
                            weights_buffers)
from fedsock.transport import BlockingConnection, Traffic, open_accepted

SMALL = 64 << 10
TIMEOUT_S = 30


def model(seed: int) -> dict[str, torch.Tensor]:
    """About 3 MB of float32 in three tensors, one of them tiny (its padding is sent too)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.rand(400_000, generator=generator),
        "a.bias": torch.rand(7, generator=generator),
        "b.weight": torch.rand(350_000, generator=generator),
    }


def client(port: int, result: dict) -> None:
    """fl_client's IO: receive a model and a message, send an update and a message."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL)
        conn = BlockingConnection(sock, idle_timeout_s=TIMEOUT_S)
        conn.send([encode_message("<HELLO>", protocol_version=PROTOCOL_VERSION, client_id=1, features=[])])
        message = conn.recv_message()
        received = WeightsBuffer(message["weights"])
        conn.recv_blob(received.buffer)
        result["model"] = {name: t.clone() for name, t in received.tensors.items()}
        result["after model"] = conn.recv_message()
        layout, pieces = weights_buffers(model(2))  # sent from the tensors' own memory
        conn.send(frame_weights(
            "<UPDATE>", pieces, round=1, client_id=1, num_examples=1, train_loss=0.0,
            local_test_accuracy=0.0, fit_seconds=0.0, weights=layout,
        ) + [encode_message("<ERROR>", message="after update")])
        result["sent bytes"] = conn.bytes_sent
        result["end"] = conn.recv_message()
        conn.close()
    except Exception as exc:  # reported by the test, in the main thread
        result["error"] = exc


async def serve() -> dict:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    result: dict = {}
    thread = threading.Thread(target=client, args=(listener.getsockname()[1], result), daemon=True)
    thread.start()
    loop = asyncio.get_running_loop()
    try:
        sock, _ = await asyncio.wait_for(loop.sock_accept(listener), TIMEOUT_S)
        traffic = Traffic()
        conn = await open_accepted(sock, traffic, None, TIMEOUT_S, TIMEOUT_S, socket_buffer_bytes=SMALL)
        assert (await asyncio.wait_for(conn.recv_message(), TIMEOUT_S))["header"] == "<HELLO>"
        layout, blob = encode_weights(model(1))
        frames = frame_weights("<MODEL>", blob, round=1, local_epochs=1, batch_size=1, lr=0.1, proximal_mu=0.0, weights=layout)
        await asyncio.wait_for(conn.send(frames + [encode_message("<WAITING>", message="after model")]), TIMEOUT_S)
        update = await asyncio.wait_for(conn.recv_message(), TIMEOUT_S)
        received = WeightsBuffer(update["weights"])
        await asyncio.wait_for(conn.recv_blob(received.buffer), TIMEOUT_S)
        result["update"] = received.tensors
        result["after update"] = await asyncio.wait_for(conn.recv_message(), TIMEOUT_S)
        await asyncio.wait_for(conn.send([encode_message("<FINISHED>", completed=True, rounds_completed=1, message="")]), TIMEOUT_S)
        await conn.close()
        result["traffic"] = traffic
    finally:
        listener.close()
        await loop.run_in_executor(None, thread.join, TIMEOUT_S)
    return result


def test_models_and_messages_cross_small_socket_buffers_whole_and_in_order():
    result = asyncio.run(asyncio.wait_for(serve(), 2 * TIMEOUT_S))
    assert "error" not in result, result.get("error")
    for name, tensor in model(1).items():
        assert torch.equal(result["model"][name], tensor), name
    for name, tensor in model(2).items():
        assert torch.equal(result["update"][name], tensor), name
    assert result["after model"]["message"] == "after model"
    assert result["after update"]["message"] == "after update"
    assert result["end"]["header"] == "<FINISHED>"
    # Every byte is counted once on each side, however many calls it took.
    assert result["traffic"].received == result["sent bytes"]


def test_a_message_read_ahead_counts_as_the_server_having_spoken():
    from fedsock.client import server_spoke

    layout, blob = encode_weights({"w": torch.ones(4)})
    model_frames = frame_weights("<MODEL>", blob, round=1, local_epochs=1, batch_size=1, lr=0.1, proximal_mu=0.0, weights=layout)
    server, client_end = socket.socketpair()
    with server, client_end:
        conn = BlockingConnection(client_end, idle_timeout_s=TIMEOUT_S)
        server.sendall(b"".join(map(bytes, model_frames)) + encode_message("<WAITING>", message="still here"))
        assert conn.recv_message()["header"] == "<MODEL>"
        received = WeightsBuffer(layout)
        conn.recv_blob(received.buffer)
        assert received.tensors["w"].tolist() == [1.0] * 4
        # The <WAITING> came in the same read as the model: the socket is empty, the reader is not.
        assert conn.reader.staged and server_spoke(conn)
        assert conn.recv_message()["message"] == "still here"
        assert not server_spoke(conn)



def test_a_connection_reads_only_so_much_at_once_before_the_event_loop_gets_a_turn(monkeypatch):
    from fedsock import transport

    monkeypatch.setattr(transport, "READ_AT_ONCE_BYTES", 100_000)
    size = 1_000_000
    payload = bytes(i % 251 for i in range(size))

    async def main() -> tuple[int, bytearray]:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)  # room for the whole frame
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with listener:
            peer = socket.create_connection(listener.getsockname()[:2], timeout=TIMEOUT_S)
            sock, _ = listener.accept()
        with peer:
            sock.setblocking(False)
            traffic = Traffic()
            peer.sendall(encode_message("<HELLO>", protocol_version=PROTOCOL_VERSION, client_id=1, features=[]))
            conn = await open_accepted(sock, traffic, None, TIMEOUT_S, TIMEOUT_S)
            await asyncio.wait_for(conn.recv_message(), TIMEOUT_S)
            before = traffic.received
            peer.sendall(frame_header(size) + payload)  # all of it waits in the server's socket now
            blob = bytearray(size)
            receiving = asyncio.ensure_future(conn.recv_blob(blob))
            await asyncio.sleep(0)  # the receiving task has run up to its first wait, and no further
            read_at_once = traffic.received - before
            await asyncio.wait_for(receiving, TIMEOUT_S)
        await conn.close()  # after the peer's close, so that it need not wait for one
        return read_at_once, blob

    read_at_once, blob = asyncio.run(asyncio.wait_for(main(), 2 * TIMEOUT_S))
    assert 0 < read_at_once <= 100_000  # the rest came in the event loop's own turns
    assert blob == payload


def test_a_send_still_waiting_when_the_connection_closes_ends_cleanly():
    """A network partition, as the server saw it: a <MODEL> waits for room in a peer's full socket,
    a heartbeat waits behind it, and the connection is closed (the client was dropped). When the
    link comes back and the socket drains, the waiting sends must end with ConnectionClosed, not
    write into a transport that has already sent its end of file (asyncio's RuntimeError: "Cannot
    call write() after write_eof()", an exception nobody retrieved)."""
    from socket_methods import ConnectionClosed

    problems: list[str] = []

    async def scenario() -> list:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _, context: problems.append(str(context.get("exception") or context)))
        with socket.create_server(("127.0.0.1", 0)) as listener:
            listener.setblocking(False)
            peer = socket.socket()
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL)  # a small window: the model cannot fit
            peer.connect(listener.getsockname())
            peer.sendall(b"\0")  # its first byte, as a client's <HELLO> would be
            sock, _ = await asyncio.wait_for(loop.sock_accept(listener), TIMEOUT_S)
            conn = await open_accepted(sock, Traffic(), None, TIMEOUT_S, TIMEOUT_S, socket_buffer_bytes=SMALL)
            layout, blob = encode_weights(model(3))
            sends = [asyncio.ensure_future(conn.send(frame_weights("<MODEL>", blob, round=1, weights=layout))),
                     asyncio.ensure_future(conn.send([encode_message("<WAITING>", message="heartbeat")]))]
            for _ in range(1000):  # event-loop turns until the model has filled the socket and waits for room
                if not conn._writable.is_set():
                    break
                await asyncio.sleep(0)
            assert not conn._writable.is_set() and not any(s.done() for s in sends), "the model fit into the socket"
            closing = asyncio.ensure_future(conn.close(timeout_s=TIMEOUT_S))
            await asyncio.sleep(0)
            await loop.run_in_executor(None, drain, peer)  # the link is back: the peer reads everything
            await asyncio.wait_for(closing, TIMEOUT_S)
            outcomes = await asyncio.gather(*sends, return_exceptions=True)
            peer.close()
            return outcomes

    def drain(peer: socket.socket) -> None:
        peer.settimeout(TIMEOUT_S)
        while peer.recv(1 << 20):
            pass
        peer.shutdown(socket.SHUT_WR)  # and closes its side too, as the server's close waits for

    outcomes = asyncio.run(scenario())
    assert not problems, problems
    assert all(o is None or isinstance(o, ConnectionClosed) for o in outcomes), outcomes
    assert any(isinstance(o, ConnectionClosed) for o in outcomes), outcomes
