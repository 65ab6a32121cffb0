"""The curious server's attack (fedsock/attack.py): that an update gives its images away, that the
defences take them back, and that `--record-updates` writes what the server really holds.

The inversion is tested in-process on updates made by the client's own training code
(neural_net_helper.train, as fl_client.py runs it); the recorder through the round engine of
an in-process simulation; and one real federation (fl_server.py and fl_client.py processes)
gives a record to the command line, as a user would run it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import client_helper
import neural_net_helper as nnh
from conftest import Proc
from fedsock import attack
from fedsock.privacy import privatize_update
from support import run_cli

MNIST = client_helper.DATASETS["mnist"]


def digits(count: int, first: int = 10) -> tuple[np.ndarray, np.ndarray]:
    test = client_helper.load_split("mnist", "test")
    return test.images[first:first + count], test.labels[first:first + count]


def observed(model_name: str, images: np.ndarray, labels: np.ndarray, *, epochs: int = 1,
             noise_std: float = 0.0) -> attack.Observation:
    """What the server would hold after one client trained on these digits as fl_client.py does (one
    batch of all of them, lr 0.05), optionally clipped and noised as --dp-mode local does."""
    x, y = nnh.to_tensors(images, labels, MNIST, torch.device("cpu"))
    model = nnh.build_model(model_name, MNIST, seed=0)
    start = {k: v.clone() for k, v in nnh.get_weights(model).items()}
    nnh.train(model, x, y, epochs=epochs, batch_size=len(x), lr=0.05, seed=1)
    weights = {k: v.clone() for k, v in nnh.get_weights(model).items()}
    if noise_std:
        weights, _ = privatize_update(start, weights, 0.5, noise_std, torch.Generator().manual_seed(5))
    settings = {"local_epochs": epochs, "batch_size": len(x), "lr": 0.05}
    return attack.Observation(1, 1, model_name, MNIST.input_shape, 10, MNIST.mean, MNIST.std, settings, len(x), 1,
                              {}, start, weights)


def truth_of(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images.astype(np.float32) / 255).reshape(-1, 1, 28, 28)


def test_one_update_gives_its_digit_away():
    images, labels = digits(1)
    obs = observed("mlp", images, labels)
    result = attack.invert(obs, iterations=200)
    [m] = attack.match(truth_of(images), attack.pixels(result.images, MNIST.mean, MNIST.std))
    assert result.labels == labels.tolist()
    assert m.psnr > 22 and m.ssim > 0.6, (m.psnr, m.ssim)  # about 32 dB here: the digit, recognisably


def test_several_local_steps_are_unrolled_and_still_leak():
    images, labels = digits(2)
    obs = observed("mlp", images, labels, epochs=3)
    result = attack.invert(obs, iterations=150)
    matches = attack.match(truth_of(images), attack.pixels(result.images, MNIST.mean, MNIST.std))
    assert sorted(result.labels) == sorted(labels.tolist())
    assert min(m.psnr for m in matches) > 18, [m.psnr for m in matches]


def test_local_dp_noise_leaves_only_noise_to_invert():
    images, labels = digits(1)
    clear = attack.invert(observed("mlp", images, labels), iterations=150)
    noised = attack.invert(observed("mlp", images, labels, noise_std=0.5), iterations=150)  # z = 1 at S = 0.5
    truth = truth_of(images)
    [m_clear] = attack.match(truth, attack.pixels(clear.images, MNIST.mean, MNIST.std))
    [m_noised] = attack.match(truth, attack.pixels(noised.images, MNIST.mean, MNIST.std))
    assert m_noised.psnr < 14 < m_clear.psnr, (m_noised.psnr, m_clear.psnr)


def test_labels_are_read_from_the_output_bias():
    images, labels = digits(8, first=100)
    obs = observed("logreg", images, labels)
    assert attack.infer_labels(obs, 8) == sorted(labels.tolist())


def test_the_scores_know_identical_from_different():
    a = truth_of(digits(1)[0])[0]
    assert attack.psnr(a, a) == float("inf")
    assert attack.ssim(a, a) == pytest.approx(1.0)
    b = torch.rand_like(a, generator=torch.Generator().manual_seed(0))
    assert attack.ssim(a, b) < 0.2 and attack.psnr(a, b) < 10
    # a pair found in either order: each true image with its own reconstruction
    pair = torch.stack([a, b])
    assert [(m.truth, m.reconstruction) for m in attack.match(pair, pair.flip(0))] == [(0, 1), (1, 0)]


def test_a_recorded_update_reads_back_and_a_damaged_one_is_one_line(tmp_path):
    obs = observed("logreg", *digits(2))
    path = tmp_path / "x.update"
    attack.write_observation(path, obs)
    back = attack.read_observation(path)
    assert (back.round, back.client, back.settings, back.num_examples) == (1, 1, obs.settings, 2)
    assert all(torch.equal(back.weights[k], obs.weights[k]) for k in obs.weights)
    raw = path.read_bytes()
    for damaged in (raw[:-3], raw + b"x", b"\x00" * 8 + raw[8:], b"{}"):
        path.write_bytes(damaged)
        with pytest.raises(attack.UsageError, match="is not an update that --record-updates wrote"):
            attack.read_observation(path)


def weighted_mean(records: list[attack.Observation]) -> dict[str, torch.Tensor]:
    total = sum(r.num_examples for r in records)
    return {k: sum(r.weights[k].double() * r.num_examples for r in records) / total for k in records[0].weights}


def test_the_simulated_server_records_every_update_it_aggregates(tmp_path):
    """The records are what the server aggregated: FedAvg of them is the run's model."""
    import fl_simulate

    assert fl_simulate.main(["--model", "logreg", "--num-clients", "3", "--num-rounds", "1", "--output-dir",
                             str(tmp_path / "run"), "--record-updates", str(tmp_path / "seen"), "--quiet"]) == 0
    names = sorted(p.name for p in (tmp_path / "seen").iterdir())
    assert names == [f"round-1-client-{k}.update" for k in (1, 2, 3)]
    records = [attack.read_observation(tmp_path / "seen" / n) for n in names]
    model = torch.load(tmp_path / "run" / "model.pt")
    for name, value in weighted_mean(records).items():
        torch.testing.assert_close(value.float(), model[name], rtol=0, atol=1e-6)
    assert records[0].settings["lr"] == 0.05 and records[0].defences["compression"] == "none"


