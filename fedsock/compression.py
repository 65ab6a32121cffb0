"""Compressed updates: a client sends the difference from the global model, made small.

`--compression` (server; announced in <METADATA>, feature `compression`):
- `fp16`: the delta as float16: half the bytes, a relative error of about 5e-4.
- `int8`: per tensor, the delta's range [lo, hi] in 255 steps: q = floor((d - lo) / scale + u),
  u uniform in [0, 1) (stochastic rounding: the decoded delta is unbiased), sent as uint8 with
  (scale, lo); decoded as lo + q * scale. A quarter of the bytes.
- `topk`: per tensor, the k = ceil(fraction * n) entries of largest magnitude (`--topk-fraction`,
  default 0.01), as sorted int32 indices and their float32 values; what is not sent this round is
  kept by the client (error feedback: it is added to the next round's delta), so nothing is lost,
  only delayed. About 2 * fraction of the bytes.

Only floating-point tensors are compressed; others go as they are. The server knows the layout
of every compressed update from the model's layout alone (`update_layout`), so it checks and
receives a compressed update as exactly as a plain one, into smaller buffers, and decodes it
tensor by tensor as it folds it into the round's aggregate (`Decoded`): the decoded update is
never whole in memory. Bad compressed data (indices out of range or not increasing, a scale that
is not finite or negative) is refused like any bad update.

`--compress-broadcast fp16|int8` also compresses the global model the server sends (the weights
themselves, rounded to the nearest step, so that the server knows exactly what each client got
and adds the deltas to that).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch

from socket_methods import ALIGNMENT, DTYPE_SIZES, BadMessage, BadWeights

KINDS = ("none", "fp16", "int8", "topk")
BROADCAST_KINDS = ("none", "fp16", "int8")
INT8_STEPS = 255
FEATURE = "compression"


@dataclass(frozen=True)
class Compression:
    """A run's compression, as <METADATA> announces it: {"kind", "topk_fraction", "broadcast"}."""

    kind: str = "none"
    topk_fraction: float = 0.01
    broadcast: str = "none"

    @property
    def active(self) -> bool:
        return self.kind != "none" or self.broadcast != "none"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "topk_fraction": self.topk_fraction, "broadcast": self.broadcast}

    @classmethod
    def from_json(cls, value: Any) -> "Compression":
        """Checked: what a server announced (a client refuses what it does not know)."""
        if not isinstance(value, dict) or not {"kind", "topk_fraction", "broadcast"} <= set(value):
            raise BadMessage("<METADATA> compression must be {kind, topk_fraction, broadcast}")
        kind, fraction, broadcast = value["kind"], value["topk_fraction"], value["broadcast"]
        if kind not in KINDS or broadcast not in BROADCAST_KINDS:
            raise BadMessage(f"the server asks for compression {kind!r} with broadcast {broadcast!r}; this client "
                             f"knows {', '.join(KINDS)} and broadcasts {', '.join(BROADCAST_KINDS)}")
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise BadMessage(f"<METADATA> topk_fraction {fraction!r} must be in (0, 1]")
        return cls(kind, float(fraction), broadcast)


FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def is_compressed(entry: Mapping[str, Any]) -> bool:
    """Whether a layout entry is encoded: float32 and float64 tensors are; every other one goes as it is."""
    return entry["dtype"] in ("float32", "float64")


def compressible(tensor: torch.Tensor) -> bool:
    """The same rule for a tensor."""
    return tensor.dtype in (torch.float32, torch.float64)


def topk_count(numel: int, fraction: float) -> int:
    return max(1, math.ceil(fraction * numel)) if numel else 0


