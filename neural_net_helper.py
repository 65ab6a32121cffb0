"""Models, local training, evaluation and the choice of device."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from client_helper import DatasetInfo
from fedsock.config import AUGMENTATIONS
from fedsock.console import UsageError

MODELS = ("logreg", "mlp", "cnn", "textcnn", "textgru")
IMAGE_MODELS, TEXT_MODELS = ("logreg", "mlp", "cnn"), ("textcnn", "textgru")
DEVICES = ("auto", "cpu", "cuda")


class LogReg(nn.Module):
    """Multinomial logistic regression: the original tool's Linear(784, 10)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        self.linear = nn.Linear(math.prod(input_shape), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


class MLP(nn.Module):
    """The "2NN" of McMahan et al. 2017: two hidden layers of 200 units."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        self.fc1 = nn.Linear(math.prod(input_shape), 200)
        self.fc2 = nn.Linear(200, 200)
        self.fc3 = nn.Linear(200, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc3(F.relu(self.fc2(x)))


class CNN(nn.Module):
    """The MNIST CNN of McMahan et al. 2017 (1,663,370 parameters on MNIST).

    Two 5x5 convolutions of 32 and 64 channels ("same" padding), each followed by
    2x2 max-pooling, a 512-unit dense layer and the output layer.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        channels, height, width = input_shape
        self.conv1 = nn.Conv2d(channels, 32, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5, padding=2)
        self.fc1 = nn.Linear(64 * (height // 4) * (width // 4), 512)
        self.fc2 = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class TextCNN(nn.Module):
    """Hashed tokens -> a 32-wide embedding -> 1-D convolutions over 2 and 3 tokens (64 filters each,
    so it sees word pairs and triples) -> max over the text -> the classes (Kim 2014, smaller)."""

    def __init__(self, max_tokens: int, buckets: int, num_classes: int, width: int = 32, filters: int = 64):
        super().__init__()
        self.embedding = nn.Embedding(buckets, width, padding_idx=0)
        self.pairs = nn.Conv1d(width, filters, kernel_size=2, padding=1)
        self.triples = nn.Conv1d(width, filters, kernel_size=3, padding=1)
        self.out = nn.Linear(2 * filters, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embedding(tokens).transpose(1, 2)  # (N, width, T)
        features = [F.relu(conv(x)).amax(dim=2) for conv in (self.pairs, self.triples)]
        return self.out(torch.cat(features, dim=1))


class TextGRU(nn.Module):
    """Hashed tokens -> a 32-wide embedding -> a GRU of 64 -> its last state -> the classes."""

    def __init__(self, max_tokens: int, buckets: int, num_classes: int, width: int = 32, hidden: int = 64):
        super().__init__()
        self.embedding = nn.Embedding(buckets, width, padding_idx=0)
        self.gru = nn.GRU(width, hidden, batch_first=True)
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        _, last = self.gru(self.embedding(tokens))  # left-padded: the last step is the text's end
        return self.out(last[0])


def build_model(name: str, spec, seed: int = 0) -> nn.Module:
    """A model by name for a task (or a DatasetInfo), initialised from `seed` so every process builds the same one."""
    torch.manual_seed(seed)
    if name in TEXT_MODELS:
        return {"textcnn": TextCNN, "textgru": TextGRU}[name](spec.max_tokens, spec.buckets, spec.num_classes)
    return {"logreg": LogReg, "mlp": MLP, "cnn": CNN}[name](spec.input_shape, spec.num_classes)


def model_nbytes(name: str, spec) -> int:
    """The bytes of a model's weights, counted on PyTorch's meta device (shapes, no memory): a peer that
    describes a huge model is refused before anything of it is allocated."""
    with torch.device("meta"):
        model = build_model(name, spec)
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def model_fits(name: str, kind: str) -> bool:
    return (name in TEXT_MODELS) == (kind == "text")


def choose_device(preference: str) -> torch.device:
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but PyTorch sees no CUDA device here")
    return torch.device(preference)


def to_tensors(images: np.ndarray, labels: np.ndarray, info: DatasetInfo, device: torch.device):
    """Normalised float32 images (or int64 token ids, for a text task) and int64 labels, on the device,
    once for the whole run."""
    if getattr(info, "kind", "image") == "text":
        return (torch.from_numpy(np.ascontiguousarray(images, dtype=np.int64)).to(device),
                torch.from_numpy(np.ascontiguousarray(labels)).to(device))
    images = np.require(images, requirements=["C", "W"])  # torch wants writable memory (copies only if not)
    x = torch.from_numpy(images).to(device=device, dtype=torch.float32).div_(255)
    mean = torch.tensor(info.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(info.std, device=device).view(1, -1, 1, 1)
    return (x - mean) / std, torch.from_numpy(np.ascontiguousarray(labels)).to(device)


def get_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach() for name, t in model.state_dict().items()}


def set_weights(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy received tensors (CPU views of the receive buffer) into the model, on its device."""
    model.load_state_dict(tensors, strict=True)


def random_affine(x: torch.Tensor, generator: torch.Generator, degrees: float = 10.0, shift: float = 0.1,
                  scale: float = 0.1) -> torch.Tensor:
    """Each image of the batch `x` (N, C, H, W) turned by up to ±`degrees`, moved by up to ±`shift`
    of its size along each axis and zoomed by up to ±`scale`, all drawn uniformly from `generator`;
    the edge pixels fill what moves in. The usual augmentation for small medical images (MedMNIST's
    training recipe is of this kind): a model then learns the anatomy, not where one scanner put it."""
    n = len(x)
    draws = torch.rand(n, 4, generator=generator).mul_(2).sub_(1).to(device=x.device, dtype=x.dtype)  # U(-1, 1)
    angle = draws[:, 0] * math.radians(degrees)
    zoom = 1 + draws[:, 1] * scale
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    move_x, move_y = draws[:, 2] * 2 * shift, draws[:, 3] * 2 * shift  # the grid spans -1..1: a size is 2
    theta = torch.stack([torch.stack([cos, -sin, move_x], 1), torch.stack([sin, cos, move_y], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="border", align_corners=False)


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    proximal_mu: float = 0.0,
    augment: str = "none",
    progress: Callable[[int], None] | None = None,
) -> float:
    """Minibatch SGD, as in FedAvg. Returns the mean cross-entropy over every example of every
    epoch (each batch's loss as computed before its step; the proximal term not included).

    Each epoch shuffles the examples once, with a generator seeded from `seed`, into one
    contiguous copy whose batches are slices: a gather per epoch, not one per batch. A single
    batch of the whole set (batch_size >= len(x), the original tool's recipe) is not shuffled
    at all: its mean gradient does not depend on the order of the examples.

    `proximal_mu` > 0 is FedProx (Li et al. 2020): the loss gains (mu/2)||w - w_start||^2,
    whose gradient mu (w - w_start) is added to each step's gradients directly.
    `augment` "affine" passes each batch of images through `random_affine` (drawn from the same
    generator) before the step.
    `progress(batches_done)` is called after every batch.
    """
    if augment not in AUGMENTATIONS or (augment != "none" and x.dim() != 4):
        raise ValueError(f"augmentation {augment!r} is not one of {', '.join(AUGMENTATIONS)} for these examples")
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=lr)
    anchors = [p.detach().clone() for p in parameters] if proximal_mu > 0 else None
    generator = torch.Generator().manual_seed(seed)
    total_loss = torch.zeros((), device=x.device)
    done = 0
    for _ in range(epochs):
        if batch_size >= len(x):
            xs, ys = x, y
        else:
            order = torch.randperm(len(x), generator=generator).to(x.device)
            xs, ys = x[order], y[order]
        for start in range(0, len(x), batch_size):
            xb, yb = xs[start : start + batch_size], ys[start : start + batch_size]
            if augment == "affine":
                xb = random_affine(xb, generator)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            if anchors is not None:
                for p, anchor in zip(parameters, anchors):
                    p.grad.add_(p.detach() - anchor, alpha=proximal_mu)
            optimizer.step()
            total_loss += loss.detach() * len(xb)
            done += 1
            if progress is not None:
                progress(done)
    return float(total_loss) / (epochs * len(x))


def batches_per_round(num_examples: int, epochs: int, batch_size: int) -> int:
    return epochs * math.ceil(num_examples / batch_size)


def warm_up(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """Pay PyTorch's first-use costs now (the first backward pass, the optimiser, the kernels), on
    a few examples: a client then trains its first round as fast as the others. The weights it
    changes are replaced by the global model before every round."""
    few = slice(0, min(len(x), 32))
    train(model, x[few], y[few], epochs=1, batch_size=32, lr=1e-9, seed=0)
    evaluate(model, x[few], y[few])


@dataclass
class LocalData:
    """A client's own examples, as tensors on its device: what it trains on, and what it holds out."""

    x: torch.Tensor
    y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def local_round(model: nn.Module, data: LocalData, weights: dict[str, torch.Tensor], *, epochs: int, batch_size: int,
                lr: float, seed: int, proximal_mu: float = 0.0, augment: str = "none", dp_clip: float | None = None,
                dp_noise_std: float = 0.0, dp_sgd=None,
                progress: Callable[[int], None] | None = None) -> dict[str, float]:
    """What a client does with a round's model: load it, train on its data, test on its held-out
    split. The model then holds the update; returns train_loss, local_test_accuracy, fit_seconds.

    With `dp_clip` (client-level DP, local mode) the update it holds is then the received weights
    plus the delta clipped to that L2 norm, plus Gaussian noise of std `dp_noise_std`. With
    `dp_sgd` (a fedsock.privacy.ExampleLevelDP) it trains with DP-SGD instead."""
    started = time.perf_counter()
    set_weights(model, weights)
    if dp_sgd is not None:
        if proximal_mu or augment != "none":
            raise ValueError("DP-SGD goes with neither FedProx's proximal term nor augmentation here")
        loss = dp_sgd.train(data.x, data.y, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, progress=progress)
    else:
        loss = train(model, data.x, data.y, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                     proximal_mu=proximal_mu, augment=augment, progress=progress)
    accuracy, _ = evaluate(model, data.test_x, data.test_y)
    if dp_clip is not None:
        from fedsock.privacy import privatize_update

        private, _ = privatize_update(weights, get_weights(model), dp_clip, dp_noise_std)
        set_weights(model, private)
    return {"train_loss": loss, "local_test_accuracy": accuracy, "fit_seconds": time.perf_counter() - started}


def eval_batch_size(x: torch.Tensor) -> int:
    """Examples per forward pass when evaluating. On a CPU, 128: a batch of 1,000 MNIST images makes
    100 MB of cnn activations, far beyond the caches, and evaluates 2x slower (bench: 5.0 s against
    2.6 s for the 10,000 test images on one thread); the small models do not care. A GPU wants big batches."""
    return 1000 if x.device.type == "cuda" else 128


@torch.no_grad()
def evaluate_counts(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                    batch_size: int | None = None) -> tuple[float, np.ndarray]:
    """The summed cross-entropy and the confusion matrix (rows: true class, columns: predicted) of
    `model` on (x, y): counts, so that evaluations on several clients add up exactly."""
    batch_size = batch_size or eval_batch_size(x)
    model.eval()
    loss = torch.zeros((), device=x.device, dtype=torch.float64)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=x.device)
    for start in range(0, len(x), batch_size):
        logits = model(x[start : start + batch_size])
        target = y[start : start + batch_size]
        loss += F.cross_entropy(logits, target, reduction="sum").double()
        confusion += torch.bincount(target * num_classes + logits.argmax(1), minlength=num_classes * num_classes)
    return float(loss), confusion.view(num_classes, num_classes).cpu().numpy()


def scores(confusion: np.ndarray, loss_sum: float, positive: int | None = None) -> dict[str, float]:
    """Accuracy, mean loss, and precision, recall and F1 of the positive class (macro-averaged over
    the classes when there is none) from a confusion matrix and a summed loss."""
    total = int(confusion.sum())
    if not total:
        return {}
    true_positive = np.diag(confusion).astype(np.float64)
    predicted, actual = confusion.sum(axis=0).astype(np.float64), confusion.sum(axis=1).astype(np.float64)
    precision = np.divide(true_positive, predicted, out=np.zeros_like(true_positive), where=predicted > 0)
    recall = np.divide(true_positive, actual, out=np.zeros_like(true_positive), where=actual > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(true_positive),
                   where=(precision + recall) > 0)
    pick = (lambda v: float(v[positive])) if positive is not None else (lambda v: float(v.mean()))
    return {"accuracy": float(true_positive.sum()) / total, "loss": loss_sum / total, "precision": pick(precision),
            "recall": pick(recall), "f1": pick(f1)}


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int | None = None) -> tuple[float, float]:
    """Accuracy (0..1) and mean cross-entropy loss of `model` on (x, y)."""
    batch_size = batch_size or eval_batch_size(x)
    model.eval()
    if len(x) == 0:
        return 0.0, 0.0
    correct = torch.zeros((), device=x.device)
    loss = torch.zeros((), device=x.device, dtype=torch.float64)
    for start in range(0, len(x), batch_size):
        logits = model(x[start : start + batch_size])
        target = y[start : start + batch_size]
        loss += F.cross_entropy(logits, target, reduction="sum").double()
        correct += (logits.argmax(1) == target).sum()
    return float(correct) / len(x), float(loss) / len(x)
