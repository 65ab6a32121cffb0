"""Writes the protocol's test vectors, docs/reference/vectors/*.json, from fedsock's own code.

    python tests/make_vectors.py

Each file says what it tests and how its values are written. tests/test_conformance.py reads
them back and checks that fedsock produces and accepts exactly them: run it after this script,
and look at `git diff docs/reference/vectors` before committing a change (a changed vector is a
changed protocol). Everything here is deterministic: the randomness the protocol leaves to a
peer (keys, seeds, Shamir's coefficients) is fixed and written into the vector.
"""

from __future__ import annotations

import base64
import json
import math
import struct
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import client_helper  # noqa: E402
from fedsock import compression, identity, secagg, security, shamir  # noqa: E402
from socket_methods import (  # noqa: E402
    BadMessage,
    decode_bitmap,
    decode_message,
    encode_bitmap,
    encode_message,
    encode_weights,
    weights_layout,
)

VECTORS = ROOT / "docs" / "reference" / "vectors"
SPEC = "docs/reference/protocol.md"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def f32_hex(values) -> list[str]:
    """float32 values as the hex of their 4 little-endian bytes (exact, unlike a decimal)."""
    return [struct.pack("<f", float(v)).hex() for v in np.asarray(values, dtype=np.float32)]


def write(name: str, about: str, section: str, notation: dict[str, str], cases: list[dict], **more) -> None:
    document = {"vector": name, "about": about, "spec": f"{SPEC}, section \"{section}\"", "notation": notation,
                **more, "cases": cases}
    (VECTORS / f"{name}.json").write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------- frames and messages


def frames() -> None:
    messages = [
        {"header": "<HELLO>", "protocol_version": 3, "client_id": 3, "features": ["dp-local", "compression"]},
        {"header": "<READY>", "num_examples": 5400, "test_examples": 600},
        {"header": "<WAITING>", "message": "round 2: 1 of 3 updates in"},
        {"header": "<ERROR>", "message": "client id 9 is not part of this run (ids are 1..5)"},
    ]
    cases = []
    for message in messages:
        fields = {k: v for k, v in message.items() if k != "header"}
        frame = encode_message(message["header"], **fields)
        cases.append({"message": message, "frame_hex": frame.hex()})
    write("frames", "Control messages as fedsock frames them: an 8-byte big-endian length, then the UTF-8 JSON. "
          "fedsock writes compact JSON (no spaces) with the keys in this order; a receiver must accept any "
          "valid JSON object (other spacing, another key order): only the decoded object is normative.",
          "Frames", {"frame_hex": "the whole frame, length prefix included, in hex"}, cases)


ACCEPTED = [
    ('{ "client_id" : 3, "header": "<HELLO>", "features": [], "protocol_version": 3, "something_new": {"x": 1} }',
     "spacing, key order and an unknown field do not matter"),
    ('{"header":"<READY>","num_examples":1,"test_examples":0,"label_counts":[1,0]}', "an optional field"),
    ('{"header":"<SUCCESS>","round":1,"accepted":false,"message":"caf\\u00e9"}', "a JSON escape"),
]

REFUSED = [
    (b'{"header": "<HELLO>", "protocol_version": NaN, "client_id": 3, "features": []}', "NaN literal"),
    (b'{"header": "<HELLO>", "protocol_version": 1e999, "client_id": 3, "features": []}', "a number beyond float64"),
    (b'{"header": "<HELLO>", "protocol_version": 3.0, "client_id": 3, "features": []}', "3.0 for an integer"),
    (b'{"header": "<HELLO>", "protocol_version": true, "client_id": 3, "features": []}', "true for an integer"),
    (b'{"header": "<HELLO>", "protocol_version": 3, "client_id": 3}', "a required field missing"),
    (b'{"header": "<READY>", "num_examples": 0, "test_examples": 0}', "below the accepted range"),
    (b'{"header": "<MODEL>", "round": 1, "local_epochs": 1, "batch_size": 1, "lr": 0, "proximal_mu": 0, '
     b'"weights": {}}', "an open bound"),
    (b'{"header": "<HELLO!>"}', "an unknown header"),
    (b'["<HELLO>"]', "not an object"),
    (b'{"message": "hi"}', "no header"),
    (b'{"header": "<WAITING>", "message": "\xff"}', "invalid UTF-8"),
    (b'{"header": "<WAITING>", "message": "a"', "cut-off JSON"),
    (b'{"header": "<HELLO>", "protocol_version": 3, "client_id": 3, "features": [1]}', "a list of the wrong items"),
]


