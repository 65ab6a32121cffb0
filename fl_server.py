"""fedsock server: waits for clients, then runs rounds of federated learning.

This file is the command line: its flags (generated from fedsock/config.py's settings),
their checks, and `main`. What runs after that lives in the package, and one round can
be followed from here:

  main -> fedsock.server.run_server: prepare (fedsock/prepare.py), listen, admit clients
          (fedsock/lobby.py) -> RoundEngine.run (fedsock/engine.py), and every round:
  1. sample     `RoundEngine.fit_round`: the strategy picks which ready clients train;
  2. send       `RemoteClient.fit` (fedsock/lobby.py) frames the global model once for all
                of them; fl_client.py trains on it and answers with an <UPDATE>;
  3. collect    `RemoteClient.receive_update` checks the update, and `Round.collect` folds
                it into the round's aggregate the moment it arrives;
  4. aggregate  once every picked client has answered, dropped, or the round timed out;
  5. step       `Strategy.step` makes the next global model (fedsock/strategies.py), and the
                next round starts at once, while this one's evaluation and report
                (fedsock/reports.py) run in a worker thread.

    python fl_server.py --num-rounds 10 --time-to-wait 10
"""

from __future__ import annotations

import argparse
import sys

from fedsock import config as settings
from fedsock.config import ServerConfig
from fedsock.console import ArgumentParser, HelpFormatter, run_main
from fedsock.flag_checks import check_config
from fedsock.run_files import Checkpoint, read_checkpoint
from fedsock.server import run_server
from fedsock.strategies import STRATEGIES


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="fl_server.py",
        description="fedsock server: federated learning over plain TCP (or TLS).",
        epilog="strategies (--strategy):\n" + "\n".join(f"  {name:<13} {what}" for name, what in STRATEGIES.items()),
        formatter_class=HelpFormatter,
    )
    settings.add_settings(parser, ServerConfig)
    parser.add_argument("--use-cuda", action=argparse.BooleanOptionalAction, default=None,
                        help="the original tool's switch: same as --device cuda / --device cpu")
    parser.add_argument("--traceback", action="store_true", help="show a full traceback on errors (for bug reports)")
    return parser


def parse_config(argv: list[str] | None) -> tuple[ServerConfig, Checkpoint | None]:
    """Flags to a config; with --resume, the checkpoint's settings under the flags given now."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    given = settings.given_flags(build_parser, argv)
    use_cuda = args.pop("use_cuda")
    args.pop("traceback")
    if use_cuda is not None:
        if "device" in given and args["device"] != ("cuda" if use_cuda else "cpu"):
            parser.error("--use-cuda/--no-use-cuda contradicts --device")
        args["device"] = given["device"] = "cuda" if use_cuda else "cpu"
    if args["task"] == "text" and "model" not in given:
        args["model"] = "textcnn"
    config, checkpoint = ServerConfig(**args), None
    if config.resume:
        if config.initial_model:
            parser.error("--initial-model and --resume do not go together: a resumed run continues its own model")
        checkpoint = read_checkpoint(config.resume)
        config = settings.resumed(config, checkpoint.config, given, args)
    check_config(config, given, parser)
    return config, checkpoint


def main(argv: list[str] | None = None) -> int:
    config, checkpoint = parse_config(argv)
    return run_server(config, checkpoint)


def cli() -> int:
    return run_main("fl_server.py", main)


if __name__ == "__main__":
    sys.exit(cli())
