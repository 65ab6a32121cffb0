"""What a run keeps on disk: metrics.csv, checkpoints, the final model and the plot.

A checkpoint uses the wire format itself (a JSON frame, then a weights frame), so
reading one back goes through the same checked decoder and never unpickles, and a
third frame holds the SHA-256 of the two: a byte changed anywhere (a bad disk, a
hand edit) is found before anything is resumed. A SHA-256 anyone can recompute, so it
catches accidents only: a run with secrets (its TLS key, its tokens) also seals each
checkpoint with a fourth frame, an HMAC-SHA256 of that digest under a key derived from
them (`seal_key`), which only a holder of the secrets can make (fedsock/resume_guard.py
checks it, and what a resume may drop). metrics.csv is written from the
checkpoint's own list of rows, after it, so the two always agree: if writing the
checkpoint fails, neither has the new round.

`RunFiles` is the observer that writes them, in a thread of its own (the event loop
never waits on a disk).
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import hmac
import io
import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from fedsock.console import FedsockError, UsageError, warn
from fedsock.events import WHO, MetricsUpdated, Observer, RoundFinished, RunFinished, SessionFinished, SettingsChanged
from fedsock.virtual_time import held
from socket_methods import FrameReader, ProtocolError, decode_weights, encode_message, encode_weights, frame_header

METRIC_COLUMNS = (
    "round", "clients", "test_accuracy", "test_loss", "train_loss", "seconds",
    "bytes_sent", "bytes_received", "max_fit_seconds", "sum_fit_seconds", "epsilon",
    "test_precision", "test_recall", "test_f1", "fed_accuracy", "fed_loss", "fed_precision", "fed_recall", "fed_f1",
    "fed_clients", "fed_examples", "confusion", "session", "resumed", "staleness", "mean_staleness",
    "virtual_seconds",
)  # new columns go at the end: tools that read metrics.csv by position keep working
CHECKPOINT_NAME = "checkpoint.fsck"
CHECKPOINT_HEADER = "<CHECKPOINT>"  # framed as a protocol message, but only ever a file's: not in MESSAGES
CHECKPOINT_FORMAT = 3  # 1: no checksum, no strategy state (fedsock before the round engine)
OLD_FORMATS = (2,)  # 2: no record of the run's protections, never sealed; still read (resume_guard infers them)
# A checkpoint's JSON part holds the metrics of every round so far: generous room.
MAX_CHECKPOINT_JSON_BYTES = 64 << 20
DIGEST_BYTES = 32  # SHA-256, and the seal's HMAC-SHA256
# HKDF's salt and info (RFC 5869): a seal's key is for this purpose only, never another use of the same secrets
# (the authentication answers of fedsock/security.py are HMACs under the same tokens, with another context).
SEAL_SALT, SEAL_INFO = b"fedsock checkpoint seal", b"fedsock checkpoint seal v1"


class OutputFailed(FedsockError):
    """A run's file could not be written (a full disk, a folder that went away)."""


@dataclass
class Checkpoint:
    """What a resumed run needs: its settings, the rounds so far and the global model, plus the
    strategy's state (server momentum, Adam moments) and any other state a module keeps."""

    config: dict[str, Any]
    round: int
    metrics: list[dict[str, Any]]
    model: dict[str, Any]  # name -> tensor
    strategy_state: dict[str, Any] = field(default_factory=dict)  # name -> tensor
    extra: dict[str, Any] = field(default_factory=dict)  # JSON, e.g. a privacy accountant's history
    protections: dict[str, Any] | None = None  # JSON: resume_guard.Protections; None in a format-2 file
    seal: Seal | None = None  # read back: the MAC the file carries, checked once the run's secrets are loaded


@dataclass(frozen=True)
class SealKey:
    """The key that seals a run's checkpoints, and the names of the secrets it was derived from
    (which the file records, so that a resume can say which flags to give again)."""

    secrets: tuple[str, ...]
    key: bytes = field(repr=False)


@dataclass(frozen=True)
class Seal:
    """What a sealed checkpoint carries: the names of the secrets of its key, the SHA-256 of its
    contents, and the HMAC-SHA256 of that digest."""

    secrets: tuple[str, ...]
    digest: bytes
    mac: bytes


def seal_key(secrets: dict[str, bytes]) -> SealKey | None:
    """HKDF-SHA256 of the run's secrets (by name), or None for a run without any. Each secret goes in
    with its name and length, so that no two sets of secrets give the same input."""
    if not secrets:
        return None
    material = b"".join(name.encode() + b"\0" + len(secret).to_bytes(8, "big") + secret
                        for name, secret in sorted(secrets.items()))
    extracted = hmac.new(SEAL_SALT, material, hashlib.sha256).digest()
    return SealKey(tuple(sorted(secrets)), hmac.new(extracted, SEAL_INFO + b"\x01", hashlib.sha256).digest())


