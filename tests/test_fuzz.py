"""Property tests: random bytes never crash the decoders with anything but ProtocolError,
and the frame reader never allocates more than its limit."""

import json

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from socket_methods import (
    DTYPE_SIZES,
    FrameReader,
    ProtocolError,
    decode_message,
    decode_weights,
    encode_weights,
    frame_header,
)

LIMIT = 4096
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def drive(reader: FrameReader, data: bytes, chunk: int) -> None:
    position = 0
    while not reader.done:
        view = reader.buffer()
        n = min(chunk, len(view), len(data) - position)
        view[:n] = data[position : position + n]
        position += n
        reader.advance(n)  # n == 0 at the end of the data: EOF


@FUZZ
@given(data=st.binary(max_size=200), chunk=st.integers(1, 64))
def test_frame_reader_on_random_bytes(data, chunk):
    reader = FrameReader()
    reader.expect_message(LIMIT)
    try:
        drive(reader, data, chunk)
    except ProtocolError:
        pass
    assert reader.payload is None or len(reader.payload) <= LIMIT


@FUZZ
@given(length=st.integers(0, 2**64 - 1), rest=st.binary(max_size=64))
def test_any_length_prefix_is_checked_before_allocation(length, rest):
    reader = FrameReader()
    reader.expect_message(LIMIT)
    try:
        drive(reader, frame_header(length) + rest, 16)
    except ProtocolError:
        pass
    assert reader.payload is None or len(reader.payload) <= LIMIT


@FUZZ
@given(payload=st.binary(max_size=300))
def test_decode_message_on_random_bytes(payload):
    try:
        message = decode_message(payload)
    except ProtocolError:
        return
    assert isinstance(message, dict) and isinstance(message["header"], str)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@FUZZ
@given(header=st.sampled_from(["<HELLO>", "<AUTH>", "<UPDATE>", "<MODEL>", "<ERROR>", "x"]),
       fields=st.dictionaries(st.sampled_from(["protocol_version", "client_id", "mac", "round", "num_examples",
                                               "train_loss", "weights", "message", "lr"]), json_values, max_size=6))
def test_decode_message_on_random_json_objects(header, fields):
    try:
        decode_message(json.dumps({"header": header, **fields}).encode())
    except ProtocolError:
        pass


entries = st.fixed_dictionaries({
    "name": st.text(max_size=5) | st.integers(),
    "dtype": st.sampled_from([*DTYPE_SIZES, "complex64", 3]),
    "shape": st.lists(st.integers(-2, 40), max_size=3) | st.integers(),
    "offset": st.integers(-64, 512) | st.just(0) | st.floats(),
    "nbytes": st.integers(-1, 4096),
})


@FUZZ
@given(tensors=st.lists(entries, max_size=4), nbytes=st.integers(0, 512), byte_order=st.sampled_from(["little", "big"]))
def test_decode_weights_on_random_layouts(tensors, nbytes, byte_order):
    blob = bytearray(nbytes)
    layout = {"byte_order": byte_order, "nbytes": nbytes, "tensors": tensors}
    try:
        decoded = decode_weights(layout, blob)
    except ProtocolError:
        return
    for tensor in decoded.values():  # whatever was accepted lies inside the blob
        assert isinstance(tensor, torch.Tensor)


@FUZZ
@given(blob=st.binary(min_size=48, max_size=48))
def test_random_weight_bytes_decode_or_are_refused_as_non_finite(blob):
    from socket_methods import check_finite

    layout, _ = encode_weights({"w": torch.zeros(3, 4)})
    buffer = bytearray(layout["nbytes"])
    buffer[:48] = blob
    tensors = decode_weights(layout, buffer)
    try:
        check_finite(tensors)
    except ProtocolError:
        assert not torch.isfinite(tensors["w"]).all()
