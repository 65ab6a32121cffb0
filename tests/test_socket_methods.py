"""The sans-IO protocol: framing, control messages and the weights codec, without a network."""

import json
import pickle
import struct

import pytest
import torch

from socket_methods import (
    ALIGNMENT,
    DTYPE_SIZES,
    PROTOCOL_VERSION,
    BadMessage,
    BadWeights,
    ConnectionClosed,
    FrameReader,
    FrameTooLarge,
    TruncatedFrame,
    WeightsBuffer,
    check_finite,
    check_layout,
    decode_message,
    decode_weights,
    encode_message,
    encode_weights,
    frame_header,
    frame_weights,
    weights_buffers,
    WeightsSender,
)
from fedsock.policy import Policy
from fedsock.transport import after_sent, coalesced


def feed(reader: FrameReader, data: bytes, step: int) -> int:
    """Push `data` into the reader `step` bytes at a time; return how many bytes it took."""
    taken = 0
    while not reader.done and taken < len(data):
        view = reader.buffer()
        n = min(step, len(view), len(data) - taken)
        view[:n] = data[taken : taken + n]
        reader.advance(n)
        taken += n
    return taken


def test_frame_header_is_8_byte_big_endian_length():
    assert frame_header(1) == b"\x00" * 7 + b"\x01"
    assert frame_header(2**40) == struct.pack(">Q", 2**40)


@pytest.mark.parametrize("step", [1, 3, 8, 1000])
def test_message_round_trip_in_any_split(step):
    framed = encode_message("<SUCCESS>", round=3, accepted=True, message="ok ✓")
    reader = FrameReader()
    reader.expect_message(1024)
    assert feed(reader, framed, step) == len(framed)
    assert reader.done
    assert decode_message(reader.payload) == {"header": "<SUCCESS>", "round": 3, "accepted": True, "message": "ok ✓"}


def test_length_over_limit_is_refused_before_allocating():
    reader = FrameReader()
    reader.expect_message(100)
    with pytest.raises(FrameTooLarge, match="over the 100-byte limit"):
        feed(reader, frame_header(2**62), 8)
    assert reader.payload is None  # nothing was allocated for the announced 4 EiB


def test_clean_eof_and_cut_off_frame_are_different_errors():
    reader = FrameReader()
    reader.expect_message(100)
    with pytest.raises(ConnectionClosed):
        reader.advance(0)
    reader.expect_message(100)
    feed(reader, frame_header(10) + b"abc", 64)
    with pytest.raises(TruncatedFrame, match="after 3 of 10 frame payload bytes"):
        reader.advance(0)
    reader.expect_message(100)
    feed(reader, b"\x00\x00", 64)
    with pytest.raises(TruncatedFrame, match="after 2 of 8 frame header bytes"):
        reader.advance(0)


def test_blob_is_read_into_the_callers_buffer_and_its_size_checked():
    target = bytearray(16)
    reader = FrameReader()
    reader.expect_blob(target)
    feed(reader, frame_header(16) + bytes(range(16)), 5)
    assert reader.done and reader.payload.obj is target and target == bytes(range(16))
    reader.expect_blob(bytearray(16))
    with pytest.raises(BadWeights, match="has 17 bytes"):
        feed(reader, frame_header(17), 8)


def test_reader_reads_ahead_and_the_next_frames_wait_in_its_stage():
    target = bytearray(32)
    stream = (
        encode_message("<WAITING>", message="a") + encode_message("<WAITING>", message="b")
        + frame_header(32) + bytes(range(32)) + encode_message("<ERROR>", message="c")
    )
    reader = FrameReader()
    reader.expect_message(1024)
    view = reader.buffer()
    assert len(view) >= len(stream)  # one read may take all of it
    view[: len(stream)] = stream
    reader.advance(len(stream))
    assert reader.done and decode_message(reader.payload)["message"] == "a"
    assert reader.staged == len(stream) - len(encode_message("<WAITING>", message="a"))
    reader.expect_message(1024)  # each of the next frames is there already: no read
    assert reader.done and decode_message(reader.payload)["message"] == "b"
    reader.expect_blob(target)
    assert reader.done and target == bytes(range(32))
    reader.expect_message(1024)
    assert reader.done and decode_message(reader.payload)["header"] == "<ERROR>"
    assert reader.staged == 0
    reader.expect_message(1024)
    assert not reader.done
    with pytest.raises(ConnectionClosed):
        reader.advance(0)