PARSER_SAYS = "message is not valid JSON: "


def messages() -> None:
    accepted = [{"payload": text, "why": why, "decoded": decode_message(text.encode())} for text, why in ACCEPTED]
    refused = []
    for payload, why in REFUSED:
        try:
            decode_message(payload)
        except BadMessage as exc:
            text = str(exc)
            case = {"payload_hex": payload.hex(), "why": why, "error": text}
            if text.startswith(PARSER_SAYS) and "NaN" not in text and "out of range" not in text:
                case["error_after_prefix_is_the_parser_s"] = True  # Python's json module's words
            refused.append(case)
        else:
            raise AssertionError(f"accepted: {payload!r}")
    write("messages", "Control-message payloads (the bytes after the length prefix) a receiver accepts, with the "
          "object it reads, and ones it refuses, with the exact text of fedsock's refusal (the message of the "
          "<ERROR> it answers, and of its log line).", "JSON rules",
          {"payload": "UTF-8 text of the payload", "payload_hex": "the payload's bytes in hex",
           "error": "fedsock's text, exactly",
           "error_after_prefix_is_the_parser_s": "true where what follows 'message is not valid JSON: ' is the "
                                                 "words of Python's JSON parser: another implementation has its own"},
          accepted + refused)


# --------------------------------------------------------------------------- weights


def weights() -> None:
    tensors = {
        "conv.weight": torch.tensor([[1.0, -2.0, 0.5], [0.25, 3.0, -0.125]], dtype=torch.float32),
        "conv.bias": torch.tensor([1.5, -1.5], dtype=torch.float64),
        "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
        "half": torch.tensor([1.0, -0.5, 65504.0], dtype=torch.float16),
        "mask": torch.tensor([True, False, True], dtype=torch.bool),
        "empty": torch.zeros((0, 4), dtype=torch.float32),
        "words": torch.tensor([0, 1, 4294967295], dtype=torch.uint32),
    }
    layout, blob = encode_weights(tensors)
    case = {"tensors": [{"name": n, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                         "values": t.reshape(-1).tolist()} for n, t in tensors.items()],
            "layout": layout, "blob_hex": bytes(blob).hex()}
    write("weights", "A weights layout and the weights frame's payload for a few tensors of every kind: "
          "offsets 64-aligned, zero padding, little-endian, C order; a 0-d tensor has shape []; an empty one "
          "takes no bytes.", "Weights", {"values": "each tensor's entries in C order (booleans as true/false)",
                                         "blob_hex": "the weights frame's payload (no length prefix), in hex"},
          [case])


LOGREG = {"byte_order": "little", "nbytes": 31424, "tensors": [
    {"name": "linear.weight", "dtype": "float32", "shape": [10, 784], "offset": 0, "nbytes": 31360},
    {"name": "linear.bias", "dtype": "float32", "shape": [10], "offset": 31360, "nbytes": 40}]}
MIXED = weights_layout({"a.weight": torch.zeros(100), "a.scale": torch.zeros(3, dtype=torch.float64),
                        "a.count": torch.zeros((), dtype=torch.int64), "a.table": torch.zeros(5, dtype=torch.float16)})


