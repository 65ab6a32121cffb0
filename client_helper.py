"""A client's data: loading a dataset offline, and splitting it among clients.

For a dataset that every party has (MNIST, say), the server splits the training set's
indices among the clients and tells each client which examples are its own; the client
loads the files itself and keeps only those. No training example ever crosses the wire.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedsock import DATA_DIR
from fedsock.console import UsageError

# MNIST ships with the project so that everything runs offline.
DEFAULT_DATA_ROOT = DATA_DIR
# Each client holds out this share of its partition to report a local test accuracy.
LOCAL_TEST_FRACTION = 0.1
# Dirichlet draws are repeated until every client has at least this many examples.
MIN_PARTITION_SIZE = 10
PARTITIONS = ("iid", "dirichlet", "shards")


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_size: int
    folders: tuple[str, ...]  # where its IDX files may lie below the data root


DATASETS = {
    "mnist": DatasetInfo("mnist", (1, 28, 28), 10, (0.1307,), (0.3081,), 60000, ("mnist", "MNIST/raw", ".")),
    "fashion-mnist": DatasetInfo(
        "fashion-mnist", (1, 28, 28), 10, (0.2860,), (0.3530,), 60000, ("fashion-mnist", "FashionMNIST/raw", ".")
    ),
    "cifar10": DatasetInfo(
        "cifar10", (3, 32, 32), 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 50000, ()
    ),
}
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass
class Split:
    """Images as uint8 (N, C, H, W) and labels as int64 (N,)."""

    images: np.ndarray
    labels: np.ndarray


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (gzipped or not): the format MNIST and Fashion-MNIST ship in."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UsageError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    start = 4 + 4 * ndim
    if len(data) - start != int(np.prod(dims)):
        raise UsageError(f"{path} is cut short: expected {int(np.prod(dims))} bytes of data")
    return np.frombuffer(data, dtype=np.uint8, offset=start).reshape(dims)


def _find_idx(root: Path, info: DatasetInfo, stem: str) -> Path | None:
    for folder in info.folders:
        for name in (stem + ".gz", stem):
            if (root / folder / name).is_file():
                return root / folder / name
    return None


def _load_idx_split(root: Path, info: DatasetInfo, split: str) -> Split | None:
    paths = [_find_idx(root, info, stem) for stem in IDX_FILES[split]]
    if None in paths:
        return None
    images, labels = (read_idx(p) for p in paths)
    if len(images) != len(labels):
        raise UsageError(f"{paths[0]} and {paths[1]} hold different numbers of examples")
    return Split(images.reshape(len(images), *info.input_shape), labels.astype(np.int64))


def _download_with_torchvision(root: Path, info: DatasetInfo, split: str) -> Split:
    import torchvision

    cls = {"fashion-mnist": torchvision.datasets.FashionMNIST, "cifar10": torchvision.datasets.CIFAR10}[info.name]
    try:
        dataset = cls(str(root), train=(split == "train"), download=True)
    except Exception as exc:  # torchvision raises RuntimeError, URLError, OSError, ... when offline
        raise UsageError(
            f"{info.name} files are not under {root} and downloading them failed ({type(exc).__name__}); "
            f"put the dataset's files there and pass --data-root"
        ) from exc
    images = np.asarray(dataset.data)
    images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)  # CIFAR is NHWC
    return Split(np.ascontiguousarray(images, dtype=np.uint8), np.asarray(dataset.targets, dtype=np.int64))


def load_split(dataset: str, split: str, data_root: str | os.PathLike | None = None) -> Split:
    """The train or test split of a dataset, from the data root or, failing that, a download."""
    info = DATASETS[dataset]
    root = Path(data_root) if data_root else DEFAULT_DATA_ROOT
    found = _load_idx_split(root, info, split) if info.folders else None
    if found is not None:
        return found
    if dataset == "mnist":
        raise UsageError(f"MNIST files are missing under {root} (expected {root}/mnist/{IDX_FILES[split][0]}.gz)")
    return _download_with_torchvision(root, info, split)


def partition_indices(labels: np.ndarray, num_clients: int, scheme: str, alpha: float, seed: int) -> list[np.ndarray]:
    """Disjoint index sets, one per client, covering every example exactly once; the server
    computes them and sends each client its own (as a bitmap in <METADATA>).

    - `iid`: a permutation from numpy's default_rng(seed), dealt in equal shares (np.array_split).
    - `dirichlet`: each class is given to the clients in proportions drawn from Dirichlet(alpha):
      the smaller alpha, the fewer classes each client sees (Hsu et al. 2019). Drawn again, from
      the same generator, until every client has at least MIN_PARTITION_SIZE examples.
    - `shards`: McMahan et al. 2017's pathological non-IID split: the examples sorted by label
      (stable, so ties keep their order), cut into 2N equal shards, two shards to each client
      by a seeded permutation. Most clients see two classes.
    """
    if num_clients * MIN_PARTITION_SIZE > len(labels):
        raise UsageError(
            f"--num-clients {num_clients} would leave clients with fewer than {MIN_PARTITION_SIZE} of the "
            f"{len(labels)} training examples; use --num-clients {len(labels) // MIN_PARTITION_SIZE} or fewer")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(len(labels)), num_clients)]
    if scheme == "shards":
        shards = np.array_split(np.argsort(labels, kind="stable"), 2 * num_clients)
        order = rng.permutation(2 * num_clients)
        return [np.sort(np.concatenate([shards[order[2 * k]], shards[order[2 * k + 1]]])) for k in range(num_clients)]
    if scheme != "dirichlet":
        raise ValueError(f"unknown partition scheme {scheme!r}")
    for _ in range(1000):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for label in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == label))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
            for part, piece in zip(parts, np.split(members, cuts)):
                part.append(piece)
        result = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in result) >= MIN_PARTITION_SIZE:
            return result
    raise UsageError(
        f"--alpha {alpha} leaves some of {num_clients} clients with fewer than {MIN_PARTITION_SIZE} examples; "
        f"raise --alpha or lower --num-clients"
    )


def split_local(indices: np.ndarray, seed: int, client_id: int) -> tuple[np.ndarray, np.ndarray]:
    """A client's own train and local-test indices: after a seeded shuffle, the first floor(n / 10) are its
    local test split (LOCAL_TEST_FRACTION of n, rounded down; none when n <= 1), the rest its training examples."""
    rng = np.random.default_rng([seed, client_id])
    shuffled = rng.permutation(indices)
    num_test = int(len(shuffled) * LOCAL_TEST_FRACTION) if len(shuffled) > 1 else 0
    return shuffled[num_test:], shuffled[:num_test]


def label_skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each client's label mix and the whole set's (0 = IID)."""
    classes = np.unique(labels)
    overall = np.array([(labels == c).mean() for c in classes])
    distances = []
    for part in parts:
        mix = np.array([(labels[part] == c).mean() for c in classes]) if len(part) else overall
        distances.append(0.5 * np.abs(mix - overall).sum())
    return float(np.mean(distances))
