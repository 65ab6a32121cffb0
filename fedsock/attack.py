"""The honest-but-curious server: what one client's update gives away, measured.

    python fl_simulate.py ... --record-updates run/updates      # or fl_server.py --record-updates
    python -m fedsock.attack invert run/updates/round-1-client-3.update --truth --picture recon.png

A server that follows the protocol still holds every update it aggregates. `--record-updates`
makes that explicit: the engine writes each update as the server received it (after decoding a
compressed one, noise included when the client added it; under secure aggregation only the
round's aggregate, the one thing such a server holds) beside the round's global model and the
training settings it sent. `invert` then reconstructs the client's training images from that
update alone, after

- Zhu et al. 2019, "Deep Leakage from Gradients" (match the update with dummy data), and
- Geiping et al. 2020, "Inverting Gradients" (cosine distance, a total-variation prior, Adam
  on signed gradients, and the client's whole local training unrolled, so an update of several
  SGD steps is matched step by step, not as one gradient);

the labels first, from the last layer's bias (Zhao et al. 2020, iDLG: the true class is the one
whose bias moved up; for a batch, each class's count from how far it moved). The server knows
all it needs: the model, the learning rate, epochs and batch size it sent, and the example
count the client reported.

`--truth` recomputes the client's examples from the run's config.json, as only a test harness
(or the client) could: fedsock partitions with a seed every client knows, so the harness can
score each reconstruction (PSNR and SSIM per image, best match first) and draw truth and
reconstruction side by side. bench/attack.py runs the cases of docs/tutorials/what-updates-leak.md's table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fedsock.console import ExitStatus, UsageError, number, run_main
from socket_methods import ProtocolError, decode_weights, encode_message, encode_weights, frame_header

FORMAT = "fedsock recorded update 1"
SUFFIX = ".update"


# --------------------------------------------------------------------------- what the server records


@dataclass
class Observation:
    """What a curious server holds about one client's update (or, under secure aggregation, a round's sum)."""

    round: int
    client: int | str  # a client id, or "aggregate"
    model: str
    input_shape: tuple[int, ...]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    settings: dict[str, Any]  # the <MODEL>'s fit settings: local_epochs, batch_size, lr, ...
    num_examples: int  # as the client reported it (the round's total for an aggregate)
    clients: int  # updates behind these weights: 1, or the aggregate's count
    defences: dict[str, Any]  # what was in force: dp_mode, dp_noise_multiplier, compression, secure_aggregation
    global_weights: dict[str, torch.Tensor]
    weights: dict[str, torch.Tensor]

    def delta(self) -> dict[str, torch.Tensor]:
        return {name: self.weights[name].float() - start.float() for name, start in self.global_weights.items()}


def write_observation(path: Path, obs: Observation) -> None:
    """Three frames, as on the wire (8-byte big-endian length, then the payload): a JSON header naming the
    fields and both weight layouts, the global model's bytes, the update's bytes. Nothing is pickled."""
    start_layout, start_blob = encode_weights(obs.global_weights)
    update_layout, update_blob = encode_weights(obs.weights)
    fields = {name: getattr(obs, name) for name in ("round", "client", "model", "num_classes", "settings",
                                                      "num_examples", "clients", "defences")}
    head = encode_message(FORMAT, **fields, input_shape=list(obs.input_shape), mean=list(obs.mean),
                          std=list(obs.std), global_layout=start_layout, update_layout=update_layout)
    with open(path, "wb") as out:
        out.write(head)
        for blob in (start_blob, update_blob):
            out.write(frame_header(len(blob)))
            out.write(blob)


class UpdateRecorder:
    """`--record-updates DIR`: the curious server's notebook. Each round, every update as the server holds it
    (round-R-client-K.update); under secure aggregation, where the server holds no single update, the
    round's aggregate instead (round-R-aggregate.update). Written synchronously, while the update's buffer
    is still valid: a demonstration and research flag, not for a production run's hot path."""

    def __init__(self, directory: str | Path, config: Any, task: Any, events: Any = None):
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--record-updates: cannot make {directory}: {exc.strerror or exc}") from exc
        self.model = dict(model=config.model, input_shape=tuple(task.input_shape), num_classes=task.num_classes,
                          mean=tuple(getattr(task, "mean", ())), std=tuple(getattr(task, "std", ())))
        dp = config.dp_clip is not None
        self.defences = {"secure_aggregation": bool(config.secure_aggregation),
                         "dp_mode": config.dp_mode if dp else "none",
                         "dp_clip": config.dp_clip, "dp_noise_multiplier": config.dp_noise_multiplier if dp else 0.0,
                         "compression": config.compression}
        self.events = events
        self.started: tuple[int, Mapping[str, torch.Tensor], dict] | None = None
        self.failed = False
        if events is not None:
            events.notice(f"--record-updates: every update this server holds goes to {self.directory} (what a "
                          f"curious server could keep; python -m fedsock.attack invert reads it)", warning=True)

    def start(self, number: int, weights: Mapping[str, torch.Tensor], settings: Mapping[str, Any]) -> "UpdateRecorder":
        """A round begins: its model and the settings sent with it. The recorder, for the round to hold."""
        self.started = (number, weights, {k: v for k, v in settings.items() if isinstance(v, (int, float, str))})
        return self

    def aggregate(self, number: int, weights: Mapping[str, torch.Tensor], reported: Mapping[int, dict]) -> None:
        self.update(number, "aggregate", weights, sum(r["num_examples"] for r in reported.values()),
                    clients=len(reported))

    def update(self, number: int, client: int | str, weights: Mapping[str, torch.Tensor], num_examples: int,
               clients: int = 1) -> None:
        if self.failed or self.started is None or self.started[0] != number:
            return
        _, start, settings = self.started
        obs = Observation(number, client, self.model["model"], self.model["input_shape"], self.model["num_classes"],
                          self.model["mean"], self.model["std"], settings, num_examples, clients, self.defences,
                          dict(start), dict(weights))
        name = f"round-{number}-{'aggregate' if client == 'aggregate' else f'client-{client}'}{SUFFIX}"
        try:
            write_observation(self.directory / name, obs)
        except OSError as exc:  # the run goes on; the notebook stops
            self.failed = True
            if self.events is not None:
                self.events.notice(f"--record-updates: cannot write {self.directory / name}: "
                                   f"{exc.strerror or exc}; no more updates are recorded", warning=True)