def layouts() -> None:
    cases = []
    for model_name, model in (("logreg", LOGREG), ("mixed", MIXED)):
        for kind, fraction in (("none", 0.01), ("fp16", 0.01), ("int8", 0.01), ("topk", 0.01), ("topk", 0.07)):
            cases.append({"model": model_name, "kind": kind, "topk_fraction": fraction,
                          "layout": compression.update_layout(model, kind, fraction)})
    cases.append({"model": "logreg", "kind": "secure aggregation (m = 7850)", "layout": secagg.masked_layout(7850)})
    write("layouts", "The layout of an <UPDATE> (and of a compressed <MODEL>) computed from the model's own layout: "
          "for each --compression kind, and the one masked vector of secure aggregation. 'mixed' has a float64, "
          "an int64 and a float16 tensor: only float32 and float64 ones are encoded.", "The update layout",
          {"models": "the model's own layouts, by name", "layout": "the expected layout, exactly"},
          cases, models={"logreg": LOGREG, "mixed": MIXED})


def int8() -> None:
    decode = []
    for scale, lo in ((0.1, 1 / 3), (2.0 ** -10, -0.5), (0.0, 0.75), (1e-7, -3.0e-3)):
        q = list(range(256))
        out = compression.decode_broadcast("int8", {"t": torch.tensor(q, dtype=torch.uint8)}, {"t": (scale, lo)},
                                           {"t": torch.zeros(256)})["t"]
        decode.append({"scale": scale, "lo": lo, "scale_f32_hex": f32_hex([scale])[0], "lo_f32_hex": f32_hex([lo])[0],
                       "q": "0..255", "decoded_f32_hex": f32_hex(out.numpy())})
    w = torch.tensor([-1.0, -0.3, 0.0, 0.2, 0.5, 1.0, 0.123456], dtype=torch.float32)
    sent, params, seen = compression.encode_weights_for_broadcast({"t": w}, "int8")
    encode = {"w": w.tolist(), "w_f32_hex": f32_hex(w.numpy()), "q": sent["t"].tolist(), "scale": params["t"][0],
              "lo": params["t"][1], "decoded_f32_hex": f32_hex(seen["t"].numpy())}
    write("int8", "int8 decoding, as both the server (updates) and the client (broadcasts) compute it: scale and lo "
          "are first rounded to float32; q (as float32) times scale is rounded to float32, then lo is added and "
          "rounded to float32 again (two roundings, no fused multiply-add). Then one broadcast encoding "
          "(nearest rounding, ties to even) with what a client decodes from it.", "int8",
          {"scale, lo": "as they travel in JSON (float64 decimals)",
           "*_f32_hex": "float32 values as the hex of their 4 little-endian bytes"},
          [{"decode": d} for d in decode] + [{"broadcast_encode": encode}])


def topk() -> None:
    base = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], dtype=torch.float32)
    received = {"t/indices": torch.tensor([1, 4], dtype=torch.int32), "t/values": torch.tensor([0.5, -2.0])}
    out = compression.Decoded("topk", received, {}, {"t": base}, {"t": torch.empty(6)})["t"]
    delta = torch.tensor([0.1, -3.0, 0.2, 2.5, 0.0, -0.4])
    residual: dict = {}
    sent, _ = compression.encode({"t": delta}, "topk", 0.34, residual)
    write("topk", "topk: how an update is decoded against its base, and which entries a client sends for a delta "
          "(k = max(1, ceil(fraction·n)); the kept residual is the client's own business).", "topk", {},
          [{"decode": {"base": base.tolist(), "indices": [1, 4], "values": [0.5, -2.0], "result": out.tolist()}},
           {"encode": {"delta": delta.tolist(), "topk_fraction": 0.34, "k": compression.topk_count(6, 0.34),
                       "indices": sent["t/indices"].tolist(), "values_f32_hex": f32_hex(sent["t/values"].numpy()),
                       "residual_after": residual["t"].tolist()}}])


# --------------------------------------------------------------------------- the partition and the local split


