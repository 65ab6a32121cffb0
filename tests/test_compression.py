"""Compressed updates and broadcasts (fedsock/compression.py).

In-process, in milliseconds: each encoding's error, int8's unbiasedness, top-k's error feedback
(nothing is lost, only delayed), the layouts a third-party client must produce, and every check
on bad compressed data. As real processes: federations with each encoding, equal bit for bit to a
simulation with the same flags (the wire encodes exactly what the in-process codec does), and a
raw peer whose bad compressed updates each earn an <ERROR>.
"""

from __future__ import annotations

import copy
import math
import re
import socket
import struct
import time

import pytest
import torch

from conftest import FAST, read_metrics
from fedsock import compression as c
from socket_methods import (
    PROTOCOL_VERSION,
    BadMessage,
    BadWeights,
    decode_message,
    encode_message,
    frame_header,
    weights_layout,
)


def model_like(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"conv.weight": torch.randn(8, 1, 5, 5, generator=g), "conv.bias": torch.randn(8, generator=g),
            "fc.weight": torch.randn(100, 200, generator=g), "steps": torch.tensor(7)}


def trained_from(base: dict[str, torch.Tensor], seed: int, scale: float = 0.01) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: t + scale * torch.randn(t.shape, generator=g) if t.is_floating_point() else t for n, t in base.items()}


def round_trip(kind: str, base, trained, fraction=0.05, residual=None, seed=0):
    compression = c.Compression(kind, fraction)
    sent, params = c.compress_update(base, trained, compression, residual, torch.Generator().manual_seed(seed))
    layout = weights_layout(base)
    assert weights_layout(sent) == c.update_layout(layout, kind, fraction)  # what the server expects, exactly
    decoded = c.decoded_update(compression, sent, params or None, base, c.scratch_for(base), layout)
    return sent, params, {n: decoded[n].clone() for n in decoded}


# --------------------------------------------------------------------------- the encodings


def test_fp16_halves_the_bytes_and_keeps_the_delta_to_float16_precision():
    base = model_like()
    trained = trained_from(base, 1)
    _, _, got = round_trip("fp16", base, trained)
    for name, t in trained.items():
        if t.is_floating_point():
            delta = t - base[name]
            assert (got[name] - t).abs().max() <= delta.abs().max() * 2**-11 + 1e-7
    layout = weights_layout(base)
    assert c.update_layout(layout, "fp16")["nbytes"] < 0.52 * layout["nbytes"]


def test_int8_is_a_quarter_of_the_bytes_within_one_step_and_unbiased():
    base = model_like()
    trained = trained_from(base, 2)
    sent, params, got = round_trip("int8", base, trained)
    for name, (scale, lo) in params.items():
        delta = trained[name] - base[name]
        assert lo == pytest.approx(float(delta.min())) and scale == pytest.approx(float(delta.max() - delta.min()) / 255)
        assert sent[name].dtype == torch.uint8
        assert float((got[name] - trained[name]).abs().max()) <= scale * 1.0001
    # unbiased: the mean of many stochastic roundings approaches the delta far closer than one step
    delta = trained["fc.weight"] - base["fc.weight"]
    mean = sum(round_trip("int8", base, trained, seed=s)[2]["fc.weight"] - base["fc.weight"] for s in range(400)) / 400
    assert float((mean - delta).abs().mean()) < 0.1 * params["fc.weight"][0]
    layout = weights_layout(base)
    assert c.update_layout(layout, "int8")["nbytes"] <= 0.27 * layout["nbytes"]


def test_int8_of_a_constant_tensor_is_exact():
    base = {n: torch.zeros_like(t) if t.is_floating_point() else t for n, t in model_like().items()}
    trained = {n: (t + 0.5 if t.is_floating_point() else t) for n, t in base.items()}
    _, params, got = round_trip("int8", base, trained)
    assert all(scale == 0 for scale, _ in params.values())
    assert all(torch.allclose(got[n], trained[n], atol=1e-6) for n in params)