def seal_mac(key: SealKey, digest: bytes) -> bytes:
    return hmac.new(key.key, digest, hashlib.sha256).digest()


def seal_matches(seal: Seal, key: SealKey) -> bool:
    """Whether `key` made this seal (in constant time)."""
    return hmac.compare_digest(seal_mac(key, seal.digest), seal.mac)


# --------------------------------------------------------------------------- writing


def write_atomically(path: Path, buffers: list[bytes | bytearray | memoryview]) -> None:
    """Write to a temporary file, fsync, then rename over `path`: a crash at any instant leaves
    either the old file or the new one, whole. A failed write leaves no temporary file behind."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        with open(temporary, "wb") as f:
            for buffer in buffers:
                f.write(buffer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            temporary.unlink()
        except OSError:
            pass
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


def metrics_text(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=METRIC_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    """(Re)write metrics.csv in full: cheap, and it matches the checkpoint's rows exactly."""
    write_atomically(path, [metrics_text(rows).encode()])


def checkpoint_buffers(state: Checkpoint, key: SealKey | None = None) -> list[bytes | bytearray | memoryview]:
    """The file's bytes: the JSON and weights frames, their SHA-256, and with a key, the seal of that digest."""
    tensors = {**state.model, **{f"strategy/{k}": v for k, v in state.strategy_state.items()}}
    layout, blob = encode_weights(tensors)
    header = encode_message(CHECKPOINT_HEADER, format=CHECKPOINT_FORMAT, config=state.config, round=state.round,
                            metrics=state.metrics, weights=layout, extra=state.extra,
                            protections=state.protections or {}, sealed_with=list(key.secrets) if key else [])
    body = [header, frame_header(len(blob)), memoryview(blob)]
    digest = hashlib.sha256()
    for part in body:
        digest.update(part)
    digest = digest.digest()
    seal = [frame_header(DIGEST_BYTES), seal_mac(key, digest)] if key else []
    return [*body, frame_header(DIGEST_BYTES), digest, *seal]


def write_checkpoint(path: Path, state: Checkpoint, key: SealKey | None = None) -> None:
    write_atomically(path, checkpoint_buffers(state, key))


def write_model(path: Path, tensors: dict) -> None:
    """The final global model as a PyTorch state_dict (torch.load(path) gives it back)."""
    write_atomically(path, [model_bytes(tensors)])


def write_plot(path: Path, rows: list[dict[str, Any]], title: str, positive: str | None = None) -> None:
    """Test accuracy, and test and training loss, per round."""
    if rows:
        write_atomically(path, [plot_png(rows, title, positive)])


def model_bytes(tensors: dict) -> bytes:
    """A global model as the bytes of a PyTorch state_dict file."""
    import torch

    buffer = io.BytesIO()
    torch.save({name: t.detach().cpu().clone() for name, t in tensors.items()}, buffer)
    return buffer.getvalue()


def accuracy_lines(positive: str | None) -> list[tuple[str, str, dict[str, Any]]]:
    """The accuracy panel's lines: a metrics row's key, its legend, its style. F1 is the positive class's
    where the task names one (spam, pneumonia), else the mean over the classes (macro F1), which on a
    balanced task nearly equals the accuracy: dashed, thin and beneath it, so that neither hides the other."""
    f1 = f"F1 of {positive}" if positive else "macro F1 (mean over classes)"
    f1_style = {"linestyle": "--", "linewidth": 1.0, "markersize": 4, "zorder": 2}
    return [("test_accuracy", "accuracy, server's test set", {"marker": "o", "zorder": 3}),
            ("fed_accuracy", "accuracy, clients' test splits", {"marker": "^", "zorder": 3}),
            ("test_f1", f"{f1}, server's test set", {"marker": "x", **f1_style}),
            ("fed_f1", f"{f1}, clients' test splits", {"marker": "+", **f1_style})]