def partition() -> None:
    cases = []
    for indices, total in (([0, 2, 3, 9], 10), ([7], 8), (list(range(0, 20, 3)), 20), ([1, 5, 99], 100)):
        text = encode_bitmap(np.array(indices), total)
        raw = base64.b64decode(text)
        case = {"train_size": total, "indices": indices, "bitmap": text}
        case["bytes_hex"] = raw.hex()
        cases.append(case)
    refused = []
    for text, total in (("AA==", 16), ("gA==", 7), ("not base64!", 8)):
        try:
            decode_bitmap(text, total)
        except BadMessage as exc:
            case = {"train_size": total, "bitmap": text, "error": str(exc)}
            if "base64 (" in str(exc):
                case["error_in_parentheses_is_the_decoder_s"] = True
            refused.append(case)
    write("partition_bitmap", "<METADATA>'s partition_bitmap: which examples of the training split are this "
          "client's. Normative: a client trains on exactly these examples, whatever partition, alpha and seed say. "
          "fedsock's client also refuses an empty share (no bit set).", "The partition",
          {"indices": "the example indices, ascending", "bitmap": "the field's value (base64)",
           "bytes_hex": "the decoded bytes"}, cases + refused)


def local_split() -> None:
    sizes = [0, 1, 2, 9, 10, 11, 19, 20, 99, 101, 1000, 5999, 6000, 60000]
    cases = []
    for n in sizes:
        train, test = client_helper.split_local(np.arange(n), 0, 1)
        cases.append({"share": n, "test_examples": len(test), "num_examples": len(train)})
    write("local_split", "How many of its share fedsock's client holds out as its local test split: floor(n/10), "
          "none for n <= 1 (which are <READY>'s test_examples and num_examples). Informative: a third-party client "
          "may hold out what it likes, or nothing.", "The local test split", {"share": "examples in the bitmap"},
          cases)


# --------------------------------------------------------------------------- authentication


def auth() -> None:
    cases = []
    for secret, nonce, client_id in ((b"correct horse battery staple", bytes(range(32)), 3),
                                     ("ünïcode token".encode(), bytes.fromhex("ff" * 32), 12)):
        cases.append({"secret_utf8": secret.decode(), "nonce_hex": nonce.hex(), "client_id": client_id,
                      "mac": security.auth_mac(secret, nonce, client_id)})
    write("auth", "<AUTH>'s mac for a secret, a <CHALLENGE> nonce and a client id: HMAC-SHA256(secret, "
          "b\"fedsock-auth-v1\\0\" + nonce + b\"\\0\" + decimal id), as lower-case hex.", "Authentication",
          {"secret_utf8": "the token's text; its UTF-8 bytes are the key", "nonce_hex": "<CHALLENGE>'s nonce"}, cases)


# --------------------------------------------------------------------------- secure aggregation

A, B = bytes(range(32)), bytes(range(32, 64))


