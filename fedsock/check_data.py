"""`fl_client.py --check-data PATH`: check a client's data offline, before any server is up.

    python fl_client.py --check-data chest_xray/                         # an image folder: classes from its folders
    python fl_client.py --check-data messages.tsv --classes ham,spam     # a text table names its classes

The data is read exactly as a joining client reads it (fedsock/own_data.py's `load_own_data`,
the same checks and the same one-line errors), for the task a server would announce: the
classes (an image folder's class folders, or --classes), the image size and channels, the
text's tokens. It prints what it found, per class and split, and the server flags that match,
or the one thing that is wrong (exit status 2). Nothing is sent anywhere.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fedsock.console import ArgumentParser, HelpFormatter, UsageError, number, say
from fedsock.own_data import IMAGE_SUFFIXES, detect_format, load_own_data
from fedsock.tasks import make_task

WHO = "check-data"


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="fl_client.py --check-data", formatter_class=HelpFormatter,
                            description=__doc__.split("\n\n")[0])
    parser.add_argument("--check-data", dest="path", required=True, metavar="PATH",
                        help="an image folder, a .tsv/.csv table of label and text, or an .npz")
    parser.add_argument("--classes", metavar="NAMES", help="the task's classes, comma-separated (default for an image "
                                                           "folder: its class folders; an .npz: 0..the largest label)")
    parser.add_argument("--image-size", type=number(int, 4, 1024), default=28, metavar="PIXELS",
                        help="images are resized to PIXELS x PIXELS, as the server's --image-size says")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=1, help="1 (grey) or 3 (RGB)")
    parser.add_argument("--max-tokens", type=number(int, 1, 4096), default=30, metavar="T",
                        help="texts are cut to T hashed tokens, as the server's --max-tokens says")
    parser.add_argument("--data-format", choices=("imagefolder", "table", "npz"), help="what PATH is, when its name "
                                                                                        "does not say")
    parser.add_argument("--label-column", metavar="COLUMN", help="text table: the label's column")
    parser.add_argument("--text-column", metavar="COLUMN", help="text table: the text's column")
    parser.add_argument("--traceback", action="store_true", help="show a full traceback on errors")
    return parser


def guessed_classes(path: Path, kind: str) -> str:
    """The classes a server would have to name, where the data says them itself."""
    if kind == "imagefolder":
        root = path / "train" if (path / "train").is_dir() else (path / "test" if (path / "test").is_dir() else path)
        names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                       and any(f.suffix.lower() in IMAGE_SUFFIXES for f in p.iterdir()))
        if len(names) < 2:
            raise UsageError(f"--check-data {path}: {len(names)} class folder(s) with images in {root} (a task needs "
                             f"at least two: {root}/<class>/*.png)")
        return ",".join(names)
    if kind == "npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                labels = archive["y_train"]
        except (OSError, ValueError, KeyError) as exc:
            raise UsageError(f"--check-data {path}: not an .npz with y_train ({exc})") from exc
        if labels.dtype.kind in "US":
            return ",".join(sorted(set(labels.astype(str).tolist())))
        return ",".join(str(c) for c in range(max(int(labels.max(initial=0)) + 1, 2)))
    raise UsageError(f"--check-data {path}: a text table does not say its classes: add --classes, e.g. "
                     f"--classes ham,spam")


def counts(y: np.ndarray | None, classes: tuple[str, ...]) -> str:
    if y is None:
        return "none"
    per_class = np.bincount(y, minlength=len(classes))
    return f"{len(y):,} ({', '.join(f'{name} {n:,}' for name, n in zip(classes, per_class))})"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path = Path(args.path)
    if not path.exists():
        raise UsageError(f"--check-data {path}: no such file or folder")
    kind = args.data_format or detect_format(path, "--check-data")
    task_kind = "text" if kind == "table" else "image"
    classes = args.classes or guessed_classes(path, kind)
    try:
        task = make_task(task_kind, classes, args.image_size, args.channels, None, None, args.max_tokens, 1 << 15, None)
    except ValueError as exc:
        raise UsageError(f"--classes: {exc}") from exc
    data = load_own_data(str(path), task, args.data_format, args.label_column, args.text_column, flag="--check-data")
    held = "its own test split" if data.test_y is not None else "none (a client holds out 10% of its training examples)"
    say(WHO, f"{data.source}: {task.describe()}")
    say(WHO, f"training examples: {counts(data.y, task.classes)}")
    say(WHO, f"test examples: {counts(data.test_y, task.classes) if data.test_y is not None else held}")
    missing = [name for name, n in zip(task.classes, np.bincount(data.y, minlength=task.num_classes)) if n == 0]
    if missing:
        say(WHO, f"no training examples of {', '.join(missing)}: this client can still join, and learns nothing of "
                 f"{'that class' if len(missing) == 1 else 'those classes'} itself")
    if task.kind == "text":
        filled = (data.x != 0).sum(axis=1)
        say(WHO, f"texts: {filled.mean():.1f} tokens on average; {(filled == task.max_tokens).mean():.0%} cut at "
                 f"--max-tokens {task.max_tokens}")
        flags = f"--task text --classes {','.join(task.classes)} --max-tokens {task.max_tokens}"
    else:
        flags = (f"--task image --classes {','.join(task.classes)} --image-size {task.size} "
                 f"--channels {task.channels}")
    say(WHO, f"OK: it would join a server started with {flags}")
    return 0
