"""`--export torchscript`: the final global model as TorchScript, ready for inference anywhere PyTorch
(or libtorch, from C++) runs, without fedsock's code.

    model = torch.jit.load("runs/X/model.torchscript.pt"); logits = model(images)

The exported module takes what a user has, not what fedsock feeds its model: for an image task,
floats in [0, 1] of shape (N, C, H, W) (a PIL image through torchvision's ToTensor), normalised
inside with the task's mean and std; for a text task, the hashed token ids of fedsock.text
(N, max_tokens). It is the model scripted (torch.jit.script; traced where a model's code cannot be compiled), on the CPU, in
eval mode, and it carries `fedsock.json` (the model, the task's classes and input, the round) as
an extra file: `torch.jit.load(path, _extra_files={"fedsock.json": ""})` fills it in.

Why not ONNX: this PyTorch's `torch.onnx.export` needs the `onnx` and `onnxscript` packages, and
checking its predictions needs `onnxruntime`; TorchScript needs only torch, which whoever has a
model.pt already has. (torch.jit warns that it is deprecated in favour of torch.export, whose .pt2
files are tied to the PyTorch version that wrote them; TorchScript still loads everywhere.)

For a run that is over: `python -m fedsock.export runs/X/model.pt` reads the run's config.json for
the model and the task, and writes runs/X/model.torchscript.pt.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

import client_helper
import neural_net_helper as nnh
from fedsock.console import ArgumentParser, FedsockError, UsageError, run_main, say, warn
from fedsock.events import BackgroundObserver, MetricsUpdated, RoundFinished, RunFinished, SessionFinished
from fedsock.run_files import Checkpoint, OutputFailed, write_atomically
from fedsock.tasks import Task, make_task, task_of_dataset
from socket_methods import check_layout, weights_layout

EXPORT_NAME = "model.torchscript.pt"
INFO_FILE = "fedsock.json"


class ForInference(nn.Module):
    """An image model with its input normalisation: pixels in [0, 1] in, logits out."""

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def inference_module(model_name: str, task: Task, weights: dict[str, torch.Tensor]) -> nn.Module:
    """The model with `weights`, on the CPU, in eval mode; for images, with its normalisation."""
    model = nnh.build_model(model_name, task)
    model.load_state_dict({k: v.detach().cpu() for k, v in weights.items()}, strict=True)
    if task.kind == "image":
        model = ForInference(model, task.mean, task.std)
    return model.eval()


def export_info(model_name: str, task: Task, round_number: int | None) -> dict[str, Any]:
    shape = ["N", *task.input_shape]
    described = ("float32 pixels in [0, 1], normalised inside" if task.kind == "image"
                 else "int64 hashed token ids (fedsock.text), left-padded with 0")
    return {"model": model_name, "round": round_number, "classes": list(task.classes), "input_shape": shape,
            "input": described, "task": task.to_json()}


def torchscript_bytes(model_name: str, task: Task, weights: dict[str, torch.Tensor],
                      round_number: int | None = None) -> bytes:
    """The bytes of model.torchscript.pt."""
    module = inference_module(model_name, task, weights)
    with warnings.catch_warnings():  # torch.jit's FutureWarning (see the module's docstring)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            scripted = torch.jit.script(module)
        except RuntimeError:  # a forward that TorchScript cannot compile (TextCNN's loop over its convolutions):
            scripted = torch.jit.trace(module, example_input(task))  # traced, with the batch size left free
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer,
                       _extra_files={INFO_FILE: json.dumps(export_info(model_name, task, round_number))})
    return buffer.getvalue()


def example_input(task: Task, batch: int = 2) -> torch.Tensor:
    if task.kind == "image":
        return torch.rand(batch, *task.input_shape)
    return torch.randint(1, task.buckets, (batch, task.max_tokens))


def load_example(path: Path) -> str:
    return f'torch.jit.load("{path}")(x)'


def task_of_config(config: Any) -> Task:
    """The task a run's settings describe (its config.json's, or a ServerConfig)."""
    if config.task == "dataset":
        return task_of_dataset(client_helper.DATASETS[config.dataset])
    return make_task(config.task, config.classes or "", config.image_size, config.channels, config.image_mean,
                     config.image_std, config.max_tokens, config.buckets, config.positive_class)


class ModelExport(BackgroundObserver):
    """--export: writes model.torchscript.pt beside model.pt when the run (or a --stay session) ends."""

    def __init__(self, output_dir: Path, model_name: str, task: Task, who: str, resumed: Checkpoint | None = None):
        self.path = Path(output_dir) / EXPORT_NAME
        self.model_name, self.task, self.who = model_name, task, who
        self.last = resumed
        super().__init__("export")

    def notify(self, event) -> None:
        if isinstance(event, (RoundFinished, MetricsUpdated)) and event.checkpoint is not None:
            self.last = event.checkpoint
        elif isinstance(event, (RunFinished, SessionFinished)) and self.last is not None:
            self.submit(self._export, self.last)

    def _export(self, state: Checkpoint) -> None:
        try:
            data = torchscript_bytes(self.model_name, self.task, state.model, state.round)
        except Exception as exc:  # model.pt is written: python -m fedsock.export can try again from it
            warn(self.who, f"could not export the model as TorchScript ({type(exc).__name__}: {exc}); "
                           f"model.pt is intact")
            return
        try:
            write_atomically(self.path, [data])
        except OSError as exc:
            raise OutputFailed(f"cannot write {self.path}: {exc.strerror or exc}") from exc
        say(self.who, f"exported round {state.round}'s model to {self.path}: {load_example(self.path)} gives the logits")


# --------------------------------------------------------------------------- python -m fedsock.export


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m fedsock.export",
                            description="Export a finished run's model.pt as TorchScript (model.torchscript.pt).")
    parser.add_argument("model", metavar="MODEL_PT", help="a run's model.pt; its config.json beside it names the "
                                                         "model and the task")
    parser.add_argument("--config", metavar="CONFIG_JSON", help="the run's config.json (default: beside MODEL_PT)")
    parser.add_argument("--output", metavar="PATH", help=f"where to write (default: {EXPORT_NAME} beside MODEL_PT)")
    parser.add_argument("--traceback", action="store_true", help="show a full traceback on errors (for bug reports)")
    return parser


def read_model(path: Path, model_name: str, task: Task) -> dict[str, torch.Tensor]:
    """A run's model.pt, checked against the model its config.json names."""
    try:
        # weights_only: PyTorch's restricted unpickler, which loads tensors and nothing that runs code.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from exc
    except Exception as exc:  # torch.load raises many kinds for a file that is not a model.pt
        raise UsageError(f"cannot read {path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    template = nnh.get_weights(nnh.build_model(model_name, task))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"{path} is not a model.pt (a state_dict of tensors)")
    try:
        check_layout(weights_layout(state), weights_layout(template))
    except FedsockError as exc:
        raise UsageError(f"{path} does not fit the run's {model_name} model: {exc}") from exc
    return {name: state[name] for name in template}


def main(argv: list[str] | None = None) -> int:
    from fedsock.config import ServerConfig, from_dict

    args = build_parser().parse_args(argv)
    model_path = Path(args.model)
    config_path = Path(args.config) if args.config else model_path.parent / "config.json"
    try:
        config = from_dict(ServerConfig, json.loads(config_path.read_text()))
    except OSError as exc:
        raise UsageError(f"cannot read {config_path} (the run's settings): {exc.strerror or exc}") from exc
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{config_path} is not a run's config.json: {exc}") from exc
    try:
        task = task_of_config(config)
    except (ValueError, KeyError) as exc:
        raise UsageError(f"{config_path}: its task cannot be made: {exc}") from exc
    weights = read_model(model_path, config.model, task)
    output = Path(args.output) if args.output else model_path.parent / EXPORT_NAME
    try:
        write_atomically(output, [torchscript_bytes(config.model, task, weights)])
    except OSError as exc:
        raise UsageError(f"cannot write {output}: {exc.strerror or exc}") from exc
    say("export", f"wrote {output} ({config.model}, {task.describe()}): {load_example(output)} gives the logits")
    return 0


if __name__ == "__main__":
    sys.exit(run_main("python -m fedsock.export", main))
