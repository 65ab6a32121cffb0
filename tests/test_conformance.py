"""fedsock against the protocol's test vectors (docs/reference/vectors/*.json): what it produces from
each vector's inputs is exactly the vector's output, and what a vector says a receiver accepts or
refuses (with which words), it does. A third-party implementation checks itself the same way: read
the same files, feed its own functions. In-process and fast: no socket crosses anything here.

The vectors are written by tests/make_vectors.py; this file never writes them, so a change in the
code that changes the bytes on the wire fails here until the vectors (and the spec) are changed too.
"""

from __future__ import annotations

import base64
import json
import struct

import numpy as np
import pytest
import torch

import client_helper
from conftest import ROOT
from fedsock import compression, identity, secagg, security, shamir
from socket_methods import (
    BadMessage,
    BadWeights,
    check_layout,
    decode_bitmap,
    decode_message,
    decode_weights,
    encode_bitmap,
    encode_message,
    encode_weights,
    weights_layout,
)

VECTORS = ROOT / "docs" / "reference" / "vectors"
CHECKED = {"frames", "messages", "weights", "layouts", "int8", "topk", "partition_bitmap", "local_split", "auth",
           "secagg_crypto", "identities", "shamir", "secagg_round"}


def vector(name: str) -> dict:
    return json.loads((VECTORS / f"{name}.json").read_text())


def f32(hex_values: list[str]) -> np.ndarray:
    return np.frombuffer(b"".join(bytes.fromhex(h) for h in hex_values), dtype="<f4")


def test_every_vector_file_is_checked_and_says_what_it_is():
    files = {path.stem for path in VECTORS.glob("*.json")}
    assert files == CHECKED, f"not checked here: {sorted(files - CHECKED)}; missing: {sorted(CHECKED - files)}"
    for name in files:
        document = vector(name)
        assert document["vector"] == name and document["about"] and document["cases"]
        assert document["spec"].startswith("docs/reference/protocol.md, section")
        section = document["spec"].split('"')[1]
        assert f" {section}\n" in (ROOT / "docs" / "reference" / "protocol.md").read_text(), section


# --------------------------------------------------------------------------- frames and messages


def test_frames_are_the_length_then_the_json():
    for case in vector("frames")["cases"]:
        message = dict(case["message"])
        header = message.pop("header")
        frame = bytes.fromhex(case["frame_hex"])
        assert encode_message(header, **message) == frame
        assert int.from_bytes(frame[:8], "big") == len(frame) - 8
        assert decode_message(frame[8:]) == case["message"]


def test_messages_are_accepted_or_refused_in_the_vector_s_words():
    for case in vector("messages")["cases"]:
        if "decoded" in case:
            assert decode_message(case["payload"].encode()) == case["decoded"], case["why"]
            continue
        with pytest.raises(BadMessage) as refused:
            decode_message(bytes.fromhex(case["payload_hex"]))
        assert str(refused.value) == case["error"], case["why"]


# --------------------------------------------------------------------------- weights


def test_weights_encode_to_the_layout_and_bytes_and_decode_back():
    [case] = vector("weights")["cases"]
    tensors = {t["name"]: torch.tensor(t["values"], dtype=getattr(torch, t["dtype"])).reshape(t["shape"])
               for t in case["tensors"]}
    layout, blob = encode_weights(tensors)
    assert layout == case["layout"]
    assert bytes(blob).hex() == case["blob_hex"]
    decoded = decode_weights(case["layout"], bytearray.fromhex(case["blob_hex"]))
    assert list(decoded) == list(tensors)
    for name, tensor in tensors.items():
        assert decoded[name].dtype == tensor.dtype and torch.equal(decoded[name], tensor)


def test_update_layouts_follow_from_the_model_s_layout():
    document = vector("layouts")
    for case in document["cases"]:
        if case["kind"].startswith("secure aggregation"):
            assert secagg.masked_layout(case["layout"]["tensors"][0]["shape"][0] - 1) == case["layout"]
            continue
        model = document["models"][case["model"]]
        expected = compression.update_layout(model, case["kind"], case["topk_fraction"])
        assert expected == case["layout"], (case["model"], case["kind"], case["topk_fraction"])
        check_layout(json.loads(json.dumps(case["layout"])), expected)  # the received JSON is accepted as it is


