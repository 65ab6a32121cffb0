"""docs/reference/protocol.md against the code, so that the two cannot drift apart: its field table
against socket_methods.MESSAGES, its order tables against fedsock/order.py, every error text it
quotes against the code that produces it, its links; and, over real sockets, what a server
answers that the document promises (another protocol version, TLS spoken to a plain server,
plain TCP to a TLS server)."""

from __future__ import annotations

import re
import socket
import ssl
from pathlib import Path

import pytest
import torch

from conftest import ROOT, FAST
from fedsock import order
from fedsock.clients import ClientPool
from fedsock.order import CONVERSATION, SECURE_STAGES, Order, ROLE_SERVER
from socket_methods import (BadMessage, BadWeights, FrameReader, ProtocolError, check_confusion, check_layout,
                            decode_message, encode_message, weights_layout, MESSAGES, PRE_AUTH_CONTROL_BYTES)
from test_order import READY_AT, walk

DOC_PATH = ROOT / "docs" / "reference" / "protocol.md"
DOC = DOC_PATH.read_text()
TYPE_NAMES = {int: "integer", float: "number", str: "string", bool: "boolean", dict: "object", list: "list"}
IO_TIMEOUT_S = 30


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def between(name: str) -> str:
    start = DOC.index(f"<!-- {name} start")
    start = DOC.index("\n", start) + 1
    return DOC[start:DOC.index(f"<!-- {name} end -->")]


def quoted(name: str) -> list[str]:
    """The error texts of one table: the first `code` of each row's last cell."""
    rows = [cells(line) for line in between(name).splitlines()[2:]]  # after the header and its rule
    return [re.search(r"`([^`]*)`", row[-1]).group(1) for row in rows]


# --------------------------------------------------------------------------- tables


def test_every_message_field_is_documented_with_its_type_and_range():
    rows = [cells(line) for line in between("protocol fields:").splitlines() if line.startswith("| `<")]
    documented = {(row[0].strip("`"), row[1].strip("`")): row for row in rows}
    in_code = {(header, name) for header, fields in MESSAGES.items() for name in fields}
    assert set(documented) == in_code, (f"missing from the document: {sorted(in_code - set(documented))}; "
                                        f"not in the code: {sorted(set(documented) - in_code)}")
    for (header, name), (_, _, kind, accepted, meaning) in documented.items():
        spec = MESSAGES[header][name]
        expected_kind = (TYPE_NAMES[spec.kind] + (f" of {TYPE_NAMES[spec.items]}s" if spec.items else "")
                         + (" or null" if spec.nullable else "") + (", optional" if spec.optional else ""))
        assert kind == expected_kind, f"{header} {name}: the document says {kind!r}, the code {expected_kind!r}"
        assert accepted == spec.range_text(), f"{header} {name}: the document says {accepted!r}, the code {spec.range_text()!r}"
        assert meaning, f"{header} {name} has no meaning in the document"
    assert list(dict.fromkeys(row[0].strip("`") for row in rows)) == list(MESSAGES), "not in the code's order"


@pytest.mark.parametrize("name, table, meaning", [
    ("protocol order:", CONVERSATION, order.MEANING), ("secure aggregation order:", SECURE_STAGES, order.STAGE_MEANING)])
def test_the_order_tables_are_the_code_s(name, table, meaning):
    assert between(name).strip() == order.markdown(table, meaning)


@pytest.mark.parametrize("after", ["## Order of messages", "### Order of one secure round"])
def test_the_diagrams_are_legal_paths_through_the_table(after):
    start = DOC.index("```", DOC.index(after)) + 3
    steps = []
    for line in DOC[start:DOC.index("```", start)].splitlines():
        if "---" in line:
            steps.append(("server" if "<--" in line else "client", re.search(r"<[A-Z_]+>", line).group(0)))
    if after == "### Order of one secure round":
        steps = READY_AT + steps
    assert len(steps) > 8
    walk(steps)


