"""The pages of the docs that are made from something else, so that they cannot drift from it.

    python -m fedsock.generated_docs            # rewrites docs/reference/flags.md and docs/index.md
    python -m fedsock.generated_docs --check    # exit 1 if either is stale (tests/test_site.py does this)

- docs/reference/flags.md: every flag of every program, its default and its help, in the groups
  `--help` shows them, written from the programs' own parsers (the settings in fedsock/config.py
  and fedsock/simulate.py are the one place a flag is defined).
- docs/index.md, the site's home page: the README, its links made the site's own.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

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

Generated from the programs' own parsers by `python -m fedsock.generated_docs`
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


def site_home(readme: str) -> str:
    """The README as the site's home page: its links into docs/ made relative to docs/, and its
    layout of the repository (a reader of the site has the docs' own navigation) left out."""
    text = readme.replace("The docs are in [`docs/`](docs/), readable here on GitHub or as a site:",
                          "These pages are the `docs/` folder of the repository, built with MkDocs:")
    text = text.replace(", with [conformance vectors](docs/reference/vectors/)", ", with its conformance vectors")
    text = text.replace("](docs/", "](")
    if "\n## Layout\n" in text:
        start = text.index("\n## Layout\n")
        end = text.find("\n## ", start + 1)
        text = text[:start] + (text[end:] if end != -1 else "\n")
    return text


def pages(root: Path) -> dict[Path, str]:
    """Each generated page: its path, and what it must hold."""
    return {root / "docs" / "reference" / "flags.md": reference(),
            root / "docs" / "index.md": site_home((root / "README.md").read_text(encoding="utf-8"))}


def main(argv: list[str]) -> int:
    root = Path(__file__).resolve().parent.parent
    stale = [path for path, text in pages(root).items()
             if not path.exists() or path.read_text(encoding="utf-8") != text]
    if "--check" in argv:
        for path in stale:
            print(f"{path.relative_to(root)} is stale: python -m fedsock.generated_docs", file=sys.stderr)
        return 1 if stale else 0
    for path, text in pages(root).items():
        path.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
