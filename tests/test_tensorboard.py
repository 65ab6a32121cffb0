"""What a run leaves for the ecosystem's tools: TensorBoard event files holding metrics.csv's numbers
(read back with tensorboard's own reader), a TorchScript model that predicts as model.pt does, and a
model card whose sizes are the bytes fedsock really sends. In-process: fl_simulate.py's main runs here."""

from __future__ import annotations

import asyncio
import io
import json
import sys
import warnings

import numpy as np
import pytest
import torch

import client_helper
import neural_net_helper as nnh
from fedsock import compression, secagg
from fedsock.events import MetricsUpdated, RoundFinished
from fedsock.export import EXPORT_NAME, INFO_FILE, torchscript_bytes
from fedsock.model_card import model_card, run_model_card
from fedsock.run_files import Checkpoint
from fedsock.tasks import make_task, task_of_dataset
from socket_methods import encode_weights
from support import read_metrics

from fedsock.tensorboard import TAGS, TensorBoardLog, scalars_of

# The test extra installs tensorboard (pyproject.toml): without it these tests fail, they do not skip.
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

MNIST = task_of_dataset(client_helper.DATASETS["mnist"])
TEST_IMAGES = 500


def simulate_here(*args: str, output_dir) -> int:
    import fl_simulate

    return fl_simulate.main(["--output-dir", str(output_dir), *args])


def logged(log_dir) -> dict[tuple[str, int], list[float]]:
    """Every scalar TensorBoard would show, read with its own reader: (tag, step) -> the values logged there."""
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    out: dict[tuple[str, int], list[float]] = {}
    for tag in accumulator.Tags()["scalars"]:
        for event in accumulator.Scalars(tag):
            out.setdefault((tag, event.step), []).append(event.value)
    return out


def as_logged(scalars: dict[tuple[str, int], float]) -> dict[tuple[str, int], list[float]]:
    """What the event files must hold: each value once, as float32 (TensorBoard's scalars are)."""
    return {key: [float(np.float32(value))] for key, value in scalars.items()}


def mnist_test_images(n: int = TEST_IMAGES) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n MNIST test images as pixels in [0, 1], and normalised as fedsock feeds its models."""
    test = client_helper.load_split("mnist", "test")
    raw = torch.from_numpy(np.array(test.images[:n])).float().div(255)
    normalised, _ = nnh.to_tensors(test.images[:n], test.labels[:n], client_helper.DATASETS["mnist"], torch.device("cpu"))
    return raw, normalised


def jit_load(source):
    with warnings.catch_warnings():  # torch.jit.load's FutureWarning in recent PyTorch
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(source)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One short simulated run with --tensorboard and --export torchscript."""
    root = tmp_path_factory.mktemp("run")
    tensorboard = ["--tensorboard", str(root / "tb")] if EventAccumulator is not None else []
    code = simulate_here("--model", "logreg", "--num-clients", "3", "--num-rounds", "3", *tensorboard,
                         "--export", "torchscript", output_dir=root / "out")
    assert code == 0
    return root


def test_the_event_files_hold_metrics_csvs_numbers(run):
    rows = read_metrics(run / "out" / "metrics.csv")
    assert [r["round"] for r in rows] == [1, 2, 3]
    expected = {(TAGS[column], int(row["round"])): value for row in rows for column, value in row.items()
                if column in TAGS and isinstance(value, float)}
    assert ("test/accuracy", 3) in expected and ("traffic/bytes_sent", 1) in expected
    assert logged(run / "tb") == as_logged(expected)


