"""The README's tables against the code's own definitions, so that the two cannot drift apart:
the protocol's field table against socket_methods.MESSAGES, the flag tables against the
programs' parsers."""

from __future__ import annotations

import argparse
import re

import pytest

import fl_client
import fl_server
from conftest import ROOT
from socket_methods import MESSAGES

README = (ROOT / "README.md").read_text()
TYPE_NAMES = {int: "integer", float: "number", str: "string", bool: "boolean", dict: "object", list: "list"}


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def protocol_rows() -> list[list[str]]:
    start = README.index("<!-- protocol fields: start")
    end = README.index("<!-- protocol fields: end -->")
    lines = [line for line in README[start:end].splitlines() if line.startswith("| `<")]
    return [cells(line) for line in lines]


def test_every_message_field_is_documented_with_its_type_and_range():
    documented = {(row[0].strip("`"), row[1].strip("`")): row for row in protocol_rows()}
    in_code = {(header, name) for header, fields in MESSAGES.items() for name in fields}
    assert set(documented) == in_code, (f"missing from the README: {sorted(in_code - set(documented))}; "
                                        f"not in the code: {sorted(set(documented) - in_code)}")
    for (header, name), (_, _, kind, accepted, meaning) in documented.items():
        spec = MESSAGES[header][name]
        expected_kind = (TYPE_NAMES[spec.kind] + (f" of {TYPE_NAMES[spec.items]}s" if spec.items else "")
                         + (" or null" if spec.nullable else "") + (", optional" if spec.optional else ""))
        assert kind == expected_kind, f"{header} {name}: the README says {kind!r}, the code {expected_kind!r}"
        assert accepted == spec.range_text(), f"{header} {name}: the README says {accepted!r}, the code {spec.range_text()!r}"
        assert meaning, f"{header} {name} has no meaning in the README"
    assert list(dict.fromkeys(row[0].strip("`") for row in protocol_rows())) == list(MESSAGES), "not in the code's order"


def flag_table(after: str, before: str) -> dict[str, str]:
    section = README[README.index(after) : README.index(before, README.index(after))]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| `--"):
            flag, default, _ = cells(line)
            rows[flag.split("`")[1].split(" ")[0]] = default.strip("`")
    return rows


def parser_flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    flags = {}
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        name = max(action.option_strings, key=len) if not isinstance(action, argparse.BooleanOptionalAction) \
            else action.option_strings[0]
        if action.required:
            default = "required"
        elif action.default is None or action.default is False:
            default = ""
        else:
            default = str(action.default)
        flags[name] = default
    return flags


@pytest.mark.parametrize("program, after, before", [
    (fl_server, "`fl_server.py` (", "`fl_client.py`:"),
    (fl_client, "`fl_client.py`:", "Exit statuses"),
])
def test_every_flag_is_in_the_readme_with_its_default(program, after, before):
    documented = flag_table(after, before)
    flags = parser_flags(program.build_parser())
    assert set(documented) == set(flags), (f"missing from the README: {sorted(set(flags) - set(documented))}; "
                                           f"not a flag: {sorted(set(documented) - set(flags))}")
    for flag, default in flags.items():
        assert documented[flag] == default, f"{flag}: the README says {documented[flag]!r}, the program {default!r}"


def test_the_readme_states_the_rules_a_third_party_client_needs():
    """The points a client written from the README alone had to guess before; each has its sentence."""
    protocol = README[README.index("## The protocol") : README.index("## Architecture")]
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
    ):
        assert re.search(rule, protocol), f"the protocol section does not say: {rule}"


def test_the_readme_has_no_placeholder_left():
    """Sections are drafted with a marker line (STRATEGY_BENCH, NET_TABLE) where measured figures go."""
    left = re.findall(r"^[A-Z]+(?:_[A-Z]+)*_(?:BENCH|TABLE)$", README, re.M)
    assert not left, left
