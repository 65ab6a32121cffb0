"""The two datasets of fedsock's own-data demos, split among clients into the files a client reads.

- **spam**: the SMS Spam Collection (fedsock/data/sms-spam/), deduplicated (about 400 of its
  5,574 lines repeat another's text exactly; a test set with copies of training messages would
  flatter any model), then a seeded 20% held out as the server's test set, and the rest split
  among the clients (IID, or by label with Dirichlet(alpha) proportions: clients with very
  different spam rates). Each client gets a `messages.tsv` of `label<TAB>text` lines.
- **chest-xray**: the balanced PneumoniaMNIST subset (fedsock/data/pneumonia-mnist/), written
  as PNG files in the layout users of chest X-ray data already have: each client's
  `chest_xray/train/{NORMAL,PNEUMONIA}/` (its share of the training split) and
  `chest_xray/test/...` (its share of the validation split, its own test split); the server's
  test set is the subset's test split (balanced, from the official one), in a folder of the same layout.

The licences and attributions travel with the data: each dataset's README is copied beside its
files, and beside every copy written here.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedsock import DATA_DIR
from fedsock.console import UsageError

SPAM_FILE = DATA_DIR / "sms-spam" / "SMSSpamCollection"
XRAY_FILE = DATA_DIR / "pneumonia-mnist" / "pneumoniamnist.npz"
XRAY_CLASSES = ("NORMAL", "PNEUMONIA")


@dataclass
class Prepared:
    """What the server and each client are started with."""

    client_data: list[Path]
    test_data: Path
    server_flags: list[str]
    summary: str


def read_spam() -> list[tuple[str, str]]:
    """The collection's (label, text) pairs, each distinct text once (its first occurrence)."""
    seen, pairs = set(), []
    for line in SPAM_FILE.read_text(encoding="utf-8").splitlines():
        if "\t" not in line:
            continue
        label, text = line.split("\t", 1)
        if text.strip() in seen:
            continue
        seen.add(text.strip())
        pairs.append((label, text))
    return pairs


def split_by_label(labels: np.ndarray, clients: int, split: str, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    if split == "iid":
        return list(np.array_split(rng.permutation(len(labels)), clients))
    parts: list[list[int]] = [[] for _ in range(clients)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        cuts = (np.cumsum(rng.dirichlet(np.full(clients, alpha)))[:-1] * len(members)).astype(int)
        for part, piece in zip(parts, np.split(members, cuts)):
            part.extend(piece.tolist())
    return [np.asarray(sorted(p), dtype=np.int64) for p in parts]


def attribution(source: Path, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source.parent / "README.md", folder / "DATA-README.md")


def prepare_spam(out: Path, clients: int, seed: int = 0, split: str = "iid", alpha: float = 0.5,
                 test_fraction: float = 0.2) -> Prepared:
    pairs = read_spam()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pairs))
    cut = int(len(pairs) * test_fraction)
    test, train = [pairs[i] for i in order[:cut]], [pairs[i] for i in order[cut:]]
    labels = np.asarray([label == "spam" for label, _ in train], dtype=np.int64)
    shares = split_by_label(labels, clients, split, alpha, rng)
    out.mkdir(parents=True, exist_ok=True)
    test_path = out / "test.tsv"
    test_path.write_text("".join(f"{label}\t{text}\n" for label, text in test), encoding="utf-8")
    attribution(SPAM_FILE, out)
    paths, rates = [], []
    for k, share in enumerate(shares, start=1):
        if not len(share):
            raise UsageError(f"the {split} split left client {k} without messages: raise --alpha or use fewer clients")
        path = out / f"client-{k}" / "messages.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{train[i][0]}\t{train[i][1]}\n" for i in share), encoding="utf-8")
        attribution(SPAM_FILE, path.parent)
        paths.append(path)
        rates.append(100 * labels[share].mean())
    flags = ["--task", "text", "--classes", "ham,spam", "--model", "textcnn", "--test-data", str(test_path)]
    summary = (f"SMS Spam Collection: {len(pairs)} distinct messages of {sum(1 for _ in SPAM_FILE.open(encoding='utf-8'))}; "
               f"{len(test)} held out for the server, {len(train)} among {clients} clients ({split}; spam "
               f"{', '.join(f'{r:.0f}%' for r in rates)})")
    return Prepared(paths, test_path, flags, summary)


def write_images(images: np.ndarray, labels: np.ndarray, folder: Path, offset: int = 0) -> None:
    from PIL import Image

    for name in XRAY_CLASSES:
        (folder / name).mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels)):
        Image.fromarray(image).save(folder / XRAY_CLASSES[int(label)] / f"xray-{offset + i:05d}.png")


def prepare_chest_xray(out: Path, clients: int, seed: int = 0) -> Prepared:
    with np.load(XRAY_FILE, allow_pickle=False) as archive:
        data = {name: archive[name] for name in archive.files}
    rng = np.random.default_rng(seed)
    train_y, val_y = data["train_labels"].reshape(-1), data["val_labels"].reshape(-1)
    train_shares = split_by_label(train_y, clients, "iid", 1.0, rng)
    val_shares = split_by_label(val_y, clients, "iid", 1.0, rng)
    paths = []
    for k, (train_share, val_share) in enumerate(zip(train_shares, val_shares), start=1):
        root = out / f"client-{k}" / "chest_xray"
        write_images(data["train_images"][train_share], train_y[train_share], root / "train", offset=0)
        write_images(data["val_images"][val_share], val_y[val_share], root / "test", offset=0)
        attribution(XRAY_FILE, root)
        paths.append(root)
    test_root = out / "server" / "chest_xray_test"
    write_images(data["test_images"], data["test_labels"].reshape(-1), test_root)
    attribution(XRAY_FILE, test_root)
    flags = ["--task", "image", "--classes", ",".join(XRAY_CLASSES), "--image-size", "28", "--channels", "1",
             "--model", "cnn", "--test-data", str(test_root)]
    summary = (f"PneumoniaMNIST (balanced subset): {len(train_y)} training and {len(val_y)} validation images among "
               f"{clients} clients as chest_xray/{{train,test}}/{{NORMAL,PNEUMONIA}}/ PNG folders; the "
               f"{len(data['test_labels'])} test images of the official test split's balanced subset for the server")
    return Prepared(paths, test_root, flags, summary)
