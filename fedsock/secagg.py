"""Secure aggregation (Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving
Machine Learning"): the server learns the sum of the round's updates and nothing else.

One round, for the clients U sampled (every message goes through the server, which relays
what it cannot read):

0. <SECAGG_SETUP> → each client makes two fresh X25519 key pairs, c (to encrypt to it) and
   s (to agree pairwise masks), draws a 32-byte self-mask seed b_u, and answers <SECAGG_KEYS>
   with both public keys and a SHA-256 commitment to b_u. U1: those that answered.
1. <SECAGG_PEERS> (U1's public keys) → each client u splits s_u's private key and b_u into
   Shamir shares, threshold t, one pair per peer v, and answers <SECAGG_SHARES>: each pair
   encrypted to v (ChaCha20-Poly1305 under a key agreed from c_u and c_v). U2: those that
   answered; the server sends each client the ciphertexts addressed to it (<SECAGG_ROUTED>),
   then the round's <MODEL>.
2. Each client trains, and sends its update quantised into Z_{2^32} plus masks:
       y_u = x_u + PRG(b_u) + Σ_{v in U2, v > u} PRG(s_uv) − Σ_{v in U2, v < u} PRG(s_uv)
   where s_uv is agreed from s_u and s_v (so v computes the same), and PRG is ChaCha20's
   keystream. A masked vector is uniformly random to anyone without the seeds. U3: those
   whose masked update arrived.
3. <SECAGG_UNMASK> (U3 and the dropped, U2 \\ U3) → each survivor reveals its share of b_u for
   every u in U3 and its share of s_u's key for every dropped u, never both for one client,
   and only once a round (<SECAGG_REVEAL>). From t good shares the server rebuilds each of
   those secrets, checked against the commitment or the public key it was sent with (a bad
   share is found and left out with the spare ones: fedsock/shamir.py), strips the self
   masks, and the pairwise masks that the dropped clients' absence left uncancelled:
   Σ y_u over U3 becomes Σ x_u.
4. What the server can still check under the masks (a hostile client could otherwise wreck
   the model through the sum): the summed count must equal the survivors' plain-text counts,
   and every coordinate of the sum must lie within what their clipped updates allow. A round
   that fails either is discarded.

With identities (the server's --federation, each client's --identity: fedsock/identity.py),
against a server that lies: in step 0 each client signs its keys and the whole setup with
its enrolled identity key, and in step 1 checks every peer's signature and certificate, so
that the server cannot put keys of its own in a peer's place; and before step 3, the
consistency check (Bonawitz et al.'s active-adversary variant): <SECAGG_CHECK> tells each
survivor U3, it signs what it was told (<SECAGG_SIGNED>), and <SECAGG_UNMASK> then carries
the survivors' signatures, of which each client needs t on its own U3 before it reveals.
Then a server that lies learns one update only with at least 2t - n colluding clients.

The quantisation (the overflow rule). A client's delta is clipped per coordinate to [−C, C],
multiplied by its weight w_u = n_u / W (its example count over W, the largest count among
the round's clients; with DP every weight is 1), divided by C, and stochastically rounded
to an integer multiple of 2^−b: each coordinate becomes an integer in [−2^b, 2^b]. With
b = ⌊log2((2^31 − 1) / n)⌋ for n clients, the sum of n of them lies strictly inside
(−2^31, 2^31): two's complement in 32 bits cannot wrap. The last coordinate carries the
weight's numerator n_u (or 1), whose sum must stay below 2^32: n·W < 2^32, refused otherwise.
The mean delta is W·Σ(w_u·Δ_u)/Σn_u, with an error per coordinate of at most
n·C·2^−b·W/Σn_u (each rounding is below one step, and unbiased).

Masks live in the ring Z_{2^32}, as in the paper (any Z_R works: a uniform mask makes the
masked value uniform); the secrets are shared in the prime field GF(2^521 − 1)
(fedsock/shamir.py); everything else (X25519, HKDF, SHA-256, ChaCha20, ChaCha20-Poly1305, the
CSPRNG) comes from `cryptography` and the standard library.
"""

from __future__ import annotations

import base64
import hashlib
import math
import secrets
import struct
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np

from fedsock import identity as ident
from fedsock.config import SecAggSettings
from fedsock.order import ROLE_SECURE_CLIENT, SECAGG_REQUESTS, Order
from fedsock.shamir import MAX_TRIES, PRIME, SHARE_BYTES, rebuild, split
from socket_methods import (
    MODEL,
    SECAGG_CHECK,
    SECAGG_KEYS,
    SECAGG_PEERS,
    SECAGG_REVEAL,
    SECAGG_ROUTED,
    SECAGG_SETUP,
    SECAGG_SHARES,
    SECAGG_SIGNED,
    SECAGG_UNMASK,
    BadMessage,
)

FEATURE = "secagg"
KEY_BYTES = 32
MIN_BITS = 12  # fewer fractional bits than this would make the rounding error too coarse: refused
TAG = b"fedsock secagg v1"


class SecAggError(BadMessage):
    """A secure-aggregation message that is malformed, inconsistent, or asks for what must not be given."""


# --------------------------------------------------------------------------- the primitives


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: Any, nbytes: int | None = None, what: str = "value") -> bytes:
    if not isinstance(text, str):
        raise SecAggError(f"{what} must be a base64 string")
    try:
        data = base64.b64decode(text, validate=True)
    except ValueError as exc:
        raise SecAggError(f"{what} is not valid base64") from exc
    if nbytes is not None and len(data) != nbytes:
        raise SecAggError(f"{what} must be {nbytes} bytes, not {len(data)}")
    return data


