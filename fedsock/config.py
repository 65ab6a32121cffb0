"""Settings as typed dataclasses, and the command-line flags made from them.

Each setting is written once, as a dataclass field whose metadata holds its flag's
help, type and group: the parser is built from the fields, so a default cannot differ
between `--help`, the code and the saved config.json.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable

from fedsock import security
from fedsock.console import UsageError, number

AUGMENTATIONS = ("none", "affine")  # what a client may be asked to do to its training images, each batch


def setting(default: Any, help: str, *, group: str, flag: str | None = None, type: Callable | None = None,
            choices: Iterable[str] | None = None, metavar: str | None = None, required: bool = False) -> Any:
    """A dataclass field that is also a command-line flag (`--name-with-dashes` unless `flag` says otherwise)."""
    meta = dict(help=help, group=group, flag=flag, type=type, choices=tuple(choices) if choices else None,
                metavar=metavar, required=required)
    return field(default=default, metadata=meta) if not required else field(metadata=meta)


def flag_name(spec: Field) -> str:
    return spec.metadata.get("flag") or "--" + spec.name.replace("_", "-")


def _metavar(spec: Field) -> str | None:
    """What --help shows after a flag: a unit for seconds, else the flag's own name, never an
    internal one (the field time_to_wait_s is --time-to-wait SECONDS, not TIME_TO_WAIT_S)."""
    if spec.metadata.get("metavar"):
        return spec.metadata["metavar"]
    if spec.metadata.get("choices"):
        return None  # argparse lists the choices
    if spec.name.endswith("_s"):
        return "SECONDS"
    return flag_name(spec).lstrip("-").replace("-", "_").upper()


def add_settings(parser: argparse.ArgumentParser, config_class: type, exclude: Iterable[str] = ()) -> None:
    """One flag per setting of `config_class` (but those named in `exclude`), grouped as declared."""
    sections: dict[str, argparse._ArgumentGroup] = {}
    for spec in fields(config_class):
        meta = spec.metadata
        if "group" not in meta or spec.name in exclude:
            continue
        section = sections.get(meta["group"]) or sections.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        options: dict[str, Any] = dict(dest=spec.name, help=meta["help"])
        if spec.type in ("bool", bool) or isinstance(spec.default, bool):
            options["action"] = "store_true"
        else:
            options.update(type=meta["type"], choices=meta["choices"], metavar=_metavar(spec))
            if meta["required"]:
                options["required"] = True
            else:
                options["default"] = spec.default
        section.add_argument(flag_name(spec), **options)


def given_flags(parser_factory: Callable[[], argparse.ArgumentParser], argv: list[str] | None) -> dict[str, Any]:
    """The settings that were given on the command line (not defaulted), by name."""
    parser = parser_factory()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return vars(parser.parse_args(argv))


def file_arguments(path: str, parser: argparse.ArgumentParser) -> list[str]:
    """A TOML file of settings (`min_round_clients = 5`, `require_dp = true`: a flag's name, with
    dashes or underscores) as the command-line words it stands for. They go before the command
    line's own, so that a flag given there wins; each is checked as the flag would be."""
    import difflib
    import tomllib

    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"cannot read --config {path}: {exc.strerror or exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"--config {path} is not a TOML file: {exc}") from exc
    actions = {option: action for action in parser._actions for option in action.option_strings
               if option not in ("--config", "--help", "-h", "--traceback")}
    words: list[str] = []
    for key, value in data.items():
        flag = "--" + key.replace("_", "-")
        if flag not in actions:
            close = difflib.get_close_matches(flag, list(actions), n=1, cutoff=0.75)
            hint = f" (did you mean {close[0][2:]}?)" if close else ""
            raise UsageError(f"--config {path}: {key!r} is not a setting of {parser.prog}{hint}")
        if isinstance(actions[flag], argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise UsageError(f"--config {path}: {key} must be true or false")
            words += [flag] * value
        elif isinstance(value, (bool, dict, list)):
            raise UsageError(f"--config {path}: {key} must be a number or a string")
        else:
            words += [flag, str(value)]
    return words


def from_dict(config_class: type, values: dict[str, Any]) -> Any:
    """A config from saved values (config.json, a checkpoint), ignoring names it does not have."""
    names = {f.name for f in fields(config_class)}
    return config_class(**{k: v for k, v in values.items() if k in names})


def resumed(config: Any, saved: dict[str, Any], given: dict[str, Any], args: dict[str, Any]) -> Any:
    """The config of a run resumed from a checkpoint: its saved settings, under the flags given now,
    except those that cannot change (UsageError), and those only the flags given now may set
    (`given_again_on_resume`); the output stays beside the checkpoint."""
    config_class = type(config)
    before = from_dict(config_class, saved)
    for name in config.fixed_on_resume:
        if name in given and given[name] != getattr(before, name):
            raise UsageError(f"--{name.replace('_', '-')} cannot change on --resume (the run used {getattr(before, name)!r})")
    merged = {**asdict(before), **{k: v for k, v in given.items() if k in args}, "resume": config.resume}
    for name in config.given_again_on_resume:
        merged[name] = getattr(config, name)
    if "output_dir" not in given:
        merged["output_dir"] = str(Path(config.resume).resolve().parent)
    return config_class(**merged)


# What the dashboard may set before it starts a run (and how many rounds a new session may ask for):
# the range of each, checked by `check_launch_settings`.
LAUNCH_LIMITS: dict[str, tuple[type, float, float]] = {
    "num_rounds": (int, 1, 100_000), "local_epochs": (int, 1, 100), "batch_size": (int, 1, 4096), "lr": (float, 1e-5, 10.0),
}


def check_launch_settings(changes: dict[str, Any]) -> dict[str, Any]:
    """Launch settings from a web form, typed and within LAUNCH_LIMITS; ValueError names the first bad one."""
    checked: dict[str, Any] = {}
    for name, value in changes.items():
        if name not in LAUNCH_LIMITS:
            raise ValueError(f"{name} cannot be set from the dashboard (only {', '.join(LAUNCH_LIMITS)})")
        kind, low, high = LAUNCH_LIMITS[name]
        try:
            if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
                raise ValueError
            typed = kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be {'a whole number' if kind is int else 'a number'}, not {value!r}") from None
        if not low <= typed <= high:  # also refuses NaN
            raise ValueError(f"{name} {typed:g} is outside {low:g}..{high:g}")
        checked[name] = typed
    return checked


def defaults(config_class: type) -> dict[str, Any]:
    return {f.name: f.default for f in fields(config_class) if f.default is not MISSING}


positive_int = number(int, 1)
non_negative_int = number(int, 0)
positive_float = number(float, 0, positive=True)
non_negative_float = number(float, 0)
fraction = number(float, 0, 1, positive=True)
port = number(int, 0, 65535)
seed = number(int, 0, 2**32 - 1)

NETWORK, FEDERATION, TRAINING, STRATEGY, PRIVACY, SECAGG, COMPRESSION, DATA, TASK, OUTPUT, FAULTS, CONNECTIONS, SECURITY, DASHBOARD = (
    "network", "federation", "training (sent to the clients every round)", "strategy",
    "differential privacy (client level, DP-FedAvg)", "secure aggregation (Bonawitz et al. 2017)",
    "compression (of what crosses the network)", "data", "task (clients bring their own data: --task image or text)",
    "output", "fault tolerance", "connections", "security", "dashboard and sessions",
)


@dataclass
class NetworkSettings:
    """Where the server listens."""

    host: str = setting("127.0.0.1", "address to listen on (0.0.0.0 for every interface)", group=NETWORK)
    server_port: int = setting(50052, "TCP port; 0 picks a free one", group=NETWORK, type=port, metavar="PORT")


@dataclass
class FederationSettings:
    """Who takes part: the clients, how many a round picks, and for how many rounds."""

    num_clients: int = setting(5, "N: clients have ids 1..N, one data partition each", group=FEDERATION, type=positive_int,
                               metavar="N")
    min_clients: int = setting(1, "fewest ready clients to start with, and fewest updates a round needs",
                               group=FEDERATION, type=positive_int, metavar="N")
    time_to_wait_s: float = setting(10.0, "seconds to wait for more clients after the first is ready", group=FEDERATION,
                                    flag="--time-to-wait", type=non_negative_float)
    num_rounds: int = setting(10, "rounds of training", group=FEDERATION, type=positive_int, metavar="N")
    clients_per_round: int | None = setting(
        None, "K: train only K of the ready clients each round, picked by a seeded RNG (default: all)",
        group=FEDERATION, type=positive_int, metavar="K")
    fraction_fit: float | None = setting(
        None, "C: train this fraction of the ready clients each round, at least --min-clients (McMahan et al.'s C)",
        group=FEDERATION, type=fraction, metavar="C")
    sampling: str = setting("fixed", "how --clients-per-round/--fraction-fit pick: fixed (exactly K of the ready "
                                     "clients) or poisson (each ready client with probability C, or K/N)",
                            group=FEDERATION, choices=("fixed", "poisson"))
    over_select: float = setting(1.0, "F: pick F times the K clients a round needs (Bonawitz et al. 2019: 1.3) and "
                                      "close it once K updates are in; the late ones are told theirs was not needed",
                                 group=FEDERATION, type=number(float, 1.0, 10.0), metavar="F")


STALENESS_RULES = "sqrt, constant or poly:A"


def staleness_rule(text: str) -> str:
    """An argparse type: how an update's weight falls with its staleness s (fedsock/buffered.py's
    `staleness_weight`): sqrt (1/√(1+s)), constant (1) or poly:A ((1+s)^-A, A >= 0)."""
    if text in ("sqrt", "constant"):
        return text
    if text.startswith("poly:"):
        try:
            exponent = float(text[5:])
        except ValueError:
            exponent = -1.0
        if math.isfinite(exponent) and exponent >= 0:
            return f"poly:{exponent:g}"
    raise argparse.ArgumentTypeError(f"must be {STALENESS_RULES} (A a number >= 0), got {text!r}")


ASYNC = "asynchronous aggregation (FedBuff: Nguyen et al. 2022)"


@dataclass
class AsyncSettings:
    """Buffered asynchronous aggregation (fedsock/buffered.py): no rounds, a new model version every K updates."""

    async_buffer: int | None = setting(
        None, "K: train asynchronously: every idle client gets the newest model, and the server makes a new version "
              "every K updates, each weighted by its staleness (--num-rounds counts versions)", group=ASYNC,
        type=positive_int, metavar="K")
    staleness_weight: str = setting("sqrt", "async: an update s versions behind the newest counts "
                                            "1/√(1+s) (sqrt, as FedBuff), 1 (constant) or (1+s)^-A (poly:A)",
                                    group=ASYNC, type=staleness_rule, metavar="RULE")
    max_staleness: int = setting(10, "async: an update more versions behind the newest than this is dropped "
                                     "(and its client told so); the server keeps this many old versions",
                                 group=ASYNC, type=non_negative_int, metavar="S")


@dataclass
class TrainingSettings:
    """How the clients train (sent to them in every <MODEL>)."""

    model: str = setting("cnn", "logreg, mlp (2NN) or cnn (McMahan et al. 2017) for images; textcnn or textgru "
                                "for text", group=TRAINING, choices=("logreg", "mlp", "cnn", "textcnn", "textgru"))
    local_epochs: int = setting(1, "epochs each client trains per round", group=TRAINING, type=positive_int, metavar="E")
    batch_size: int = setting(32, "client minibatch size", group=TRAINING, type=positive_int, metavar="B")
    lr: float = setting(0.05, "client SGD learning rate", group=TRAINING, type=positive_float)
    lr_decay: float = setting(1.0, "round r trains at lr·GAMMA^(r-1): the clients' lr falls by this factor every "
                                   "round (1: a constant lr)", group=TRAINING, type=fraction, metavar="GAMMA")
    augment: str = setting("none", "image tasks: affine (each client turns, shifts and zooms each training image at "
                                   "random, every batch: up to 10 degrees, 10%% of its size and 10%% of zoom) or none", group=TRAINING,
                           choices=AUGMENTATIONS)


@dataclass
class StrategySettings:
    """How updates become the next global model (fedsock/strategies.py)."""

    strategy: str = setting("fedavg", "how updates become the next global model (docs: Tune a strategy)",
                            group=STRATEGY, choices=("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad",
                                                     "median", "trimmed-mean", "krum", "multi-krum"))
    proximal_mu: float = setting(0.01, "fedprox: mu of the proximal term (mu/2)·‖w − w_global‖² in each client's loss",
                                 group=STRATEGY, type=non_negative_float, metavar="MU")
    server_lr: float | None = setting(None, "fedavgm/fedadam/fedyogi/fedadagrad: the server's learning rate "
                                            "(default: 1 for fedavgm, 0.03 for fedadam and fedyogi, 0.1 for fedadagrad); with "
                                            "--async-buffer and fedavg or fedprox, η of each version's step (default 1)",
                                      group=STRATEGY, type=positive_float, metavar="ETA")
    server_momentum: float = setting(0.7, "fedavgm: momentum of the server's update", group=STRATEGY,
                                     type=number(float, 0, 1), metavar="BETA")
    beta1: float = setting(0.9, "fedadam/fedyogi/fedadagrad: first-moment decay", group=STRATEGY,
                           type=number(float, 0, 1), metavar="BETA1")
    beta2: float = setting(0.99, "fedadam/fedyogi: second-moment decay", group=STRATEGY,
                           type=number(float, 0, 1), metavar="BETA2")
    tau: float = setting(1e-3, "fedadam/fedyogi/fedadagrad: adaptivity (added to the root of the second moment)",
                         group=STRATEGY, type=positive_float, metavar="TAU")
    trim_fraction: float = setting(0.2, "trimmed-mean: share of the updates cut from each end, per coordinate",
                                   group=STRATEGY, type=number(float, 0, 0.5), metavar="BETA")
    byzantine_clients: int = setting(1, "krum/multi-krum: f, the malicious clients to tolerate per round",
                                     group=STRATEGY, type=non_negative_int, metavar="F")


@dataclass
class DPSettings:
    """Client-level differential privacy (fedsock/privacy.py)."""

    dp_clip: float | None = setting(None, "S: clip each client's update (its model delta) to L2 norm S; turns "
                                          "client-level DP on", group=PRIVACY, type=positive_float, metavar="S")
    dp_noise_multiplier: float | None = setting(None, "z: Gaussian noise of std z*S on each round's sum of clipped "
                                                      "updates", group=PRIVACY, type=positive_float, metavar="Z")
    dp_epsilon: float | None = setting(None, "a privacy budget: pick z so that the planned rounds spend at most this "
                                             "epsilon (instead of --dp-noise-multiplier); stop when it is spent",
                                       group=PRIVACY, type=positive_float, metavar="EPSILON")
    dp_delta: float | None = setting(None, "delta of the guarantee (default: 1e-5, or 1/(10 N) past 10,000 clients)",
                                     group=PRIVACY, type=number(float, 0, 1, positive=True), metavar="DELTA")
    dp_mode: str = setting("central", "where the noise is added: central (the server clips and adds it), local "
                                      "(each client clips and noises its own update) or distributed (with "
                                      "--secure-aggregation: each client adds its share of the noise)", group=PRIVACY,
                           choices=("central", "local", "distributed"))


@dataclass
class SecAggSettings:
    """Secure aggregation (fedsock/secagg.py)."""

    secure_aggregation: bool = setting(False, "the server learns only the sum of each round's updates: masked "
                                              "updates, X25519 keys and Shamir shares among the round's clients",
                                       group=SECAGG)
    secagg_threshold: float = setting(2 / 3, "t, as a share of each round's clients: the round completes if that "
                                             "many stay to the end (t is always more than half, and at least 2)",
                                      group=SECAGG, type=fraction, metavar="F")
    secagg_clip: float = setting(10.0, "each coordinate of a client's delta is clipped to [-C, C] before it is "
                                       "quantised (with DP: S·(1 + 8z), from --dp-clip)", group=SECAGG,
                                 type=positive_float, metavar="C")
    federation: str | None = setting(None, "the federation's public key (federation.pub, from python -m fedsock.enrol): "
                                           "clients sign their secure-aggregation keys with enrolled identities, so "
                                           "that this server cannot substitute them, and check the survivors together",
                                     group=SECAGG, metavar="FILE")


@dataclass
class CompressionSettings:
    """What crosses the network, and how small (fedsock/compression.py)."""

    compression: str = setting("none", "how clients send their updates: none, or the delta from the global model as "
                                       "fp16, int8 (stochastic rounding) or topk (--topk-fraction, error feedback)",
                               group=COMPRESSION, choices=("none", "fp16", "int8", "topk"))
    topk_fraction: float = setting(0.01, "topk: the share of each tensor's entries sent, by magnitude",
                                   group=COMPRESSION, type=fraction, metavar="F")
    compress_broadcast: str = setting("none", "how the server sends the global model: none, fp16 or int8 (the "
                                              "clients and the server then use the rounded weights)",
                                      group=COMPRESSION, choices=("none", "fp16", "int8"))


@dataclass
class DataSettings:
    """The data a --task dataset run splits among its clients, the starting model, the device."""

    dataset: str = setting("mnist", "dataset (MNIST ships with fedsock)", group=DATA,
                           choices=("mnist", "fashion-mnist", "cifar10"))
    data_root: str | None = setting(None, "folder with the dataset files (default: the one shipped in fedsock/data/)",
                                    group=DATA, metavar="DIR")
    partition: str = setting("iid", "how the training set is split among clients: iid, dirichlet (--alpha) or "
                                    "shards (McMahan et al.'s 2 label shards per client)", group=DATA,
                             choices=("iid", "dirichlet", "shards"))
    alpha: float = setting(0.5, "Dirichlet concentration for --partition dirichlet (smaller: more label skew)",
                           group=DATA, type=positive_float, metavar="ALPHA")
    seed: int = setting(0, "seed for the partition, the initial model, client sampling and client shuffling",
                        group=DATA, type=seed, metavar="SEED")
    initial_model: str | None = setting(None, "start from this saved model.pt instead of random weights",
                                        group=DATA, metavar="MODEL_PT")


@dataclass
class TaskSettings:
    """Clients with their own data (--task image or text)."""

    task: str = setting("dataset", "dataset: the server splits --dataset among the clients; image or text: each "
                                   "client trains on its own files (fl_client.py --data)", group=TASK,
                        choices=("dataset", "image", "text"))
    classes: str | None = setting(None, "the class names, comma-separated (image and text tasks), e.g. ham,spam",
                                  group=TASK, metavar="NAMES")
    positive_class: str | None = setting(None, "the class whose precision, recall and F1 are reported (default: the "
                                               "second of two)", group=TASK, metavar="NAME")
    image_size: int = setting(28, "image task: height and width every image is resized to", group=TASK,
                              type=number(int, 4, 512), metavar="PIXELS")
    channels: int = setting(1, "image task: 1 (grey) or 3 (RGB)", group=TASK, type=number(int, 1, 3), metavar="C")
    image_mean: str | None = setting(None, "image task: per-channel mean for normalising, in [0, 1] (default 0.5)",
                                     group=TASK, metavar="MEANS")
    image_std: str | None = setting(None, "image task: per-channel std for normalising (default 0.5)", group=TASK,
                                    metavar="STDS")
    max_tokens: int = setting(30, "text task: tokens per text, left-padded, cut at the right", group=TASK,
                              type=number(int, 1, 4096), metavar="T")
    buckets: int = setting(1 << 15, "text task: hashed token ids (no shared vocabulary)", group=TASK,
                           type=number(int, 2, 1 << 22), metavar="N")
    test_data: str | None = setting(None, "the server's held-out test set for an image or text task, in a client's "
                                          "formats (without it, evaluation is federated only)", group=TASK,
                                    metavar="PATH")
    federated_evaluation: bool = setting(False, "each round, the picked clients evaluate the model they receive on "
                                                "their own test split (always on without a server test set)",
                                         group=TASK)
    max_client_examples: int = setting(10**6, "own data: the most training examples a client may say it holds",
                                       group=TASK, type=positive_int, metavar="N")


@dataclass
class DeviceSettings:
    """Where the server computes (its evaluation of the global model)."""

    device: str = setting("auto", "where the server evaluates the global model", group=DATA,
                          choices=("auto", "cpu", "cuda"))
    threads: int = setting(1, "PyTorch CPU threads for evaluation; 0 keeps PyTorch's default. 1 leaves the cores "
                              "to local clients", group=DATA, type=non_negative_int, metavar="N")


@dataclass
class OutputSettings:
    """The run's files."""

    output_dir: str | None = setting(None, "where metrics.csv, the model, the plot and checkpoints go "
                                           "(default: runs/<timestamp>/)", group=OUTPUT, metavar="DIR")
    resume: str | None = setting(None, "continue a run from its checkpoint.fsck", group=OUTPUT, metavar="CHECKPOINT")
    allow_weaker_resume: bool = setting(False, "let --resume continue with less protection than its checkpoint records "
                                               "(TLS, authentication, secure aggregation, DP), or without checking its "
                                               "seal; a warning says what is dropped", group=OUTPUT)
    quiet: bool = setting(False, "print only the round lines, warnings and errors", group=OUTPUT)
    record_updates: str | None = setting(None, "play the honest-but-curious server: write every update the server "
                                               "holds (under secure aggregation, each round's aggregate) to DIR, for "
                                               "python -m fedsock.attack invert", group=OUTPUT, metavar="DIR")
    tensorboard: str | None = setting(None, "also write each round's metrics as TensorBoard scalars to DIR (tensorboard "
                                            "--logdir DIR shows them live; needs pip install tensorboard)",
                                      group=OUTPUT, metavar="DIR")
    export: str | None = setting(None, "at the end, also write the final model as model.torchscript.pt beside model.pt, "
                                       "input preparation included: torch.jit.load(path)(x) gives the logits",
                                 group=OUTPUT, choices=("torchscript",))


@dataclass
class FaultSettings:
    """What a round does when clients are late or gone."""

    round_timeout_s: float = setting(600.0, "seconds a round waits for updates; late clients are left out of it",
                                     group=FAULTS, flag="--round-timeout", type=positive_float)
    round_retries: int = setting(3, "times a round that got too few updates is retried before the run stops",
                                 group=FAULTS, type=non_negative_int, metavar="N")


@dataclass
class ConnectionSettings:
    """Limits and timeouts of every connection (fedsock/transport.py, fedsock/lobby.py)."""

    handshake_timeout_s: float = setting(10.0, "seconds a new connection has to complete TLS, hello and "
                                               "authentication", group=CONNECTIONS, flag="--handshake-timeout",
                                         type=positive_float)
    heartbeat_s: float = setting(10.0, "seconds between <WAITING> messages; a client gives up on a server silent for "
                                       "three intervals", group=CONNECTIONS, flag="--heartbeat-interval",
                                 type=number(float, 0, 600, positive=True))
    stall_timeout_s: float = setting(30.0, "seconds a frame may go without one byte arriving, or leaving, before its "
                                           "peer counts as stalled and is cut off (a slow, steady transfer never is)",
                                     group=CONNECTIONS, flag="--stall-timeout", type=positive_float)
    max_message_mb: float = setting(64.0, "largest frame accepted; also caps the model size", group=CONNECTIONS,
                                    type=positive_float, metavar="MB")
    max_pending: int = setting(64, "most connections in their handshake at once; a new one evicts the oldest silent "
                                   "one", group=CONNECTIONS, type=positive_int, metavar="N")


@dataclass
class SecuritySettings:
    """TLS and authentication (fedsock/security.py)."""

    tls_cert: str | None = setting(None, "server certificate (PEM); enables TLS", group=SECURITY, metavar="PEM")
    tls_key: str | None = setting(None, "private key of --tls-cert (PEM)", group=SECURITY, metavar="PEM")
    tls_client_ca: str | None = setting(None, "require client certificates signed by this CA (mutual TLS)",
                                        group=SECURITY, metavar="PEM")
    auth_token_file: str | None = setting(None, "shared enrolment secret (or set $FEDSOCK_TOKEN)", group=SECURITY,
                                          metavar="FILE")
    auth_tokens_file: str | None = setting(None, "per-client secrets, lines of 'CLIENT_ID SECRET'", group=SECURITY,
                                           metavar="FILE")


@dataclass
class DashboardSettings:
    """The live page, manual starts and sessions (fedsock/dashboard.py)."""

    dashboard: str | None = setting(None, "serve a live web page of the run at [HOST:]PORT (host 127.0.0.1 unless "
                                          "given; port 0 picks a free one): lobby, rounds, charts, Start and Stop. "
                                          "Open the link it prints: it carries the run's fresh dashboard token",
                                    group=DASHBOARD, metavar="[HOST:]PORT")
    start: str = setting("auto", "auto: training starts --time-to-wait after the first client is ready; manual: when "
                                 "Start training is pressed on the dashboard, or the server gets SIGUSR1",
                         group=DASHBOARD, choices=("auto", "manual"))
    stay: bool = setting(False, "when the rounds are done, keep the clients connected: Train N more rounds on the "
                                "dashboard (or SIGUSR1: as many as the last session) continues from the last model; "
                                "Stop or SIGINT ends the run", group=DASHBOARD)


@dataclass
class ServerConfig(DashboardSettings, SecuritySettings, ConnectionSettings, FaultSettings, OutputSettings,
                   DeviceSettings, TaskSettings, DataSettings, CompressionSettings, SecAggSettings, DPSettings,
                   StrategySettings, AsyncSettings, TrainingSettings, FederationSettings, NetworkSettings):
    """Every setting of a server run (saved as config.json and in every checkpoint), one concern a
    base class; their fields come in the order above (a dataclass collects a base's fields first)."""

    def round_lr(self, number: int) -> float:
        """The clients' lr in round `number` (1-based): lr·lr_decay^(number-1). Never 0, which <MODEL>
        refuses: a decay that would underflow stops at the smallest positive float."""
        return max(self.lr * self.lr_decay ** (number - 1), sys.float_info.min)

    @property
    def fixed_on_resume(self) -> tuple[str, ...]:
        """Settings that decide each client's data and the model: a resumed run must keep them."""
        return ("model", "dataset", "num_clients", "partition", "alpha", "seed", "strategy", "task", "classes",
                "image_size", "channels", "max_tokens", "buckets", "async_buffer")

    @property
    def given_again_on_resume(self) -> tuple[str, ...]:
        """Settings a resume never takes from the checkpoint, only from the flags given now: the files of
        the run's keys, secrets and CAs, and the federation's key (whoever can edit the file could point them at
        their own, and then seal it with them too), and the permission to weaken the run; and how this session
        is run and watched, which the user asks for each time: the dashboard (a resume must not open a web
        page on a saved port unasked), manual starts and sessions, and the recording of updates."""
        return (*(spec.name for spec in fields(SecuritySettings)), "federation", "allow_weaker_resume",
                *(spec.name for spec in fields(DashboardSettings)), "record_updates")


# --------------------------------------------------------------------------- a client

CLIENT_DATA, DP_SGD = "data and device", "example-level privacy (DP-SGD)"
POLICY = "privacy policy: what this client requires; it refuses a server that offers less (fedsock/policy.py)"


@dataclass
class ClientConfig:
    """Every setting of a client (fl_client.py's flags). The run's own settings come from the server's
    <METADATA>: a client says only who it is, where the server is, and what it brings."""

    client_id: int = setting(None, "this client's id, 1..N (N is the server's --num-clients)", group=NETWORK,
                             type=number(int, 1), required=True, metavar="K")
    server_host: str = setting(NetworkSettings.host, "server address (checked against its TLS certificate)", group=NETWORK,
                               metavar="HOST")
    server_port: int = setting(NetworkSettings.server_port, "server TCP port", group=NETWORK, type=number(int, 1, 65535), metavar="PORT")
    connect_timeout_s: float = setting(
        30.0, "seconds to keep trying to join: while no server listens, or a busy one closes the connection before "
              "welcoming this client (start clients before the server if you like)", group=NETWORK,
        flag="--connect-timeout", type=positive_float)
    data: str | None = setting(None, "this client's own data, for a server started with --task image or text: an image "
                                     "folder (PATH/train/<class>/...), a .tsv/.csv of label and text, or an .npz",
                               group=CLIENT_DATA, metavar="PATH")
    data_format: str | None = setting(None, "what --data is, when its name does not say", group=CLIENT_DATA,
                                      choices=("imagefolder", "table", "npz"))
    label_column: str | None = setting(None, "text table: the label's column, a name or a 0-based index (default: "
                                             "found by name, else the first)", group=CLIENT_DATA, metavar="COLUMN")
    text_column: str | None = setting(None, "text table: the text's column (default: found by name, else the second)",
                                      group=CLIENT_DATA, metavar="COLUMN")
    device: str = setting(DeviceSettings.device, "where this client trains", group=CLIENT_DATA,
                          choices=("auto", "cpu", "cuda"))
    data_root: str | None = setting(None, "folder with the dataset files (default: the one shipped in fedsock/data/)",
                                    group=CLIENT_DATA, metavar="DIR")
    threads: int = setting(1, "PyTorch CPU threads; 0 keeps PyTorch's default (one per core). Several clients on one "
                              "machine run fastest with 1 each: more oversubscribes the cores", group=CLIENT_DATA,
                           type=non_negative_int, metavar="N")
    slowdown: float = setting(1.0, "F: make this client's training take F times as long (after training it sleeps F-1 "
                                   "times the training's time), a slow device on purpose for demos and tests",
                              group=CLIENT_DATA, type=number(float, 1), metavar="F")
    max_message_mb: float = setting(ConnectionSettings.max_message_mb, "largest model this client accepts, in MB of weights", group=CLIENT_DATA,
                                    type=positive_float, metavar="MB")
    dp_sgd: bool = setting(False, "train with DP-SGD (Opacus): per-example clipping and noise, and this client's own "
                                  "epsilon for its examples in every round line", group=DP_SGD)
    dp_sgd_noise_multiplier: float = setting(1.0, "DP-SGD: noise std as a multiple of --dp-sgd-clip", group=DP_SGD,
                                             type=positive_float, metavar="Z")
    dp_sgd_clip: float = setting(1.0, "DP-SGD: clip each example's gradient to this L2 norm", group=DP_SGD,
                                 type=positive_float, metavar="C")
    dp_sgd_delta: float = setting(1e-5, "DP-SGD: delta of this client's guarantee (below 1/its examples)",
                                  group=DP_SGD, type=number(float, 0, 1, positive=True), metavar="DELTA")
    quiet: bool = setting(False, "no progress bar and no <WAITING> lines, only a line per round", group=OUTPUT)
    progress_every: int | None = setting(
        None, "a progress line each time this many percent of a round's training is done (for logs and demos, "
              "where a bar cannot be drawn)", group=OUTPUT, type=number(int, 1, 100), metavar="PERCENT")
    tls: bool = setting(False, "use TLS, trusting the system's certificate authorities", group=SECURITY)
    tls_ca: str | None = setting(None, "use TLS, trusting the server certificate's CA in this PEM file", group=SECURITY,
                                 metavar="PEM")
    tls_cert: str | None = setting(None, "client certificate for mutual TLS (PEM)", group=SECURITY, metavar="PEM")
    tls_key: str | None = setting(None, "private key of --tls-cert (PEM)", group=SECURITY, metavar="PEM")
    tls_insecure: bool = setting(False, "use TLS without checking the server's certificate (unsafe)", group=SECURITY)
    auth_token_file: str | None = setting(None, f"enrolment secret file (or set ${security.TOKEN_ENV})", group=SECURITY,
                                          metavar="FILE")
    identity: str | None = setting(None, "this client's identity (client-K.identity, from python -m fedsock.enrol): it "
                                         "signs its secure-aggregation keys and checks its peers', and takes part only "
                                         "in secure aggregation with identities", group=POLICY, metavar="FILE")
    require_secure_aggregation: bool = setting(False, "take part only if the server sees just the sum of each round's "
                                                      "updates", group=POLICY)
    min_round_clients: int | None = setting(None, "take part only in secure rounds of at least N clients",
                                            group=POLICY, type=number(int, 2), metavar="N")
    min_threshold: int | None = setting(None, "take part only in secure rounds whose threshold is at least T",
                                        group=POLICY, type=number(int, 2), metavar="T")
    require_dp: bool = setting(False, "take part only with DP noise that this client adds itself (local or "
                                      "distributed DP; central noise is the server's word)", group=POLICY)
    min_noise_multiplier: float | None = setting(None, "take part only if the DP noise on each round's sum is at "
                                                       "least Z times the clip (implies --require-dp)", group=POLICY,
                                                 type=positive_float, metavar="Z")
    max_epsilon: float | None = setting(None, "leave before a round that would take this client's own epsilon (its "
                                              "rounds, no sampling amplification) past E", group=POLICY,
                                        type=positive_float, metavar="E")
    policy_delta: float = setting(1e-5, "delta of --max-epsilon", group=POLICY,
                                  type=number(float, 0, 1, positive=True), metavar="DELTA")

    @property
    def who(self) -> str:
        return f"client {self.client_id}"

    @property
    def address(self) -> str:
        return f"{self.server_host}:{self.server_port}"
