"""What a run needs before its first round, made from the settings: the data split among the
clients, the test set, the starting model, the strategy, client-level DP and secure aggregation.

A server (fedsock/server.py) and a simulation (fedsock/simulate.py) both start here, with
`prepare_training`. Everything that can fail on a bad flag or file fails here, as one line,
before anything listens or trains.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import client_helper
import neural_net_helper as nnh
from fedsock import compression, secagg, security
from fedsock.clients import GlobalModel
from fedsock.config import ServerConfig
from fedsock.console import FedsockError, UsageError, say
from fedsock.evaluation import Evaluator
from fedsock.identity import fingerprint, load_federation_key
from fedsock.own_data import load_own_data
from fedsock.privacy import Accountant, Privacy, PrivacySettings, default_delta, plan_noise_multiplier
from fedsock.run_files import Checkpoint, SealKey
from fedsock.secagg import SecureAggregation
from fedsock.strategies import Strategy
from fedsock.tasks import Task, make_task, task_of_dataset
from socket_methods import ProtocolError, check_finite, check_layout, weights_layout

WHO = "server"


@dataclass
class Setup:
    """Everything that can fail on bad flags or files, made before the server listens."""

    info: client_helper.DatasetInfo | None  # None when the clients bring their own data
    tls: Any
    auth: security.Authenticator
    model: GlobalModel
    strategy: Strategy
    evaluate: Callable[[dict], dict[str, float]]
    partitions: list[np.ndarray]
    train_size: int
    checkpoint: Checkpoint | None
    train: client_helper.Split | None = None
    task: Task | None = None
    secure: SecureAggregation | None = None
    protections: dict[str, Any] = field(default_factory=dict)  # what each checkpoint records (resume_guard)
    seal_key: SealKey | None = None  # what seals each checkpoint, for a run with secrets


def federated_evaluation(config: ServerConfig) -> bool:
    """Whether clients evaluate the models they receive: asked for, or the only evaluation there is."""
    return config.federated_evaluation or (config.task != "dataset" and config.test_data is None)


def required_features(config: ServerConfig) -> list[str]:
    """The optional protocol features a client must support to take part in this run."""
    local_dp = config.dp_clip is not None and config.dp_mode == "local"
    return (["dp-local"] * (local_dp or config.secure_aggregation and config.dp_clip is not None)
            + [compression.FEATURE] * compression_of(config).active + [secagg.FEATURE] * config.secure_aggregation
            + ["sessions"] * config.stay + ["augment"] * (config.augment != "none"))


def compression_of(config: ServerConfig) -> compression.Compression:
    return compression.Compression(config.compression, config.topk_fraction, config.compress_broadcast)


def load_initial_model(path: str, template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A saved model.pt (a state_dict), checked against the chosen model's own layout."""
    try:
        # weights_only: PyTorch's restricted unpickler, which loads tensors and nothing that runs code.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many kinds (UnpicklingError, RuntimeError, EOFError, ...) for a bad file
        why = str(exc).splitlines()[0] if str(exc).strip() else "the file ends before the model does"
        raise UsageError(f"cannot read --initial-model {path}: {type(exc).__name__}: {why}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"--initial-model {path} is not a model.pt (a state_dict of tensors)")
    try:
        check_layout(weights_layout(state), weights_layout(template))
        check_finite(state)
    except FedsockError as exc:
        raise UsageError(f"--initial-model {path} does not fit the chosen model: {exc}") from exc
    return {name: state[name].clone() for name in template}


def prepare_training(config: ServerConfig, checkpoint: Checkpoint | None, keep_train: bool = False,
                     who: str = WHO) -> Setup:
    """The data split among the clients, the test set, the starting model and the strategy: what a
    server and a simulation both need. `keep_train` keeps the training split (a simulation trains on it)."""
    device = nnh.choose_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    info = train = test = None
    parts: list[np.ndarray] = []
    if config.task == "dataset":
        info = client_helper.DATASETS[config.dataset]
        task = task_of_dataset(info)
        train = client_helper.load_split(config.dataset, "train", config.data_root)
        parts = client_helper.partition_indices(train.labels, config.num_clients, config.partition, config.alpha,
                                                config.seed)
        test = client_helper.load_split(config.dataset, "test", config.data_root)
        test_tensors = nnh.to_tensors(test.images, test.labels, info, device)
    else:
        try:
            task = make_task(config.task, config.classes or "", config.image_size, config.channels, config.image_mean,
                             config.image_std, config.max_tokens, config.buckets, config.positive_class)
        except (ValueError, ProtocolError) as exc:
            raise UsageError(f"--task {config.task}: {exc}") from exc
        test_tensors = None
        if config.test_data:  # the server's own held-out set, in a client's formats; no training file is read
            held = load_own_data(config.test_data, task, flag="--test-data")
            xs = np.concatenate([held.x, held.test_x]) if held.test_x is not None else held.x
            ys = np.concatenate([held.y, held.test_y]) if held.test_y is not None else held.y
            test_tensors = nnh.to_tensors(xs, ys, task, device)
    model = nnh.build_model(config.model, task, config.seed).to(device)
    template = {k: v.cpu() for k, v in nnh.get_weights(model).items()}
    if checkpoint is not None:
        try:
            check_layout(weights_layout(checkpoint.model), weights_layout(template))
        except FedsockError as exc:
            raise UsageError(f"the checkpoint {config.resume} does not fit the {config.model} model: {exc}") from exc
        weights = checkpoint.model
    elif config.initial_model:
        weights = load_initial_model(config.initial_model, template)
    else:
        weights = {k: v.clone() for k, v in template.items()}
    model_bytes = sum(t.numel() * t.element_size() for t in weights.values())
    if model_bytes > config.max_message_mb * 2**20:
        raise UsageError(f"the {config.model} model has {model_bytes / 2**20:.1f} MB of weights, over "
                         f"--max-message-mb {config.max_message_mb:g}")
    strategy = Strategy(config, make_privacy(config, checkpoint, who))
    if checkpoint is not None:
        strategy.load_state(checkpoint.strategy_state)
    if train is not None:
        skew = client_helper.label_skew(train.labels, parts)
        sizes = sorted(len(p) for p in parts)
        say(who, f"{config.dataset}: {len(train.labels)} training examples in {config.num_clients} {config.partition} "
                 f"partitions of {sizes[0]}..{sizes[-1]} (label skew {skew:.2f}); {len(test.labels)} test examples "
                 f"on {device}")
    else:
        where = (f"a test set of {len(test_tensors[1])} examples from {config.test_data}" if test_tensors is not None
                 else "no test set of its own")
        say(who, f"task: {task.describe()}; the clients bring their own data; the server has {where}"
                 f"{'; federated evaluation' if federated_evaluation(config) else ''} on {device}")
    secure = make_secure_aggregation(config, strategy, weights, parts, who) if config.secure_aggregation else None
    return Setup(
        info=info, tls=None, auth=security.Authenticator(), model=GlobalModel.of(weights, config.compress_broadcast),
        strategy=strategy,
        evaluate=Evaluator(model, test_tensors, task), partitions=parts,
        train_size=len(train.labels) if train is not None else 0, checkpoint=checkpoint,
        train=train if keep_train else None, task=task, secure=secure,
    )


def make_secure_aggregation(config: ServerConfig, strategy: Strategy, weights: dict[str, torch.Tensor],
                            parts: list[np.ndarray], who: str = WHO) -> SecureAggregation:
    """The run's secure aggregation, after refusing settings whose sums could overflow 32 bits."""
    if not all(t.is_floating_point() for t in weights.values()):
        raise UsageError(f"--secure-aggregation needs a model whose weights are all floating point; {config.model} "
                         f"has others")
    per_round = config.clients_per_round or config.num_clients
    if config.fraction_fit is not None:
        per_round = max(config.min_clients, math.ceil(config.fraction_fit * config.num_clients))
    privacy = strategy.privacy
    weight_bound = 1 if privacy else (max(len(p) for p in parts) if parts else config.max_client_examples)
    try:
        secagg.check_sizes(min(per_round, config.num_clients), weight_bound)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    settings = secagg.Settings(threshold_fraction=config.secagg_threshold, clip=config.secagg_clip,
                               weight_bound=weight_bound, weighted=privacy is None,
                               stage_timeout_s=min(secagg.Settings.stage_timeout_s, config.round_timeout_s),
                               federation_key=load_federation_key(config.federation) if config.federation else None)
    if privacy is not None:
        s = privacy.settings
        settings.clip = s.clip * (1 + 8 * s.noise_multiplier)  # a clipped delta plus noise: |x| beyond this ~ never
        settings.noise_std = privacy.noise_std if s.mode == "central" else 0.0
    n = min(per_round, config.num_clients)
    t = secagg.default_threshold(n, config.secagg_threshold)
    say(who, f"secure aggregation: threshold {t} of {n} clients a round (it survives {n - t} dropping out), "
             f"coordinates clipped to ±{settings.clip:g}, weights up to {weight_bound} examples")
    if settings.federation_key is not None:
        say(who, f"secure aggregation with identities of federation {fingerprint(settings.federation_key)}: a server "
                 f"that lies learns no one update unless it colludes with {max(2 * t - n, 0)} of the {n} clients "
                 f"(2t - n)")
    else:
        say(who, "secure aggregation without identities (no --federation): it holds against a server that follows "
                 "the protocol, not against one that lies (see the docs' security model)")
    return SecureAggregation(settings, weights)


def make_privacy(config: ServerConfig, checkpoint: Checkpoint | None, who: str = WHO) -> Privacy | None:
    """Client-level DP, when --dp-clip asks for it: its noise multiplier (given, or planned for the budget
    --dp-epsilon over the rounds still to run), and the accountant and sampling secret of a resumed run."""
    if config.dp_clip is None:
        return None
    delta = config.dp_delta if config.dp_delta is not None else default_delta(config.num_clients)
    probe = Strategy(config)
    # Asynchronous versions are accounted without sampling: which clients' updates land in a version
    # depends on their speed, not on a random draw, so no amplification can be claimed for it.
    sampling = config.sampling if probe.sampled and not config.async_buffer else "none"
    saved = checkpoint.extra.get("privacy") if checkpoint is not None else None
    accountant = Accountant.from_json(saved["accountant"]) if saved else Accountant(delta, sampling)
    if accountant.sampling != sampling or accountant.delta != delta:
        raise UsageError(f"the checkpoint's privacy accounting is for {accountant.sampling} sampling at delta "
                         f"{accountant.delta:g}: keep --sampling and --dp-delta on --resume")
    z = config.dp_noise_multiplier
    if z is None:
        planned = probe.clients_to_sample(config.num_clients)
        rounds = config.num_rounds - (checkpoint.round if checkpoint is not None else 0)
        try:
            z = plan_noise_multiplier(config.dp_epsilon, delta, rounds, sampling, config.num_clients, planned,
                                      probe.sampling_rate(config.num_clients), accountant)
        except ValueError as exc:
            raise UsageError(f"--dp-epsilon {config.dp_epsilon:g} cannot be met: {exc}") from exc
    privacy = Privacy(PrivacySettings(config.dp_clip, z, delta, config.dp_mode, sampling), accountant,
                      saved["sampling_seed"] if saved else None, config.dp_epsilon)
    say(who, privacy.describe() + (f"; planned for epsilon {config.dp_epsilon:g}" if config.dp_epsilon else ""))
    if config.async_buffer:
        say(who, f"asynchronous DP: each model version (the noised sum of {config.async_buffer} clipped, "
                 f"staleness-weighted updates, at most one per client, over K = {config.async_buffer}) is accounted "
                 f"as one Gaussian mechanism that every client may be in, composed over the versions, with no "
                 f"sampling amplification")
    return privacy


def run_title(config: ServerConfig, who: str = "fedsock") -> str:
    """The plot's title: the model, the data, the clients and the strategy."""
    data = (f"{config.dataset}, {config.num_clients} clients, {config.partition}" if config.task == "dataset"
            else f"the clients' own data ({config.classes.replace(',', ', ')}), {config.num_clients} clients")
    augmented = f", {config.augment} augmentation" if config.augment != "none" else ""
    return f"{who}: {config.model} on {data}, {config.strategy}{augmented}"


def output_observers(config: ServerConfig, setup: Setup, output_dir: Path, who: str = WHO) -> list:
    """The run's model card (model_card.json, and its line), and the observers of --tensorboard and --export."""
    from fedsock.export import ModelExport
    from fedsock.model_card import card_line, card_markdown, run_model_card, write_model_card

    card = run_model_card(config, setup.task)
    observers = []
    if card is not None:
        say(who, card_line(card))
        try:
            write_model_card(card, output_dir)
        except OSError as exc:
            raise UsageError(f"cannot write {output_dir / 'model_card.json'}: {exc.strerror or exc}") from exc
    if config.tensorboard:
        from fedsock.tensorboard import TensorBoardLog

        observers.append(TensorBoardLog(config.tensorboard, config, setup.checkpoint,
                                        card_markdown(card) if card is not None else None))
        say(who, f"TensorBoard: tensorboard --logdir {config.tensorboard}")
    if config.export:
        observers.append(ModelExport(output_dir, config.model, setup.task, who, setup.checkpoint))
    return observers


def make_output_dir(requested: str | None) -> Path:
    path = Path(requested) if requested else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    if not requested:
        suffix = 1
        while path.exists():
            suffix += 1
            path = Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{suffix}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text("")  # can we write here at all? (filled in below)
    except OSError as exc:
        raise UsageError(f"cannot write to --output-dir {path}: {exc.strerror}") from exc
    return path