def test_under_secure_aggregation_the_server_records_only_the_aggregate(tmp_path):
    import fl_simulate

    assert fl_simulate.main(["--model", "logreg", "--num-clients", "4", "--num-rounds", "1", "--secure-aggregation",
                             "--output-dir", str(tmp_path / "run"), "--record-updates", str(tmp_path / "seen"),
                             "--quiet"]) == 0
    assert [p.name for p in (tmp_path / "seen").iterdir()] == ["round-1-aggregate.update"]
    record = attack.read_observation(tmp_path / "seen" / "round-1-aggregate.update")
    assert (record.client, record.clients, record.defences["secure_aggregation"]) == ("aggregate", 4, True)
    model = torch.load(tmp_path / "run" / "model.pt")
    for name, value in record.weights.items():
        torch.testing.assert_close(value, model[name])


@pytest.mark.processes
def test_a_real_servers_record_gives_the_clients_digits_to_the_command_line(cluster, tmp_path):
    images, labels = digits(2)
    data = tmp_path / "client-1.npz"
    np.savez(data, x_train=images, y_train=labels, x_test=images, y_test=labels)
    server = Proc(["fl_server.py", "--task", "image", "--classes", ",".join(map(str, range(10))), "--image-mean",
                   "0.1307", "--image-std", "0.3081", "--model", "mlp", "--num-clients", "1", "--num-rounds", "1",
                   "--batch-size", "2", "--server-port", "0", "--output-dir", str(tmp_path / "run"),
                   "--record-updates", str(tmp_path / "seen")], "server")
    cluster.procs.append(server)
    server.wait_for(r"--record-updates: every update this server holds goes to .*seen", timeout=60)
    port = server.wait_for(r"listening on [\d.]+:(\d+)", timeout=60).group(1)
    client = Proc(["fl_client.py", "--client-id", "1", "--server-port", port, "--data", str(data)], "client")
    cluster.procs.append(client)
    assert client.finish(timeout=120) == 0, client.tail()
    assert server.finish(timeout=60) == 0, server.tail()
    picture = tmp_path / "attack.png"
    code, printed = run_cli("fedsock.attack", ["invert", str(tmp_path / "seen" / "round-1-client-1.update"),
                                               "--truth", str(data), "--picture", str(picture), "--iterations", "200"],
                            timeout_s=120)
    assert code == 0, printed
    assert f"labels read from the output bias: {', '.join(map(str, sorted(labels)))}" in printed
    psnrs = [float(v) for v in __import__("re").findall(r"image \d: PSNR ([\d.]+) dB", printed)]
    assert len(psnrs) == 2 and min(psnrs) > 18, printed
    assert picture.stat().st_size > 1000


@pytest.mark.parametrize("args, message", [
    (["invert", "nothing-here.update"], "cannot read nothing-here.update"),
    (["invert", "x.update", "--iterations", "0"], "--iterations: must be"),
    (["invert", "OBS", "--truth", "nothing.npz"], "--truth nothing.npz: not an .npz with x_train"),
    (["invert", "OBS", "--picture", "/no/such/folder/x.png"], "--picture /no/such/folder/x.png"),
])
def test_bad_input_to_the_attack_is_one_line(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    attack.write_observation(tmp_path / "ok.update", observed("logreg", *digits(1)))
    code, printed = run_cli("fedsock.attack", [a.replace("OBS", "ok.update") for a in args] + ["--iterations", "1"]
                            if "--iterations" not in args else args)
    assert code != 0 and message in printed, printed
    assert "Traceback" not in printed