def test_the_settings_and_the_model_card_are_in_the_text_and_hparams_tabs(run):
    accumulator = EventAccumulator(str(run / "tb"))
    accumulator.Reload()
    assert {"settings/text_summary", "model_card/text_summary"} <= set(accumulator.Tags()["tensors"])
    text = accumulator.Tensors("settings/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| model | logreg |" in text and "| num_rounds | 3 |" in text
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    start = HParamsPluginData.FromString(accumulator.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["model"].string_value == "logreg"
    assert start.session_start_info.hparams["num_rounds"].number_value == 3


def test_a_row_changed_after_the_fact_ends_with_its_last_numbers(tmp_path):
    """The clients' evaluation of round 1 arrives with round 2; a value that changes is logged again
    after a restart marker, so that TensorBoard shows only the last one."""
    from fedsock.config import ServerConfig

    log = TensorBoardLog(tmp_path / "tb", ServerConfig())
    row1 = {"round": 1, "clients": 2, "test_accuracy": 0.5, "test_loss": 1.0, "confusion": [[1, 0], [0, 1]]}
    row2 = {"round": 2, "clients": 2, "test_accuracy": 0.7, "test_loss": 0.8}

    def emit(event) -> None:
        log.notify(event)
        asyncio.run(log.flush())

    emit(RoundFinished(row1, 3, Checkpoint({}, 1, [row1], {})))
    row1 = {**row1, "fed_accuracy": 0.6, "fed_clients": 2}
    emit(RoundFinished(row2, 3, Checkpoint({}, 2, [row1, row2], {})))
    row2 = {**row2, "test_loss": 0.75}  # a changed value (none does today; the log must still end right)
    emit(MetricsUpdated(Checkpoint({}, 2, [row1, row2], {})))
    log.close()
    assert logged(tmp_path / "tb") == as_logged(scalars_of([row1, row2]))
    assert ("federated/accuracy", 1) in scalars_of([row1, row2])
    accumulator = EventAccumulator(str(tmp_path / "tb"))
    accumulator.Reload()
    assert "settings/text_summary" in accumulator.Tags()["tensors"]  # the restart did not hide them


def test_a_resumed_run_replaces_what_its_first_run_logged(tmp_path):
    from fedsock.config import ServerConfig

    rows = [{"round": r, "test_accuracy": r / 10, "train_loss": 1 / r} for r in (1, 2, 3)]
    first = TensorBoardLog(tmp_path / "tb", ServerConfig())
    first.notify(RoundFinished(rows[2], 3, Checkpoint({}, 3, rows, {})))  # round 3 logged, its checkpoint lost
    asyncio.run(first.flush())
    first.close()
    again = [*rows[:2], {"round": 3, "test_accuracy": 0.35, "train_loss": 0.3}]
    resumed = TensorBoardLog(tmp_path / "tb", ServerConfig(), Checkpoint({}, 2, rows[:2], {}))
    resumed.notify(RoundFinished(again[2], 3, Checkpoint({}, 3, again, {})))
    asyncio.run(resumed.flush())
    resumed.close()
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 2
    assert logged(tmp_path / "tb") == as_logged(scalars_of(again))


def test_without_the_tensorboard_package_the_flag_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` raises ImportError
    with pytest.raises(SystemExit) as exit_:
        simulate_here("--model", "logreg", "--num-rounds", "1", "--tensorboard", str(tmp_path / "tb"),
                      output_dir=tmp_path / "out")
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error
    assert "--tensorboard needs the tensorboard package" in error and "pip install tensorboard" in error
    assert not (tmp_path / "out").exists()


def test_the_exported_model_predicts_as_model_pt_does(run):
    weights = torch.load(run / "out" / "model.pt", weights_only=True)
    model = nnh.build_model("logreg", MNIST)
    model.load_state_dict(weights)
    raw, normalised = mnist_test_images()
    expected = model.eval()(normalised)
    extra = {INFO_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        exported = torch.jit.load(str(run / "out" / EXPORT_NAME), _extra_files=extra)
    got = exported(raw)  # pixels in [0, 1]: the normalisation is inside
    assert torch.equal(got.argmax(1), expected.argmax(1))
    assert torch.allclose(got, expected, atol=1e-5)
    info = json.loads(extra[INFO_FILE])
    assert info["model"] == "logreg" and info["round"] == 3 and info["input_shape"] == ["N", 1, 28, 28]


def test_python_m_fedsock_export_exports_a_finished_runs_model(run, tmp_path):
    from fedsock.export import main

    assert main([str(run / "out" / "model.pt"), "--output", str(tmp_path / "again.pt")]) == 0
    raw, _ = mnist_test_images(50)
    assert torch.equal(jit_load(str(tmp_path / "again.pt"))(raw), jit_load(str(run / "out" / EXPORT_NAME))(raw))


def test_the_cnn_and_the_text_models_export_too():
    raw, normalised = mnist_test_images(200)
    model = nnh.build_model("cnn", MNIST).eval()
    with torch.no_grad():
        for p in model.parameters():  # not the initial weights: any trained model's
            p.add_(0.01 * torch.randn_like(p))
    exported = jit_load(io.BytesIO(torchscript_bytes("cnn", MNIST, nnh.get_weights(model))))
    got, expected = exported(raw), model(normalised)
    assert torch.equal(got.argmax(1), expected.argmax(1)) and torch.allclose(got, expected, atol=1e-4)
    text = make_task("text", "ham,spam", 28, 1, None, None, 30, 1 << 15, None)
    tokens = torch.randint(1, 1 << 15, (7, 30))
    for name in ("textcnn", "textgru"):  # textcnn cannot be scripted: it is traced, its batch size left free
        model = nnh.build_model(name, text).eval()
        exported = jit_load(io.BytesIO(torchscript_bytes(name, text, nnh.get_weights(model))))
        assert torch.allclose(exported(tokens), model(tokens), atol=1e-5)


@pytest.mark.parametrize("kind", compression.KINDS)
def test_the_model_cards_sizes_are_the_bytes_sent(kind):
    model = nnh.build_model("cnn", MNIST)
    card = model_card("cnn", model, kind, 0.01, "int8" if kind == "fp16" else "none")
    assert card["parameters"] == 1_663_370 and card["float32_bytes"] == 4 * 1_663_370
    weights = nnh.get_weights(model)
    delta = {name: 0.01 * torch.randn_like(t) for name, t in weights.items()}
    sent = delta if kind == "none" else \
        compression.encode(delta, kind, 0.01, {} if kind == "topk" else None, torch.Generator().manual_seed(0))[0]
    assert card["update_bytes"] == len(encode_weights(sent)[1])
    broadcast = weights if card["broadcast_compression"] == "none" else \
        compression.encode_weights_for_broadcast(weights, card["broadcast_compression"])[0]
    assert card["broadcast_bytes"] == len(encode_weights(broadcast)[1])
    assert card["weights_bytes"] == len(encode_weights(weights)[1])
    assert [row["name"] for row in card["layers"]] == ["conv1", "conv2", "fc1", "fc2"]


def test_the_model_card_of_a_secure_run_is_the_masked_vector(run):
    from fedsock.config import ServerConfig

    card = run_model_card(ServerConfig(model="mlp", secure_aggregation=True), MNIST)
    assert card["update_bytes"] == secagg.masked_layout(199_210)["nbytes"]  # 784·200 + 200 + 200·200 + 200 + 200·10 + 10
    saved = json.loads((run / "out" / "model_card.json").read_text())
    assert saved["model"] == "logreg" and saved["parameters"] == 7850


def test_a_resumed_simulation_keeps_writing_the_same_numbers(tmp_path):
    """--resume keeps the run's --tensorboard folder; the two event files read as metrics.csv."""
    first = simulate_here("--model", "logreg", "--num-clients", "2", "--num-rounds", "2", "--tensorboard",
                          str(tmp_path / "tb"), output_dir=tmp_path / "out")
    assert first == 0
    again = simulate_here("--resume", str(tmp_path / "out" / "checkpoint.fsck"), "--num-rounds", "3",
                          output_dir=tmp_path / "out")
    assert again == 0
    rows = read_metrics(tmp_path / "out" / "metrics.csv")
    assert [r["round"] for r in rows] == [1, 2, 3]
    expected = {(TAGS[column], int(row["round"])): value for row in rows for column, value in row.items()
                if column in TAGS and isinstance(value, float)}
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 2
    assert logged(tmp_path / "tb") == as_logged(expected)