def plot_png(rows: list[dict[str, Any]], title: str, positive: str | None = None) -> bytes:
    """The figure of write_plot, as PNG bytes. `positive`: the task's positive class, if it has one."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # the object API: no pyplot state, safe off the main thread

    figure = Figure(figsize=(9, 3.6), dpi=110)
    FigureCanvasAgg(figure)
    accuracy, loss = figure.subplots(1, 2)

    def series(key: str, scale: float = 1.0) -> tuple[list, list]:
        points = [(r["round"], scale * r[key]) for r in rows if r.get(key) is not None]
        return [p[0] for p in points], [p[1] for p in points]

    for key, label, style in accuracy_lines(positive):
        xs, ys = series(key, 100)
        if xs:
            accuracy.plot(xs, ys, label=label, **style)
    accuracy.set(xlabel="round", ylabel="%", title="global model")
    accuracy.legend(fontsize=7)
    for key, label, marker in (("test_loss", "test loss (global model)", "o"), ("fed_loss", "clients' test loss", "^"),
                               ("train_loss", "training loss (clients, weighted)", "s")):
        xs, ys = series(key)
        if xs:
            loss.plot(xs, ys, marker=marker, label=label)
    loss.set(xlabel="round", ylabel="cross-entropy", title="loss")
    loss.legend()
    for axes in (accuracy, loss):
        axes.grid(alpha=0.3)
        axes.xaxis.get_major_locator().set_params(integer=True)
    figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


# --------------------------------------------------------------------------- reading


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """A checkpoint, checked: its checksum, its weights, and that its round and metrics agree.
    Anything wrong is one UsageError that names the file and says what is wrong."""
    try:
        return _read_checkpoint(Path(path))
    except OSError as exc:
        raise UsageError(f"cannot resume from {path}: {exc.strerror or exc}") from exc
    except (ValueError, ProtocolError) as exc:
        raise UsageError(f"cannot resume from {path}: {exc}") from exc


def _read_checkpoint(path: Path) -> Checkpoint:
    data = memoryview(path.read_bytes())
    if not data:
        raise ValueError("the file is empty (0 bytes), not a checkpoint (was the disk full when it was written?)")
    reader, position = FrameReader(), 0

    def read_into(target: memoryview) -> int:
        nonlocal position
        n = min(len(target), len(data) - position)
        target[:n] = data[position : position + n]
        position += n
        return n

    try:
        reader.expect_message(MAX_CHECKPOINT_JSON_BYTES)
        reader.fill_from(read_into)
        header_end = position - reader.staged
        state = json.loads(bytes(reader.payload))
    except (ProtocolError, ValueError) as exc:
        raise ValueError(f"not a fedsock checkpoint ({exc})") from None
    if not isinstance(state, dict) or state.get("header") != CHECKPOINT_HEADER:
        raise ValueError("not a fedsock checkpoint")
    if state.get("format") != CHECKPOINT_FORMAT and state.get("format") not in OLD_FORMATS:
        raise ValueError(f"it was written by another version of fedsock (format {state.get('format', 1)!r}, "
                         f"this one reads {', '.join(map(str, [*OLD_FORMATS, CHECKPOINT_FORMAT]))})")
    layout = state.get("weights")
    nbytes = layout.get("nbytes") if isinstance(layout, dict) else None
    if not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError("it has no valid weights layout")
    sealed_with = state.get("sealed_with", [])
    if not isinstance(sealed_with, list) or not all(isinstance(name, str) for name in sealed_with):
        raise ValueError("its list of the secrets that seal it is not a list of names")
    # then the checksum frame (its 8-byte length, 32, and the digest), and for a sealed file the seal's frame
    body_end = header_end + 8 + nbytes
    end = body_end + (8 + DIGEST_BYTES) * (2 if sealed_with else 1)
    if len(data) < end:
        raise ValueError(f"the file is cut short ({len(data)} bytes; its layout needs {end})")
    if len(data) > end:
        raise ValueError("the checksum is followed by junk")
    digest = hashlib.sha256(data[:body_end]).digest()
    if data[body_end : body_end + 8 + DIGEST_BYTES] != frame_header(DIGEST_BYTES) + digest:
        raise ValueError("it is damaged: its SHA-256 checksum does not match its contents")
    seal = None
    if sealed_with:
        if data[end - 8 - DIGEST_BYTES : end - DIGEST_BYTES] != frame_header(DIGEST_BYTES):
            raise ValueError("its seal is not a 32-byte frame")
        seal = Seal(tuple(sealed_with), digest, bytes(data[end - DIGEST_BYTES : end]))
    blob = bytearray(nbytes)
    try:
        reader.expect_blob(blob)  # takes what the reader already read ahead, then the rest
        reader.fill_from(read_into)
    except ProtocolError as exc:
        raise ValueError(f"its weights part does not match its layout ({exc})") from None
    return replace(_checked(state, decode_weights(layout, blob)), seal=seal)


def _checked(state: dict[str, Any], tensors: dict[str, Any]) -> Checkpoint:
    import torch

    number, metrics, config = state.get("round"), state.get("metrics"), state.get("config")
    if type(number) is not int or number < 0:
        raise ValueError(f"its round {number!r} is not a round number")
    if not isinstance(config, dict) or not isinstance(metrics, list) or not all(isinstance(r, dict) for r in metrics):
        raise ValueError("it lacks its settings or its metrics")
    if [r.get("round") for r in metrics] != list(range(1, number + 1)):
        raise ValueError(f"it says round {number} was the last completed, but its metrics are for rounds "
                         f"{[r.get('round') for r in metrics][:10]}")
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"its weights hold NaN or Inf (tensor {name!r}): the model it saved is unusable")
    model = {k: v.clone() for k, v in tensors.items() if not k.startswith("strategy/")}
    strategy = {k.split("/", 1)[1]: v.clone() for k, v in tensors.items() if k.startswith("strategy/")}
    extra = state.get("extra") if isinstance(state.get("extra"), dict) else {}
    protections = state.get("protections") if state.get("format") == CHECKPOINT_FORMAT else None
    if state.get("format") == CHECKPOINT_FORMAT and not isinstance(protections, dict):
        raise ValueError("it lacks the record of its run's protections")
    return Checkpoint(config, number, metrics, model, strategy, extra, protections)


def save_config(config, output_dir: Path, rewrite: bool = False) -> None:
    """config.json: the run's settings, written again (`rewrite`) when the dashboard or a new session
    changes them; a rewrite that fails is a warning (every checkpoint holds the settings too)."""
    path = Path(output_dir) / "config.json"
    try:
        path.write_text(json.dumps(asdict(config), indent=2) + "\n")
    except OSError as exc:
        if not rewrite:
            raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from exc
        warn(WHO, f"cannot rewrite {path} with the new settings: {exc.strerror or exc}; the checkpoints hold them")


# --------------------------------------------------------------------------- the observer


class RunFiles(Observer):
    """Keeps a run's files: after each round the checkpoint, then metrics.csv; at the end the
    model and the plot. The writing happens in a thread of its own; `flush()` waits for it and
    raises OutputFailed with a sentence that names the file and the round that is safe. Each
    checkpoint records the run's `protections` (JSON) and is sealed with its `key`, if it has one."""

    def __init__(self, output_dir: Path, title: str, resumed: Checkpoint | None = None,
                 protections: dict[str, Any] | None = None, key: SealKey | None = None,
                 positive: str | None = None):
        self.output_dir = output_dir
        self.title, self.positive = title, positive  # the plot's title; the task's positive class, if any
        self.protections, self.key = protections or {}, key
        self.safe_round = resumed.round if resumed else 0  # the round of the last checkpoint written
        self.last = resumed  # the newest state: its model and metrics are what the run ends with
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="run-files")
        self.pending: list[Future] = []
        self.failed: OutputFailed | None = None
        if resumed is not None:  # metrics.csv is the checkpoint's rows, never more: no duplicated rows
            self._guard(lambda: write_metrics(self.output_dir / "metrics.csv", resumed.metrics), "metrics.csv")

    @property
    def checkpoint_path(self) -> Path:
        return self.output_dir / CHECKPOINT_NAME

    def notify(self, event) -> None:
        if isinstance(event, RoundFinished):
            self.last = event.checkpoint
            self.pending.append(self.executor.submit(self._save_round, event.checkpoint))
        elif isinstance(event, MetricsUpdated):
            self.last = event.checkpoint
            self.pending.append(self.executor.submit(self._save_round, event.checkpoint))
        elif isinstance(event, SettingsChanged):
            save_config(event.config, self.output_dir, rewrite=True)
        elif isinstance(event, (RunFinished, SessionFinished)) and self.last is not None:
            self.pending.append(self.executor.submit(self._save_final, self.last))

    def _save_round(self, state: Checkpoint) -> None:
        if self.failed:
            return  # one failure stops the run; later rounds are not written over it
        what = f"the checkpoint {self.checkpoint_path} for round {state.round}"
        stamped = replace(state, protections=self.protections)
        self._guard(lambda: write_checkpoint(self.checkpoint_path, stamped, self.key), what)
        self.safe_round = state.round
        self._guard(lambda: write_metrics(self.output_dir / "metrics.csv", state.metrics),
                    f"{self.output_dir / 'metrics.csv'} for round {state.round}")

    def _save_final(self, state: Checkpoint) -> None:
        self._guard(lambda: write_model(self.output_dir / "model.pt", state.model), str(self.output_dir / "model.pt"))
        self._guard(lambda: write_plot(self.output_dir / "accuracy.png", state.metrics, self.title, self.positive),
                    str(self.output_dir / "accuracy.png"))

    def _guard(self, write, what: str) -> None:
        try:
            write()
        except OSError as exc:
            if self.safe_round:
                safe = (f"the checkpoint of round {self.safe_round} is intact: resume with "
                        f"--resume {self.checkpoint_path}")
            else:
                safe = "no round's checkpoint was written"
            self.failed = self.failed or OutputFailed(f"cannot write {what}: {exc.strerror or exc}; {safe}")
            raise self.failed from exc

    async def flush(self) -> None:
        pending, self.pending = self.pending, []
        for future in pending:
            try:
                await held(asyncio.wrap_future(future))  # a virtual clock waits for the file
            except OutputFailed:
                pass
        if self.failed:
            raise self.failed

    def close(self) -> None:
        self.executor.shutdown(wait=True)