def secagg_crypto() -> None:
    pub_a, pub_b = secagg.public_key(A), secagg.public_key(B)
    key = secagg.share_key(A, pub_b, 5)
    aad = secagg._aad(5, 3, 7)
    sealed = secagg._aead(key).encrypt((3).to_bytes(12, "big"), bytes(132), aad)
    cases = [
        {"x25519_public": {"private_hex": A.hex(), "public_hex": pub_a.hex()}},
        {"x25519_public": {"private_hex": B.hex(), "public_hex": pub_b.hex()}},
        {"share_key": {"c_private_hex": A.hex(), "c_public_peer_hex": pub_b.hex(), "round": 5, "key_hex": key.hex()}},
        {"share_key": {"c_private_hex": B.hex(), "c_public_peer_hex": pub_a.hex(), "round": 5, "key_hex": key.hex()}},
        {"mask_seed": {"s_private_hex": A.hex(), "s_public_peer_hex": pub_b.hex(), "round": 5, "u": 3, "v": 7,
                       "seed_hex": secagg.mask_seed(A, pub_b, 5, 3, 7).hex()}},
        {"mask_seed": {"s_private_hex": B.hex(), "s_public_peer_hex": pub_a.hex(), "round": 5, "u": 7, "v": 3,
                       "seed_hex": secagg.mask_seed(B, pub_a, 5, 7, 3).hex()}},
        {"seed_commitment": {"round": 5, "client_id": 3, "seed_hex": A.hex(),
                             "commitment_hex": secagg.seed_commitment(5, 3, A).hex()}},
        {"share_aad": {"round": 5, "sender": 3, "receiver": 7, "aad_hex": aad.hex()}},
        {"share_ciphertext": {"key_hex": key.hex(), "nonce_hex": (3).to_bytes(12, "big").hex(), "aad_hex": aad.hex(),
                              "plaintext_hex": bytes(132).hex(), "ciphertext_hex": sealed.hex()}},
        {"prg": {"seed_hex": bytes(32).hex(), "length": 4, "words": [int(w) for w in secagg.prg(bytes(32), 4)]}},
        {"prg": {"seed_hex": A.hex(), "length": 6, "words": [int(w) for w in secagg.prg(A, 6)]}},
    ]
    write("secagg_crypto", "Secure aggregation's cryptography, byte-exact: X25519 public keys of raw private keys, "
          "the HKDF-derived share key and mask seed, the seed commitment, the AAD and a ChaCha20-Poly1305 "
          "ciphertext of the share encryption, and the PRG (ChaCha20 keystream as little-endian uint32 words).",
          "Cryptography, byte-exact", {"*_hex": "bytes in hex", "words": "uint32 words as decimal integers"}, cases)


def identities() -> None:
    F, K = bytes(range(64, 96)), bytes(range(96, 128))
    params = secagg.Params(5, (3, 7, 9), 2, 29, 10.0, 60000, 100, True, True)
    digest = params.digest()
    pub_a, pub_b = secagg.public_key(A), secagg.public_key(B)
    commitment = secagg.seed_commitment(5, 3, A)
    keys = secagg.keys_message(digest, 3, pub_a, pub_b, commitment)
    survivors = secagg.survivors_message(digest, [3, 9], [7])
    cases = [
        {"ed25519_public": {"private_hex": F.hex(), "public_hex": identity.public_of(F).hex()}},
        {"ed25519_public": {"private_hex": K.hex(), "public_hex": identity.public_of(K).hex()}},
        {"certificate": {"federation_private_hex": F.hex(), "client_id": 3, "identity_key_hex": identity.public_of(K).hex(),
                         "message_hex": identity.certificate_message(3, identity.public_of(K)).hex(),
                         "certificate_hex": identity.certify(F, 3, identity.public_of(K)).hex()}},
        {"setup_digest": {"setup": params.to_json(), "digest_hex": digest.hex()}},
        {"keys_signature": {"identity_private_hex": K.hex(), "setup_digest_hex": digest.hex(), "client_id": 3,
                            "c_public_hex": pub_a.hex(), "s_public_hex": pub_b.hex(),
                            "seed_commitment_hex": commitment.hex(), "message_hex": keys.hex(),
                            "signature_hex": identity.sign(K, keys).hex()}},
        {"survivors_signature": {"identity_private_hex": K.hex(), "setup_digest_hex": digest.hex(),
                                 "survivors": [3, 9], "dropped": [7], "message_hex": survivors.hex(),
                                 "signature_hex": identity.sign(K, survivors).hex()}},
    ]
    write("identities", "Secure aggregation with identities: Ed25519 public keys, a client's certificate, the setup "
          "digest and the two signatures a client makes (Ed25519 signatures are deterministic).",
          "Identities (`identities: true`)", {"*_hex": "bytes in hex"}, cases)