def test_a_large_blob_is_read_into_its_own_buffer_after_the_staged_start():
    size = 4 * FrameReader.STAGE_BYTES
    data = bytes(i * 7 % 251 for i in range(size))
    target = bytearray(size)
    reader = FrameReader()
    reader.expect_blob(target)
    stage = reader.buffer()
    taken = len(stage)
    stage[:] = (frame_header(size) + data)[:taken]
    reader.advance(taken)
    rest = reader.buffer()  # no chunk to be joined later: the rest goes into the target itself
    assert rest.obj is target and len(rest) == size - (taken - 8)
    rest[:] = data[taken - 8 :]
    reader.advance(len(rest))
    assert reader.done and target == data


def test_a_bad_frame_read_ahead_is_refused_when_it_is_asked_for():
    reader = FrameReader()
    reader.expect_message(100)
    assert feed(reader, encode_message("<WAITING>", message="a") + frame_header(17), 1000) > 8
    with pytest.raises(BadWeights, match="has 17 bytes"):
        reader.expect_blob(bytearray(16))
    reader = FrameReader()
    reader.expect_message(100)
    feed(reader, encode_message("<WAITING>", message="a") + frame_header(2**40), 1000)
    with pytest.raises(FrameTooLarge):
        reader.expect_message(100)


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"\xff\xfe", "not valid UTF-8"),
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON list, not an object"),
        (b'"text"', "JSON str"),
        (b'{"round": 1}', "no 'header'"),
        (b'{"header": "<NOPE>"}', "unknown header"),
        (b'{"header": "<HELLO>", "client_id": 1}', "lacks the field 'protocol_version'"),
        (b'{"header": "<HELLO>", "protocol_version": "1", "client_id": 1}', "must be an integer"),
        (b'{"header": "<HELLO>", "protocol_version": true, "client_id": 1}', "must be an integer"),
        (b'{"header": "<ERROR>", "message": NaN}', "not valid JSON"),
        (b'{"header": "<UPDATE>", "round": 1, "client_id": 1, "num_examples": 5, "train_loss": 1e999,'
         b' "local_test_accuracy": 0.5, "fit_seconds": 1, "weights": {}}', "not valid JSON"),
        (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
    ],
)
def test_bad_control_messages_raise_bad_message(payload, reason):
    with pytest.raises(BadMessage, match=reason):
        decode_message(payload)


def test_a_hellos_policy_is_checked_key_by_key_and_a_newer_clients_keys_pass():
    stated = Policy(True, True, 5, 4, True, 1.0, 8.0, 1e-5).to_json()
    hello = {"header": "<HELLO>", "protocol_version": PROTOCOL_VERSION, "client_id": 1, "features": []}
    newer = {**stated, "max_rounds": 3}
    assert decode_message(json.dumps({**hello, "policy": newer}).encode())["policy"] == newer  # the server drops it
    for policy, reason in [({**stated, "identity": 1}, "key 'identity' must be true or false"),
                           ({**stated, "max_epsilon": "8"}, "key 'max_epsilon' must be a number"),
                           ({**stated, "delta": 2}, r"key 'delta' is 2, outside > 0 and <= 1"),
                           ({}, "lacks the key 'identity'")]:
        with pytest.raises(BadMessage, match=rf"<HELLO> field 'policy' {reason}"):
            decode_message(json.dumps({**hello, "policy": policy}).encode())


