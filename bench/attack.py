"""Benchmark 16: what a curious server reads from an update, and what each defence leaves it.

Every case is a real federation: fl_server.py --record-updates and fl_client.py processes, each
client with its own .npz of B MNIST digits (from the shipped test split) and nothing else, one
round from the untrained model. Then `fedsock.attack.invert` (Geiping et al. 2020: cosine
distance, total variation, the client's local training unrolled; labels from the output bias)
reconstructs client 1's digits from what the server recorded, and each reconstruction is scored
against the truth: PSNR and SSIM per image (each true image paired with its best-matching
reconstruction), their mean, and whether the labels were read right.

- **No defence**: the mlp and the cnn; batch 1, 4 and 16; 1 and 5 local steps (5 epochs over the
  client's one batch).
- **Defences**, on batch 4 and 1 step, for both models: secure aggregation (10 clients: the
  server holds only their mean), client-level DP in local mode (each client clips to S and adds
  N(0, z²S²): z = 0.5 and 1.0), DP in central mode (z = 1.0: the server clips and adds the noise
  after it has the clear update), int8 and top-k (1%) compression of the update.

    python bench/attack.py            # every case: about 20 minutes here
    python bench/attack.py --quick    # the mlp cases only, fewer steps: about 2 minutes

Writes bench/results/attack.json, prints the table, and draws imgs/attack.png (truth above, one
row per case below).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH, ROOT, Proc, kill_all, say  # noqa: E402

sys.path.insert(0, str(ROOT))
import client_helper  # noqa: E402
from fedsock import attack  # noqa: E402

CLASSES = ",".join(str(c) for c in range(10))
TASK = ["--task", "image", "--classes", CLASSES, "--image-size", "28", "--channels", "1",
        "--image-mean", "0.1307", "--image-std", "0.3081"]
CLIP = 0.5  # DP's S: above the update norms of these cases (mlp about 0.1, cnn about 0.3), so clipping leaves them whole
ITERATIONS = {"mlp": 1000, "cnn": 500}
ITERATIONS_5_STEPS = {"mlp": 500, "cnn": 250}
DEFENCES = {
    "none": [],
    "secure aggregation (10 clients)": ["--secure-aggregation"],
    "secure aggregation, all 40 inverted": ["--secure-aggregation"],
    "DP local, z = 0.5": ["--dp-clip", str(CLIP), "--dp-noise-multiplier", "0.5", "--dp-mode", "local"],
    "DP local, z = 1.0": ["--dp-clip", str(CLIP), "--dp-noise-multiplier", "1.0", "--dp-mode", "local"],
    "DP central, z = 1.0": ["--dp-clip", str(CLIP), "--dp-noise-multiplier", "1.0", "--dp-mode", "central"],
    "int8 compression": ["--compression", "int8"],
    "top-k 1% compression": ["--compression", "topk", "--topk-fraction", "0.01"],
}


def client_files(folder: Path, clients: int, batch: int) -> list[Path]:
    """Client k's own data: B digits of the shipped test split (the first 10 for each client's local test)."""
    test = client_helper.load_split("mnist", "test")
    images, labels = test.images.reshape(-1, 28, 28), test.labels
    paths = []
    for k in range(clients):
        at = 10 + k * batch
        path = folder / f"client-{k + 1}.npz"
        np.savez(path, x_train=images[at:at + batch], y_train=labels[at:at + batch], x_test=images[:10],
                 y_test=labels[:10])
        paths.append(path)
    return paths


def federation(folder: Path, model: str, batch: int, epochs: int, clients: int, flags: list[str]) -> Path:
    """One round of a real federation whose server records every update; the folder of records."""
    data = client_files(folder, clients, batch)
    records = folder / "updates"
    procs = []
    try:
        server = Proc(["fl_server.py", *TASK, "--model", model, "--num-clients", str(clients), "--min-clients",
                       str(clients), "--num-rounds", "1", "--batch-size", str(batch), "--local-epochs", str(epochs),
                       "--lr", "0.05", "--time-to-wait", "120", "--server-port", "0", "--output-dir",
                       str(folder / "run"), "--record-updates", str(records), "--quiet", *flags], "server")
        procs.append(server)
        port = server.wait_for(r"listening on [\d.]+:(\d+)", timeout=120).group(1)
        procs += [Proc(["fl_client.py", "--client-id", str(k), "--server-port", port, "--quiet", "--data", str(path)],
                       f"client {k}") for k, path in enumerate(data, start=1)]
        codes = [p.finish(timeout=600) for p in procs[1:]]
        if server.finish(timeout=120) != 0 or any(codes):
            raise RuntimeError(f"federation failed ({codes}):\n{server.tail()}")
    finally:
        kill_all(procs)
    return records


def run_case(model: str, batch: int, epochs: int, defence: str, iterations: int) -> dict:
    secure = "secure" in defence
    clients = 10 if secure else 1
    with tempfile.TemporaryDirectory(prefix="fedsock-attack-") as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        records = federation(folder, model, batch, epochs, clients, DEFENCES[defence])
        federation_s = time.perf_counter() - started
        name = "round-1-aggregate.update" if secure else "round-1-client-1.update"
        obs = attack.read_observation(records / name)
        truth = attack.load_truth(folder / "client-1.npz", obs)
        true_labels = sorted(np.load(folder / "client-1.npz")["y_train"].tolist())
    count = batch * clients if "all" in defence else batch  # the whole round's examples, or one client's
    result = attack.invert(obs, count=count, iterations=iterations)
    images = attack.pixels(result.images, obs.mean, obs.std)
    matches = attack.match(truth, images)
    update_norm = float(sum(t.double().pow(2).sum() for t in obs.delta().values()) ** 0.5)
    return {"model": model, "batch": batch, "steps": epochs, "defence": defence, "iterations": iterations,
            "psnr": [m.psnr for m in matches], "ssim": [m.ssim for m in matches],
            "mean_psnr": float(np.mean([m.psnr for m in matches])), "mean_ssim": float(np.mean([m.ssim for m in matches])),
            "labels_right": result.labels == true_labels if count == batch else None, "distance": result.distance, "update_norm": update_norm,
            "attack_s": result.seconds, "federation_s": federation_s,
            "truth": truth.numpy().tolist(), "reconstruction": images[[m.reconstruction for m in matches]].numpy().tolist()}


LABELS = {True: "right", False: "wrong", None: "(of 40)"}


def cases(quick: bool) -> list[tuple]:
    models = ["mlp"] if quick else ["mlp", "cnn"]
    scale = 0.3 if quick else 1.0
    out = []
    for model in models:
        for epochs in (1, 5):
            for batch in (1, 4, 16):
                table = ITERATIONS if epochs == 1 else ITERATIONS_5_STEPS
                out.append((model, batch, epochs, "none", int(table[model] * scale)))
        for defence in DEFENCES:
            if defence != "none":
                out.append((model, 4, 1, defence, int(ITERATIONS[model] * scale)))
    return out


def table(rows: list[dict]) -> str:
    lines = ["| model | batch | local steps | defence | mean PSNR (dB) | mean SSIM | worst / best PSNR | labels | attack time |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['steps']} | {r['defence']} | {r['mean_psnr']:.1f} | "
                     f"{r['mean_ssim']:.2f} | {min(r['psnr']):.1f} / {max(r['psnr']):.1f} | "
                     f"{LABELS[r['labels_right']]} | {r['attack_s']:.0f} s |")
    return "\n".join(lines)


def picture(rows: list[dict], path: Path) -> None:
    """Truth in the top row, then one row per defence (batch 4, 1 step); the mlp on the left, the cnn on
    the right, each row's mean PSNR beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = {(r["model"], r["defence"]): r for r in rows if r["batch"] == 4 and r["steps"] == 1}
    models = [m for m in ("mlp", "cnn") if (m, "none") in chosen]
    defences = [d for d in DEFENCES if any((m, d) in chosen for m in models)]
    if not models:
        return
    columns = 5 * len(models) - 1  # 4 images a model, and a narrow column between (for the PSNR)
    fig, axes = plt.subplots(len(defences) + 1, columns, figsize=(0.95 * columns + 2.4, 0.95 * (len(defences) + 1) + 0.5),
                             squeeze=False, gridspec_kw={"wspace": 0.05, "hspace": 0.12,
                                                         "width_ratios": ([1] * 4 + [0.6]) * (len(models) - 1) + [1] * 4})
    for row in axes:
        for spacer in range(4, columns, 5):
            row[spacer].axis("off")
    for block, model in enumerate(models):
        for row, defence in enumerate(["truth", *defences]):
            case = chosen.get((model, "none" if row == 0 else defence))
            for col in range(4):
                ax = axes[row][5 * block + col]
                ax.set_xticks([]), ax.set_yticks([])
                if case is not None:
                    images = case["truth"] if row == 0 else case["reconstruction"]
                    ax.imshow(np.asarray(images[col])[0], cmap="gray", vmin=0, vmax=1)
                else:
                    ax.axis("off")
            if case is not None and row > 0:
                axes[row][5 * block + 3].text(1.04, 0.5, f"{case['mean_psnr']:.1f} dB", fontsize=7,
                                              transform=axes[row][5 * block + 3].transAxes, va="center")
        axes[0][5 * block].set_title(f"{model}", fontsize=9, loc="left")
    for row, label in enumerate(["truth: client 1's batch", *(d if d != "none" else "no defence" for d in defences)]):
        axes[row][0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle("What a curious server reconstructs from client 1's update (round 1, batch 4, 1 local step)",
                 fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the mlp cases only, fewer steps")
    parser.add_argument("--only", metavar="TEXT", help="run only the cases whose model or defence contains TEXT, "
                                                       "and replace those rows of the last attack.json")
    args = parser.parse_args()
    out = BENCH / "results"
    key = lambda r: (r["model"], r["batch"], r["steps"], r["defence"])  # noqa: E731
    kept = {key(r): r for r in json.loads((out / "attack.json").read_text())} if args.only else {}
    rows = []
    for model, batch, epochs, defence, iterations in cases(args.quick):
        if args.only and args.only not in f"{model} {defence}":
            continue
        say(f"attack: {model}, batch {batch}, {epochs} step(s), {defence}, {iterations} iterations")
        row = run_case(model, batch, epochs, defence, iterations)
        say(f"attack:   mean PSNR {row['mean_psnr']:.1f} dB, SSIM {row['mean_ssim']:.2f}, labels "
            f"{'right' if row['labels_right'] else 'wrong'}, update norm {row['update_norm']:.3f}, "
            f"{row['attack_s']:.0f} s attack, {row['federation_s']:.0f} s federation")
        rows.append(row)
    if kept:
        kept.update({key(r): r for r in rows})
        rows = [kept[key(case)] for case in map(lambda c: dict(zip(("model", "batch", "steps", "defence"), c)),
                                                   cases(args.quick)) if key(case) in kept]
    out.mkdir(exist_ok=True)
    (out / "attack.json").write_text(json.dumps(rows))
    print(table(rows))
    picture(rows, ROOT / "imgs" / ("attack-quick.png" if args.quick else "attack.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