def test_topk_sends_the_largest_entries_and_error_feedback_loses_nothing():
    base = model_like()
    residual: dict = {}
    current = base
    sent_sum = {n: torch.zeros_like(t) for n, t in base.items() if t.is_floating_point()}
    true_sum = {n: torch.zeros_like(t) for n in sent_sum for t in [base[n]]}
    for step in range(6):
        trained = trained_from(current, 10 + step)
        sent, _, got = round_trip("topk", current, trained, fraction=0.1, residual=residual)
        for name in sent_sum:
            k = c.topk_count(base[name].numel(), 0.1)
            assert sent[f"{name}/indices"].shape == (k,) and sent[f"{name}/values"].shape == (k,)
            assert bool((sent[f"{name}/indices"][1:] > sent[f"{name}/indices"][:-1]).all())
            sent_sum[name] += got[name] - current[name]
            true_sum[name] += trained[name] - current[name]
        current = trained
    for name in sent_sum:  # what was sent plus what the client still holds is every delta, exactly
        held = residual[name].view(base[name].shape)
        assert torch.allclose(sent_sum[name] + held, true_sum[name], atol=1e-5)
    # the first round's pick is the largest magnitudes of that round's delta
    trained = trained_from(base, 99)
    sent, _, _ = round_trip("topk", base, trained, fraction=0.1)
    delta = (trained["fc.weight"] - base["fc.weight"]).reshape(-1).abs()
    picked = set(sent["fc.weight/indices"].tolist())
    assert picked == set(torch.topk(delta, len(picked)).indices.tolist())
    layout = weights_layout(base)
    assert c.update_layout(layout, "topk", 0.01)["nbytes"] < layout["nbytes"] / 20


def test_non_float_tensors_go_as_they_are():
    base = model_like()
    for kind in ("fp16", "int8", "topk"):
        sent, _, got = round_trip(kind, base, trained_from(base, 3))
        assert torch.equal(sent["steps"], base["steps"]) and torch.equal(got["steps"], base["steps"])


def test_a_compressed_broadcast_is_exactly_what_each_client_decodes():
    weights = model_like(5)
    for kind in ("fp16", "int8"):
        sent, params, seen = c.encode_weights_for_broadcast(weights, kind)
        checked = c.check_params(kind, params or None, weights_layout(weights))
        decoded = c.decode_broadcast(kind, sent, checked, weights)
        assert all(torch.equal(decoded[n], seen[n]) for n in weights)
        step = max(s for s, _ in checked.values()) if checked else 2**-10
        assert all(float((seen[n].float() - weights[n].float()).abs().max()) <= step * 4 for n in weights)


def test_decoding_reuses_one_scratch_so_memory_stays_flat():
    base = model_like()
    scratch = c.scratch_for(base)
    compression = c.Compression("int8")
    pointers = set()
    for seed in range(3):
        sent, params = c.compress_update(base, trained_from(base, seed), compression, None, None)
        decoded = c.decoded_update(compression, sent, params, base, scratch, weights_layout(base))
        pointers.add(decoded["fc.weight"].data_ptr())
    assert pointers == {scratch["fc.weight"].data_ptr()}


# --------------------------------------------------------------------------- bad compressed data


def int8_params(base) -> dict:
    sent, params = c.compress_update(base, trained_from(base, 1), c.Compression("int8"), None, None)
    return params


@pytest.mark.parametrize("change, error", [
    (lambda p: p.pop("fc.weight"), r"must give \[scale, lo\] for every float tensor"),
    (lambda p: p.update(extra=[1.0, 0.0]), r"must give \[scale, lo\] for every float tensor"),
    (lambda p: p.update({"fc.weight": [-1.0, 0.0]}), r"must be finite, the scale >= 0"),
    (lambda p: p.update({"fc.weight": [math.inf, 0.0]}), r"must be finite"),
    (lambda p: p.update({"fc.weight": [1e308, 1e308]}), r"must be finite"),
    (lambda p: p.update({"fc.weight": [0.1]}), r"int8 params must be \[scale, lo\]"),
    (lambda p: p.update({"fc.weight": ["0.1", 0]}), r"int8 params must be \[scale, lo\]"),
    (lambda p: p.update({"fc.weight": [True, 0]}), r"int8 params must be \[scale, lo\]"),
])
def test_bad_int8_params_are_refused(change, error):
    base = model_like()
    params = int8_params(base)
    change(params)
    with pytest.raises(BadWeights, match=error):
        c.check_params("int8", params, weights_layout(base))


