"""The flag reference of the docs site, generated from the programs' own parsers.

    python -m fedsock.flag_reference > docs/reference/flags.md

Every flag of every program, its default and its help, in the groups `--help` shows them:
the settings in fedsock/config.py (and fedsock/simulate.py) are the one place a flag is
defined, and this page is written from them. tests/test_site.py fails when the committed
page differs from what this prints, so a changed flag changes the docs in the same commit.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# (the program as a user types it, the module whose build_parser() makes its parser)
PROGRAMS = (
    ("fl_server.py", "fl_server"),
    ("fl_client.py", "fl_client"),
    ("fl_simulate.py", "fl_simulate"),
    ("demo.py", "fedsock.demo"),
    ("fl_client.py --check-data", "fedsock.check_data"),
    ("python -m fedsock.enrol", "fedsock.enrol"),
    ("python -m fedsock.attack", "fedsock.attack"),
    ("python -m fedsock.audit", "fedsock.audit"),
    ("python -m fedsock.export", "fedsock.export"),
    ("python -m fedsock.runs", "fedsock.runs"),
)

HEADER = """# Every flag

Generated from the programs' own parsers by `python -m fedsock.flag_reference`
(`tests/test_site.py` checks this page against them): each program's flags, in the groups its
`--help` shows, with their defaults. Any flag of `fl_server.py`, `fl_client.py` and
`fl_simulate.py` can also come from a TOML file, `--config FILE`, by its name with `_` for `-`;
a flag on the command line wins. Abbreviations are not accepted: `--port` is answered with
"did you mean `--server-port`?".
"""


def cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def shown(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def default_of(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
        return ""
    return f"`{shown(action.default)}`"


def flag_of(action: argparse.Action) -> str:
    names = [n for n in action.option_strings if n.startswith("--")] or action.option_strings
    name = " / ".join(f"`{n}`" for n in names) if names else f"`{action.metavar or action.dest}`"
    if action.nargs != 0 and action.option_strings and action.metavar:
        name += f" {action.metavar}" if isinstance(action.metavar, str) else ""
    if action.choices and action.option_strings and not action.metavar:
        name += " {" + ",".join(map(str, action.choices)) + "}"
    return name


def help_of(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    if not action.help:
        return ""
    text = cell(parser._get_formatter()._expand_help(action))
    return text.removesuffix(f" (default: {action.default})")  # the table's own column says it


def tables(parser: argparse.ArgumentParser, title: str, level: int = 2) -> list[str]:
    lines = [f"{'#' * level} {title}", ""]
    if parser.description:
        lines += [cell(parser.description.split("\n\n")[0]), ""]
    usage = parser.format_usage().strip()
    if usage.count("\n") < 4:  # the big programs' usage is their table below, twice
        lines += ["```text", usage, "```", ""]
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.dest != "help" and a.help != argparse.SUPPRESS
                   and not isinstance(a, argparse._SubParsersAction)]
        if not actions:
            continue
        name = {"positional arguments": "arguments", "optional arguments": "options"}.get(group.title, group.title)
        lines += [f"**{name}**", "", "| flag | default | meaning |", "|---|---|---|"]
        lines += [f"| {flag_of(a)} | {default_of(a)} | {help_of(parser, a)} |" for a in actions]
        lines.append("")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                lines += tables(sub, f"{title} {name}", level + 1)
    return lines


def reference() -> str:
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps usage to the terminal: the page must not depend on it
    try:
        lines = [HEADER]
        for program, module in PROGRAMS:
            lines += tables(importlib.import_module(module).build_parser(), program)
    finally:
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns
    return "\n".join(lines).rstrip("\n") + "\n"


if __name__ == "__main__":
    sys.stdout.write(reference())