def _frames(raw: memoryview, count: int) -> list[memoryview]:
    frames, at = [], 0
    for _ in range(count):
        if at + 8 > len(raw):
            raise ProtocolError(f"it ends inside frame {len(frames) + 1} of {count}")
        size = int.from_bytes(raw[at:at + 8], "big")
        if at + 8 + size > len(raw):
            raise ProtocolError(f"frame {len(frames) + 1} says {size} bytes; {len(raw) - at - 8} follow")
        frames.append(raw[at + 8:at + 8 + size])
        at += 8 + size
    if at != len(raw):
        raise ProtocolError(f"{len(raw) - at} bytes follow its last frame")
    return frames


def read_observation(path: str | Path) -> Observation:
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        head_bytes, start_blob, update_blob = _frames(memoryview(bytearray(raw)), 3)
        head = json.loads(bytes(head_bytes).decode("utf-8"))
        if not isinstance(head, dict):
            raise ProtocolError("its first frame is not a JSON object")
        if head.get("header") != FORMAT:
            raise ProtocolError(f"it starts with {str(head.get('header'))[:40]!r}, not {FORMAT!r}")
        start = decode_weights(head["global_layout"], start_blob)
        update = decode_weights(head["update_layout"], update_blob)
        if start.keys() != update.keys():
            raise ProtocolError("its model and its update name different tensors")
        return Observation(int(head["round"]), head["client"], str(head["model"]), tuple(head["input_shape"]),
                           int(head["num_classes"]), tuple(head["mean"]), tuple(head["std"]), dict(head["settings"]),
                           int(head["num_examples"]), int(head["clients"]), dict(head["defences"]), start, update)
    except (ProtocolError, KeyError, TypeError, ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path} is not an update that --record-updates wrote: {exc}") from exc