# --------------------------------------------------------------------------- the error texts it quotes

JSON_ERRORS = [  # one payload for each row of the "json" table, in its order
    b'{"header": "<WAITING>", "message": "\xff"}',
    b'{"header": "<HELLO>", "protocol_version": NaN}',
    b'{"header": "<HELLO>", "protocol_version": 1e999}',
    b'{"header": "<WAITING>", "message": "a"',
    b"[" * 100000,
    b'["<HELLO>"]',
    b'{"message": "hi"}',
    b'{"header": "<HELLO!>"}',
    b'{"header": "<HELLO>", "protocol_version": 3, "client_id": 3}',
    b'{"header": "<HELLO>", "protocol_version": true, "client_id": 3, "features": []}',
    b'{"header": "<READY>", "num_examples": 0, "test_examples": 0}',
    b'{"header": "<ERROR>", "message": "' + b"x" * 4097 + b'"}',
    b'{"header": "<HELLO>", "protocol_version": 3, "client_id": 3, "features": [1]}',
    b'{"header": "<HELLO>", "protocol_version": 3, "client_id": 3, "features": [], "policy": {"identity": false, '
    b'"secure_aggregation": false, "min_round_clients": null, "min_threshold": null, "min_noise_multiplier": null, '
    b'"max_epsilon": null, "delta": null}}',
]


def refusal(payload: bytes) -> str:
    with pytest.raises(BadMessage) as refused:
        decode_message(payload)
    return str(refused.value)


def test_the_json_errors_it_quotes_are_the_code_s():
    texts = quoted("protocol errors: json")
    assert len(texts) == len(JSON_ERRORS)
    for text, payload in zip(texts, JSON_ERRORS):
        got = refusal(payload)
        assert got.startswith(text) if text.endswith(": ") else got == text, (text, got)


def layout_refusal(received) -> str:
    with pytest.raises(BadWeights) as refused:
        check_layout(received, LOGREG)
    return str(refused.value)


LOGREG = weights_layout({"linear.weight": torch.zeros(10, 784), "linear.bias": torch.zeros(10)})


def entry(tensor: str, **changes) -> dict:
    return {**LOGREG, "tensors": [{**t, **changes} if t["name"] == tensor else t for t in LOGREG["tensors"]]}


def test_the_layout_errors_it_quotes_are_the_code_s():
    weight, bias = LOGREG["tensors"]
    cases = [
        {"byte_order": "little", "nbytes": 64, "tensors": "linear.weight"},
        {**LOGREG, "codec": "zstd"},
        entry("linear.weight", name="linear.evil"),
        entry("linear.bias", scale=2.0),
        entry("linear.bias", dtype="float64", nbytes=80),
        {**LOGREG, "nbytes": 31488},
        {**LOGREG, "tensors": [bias, weight]},
    ]
    texts = quoted("protocol errors: layout")
    assert len(texts) == len(cases)
    for text, case in zip(texts, cases):
        assert layout_refusal(case) == text


def source(*paths: str) -> str:
    """The code's text with adjacent string literals joined, as Python joins them ("a" f"b" -> "ab")."""
    text = "\n".join((ROOT / p).read_text() for p in paths)
    return re.sub(r'"\s*\n\s*f?"', "", text)


def from_template(template: str, text: str, where: str) -> None:
    """`text` is what the f-string `template` (as written in the code) gives, and the code has it."""
    assert template in where, f"the code no longer says: {template}"
    pattern = "".join(".+?" if part.startswith("{") else re.escape(part)
                      for part in re.split(r"(\{[^{}]*\})", template))
    assert re.fullmatch(pattern, text), f"{text!r} is not what {template!r} gives"


