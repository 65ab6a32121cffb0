"""Flags that make no sense together: one line each, before anything starts.

The server's and the simulation's parsers both end with `check_config`; each check names
the flags and says why, e.g. "--compression does not go with --secure-aggregation: ...".
"""

from __future__ import annotations

import argparse
from typing import Any

import neural_net_helper as nnh
from fedsock.config import ServerConfig
from fedsock.strategies import ROBUST

# Flags that only one kind of strategy reads: given with another, they would silently do nothing.
STRATEGY_FLAGS = {
    "proximal_mu": ("fedprox",), "server_momentum": ("fedavgm",), "server_lr": ("fedavgm", "fedadam", "fedyogi", "fedadagrad"),
    "beta1": ("fedadam", "fedyogi", "fedadagrad"), "beta2": ("fedadam", "fedyogi"), "tau": ("fedadam", "fedyogi", "fedadagrad"),
    "trim_fraction": ("trimmed-mean",), "byzantine_clients": ("krum", "multi-krum"),
}


def check_config(config: ServerConfig, given: dict[str, Any], parser: argparse.ArgumentParser) -> None:
    """Flags that make no sense together are one line each, before anything starts."""
    if config.min_clients > config.num_clients:
        parser.error(f"--min-clients {config.min_clients} is more than --num-clients {config.num_clients}")
    if config.clients_per_round is not None and config.fraction_fit is not None:
        parser.error("use --clients-per-round or --fraction-fit, not both")
    if config.clients_per_round is not None:
        if config.clients_per_round > config.num_clients:
            parser.error(f"--clients-per-round {config.clients_per_round} is more than --num-clients {config.num_clients}")
        if config.clients_per_round < config.min_clients:
            parser.error(f"--clients-per-round {config.clients_per_round} is below --min-clients {config.min_clients}: "
                         f"no round could get enough updates")
    check_async(config, given, parser)
    if config.over_select > 1:
        if config.clients_per_round is None and config.fraction_fit is None:
            parser.error("--over-select needs --clients-per-round K or --fraction-fit C: it picks more clients than "
                         "the K a round needs")
        if config.sampling == "poisson":
            parser.error("--over-select does not go with --sampling poisson: a Poisson round has no K to close at")
        if config.secure_aggregation:
            parser.error("--over-select does not go with --secure-aggregation: every client keyed into a round must "
                         "answer its unmasking, and the over-selected ones are let go")
        if config.async_buffer:
            parser.error("--over-select is for synchronous rounds: --async-buffer waits for no round")
    for name, strategies in STRATEGY_FLAGS.items():
        if name == "server_lr" and config.async_buffer:
            continue  # η of every asynchronous step
        if name in given and config.strategy not in strategies:
            parser.error(f"--{name.replace('_', '-')} applies to --strategy {' or '.join(strategies)}, "
                         f"not {config.strategy}")
    task_flags = [name for name in ("classes", "positive_class", "image_size", "channels", "image_mean", "image_std",
                                    "max_tokens", "buckets", "test_data", "max_client_examples") if name in given]
    kind = "text" if config.task == "text" else "image"
    if config.task == "dataset":
        if task_flags:
            parser.error(f"--{task_flags[0].replace('_', '-')} applies to --task image or text (clients with their "
                         f"own data), not to --task dataset")
    else:
        if not config.classes:
            example = "ham,spam" if config.task == "text" else "NORMAL,PNEUMONIA"
            parser.error(f"--task {config.task} needs --classes, e.g. --classes {example}")
        wrong = [name for name in ("dataset", "partition", "alpha", "data_root") if name in given]
        if wrong:
            parser.error(f"--{wrong[0].replace('_', '-')} applies to --task dataset; with --task {config.task} each "
                         f"client brings its own data")
    if not nnh.model_fits(config.model, kind):
        parser.error(f"--model {config.model} is for {'text' if kind == 'image' else 'images'}; a {kind} task needs "
                     f"{' or '.join(nnh.TEXT_MODELS if kind == 'text' else nnh.IMAGE_MODELS)}")
    if config.augment != "none" and kind == "text":
        parser.error(f"--augment {config.augment} is for images; a text task has none to turn")
    dp_flags = [name for name in ("dp_noise_multiplier", "dp_epsilon", "dp_delta", "dp_mode") if name in given]
    if config.dp_clip is None and dp_flags:
        parser.error(f"--{dp_flags[0].replace('_', '-')} needs --dp-clip S, which turns client-level DP on")
    if config.dp_clip is not None:
        if (config.dp_noise_multiplier is None) == (config.dp_epsilon is None):
            parser.error("client-level DP needs either --dp-noise-multiplier Z or a budget --dp-epsilon E (one of them)")
        if config.strategy in ROBUST:
            parser.error(f"--strategy {config.strategy} does not go with --dp-clip: the DP guarantee is for the "
                         f"noised mean of clipped updates, and {config.strategy} is not a mean")
        if config.dp_delta is not None and config.dp_delta >= 1 / config.num_clients:
            parser.error(f"--dp-delta {config.dp_delta:g} is not below 1/N = {1 / config.num_clients:g}: a guarantee "
                         f"that may fail for one client in N protects no one")
    if config.dashboard is not None:
        from fedsock.dashboard import parse_address

        try:
            parse_address(config.dashboard)
        except ValueError as exc:
            parser.error(f"--dashboard {exc}")
    if config.tensorboard is not None:
        from fedsock.tensorboard import missing_tensorboard

        if missing := missing_tensorboard():
            parser.error(missing)
    secagg_flags = [name for name in ("secagg_threshold", "secagg_clip", "federation") if name in given]
    if secagg_flags and not config.secure_aggregation:
        parser.error(f"--{secagg_flags[0].replace('_', '-')} needs --secure-aggregation")
    if config.dp_mode == "distributed" and not config.secure_aggregation:
        parser.error("--dp-mode distributed needs --secure-aggregation: the clients' shares of the noise protect "
                     "only a sum the server cannot see into")
    if config.secure_aggregation:
        if config.strategy in ROBUST:
            parser.error(f"--strategy {config.strategy} does not go with --secure-aggregation: it needs each "
                         f"client's update, and secure aggregation shows the server only their sum")
        if config.compression != "none":
            parser.error("--compression does not go with --secure-aggregation: a masked update is uniform 32-bit "
                         "words, which no encoding shrinks")
        if config.sampling == "poisson":
            parser.error("--sampling poisson does not go with --secure-aggregation: a Poisson round may pick fewer "
                         "clients than the threshold t; use --sampling fixed")
    if config.sampling == "poisson" and config.clients_per_round is None and config.fraction_fit is None:
        parser.error("--sampling poisson needs --fraction-fit C (or --clients-per-round K: a rate of K/N)")
    if config.strategy in ("krum", "multi-krum"):
        needed = 2 * config.byzantine_clients + 3
        if max(config.min_clients, needed) > min(config.clients_per_round or config.num_clients, config.num_clients):
            parser.error(f"{config.strategy} with --byzantine-clients {config.byzantine_clients} needs at least "
                         f"{needed} updates a round (n >= 2f + 3, Blanchard et al. 2017): raise the clients per round")