def test_params_for_an_encoding_without_them_are_refused():
    with pytest.raises(BadWeights, match="compression_params are for int8 updates"):
        c.check_params("topk", {"fc.weight": [1.0, 0.0]}, weights_layout(model_like()))


@pytest.mark.parametrize("indices, error", [
    ([0, 5, 2000], r"a topk index is outside 0\.\.1999"),
    ([-1, 5, 6], r"a topk index is outside"),
    ([3, 2, 9], r"strictly increasing"),
    ([4, 4, 9], r"strictly increasing"),
])
def test_bad_topk_indices_are_refused(indices, error):
    base = {"fc.weight": torch.zeros(10, 200)}
    received = {"fc.weight/indices": torch.tensor(indices, dtype=torch.int32),
                "fc.weight/values": torch.ones(len(indices))}
    with pytest.raises(BadWeights, match=error):
        c.decoded_update(c.Compression("topk"), received, None, base, c.scratch_for(base), weights_layout(base))


@pytest.mark.parametrize("value, error", [
    ({"kind": "zstd", "topk_fraction": 0.01, "broadcast": "none"}, r"compression 'zstd'.*knows none, fp16, int8, topk"),
    ({"kind": "int8", "topk_fraction": 0.01, "broadcast": "topk"}, r"broadcast 'topk'"),
    ({"kind": "topk", "topk_fraction": 0, "broadcast": "none"}, r"topk_fraction 0 must be in \(0, 1\]"),
    ({"kind": "topk", "topk_fraction": True, "broadcast": "none"}, r"topk_fraction True"),
    ({"kind": "topk"}, r"must be \{kind, topk_fraction, broadcast\}"),
    ("int8", r"must be \{kind, topk_fraction, broadcast\}"),
])
def test_a_clients_check_of_what_the_server_announces(value, error):
    with pytest.raises(BadMessage, match=error):
        c.Compression.from_json(value)


# --------------------------------------------------------------------------- real federations

FLAGS = ["--num-clients", "2", "--num-rounds", "2", "--seed", "4", "--partition", "dirichlet", "--alpha", "1"]


def federation(cluster, output_dir, *flags: str) -> list[dict]:
    """A real federation (server and 2 client processes); its metrics.csv rows."""
    server = cluster.server(*FAST, *FLAGS, *flags, output_dir=output_dir)
    clients = [cluster.client(k) for k in (1, 2)]
    assert [p.finish() for p in clients] == [0, 0], [p.output for p in clients]
    assert server.finish() == 0, server.output
    return read_metrics(output_dir / "metrics.csv")


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """The uncompressed federation every compressed one is measured against: run once."""
    from conftest import Cluster

    cluster = Cluster(tmp_path_factory.mktemp("plain"))
    try:
        return federation(cluster, cluster.tmp_path / "plain")
    finally:
        cluster.close()


@pytest.mark.processes
@pytest.mark.parametrize("modes", [["--compression", "int8", "--compress-broadcast", "int8"],
                                   ["--compression", "topk", "--topk-fraction", "0.05"],
                                   ["--compression", "fp16", "--compress-broadcast", "fp16"]],
                         ids=["int8", "topk", "fp16"])
def test_a_compressed_federation_equals_its_simulation_and_sends_fewer_bytes(cluster, tmp_path, modes, plain_run):
    import fl_simulate

    runs = {"plain": plain_run, "compressed": federation(cluster, tmp_path / "compressed", *modes)}
    # the simulation of the same run, in this process (fl_simulate.py's main): the same numbers, bit for bit
    assert fl_simulate.main(["--model", "logreg", *FLAGS, *modes, "--output-dir", str(tmp_path / "sim"), "--quiet"]) == 0
    simulated = read_metrics(tmp_path / "sim" / "metrics.csv")
    keys = ("round", "clients", "test_accuracy", "test_loss", "train_loss")
    assert [{k: r[k] for k in keys} for r in runs["compressed"]] == [{k: r[k] for k in keys} for r in simulated]
    real, sim_model = torch.load(tmp_path / "compressed" / "model.pt"), torch.load(tmp_path / "sim" / "model.pt")
    assert all(torch.equal(real[n], sim_model[n]) for n in real)
    plain_up = sum(r["bytes_received"] for r in runs["plain"])
    up = sum(r["bytes_received"] for r in runs["compressed"])
    kind = modes[1]
    assert up < {"fp16": 0.55, "int8": 0.3, "topk": 0.15}[kind] * plain_up, (up, plain_up)
    if "--compress-broadcast" in modes:
        assert sum(r["bytes_sent"] for r in runs["compressed"]) < 0.6 * sum(r["bytes_sent"] for r in runs["plain"])
    assert runs["compressed"][-1]["test_accuracy"] > 0.8