def _entries(parts: list[tuple[str, str, list[int]]]) -> dict[str, Any]:
    entries, offset = [], 0
    for name, dtype, shape in parts:
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        entries.append({"name": name, "dtype": dtype, "shape": shape, "offset": offset, "nbytes": nbytes})
        offset += -(-nbytes // ALIGNMENT) * ALIGNMENT
    return {"byte_order": "little", "nbytes": offset, "tensors": entries}


def update_layout(model_layout: Mapping[str, Any], kind: str, fraction: float = 0.01) -> dict[str, Any]:
    """The weights layout of an update compressed with `kind`: what a client sends, and the server expects."""
    if kind == "none":
        return dict(model_layout)
    parts = []
    for entry in model_layout["tensors"]:
        name, shape = entry["name"], entry["shape"]
        if not is_compressed(entry):
            parts.append((name, entry["dtype"], shape))
        elif kind == "fp16":
            parts.append((name, "float16", shape))
        elif kind == "int8":
            parts.append((name, "uint8", shape))
        else:
            k = topk_count(math.prod(shape), fraction)
            parts += [(f"{name}/indices", "int32", [k]), (f"{name}/values", "float32", [k])]
    return _entries(parts)


# --------------------------------------------------------------------------- the client's side


def compress_update(base: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor], compression: Compression,
                    residual: dict[str, torch.Tensor] | None,
                    generator: torch.Generator | None) -> tuple[dict[str, torch.Tensor], dict[str, list[float]]]:
    """What a client sends for its trained weights: the delta from the model it got, compressed."""
    delta = {name: (t.detach().cpu() - base[name]) if compressible(t) else t.detach().cpu()
             for name, t in trained.items()}
    return encode(delta, compression.kind, compression.topk_fraction, residual, generator)


def encode(delta: Mapping[str, torch.Tensor], kind: str, fraction: float = 0.01,
           residual: dict[str, torch.Tensor] | None = None,
           generator: torch.Generator | None = None) -> tuple[dict[str, torch.Tensor], dict[str, list[float]]]:
    """The tensors to send for `delta`, and int8's per-tensor [scale, lo]. For topk, `residual` (the
    client's error feedback, changed in place) is added first and keeps what was not sent."""
    out, params = {}, {}
    for name, d in delta.items():
        if not compressible(d):
            out[name] = d
            continue
        if kind == "fp16":
            out[name] = d.to(torch.float16)
        elif kind == "int8":
            d = d.float()
            lo, hi = float(d.min()), float(d.max())
            scale = (hi - lo) / INT8_STEPS
            if scale > 0:
                noise = torch.rand(d.shape, generator=generator)
                out[name] = torch.clamp(torch.floor((d - lo) / scale + noise), 0, INT8_STEPS).to(torch.uint8)
            else:
                out[name] = torch.zeros(d.shape, dtype=torch.uint8)
            params[name] = [scale, lo]
        elif kind == "topk":
            flat = d.float().reshape(-1)
            if residual is not None:
                kept = residual.setdefault(name, torch.zeros_like(flat))
                flat = flat + kept
            k = topk_count(flat.numel(), fraction)
            indices = torch.topk(flat.abs(), k, sorted=False).indices.sort().values
            out[f"{name}/indices"] = indices.to(torch.int32)
            out[f"{name}/values"] = flat[indices].contiguous()
            if residual is not None:
                flat[indices] = 0
                residual[name] = flat
        else:
            raise ValueError(f"unknown compression {kind!r}")
    return out, params


def encode_weights_for_broadcast(weights: Mapping[str, torch.Tensor], kind: str
                                 ) -> tuple[dict[str, torch.Tensor], dict[str, list[float]], dict[str, torch.Tensor]]:
    """The global model as the server sends it compressed (nearest rounding), its params, and exactly
    what each client decodes from it (the base its delta is from)."""
    out, params, seen = {}, {}, {}
    for name, w in weights.items():
        if not compressible(w):
            out[name], seen[name] = w, w
        elif kind == "fp16":
            out[name] = w.to(torch.float16)
            seen[name] = out[name].to(w.dtype)
        else:
            lo, hi = float(w.min()), float(w.max())
            scale = (hi - lo) / INT8_STEPS
            q = torch.clamp(torch.round((w.float() - lo) / scale), 0, INT8_STEPS) if scale > 0 else torch.zeros_like(w)
            out[name] = q.to(torch.uint8)
            params[name] = [scale, lo]
            seen[name] = (lo + q.float() * scale).to(w.dtype)
    return out, params, seen


# --------------------------------------------------------------------------- decoding, checked


