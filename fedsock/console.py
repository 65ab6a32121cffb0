"""What a person sees: timestamped log lines, one-line errors and exit codes.

Both command-line tools run through `run_main`, so every expected failure
ends as one line on stderr and a documented exit status; a traceback only
appears for a real bug (or with --traceback).
"""

from __future__ import annotations

import argparse
import difflib
import math
import re
import sys
import time
from enum import IntEnum
from typing import Callable


class ExitStatus(IntEnum):
    OK = 0
    FAILURE = 1  # the run could not go on: network, data, protocol
    USAGE = 2  # a bad flag (argparse uses 2 as well)
    REFUSED = 3  # the server said no: late joiner, duplicate id, failed authentication
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
    TERMINATED = 143  # SIGTERM (128 + SIGTERM)


class FedsockError(Exception):
    """An expected failure: its message is the one line the user sees."""

    exit_status = ExitStatus.FAILURE


class UsageError(FedsockError):
    """A flag or a file named by a flag is wrong."""

    exit_status = ExitStatus.USAGE


class RefusedError(FedsockError):
    """The server refused this client with an <ERROR> message."""

    exit_status = ExitStatus.REFUSED


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help with each flag's default (where it has one), and the description and epilog as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (not the whole usage) with the closest flag suggested, and
    exit status 2. Abbreviations are off: argparse would silently read `--mode async` as `--model async`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str):
        unknown = re.match(r"unrecognized arguments: (\S+)", message)
        if unknown and unknown[1].startswith("--"):
            flag = unknown[1].split("=", 1)[0]
            flags = [option for action in self._actions for option in action.option_strings if option.startswith("--")]
            # `--port` is one word of `--server-port`; else the nearest spelling (`--num-client`, `--mode`)
            close = [f for f in flags if f.endswith("-" + flag[2:]) or f.startswith(flag + "-")][:1]
            close = close or difflib.get_close_matches(flag, flags, n=1, cutoff=0.75)
            if close:
                message = f"{message}: did you mean {close[0]}?"
        self.exit(ExitStatus.USAGE, f"{self.prog}: error: {message} (see --help)\n")


# A peer's text (an <ERROR>'s message, a name) reaches the log inside our own lines. A control
# character in it could forge a line ("...\n12:00:00 [server] client 1 is ready") or drive the
# terminal (ANSI escapes, bidirectional overrides), so every line printed shows such characters
# escaped, as \x1b or \u202e: one line in, one line out.
UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    return UNPRINTABLE.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}", text)


def say(who: str, message: str) -> None:
    """One log line, labelled and timestamped, so interleaved processes stay readable."""
    print(f"{time.strftime('%H:%M:%S')} [{printable(who)}] {printable(message)}", flush=True)


def warn(who: str, message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} [{printable(who)}] WARNING: {printable(message)}", file=sys.stderr, flush=True)


def run_main(prog: str, main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run `main`, turning expected failures into one line on stderr and an exit status."""
    show_traceback = "--traceback" in (sys.argv[1:] if argv is None else argv)
    try:
        return main(argv)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return ExitStatus.INTERRUPTED
    except FedsockError as exc:
        if show_traceback:
            raise
        print(f"{prog}: error: {printable(str(exc))}", file=sys.stderr, flush=True)
        return exc.exit_status
    except OSError as exc:  # files and sockets not already wrapped with a better sentence
        if show_traceback:
            raise
        print(f"{prog}: error: {printable(str(exc))}", file=sys.stderr, flush=True)
        return ExitStatus.FAILURE


def number(kind: type, low: float, high: float | None = None, *, positive: bool = False) -> Callable[[str], float]:
    """An argparse type: a `kind` (int or float) of at least `low` (above it if `positive`), at most `high`."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {'a whole number' if kind is int else 'a number'}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (positive and value == low) or (high is not None and value > high):
            if high is not None:
                raise argparse.ArgumentTypeError(f"must be {low}..{high}, got {text}")
            if positive:
                raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {text}")
        return value

    return parse
