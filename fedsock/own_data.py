"""A client's own data, from its own files: `fl_client.py --data PATH`.

Three formats, chosen by what PATH is (or by --data-format):

- an **image folder**: PATH/train/<class>/*.png (or .jpg, .jpeg, .bmp, .gif, .tif, .tiff,
  .webp), and optionally PATH/test/<class>/...; or PATH/<class>/... with no train/ level. The
  folder names are the class names, and must be the task's (a client may lack some classes,
  as real clients do, but may not have others). Each image is converted to the task's
  channels (grey or RGB) and resized to its size.
- a **text table**: a .tsv or .txt file of tab-separated lines, or a .csv file. With no header,
  the label is the first column and the text the second (the SMS Spam Collection's
  `ham<TAB>text` lines). With a header, the columns are found by name (label, class, category,
  target or v1 for the label; text, message, sms, sentence or v2 for the text), or named with
  --label-column / --text-column (a name, or a 0-based index).
- an **.npz** with `x_train` and `y_train`, and optionally `x_test` and `y_test`: images as
  (N, H, W), (N, C, H, W) or (N, H, W, C), or token ids as (N, T); labels as class indices
  0..C-1 or as class names.

Labels are checked against the task's classes: a label the task does not know is an error
that names the file and the line. A client with no test split of its own holds out 10% of its
examples (seeded), as every fedsock client does. Every problem is a UsageError: one line.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedsock.console import UsageError
from fedsock.tasks import Task
from fedsock.text import encode_texts

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
TABLE_SUFFIXES = {".tsv", ".txt", ".csv"}
LABEL_NAMES = ("label", "class", "category", "target", "v1")
TEXT_NAMES = ("text", "message", "sms", "sentence", "v2")
FORMATS = ("imagefolder", "table", "npz")


@dataclass
class OwnData:
    """Examples as arrays: images uint8 (N, C, S, S) or token ids int64 (N, T); labels int64 (N,)."""

    x: np.ndarray
    y: np.ndarray
    test_x: np.ndarray | None
    test_y: np.ndarray | None
    source: str


def detect_format(path: Path, flag: str = "--data") -> str:
    if path.is_dir():
        return "imagefolder"
    if path.suffix.lower() == ".npz":
        return "npz"
    if path.suffix.lower() in TABLE_SUFFIXES:
        return "table"
    raise UsageError(f"{flag} {path}: not a folder, an .npz, or a .tsv/.txt/.csv file (or pass --data-format)")


def load_own_data(path: str, task: Task, data_format: str | None = None, label_column: str | None = None,
                  text_column: str | None = None, flag: str = "--data") -> OwnData:
    """A client's files (or, with flag="--test-data", the server's held-out set) for this task."""
    where = Path(path)
    if not where.exists():
        raise UsageError(f"{flag} {path}: no such file or folder")
    kind = data_format or detect_format(where, flag)
    if kind == "imagefolder":
        if task.kind != "image":
            raise UsageError(f"{flag} {path} is an image folder, but this run's task is {task.kind}")
        return load_image_folder(where, task, flag)
    if kind == "npz":
        return load_npz(where, task)
    if task.kind != "text":
        raise UsageError(f"{flag} {path} is a text table, but this run's task is {task.kind}")
    return load_table(where, task, label_column, text_column)


# --------------------------------------------------------------------------- image folders


def read_image(path: Path, task: Task) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            converted = image.convert("L" if task.channels == 1 else "RGB")
            if converted.size != (task.size, task.size):
                converted = converted.resize((task.size, task.size), Image.BILINEAR)
            pixels = np.asarray(converted, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise UsageError(f"cannot read the image {path}: {exc}") from exc
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _class_folders(root: Path, task: Task) -> dict[str, list[Path]]:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [p.name for p in folders if p.name not in task.classes]
    if unknown:
        raise UsageError(f"{root}: class folder(s) {', '.join(unknown)} are not among the task's classes "
                         f"({', '.join(task.classes)})")
    if not folders:
        raise UsageError(f"{root}: no class folders (expected some of {', '.join(task.classes)})")
    images = {}
    for folder in folders:
        files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UsageError(f"{folder}: no images in this class folder (.png, .jpg, ...)")
        images[folder.name] = files
    return images


def _load_split_folder(root: Path, task: Task) -> tuple[np.ndarray, np.ndarray]:
    images = _class_folders(root, task)
    xs, ys = [], []
    for name, files in images.items():
        index = task.classes.index(name)
        for f in files:
            xs.append(read_image(f, task))
            ys.append(index)
    return np.stack(xs), np.asarray(ys, dtype=np.int64)


def load_image_folder(path: Path, task: Task, flag: str = "--data") -> OwnData:
    """A folder of class folders, or train/ and test/ of them. A server's held-out set (--test-data) may be
    the test/ alone, as a downloaded dataset's folder often is; a client's data needs its train/."""
    if (path / "test").is_dir() and not (path / "train").is_dir() and "test" not in task.classes:
        if flag == "--test-data":
            x, y = _load_split_folder(path / "test", task)
            return OwnData(x, y, None, None, f"image folder {path / 'test'}")
        raise UsageError(f"{flag} {path} has a test/ folder but no train/: a client's training images go in "
                         f"train/<class>/ (or in class folders directly under {path})")
    train_root = path / "train" if (path / "train").is_dir() else path
    x, y = _load_split_folder(train_root, task)
    test_x = test_y = None
    if (path / "test").is_dir():
        test_x, test_y = _load_split_folder(path / "test", task)
    return OwnData(x, y, test_x, test_y, f"image folder {path}")


# --------------------------------------------------------------------------- text tables


def _column(header: list[str] | None, chosen: str | None, names: tuple[str, ...], default: int, what: str,
            path: Path) -> int:
    if chosen is not None:
        if chosen.isdigit():
            return int(chosen)
        if header is None or chosen not in header:
            raise UsageError(f"{path}: no column named {chosen!r} for the {what} (columns: {header})")
        return header.index(chosen)
    if header is not None:
        for name in names:
            if name in [h.lower() for h in header]:
                return [h.lower() for h in header].index(name)
    return default


def load_table(path: Path, task: Task, label_column: str | None, text_column: str | None) -> OwnData:
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from exc
    delimiter = "," if path.suffix.lower() == ".csv" else "\t"
    rows = list(csv.reader(io.StringIO(content), delimiter=delimiter, quoting=csv.QUOTE_MINIMAL if delimiter == ","
                           else csv.QUOTE_NONE))
    rows = [(number, row) for number, row in enumerate(rows, start=1) if row and any(cell.strip() for cell in row)]
    if not rows:
        raise UsageError(f"{path} holds no examples")
    first = rows[0][1]
    has_header = bool(first) and first[0].strip() not in task.classes and any(
        cell.strip().lower() in LABEL_NAMES + TEXT_NAMES for cell in first)
    header = [cell.strip() for cell in first] if has_header else None
    if has_header:
        rows = rows[1:]
    label_at = _column(header, label_column, LABEL_NAMES, 0, "label", path)
    text_at = _column(header, text_column, TEXT_NAMES, 1, "text", path)
    texts, labels = [], []
    for number, row in rows:
        if len(row) <= max(label_at, text_at):
            raise UsageError(f"{path}:{number}: expected a label and a text ({max(label_at, text_at) + 1} columns), "
                             f"found {len(row)}")
        label = row[label_at].strip()
        if label not in task.classes:
            raise UsageError(f"{path}:{number}: label {label[:40]!r} is not among the task's classes "
                             f"({', '.join(task.classes)})")
        labels.append(task.classes.index(label))
        # A TSV's text may itself hold tabs: then it is everything from its column on.
        texts.append("\t".join(row[text_at:]) if delimiter == "\t" else row[text_at])
    x = encode_texts(texts, task.max_tokens, task.buckets)
    return OwnData(x, np.asarray(labels, dtype=np.int64), None, None, f"text table {path}")


# --------------------------------------------------------------------------- npz


def _labels(values: np.ndarray, task: Task, where: str) -> np.ndarray:
    values = np.asarray(values).reshape(-1)
    if values.dtype.kind in "US":
        unknown = sorted(set(values.astype(str)) - set(task.classes))
        if unknown:
            raise UsageError(f"{where}: labels {unknown[:3]} are not among the task's classes ({', '.join(task.classes)})")
        return np.asarray([task.classes.index(v) for v in values.astype(str)], dtype=np.int64)
    if values.dtype.kind not in "iu":
        raise UsageError(f"{where}: labels must be class indices (integers) or class names, not {values.dtype}")
    if len(values) and (values.min() < 0 or values.max() >= task.num_classes):
        raise UsageError(f"{where}: label {int(values.max()) if values.max() >= task.num_classes else int(values.min())} "
                         f"is outside 0..{task.num_classes - 1} ({', '.join(task.classes)})")
    return values.astype(np.int64)


def _images(values: np.ndarray, task: Task, where: str) -> np.ndarray:
    x = np.asarray(values)
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise UsageError(f"{where}: images must be (N, H, W), (N, C, H, W) or (N, H, W, C), not {tuple(values.shape)}")
    if x.dtype != np.uint8:
        x = np.clip(x * (255 if x.max() <= 1.0 else 1), 0, 255).astype(np.uint8)
    if x.shape[1] != task.channels or x.shape[2:] != (task.size, task.size):
        mode = "L" if task.channels == 1 else "RGB"
        x = np.stack([read_array_image(img, mode, task.size) for img in x])
    return x


def read_array_image(image: np.ndarray, mode: str, size: int) -> np.ndarray:
    from PIL import Image

    picture = Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).convert(mode)
    pixels = np.asarray(picture.resize((size, size), Image.BILINEAR), dtype=np.uint8)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def load_npz(path: Path, task: Task) -> OwnData:
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from exc
    with archive:
        missing = [k for k in ("x_train", "y_train") if k not in archive.files]
        if missing:
            raise UsageError(f"{path} lacks {', '.join(missing)} (it has {', '.join(archive.files) or 'nothing'})")
        arrays = {k: archive[k] for k in archive.files}
    out = []
    for part in ("train", "test"):
        if f"x_{part}" not in arrays:
            out += [None, None]
            continue
        xs, ys = arrays[f"x_{part}"], arrays.get(f"y_{part}")
        if ys is None or len(xs) != len(ys):
            raise UsageError(f"{path}: x_{part} and y_{part} must both be there, with as many entries")
        where = f"{path} ({part})"
        if task.kind == "image":
            xs = _images(xs, task, where)
        elif xs.ndim != 2 or xs.dtype.kind not in "iu" or xs.shape[1] != task.max_tokens or (
                len(xs) and (xs.min() < 0 or xs.max() >= task.buckets)):
            raise UsageError(f"{where}: token ids must be an (N, {task.max_tokens}) integer array within "
                             f"0..{task.buckets - 1}")
        out += [xs, _labels(ys, task, where)]
    if not len(out[0]):
        raise UsageError(f"{path}: x_train holds no examples")
    return OwnData(out[0], out[1], out[2], out[3], f"npz {path}")