def test_a_malicious_pickle_is_just_bad_json(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    payload = pickle.dumps(Exploit())
    with pytest.raises(BadMessage):
        decode_message(payload)
    with pytest.raises(BadWeights):
        decode_weights(payload, bytearray(payload))
    assert not marker.exists()


ALL_DTYPES = [getattr(torch, name) for name in DTYPE_SIZES]


def sample_tensors():
    torch.manual_seed(0)
    tensors = {}
    for i, dtype in enumerate(ALL_DTYPES):
        shape = (3, i + 1)
        if dtype == torch.bool:
            tensors[f"t{i}.{dtype}"] = torch.rand(shape) > 0.5
        elif dtype.is_floating_point:
            tensors[f"t{i}.{dtype}"] = torch.randn(shape).to(dtype)
        else:
            tensors[f"t{i}.{dtype}"] = torch.randint(0 if dtype in (torch.uint8, torch.uint32) else -100, 100, shape, dtype=dtype)
    tensors["scalar"] = torch.tensor(2.5)
    tensors["empty"] = torch.zeros(0, 4)
    return tensors


def test_weights_round_trip_every_dtype_as_views():
    tensors = sample_tensors()
    layout, blob = encode_weights(tensors)
    assert json.loads(json.dumps(layout)) == layout  # the description is plain JSON
    assert all(entry["offset"] % ALIGNMENT == 0 for entry in layout["tensors"])
    decoded = decode_weights(layout, blob)
    assert list(decoded) == list(tensors)
    for name, tensor in tensors.items():
        assert decoded[name].dtype == tensor.dtype and torch.equal(decoded[name], tensor), name
    # Views, not copies: changing the buffer changes the decoded tensor.
    first = layout["tensors"][0]
    blob[first["offset"] : first["offset"] + 4] = struct.pack("<f", 123.0)
    assert decoded[first["name"]].flatten()[0].item() == 123.0


def test_encode_reuses_a_given_buffer():
    tensors = {"w": torch.ones(4)}
    layout, blob = encode_weights(tensors)
    _, again = encode_weights({"w": torch.full((4,), 2.0)}, out=blob)
    assert again is blob and decode_weights(layout, blob)["w"].tolist() == [2.0] * 4


def test_weights_buffers_send_cpu_tensors_in_place_with_the_same_bytes():
    tensors = sample_tensors()
    layout, blob = encode_weights(tensors)
    same_layout, pieces = weights_buffers(tensors)
    assert same_layout == layout
    assert b"".join(pieces) == bytes(blob)  # padding included: byte for byte what encode_weights makes
    # In place: the first tensor's bytes are its own memory, not a copy.
    first = next(iter(tensors.values()))
    first.view(-1)[0] = 7
    assert bytes(pieces[0][: first.element_size()]) == first.view(-1)[:1].numpy().tobytes()
    frames = frame_weights("<UPDATE>", pieces, round=1)
    assert frames[1] == frame_header(len(blob)) and frames[2] is pieces[0]


def test_weights_buffers_copy_once_what_is_not_in_place():
    strided = {"w": torch.arange(12.0).view(3, 4).t()}  # a transposed view is not contiguous
    layout, pieces = weights_buffers(strided, out=bytearray(64))
    assert len(pieces) == 1 and bytes(pieces[0]) == bytes(encode_weights(strided)[1])


def test_a_sender_works_a_model_out_once_and_follows_its_tensors():
    sender = WeightsSender()
    tensors = {"w": torch.zeros(3, 4), "b": torch.zeros(4)}
    layout, pieces = sender.buffers(tensors)
    tensors["w"].add_(1)  # training updates the tensors in place: the same pieces show it
    same_memory = {name: t.detach() for name, t in tensors.items()}  # new objects, as state_dict() gives
    again_layout, again = sender.buffers(same_memory)
    assert again is pieces and again_layout is layout
    assert b"".join(again) == bytes(encode_weights(tensors)[1])
    tensors["w"] = torch.full((3, 4), 2.0)  # a tensor that moved
    moved_layout, moved = sender.buffers(tensors)
    assert moved is not pieces and b"".join(moved) == bytes(encode_weights(tensors)[1])
    renamed = {"v": tensors["w"], "b": tensors["b"]}
    assert sender.buffers(renamed)[0]["tensors"][0]["name"] == "v"
    reshaped = {"w": tensors["w"].view(4, 3), "b": tensors["b"]}
    assert sender.buffers(reshaped)[0]["tensors"][0]["shape"] == [4, 3]
    transposed = {"w": tensors["w"].view(4, 3).t(), "b": tensors["b"]}  # same memory, other order
    assert b"".join(sender.buffers(transposed)[1]) == bytes(encode_weights(transposed)[1])


def test_two_senders_in_one_process_never_share_a_memo():
    """Virtual clients or threads each have a sender: one's cached frames are never another's."""
    first, second = WeightsSender(), WeightsSender()
    a, b = {"w": torch.zeros(5)}, {"w": torch.ones(5)}
    layout_a, pieces_a = first.buffers(a)
    layout_b, pieces_b = second.buffers(b)
    assert first.buffers(a)[1] is pieces_a and second.buffers(b)[1] is pieces_b
    assert b"".join(pieces_a) != b"".join(pieces_b)
    frames_a = first.frames("<UPDATE>", a, round=1)
    assert bytes(frames_a[2]) == bytes(pieces_a[0])


def test_a_known_layout_is_spliced_in_as_the_same_bytes():
    tensors = {"w": torch.ones(5), "b": torch.zeros(2)}
    fields = dict(round=3, client_id=2, num_examples=10, train_loss=0.5, local_test_accuracy=0.25, fit_seconds=1.5)
    sender = WeightsSender()
    layout, _ = sender.buffers(tensors)
    spliced = sender.frames("<UPDATE>", tensors, **fields)[0]  # the layout's JSON is known by now: spliced
    assert spliced == encode_message("<UPDATE>", **fields, weights=layout)
    assert decode_message(spliced[8:])["weights"] == layout
    with pytest.raises(ValueError):
        sender.frames("<UPDATE>", tensors, **{**fields, "train_loss": float("nan")})


def test_a_weights_buffer_shows_what_is_received_into_it_as_tensors():
    tensors = sample_tensors()
    layout, blob = encode_weights(tensors)
    received = WeightsBuffer(layout)
    views = received.tensors
    received.buffer[:] = blob
    assert received.tensors is views  # made once, when the buffer was
    for name, tensor in tensors.items():
        assert torch.equal(views[name], tensor)
    with pytest.raises(BadWeights):
        WeightsBuffer({**layout, "byte_order": "big"})


def test_after_sent_drops_what_went_out_and_keeps_the_rest_in_place():
    large = bytearray(b"0123456789")
    views = [memoryview(b"ab"), memoryview(large), memoryview(b"xyz")]
    assert [bytes(v) for v in after_sent(views, 0)] == [b"ab", b"0123456789", b"xyz"]
    rest = after_sent(views, 5)
    assert [bytes(v) for v in rest] == [b"3456789", b"xyz"] and rest[0].obj is large
    assert [bytes(v) for v in after_sent(views, 12)] == [b"xyz"]
    assert after_sent(views, 15) == []


def test_coalesced_joins_small_buffers_and_keeps_large_ones():
    large = bytearray(b"x" * (64 << 10))
    pieces = [b"ab", b"c", memoryview(large), b"d", b"", b"ef"]
    out = list(coalesced(pieces))
    assert [bytes(p) for p in out] == [b"abc", bytes(large), b"def"]
    assert out[1].obj is large  # sent as is, not copied


def test_weights_frames_share_the_blob_without_copying():
    layout, blob = encode_weights({"w": torch.ones(10)})
    frames = frame_weights("<MODEL>", blob, round=1, local_epochs=1, batch_size=2, lr=0.1, weights=layout)
    assert frames[2].obj is blob
    assert frames[1] == frame_header(len(blob))


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda l: l["tensors"][0].update(shape=[4, 4]), "shape"),
        (lambda l: l["tensors"][0].update(dtype="float64"), "dtype"),
        (lambda l: l["tensors"][0].update(name="other"), "names differ"),
        (lambda l: l["tensors"].pop(), "names differ"),
        (lambda l: l.update(tensors="nope"), "not an object"),
        (lambda l: l.update(nbytes=1), r"^weights layout: nbytes 1, the model has 128$"),
        (lambda l: l.update(byte_order="big"), r"^weights layout: byte_order 'big', the model has 'little'$"),
        (lambda l: l["tensors"].reverse(), r"differs from the model's \(order or byte count\)"),
        (lambda l: l["tensors"][1].update(scale=1.0), r"^tensor 'b' has keys the protocol does not define: \['scale'\]$"),
        (lambda l: l.update(extra=1), r"^weights layout has keys the protocol does not define: \['extra'\]$"),
    ],
)
def test_check_layout_names_the_difference(mutate, reason):
    layout, _ = encode_weights({"a": torch.zeros(2, 3), "b": torch.zeros(5)})
    received = json.loads(json.dumps(layout))
    mutate(received)
    with pytest.raises(BadWeights, match=reason):
        check_layout(received, layout)


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda l: l["tensors"][0].update(offset=1), "offset"),
        (lambda l: l["tensors"][0].update(nbytes=7), "byte count"),
        (lambda l: l["tensors"][0].update(shape=[10**6]), "byte count|ends past"),
        (lambda l: l["tensors"][0].update(dtype="complex128"), "dtype"),
        (lambda l: l["tensors"][0].update(shape=[-1]), "non-negative"),
        (lambda l: l["tensors"].append(dict(l["tensors"][0])), "twice"),
        (lambda l: l.update(byte_order="big"), "little"),
    ],
)
def test_decode_weights_checks_every_entry(mutate, reason):
    layout, blob = encode_weights({"a": torch.zeros(2, 3), "b": torch.zeros(5)})
    mutate(layout)
    with pytest.raises(BadWeights, match=reason):
        decode_weights(layout, blob)


