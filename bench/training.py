"""Benchmark 6: a client's local training against a plain PyTorch loop doing the same work.

Both run in this process, one PyTorch thread (as fedsock clients do by default), on the
same examples: one client's share of MNIST as a 5-client iid run gives it (10,800 after
its local test split), normalised as fedsock normalises. Samples alternate between the
two (A B A B ...), each from the same starting weights; the ratio is of the medians.

- **The original tool's recipe**: logreg, 8 epochs, one batch of the whole share, lr 0.7.
  The plain loop: 8 times zero_grad, forward, loss, backward, step. Target: <= 1.2x.
- **A minibatch recipe**: the cnn, B = 32, E = 1, lr 0.05. The plain loop: shuffle once
  per epoch into a contiguous copy, then slices of 32 (the cheapest plain way; a gather
  per batch is slower). Target: <= 1.05x.

It also reports what the first call costs in a fresh process (PyTorch's first use), which
`neural_net_helper.warm_up` pays before a client says it is ready, and what `--augment
affine` adds to the minibatch recipe (the same call with and without it, interleaved).

    python bench/training.py
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import PYTHON, ROOT, Row, median, say  # noqa: E402

RECIPES = {
    "seed recipe": dict(model="logreg", epochs=8, batch_size=None, lr=0.7, target=1.2),
    "minibatch": dict(model="cnn", epochs=1, batch_size=32, lr=0.05, target=1.05),
}


def client_share():
    import client_helper
    import neural_net_helper as nnh
    import torch

    info = client_helper.DATASETS["mnist"]
    train = client_helper.load_split("mnist", "train")
    parts = client_helper.partition_indices(train.labels, 5, "iid", 0.5, 0)
    mine, _ = client_helper.split_local(parts[0], 0, 1)
    x, y = nnh.to_tensors(train.images[mine], train.labels[mine], info, torch.device("cpu"))
    return info, x, y


def plain_loop(model, x, y, epochs: int, batch_size: int, lr: float, seed: int) -> None:
    import torch
    from torch.nn import functional as F

    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        if batch_size >= len(x):
            xs, ys = x, y
        else:
            order = torch.randperm(len(x), generator=generator)
            xs, ys = x[order], y[order]
        for start in range(0, len(x), batch_size):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(xs[start : start + batch_size]), ys[start : start + batch_size])
            loss.backward()
            optimizer.step()


def interleaved(model, start: dict, calls: dict, reps: int) -> dict[str, list[float]]:
    """Seconds of each call(rep), alternated A B, B A, ..., each from the same starting weights."""
    names = list(calls)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in (names if rep % 2 == 0 else names[::-1]):
            model.load_state_dict(start)
            t0 = time.perf_counter()
            calls[name](rep)
            seconds[name].append(time.perf_counter() - t0)
    return seconds


def measure(name: str, reps: int) -> list[Row]:
    import neural_net_helper as nnh
    import torch

    torch.set_num_threads(1)
    recipe = RECIPES[name]
    info, x, y = client_share()
    batch_size = recipe["batch_size"] or len(x)
    model = nnh.build_model(recipe["model"], info, seed=0)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    nnh.warm_up(model, x, y)
    seconds = interleaved(model, start, {
        "fedsock": lambda rep: nnh.train(model, x, y, epochs=recipe["epochs"], batch_size=batch_size, lr=recipe["lr"],
                                         seed=rep, progress=lambda done: None),
        "plain": lambda rep: plain_loop(model, x, y, recipe["epochs"], batch_size, recipe["lr"], seed=rep),
    }, reps)
    fedsock_s, plain_s = seconds["fedsock"], seconds["plain"]
    ours, theirs = median(fedsock_s), median(plain_s)
    ratio = ours / theirs
    what = (f"{recipe['model']}, E={recipe['epochs']}, B={'all ' + str(len(x)) if recipe['batch_size'] is None else batch_size}, "
            f"lr {recipe['lr']}, {len(x)} examples")
    return [Row("6 training", f"{name} ({what}): neural_net_helper.train", 1e3 * ours, "ms", 1e3 * theirs,
                "plain PyTorch loop", ratio, f"<= {recipe['target']}x", ratio <= recipe["target"],
                f"median of {reps} interleaved samples each; fedsock {', '.join(f'{1e3 * s:.0f}' for s in fedsock_s)} ms; "
                f"plain {', '.join(f'{1e3 * s:.0f}' for s in plain_s)} ms")]


def augmentation(reps: int) -> list[Row]:
    """The cnn minibatch recipe with augment="affine" against the same call without it."""
    import neural_net_helper as nnh
    import torch

    torch.set_num_threads(1)
    recipe = RECIPES["minibatch"]
    info, x, y = client_share()
    model = nnh.build_model(recipe["model"], info, seed=0)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    nnh.warm_up(model, x, y)
    seconds = interleaved(model, start, {
        augment: lambda rep, augment=augment: nnh.train(model, x, y, epochs=1, batch_size=recipe["batch_size"],
                                                        lr=recipe["lr"], seed=rep, augment=augment)
        for augment in ("affine", "none")}, reps)
    ours, theirs = median(seconds["affine"]), median(seconds["none"])
    return [Row("6 training", f"minibatch recipe with --augment affine ({len(x)} examples)", 1e3 * ours, "ms",
                1e3 * theirs, "without augmentation", ours / theirs,
                note=f"median of {reps} interleaved samples each; with {', '.join(f'{1e3 * s:.0f}' for s in seconds['affine'])} ms")]


FIRST_CALL = """
import sys, time
sys.path.insert(0, {root!r}); sys.path.insert(0, {bench!r})
import torch
torch.set_num_threads(1)
import neural_net_helper as nnh
from training import client_share
info, x, y = client_share()
model = nnh.build_model("logreg", info, seed=0)
t0 = time.perf_counter(); {first}; t1 = time.perf_counter()
nnh.train(model, x, y, epochs=8, batch_size=len(x), lr=0.7, seed=1); t2 = time.perf_counter()
print(f"first {{t1 - t0:.3f}} then {{t2 - t1:.3f}}")
"""


def first_call() -> list[Row]:
    """A fresh process: the first training call without and with warm_up before it."""
    rows = []
    for label, first in (("cold", "nnh.train(model, x, y, epochs=8, batch_size=len(x), lr=0.7, seed=0)"),
                         ("warm_up", "nnh.warm_up(model, x, y)")):
        code = FIRST_CALL.format(root=str(ROOT), bench=str(ROOT / "bench"), first=first)
        out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=300, check=True).stdout
        first_s, then_s = (float(v) for v in out.split()[1::2])
        rows.append((label, first_s, then_s))
    (_, cold_first, cold_then), (_, warm_cost, warm_then) = rows
    return [Row("6 training", "first call in a fresh process (seed recipe), then the second", 1e3 * cold_first, "ms",
                1e3 * cold_then, "second call", cold_first / cold_then, note="what a client's first round paid before it "
                                                                          "warmed up before saying <READY>"),
            Row("6 training", "warm_up (paid before <READY>), then the first real call", 1e3 * warm_cost, "ms",
                1e3 * warm_then, "first real call after it", note="the first round now costs what any round costs")]


def run(quick: bool) -> list[Row]:
    reps = 3 if quick else 7
    rows = []
    for name in RECIPES:
        say(f"training: {name}")
        rows.extend(measure(name, reps if name == "seed recipe" else max(3, reps // 2)))
    rows.extend(first_call())
    say("training: augmentation")
    rows.extend(augmentation(max(3, reps // 2)))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rows = run(args.quick)
    for row in rows:
        ratio = f" ratio {row.ratio:.3f}" if row.ratio is not None else ""
        verdict = {True: "PASS", False: "FAIL", None: ""}[row.passed]
        print(f"{row.metric}: {row.value:.1f} {row.unit} vs {row.reference:.1f} ({row.reference_label}){ratio} "
              f"{row.target} {verdict}")
    return 1 if any(r.passed is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