@pytest.mark.processes
def test_a_client_without_compression_is_refused_with_a_reason(cluster, tmp_path):
    cluster.server(*FAST, "--num-clients", "1", "--compression", "int8", output_dir=tmp_path / "run")
    peer = RawPeer(cluster.port, client_id=1, features=[])
    messages = peer.read_until({"<ERROR>"})
    assert messages and messages[-1]["header"] == "<ERROR>", messages
    assert "this run needs the client features compression" in messages[-1]["message"]
    peer.close()


# --------------------------------------------------------------------------- a raw peer's bad compressed data

IO_TIMEOUT_S = 60.0  # a bound, not a wait: reached only on a loaded machine (the suite runs on 3 workers)


class RawPeer:
    """A hand-driven client on a raw socket that speaks compression."""

    def __init__(self, port: int, client_id: int = 2, features=("compression",), **hello):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT_S)
        self.client_id = client_id
        self.send(encode_message("<HELLO>", protocol_version=PROTOCOL_VERSION, client_id=client_id,
                                 features=list(features), **hello))

    def send(self, *chunks: bytes) -> None:
        self.sock.sendall(b"".join(chunks))

    def _exact(self, nbytes: int, deadline: float) -> bytes | None:
        data = bytearray()
        while len(data) < nbytes:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            assert time.monotonic() < deadline, "the server sent nothing more in time"
            try:
                chunk = self.sock.recv(nbytes - len(data))
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            data += chunk
        return bytes(data)

    def read_until(self, headers: set[str], timeout_s: float = IO_TIMEOUT_S) -> list[dict]:
        """Messages (a weights frame behind one is read into .blob) until one of `headers`, or the end."""
        deadline, seen = time.monotonic() + timeout_s, []
        while True:
            prefix = self._exact(8, deadline)
            if prefix is None:
                return seen
            message = decode_message(self._exact(struct.unpack(">Q", prefix)[0], deadline))
            seen.append(message)
            if message["header"] in ("<MODEL>", "<EVALUATE>"):
                self.blob = self._exact(struct.unpack(">Q", self._exact(8, deadline))[0], deadline)
            if message["header"] in headers:
                return seen

    def close(self) -> None:
        self.sock.close()


def topk_update(model: dict, layout: dict, **params) -> tuple[dict, bytes]:
    """A valid top-k update of zeros: fields and blob, for the cases to break."""
    k_layout = copy.deepcopy(layout)
    blob = bytearray(k_layout["nbytes"])
    for entry in k_layout["tensors"]:
        if entry["name"].endswith("/indices"):
            struct.pack_into(f"<{entry['shape'][0]}i", blob, entry["offset"], *range(entry["shape"][0]))
    fields = dict(round=model["round"], client_id=2, num_examples=100, train_loss=0.3, local_test_accuracy=0.9,
                  fit_seconds=0.1, weights=k_layout, **params)
    return fields, bytes(blob)


def entry_of(layout: dict, name: str) -> dict:
    return next(e for e in layout["tensors"] if e["name"] == name)


def break_indices(values):
    def change(fields, blob):
        entry = entry_of(fields["weights"], "linear.weight/indices")
        data = bytearray(blob)
        struct.pack_into(f"<{len(values)}i", data, entry["offset"], *values)
        return fields, bytes(data)
    return change


def wrong_count(fields, blob):
    entry = entry_of(fields["weights"], "linear.bias/values")
    entry["shape"], entry["nbytes"] = [entry["shape"][0] + 1], entry["nbytes"] + 4
    return fields, blob