def _hkdf(secret: bytes, info: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def _exchange(private: bytes, public: bytes) -> bytes:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

    try:
        return X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:  # an all-zero shared secret: a small-order public key
        raise SecAggError(f"a public key is not usable for X25519 ({exc})") from exc


def _ids(*numbers: int) -> bytes:
    return b"".join(n.to_bytes(8, "big") for n in numbers)


def share_key(c_private: bytes, c_public_peer: bytes, round_number: int) -> bytes:
    return _hkdf(_exchange(c_private, c_public_peer), TAG + b" shares" + _ids(round_number))


def mask_seed(s_private: bytes, s_public_peer: bytes, round_number: int, u: int, v: int) -> bytes:
    return _hkdf(_exchange(s_private, s_public_peer), TAG + b" mask" + _ids(round_number, min(u, v), max(u, v)))


def seed_commitment(round_number: int, client_id: int, seed: bytes) -> bytes:
    """SHA-256 of a self-mask seed, bound to its round and client: sent in the key stage, before any
    share exists, so that the seed the server rebuilds can be checked (a bad share would give another).
    The seed is 32 random bytes: its hash tells nothing of it."""
    return hashlib.sha256(TAG + b" seed" + _ids(round_number, client_id) + seed).digest()


def keys_message(digest: bytes, client_id: int, c_public: bytes, s_public: bytes, commitment: bytes) -> bytes:
    """What a client signs with its identity key in the key stage: its round keys, under the setup."""
    return TAG + b" keys" + digest + _ids(client_id) + c_public + s_public + commitment


def survivors_message(digest: bytes, survivors: Iterable[int], dropped: Iterable[int]) -> bytes:
    """What a survivor signs in the consistency check: U3 and U2 minus U3, as it was told them."""
    survivors, dropped = sorted(survivors), sorted(dropped)
    return TAG + b" survivors" + digest + _ids(len(survivors), *survivors, len(dropped), *dropped)


def identity_fields(entry: Mapping[str, Any]) -> tuple[bytes, bytes, bytes]:
    """A signed entry's identity key, certificate and signature, decoded and of their sizes (SecAggError)."""
    return (unb64(entry.get("identity_key"), ident.KEY_BYTES, "identity_key"),
            unb64(entry.get("certificate"), ident.SIGNATURE_BYTES, "certificate"),
            unb64(entry.get("signature"), ident.SIGNATURE_BYTES, "signature"))


def public_key(private: bytes) -> bytes:
    """The X25519 public key of a raw private key: what a rebuilt mask key is checked against."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(serialization.Encoding.Raw,
                                                                                  serialization.PublicFormat.Raw)


def prg(seed: bytes, length: int) -> np.ndarray:
    """`length` uniform 32-bit words: ChaCha20's keystream under `seed` (nonce 0), little-endian words."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    stream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor().update(bytes(4 * length))
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32, copy=False)