def test_an_unknown_key_in_a_layout_or_a_tensor_entry_is_refused_in_words_that_say_so():
    layout = vector("layouts")["models"]["logreg"]
    extra_in_entry = {**layout, "tensors": [{**layout["tensors"][0], "scale": 2}, layout["tensors"][1]]}
    with pytest.raises(BadWeights, match=r"^tensor 'linear.weight' has keys the protocol does not define: \['scale'\]$"):
        check_layout(extra_in_entry, layout)
    with pytest.raises(BadWeights, match=r"^weights layout has keys the protocol does not define: \['codec'\]$"):
        check_layout({**layout, "codec": "zstd"}, layout)
    with pytest.raises(BadWeights, match=r"^weights layout: nbytes 31488, the model has 31424$"):
        check_layout({**layout, "nbytes": 31488}, layout)


def test_int8_decodes_with_scale_and_lo_rounded_to_float32_first():
    cases = vector("int8")["cases"]
    for case in (c["decode"] for c in cases if "decode" in c):
        scale, lo = case["scale"], case["lo"]
        assert f32([case["scale_f32_hex"], case["lo_f32_hex"]]).tolist() == np.float32([scale, lo]).tolist()
        q = torch.arange(256, dtype=torch.uint8)
        wanted = f32(case["decoded_f32_hex"])
        # the client's decoding of a broadcast, and the server's of an update (against a zero base)
        client = compression.decode_broadcast("int8", {"t": q}, {"t": (scale, lo)}, {"t": torch.zeros(256)})["t"]
        server = compression.Decoded("int8", {"t": q}, {"t": (scale, lo)}, {"t": torch.zeros(256)},
                                     {"t": torch.empty(256)})["t"]
        assert client.numpy().tobytes() == wanted.tobytes() == server.numpy().tobytes()
        # the rule in words: two float32 roundings, after rounding scale and lo to float32
        by_rule = (np.arange(256, dtype=np.float32) * np.float32(scale)).astype(np.float32) + np.float32(lo)
        assert by_rule.tobytes() == wanted.tobytes()
    [encode] = [c["broadcast_encode"] for c in cases if "broadcast_encode" in c]
    w = torch.from_numpy(f32(encode["w_f32_hex"]).copy())
    sent, params, seen = compression.encode_weights_for_broadcast({"t": w}, "int8")
    assert sent["t"].tolist() == encode["q"] and params["t"] == [encode["scale"], encode["lo"]]
    assert seen["t"].numpy().tobytes() == f32(encode["decoded_f32_hex"]).tobytes()


def test_topk_decodes_and_encodes_as_the_vector_says():
    decode, encode = (c[k] for c, k in zip(vector("topk")["cases"], ("decode", "encode")))
    received = {"t/indices": torch.tensor(decode["indices"], dtype=torch.int32),
                "t/values": torch.tensor(decode["values"], dtype=torch.float32)}
    base = {"t": torch.tensor(decode["base"])}
    assert compression.Decoded("topk", received, {}, base, {"t": torch.empty(6)})["t"].tolist() == decode["result"]
    residual: dict = {}
    sent, _ = compression.encode({"t": torch.tensor(encode["delta"])}, "topk", encode["topk_fraction"], residual)
    assert compression.topk_count(len(encode["delta"]), encode["topk_fraction"]) == encode["k"]
    assert sent["t/indices"].tolist() == encode["indices"]
    assert sent["t/values"].numpy().tobytes() == f32(encode["values_f32_hex"]).tobytes()
    assert residual["t"].tolist() == encode["residual_after"]


# --------------------------------------------------------------------------- the partition and the local split


def test_partition_bitmaps_encode_and_decode_exactly():
    for case in vector("partition_bitmap")["cases"]:
        if "error" in case:
            with pytest.raises(BadMessage) as refused:
                decode_bitmap(case["bitmap"], case["train_size"])
            assert str(refused.value) == case["error"]
            continue
        assert encode_bitmap(np.array(case["indices"]), case["train_size"]) == case["bitmap"]
        assert base64.b64decode(case["bitmap"]).hex() == case["bytes_hex"]
        assert decode_bitmap(case["bitmap"], case["train_size"]).tolist() == case["indices"]


