"""A server that lies, against an honest client (issue 23's attacks 1 to 4), and what stops it.

The hostile server is a test double: a raw socket in a thread of this process (test_client_side's
FakeServer) that speaks the protocol, plays the round's other clients itself with their real
client sessions, and tells one lie. The honest client is fl_client.py's main over a real socket
(tests/support.py's InProcessClient), with its identity from a federation made here. Each case
ends with the client's one line, a non-zero exit and an <ERROR> to the server; a control case
shows that the double, telling no lie, takes the client through a whole secure round with
identities, so that each refusal is the answer to the one lie.

1. Key substitution: keys the server made, put in a peer's place (under that peer's real,
   public certificate, or under an identity of its own).
2. Different survivors for different clients: the consistency check (and, in-process, the exact
   collusion bound, at the bound and one past it).
3. Replays and skipped stages: a second <SECAGG_PEERS>, an unmask before the model, an unmask
   without the consistency check.
4. Protection switched off: a client's privacy policy against a welcome or a round that offers
   less (no secure aggregation, none with identities, no DP, central DP, too little noise, too
   few clients, too low a threshold, an epsilon past the client's limit).
"""

from __future__ import annotations

import re
import socket

import numpy as np
import pytest
import torch

from test_client_side import (CLIENT_EXIT_S, CLIENT_ID, FakeServer, assert_one_line_error, client_of, logreg_weights,
                              metadata_frame, model_frames, recv_frame)

from fedsock import identity as ident
from fedsock import secagg as sa
from fedsock import shamir
from fedsock.privacy import Accountant
from socket_methods import encode_message

