"""What a run keeps on disk: metrics.csv, checkpoints, the final model and the plot.

A checkpoint uses the wire format itself (a JSON frame, then a weights frame),
so reading one back goes through the same checked decoder and never unpickles.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from fedsock.console import UsageError
from socket_methods import FrameReader, ProtocolError, decode_weights, encode_message, frame_header

METRIC_COLUMNS = (
    "round", "clients", "test_accuracy", "test_loss", "train_loss", "seconds",
    "bytes_sent", "bytes_received", "max_fit_seconds",
)
CHECKPOINT_NAME = "checkpoint.fsck"
# A checkpoint's JSON part holds the metrics of every round so far: generous room.
MAX_CHECKPOINT_JSON_BYTES = 64 << 20


def write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    """(Re)write metrics.csv in full: cheap, and after a resume it matches the checkpoint exactly."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_atomically(path: Path, buffers: list[bytes | bytearray | memoryview]) -> None:
    """Write to a temporary file, fsync, then rename over `path`: a crash at any instant
    leaves either the old file or the new one, whole."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as f:
        for buffer in buffers:
            f.write(buffer)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


def write_checkpoint(path: Path, config: dict, round_number: int, metrics: list[dict], layout: dict, blob: bytearray) -> None:
    header = encode_message("<CHECKPOINT>", config=config, round=round_number, metrics=metrics, weights=layout)
    write_atomically(path, [header, frame_header(len(blob)), memoryview(blob)])


def read_checkpoint(path: str) -> tuple[dict[str, Any], bytearray]:
    """The checkpoint's JSON part and its weights bytes, both checked."""
    reader = FrameReader()
    try:
        with open(path, "rb") as f:
            reader.expect_message(MAX_CHECKPOINT_JSON_BYTES)
            reader.fill_from(f.readinto)
            state = json.loads(bytes(reader.payload))
            if not isinstance(state, dict) or state.get("header") != "<CHECKPOINT>":
                raise ValueError("not a fedsock checkpoint")
            if not isinstance(state.get("round"), int) or not isinstance(state.get("config"), dict):
                raise ValueError("checkpoint lacks its round or config")
            if not isinstance(state.get("metrics"), list) or not isinstance(state.get("weights"), dict):
                raise ValueError("checkpoint lacks its metrics or weights")
            nbytes = state["weights"].get("nbytes")
            if not isinstance(nbytes, int) or not 0 <= nbytes <= os.fstat(f.fileno()).st_size:
                raise ValueError("the weights part is missing or cut short")
            blob = bytearray(nbytes)
            try:
                reader.expect_blob(blob)  # takes what the reader already read ahead, then the rest
                reader.fill_from(f.readinto)
            except ProtocolError as exc:  # a length that differs, or the end of the file
                raise ValueError("the weights part is missing or cut short") from exc
            if reader.staged or f.read(1):
                raise ValueError("the weights part is followed by junk")
        decode_weights(state["weights"], blob)
    except (OSError, ValueError, ProtocolError) as exc:
        raise UsageError(f"cannot resume from {path}: {exc}") from exc
    return state, blob


def write_model(path: Path, tensors: dict) -> None:
    """The final global model as a PyTorch state_dict (torch.load(path) gives it back)."""
    import torch

    temporary = path.with_name(path.name + ".tmp")
    torch.save({name: t.detach().cpu().clone() for name, t in tensors.items()}, temporary)
    os.replace(temporary, path)


def write_plot(path: Path, rows: list[dict[str, Any]], title: str) -> None:
    """Test accuracy, and test and training loss, per round."""
    if not rows:
        return
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # the object API: no pyplot state, safe off the main thread

    rounds = [r["round"] for r in rows]
    figure = Figure(figsize=(9, 3.6), dpi=110)
    FigureCanvasAgg(figure)
    accuracy, loss = figure.subplots(1, 2)
    accuracy.plot(rounds, [100 * r["test_accuracy"] for r in rows], marker="o", color="tab:blue")
    accuracy.set(xlabel="round", ylabel="test accuracy (%)", title="global model, held-out test set")
    loss.plot(rounds, [r["test_loss"] for r in rows], marker="o", label="test loss (global model)")
    loss.plot(rounds, [r["train_loss"] for r in rows], marker="s", label="training loss (clients, weighted)")
    loss.set(xlabel="round", ylabel="cross-entropy", title="loss")
    loss.legend()
    for axes in (accuracy, loss):
        axes.grid(alpha=0.3)
        axes.xaxis.get_major_locator().set_params(integer=True)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path)