def nan_value(fields, blob):
    entry = entry_of(fields["weights"], "linear.weight/values")
    data = bytearray(blob)
    struct.pack_into("<f", data, entry["offset"], math.nan)
    return fields, bytes(data)


BAD_TOPK = {
    "index past the tensor": (break_indices([0, 1, 7840]), r"tensor 'linear.weight': a topk index is outside 0\.\.7839"),
    "negative index": (break_indices([-3]), r"a topk index is outside"),
    "indices not increasing": (break_indices([5, 4]), r"topk indices must be strictly increasing"),
    "an index twice": (break_indices([2, 2]), r"topk indices must be strictly increasing"),
    "a wrong count": (wrong_count, r"tensor 'linear.bias/values': shape \[2\], the model has \[1\]"),
    "NaN among the values": (nan_value, r"tensor 'linear.weight/values' holds NaN or Inf"),
    "int8 params on a topk run": (lambda f, b: ({**f, "compression_params": {"linear.weight": [1.0, 0.0]}}, b),
                                  r"compression_params are for int8 updates"),
}


@pytest.fixture(scope="module")
def topk_server(tmp_path_factory):
    """A topk run that client 1 (honest) and the raw peer (id 2) share; rounds need one update."""
    from conftest import Cluster

    cluster = Cluster(tmp_path_factory.mktemp("topk"))
    try:
        server = cluster.server(*FAST, "--num-clients", "2", "--min-clients", "1", "--num-rounds", "40",
                                "--compression", "topk", "--topk-fraction", "0.001", "--time-to-wait", "600",
                                "--heartbeat-interval", "1", "--round-timeout", "10")
        cluster.client(1, quiet=False)
        yield cluster, server
    finally:
        cluster.close()


def join(cluster) -> tuple[RawPeer, dict]:
    """The raw peer joined as client 2, and its <METADATA>. The last case's connection may not be
    forgotten yet ("already connected"): then it tries again, a bounded number of times."""
    for _ in range(40):
        peer = RawPeer(cluster.port)
        peer.send(encode_message("<READY>", num_examples=100, test_examples=0))
        first = peer.read_until({"<METADATA>", "<ERROR>"})[-1]
        if first["header"] == "<METADATA>":
            return peer, first
        peer.close()
        assert "already connected" in first["message"], first
    raise AssertionError("client 2 stayed 'already connected' for 40 tries")


@pytest.mark.parametrize("case", list(BAD_TOPK))
def test_bad_compressed_updates_over_the_wire_earn_an_error(topk_server, case):
    cluster, server = topk_server
    change, error = BAD_TOPK[case]
    peer, first = join(cluster)
    assert first["compression"] == {"kind": "topk", "topk_fraction": 0.001, "broadcast": "none"}
    assert "compression" in first["required_features"]
    model = peer.read_until({"<MODEL>"})[-1]
    layout = c.update_layout(model["weights"], "topk", 0.001)
    fields, blob = change(*topk_update(model, layout))
    peer.send(encode_message("<UPDATE>", **fields))
    if fields["weights"] == layout:  # the layout is right: its weights follow
        peer.send(frame_header(len(blob)), blob)
    messages = peer.read_until({"<ERROR>"})
    errors = [m["message"] for m in messages if m["header"] == "<ERROR>"]
    assert errors and re.search(error, errors[0]), messages
    peer.close()
    server.wait_for(r"client 2 \(.*\): .*" + error + ".*; disconnected", timeout=IO_TIMEOUT_S)


def test_a_valid_topk_update_from_the_raw_peer_is_accepted(topk_server):
    """The cases above fail for their one defect: the same update without it is taken."""
    cluster, server = topk_server
    peer, _ = join(cluster)
    model = peer.read_until({"<MODEL>"})[-1]
    fields, blob = topk_update(model, c.update_layout(model["weights"], "topk", 0.001))
    peer.send(encode_message("<UPDATE>", **fields), frame_header(len(blob)), blob)
    answer = peer.read_until({"<SUCCESS>", "<ERROR>"})[-1]
    assert answer["header"] == "<SUCCESS>" and answer["accepted"], answer
    peer.close()
