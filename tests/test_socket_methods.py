"""The sans-IO protocol: framing, control messages and the weights codec, without a network."""

import json
import pickle
import struct

import pytest
import torch

from socket_methods import (
    ALIGNMENT,
    DTYPE_SIZES,
    BadMessage,
    BadWeights,
    ConnectionClosed,
    FrameReader,
    FrameTooLarge,
    TruncatedFrame,
    check_finite,
    check_layout,
    decode_message,
    decode_weights,
    encode_message,
    encode_weights,
    frame_header,
    frame_weights,
    weights_buffers,
)
from transport import coalesced


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
            tensors[f"t{i}.{dtype}"] = torch.randint(-100 if dtype != torch.uint8 else 0, 100, shape, dtype=dtype)
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
        (lambda l: l.update(nbytes=1), "differs"),
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