def new_keypair() -> tuple[bytes, bytes]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    key = X25519PrivateKey.generate()
    raw = (serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    return key.private_bytes(*raw), key.public_key().public_bytes(serialization.Encoding.Raw,
                                                                  serialization.PublicFormat.Raw)


def _aead(key: bytes):
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    return ChaCha20Poly1305(key)


def _aad(round_number: int, sender: int, receiver: int) -> bytes:
    return TAG + _ids(round_number, sender, receiver)


# --------------------------------------------------------------------------- quantisation


# The most clients in one secure round: <SECAGG_PEERS>, <SECAGG_SHARES> and <SECAGG_ROUTED> carry about
# 210 bytes per client, and a control message is at most 1 MiB (socket_methods.MAX_CONTROL_BYTES).
MAX_CLIENTS = 4000


def bits_for(clients: int) -> int:
    """Fractional bits such that the sum of `clients` values in [-2^b, 2^b] fits in int32."""
    return int(math.floor(math.log2((2**31 - 1) / max(clients, 1))))


assert bits_for(MAX_CLIENTS) >= MIN_BITS  # a round of at most MAX_CLIENTS keeps enough precision


def check_sizes(clients: int, weight_bound: int) -> None:
    """Refuse settings whose share messages would not fit in a control message, or whose example
    counts could overflow 32 bits (ValueError, one sentence)."""
    if clients > MAX_CLIENTS:
        raise ValueError(f"secure aggregation of {clients} clients a round: its key and share messages (about 210 "
                         f"bytes per client) would pass the 1 MiB limit of a control message; at most {MAX_CLIENTS} "
                         f"a round (sample fewer with --clients-per-round)")
    if clients * weight_bound >= 2**32:
        raise ValueError(f"{clients} clients of up to {weight_bound} examples each could sum past 2^32 in the "
                         f"masked example count: lower --max-client-examples or the clients per round")


def quantize(values: np.ndarray, bits: int, rng: np.random.Generator) -> np.ndarray:
    """Values in [-1, 1] as integers in [-2^b, 2^b], rounded stochastically (unbiased), as uint32 words."""
    scaled = np.clip(values, -1.0, 1.0) * float(2**bits)
    low = np.floor(scaled)
    rounded = low + (rng.random(scaled.shape) < (scaled - low))
    return rounded.astype(np.int64).astype(np.uint32)  # two's complement, mod 2^32


def dequantize_sum(total: np.ndarray, bits: int) -> np.ndarray:
    return total.view(np.int32).astype(np.float64) / float(2**bits)


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class Params:
    """What <SECAGG_SETUP> announces for one round."""

    round: int
    participants: tuple[int, ...]
    threshold: int
    bits: int
    clip: float  # C: each coordinate of a delta is clipped to [-C, C]
    weight_bound: int  # W: weights are n_u / W; 1 with DP (every client weighted 1)
    length: int  # coordinates of the model (the vector has one more: the count)
    weighted: bool = True  # False with DP: every client's weight and count are 1
    identities: bool = False  # keys signed by enrolled identities, and the consistency check

    def to_json(self) -> dict[str, Any]:
        return {"round": self.round, "participants": list(self.participants), "threshold": self.threshold,
                "bits": self.bits, "clip": self.clip, "weight_bound": self.weight_bound, "length": self.length,
                "weighted": self.weighted, "identities": self.identities}

    def digest(self) -> bytes:
        """SHA-256 of the whole setup in a fixed binary form (big-endian 8-byte integers, the clip as a
        float64, the flags as bytes), which every signature of the round covers: a server that told
        two clients different setups (another threshold, other participants) is caught by their peers."""
        head = _ids(self.round, len(self.participants), *self.participants, self.threshold, self.bits)
        tail = _ids(self.weight_bound, self.length) + bytes([self.weighted, self.identities])
        return hashlib.sha256(TAG + b" setup" + head + struct.pack(">d", self.clip) + tail).digest()

    @classmethod
    def from_json(cls, m: Mapping[str, Any], client_id: int, length: int) -> "Params":
        """Checked by a client: it refuses a setup that could not be safe or could not add up."""
        people = m["participants"]
        if not all(type(i) is int and i >= 1 for i in people) or len(set(people)) != len(people):
            raise SecAggError("<SECAGG_SETUP> participants must be distinct client ids")
        if client_id not in people:
            raise SecAggError("<SECAGG_SETUP> does not list this client among the participants")
        n, t = len(people), m["threshold"]
        if not (n // 2 < t <= n) or t < 2:
            raise SecAggError(f"<SECAGG_SETUP> threshold {t} of {n} clients: it must be more than half of them "
                              f"(and at least 2), or the server could learn both kinds of share for one client")
        if m["bits"] > bits_for(n) or m["bits"] < MIN_BITS:
            raise SecAggError(f"<SECAGG_SETUP> bits {m['bits']} could overflow for {n} clients (at most {bits_for(n)})")
        if m["length"] != length:
            raise SecAggError(f"<SECAGG_SETUP> length {m['length']}, the model has {length} coordinates")
        if not (m["clip"] > 0 and math.isfinite(m["clip"])) or m["weight_bound"] < 1:
            raise SecAggError("<SECAGG_SETUP> clip must be positive and weight_bound at least 1")
        return cls(m["round"], tuple(people), t, m["bits"], float(m["clip"]), m["weight_bound"], length,
                   m["weighted"], m["identities"])


def default_threshold(clients: int, fraction: float) -> int:
    """t: more than half of the round's clients (so that two disjoint groups of t cannot exist), at least
    `fraction` of them (the share that must stay to the end), and at least 2."""
    return max(2, clients // 2 + 1, math.ceil(fraction * clients))


# --------------------------------------------------------------------------- a client's side


@dataclass
class ClientRound:
    """One client's secure aggregation of one round: its keys, its peers' shares, its one reveal."""

    client_id: int
    params: Params
    c_private: bytes = b""
    s_private: bytes = b""
    self_seed: bytes = b""
    peers: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # U1: id -> (c public, s public)
    held: dict[int, tuple[int, int]] = field(default_factory=dict)  # u -> (share of s_u's key, share of b_u)
    senders: frozenset = frozenset()  # U2 as this client knows it
    identity: ident.Identity | None = None  # with identities: this client's, and the federation key it pins
    signers: dict[int, bytes] = field(default_factory=dict)  # U1: id -> identity key, certified
    told: tuple | None = None  # the (survivors, dropped) this client signed in the consistency check

    def advertise(self) -> dict[str, Any]:
        self.c_private, c_public = new_keypair()
        self.s_private, s_public = new_keypair()
        self.self_seed = secrets.token_bytes(KEY_BYTES)
        commitment = seed_commitment(self.params.round, self.client_id, self.self_seed)
        out: dict[str, Any] = {"c_public": b64(c_public), "s_public": b64(s_public), "seed_commitment": b64(commitment)}
        if self.params.identities:
            me = self.identity
            signature = ident.sign(me.private_key, keys_message(self.params.digest(), self.client_id, c_public,
                                                                   s_public, commitment))
            out["identity"] = {"identity_key": b64(me.public_key), "certificate": b64(me.certificate),
                               "signature": b64(signature)}
        return out

    def share(self, keys: Mapping[str, Any], signed: Any = None) -> dict[str, str]:
        """<SECAGG_PEERS> in; the <SECAGG_SHARES> ciphertexts out, one per peer."""
        p = self.params
        peers = {}
        for key, pair in keys.items():
            if not (key.isascii() and key.isdigit()) or int(key) not in p.participants or not isinstance(pair, list) or len(pair) != 2:
                raise SecAggError(f"<SECAGG_PEERS> entry {key[:20]!r} is not a participant's [c_public, s_public]")
            peers[int(key)] = (unb64(pair[0], KEY_BYTES, "c_public"), unb64(pair[1], KEY_BYTES, "s_public"))
        if self.client_id not in peers or len(peers) < p.threshold:
            raise SecAggError(f"<SECAGG_PEERS> lists {len(peers)} clients{'' if self.client_id in peers else ', not this one'}; "
                              f"the threshold is {p.threshold}")
        if p.identities:
            self._check_signed(peers, signed)
        self.peers = peers
        key_shares = split(int.from_bytes(self.s_private, "big"), peers, p.threshold)
        seed_shares = split(int.from_bytes(self.self_seed, "big"), peers, p.threshold)
        out = {}
        for v in peers:
            if v == self.client_id:
                self.held[v] = (key_shares[v], seed_shares[v])
                continue
            plain = key_shares[v].to_bytes(SHARE_BYTES, "big") + seed_shares[v].to_bytes(SHARE_BYTES, "big")
            nonce = self.client_id.to_bytes(12, "big")
            sealed = _aead(share_key(self.c_private, peers[v][0], p.round)).encrypt(
                nonce, plain, _aad(p.round, self.client_id, v))
            out[str(v)] = b64(sealed)
        return out

    def _check_signed(self, peers: Mapping[int, tuple[bytes, bytes]], signed: Any) -> None:
        """Every peer's keys must be signed, for this setup, by an identity the pinned federation key
        certified for that client id: else the server may be putting its own keys in a peer's place."""
        if not isinstance(signed, Mapping) or set(signed) != {str(v) for v in peers}:
            raise SecAggError("<SECAGG_PEERS> must carry the signed keys of every client it lists (the run has "
                              "identities); refused")
        digest = self.params.digest()
        for v, (c_public, s_public) in peers.items():
            entry = signed[str(v)]
            if not isinstance(entry, Mapping):
                raise SecAggError(f"<SECAGG_PEERS> signed entry of client {v} is not an object")
            key, certificate, signature = identity_fields(entry)
            commitment = unb64(entry.get("seed_commitment"), KEY_BYTES, "seed_commitment")
            if not ident.certified(self.identity.federation_key, v, key, certificate):
                raise SecAggError(f"<SECAGG_PEERS> gives client {v} an identity that this federation did not enrol: "
                                  f"the server may be substituting its keys; refused")
            if not ident.verify(key, signature, keys_message(digest, v, c_public, s_public, commitment)):
                raise SecAggError(f"<SECAGG_PEERS> holds keys for client {v} that client {v} did not sign for this "
                                  f"round's setup: the server may be substituting them; refused")
            self.signers[v] = key

    def receive(self, routed: Mapping[str, Any]) -> None:
        """<SECAGG_ROUTED>: the shares addressed to this client, from each u in U2."""
        p = self.params
        for key, text in routed.items():
            u = int(key) if key.isascii() and key.isdigit() else -1
            if u not in self.peers or u == self.client_id:
                raise SecAggError(f"<SECAGG_ROUTED> has shares from {key[:20]!r}, not a peer")
            try:
                plain = _aead(share_key(self.c_private, self.peers[u][0], p.round)).decrypt(
                    u.to_bytes(12, "big"), unb64(text, what="a share ciphertext"), _aad(p.round, u, self.client_id))
            except SecAggError:
                raise
            except Exception as exc:  # cryptography's InvalidTag: forged, or not for us
                raise SecAggError(f"the shares from client {u} do not decrypt (forged or misrouted)") from exc
            if len(plain) != 2 * SHARE_BYTES:
                raise SecAggError(f"the shares from client {u} have {len(plain)} bytes")
            shares = (int.from_bytes(plain[:SHARE_BYTES], "big"), int.from_bytes(plain[SHARE_BYTES:], "big"))
            if not all(s < PRIME for s in shares):
                raise SecAggError(f"the shares from client {u} are outside the field")
            self.held[u] = shares
        self.senders = frozenset(self.held)
        if len(self.senders) < p.threshold:
            raise SecAggError(f"only {len(self.senders)} clients shared keys with this one; the threshold is "
                              f"{p.threshold}")

    def vector(self, delta: np.ndarray, weight: float, count: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """The quantised update (weight·clip(delta)/C, then the count) plus every mask: what is sent."""
        p = self.params
        if delta.shape != (p.length,):
            raise ValueError(f"the delta has {delta.shape} coordinates, the round {p.length}")
        rng = rng or np.random.default_rng(secrets.randbits(64))
        scaled = np.clip(delta.astype(np.float64), -p.clip, p.clip) * (weight / p.clip)
        masked = np.empty(p.length + 1, dtype=np.uint32)
        masked[:-1] = quantize(scaled, p.bits, rng)
        masked[-1] = count
        masked += prg(self.self_seed, p.length + 1)
        for v in sorted(self.senders - {self.client_id}):
            mask = prg(mask_seed(self.s_private, self.peers[v][1], p.round, self.client_id, v), p.length + 1)
            if self.client_id < v:
                masked += mask
            else:
                masked -= mask
        return masked

    def sign_survivors(self, survivors: Iterable[int], dropped: Iterable[int]) -> str:
        """<SECAGG_CHECK> in (identities only): this client's signature of the survivors it is told, after
        the checks an unmask gets. It will reveal only for this very set, and only once t survivors
        have signed it too (Bonawitz et al.'s consistency check)."""
        if not self.params.identities:
            raise SecAggError(f"{SECAGG_CHECK} in a round without identities")
        survivors, dropped = self._check_view(survivors, dropped)
        self.told = (sorted(survivors), sorted(dropped))
        return b64(ident.sign(self.identity.private_key, survivors_message(self.params.digest(), *self.told)))

    def reveal(self, survivors: Iterable[int], dropped: Iterable[int], signatures: Any = None) -> dict[str, dict[str, str]]:
        """<SECAGG_UNMASK> in; the shares it asks for out, after every check an honest client makes."""
        survivors, dropped = self._check_view(survivors, dropped)
        if self.params.identities:
            self._check_consistency(survivors, dropped, signatures)
        enc = lambda value: b64(value.to_bytes(SHARE_BYTES, "big"))  # noqa: E731
        return {"seed_shares": {str(u): enc(self.held[u][1]) for u in sorted(survivors)},
                "key_shares": {str(u): enc(self.held[u][0]) for u in sorted(dropped)}}

    def _check_consistency(self, survivors: set[int], dropped: set[int], signatures: Any) -> None:
        """With identities: the unmask must name the survivors this client signed, and at least t of those
        survivors must have signed the same set; else clients were told different sets, and revealing
        could hand the server both kinds of share of one client."""
        t = self.params.threshold
        if self.told is None or self.told != (sorted(survivors), sorted(dropped)):
            raise SecAggError("the server asks to unmask other survivors than those this client signed in the "
                              "consistency check (or skipped the check); refused")
        message = survivors_message(self.params.digest(), survivors, dropped)
        good = 0
        for key, text in (signatures.items() if isinstance(signatures, Mapping) else ()):
            v = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() else -1
            try:
                good += v in survivors and v in self.signers and ident.verify(self.signers[v], unb64(text, what="a signature"), message)
            except SecAggError:
                continue
        if good < t:
            raise SecAggError(f"only {good} survivors signed the survivor set this client was told; {t} are needed: "
                              f"the server may have told clients different sets; refused")

    def _check_view(self, survivors: Iterable[int], dropped: Iterable[int]) -> tuple[set[int], set[int]]:
        """The survivors and dropped clients the server names, checked as every honest client checks them."""
        survivors, dropped = set(survivors), set(dropped)
        both = survivors & dropped
        if both:
            raise SecAggError(f"the server asked for both kinds of share of client {min(both)} (listed as survivor "
                              f"and as dropped); refused")
        if survivors | dropped != self.senders:
            raise SecAggError("the server's survivors and dropped clients are not exactly the clients that shared "
                              "keys with this one; refused")
        if self.client_id not in survivors:
            raise SecAggError("the server lists this client as dropped, yet asks it to unmask; refused")
        if len(survivors) < self.params.threshold:
            raise SecAggError(f"only {len(survivors)} survivors, below the threshold {self.params.threshold}: "
                              f"revealing self-mask shares then could expose an update; refused")
        return survivors, dropped


# --------------------------------------------------------------------------- the server's side


class Discarded(SecAggError):
    """An unmasked sum that the survivors, had they followed the protocol, could not have sent: the round
    is discarded."""


class ServerRound:
    """The server's view of one round: public keys, ciphertexts it relays, masked vectors it sums.
    It never holds a client's unmasked update: only masked vectors, their sum, and finally Σ x_u."""

    def __init__(self, params: Params, federation_key: bytes | None = None):
        self.params, self.weighted = params, params.weighted
        self.federation_key = federation_key  # with identities: every client's keys are checked against it
        self.keys: dict[int, tuple[str, str]] = {}  # U1: id -> (c_public, s_public)
        self.signed: dict[int, dict[str, str]] = {}  # U1, with identities: id -> what <SECAGG_PEERS> relays
        self.signatures: dict[int, str] = {}  # U4: the survivors whose signature of U3 verified
        self.commitments: dict[int, bytes] = {}  # U1: id -> the commitment to its self-mask seed
        self.outbox: dict[int, dict[int, str]] = {}  # U2: u -> {v: ciphertext}
        self.total = np.zeros(params.length + 1, dtype=np.uint32)
        self.survivors: set[int] = set()  # U3
        self.counts: dict[int, int] = {}  # U3: id -> the example count its <UPDATE> says in plain text
        self.left_out: list[str] = []  # the unmasking's lines for the log: the bad shares and reveals left out

    def take_keys(self, client_id: int, message: Mapping[str, Any]) -> None:
        unb64(message["c_public"], KEY_BYTES, "c_public")
        unb64(message["s_public"], KEY_BYTES, "s_public")
        commitment = unb64(message["seed_commitment"], KEY_BYTES, "seed_commitment")
        if client_id not in self.params.participants:
            raise SecAggError(f"client {client_id} is not a participant of round {self.params.round}")
        if self.params.identities:
            self.signed[client_id] = self._check_identity(client_id, message)
        self.keys[client_id] = (message["c_public"], message["s_public"])
        self.commitments[client_id] = commitment

    def _check_identity(self, client_id: int, message: Mapping[str, Any]) -> dict[str, str]:
        """A client's signed keys, checked here as its peers will check them: a client that is not
        enrolled (or signs badly) is left out of the round now, rather than make every peer refuse it."""
        entry = message.get("identity")
        if not isinstance(entry, Mapping):
            raise SecAggError(f"client {client_id} sent no identity with its keys (the run has --federation)")
        key, certificate, signature = identity_fields(entry)
        if not ident.certified(self.federation_key, client_id, key, certificate):
            raise SecAggError(f"client {client_id}'s identity is not one this federation enrolled")
        signed = keys_message(self.params.digest(), client_id, *(unb64(message[k]) for k in ("c_public", "s_public",
                                                                                          "seed_commitment")))
        if not ident.verify(key, signature, signed):
            raise SecAggError(f"client {client_id}'s keys are not signed by its identity")
        return {"seed_commitment": message["seed_commitment"], "identity_key": entry["identity_key"],
                "certificate": entry["certificate"], "signature": entry["signature"]}

    def peers(self) -> dict[str, list[str]]:
        return {str(u): list(pair) for u, pair in sorted(self.keys.items())}

    def peers_message(self) -> dict[str, Any]:
        """<SECAGG_PEERS>: U1's public keys, and with identities what lets each client check them."""
        fields: dict[str, Any] = {"round": self.params.round, "keys": self.peers()}
        if self.params.identities:
            fields["signed"] = {str(u): entry for u, entry in sorted(self.signed.items())}
        return fields

    def take_signature(self, client_id: int, text: Any) -> None:
        """A survivor's signature of U3 and the dropped, in the consistency check: kept if it verifies."""
        identity_key = unb64(self.signed[client_id]["identity_key"])
        dropped = set(self.outbox) - self.survivors
        if not ident.verify(identity_key, unb64(text, what="signature"),
                            survivors_message(self.params.digest(), self.survivors, dropped)):
            raise SecAggError(f"client {client_id}'s signature of the survivors does not verify")
        self.signatures[client_id] = text

    def take_shares(self, client_id: int, shares: Mapping[str, Any]) -> None:
        wanted = {str(v) for v in self.keys if v != client_id}
        if set(shares) != wanted:
            raise SecAggError(f"<SECAGG_SHARES> from client {client_id} must hold one ciphertext for each other "
                              f"client of <SECAGG_PEERS> ({len(wanted)}), not {len(shares)}")
        for text in shares.values():
            unb64(text, 2 * SHARE_BYTES + 16, "a share ciphertext")
        self.outbox[client_id] = {int(v): text for v, text in shares.items()}

    def routed(self, v: int) -> dict[str, str]:
        """What client v is sent: the ciphertext every other member of U2 addressed to it."""
        return {str(u): box[v] for u, box in sorted(self.outbox.items()) if u != v}

    @property
    def sharers(self) -> list[int]:
        return sorted(self.outbox)

    def add(self, client_id: int, masked: np.ndarray, num_examples: int) -> None:
        if client_id not in self.outbox or client_id in self.survivors:
            raise SecAggError(f"a masked update from client {client_id}, which is not expected in this round")
        if masked.dtype != np.uint32 or masked.shape != (self.params.length + 1,):
            raise SecAggError(f"the masked update has {masked.shape} {masked.dtype} words, not "
                              f"({self.params.length + 1},) uint32")
        self.total += masked
        self.survivors.add(client_id)
        self.counts[client_id] = num_examples

    def unmask(self, reveals: Mapping[int, Mapping[str, Any]]) -> tuple[np.ndarray, int]:
        """The sum of the survivors' quantised updates (dequantised, weighted) and of their counts, from
        the reveals of at least t survivors, once it has passed `check_sum` (Discarded otherwise)."""
        p = self.params
        dropped = set(self.outbox) - self.survivors
        shares = self._read(reveals, dropped)
        suspects: set[int] = set()  # who sent a bad share so far: used last for the secrets that follow
        total = self.total.copy()
        for u in sorted(self.survivors):
            total -= prg(self._rebuild(u, "seed_shares", shares[u], suspects), p.length + 1)
        for u in sorted(dropped):  # its pairwise masks with the survivors did not cancel: take them out
            s_private = self._rebuild(u, "key_shares", shares[u], suspects)
            for v in self.survivors:
                mask = prg(mask_seed(s_private, unb64(self.keys[v][1], KEY_BYTES), p.round, u, v), p.length + 1)
                if v < u:  # v added +PRG(s_vu)
                    total -= mask
                else:
                    total += mask
        self.check_sum(total)
        return dequantize_sum(total[:-1], p.bits) * p.clip, int(total[-1])

    def _read(self, reveals: Mapping[int, Mapping[str, Any]], dropped: set[int]) -> dict[int, dict[int, int]]:
        """{u: {v: v's share of u's secret}} from every reveal that holds exactly the shares asked for
        (U3's seeds, the dropped clients' keys), each well formed; any other reveal is left out."""
        asked = {"seed_shares": {str(u) for u in self.survivors}, "key_shares": {str(u) for u in dropped}}
        shares: dict[int, dict[int, int]] = {u: {} for u in self.survivors | dropped}
        readable = 0
        for v, reveal in sorted(reveals.items()):
            try:
                if any(set(reveal[kind]) != owners for kind, owners in asked.items()):
                    raise SecAggError("it does not hold exactly the shares asked for")
                held = {int(u): int.from_bytes(unb64(text, SHARE_BYTES, "a share"), "big")
                        for kind in asked for u, text in reveal[kind].items()}
            except SecAggError as exc:
                self.left_out.append(f"client {v}'s reveal is left out: {exc}")
                continue
            readable += 1
            for u, share in held.items():
                shares[u][v] = share
        if readable < self.params.threshold:
            how = " in good form" if readable < len(reveals) else ""
            raise SecAggError(f"{readable} survivors revealed their shares{how}; {self.params.threshold} are needed")
        return shares

    def _rebuild(self, u: int, kind: str, shares: Mapping[int, int], suspects: set[int]) -> bytes:
        """Client u's self-mask seed or mask key from the survivors' shares of it, checked before it is
        used: the seed against the commitment u sent with its keys, the key against u's s_public. Bad
        shares are left out, using the spare ones (fedsock/shamir.py), and their senders named."""
        p = self.params

        def valid(secret: int) -> bool:
            if secret >= 2 ** (8 * KEY_BYTES):
                return False
            raw = secret.to_bytes(KEY_BYTES, "big")
            if kind == "seed_shares":
                return seed_commitment(p.round, u, raw) == self.commitments[u]
            return public_key(raw) == unb64(self.keys[u][1])

        what, against = ((f"client {u}'s self-mask seed", "the seed it committed to") if kind == "seed_shares" else
                         (f"client {u}'s mask key", "the private key of its s_public"))
        result = rebuild(shares, p.threshold, valid, suspects)
        self.left_out += [f"client {v} sent a bad share of {what}; left out" for v in sorted(result.bad)]
        suspects |= result.bad
        if result.secret is None:
            why = (f"fewer than {p.threshold} of them are good (or client {u} dealt bad ones)" if result.searched_all
                   else f"more than {(len(shares) - p.threshold) // 2} of them are bad, and {MAX_TRIES} tries of "
                        f"{p.threshold} found none that is")
            raise SecAggError(f"no {p.threshold} of the {len(shares)} shares of {what} rebuild {against}: {why}")
        return result.secret.to_bytes(KEY_BYTES, "big")

    def check_sum(self, total: np.ndarray) -> None:
        """What masking still lets the server check (Discarded otherwise): the summed count against the
        survivors' plain-text counts, and each coordinate of the sum against what their clipped updates
        allow. Poisoning within these bounds it cannot see (docs: Security model)."""
        p = self.params
        count = int(total[-1])
        expected = sum(self.counts[u] for u in self.survivors) if self.weighted else len(self.survivors)
        if count != expected:
            said = "the survivors' <UPDATE>s say so in all" if self.weighted else "each survivor counts 1, with DP"
            raise Discarded(f"the masked example counts add up to {count}, not to {expected} ({said}): a client "
                            f"masked a false count")
        # The bound, which no honest round can pass. Survivor u's quantised coordinate is an integer q
        # with |q| <= ceil(|s|), s = clip(Δ, −C, C)·(w_u / C)·2^b and w_u = n_u / W (1 with DP).
        # quantize() clips s to [−2^b, 2^b], so |q| <= 2^b, exactly; and |s| <= n_u·2^b / W but for
        # float rounding (relative 1e-15: below 1e-5 of a step even at 2^31), so |q| <= ⌊n_u·2^b / W⌋ + 2.
        # DP's noise cannot pass it either: in distributed and local mode each client adds its noise
        # before that clip; in central mode the server adds it to the sum after this check. The n_u are
        # the plain-text counts, tied to the masked ones by the check above. The bound's sum is at most
        # n·2^b < 2^31, so an honest sum never wraps in int32.
        step = 2 ** p.bits
        limit = sum(min(step, self.counts[u] * step // p.weight_bound + 2) if self.weighted else step
                    for u in self.survivors)
        sums = total[:-1].view(np.int32).astype(np.int64)
        beyond = np.flatnonzero(np.abs(sums) > limit)
        if beyond.size:
            i = int(beyond[0])
            raise Discarded(f"{beyond.size} coordinates of the sum lie beyond ±{limit * p.clip / step:.6g}, all that "
                            f"the survivors' clipped updates allow (coordinate {i} is {sums[i] * p.clip / step:.6g}): "
                            f"a client masked values outside its clip")


# --------------------------------------------------------------------------- a client across rounds

MASKED = "secagg/masked"  # the one tensor of a masked <UPDATE>: uint32, the model's coordinates + 1


def flat_delta(start: Mapping[str, Any], trained: Mapping[str, Any]) -> np.ndarray:
    """trained − start over every tensor, in layout order, as one float64 vector."""
    return np.concatenate([(trained[n].detach().cpu().double() - start[n].detach().cpu().double()).reshape(-1).numpy()
                           for n in start])


def model_length(tensors: Mapping[str, Any]) -> int:
    return sum(t.numel() for t in tensors.values())


def masked_layout(length: int) -> dict[str, Any]:
    """The weights layout of a masked update (see the protocol section)."""
    return {"byte_order": "little", "nbytes": -(-4 * (length + 1) // 64) * 64,
            "tensors": [{"name": MASKED, "dtype": "uint32", "shape": [length + 1], "offset": 0, "nbytes": 4 * (length + 1)}]}


class ClientSession:
    """What a client does for secure aggregation, message by message (fl_client.py, a simulation's
    virtual client and the tests' fakes all use it): each answer is (header, fields) or None. Its
    stages follow fedsock.order's SECURE_STAGES: a message out of that order is refused (OutOfOrder)."""

    def __init__(self, client_id: int, length: int, identity: ident.Identity | None = None, policy: Any = None):
        self.client_id, self.length = client_id, length
        self.identity = identity  # with it, this client takes part only in rounds with identities
        self.policy = policy  # fedsock.policy.Policy: what this client requires of each round, if anything
        self.stage = Order(ROLE_SECURE_CLIENT)
        self.current: ClientRound | None = None
        self.weighted = True

    def _round(self, number: Any) -> ClientRound:
        if self.current is None or self.current.params.round != number:
            raise SecAggError(f"a secure-aggregation message for round {number}, but no setup of that round came")
        return self.current

    def answer(self, message: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
        header, number = message["header"], message["round"]
        if header not in SECAGG_REQUESTS:
            raise SecAggError(f"{header} is not a secure-aggregation message")
        self.stage.receive(header)
        if header == SECAGG_SETUP:
            self.current = None
            params = Params.from_json(message, self.client_id, self.length)
            self._check_mode(params)
            if self.policy is not None:
                self.policy.check_round(params)
            self.current = ClientRound(self.client_id, params, identity=self.identity)
            self.weighted = params.weighted
            return SECAGG_KEYS, {"round": number, **self.current.advertise()}
        current = self._round(number)
        if header == SECAGG_PEERS:
            return SECAGG_SHARES, {"round": number, "shares": current.share(message["keys"], message.get("signed"))}
        if header == SECAGG_ROUTED:
            current.receive(message["shares"])
            return None
        if header == SECAGG_CHECK:
            return SECAGG_SIGNED, {"round": number,
                                   "signature": current.sign_survivors(message["survivors"], message["dropped"])}
        return SECAGG_REVEAL, {"round": number, **current.reveal(message["survivors"], message["dropped"],
                                                                 message.get("signatures"))}

    def threshold(self, number: int) -> int | None:
        """Round `number`'s threshold t, if this client was set up for it (distributed DP's noise counts t)."""
        return self.current.params.threshold if self.current and self.current.params.round == number else None

    def _check_mode(self, params: Params) -> None:
        """A client with an identity takes part only in rounds whose keys are signed (it fails closed); a
        client without one cannot take part in such a round."""
        if params.identities and self.identity is None:
            raise SecAggError("the server runs secure aggregation with identities (--federation), and this client "
                              "has none: give it --identity (python -m fedsock.enrol makes one)")
        if self.identity is not None and not params.identities:
            raise SecAggError("this client has an identity, and the server runs secure aggregation without "
                              "identities (no --federation): a server that lies could then read this client's "
                              "update; refused")

    def masked_update(self, number: int, start: Mapping[str, Any], trained: Mapping[str, Any],
                      num_examples: int) -> np.ndarray:
        """Round `number`'s update as it is sent (its <MODEL> is the stage's event): the delta, weighted,
        quantised and masked."""
        self.stage.receive(MODEL)
        current = self._round(number)
        if self.weighted and num_examples > current.params.weight_bound:
            raise SecAggError(f"this client trains on {num_examples} examples, more than the round's weight bound "
                              f"{current.params.weight_bound}")
        weight, count = (num_examples / current.params.weight_bound, num_examples) if self.weighted else (1.0, 1)
        return current.vector(flat_delta(start, trained), weight, count)


# --------------------------------------------------------------------------- the server across rounds


@dataclass
class Settings:
    """The server's secure aggregation of one run (made from the run's SecAggSettings by fedsock.prepare)."""

    threshold_fraction: float = SecAggSettings.secagg_threshold  # the flags' defaults, written once there
    clip: float = SecAggSettings.secagg_clip
    weight_bound: int = 60000  # W: the most examples a client of this run may hold
    weighted: bool = True  # False with DP: every client weighted 1
    noise_std: float = 0.0  # central DP: the server's noise on the unmasked sum (std per coordinate)
    client_noise_std: float = 0.0  # DP: the noise each client adds (its share, in distributed mode)
    stage_timeout_s: float = 60.0  # the longest a key or share stage waits (never longer than --round-timeout)
    federation_key: bytes | None = None  # --federation: clients' keys must be signed by enrolled identities


class SecureAggregation:
    """The server's secure aggregation, driven by the round engine: `setup` before the model goes out
    (keys and shares, through the client proxies), `add` as each masked update arrives, `finish`
    after the round closes (the unmasking). Drops at any stage leave the round to go on while at least
    t clients remain; `notes` says who dropped and why, and `warnings` what else the unmasking left
    out (a bad share, a malformed reveal), for the engine to report."""

    def __init__(self, settings: Settings, template: Mapping[str, Any]):
        self.settings = settings
        self.names = list(template)
        self.shapes = {n: tuple(t.shape) for n, t in template.items()}
        self.length = model_length(template)
        self.server: ServerRound | None = None
        self.proxies: dict[int, Any] = {}
        self.notes: list[tuple[int, str]] = []
        self.warnings: list[str] = []  # lines for the log that are no drop: a bad share left out

    def threshold(self, clients: int) -> int:
        return default_threshold(clients, self.settings.threshold_fraction)

    async def _ask(self, proxies: Mapping[int, Any], header: str, fields, reply: str | None) -> dict[int, Any]:
        """Send each proxy its message; the replies that came, by client id (drops are noted)."""
        import asyncio

        async def one(client_id: int, proxy):
            return await asyncio.wait_for(proxy.secagg(header, fields(client_id), reply), self.settings.stage_timeout_s)

        ids = list(proxies)
        answers = await asyncio.gather(*(one(i, proxies[i]) for i in ids), return_exceptions=True)
        out = {}
        for client_id, answer in zip(ids, answers):
            if isinstance(answer, BaseException):
                reason = ("no answer within " f"{self.settings.stage_timeout_s:g} s" if isinstance(answer, asyncio.TimeoutError)
                          else str(answer) or type(answer).__name__)
                self.notes.append((client_id, f"secure aggregation, {header}: {reason}"))
            else:
                out[client_id] = answer
        return out

    async def setup(self, number: int, proxies: Mapping[int, Any]) -> list[int]:
        """Keys and shares among the sampled clients; the ids that may send masked updates (U2), or []
        when fewer than the threshold got that far."""
        s = self.settings
        self.notes = []
        n = len(proxies)
        t = self.threshold(n)
        params = Params(number, tuple(sorted(proxies)), t, bits_for(n), s.clip, s.weight_bound if s.weighted else 1,
                        self.length, s.weighted, s.federation_key is not None)
        self.server = server = ServerRound(params, s.federation_key)
        self.proxies = dict(proxies)
        setup = params.to_json()
        keys = await self._ask(proxies, SECAGG_SETUP, lambda _: setup, SECAGG_KEYS)
        for client_id, message in keys.items():
            self._take(client_id, lambda: server.take_keys(client_id, message))
        if len(server.keys) < t:
            return []
        peers = server.peers_message()
        shares = await self._ask({i: proxies[i] for i in server.keys}, SECAGG_PEERS, lambda _: peers, SECAGG_SHARES)
        for client_id, message in shares.items():
            self._take(client_id, lambda: server.take_shares(client_id, message["shares"]))
        if len(server.outbox) < t:
            return []
        await self._ask({i: proxies[i] for i in server.sharers}, SECAGG_ROUTED,
                        lambda v: {"round": number, "shares": server.routed(v)}, None)
        return server.sharers

    def _take(self, client_id: int, action) -> None:
        try:
            action()
        except (SecAggError, KeyError, TypeError) as exc:
            self.notes.append((client_id, f"secure aggregation: {exc}"))
            self.proxies.pop(client_id, None)

    def add(self, client_id: int, tensors: Mapping[str, Any], num_examples: int) -> None:
        """A masked update, with the example count its <UPDATE> says in plain text."""
        masked = tensors[MASKED]
        self.server.add(client_id, masked.numpy() if hasattr(masked, "numpy") else np.asarray(masked), num_examples)

    async def finish(self, current: Mapping[str, Any], denominator: float, generator=None) -> dict[str, Any] | str:
        """Unmask the round: the new aggregate (current weights + the mean delta), or why it failed."""
        import torch

        server = self.server
        survivors = sorted(server.survivors)
        dropped = sorted(set(server.outbox) - server.survivors)
        if len(survivors) < server.params.threshold:
            return f"{len(survivors)} masked updates, below the threshold {server.params.threshold}"
        ask: dict[str, Any] = {"round": server.params.round, "survivors": survivors, "dropped": dropped}
        revealers = [i for i in survivors if i in self.proxies]
        if server.params.identities:  # the consistency check: t survivors sign the same U3, or none reveals
            signed = await self._ask({i: self.proxies[i] for i in revealers}, SECAGG_CHECK, lambda _: ask,
                                     SECAGG_SIGNED)
            for client_id, message in signed.items():
                self._take(client_id, lambda: server.take_signature(client_id, message["signature"]))
            if len(server.signatures) < server.params.threshold:
                return (f"{len(server.signatures)} survivors signed the survivor set, below the threshold "
                        f"{server.params.threshold}")
            ask["signatures"] = {str(i): text for i, text in sorted(server.signatures.items())}
            revealers = sorted(server.signatures)
        reveals = await self._ask({i: self.proxies[i] for i in revealers if i in self.proxies}, SECAGG_UNMASK,
                                  lambda _: ask, SECAGG_REVEAL)
        try:
            weighted, total = server.unmask(reveals)
        except Discarded as exc:
            return f"the unmasked sum is discarded: {exc}"
        except (SecAggError, KeyError, TypeError, AttributeError) as exc:
            return f"unmasking failed: {exc}"
        finally:
            self.warnings += server.left_out
        if self.settings.weighted:
            mean = weighted * (server.params.weight_bound / max(total, 1))
        else:
            if self.settings.noise_std > 0:  # central DP: the noise goes on the sum, here
                noise = torch.normal(0.0, self.settings.noise_std, size=(len(weighted),), generator=generator,
                                     dtype=torch.float64).numpy()
                weighted = weighted + noise
            mean = weighted / denominator
        out, offset = {}, 0
        for name in self.names:
            base = current[name]
            count = base.numel()
            step = torch.from_numpy(mean[offset:offset + count].reshape(self.shapes[name]))
            out[name] = (base.double() + step).to(base.dtype)
            offset += count
        return out