def test_non_finite_weights_are_refused():
    with pytest.raises(BadWeights, match="NaN or Inf"):
        check_finite({"w": torch.tensor([1.0, float("nan")])})
    with pytest.raises(BadWeights):
        check_finite({"w": torch.tensor([float("inf")], dtype=torch.bfloat16)})
    check_finite({"w": torch.ones(3), "i": torch.tensor([1, 2])})


@pytest.mark.parametrize("step", [1, 7, 1000, 5000])
def test_a_blob_can_be_read_through_a_small_window(step):
    """What the server spools to a file: the bytes reach the sink in order, a window at a time,
    the reader's limits still hold, and a cut-off frame says how far it got."""
    blob = bytes(range(256)) * 40  # 10240 bytes
    data = frame_header(len(blob)) + blob + encode_message("<WAITING>", message="next")
    parts: list[bytes] = []
    reader = FrameReader()
    reader.expect_blob_in_windows(bytearray(1000), len(blob), lambda part: parts.append(bytes(part)))
    taken = feed(reader, data, step)
    assert reader.done and b"".join(parts) == blob and all(len(p) == 1000 for p in parts[:-1])
    reader.expect_message(1 << 20)  # what came after the blob is still there
    feed(reader, data[taken:], step)
    assert decode_message(reader.payload)["message"] == "next"
    wrong = FrameReader()
    wrong.expect_blob_in_windows(bytearray(1000), len(blob) + 64, lambda part: None)
    with pytest.raises(BadWeights, match=r"weights frame has 10240 bytes, its layout says 10304"):
        feed(wrong, data, step)
    cut = FrameReader()
    cut.expect_blob_in_windows(bytearray(1000), len(blob), lambda part: None)
    feed(cut, data[: 8 + 2500], step)
    with pytest.raises(TruncatedFrame, match=r"connection closed after 2500 of 10240 frame payload bytes"):
        cut.advance(0)
