"""A run's model card: what the model is, how big, and what one update and one broadcast cost on the
wire with the run's compression. Written to the run's folder as model_card.json, shown by the
dashboard (its state's `model_card`) and in TensorBoard's text tab.

The sizes are the weights frame's payload (`nbytes` of the layout the server expects, alignment
padding included), from fedsock.compression's and fedsock.secagg's own layout functions: the bytes
that cross the network for the weights, before the message's JSON frame (a few hundred bytes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

import neural_net_helper as nnh
from fedsock import compression, secagg
from socket_methods import weights_layout


def model_card(name: str, model: nn.Module, kind: str = "none", topk_fraction: float = 0.01, broadcast: str = "none",
               secure_aggregation: bool = False) -> dict[str, Any]:
    """The card of `model` (on any device, the meta device included: only shapes are read)."""
    weights = nnh.get_weights(model)
    layout = weights_layout(weights)
    if secure_aggregation:
        update = secagg.masked_layout(secagg.model_length(weights))
        update_kind = "masked, secure aggregation"
    else:
        update = compression.update_layout(layout, kind, topk_fraction)
        update_kind = kind + (f", {topk_fraction:g} of each tensor" if kind == "topk" else "")
    parameters = sum(p.numel() for p in model.parameters())
    return {
        "model": name,
        "parameters": parameters,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "float32_bytes": 4 * parameters,
        "weights_bytes": layout["nbytes"],  # the model as one uncompressed weights frame (model.pt holds the same)
        "update_compression": update_kind,
        "update_bytes": update["nbytes"],
        "broadcast_compression": broadcast,
        "broadcast_bytes": compression.update_layout(layout, broadcast)["nbytes"],
        "layers": layer_table(model),
        "architecture": repr(model),
    }


def layer_table(model: nn.Module) -> list[dict[str, Any]]:
    """Each module that holds parameters of its own: its name, type, tensor shapes and parameter count."""
    rows = []
    for name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if own:
            rows.append({"name": name, "type": type(module).__name__,
                         "shapes": {n: list(p.shape) for n, p in own}, "parameters": sum(p.numel() for _, p in own)})
    return rows


def run_model_card(config, task) -> dict[str, Any] | None:
    """The card of a run's model, built on the meta device (no memory, no initialisation cost)."""
    if task is None:
        return None
    with torch.device("meta"):
        model = nnh.build_model(config.model, task, config.seed)
    return model_card(config.model, model, config.compression, config.topk_fraction, config.compress_broadcast,
                      config.secure_aggregation)


def card_line(card: dict[str, Any]) -> str:
    """`model cnn: 1,663,370 parameters, 6.35 MiB as float32; an update 1.59 MiB (int8), a broadcast 6.35 MiB (none)`"""
    return (f"model {card['model']}: {card['parameters']:,} parameters, {mib(card['float32_bytes'])} as float32; "
            f"an update {mib(card['update_bytes'])} ({card['update_compression']}), a broadcast "
            f"{mib(card['broadcast_bytes'])} ({card['broadcast_compression']})")


def card_markdown(card: dict[str, Any]) -> str:
    """The card as Markdown (TensorBoard's text tab renders it)."""
    lines = [card_line(card), "", "| layer | type | shapes | parameters |", "|---|---|---|---|"]
    for row in card["layers"]:
        shapes = ", ".join(f"{n} {'x'.join(map(str, s))}" for n, s in row["shapes"].items())
        lines.append(f"| {row['name']} | {row['type']} | {shapes} | {row['parameters']:,} |")
    return "\n".join(lines) + "\n\n```\n" + card["architecture"] + "\n```"


def mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:.1f} KiB"


def write_model_card(card: dict[str, Any], output_dir: Path) -> None:
    (Path(output_dir) / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