LAYOUT, BLOB = logreg_weights()
LENGTH = sum(t["nbytes"] // 4 for t in LAYOUT["tensors"])  # logreg's coordinates (float32)
START = {"w": torch.zeros(LENGTH)}  # what the double's own clients "train": no change


class Federation:
    """A federation key and its enrolled identities, made here as python -m fedsock.enrol would."""

    def __init__(self):
        self.private, self.public = ident.new_key()
        self.identities: dict[int, ident.Identity] = {}

    def identity(self, client_id: int) -> ident.Identity:
        return self.identities.setdefault(client_id, ident.issue(self.private, client_id))

    def file(self, tmp_path, client_id: int = CLIENT_ID) -> str:
        path = tmp_path / f"client-{client_id}.identity"
        ident.write_private(path, self.identity(client_id).to_json())
        return str(path)


FED = Federation()


class SecureRound:
    """What the hostile double needs to take the real client (id 1) through a secure round: the other
    clients' sessions (it plays them honestly), the server's round, and the real client's socket."""

    def __init__(self, server: FakeServer, sock: socket.socket, n: int = 3, threshold: int = 2,
                 identities: bool = True):
        self.server, self.sock = server, sock
        self.params = sa.Params(1, tuple(range(1, n + 1)), threshold, sa.bits_for(n), 10.0, 30000, LENGTH, True,
                                identities)
        self.others = {i: sa.ClientSession(i, LENGTH, FED.identity(i) if identities else None) for i in range(2, n + 1)}
        self.round = sa.ServerRound(self.params, FED.public if identities else None)

    def ask(self, header: str, **fields) -> dict | None:
        """Send the real client one message; its answer (None: it sent nothing more before closing)."""
        self.sock.sendall(encode_message(header, **fields))
        return self.server.message(self.sock)

    def welcome(self, **changes) -> None:
        self.sock.sendall(metadata_frame(secure_aggregation=True, identities=self.params.identities,
                                         num_clients=len(self.params.participants), **changes))
        ready = self.server.message(self.sock)
        assert ready is not None and ready["header"] == "<READY>", ready

    def keys(self, setup: dict | None = None) -> dict:
        """<SECAGG_SETUP> to everyone (`setup`: another one for the real client); their keys, taken."""
        answer = self.ask("<SECAGG_SETUP>", **(setup or self.params.to_json()))
        assert answer is not None and answer["header"] == "<SECAGG_KEYS>", answer
        if setup is None:
            self.round.take_keys(CLIENT_ID, answer)
        else:  # its signature covers the other setup: the lying server relays it unchecked
            self.round.keys[CLIENT_ID] = (answer["c_public"], answer["s_public"])
            self.round.signed[CLIENT_ID] = {"seed_commitment": answer["seed_commitment"], **answer["identity"]}
        for i, session in self.others.items():
            self.round.take_keys(i, session.answer({"header": "<SECAGG_SETUP>", **self.params.to_json()})[1])
        return answer

    def shares(self, peers: dict | None = None) -> dict | None:
        """<SECAGG_PEERS> (`peers`: another one for the real client), and everyone's shares, taken."""
        honest = self.round.peers_message()
        answer = self.ask("<SECAGG_PEERS>", **(peers or honest))
        if answer is None or answer["header"] != "<SECAGG_SHARES>":
            return answer
        self.round.take_shares(CLIENT_ID, answer["shares"])
        for i, session in self.others.items():
            self.round.take_shares(i, session.answer({"header": "<SECAGG_PEERS>", **honest})[1]["shares"])
        return answer

    def route(self) -> None:
        self.sock.sendall(encode_message("<SECAGG_ROUTED>", round=1, shares=self.round.routed(CLIENT_ID)))
        for i, session in self.others.items():
            session.answer({"header": "<SECAGG_ROUTED>", "round": 1, "shares": self.round.routed(i)})

    def train(self) -> None:
        """The <MODEL>; the real client's masked <UPDATE>, and the others' (no change, 100 examples each)."""
        self.sock.sendall(model_frames(LAYOUT, BLOB))
        update = self.server.message(self.sock)
        assert update is not None and update["header"] == "<UPDATE>", update
        masked = np.frombuffer(recv_frame(self.sock), dtype="<u4")[:LENGTH + 1].copy()
        self.round.add(CLIENT_ID, masked, update["num_examples"])
        for i, session in self.others.items():
            self.round.add(i, session.masked_update(1, START, START, 100), 100)

    def until_masked(self) -> None:
        """The honest round, up to the real client's masked update."""
        self.welcome()
        self.keys()
        self.shares()
        self.route()
        self.train()

    def check(self, survivors: list[int], dropped: list[int]) -> dict | None:
        """<SECAGG_CHECK> to the real client, and the others' signatures of the same set."""
        ask = {"round": 1, "survivors": survivors, "dropped": dropped}
        answer = self.ask("<SECAGG_CHECK>", **ask)
        for i, session in self.others.items():
            if i in survivors:
                self.round.take_signature(i, session.answer({"header": "<SECAGG_CHECK>", **ask})[1]["signature"])
        if answer is not None and answer["header"] == "<SECAGG_SIGNED>":
            self.round.take_signature(CLIENT_ID, answer["signature"])
        return answer

    def finish(self) -> None:
        self.sock.sendall(encode_message("<FINISHED>", completed=True, rounds_completed=1, message="training finished"))


def hostile(tmp_path, script, *flags: str, identity: bool = True):
    """The double running `script(SecureRound)` against the real client; both, for the test to read."""
    def serve(server: FakeServer, sock: socket.socket) -> None:
        script(SecureRound(server, sock, identities=identity))

    server = FakeServer(serve)
    args = ["--connect-timeout", "10", *(["--identity", FED.file(tmp_path)] if identity else []), *flags]
    return server, client_of(server, *args)


def refused(server: FakeServer, client, pattern: str, status: int = 1, trained: bool = False) -> None:
    """The client's one line, its exit status, and its <ERROR> that told the server why."""
    if trained:  # the refusal comes after a round the client rightly trained in
        code = client.finish(timeout=CLIENT_EXIT_S)
        errors = [line for line in client.lines if line.startswith("fl_client.py: error: ")]
        assert code == status and len(errors) == 1 and re.search(pattern, errors[0]), client.output
        assert "Traceback" not in client.output
    else:
        assert_one_line_error(client, status, pattern)
    server.finish()
    assert server.headers()[-1] == "<ERROR>", server.headers()


# --------------------------------------------------------------------------- the control case


def test_an_honest_double_takes_the_client_through_a_round_with_identities(tmp_path):
    reveal = {}

    def script(r: SecureRound) -> None:
        r.until_masked()
        answer = r.check([1, 2, 3], [])
        assert answer["header"] == "<SECAGG_SIGNED>", answer
        signatures = {str(i): text for i, text in r.round.signatures.items()}
        reveal.update(r.ask("<SECAGG_UNMASK>", round=1, survivors=[1, 2, 3], dropped=[], signatures=signatures))
        reveals = {CLIENT_ID: reveal, **{i: s.answer({"header": "<SECAGG_UNMASK>", "round": 1, "survivors": [1, 2, 3],
                                                       "dropped": [], "signatures": signatures})[1]
                                         for i, s in r.others.items()}}
        r.round.unmask(reveals)  # the sum is one update and two zeros: it passes the server's checks
        r.finish()

    server, client = hostile(tmp_path, script)
    assert client.finish(timeout=CLIENT_EXIT_S) == 0, client.output
    server.finish()
    assert reveal["header"] == "<SECAGG_REVEAL>"
    client.wait_for(r"privacy policy: requires secure aggregation with enrolled identities")


# --------------------------------------------------------------------------- attack 1: substituted keys


def substituted(r: SecureRound, peer: int, forge_identity: bool) -> dict:
    """The <SECAGG_PEERS> a lying server sends the real client: `peer`'s keys made by the server, signed
    with an identity key of the server's (under `peer`'s real certificate, or its own federation's)."""
    message = r.round.peers_message()
    c_private, c_public = sa.new_keypair()
    s_private, s_public = sa.new_keypair()
    seed_commitment = sa.unb64(message["signed"][str(peer)]["seed_commitment"])
    key, key_public = ident.new_key()
    entry = dict(message["signed"][str(peer)])
    if forge_identity:
        own_federation, _ = ident.new_key()
        entry["identity_key"] = sa.b64(key_public)
        entry["certificate"] = sa.b64(ident.certify(own_federation, peer, key_public))
    entry["signature"] = sa.b64(ident.sign(key, sa.keys_message(r.params.digest(), peer, c_public, s_public,
                                                                 seed_commitment)))
    message["keys"][str(peer)] = [sa.b64(c_public), sa.b64(s_public)]
    message["signed"][str(peer)] = entry
    return message


@pytest.mark.parametrize("forge_identity, error", [
    (False, r"<SECAGG_PEERS> holds keys for client 2 that client 2 did not sign for this round's setup: the server "
            r"may be substituting them; refused"),
    (True, r"<SECAGG_PEERS> gives client 2 an identity that this federation did not enrol"),
], ids=["under the peer's certificate", "under a forged identity"])
def test_attack_1_keys_the_server_made_are_refused(tmp_path, forge_identity, error):
    def script(r: SecureRound) -> None:
        r.welcome()
        r.keys()
        r.shares(substituted(r, 2, forge_identity))

    server, client = hostile(tmp_path, script)
    refused(server, client, error)
    assert "<SECAGG_SHARES>" not in server.headers(), "the client shared its secrets with the server's keys"


def test_attack_1_a_setup_told_differently_to_one_client_is_caught_by_the_signatures(tmp_path):
    """Another threshold for the real client than for its peers: their signatures cover the setup they saw."""
    def script(r: SecureRound) -> None:
        r.welcome()
        r.keys({**r.params.to_json(), "threshold": 3})
        r.shares()

    server, client = hostile(tmp_path, script)
    refused(server, client, r"holds keys for client 2 that client 2 did not sign for this round's setup")


def test_without_identities_a_client_cannot_tell_substituted_keys(tmp_path):
    """The honest-but-curious protocol (no --federation, no --identity) has nothing to check a key against:
    the client shares with the server's keys. This is what identities are for (the README's threat model)."""
    def script(r: SecureRound) -> None:
        r.welcome()
        r.keys()
        message = r.round.peers_message()
        message["keys"]["2"] = [sa.b64(sa.new_keypair()[1]), sa.b64(sa.new_keypair()[1])]
        answer = r.ask("<SECAGG_PEERS>", **message)
        assert answer["header"] == "<SECAGG_SHARES>", answer
        r.finish()

    server, client = hostile(tmp_path, script, identity=False)
    assert client.finish(timeout=CLIENT_EXIT_S) == 0, client.output
    server.finish()


# --------------------------------------------------------------------------- attack 2: split survivors


def test_attack_2_an_unmask_without_enough_signatures_of_the_same_survivors_is_refused(tmp_path):
    """The real client signs survivors {1, 2, 3}; its peers were told, and signed, another set."""
    def script(r: SecureRound) -> None:
        r.until_masked()
        r.sock.sendall(encode_message("<SECAGG_CHECK>", round=1, survivors=[1, 2, 3], dropped=[]))
        signed = r.server.message(r.sock)
        elsewhere = r.others[2].answer({"header": "<SECAGG_CHECK>", "round": 1, "survivors": [1, 2], "dropped": [3]})
        r.ask("<SECAGG_UNMASK>", round=1, survivors=[1, 2, 3], dropped=[],
              signatures={"1": signed["signature"], "2": elsewhere[1]["signature"]})

    server, client = hostile(tmp_path, script)
    refused(server, client, r"only 1 survivors signed the survivor set this client was told; 2 are needed: the server "
                            r"may have told clients different sets; refused", trained=True)
    assert "<SECAGG_REVEAL>" not in server.headers()


def test_attack_2_an_unmask_of_other_survivors_than_signed_is_refused(tmp_path):
    def script(r: SecureRound) -> None:
        r.until_masked()
        r.check([1, 2, 3], [])
        signatures = {str(i): text for i, text in r.round.signatures.items()}
        r.ask("<SECAGG_UNMASK>", round=1, survivors=[1, 2], dropped=[3], signatures=signatures)

    server, client = hostile(tmp_path, script)
    refused(server, client, r"asks to unmask other survivors than those this client signed", trained=True)


def split_attack(n: int, t: int, colluders: int) -> tuple[bool, list[str]]:
    """In-process: a server with `colluders` colluding clients tries to unmask client 1 (honest) by telling
    half the honest clients "1 survived" (they reveal its self-mask seed's shares) and the other half
    "1 dropped" (they reveal its mask key's shares), the split that needs fewest colluders. It gets
    both secrets only if both halves reveal. (Whether it recovers the update, or the honest clients
    refuse.) The colluders sign both sets and reveal everything they hold."""
    public, ids_of = FED.public, {i: FED.identity(i) for i in range(1, n + 1)}
    params = sa.Params(1, tuple(range(1, n + 1)), t, sa.bits_for(n), 1.0, 1, 8, False, True)
    sessions = {i: sa.ClientSession(i, 8, ids_of[i]) for i in range(1, n + 1)}
    server = sa.ServerRound(params, public)
    setup = {"header": "<SECAGG_SETUP>", **params.to_json()}
    for i, s in sessions.items():
        server.take_keys(i, s.answer(setup)[1])
    peers = {"header": "<SECAGG_PEERS>", **server.peers_message()}
    for i, s in sessions.items():
        server.take_shares(i, s.answer(peers)[1]["shares"])
    for i, s in sessions.items():
        s.answer({"header": "<SECAGG_ROUTED>", "round": 1, "shares": server.routed(i)})
    update = np.linspace(-0.5, 0.5, 8)
    masked = {i: s.masked_update(1, {"w": torch.zeros(8)}, {"w": torch.from_numpy(update if i == 1 else np.zeros(8))},
                                 1) for i, s in sessions.items()}
    colluding = set(range(n - colluders + 1, n + 1))
    honest = [i for i in range(1, n + 1) if i not in colluding]
    need = t - colluders  # honest revealers each half needs
    group_a = honest[:max(need, 1)]  # told "client 1 survived"; client 1 is among them
    group_b = honest[len(group_a):]  # told "client 1 dropped"
    everyone = set(range(1, n + 1))
    view_a = (sorted(everyone), [])
    view_b = (sorted(everyone - {1}), [1])
    refusals, seed_shares, key_shares = [], {}, {}
    for group, (survivors, dropped) in ((group_a, view_a), (group_b, view_b)):
        check = {"header": "<SECAGG_CHECK>", "round": 1, "survivors": survivors, "dropped": dropped}
        signatures = {str(i): sessions[i].answer(check)[1]["signature"] for i in group}
        for c in colluding:  # a colluder signs whatever it is asked to: its session is the server's
            signatures[str(c)] = sa.b64(ident.sign(ids_of[c].private_key,
                                                   sa.survivors_message(params.digest(), survivors, dropped)))
        unmask = {**check, "header": "<SECAGG_UNMASK>", "signatures": signatures}
        for i in group:
            try:
                reveal = sessions[i].answer(unmask)[1]
            except sa.SecAggError as exc:
                refusals.append(str(exc))
                continue
            seed_shares.update({i: int.from_bytes(sa.unb64(reveal["seed_shares"]["1"]), "big")} if "1" in reveal["seed_shares"] else {})
            key_shares.update({i: int.from_bytes(sa.unb64(reveal["key_shares"]["1"]), "big")} if "1" in reveal["key_shares"] else {})
    for c in colluding:  # everything a colluder holds of client 1
        key_share, seed_share = sessions[c].current.held[1]
        seed_shares[c], key_shares[c] = seed_share, key_share
    if len(seed_shares) < t or len(key_shares) < t:
        return False, refusals
    seed = shamir.rebuild(seed_shares, t, lambda s: True, set()).secret.to_bytes(32, "big")
    s_private = shamir.rebuild(key_shares, t, lambda s: True, set()).secret.to_bytes(32, "big")
    words = masked[1] - sa.prg(seed, 9)
    for v in range(2, n + 1):  # client 1's pairwise masks, from its key and the peers' public keys
        mask = sa.prg(sa.mask_seed(s_private, sa.unb64(server.keys[v][1]), 1, 1, v), 9)
        words -= mask  # client 1 < v added +PRG(s_1v)
    recovered = sa.dequantize_sum(words[:-1], params.bits) * params.clip
    return bool(np.allclose(recovered, update, atol=2 ** -params.bits * 2)), refusals


@pytest.mark.parametrize("n, t", [(3, 2), (5, 4), (10, 7)])
def test_attack_2_the_collusion_bound_is_exact(n, t):
    """The server with c colluders unmasks one client iff c >= 2t - n (the README's bound): at the
    bound's last safe count every honest client told the minority's set refuses, and both secrets are
    out of reach; one colluder more and the update comes out exactly. t is the default threshold."""
    assert sa.default_threshold(n, 2 / 3) == t
    safe = 2 * t - n - 1
    if safe >= 0:
        recovered, refusals = split_attack(n, t, safe)
        assert not recovered
        assert refusals and all("survivors signed the survivor set this client was told" in r for r in refusals)
    recovered, _ = split_attack(n, t, safe + 1)
    assert recovered


# --------------------------------------------------------------------------- attack 3: replays and skipped stages


@pytest.mark.parametrize("lie, error", [
    ("second peers", r"<SECAGG_PEERS> is not expected when the client is in state shared"),
    ("unmask before the model", r"<SECAGG_UNMASK> is not expected when the client is in state routed"),
    ("unmask without the check", r"asks to unmask other survivors than those this client signed in the consistency "
                                 r"check \(or skipped the check\)"),
    ("a second check", r"<SECAGG_CHECK> is not expected when the client is in state checked"),
])
def test_attack_3_out_of_order_stages_are_refused(tmp_path, lie, error):
    def script(r: SecureRound) -> None:
        r.welcome()
        r.keys()
        r.shares()
        if lie == "second peers":  # the client would share again under the same key and nonce
            r.ask("<SECAGG_PEERS>", **r.round.peers_message())
            return
        r.route()
        if lie == "unmask before the model":
            r.ask("<SECAGG_UNMASK>", round=1, survivors=[1, 2, 3], dropped=[])
            return
        r.train()
        if lie == "unmask without the check":
            r.ask("<SECAGG_UNMASK>", round=1, survivors=[1, 2, 3], dropped=[], signatures={})
            return
        r.check([1, 2, 3], [])
        r.ask("<SECAGG_CHECK>", round=1, survivors=[1, 2], dropped=[3])

    server, client = hostile(tmp_path, script)
    refused(server, client, error, trained=lie in ("unmask without the check", "a second check"))
    assert "<SECAGG_REVEAL>" not in server.headers()


# --------------------------------------------------------------------------- attack 4: protection switched off


@pytest.mark.parametrize("flags, identity, welcome, error", [
    (["--require-secure-aggregation"], False, dict(secure_aggregation=False),
     r"this client requires secure aggregation, and the server does not run it"),
    (["--min-round-clients", "3"], False, dict(secure_aggregation=False), r"requires secure aggregation"),
    ([], True, dict(secure_aggregation=False), r"requires secure aggregation"),
    ([], True, dict(identities=False),
     r"this client has an identity, and the server runs secure aggregation without identities"),
    (["--require-dp"], True, dict(), r"requires DP noise that it adds itself \(local or distributed\), and the server "
                                     r"runs no DP"),
    (["--require-dp"], False, dict(dp_mode="central", dp_noise_multiplier=1.0),
     r"the server runs central DP, noise the server adds itself, which this client cannot check"),
    (["--min-noise-multiplier", "1.0"], False, dict(dp_mode="local", dp_noise_multiplier=0.5),
     r"the server's DP noise multiplier 0\.5 is below this client's --min-noise-multiplier 1"),
], ids=["no secure aggregation", "min clients without secure aggregation", "an identity without secure aggregation",
        "no identities", "no DP", "central DP", "too little noise"])
def test_attack_4_a_welcome_that_offers_less_is_refused(tmp_path, flags, identity, welcome, error):
    def script(r: SecureRound) -> None:
        r.sock.sendall(metadata_frame(**{"secure_aggregation": True, "identities": True, **welcome}))

    server, client = hostile(tmp_path, script, *flags, identity=identity)
    refused(server, client, r"this client's privacy policy refuses the run: .*" + error)
    assert server.headers() == ["<HELLO>", "<ERROR>"], "the client got ready for a run its policy refuses"


@pytest.mark.parametrize("flags, setup, error", [
    (["--min-round-clients", "4"], {}, r"round 1 has 3 clients, fewer than this client's --min-round-clients 4"),
    (["--min-threshold", "3"], {}, r"round 1 has threshold 2, below this client's --min-threshold 3"),
])
def test_attack_4_a_round_that_breaks_the_policy_is_refused(tmp_path, flags, setup, error):
    def script(r: SecureRound) -> None:
        r.welcome()
        r.ask("<SECAGG_SETUP>", **r.params.to_json())

    server, client = hostile(tmp_path, script, *flags)
    refused(server, client, r"this client's privacy policy refuses the run: .*" + error)
    assert "<SECAGG_KEYS>" not in server.headers()


def dp_model(number: int, clip: float, std: float) -> bytes:
    return model_frames(LAYOUT, BLOB, number=number, dp_clip=clip, dp_noise_std=std)


def local_dp_rounds(r: SecureRound, models: list[bytes]) -> None:
    """A run with local DP (no secure aggregation): each <MODEL> in turn, each <UPDATE> read."""
    r.sock.sendall(metadata_frame(dp_mode="local", dp_noise_multiplier=1.0))
    assert r.server.message(r.sock)["header"] == "<READY>"
    for frames in models:
        r.sock.sendall(frames)
        update = r.server.message(r.sock)
        if update is None or update["header"] != "<UPDATE>":
            return
        recv_frame(r.sock)
        r.sock.sendall(encode_message("<SUCCESS>", round=update["round"], accepted=True, message="ok"))
    r.finish()


@pytest.mark.parametrize("std, error", [
    (0.0, r"round 1's <MODEL> asks this client to add no DP noise; its policy requires it"),
    (0.4, r"round 1's noise multiplier is 0\.4, below this client's --min-noise-multiplier 1"),
], ids=["no noise", "less noise than the welcome said"])
def test_attack_4_a_model_with_less_noise_than_required_is_refused(tmp_path, std, error):
    def script(r: SecureRound) -> None:
        local_dp_rounds(r, [dp_model(1, 1.0, std)])

    server, client = hostile(tmp_path, script, "--min-noise-multiplier", "1", identity=False)
    refused(server, client, r"this client's privacy policy refuses the run: .*" + error)
    assert "<UPDATE>" not in server.headers(), "the client trained without the noise it requires"


def test_attack_4_a_client_leaves_before_its_epsilon_passes_its_limit(tmp_path):
    """Its own count: one round of local DP with multiplier 2 spends e1, two spend e2 > e1; with a limit
    between them the client trains round 1 and refuses round 2, before training."""
    one, two = (Accountant(1e-5, "none", [[2.0, 1, 1, 1.0]] * k).epsilon() for k in (1, 2))
    limit = (one + two) / 2

    def script(r: SecureRound) -> None:
        local_dp_rounds(r, [dp_model(1, 1.0, 2.0), dp_model(2, 1.0, 2.0)])

    server, client = hostile(tmp_path, script, "--max-epsilon", f"{limit:.6f}", identity=False)
    refused(server, client, rf"round 2 would bring this client's epsilon to {two:.3g}, past its --max-epsilon "
                            rf"{limit:g}; it leaves the run", trained=True)
    assert server.headers().count("<UPDATE>") == 1
    client.wait_for(rf"round 1: trained .*DP noise multiplier 2, its epsilon {one:.3g} of {limit:g}")
