"""Benchmark 11: clients with their own data, against the centralised model, in the same run.

- **Spam**: the SMS Spam Collection, deduplicated, 20% held out for the server (no copies of
  training messages in it), the rest split among 5 clients as their own .tsv files (IID, then
  Dirichlet(0.3) by label: very different spam rates); textcnn, 10 rounds, E = 2, B = 32,
  lr 0.1. Reported: the spam class's precision, recall and F1 on the held-out set.
- **Chest X-ray**: the balanced PneumoniaMNIST subset as chest_xray/{train,test}/{NORMAL,
  PNEUMONIA}/ PNG folders among 5 clients, the balanced subset of the official test split for
  the server; the cnn,
  20 rounds, E = 2, lr 0.05, --augment affine; then the same without the augmentation.
  Reported: test accuracy and the pneumonia class's F1.

Each federation is real: fl_server.py and 5 fl_client.py processes with --data. Beside it,
the centralised model: the same model trained in this process on all the clients' training
data together, for the same number of passes over it (rounds x E), with the same settings.

    python bench/own_data.py            # about 6 minutes here
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import Proc, Row, kill_all, read_metrics, say  # noqa: E402

CLIENTS = 5


def federation(prepared, rounds: int, flags: list[str], out: Path) -> dict:
    procs = []
    try:
        server = Proc(["fl_server.py", *prepared.server_flags, "--num-clients", str(CLIENTS), "--num-rounds", str(rounds),
                       "--time-to-wait", "120", "--server-port", "0", "--output-dir", str(out), "--quiet", *flags],
                      "server")
        procs.append(server)
        port = server.wait_for(r"listening on [\d.]+:(\d+)", timeout=120).group(1)
        clients = [Proc(["fl_client.py", "--client-id", str(k), "--server-port", port, "--quiet", "--data", str(path)],
                        f"client {k}") for k, path in enumerate(prepared.client_data, start=1)]
        procs.extend(clients)
        codes = [c.finish(timeout=rounds * 120 + 120) for c in clients]
        if server.finish(timeout=120) != 0 or any(codes):
            raise RuntimeError(f"federation failed ({codes}):\n{server.tail()}")
        return read_metrics(out / "metrics.csv")[-1]
    finally:
        kill_all(procs)


def centralised(prepared, model_name: str, epochs: int, lr: float, batch_size: int = 32, augment: str = "none") -> dict:
    import numpy as np
    import torch

    import neural_net_helper as nnh
    from fedsock.own_data import load_own_data
    from fedsock.tasks import make_task

    flags = dict(zip(prepared.server_flags[::2], prepared.server_flags[1::2]))
    task = make_task("text" if flags["--task"] == "text" else "image", flags["--classes"], int(flags.get("--image-size", 28)),
                     int(flags.get("--channels", 1)), None, None, 30, 1 << 15, None)
    parts = [load_own_data(str(path), task) for path in prepared.client_data]
    xs, ys = np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts])
    test = load_own_data(str(prepared.test_data), task, flag="--test-data")
    torch.set_num_threads(1)
    x, y = nnh.to_tensors(xs, ys, task, torch.device("cpu"))
    tx, ty = nnh.to_tensors(test.x, test.y, task, torch.device("cpu"))
    model = nnh.build_model(model_name, task, seed=0)
    for epoch in range(epochs):
        nnh.train(model, x, y, epochs=1, batch_size=batch_size, lr=lr, seed=epoch, augment=augment)
    loss, confusion = nnh.evaluate_counts(model, tx, ty, task.num_classes)
    return nnh.scores(confusion, loss, task.positive_index)


def rows_for(name: str, federated: dict, central: dict, target: str, passed: bool, metric: str) -> list[Row]:
    key = {"f1": "test_f1", "accuracy": "test_accuracy"}[metric]
    note = (f"federated: accuracy {100 * federated['test_accuracy']:.2f}%, precision {federated['test_precision']:.3f}, "
            f"recall {federated['test_recall']:.3f}, F1 {federated['test_f1']:.3f}; centralised: accuracy "
            f"{100 * central['accuracy']:.2f}%, precision {central['precision']:.3f}, recall {central['recall']:.3f}, "
            f"F1 {central['f1']:.3f}")
    value, reference = federated[key], central[metric]
    scale = 100 if metric == "accuracy" else 1
    return [Row("11 own data", f"{name}: {metric}", scale * value, "%" if metric == "accuracy" else "", scale * reference,
                "centralised, same model and passes", value / reference, target, passed, note)]


def run(quick: bool) -> list[Row]:
    from fedsock.demo_data import prepare_chest_xray, prepare_spam

    rounds = 3 if quick else 10
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedsock-own-data-") as tmp:
        work = Path(tmp)
        for split, alpha in (("iid", 0.5), ("dirichlet", 0.3)):
            prepared = prepare_spam(work / f"spam-{split}", CLIENTS, split=split, alpha=alpha)
            say(f"own data: spam, {split}: {prepared.summary}")
            federated = federation(prepared, rounds, ["--local-epochs", "2", "--lr", "0.1"], work / f"run-spam-{split}")
            central = centralised(prepared, "textcnn", 2 * rounds, 0.1)
            say(f"own data: spam {split}: federated F1 {federated['test_f1']:.3f}, centralised F1 {central['f1']:.3f}")
            rows += rows_for(f"spam, {CLIENTS} clients ({split}{f', alpha {alpha}' if split != 'iid' else ''}), "
                             f"textcnn, {rounds} rounds, held-out deduplicated test set", federated, central,
                             ">= 0.90" if split == "iid" else "", federated["test_f1"] >= 0.90 if split == "iid" else None,
                             "f1")
        prepared = prepare_chest_xray(work / "xray", CLIENTS)
        say(f"own data: chest x-ray: {prepared.summary}")
        rounds = 3 if quick else 20
        for augment in ("affine", "none"):  # the recipe, then the same without its augmentation
            federated = federation(prepared, rounds, ["--local-epochs", "2", "--lr", "0.05", "--augment", augment],
                                   work / f"run-xray-{augment}")
            central = centralised(prepared, "cnn", 2 * rounds, 0.05, augment=augment)
            say(f"own data: chest x-ray, --augment {augment}: federated accuracy {100 * federated['test_accuracy']:.2f}%, "
                f"centralised {100 * central['accuracy']:.2f}%")
            target = augment == "affine"
            rows += rows_for(f"chest X-ray (PneumoniaMNIST, balanced), {CLIENTS} clients from image folders, cnn, "
                             f"{rounds} rounds, --augment {augment}, balanced subset of the official test split", federated, central,
                             ">= 85%" if target else "", federated["test_accuracy"] >= 0.85 if target else None,
                             "accuracy")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rows = run(args.quick)
    for row in rows:
        print(f"{row.metric}: {row.value:.3f} vs centralised {row.reference:.3f} {row.target} "
              f"{'' if row.passed is None else 'PASS' if row.passed else 'FAIL'}\n    {row.note}")
    return 1 if any(r.passed is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