class Coefficients:
    """Shamir's random coefficients, fixed: taken in order from a list (fedsock.shamir uses secrets.randbelow)."""

    def __init__(self, values: list[int]):
        self.values, self.used = list(values), []

    def randbelow(self, bound: int) -> int:
        assert bound == shamir.PRIME
        value = self.values.pop(0)
        self.used.append(value)
        return value


def fixed_coefficients(seed: int, count: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int.from_bytes(rng.bytes(66), "big") % shamir.PRIME for _ in range(count)]


def with_coefficients(values: list[int], action):
    original = shamir.secrets.randbelow
    source = Coefficients(values)
    shamir.secrets.randbelow = source.randbelow
    try:
        return action(), source.used
    finally:
        shamir.secrets.randbelow = original


def shamir_vector() -> None:
    secret = int.from_bytes(A, "big")
    cases = []
    for threshold, holders, seed in ((2, [3, 7, 9], 1), (3, [1, 2, 4, 8, 16], 2)):
        shares, used = with_coefficients(fixed_coefficients(seed, threshold - 1),
                                         lambda: shamir.split(secret, holders, threshold))
        subsets = [holders[:threshold], holders[-threshold:]]
        cases.append({"secret_hex": A.hex(), "threshold": threshold, "holders": holders,
                      "coefficients_hex": [c.to_bytes(66, "big").hex() for c in used],
                      "shares_hex": {str(x): y.to_bytes(66, "big").hex() for x, y in shares.items()},
                      "rebuilt_from": [{"holders": s, "secret_hex": shamir.combine({x: shares[x] for x in s})
                                        .to_bytes(32, "big").hex()} for s in subsets]})
    write("shamir", "Shamir's secret sharing over GF(2^521 - 1): f(x) = secret + a_1·x + ... + a_(t-1)·x^(t-1), "
          "the share of holder id x is f(x), as 66 big-endian bytes; any t shares rebuild the secret by Lagrange "
          "interpolation at 0.", "Shamir's scheme",
          {"coefficients_hex": "a_1 .. a_(t-1), each as 66 big-endian bytes (a dealer draws them uniformly in "
                               "[0, p); fixed here)", "shares_hex": "holder id -> f(id), 66 big-endian bytes"}, cases)


