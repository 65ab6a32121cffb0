"""Many virtual clients, trained for real, on the server's own round engine.

    python fl_simulate.py --num-clients 100 --fraction-fit 0.1 --num-rounds 20 --model cnn

This file is the command line; the virtual clients and their backends are in
fedsock/simulate.py, and --transport sockets (a real server, clients over TCP) is
fedsock/simulate_sockets.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace

from fedsock import config as settings
from fedsock.console import ArgumentParser, HelpFormatter, UsageError, run_main, say
from fedsock.flag_checks import check_config
from fedsock.prepare import make_output_dir, prepare_training
from fedsock.resume_guard import Protections, check_resume
from fedsock.run_files import read_checkpoint
from fedsock.simulate import (NOT_SIMULATED, PROFILE_FLAGS, WHO, SharedData, SimulationConfig, make_backend,
                              run_simulation)
from fedsock.simulate_sockets import VIRTUAL_CLOCK_OVER_SOCKETS, run_over_sockets


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="fl_simulate.py", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    settings.add_settings(parser, SimulationConfig, exclude=NOT_SIMULATED)
    parser.add_argument("--traceback", action="store_true", help="show a full traceback on errors (for bug reports)")
    return parser


def parse_config(argv: list[str] | None):
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    args.pop("traceback")
    given = settings.given_flags(build_parser, argv)
    config, checkpoint = SimulationConfig(**args), None
    if config.resume:
        checkpoint = read_checkpoint(config.resume)
        config = settings.resumed(config, checkpoint.config, given, args)
    if config.transport == "sockets":  # the profiles apply in real time there (fedsock/simulate_sockets.py)
        if "virtual_clock" in given or "virtual_examples_per_s" in given:
            parser.error(VIRTUAL_CLOCK_OVER_SOCKETS)
    elif any(name in given for name in PROFILE_FLAGS):
        config = replace(config, virtual_clock=True)  # a speed means nothing without the clock that runs on it
    check_config(config, given, parser)
    if config.backend != "ray" and any(name in given for name in ("ray_address", "client_cpus", "client_gpus")):
        parser.error("--ray-address, --client-cpus and --client-gpus apply to --backend ray")
    if config.backend == "ray" and "workers" in given:
        parser.error("--workers applies to --backend inprocess and processes; Ray places tasks by --client-cpus")
    return config, checkpoint


def clock_line(config) -> str:
    """What the virtual clock models, in one line."""
    parts = [f"a client of speed 1 trains {config.virtual_examples_per_s:g} examples a virtual second"]
    if config.speed_sigma:
        parts.append(f"slowness lognormal(0, {config.speed_sigma:g})")
    if config.slow_share:
        parts.append(f"{round(config.slow_share * config.num_clients)} of {config.num_clients} clients "
                     f"{config.slow_factor:g}x slower")
    if config.availability < 1:
        parts.append(f"each here with probability {config.availability:g} in every {config.availability_period_s:g} s")
    return "time is virtual (the clients train for real; only their profiles' fit times count): " + "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    config, checkpoint = parse_config(argv)
    if config.transport == "sockets":
        return run_over_sockets(config, argv)
    protections = Protections.of_run(config)  # a simulation has no TLS and no secrets: only secure aggregation and DP
    if checkpoint is not None:
        check_resume(checkpoint, protections, {}, config.resume, config.allow_weaker_resume, WHO)
    setup = prepare_training(config, checkpoint, keep_train=True, who=WHO)
    setup.protections = protections.to_json()
    if checkpoint is not None:
        say(WHO, f"resuming from {config.resume}: round {checkpoint.round} of {config.num_rounds} was the last completed")
        if checkpoint.round >= config.num_rounds:
            raise UsageError(f"the checkpoint already has all {config.num_rounds} rounds; raise --num-rounds to go on")
    data = SharedData(setup.train, setup.info, setup.partitions, config.seed)
    setup.train = None
    output_dir = make_output_dir(config.output_dir)
    (output_dir / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    backend = make_backend(config, data)
    workers = f", {config.workers} worker(s)" if config.backend != "ray" else ""
    say(WHO, f"{config.num_clients} virtual clients on the {backend.name} backend{workers}; output in {output_dir}")
    if config.virtual_clock:
        say(WHO, clock_line(config))
    try:
        return run_simulation(config, setup, data, backend, output_dir)
    finally:
        backend.close()


def cli() -> int:
    return run_main("fl_simulate.py", main)


if __name__ == "__main__":
    sys.exit(cli())