def test_the_local_test_split_holds_out_a_tenth_rounded_down():
    for case in vector("local_split")["cases"]:
        train, test = client_helper.split_local(np.arange(case["share"]), 7, 2)
        assert (len(test), len(train)) == (case["test_examples"], case["num_examples"])
        assert case["test_examples"] == (case["share"] // 10 if case["share"] > 1 else 0)


def test_auth_macs():
    for case in vector("auth")["cases"]:
        mac = security.auth_mac(case["secret_utf8"].encode(), bytes.fromhex(case["nonce_hex"]), case["client_id"])
        assert mac == case["mac"]
        verify = security.Authenticator(shared=case["secret_utf8"].encode()).verify
        assert verify(case["client_id"], bytes.fromhex(case["nonce_hex"]), case["mac"].upper())  # either case


# --------------------------------------------------------------------------- secure aggregation


def test_secure_aggregation_cryptography():
    h = bytes.fromhex
    for case in vector("secagg_crypto")["cases"]:
        [(kind, c)] = case.items()
        if kind == "x25519_public":
            assert secagg.public_key(h(c["private_hex"])).hex() == c["public_hex"]
        elif kind == "share_key":
            assert secagg.share_key(h(c["c_private_hex"]), h(c["c_public_peer_hex"]), c["round"]).hex() == c["key_hex"]
        elif kind == "mask_seed":
            assert secagg.mask_seed(h(c["s_private_hex"]), h(c["s_public_peer_hex"]), c["round"], c["u"],
                                    c["v"]).hex() == c["seed_hex"]
        elif kind == "seed_commitment":
            assert secagg.seed_commitment(c["round"], c["client_id"], h(c["seed_hex"])).hex() == c["commitment_hex"]
        elif kind == "share_aad":
            assert secagg._aad(c["round"], c["sender"], c["receiver"]).hex() == c["aad_hex"]
        elif kind == "share_ciphertext":
            sealed = secagg._aead(h(c["key_hex"])).encrypt(h(c["nonce_hex"]), h(c["plaintext_hex"]), h(c["aad_hex"]))
            assert sealed.hex() == c["ciphertext_hex"] and len(sealed) == 148
        elif kind == "prg":
            assert secagg.prg(h(c["seed_hex"]), c["length"]).tolist() == c["words"]
        else:
            raise AssertionError(f"unknown case {kind}")


def test_identity_signatures():
    h = bytes.fromhex
    for case in vector("identities")["cases"]:
        [(kind, c)] = case.items()
        if kind == "ed25519_public":
            assert identity.public_of(h(c["private_hex"])).hex() == c["public_hex"]
        elif kind == "certificate":
            assert identity.certificate_message(c["client_id"], h(c["identity_key_hex"])).hex() == c["message_hex"]
            assert identity.certify(h(c["federation_private_hex"]), c["client_id"],
                                    h(c["identity_key_hex"])).hex() == c["certificate_hex"]
        elif kind == "setup_digest":
            s = c["setup"]
            params = secagg.Params(s["round"], tuple(s["participants"]), s["threshold"], s["bits"], s["clip"],
                                   s["weight_bound"], s["length"], s["weighted"], s["identities"])
            assert params.digest().hex() == c["digest_hex"]
        elif kind == "keys_signature":
            message = secagg.keys_message(h(c["setup_digest_hex"]), c["client_id"], h(c["c_public_hex"]),
                                          h(c["s_public_hex"]), h(c["seed_commitment_hex"]))
            assert message.hex() == c["message_hex"]
            assert identity.sign(h(c["identity_private_hex"]), message).hex() == c["signature_hex"]
        elif kind == "survivors_signature":
            message = secagg.survivors_message(h(c["setup_digest_hex"]), c["survivors"], c["dropped"])
            assert message.hex() == c["message_hex"]
            assert identity.sign(h(c["identity_private_hex"]), message).hex() == c["signature_hex"]
        else:
            raise AssertionError(f"unknown case {kind}")


class FixedCoefficients:
    """Shamir's random coefficients, as the vector gives them (fedsock.shamir draws them with secrets.randbelow)."""

    def __init__(self, hex_values: list[str]):
        self.values = [int(v, 16) for v in hex_values]

    def randbelow(self, bound: int) -> int:
        assert bound == shamir.PRIME
        return self.values.pop(0)


def test_shamir_shares_and_their_rebuilding(monkeypatch):
    for case in vector("shamir")["cases"]:
        monkeypatch.setattr(shamir.secrets, "randbelow", FixedCoefficients(case["coefficients_hex"]).randbelow)
        shares = shamir.split(int(case["secret_hex"], 16), case["holders"], case["threshold"])
        assert {str(x): y.to_bytes(66, "big").hex() for x, y in shares.items()} == case["shares_hex"]
        for rebuilt in case["rebuilt_from"]:
            subset = {x: int(case["shares_hex"][str(x)], 16) for x in rebuilt["holders"]}
            assert shamir.combine(subset).to_bytes(32, "big").hex() == rebuilt["secret_hex"] == case["secret_hex"]


def test_a_secure_aggregation_round_end_to_end(monkeypatch):
    """Keys, shares, quantised and masked vectors, their sum, the reveals, the unmasking and the mean: the
    vector's numbers, from fedsock's client and server code."""
    document = vector("secagg_round")
    s = document["setup"]
    params = secagg.Params(s["round"], tuple(s["participants"]), s["threshold"], s["bits"], s["clip"],
                           s["weight_bound"], s["length"], s["weighted"], s["identities"])
    people = {int(u): c for u, c in document["clients"].items()}
    for pair, seed in document["pairwise_mask_seeds"].items():
        u, v = map(int, pair.split(","))
        assert secagg.mask_seed(bytes.fromhex(people[u]["s_private_hex"]),
                                secagg.public_key(bytes.fromhex(people[v]["s_private_hex"])), s["round"], u, v).hex() == seed
    for scenario in document["cases"]:
        clients = {u: secagg.ClientRound(u, params, c_private=bytes.fromhex(c["c_private_hex"]),
                                         s_private=bytes.fromhex(c["s_private_hex"]),
                                         self_seed=bytes.fromhex(c["self_seed_hex"])) for u, c in people.items()}
        server = secagg.ServerRound(params)
        for u, client in clients.items():
            keys = {"c_public": secagg.b64(secagg.public_key(client.c_private)),
                    "s_public": secagg.b64(secagg.public_key(client.s_private)),
                    "seed_commitment": secagg.b64(secagg.seed_commitment(params.round, u, client.self_seed))}
            assert keys == people[u]["keys"]
            server.take_keys(u, keys)
        for u, client in clients.items():
            coefficients = people[u]["shamir_coefficients_hex"]
            monkeypatch.setattr(shamir.secrets, "randbelow",
                                FixedCoefficients(coefficients["s_private"] + coefficients["self_seed"]).randbelow)
            shares = client.share(server.peers())
            assert shares == people[u]["shares_sent"]
            server.take_shares(u, shares)
        for v, client in clients.items():
            client.receive(server.routed(v))
        for u in scenario["survivors"]:
            c = people[u]
            weight = c["num_examples"] / params.weight_bound
            scaled = np.clip(np.array(c["delta"]), -params.clip, params.clip) * (weight / params.clip)
            quantised = secagg.quantize(scaled, params.bits, np.random.default_rng(1)).tolist() + [c["num_examples"]]
            assert quantised == scenario["x"][str(u)]
            assert secagg.prg(clients[u].self_seed, params.length + 1).tolist() == scenario["self_masks"][str(u)]
            masked = clients[u].vector(np.array(c["delta"]), weight, c["num_examples"], np.random.default_rng(1))
            assert masked.tolist() == scenario["y"][str(u)]
            server.add(u, masked, c["num_examples"])
        assert server.total.tolist() == scenario["masked_sum"]
        reveals = {u: clients[u].reveal(scenario["survivors"], scenario["dropped"]) for u in scenario["survivors"]}
        assert reveals == {int(u): r for u, r in scenario["reveals"].items()}
        weighted, count = server.unmask(reveals)
        z = np.sum([scenario["x"][str(u)] for u in scenario["survivors"]], axis=0).astype(np.uint32)  # mod 2^32
        assert z.tolist() == scenario["unmasked_sum"]
        assert weighted.tolist() == scenario["S"] == (z[:-1].view(np.int32) / 2 ** params.bits * params.clip).tolist()
        assert count == scenario["N"] == int(z[-1])
        mean = weighted * (params.weight_bound / max(count, 1))
        assert mean.tolist() == scenario["mean"]