def test_the_server_errors_it_quotes_are_the_code_s():
    lobby = source("fedsock/lobby.py", "fedsock/transport.py")
    texts = quoted("protocol errors: server")
    pool = ClientPool(5)
    server = Order(ROLE_SERVER)
    for event in ("<HELLO>", "<METADATA>", "<READY>"):
        (server.receive if event in ("<HELLO>", "<READY>") else server.send)(event)

    def too_long() -> str:
        reader = FrameReader()
        reader.expect_message(PRE_AUTH_CONTROL_BYTES)
        reader.buffer()[:8] = (70000).to_bytes(8, "big")
        with pytest.raises(ProtocolError) as refused:
            reader.advance(8)
        return str(refused.value)

    def out_of_order() -> str:
        with pytest.raises(ProtocolError) as refused:
            server.receive("<UPDATE>")
        return str(refused.value)

    def confusion() -> str:
        with pytest.raises(BadMessage) as refused:
            check_confusion([[1]], 10)
        return str(refused.value)

    pool.joined(type("Proxy", (), {"client_id": 3})())
    def latecomer() -> str:
        pool.training_started = True
        return pool.refusal(4, 2, 5)

    produced = {2: lambda: pool.refusal(9, 2, 5), 3: lambda: pool.refusal(3, 2, 5), 4: latecomer, 7: out_of_order,
                14: confusion, 15: too_long}
    templates = {  # as the code writes them
        0: "protocol version {hello['protocol_version']} is not supported; this server speaks {PROTOCOL_VERSION} "
           "(update the client)",
        1: "authentication failed for client id {client_id}",
        5: "this run needs the client features {', '.join(missing)}, which this client does not have (update it)",
        6: "no complete handshake within {self.handshake_timeout_s:g} s",
        8: "update for round {number}, but this client was sent round {self.asked_round}",
        9: "update carries client id {update['client_id']}, but this connection is client {self.client_id}",
        10: "num_examples {update['num_examples']} is outside 1..{self.num_examples} (the examples this client said "
            "it holds)",
        11: "{READY} num_examples {message['num_examples']} is more than this client's {self.max_examples}",
        12: "{header} of round {number}, but this client was asked for round {self.asked_round}",
        13: "an {UPDATE} for round {number} evaluates round {update.get('eval_round')}'s model (it must be "
            "{number - 1}'s, with eval_loss_sum)",
        16: "stalled: no byte of a frame for {self.stall_timeout_s:g} s ({self.reader.progress} bytes in)",
    }
    assert len(texts) == 17
    for i, text in enumerate(texts):
        if i in produced:
            assert produced[i]() == text, (i, text)
            continue
        from_template(templates[i], text, lobby)


# --------------------------------------------------------------------------- links

def slug(heading: str) -> str:
    """A heading's anchor, as MkDocs (Python-Markdown's toc) makes it."""
    text = re.sub(r"`", "", heading)
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def test_every_link_resolves_inside_docs_and_every_anchor_exists():
    anchors = {slug(h) for h in re.findall(r"^#+ (.+)$", DOC, re.M)}
    for target in re.findall(r"\]\(([^)]+)\)", DOC):
        assert not target.startswith(("http:", "/", "..")), f"a link out of docs/: {target}"
        if target.startswith("#"):
            assert target[1:] in anchors, f"no heading for {target}"
        else:
            assert (DOC_PATH.parent / target).is_file(), f"no file {target}"
    names = {p.name for p in (DOC_PATH.parent / "vectors").glob("*.json")}
    linked = set(re.findall(r"\(vectors/([\w.]+)\)", DOC))
    assert names <= linked, f"vector files the document does not mention: {sorted(names - linked)}"


# --------------------------------------------------------------------------- over real sockets