def check_params(kind: str, params: Any, layout: Mapping[str, Any],
                 field: str = "compression_params") -> dict[str, tuple[float, float]]:
    """int8's [scale, lo] per compressed tensor, checked: every tensor there, the scale >= 0, and each
    decoded value lo + q·scale (q in 0..255) finite in float32, where it is computed. `field` names
    where they came from: an <UPDATE>'s compression_params or a model's broadcast_params."""
    what = "update" if field == "compression_params" else "model"
    if kind != "int8":
        if params is not None:
            raise BadWeights(f"{field} are for int8 {what}s; this run's {what}s are {kind}")
        return {}
    names = [e["name"] for e in layout["tensors"] if is_compressed(e)]
    if not isinstance(params, dict) or set(params) != set(names):
        raise BadWeights(f"an int8 {what} must give [scale, lo] for every float tensor, and nothing else")
    checked = {}
    for name, value in params.items():
        if (not isinstance(value, list) or len(value) != 2 or not all(isinstance(v, (int, float)) and
                                                                      not isinstance(v, bool) for v in value)):
            raise BadWeights(f"tensor {name!r}: int8 params must be [scale, lo]")
        scale, lo = map(float, value)
        if not (abs(lo) + INT8_STEPS * abs(scale) <= FLOAT32_MAX) or scale < 0:  # NaN fails the first
            raise BadWeights(f"tensor {name!r}: int8 scale {scale!r} and lo {lo!r} must be finite, the scale >= 0")
        checked[name] = (scale, lo)
    return checked


class Decoded(Mapping):
    """A compressed update seen as full weights, base + decoded delta, one tensor at a time: each lookup
    decodes into that tensor's part of one scratch buffer (reused by the next update), so the server
    never holds a decoded update whole. Checks every tensor as it decodes it."""

    def __init__(self, kind: str, received: Mapping[str, torch.Tensor], params: Mapping[str, tuple[float, float]],
                 base: Mapping[str, torch.Tensor], scratch: Mapping[str, torch.Tensor]):
        self.kind, self.received, self.params, self.base, self.scratch = kind, received, params, base, scratch

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, name: str) -> torch.Tensor:
        base, out = self.base[name], self.scratch[name]
        if not compressible(base):
            return self.received[name]
        if self.kind == "fp16":
            torch.add(base, self.received[name], out=out)
        elif self.kind == "int8":
            scale, lo = self.params[name]
            torch.add(base, self.received[name].float().mul_(scale).add_(lo), out=out)
        else:
            indices, values = self.received[f"{name}/indices"], self.received[f"{name}/values"]
            out.copy_(base)
            flat = out.view(-1)
            flat.index_add_(0, indices.long(), values.to(flat.dtype))
        return out


def check_received(kind: str, received: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> None:
    """What decoding needs to be safe: topk indices within the tensor, strictly increasing (no entry twice)."""
    if kind != "topk":
        return
    for name, tensor in base.items():
        if not compressible(tensor):
            continue
        indices = received[f"{name}/indices"].long()
        if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= tensor.numel()):
            raise BadWeights(f"tensor {name!r}: a topk index is outside 0..{tensor.numel() - 1}")
        if len(indices) > 1 and not bool((indices[1:] > indices[:-1]).all()):
            raise BadWeights(f"tensor {name!r}: topk indices must be strictly increasing")


def scratch_for(base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: torch.empty_like(t) for name, t in base.items()}


def decode_broadcast(kind: str, received: Mapping[str, torch.Tensor], params: Mapping[str, tuple[float, float]],
                     template: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A client's full weights from a compressed broadcast."""
    out = {}
    for name, t in template.items():
        value = received[name]
        if not compressible(t):
            out[name] = value
        elif kind == "fp16":
            out[name] = value.to(t.dtype)
        else:
            scale, lo = params[name]
            out[name] = (lo + value.float() * scale).to(t.dtype)
    return out


def decoded_update(compression: Compression, received: Mapping[str, torch.Tensor], params: Any,
                   base: Mapping[str, torch.Tensor], scratch: Mapping[str, torch.Tensor],
                   layout: Mapping[str, Any]) -> Decoded:
    """A received compressed update (its layout already checked), checked and seen as full weights.
    Raises BadWeights for bad params or indices: the sender gets an <ERROR>, like any bad update."""
    checked = check_params(compression.kind, params, layout)
    check_received(compression.kind, received, base)
    return Decoded(compression.kind, received, checked, base, scratch)
