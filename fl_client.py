"""fedsock client: trains on its own data and sends back only its update.

    python fl_client.py --client-id 1

This file is the command line: its flags (fedsock.config.ClientConfig) and `main`. The
client's life (join, set up, <READY>, then train on each <MODEL> and answer with an
<UPDATE>) is fedsock/client.py's `run_client`; its local training is
fedsock/local_training.py's, imported only after the handshake, so `--help` and the first
connection do not wait for PyTorch.
"""

from __future__ import annotations

import argparse
import sys

from fedsock import config as settings
from fedsock.client import run_client
from fedsock.config import ClientConfig
from fedsock.console import ArgumentParser, HelpFormatter, run_main


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="fl_client.py",
        description="fedsock client: federated learning on this machine's data.",
        formatter_class=HelpFormatter,
    )
    settings.add_settings(parser, ClientConfig)
    parser.add_argument("--use-cuda", action=argparse.BooleanOptionalAction, default=None,
                        help="the original tool's switch: same as --device cuda / --device cpu")
    parser.add_argument("--config", metavar="FILE", help="more settings, from a TOML file: require_dp = true, "
                                                         "min_round_clients = 5, ... (a flag given here wins)")
    parser.add_argument("--check-data", metavar="PATH", help="check a data folder or file offline, as this client would "
                                                             "read it, print what it holds, and exit (no server: "
                                                             "fl_client.py --check-data PATH --help for its flags)")
    parser.add_argument("--traceback", action="store_true", help="show a full traceback on errors (for bug reports)")
    return parser


def parse_config(argv: list[str] | None) -> ClientConfig:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.config:  # the file's settings first, then the command line's again: a flag given wins
        argv = settings.file_arguments(args.config, parser) + argv
        args = parser.parse_args(argv)
    if args.use_cuda is not None:
        wanted = "cuda" if args.use_cuda else "cpu"
        if args.device not in ("auto", wanted):
            parser.error("--use-cuda/--no-use-cuda contradicts --device")
        args.device = wanted
    del args.use_cuda, args.traceback, args.config, args.check_data
    given = settings.given_flags(build_parser, argv)
    stray = [name for name in ("dp_sgd_noise_multiplier", "dp_sgd_clip", "dp_sgd_delta") if name in given]
    if stray and not args.dp_sgd:
        parser.error(f"--{stray[0].replace('_', '-')} applies to --dp-sgd")
    return ClientConfig(**vars(args))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a == "--check-data" or a.startswith("--check-data=") for a in argv):  # offline: no id, no server
        from fedsock import check_data

        return check_data.main(argv)
    return run_client(parse_config(argv))


def cli() -> int:
    return run_main("fl_client.py", main)


if __name__ == "__main__":
    sys.exit(cli())
