"""The task a run trains for: what an example is (an image of C x S x S, or a text of T tokens),
the class names, and how inputs are prepared. The server is started for a task and announces it
in <METADATA>; every client checks its own data against it before training.

Normalisation without seeing the data: no one sees all of it, so the statistics are part of the
task, fixed before training: for the datasets fedsock knows, their published mean and std; for
images of one's own, (x - 0.5) / 0.5 per channel by default (pixels in [0, 1] to [-1, 1]), or
what --image-mean/--image-std say (a server operator who knows the kind of data can set
them). Text needs none: tokens are hashed ids (fedsock/text.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from socket_methods import BadMessage

KINDS = ("image", "text")
MAX_CLASSES = 1000
MAX_IMAGE_SIZE = 512
MAX_TOKENS = 4096
MAX_BUCKETS = 1 << 22


@dataclass(frozen=True)
class Task:
    kind: str  # image | text
    classes: tuple[str, ...]
    channels: int = 1  # image
    size: int = 28  # image: height and width
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    max_tokens: int = 30  # text: left-padded, cut at the right
    buckets: int = 1 << 15  # text: hashed token ids are 1..buckets-1 (0 pads)
    positive: str | None = None  # the class whose precision, recall and F1 are reported

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.channels, self.size, self.size) if self.kind == "image" else (self.max_tokens,)

    @property
    def positive_index(self) -> int | None:
        return self.classes.index(self.positive) if self.positive is not None else None

    def describe(self) -> str:
        shape = (f"{self.channels}x{self.size}x{self.size} images" if self.kind == "image"
                 else f"texts of {self.max_tokens} hashed tokens")
        return f"{shape}, classes {', '.join(self.classes)}"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["classes"], data["mean"], data["std"] = list(self.classes), list(self.mean), list(self.std)
        return data

    @classmethod
    def from_json(cls, data: Any) -> "Task":
        """A task from <METADATA>, checked: BadMessage names what is wrong."""
        if not isinstance(data, dict):
            raise BadMessage("<METADATA> field 'task' must be an object")
        kind, classes = data.get("kind"), data.get("classes")
        if kind not in KINDS:
            raise BadMessage(f"the task's kind {kind!r} is not one of {', '.join(KINDS)}")
        if (not isinstance(classes, list) or not 2 <= len(classes) <= MAX_CLASSES
                or not all(isinstance(c, str) and 0 < len(c) <= 200 for c in classes) or len(set(classes)) != len(classes)):
            raise BadMessage(f"the task's classes must be 2..{MAX_CLASSES} distinct names")
        numbers = {"channels": (1, 4), "size": (1, MAX_IMAGE_SIZE), "max_tokens": (1, MAX_TOKENS),
                   "buckets": (2, MAX_BUCKETS)}
        fields: dict[str, Any] = {"kind": kind, "classes": tuple(classes)}
        for name, (low, high) in numbers.items():
            value = data.get(name, getattr(cls, name))
            if type(value) is not int or not low <= value <= high:
                raise BadMessage(f"the task's {name} {value!r} is outside {low}..{high}")
            fields[name] = value
        for name in ("mean", "std"):
            value = data.get(name, list(getattr(cls, name)))
            if (not isinstance(value, list) or len(value) not in (1, fields["channels"])
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
                    or (name == "std" and not all(v > 0 for v in value))):
                raise BadMessage(f"the task's {name} must be 1 or {fields['channels']} numbers" +
                                 (" above 0" if name == "std" else ""))
            fields[name] = tuple(float(v) for v in value)
        positive = data.get("positive")
        if positive is not None and positive not in fields["classes"]:
            raise BadMessage(f"the task's positive class {positive!r} is not one of its classes")
        fields["positive"] = positive
        return cls(**fields)


def task_of_dataset(info) -> Task:
    """The task of a dataset fedsock knows (its DatasetInfo): images, digits or labels 0..9."""
    channels, size, _ = info.input_shape
    return Task("image", tuple(str(i) for i in range(info.num_classes)), channels, size, info.mean, info.std)


def make_task(kind: str, classes: str, image_size: int, channels: int, image_mean: str | None, image_std: str | None,
              max_tokens: int, buckets: int, positive: str | None) -> Task:
    """The task of a server's flags; ValueError says what is wrong with them."""
    names = tuple(c.strip() for c in classes.split(",") if c.strip())
    if len(names) < 2 or len(set(names)) != len(names):
        raise ValueError(f"--classes {classes!r} must name at least two distinct classes, separated by commas")

    def numbers(text: str | None, default: float) -> tuple[float, ...]:
        if text is None:
            return (default,) * (channels if kind == "image" else 1)
        values = tuple(float(v) for v in text.split(","))
        if len(values) not in (1, channels):
            raise ValueError(f"give 1 or {channels} values, not {len(values)}")
        return values

    if positive is not None and positive not in names:
        raise ValueError(f"--positive-class {positive!r} is not one of --classes {', '.join(names)}")
    if positive is None and len(names) == 2:
        positive = names[1]  # the second of two classes: spam of ham,spam, PNEUMONIA of NORMAL,PNEUMONIA
    task = Task(kind, names, channels, image_size, numbers(image_mean, 0.5), numbers(image_std, 0.5), max_tokens,
                buckets, positive)
    Task.from_json(task.to_json())  # the same checks as a client's
    return task
