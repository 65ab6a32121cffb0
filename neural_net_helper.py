"""Models, local training, evaluation and the choice of device."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from client_helper import DatasetInfo
from fedsock.console import UsageError

MODELS = ("logreg", "mlp", "cnn")
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


def build_model(name: str, info: DatasetInfo, seed: int = 0) -> nn.Module:
    """A model by name, initialised from `seed` so every process builds the same one."""
    torch.manual_seed(seed)
    return {"logreg": LogReg, "mlp": MLP, "cnn": CNN}[name](info.input_shape, info.num_classes)


def choose_device(preference: str) -> torch.device:
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but PyTorch sees no CUDA device here")
    return torch.device(preference)


def to_tensors(images: np.ndarray, labels: np.ndarray, info: DatasetInfo, device: torch.device):
    """Normalised float32 images and int64 labels, on the device, once for the whole run."""
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


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    description: str = "training",
    quiet: bool = False,
) -> float:
    """Plain minibatch SGD, as in FedAvg. Returns the mean training loss over all batches."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    num_batches = math.ceil(len(x) / batch_size)
    total_loss = torch.zeros((), device=x.device)
    # disable=None lets tqdm hide the bar when stderr is not a terminal (logs stay clean).
    with tqdm(total=epochs * num_batches, desc=description, unit="batch", leave=False, disable=True if quiet else None) as bar:
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=generator).to(x.device)
            for start in range(0, len(x), batch_size):
                batch = order[start : start + batch_size]
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x[batch]), y[batch])
                loss.backward()
                optimizer.step()
                total_loss += loss.detach() * len(batch)
                bar.update()
    return float(total_loss) / (epochs * len(x))


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> tuple[float, float]:
    """Accuracy (0..1) and mean cross-entropy loss of `model` on (x, y)."""
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
