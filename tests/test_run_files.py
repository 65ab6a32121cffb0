"""Checkpoints are checked before anything is resumed: every way a file can be wrong is one
sentence that names the file and the fault. In-process, on real files."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from fedsock.console import UsageError
from fedsock.run_files import Checkpoint, metrics_text, read_checkpoint, write_checkpoint


def rows(n: int) -> list[dict]:
    return [{"round": r, "clients": 2, "test_accuracy": 0.9, "test_loss": 0.3, "train_loss": 0.4, "seconds": 1.0,
             "bytes_sent": 10, "bytes_received": 10, "max_fit_seconds": 0.5} for r in range(1, n + 1)]


def state(round_number: int = 2, **changes) -> Checkpoint:
    fields = dict(config={"model": "logreg", "num_rounds": 5}, round=round_number, metrics=rows(round_number),
                  model={"linear.weight": torch.arange(12.0).view(3, 4), "linear.bias": torch.ones(3)},
                  strategy_state={"m/linear.bias": torch.full((3,), 0.5, dtype=torch.float64)}, extra={"note": 1})
    fields.update(changes)
    return Checkpoint(**fields)


def refused(path, pattern: str) -> None:
    with pytest.raises(UsageError, match=rf"cannot resume from {path}: {pattern}"):
        read_checkpoint(path)


def test_a_checkpoint_reads_back_whole(tmp_path):
    path = tmp_path / "checkpoint.fsck"
    write_checkpoint(path, state())
    back = read_checkpoint(path)
    assert back.round == 2 and back.metrics == rows(2) and back.extra == {"note": 1}
    assert torch.equal(back.model["linear.weight"], torch.arange(12.0).view(3, 4))
    assert back.strategy_state["m/linear.bias"].dtype == torch.float64  # the server optimiser's state, exactly
    assert not (tmp_path / "checkpoint.fsck.tmp").exists()


def test_one_byte_flipped_anywhere_is_found(tmp_path):
    path = tmp_path / "checkpoint.fsck"
    write_checkpoint(path, state())
    data = bytearray(path.read_bytes())
    for offset in (len(data) // 2, len(data) - 40, 20):  # in the weights, the last weight bytes, the JSON
        damaged = bytearray(data)
        damaged[offset] ^= 0x01
        bad = tmp_path / f"flipped-{offset}.fsck"
        bad.write_bytes(damaged)
        with pytest.raises(UsageError, match=rf"cannot resume from {bad}: (it is damaged: its SHA-256 checksum does "
                                             rf"not match its contents|not a fedsock checkpoint)"):
            read_checkpoint(bad)


def test_a_round_digit_changed_in_valid_json_is_found(tmp_path):
    path = tmp_path / "checkpoint.fsck"
    write_checkpoint(path, state(2))
    data = path.read_bytes()
    changed = data.replace(b'"round":2,"metrics"', b'"round":0,"metrics"', 1)
    assert changed != data and json.loads(changed[8 : 8 + struct.unpack(">Q", changed[:8])[0]])["round"] == 0
    path.write_bytes(changed)
    refused(path, "it is damaged: its SHA-256 checksum does not match its contents")


def test_a_well_formed_checkpoint_that_makes_no_sense_is_refused(tmp_path):
    nan = tmp_path / "nan.fsck"
    write_checkpoint(nan, state(model={"linear.weight": torch.tensor([1.0, float("nan")])}))
    refused(nan, r"its weights hold NaN or Inf \(tensor 'linear.weight'\)")
    rounds = tmp_path / "rounds.fsck"
    write_checkpoint(rounds, state(2, metrics=rows(2) + rows(1)))
    refused(rounds, r"it says round 2 was the last completed, but its metrics are for rounds \[1, 2, 1\]")


@pytest.mark.parametrize("content, pattern", [
    (b"", r"the file is empty \(0 bytes\), not a checkpoint"),
    (b"round,clients\n1,2\n", r"not a fedsock checkpoint"),
    (None, r"the file is cut short"),
    (b"junk", r"the checksum is followed by junk"),
])
def test_empty_foreign_cut_or_padded_files_are_refused(tmp_path, content, pattern):
    path = tmp_path / "checkpoint.fsck"
    write_checkpoint(path, state())
    whole = path.read_bytes()
    if content is None:
        path.write_bytes(whole[:-10])
    elif content == b"junk":
        path.write_bytes(whole + content)
    else:
        path.write_bytes(content)
    refused(path, pattern)


def test_a_checkpoint_of_another_format_says_so(tmp_path):
    path = tmp_path / "old.fsck"
    payload = json.dumps({"header": "<CHECKPOINT>", "config": {}, "round": 1, "metrics": [], "weights": {}}).encode()
    path.write_bytes(struct.pack(">Q", len(payload)) + payload)
    refused(path, r"it was written by another version of fedsock \(format 1, this one reads 2, 3\)")
    refused(tmp_path / "missing.fsck", "No such file or directory")


def test_metrics_csv_is_exactly_the_rows_given():
    text = metrics_text(rows(2))
    assert text.splitlines()[0].startswith("round,clients,test_accuracy") and len(text.splitlines()) == 3


def test_the_plot_names_the_f1_it_draws_and_keeps_it_beneath_the_accuracy(monkeypatch):
    """On 10-class MNIST the F1 is the macro mean, not a positive class's; drawn dashed under the accuracy,
    which it nearly equals, so that it hides nothing."""
    import matplotlib.axes

    from fedsock.run_files import plot_png

    drawn = []
    original = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, *args, **kwargs: drawn.append(kwargs) or original(self, *args, **kwargs))
    rows = [{"round": r, "test_accuracy": 0.9, "test_f1": 0.9, "test_loss": 0.3, "train_loss": 0.4} for r in (1, 2)]
    plot_png(rows, "mnist", None)
    by_label = {kw["label"]: kw for kw in drawn}
    assert set(by_label) >= {"accuracy, server's test set", "macro F1 (mean over classes), server's test set"}
    f1 = by_label["macro F1 (mean over classes), server's test set"]
    assert f1["linestyle"] == "--" and f1["zorder"] < by_label["accuracy, server's test set"]["zorder"]
    drawn.clear()
    plot_png(rows, "spam", "spam")
    assert "F1 of spam, server's test set" in {kw["label"] for kw in drawn}
    assert not any("positive class" in kw["label"] for kw in drawn)