def check_async(config: ServerConfig, given: dict[str, Any], parser: argparse.ArgumentParser) -> None:
    """--async-buffer K: what buffered asynchronous aggregation takes, and what it refuses (fedsock/buffered.py)."""
    async_flags = [name for name in ("staleness_weight", "max_staleness") if name in given]
    size = config.async_buffer
    if size is None:
        if async_flags:
            parser.error(f"--{async_flags[0].replace('_', '-')} needs --async-buffer K")
        return
    if config.secure_aggregation:
        parser.error("--secure-aggregation does not go with --async-buffer: masks cancel only within a set of "
                     "clients keyed together, and a buffer's clients are whoever arrives first")
    if config.strategy in ROBUST:
        parser.error(f"--strategy {config.strategy} does not go with --async-buffer: a buffer's updates start from "
                     f"different versions, and {config.strategy} compares them coordinate by coordinate as if they "
                     f"did not")
    if config.sampling == "poisson":
        parser.error("--sampling poisson does not go with --async-buffer: nothing is sampled; --clients-per-round "
                     "only caps the clients training at once")
    if config.federated_evaluation or config.task != "dataset" and config.test_data is None:
        parser.error("--async-buffer needs the server's own test set (not --federated-evaluation): the clients' "
                     "evaluations are of whichever version each was sent, not of one round's model")
    if config.record_updates:
        parser.error("--record-updates does not go with --async-buffer: its records are per round")
    concurrency = min(config.clients_per_round or config.num_clients, config.num_clients)
    if config.fraction_fit is not None:
        concurrency = max(config.min_clients, int(round(config.fraction_fit * config.num_clients)))
    if size > concurrency:
        parser.error(f"--async-buffer {size} is more than the {concurrency} client(s) that may train at once: a "
                     f"version takes at most one update per client, so its buffer could never fill")