# --------------------------------------------------------------------------- the attack


def per_client(obs: Observation, count: int) -> int:
    """Examples behind each client's share of `count`: all of them for one client's update; for an aggregate
    inverted whole (count = every example of the round), each client's."""
    return max(1, count // obs.clients) if obs.clients > 1 and count >= obs.num_examples else count


def steps_of(obs: Observation, count: int) -> int:
    """The SGD steps behind each client's update: its epochs times its batches per epoch."""
    batch = int(obs.settings["batch_size"])
    return int(obs.settings["local_epochs"]) * math.ceil(per_client(obs, count) / batch)


def output_bias(obs: Observation) -> str:
    """The last layer's bias: the last one-dimensional tensor with one entry per class."""
    names = [name for name, t in obs.global_weights.items() if t.dim() == 1 and t.numel() == obs.num_classes]
    if not names:
        raise UsageError(f"the {obs.model} model has no output bias of {obs.num_classes} entries to read labels from")
    return names[-1]


def infer_labels(obs: Observation, count: int) -> list[int]:
    """The batch's labels, read from how the output bias moved (iDLG, extended to batches).

    Cross-entropy's gradient on the output bias is the batch mean of softmax − onehot(y): each example
    pulls its class's entry down by 1/B, the softmax pushes every entry up by its mean probability p̄.
    So B·(−gradient) ≈ count − B·p̄: the examples are dealt one at a time to the class with the largest
    remainder. Exact for one example (Zhao et al. 2020: the one entry that went down); for a batch,
    close while the model's p̄ is near uniform (round 1). Over several steps the model fits the batch
    and every entry shrinks, so a class of one example can be missed: `invert` says what it read, and
    a harness can compare. An aggregate of equal clients is the mean of their gradients: the same
    reading, over all their examples."""
    name = output_bias(obs)
    gradient = -obs.delta()[name].double() / (float(obs.settings["lr"]) * steps_of(obs, count))
    remainder = -gradient * count
    labels = []
    for _ in range(count):
        c = int(torch.argmax(remainder))
        labels.append(c)
        remainder[c] -= 1.0
    return sorted(labels)


def unrolled_delta(model: torch.nn.Module, start: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, *,
                   epochs: int, batch_size: int, lr: float) -> dict[str, torch.Tensor]:
    """The client's local training (plain SGD, as neural_net_helper.train), written as a function of its
    data so that the update it would send can be differentiated with respect to the data. Batches are
    taken in order: the data are free variables, so any order is as good (for several batches over
    several epochs, the client's reshuffles are not replayed)."""
    params = dict(start)
    for _ in range(epochs):
        for at in range(0, len(x), batch_size):
            loss = F.cross_entropy(torch.func.functional_call(model, params, (x[at:at + batch_size],)),
                                   y[at:at + batch_size])
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
            params = {name: p - lr * g for (name, p), g in zip(params.items(), grads)}
    return {name: params[name] - start[name] for name in start}


def averaged_delta(model: torch.nn.Module, start: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                   share: int, **training) -> dict[str, torch.Tensor]:
    """The mean of the updates of clients that each trained on `share` of the examples (one client: its own)."""
    if share >= len(x):
        return unrolled_delta(model, start, x, y, **training)
    deltas = [unrolled_delta(model, start, x[at:at + share], y[at:at + share], **training)
              for at in range(0, len(x), share)]
    return {name: sum(d[name] for d in deltas) / len(deltas) for name in start}


def total_variation(x: torch.Tensor) -> torch.Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


@dataclass
class Inversion:
    images: torch.Tensor  # normalised, as the model sees them
    labels: list[int]
    distance: float  # 1 − the cosine between the update and the reconstruction's update
    seconds: float


def invert(obs: Observation, *, count: int | None = None, iterations: int = 1000, tv: float = 1e-2,
           step: float = 0.1, seed: int = 0, labels: Sequence[int] | None = None, report=None) -> Inversion:
    """Reconstruct `count` training images (default: the examples the client reported, or per client for an
    aggregate) whose update, through the same local training, points where the observed update points.
    The labels are `infer_labels`' reading unless given.

    An aggregate can also be inverted whole (count = the round's examples): the images are then dealt
    to its clients in equal shares, each share trained as that client would, and the deltas averaged,
    which is what the server holds (FedAvg of clients with equal counts)."""
    import neural_net_helper as nnh

    started = time.perf_counter()
    count = count or max(1, round(obs.num_examples / max(obs.clients, 1)))
    model = nnh.build_model(obs.model, _Spec(obs.input_shape, obs.num_classes))
    names = [name for name, _ in model.named_parameters()]
    observed = obs.delta()
    target = {name: observed[name].detach() for name in names}
    if math.sqrt(sum(float(t.pow(2).sum()) for t in target.values())) == 0:
        raise UsageError("the update equals the model it started from: nothing to invert")
    problem = _Problem(obs, model, names, target, count, tv, step, seed)
    labels = list(labels) if labels is not None else infer_labels(obs, count)
    images, distance = problem.optimise(labels, iterations, report)
    return Inversion(images, labels, distance, time.perf_counter() - started)


@dataclass
class _Problem:
    """One inversion's fixed parts: the observed update, the model, the settings it was trained with."""

    obs: Observation
    model: torch.nn.Module
    names: list[str]
    target: dict[str, torch.Tensor]
    count: int
    tv: float
    step: float
    seed: int

    def optimise(self, labels: list[int], iterations: int, report=None) -> tuple[torch.Tensor, float]:
        obs, names, target = self.obs, self.names, self.target
        start = {name: obs.global_weights[name].float().requires_grad_(True) for name in names}
        target_norm = math.sqrt(sum(float(t.pow(2).sum()) for t in target.values()))
        y = torch.tensor(labels, dtype=torch.long)
        generator = torch.Generator().manual_seed(self.seed)
        x = torch.randn((self.count, *obs.input_shape), generator=generator).requires_grad_(True)
        mean, std = torch.tensor(obs.mean).view(1, -1, 1, 1), torch.tensor(obs.std).view(1, -1, 1, 1)
        low, high = (0 - mean) / std, (1 - mean) / std
        optimizer = torch.optim.Adam([x], lr=self.step)
        milestones = [int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
        schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
        training = dict(epochs=int(obs.settings["local_epochs"]), batch_size=int(obs.settings["batch_size"]),
                        lr=float(obs.settings["lr"]))
        share = per_client(obs, self.count)
        # A top-k update names the coordinates it kept: the attacker matches those, and ignores the rest.
        kept = {n: target[n] != 0 for n in names} if obs.defences.get("compression") == "topk" else None
        distance = float("nan")
        for it in range(iterations):
            delta = averaged_delta(self.model, start, x, y, share, **training)
            if kept is not None:
                delta = {n: d * kept[n] for n, d in delta.items()}
            dot = sum((delta[n] * target[n]).sum() for n in names)
            norm = torch.sqrt(sum(delta[n].pow(2).sum() for n in names)) + 1e-12
            cosine_distance = 1 - dot / (norm * target_norm)
            loss = cosine_distance + self.tv * total_variation(x)
            (grad,) = torch.autograd.grad(loss, [x])
            x.grad = grad.sign()  # Geiping et al.: signed gradients, as in adversarial attacks
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                x.copy_(torch.maximum(torch.minimum(x, high), low))
            distance = float(cosine_distance.detach())
            if report is not None and (it + 1) % max(1, iterations // 10) == 0:
                report(it + 1, distance)
        return x.detach(), distance


@dataclass
class _Spec:
    input_shape: tuple[int, ...]
    num_classes: int


# --------------------------------------------------------------------------- scoring


def pixels(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalised images back to [0, 1]."""
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x * s + m).clamp(0, 1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio of two images in [0, 1], in dB (higher: closer)."""
    mse = float((a.double() - b.double()).pow(2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Structural similarity (Wang et al. 2004) of two images in [0, 1], shaped C×H×W: an 11×11 Gaussian
    window of σ 1.5, K1 0.01, K2 0.03, the mean over the image and its channels (1: identical)."""
    coords = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-coords.pow(2) / (2 * 1.5 ** 2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).expand(a.shape[0], 1, 11, 11).contiguous()
    x, y = a.double().unsqueeze(0), b.double().unsqueeze(0)
    blur = lambda t: F.conv2d(t, window, groups=a.shape[0])  # noqa: E731 (valid windows only, as skimage)
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    value = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return float(value.mean())


@dataclass
class Match:
    truth: int
    reconstruction: int
    psnr: float
    ssim: float


def match(truth: torch.Tensor, reconstruction: torch.Tensor) -> list[Match]:
    """Pair each true image with a reconstruction (the order of a batch is lost in its update): the best
    PSNR first, each used once (greedy). Images in [0, 1]. In the truth's order."""
    scores = [[psnr(t, r) for r in reconstruction] for t in truth]
    pairs, used_t, used_r = [], set(), set()
    for value, i, j in sorted(((scores[i][j], i, j) for i in range(len(truth)) for j in range(len(reconstruction))),
                              reverse=True):
        if i in used_t or j in used_r:
            continue
        used_t.add(i), used_r.add(j)
        pairs.append(Match(i, j, value, ssim(truth[i], reconstruction[j])))
    return sorted(pairs, key=lambda m: m.truth)


# --------------------------------------------------------------------------- the command


def load_truth(path: str | Path, obs: Observation) -> torch.Tensor:
    """The client's true training images, in [0, 1], from its own data file (an .npz with x_train: what
    fl_client.py --data reads; the harness holds it, the server never does)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            images = archive["x_train"]
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"--truth {path}: not an .npz with x_train ({exc})") from exc
    shape = tuple(obs.input_shape)
    if images.ndim == len(shape):  # N×H×W for one channel
        images = images[:, None]
    if images.shape[1:] != shape or images.dtype != np.uint8:
        raise UsageError(f"--truth {path}: x_train is {images.dtype} {images.shape[1:]}, the model takes uint8 {shape}")
    return torch.from_numpy(images.astype(np.float32) / 255.0)


def draw(path: str | Path, truth: torch.Tensor | None, reconstruction: torch.Tensor, matches: list[Match] | None,
         title: str) -> None:
    """Truth above, reconstruction below (paired by `match`), each with its PSNR; or the reconstruction alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = len(reconstruction) if truth is None else len(truth)
    rows = 1 if truth is None else 2
    fig, axes = plt.subplots(rows, columns, figsize=(1.2 * columns + 0.6, 1.35 * rows + 0.5), squeeze=False)
    order = [m.reconstruction for m in matches] if matches else list(range(columns))
    for col in range(columns):
        if truth is not None:
            axes[0][col].imshow(truth[col].permute(1, 2, 0).squeeze(-1), cmap="gray", vmin=0, vmax=1)
        recon = reconstruction[order[col]] if col < len(order) else torch.zeros_like(reconstruction[0])
        axes[rows - 1][col].imshow(recon.permute(1, 2, 0).squeeze(-1), cmap="gray", vmin=0, vmax=1)
        if matches:
            axes[1][col].set_title(f"{matches[col].psnr:.1f} dB", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    if truth is not None:
        axes[0][0].set_ylabel("truth", fontsize=8)
        axes[1][0].set_ylabel("attack", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    from fedsock.console import HelpFormatter

    parser = argparse.ArgumentParser(prog="python -m fedsock.attack", formatter_class=HelpFormatter,
                                     description=__doc__.split("\n\n")[0], allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    invert_ = commands.add_parser("invert", formatter_class=HelpFormatter, allow_abbrev=False,
                                  help="reconstruct a client's training images from a recorded update",
                                  description="Reconstruct a client's training images from one update that "
                                              "--record-updates wrote (Geiping et al. 2020).")
    invert_.add_argument("update", metavar="UPDATE", help="a .update file from fl_server.py/fl_simulate.py "
                                                          "--record-updates DIR")
    invert_.add_argument("--truth", metavar="NPZ", help="the client's own data file (x_train), to score each "
                                                        "reconstruction: only a test harness has it")
    invert_.add_argument("--picture", metavar="PNG", help="draw the reconstruction (above it the truth, with --truth)")
    invert_.add_argument("--iterations", type=number(int, 1, 10**7), default=1000, help="optimisation steps")
    invert_.add_argument("--count", type=number(int, 1, 4096), help="images to reconstruct (default: the examples the "
                                                             "client reported; per client for an aggregate)")
    invert_.add_argument("--tv", type=number(float, 0, 1e6), default=1e-2, help="weight of the total-variation prior")
    invert_.add_argument("--seed", type=int, default=0, help="seed of the dummy images the attack starts from")
    invert_.add_argument("--traceback", action="store_true", help="show a full traceback on errors")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    obs = read_observation(args.update)
    if len(obs.input_shape) != 3:
        raise UsageError(f"{args.update}: the {obs.model} model takes text; invert reconstructs images")
    truth = load_truth(args.truth, obs) if args.truth else None
    count = args.count or (len(truth) if truth is not None and obs.clients == 1 else None)
    who = f"client {obs.client}" if obs.client != "aggregate" else f"the aggregate of {obs.clients} clients"
    defences = ", ".join(f"{k} {v}" for k, v in obs.defences.items() if v not in (None, False, "none", 0.0)) or "none"
    print(f"attack: round {obs.round}, {who}: {obs.model}, {obs.num_examples} examples, "
          f"{obs.settings.get('local_epochs')} epoch(s) of batch {obs.settings.get('batch_size')}, lr "
          f"{obs.settings.get('lr')}; defences: {defences}", flush=True)
    result = invert(obs, count=count, iterations=args.iterations, tv=args.tv, seed=args.seed,
                    report=lambda it, d: print(f"attack: step {it}/{args.iterations}: 1 - cosine {d:.4f}",
                                               flush=True))
    images = pixels(result.images, obs.mean, obs.std)
    print(f"attack: labels read from the output bias: {', '.join(map(str, result.labels))}; "
          f"{result.seconds:.1f} s", flush=True)
    matches = None
    if truth is not None:
        matches = match(truth, images)
        for m in matches:
            print(f"attack: image {m.truth + 1}: PSNR {m.psnr:.1f} dB, SSIM {m.ssim:.3f}")
        print(f"attack: mean PSNR {np.mean([m.psnr for m in matches]):.1f} dB, mean SSIM "
              f"{np.mean([m.ssim for m in matches]):.3f} over {len(matches)} images")
    if args.picture:
        title = f"{obs.model}, round {obs.round}, {who}; defences: {defences}"
        try:
            draw(args.picture, truth, images, matches, title)
        except OSError as exc:
            raise UsageError(f"--picture {args.picture}: {exc.strerror or exc}") from exc
        print(f"attack: picture in {args.picture}")
    return ExitStatus.OK


def cli() -> int:
    return run_main("attack", main)


if __name__ == "__main__":
    sys.exit(cli())