def secagg_round() -> None:
    """One round of 3 clients, end to end, twice: all survive; client 9 drops after sharing."""
    R, ids, t, bits, C, W, m = 5, (3, 7, 9), 2, 16, 1.0, 4, 4
    params = secagg.Params(R, ids, t, bits, C, W, m, True, False)
    keys = {u: {"c_private": bytes([u]) * 32, "s_private": bytes([u + 100]) * 32, "self_seed": bytes([u + 200]) * 32}
            for u in ids}
    examples = {3: 4, 7: 2, 9: 1}
    deltas = {3: [0.5, -0.25, 0.125, 0.0], 7: [-1.0, 0.5, 2.0, 0.0009765625], 9: [0.25, 0.25, -0.75, -4.0]}
    scenarios = []
    for survivors in ((3, 7, 9), (3, 7)):
        clients = {u: secagg.ClientRound(u, params, **keys[u]) for u in ids}
        server = secagg.ServerRound(params)
        advertised = {}
        for u, c in clients.items():
            advertised[u] = {"c_public": b64(secagg.public_key(c.c_private)), "s_public": b64(secagg.public_key(c.s_private)),
                             "seed_commitment": b64(secagg.seed_commitment(R, u, c.self_seed))}
            server.take_keys(u, advertised[u])
        peers = server.peers()
        coefficients = {u: fixed_coefficients(10 + u, 2 * (t - 1)) for u in ids}
        sent, used = {}, {}
        for u, c in clients.items():
            sent[u], used[u] = with_coefficients(coefficients[u], lambda c=c: c.share(peers))
            server.take_shares(u, sent[u])
        for v, c in clients.items():
            c.receive(server.routed(v))
        vectors, quantised = {}, {}
        for u in survivors:
            c = clients[u]
            weight = examples[u] / W
            delta = np.array(deltas[u])
            scaled = np.clip(delta, -C, C) * (weight / C)
            quantised[u] = secagg.quantize(scaled, bits, np.random.default_rng(0)).tolist() + [examples[u]]
            vectors[u] = c.vector(delta, weight, examples[u], np.random.default_rng(0))
            server.add(u, vectors[u], examples[u])
        dropped = sorted(set(ids) - set(survivors))
        reveals = {u: clients[u].reveal(survivors, dropped) for u in survivors}
        weighted, count = server.unmask(reveals)
        total = server.total.copy()
        scenarios.append({
            "survivors": list(survivors), "dropped": dropped,
            "x": {str(u): [int(w) for w in quantised[u]] for u in survivors},
            "self_masks": {str(u): [int(w) for w in secagg.prg(keys[u]["self_seed"], m + 1)] for u in survivors},
            "y": {str(u): [int(w) for w in vectors[u]] for u in survivors},
            "masked_sum": [int(w) for w in total],
            "reveals": {str(u): reveals[u] for u in survivors},
            "unmasked_sum": [int(w) for w in np.array(weighted / C * 2 ** bits, dtype=np.int64).astype(np.uint32)]
                            + [count],
            "S": [float(v) for v in weighted], "N": count,
            "mean": [float(v) for v in weighted * (W / max(count, 1))],
        })
    shared = {
        "setup": params.to_json(),
        "clients": {str(u): {"c_private_hex": keys[u]["c_private"].hex(), "s_private_hex": keys[u]["s_private"].hex(),
                             "self_seed_hex": keys[u]["self_seed"].hex(), "num_examples": examples[u],
                             "delta": deltas[u], "keys": advertised[u],
                             "shamir_coefficients_hex": {
                                 "s_private": [c.to_bytes(66, "big").hex() for c in used[u][:t - 1]],
                                 "self_seed": [c.to_bytes(66, "big").hex() for c in used[u][t - 1:]]},
                             "shares_sent": sent[u]} for u in ids},
        "pairwise_mask_seeds": {f"{u},{v}": secagg.mask_seed(keys[u]["s_private"], secagg.public_key(keys[v]["s_private"]),
                                                             R, u, v).hex() for u in ids for v in ids if u < v},
    }
    write("secagg_round", "One secure-aggregation round of clients 3, 7 and 9, end to end: fixed keys, seeds and "
          "Shamir coefficients; each client's <SECAGG_KEYS>, its <SECAGG_SHARES> ciphertexts, its quantised vector "
          "x_u (m + 1 words: m coordinates and the count), its masked vector y_u, the server's sum of the y_u, the "
          "reveals, the unmasked sum Z and the mean delta. Two scenarios: every client survives; client 9 "
          "shares, then drops before its update (its mask key is rebuilt from the survivors' shares). The deltas "
          "are chosen so that every scaled coordinate is an integer at b bits: the stochastic rounding is exact, "
          "whatever U_i are drawn.", "Secure aggregation",
          {"setup": "<SECAGG_SETUP>'s fields", "x, self_masks, y, masked_sum, unmasked_sum": "uint32 words, decimal",
           "S": "int32(Z_i) / 2^b · C for i < m", "N": "Z_m", "mean": "S_i · W / max(N, 1), the round's mean delta",
           "pairwise_mask_seeds": "'u,v' -> mask_seed(s_u, s_v public, R, u, v) in hex",
           "shamir_coefficients_hex": "a_1.. of the split of the s private key (as a big-endian integer), then of "
                                      "the self-mask seed's; one each here (t = 2)"},
          scenarios, **shared)


def main() -> int:
    VECTORS.mkdir(parents=True, exist_ok=True)
    for make in (frames, messages, weights, layouts, int8, topk, partition, local_split, auth, secagg_crypto,
                 identities, shamir_vector, secagg_round):
        make()
    print(f"wrote {len(list(VECTORS.glob('*.json')))} vector files to {VECTORS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