def exchange(port: int, data: bytes, tls: ssl.SSLContext | None = None) -> list[dict]:
    """Send `data` on a fresh connection; every framed message received until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT_S) as sock:
        sock.sendall(data)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:  # a server that closes with bytes of ours unread resets, after its answer
            pass
    messages = []
    while received:
        length = int.from_bytes(received[:8], "big")
        messages.append(decode_message(received[8:8 + length]))
        received = received[8 + length:]
    return messages


def hello(**changes) -> bytes:
    return encode_message("<HELLO>", **{"protocol_version": 3, "client_id": 1, "features": [], **changes})


@pytest.mark.processes
def test_a_plain_server_answers_what_the_document_says(cluster):
    cluster.server(*FAST, "--num-clients", "5", "--stay")
    version, = quoted("protocol errors: server")[:1]
    assert exchange(cluster.port, hello(protocol_version=2)) == [{"header": "<ERROR>", "message": version}]
    assert exchange(cluster.port, hello()) == [{"header": "<ERROR>", "message": "this run needs the client features "
                                               "sessions, which this client does not have (update it)"}]
    # TLS spoken to it: a ClientHello's first bytes are answered with a plain frame, then the close
    client_hello = bytes.fromhex("16030100") + bytes(60)
    assert exchange(cluster.port, client_hello) == [{"header": "<ERROR>", "message": "this server does not use TLS"}]
    assert "`this server does not use TLS`" in DOC


@pytest.mark.processes
def test_a_tls_server_answers_a_plain_client_in_plain_tcp(cluster, tmp_path):
    from pki import Authority

    ca = Authority(tmp_path, "ca")
    cert, key = ca.issue("server", dns=["localhost"], ips=["127.0.0.1"])
    cluster.server(*FAST, "--num-clients", "2", "--tls-cert", cert, "--tls-key", key)
    told = "this server requires TLS: start the client with --tls-ca FILE"
    assert exchange(cluster.port, hello()) == [{"header": "<ERROR>", "message": told}]
    assert f"`{told}`" in DOC
    # and a TLS client that speaks to it properly is welcomed (the same port, the same server)
    context = ssl.create_default_context(cafile=ca.path)
    with socket.create_connection(("127.0.0.1", cluster.port), timeout=IO_TIMEOUT_S) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            sock.sendall(hello())
            reader = sock.makefile("rb")
            length = int.from_bytes(reader.read(8), "big")
            assert decode_message(reader.read(length))["header"] == "<METADATA>"


def test_every_hex_value_it_shows_is_in_a_vector_file():
    """The short tables of secure aggregation's values are the vector files' (which the code is checked against)."""
    files = "".join(path.read_text() for path in (DOC_PATH.parent / "vectors").glob("*.json"))
    shown = re.findall(r"`([0-9a-f]{32,})`", DOC)
    assert len(shown) > 10
    assert not [value for value in shown if value not in files]


def test_the_spec_states_the_rules_a_third_party_client_needs():
    """The points a client written from the spec alone had to guess before; each has its sentence."""
    for rule in (
        r"decodes them to the 32 bytes",  # the HMAC is over the nonce's bytes
        r"surrounding whitespace and the newline\s+stripped, as UTF-8 bytes",  # how a token file becomes the secret
        r"Hex digits\s+may be upper or lower case",
        r"an integer field takes a JSON\s+integer only",
        r"64 KiB", r"1 MiB", r"exactly the layout's `nbytes`",
        r"rounded up to a multiple of 64",
        r"bit \*i\* \(byte `i // 8`, the least significant bit\s+first\)",
        r"mean cross-entropy over every example of every local epoch",
        r"same round number and\s+the same weights",
        r"no new model until\s+its late update has arrived",
        r"`next_round` is the first round it can take part\s+in",
        r"three missed heartbeats",
        r"while the client trains",
        r"\*\*`partition_bitmap`, which is normative\*\*",
        r"`partition`, `alpha` and `seed` are informative",
        r"rounds both to float32\s+first",
        r"\| `uint32` \| 4 \|",
        r"a key this document does not\s+define is refused",
        r"model's own layout does not always cross the wire",
    ):
        assert re.search(rule, DOC), f"the spec does not say: {rule}"
