"""Clients with their own data: the formats, every bad-data case as one line, hashed text, the
shipped demo datasets, and whole federations whose server never opens a training file."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from conftest import read_metrics
from support import run_cli
from fedsock.console import UsageError
from fedsock.demo_data import prepare_chest_xray, prepare_spam, read_spam
from fedsock.own_data import load_own_data
from fedsock.tasks import Task, make_task
from fedsock.text import token_ids, words
from socket_methods import BadMessage

XRAY = Task("image", ("NORMAL", "PNEUMONIA"), channels=1, size=28, positive="PNEUMONIA")
SPAM = Task("text", ("ham", "spam"), max_tokens=30, positive="spam")


def png(path, value: int = 128, size=(40, 30), mode: str = "L") -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 0, 0)).save(path)


def test_an_image_folder_is_read_converted_and_resized(tmp_path):
    png(tmp_path / "train" / "NORMAL" / "a.png", 255)
    png(tmp_path / "train" / "PNEUMONIA" / "b.jpg".replace(".jpg", ".png"), 0, mode="RGB")
    png(tmp_path / "test" / "NORMAL" / "c.png", 100)
    data = load_own_data(str(tmp_path), XRAY)
    assert data.x.shape == (2, 1, 28, 28) and data.x.dtype == np.uint8 and data.y.tolist() == [0, 1]
    assert data.x[0].min() == 255 and data.test_x.shape == (1, 1, 28, 28) and data.test_y.tolist() == [0]
    flat = tmp_path / "flat"  # class folders directly under PATH: all of it is training data
    png(flat / "PNEUMONIA" / "x.png")
    assert load_own_data(str(flat), XRAY).y.tolist() == [1]  # a client may lack a class


@pytest.mark.parametrize("make, pattern", [
    (lambda root: png(root / "train" / "normal" / "a.png"), r"class folder\(s\) normal are not among the task's classes"),
    (lambda root: (root / "train" / "NORMAL").mkdir(parents=True), r"NORMAL: no images in this class folder"),
    (lambda root: (root / "train" / "NORMAL").mkdir(parents=True) or (root / "train" / "NORMAL" / "x.png").write_bytes(b"no"),
     r"cannot read the image .*x\.png"),
    (lambda root: (root / "train").mkdir(parents=True), r"no class folders"),
], ids=["other class names", "an empty class folder", "an unreadable image", "no class folders"])
def test_bad_image_folders_are_one_line(tmp_path, make, pattern):
    make(tmp_path)
    with pytest.raises(UsageError, match=pattern):
        load_own_data(str(tmp_path), XRAY)


def test_a_text_table_finds_its_columns_and_keeps_tabs_in_texts(tmp_path):
    plain = tmp_path / "sms.tsv"
    plain.write_text("ham\tsee you at 5\nspam\tWIN a prize!\tnow\n\n", encoding="utf-8")
    data = load_own_data(str(plain), SPAM)
    assert data.y.tolist() == [0, 1] and data.x.shape == (2, 30)
    assert (data.x[1] != 0).sum() == len(words("WIN a prize!\tnow"))
    headed = tmp_path / "sms.csv"
    headed.write_text('id,message,category\n1,"hello, there",ham\n2,free money,spam\n', encoding="utf-8")
    assert load_own_data(str(headed), SPAM).y.tolist() == [0, 1]
    assert load_own_data(str(headed), SPAM, label_column="category", text_column="1").y.tolist() == [0, 1]


@pytest.mark.parametrize("content, name, pattern", [
    ("ham\tok\nmaybe\thi\n", "a.tsv", r"a\.tsv:2: label 'maybe' is not among the task's classes \(ham, spam\)"),
    ("ham\n", "b.tsv", r"b\.tsv:1: expected a label and a text"),
    ("", "c.tsv", r"c\.tsv holds no examples"),
    (b"\xff\xfe", "d.tsv", r"cannot read .*d\.tsv"),
], ids=["an unknown label", "no text column", "an empty file", "not UTF-8"])
def test_bad_text_tables_are_one_line(tmp_path, content, name, pattern):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UsageError, match=pattern):
        load_own_data(str(path), SPAM)


def test_an_npz_is_checked_against_the_task(tmp_path):
    good = tmp_path / "good.npz"
    np.savez(good, x_train=np.zeros((4, 28, 28, 1), np.uint8), y_train=np.array(["NORMAL", "PNEUMONIA"] * 2),
             x_test=np.ones((2, 14, 14), np.uint8), y_test=np.array([0, 1]))
    data = load_own_data(str(good), XRAY)
    assert data.x.shape == (4, 1, 28, 28) and data.test_x.shape == (2, 1, 28, 28) and data.y.tolist() == [0, 1, 0, 1]
    for arrays, pattern in (({"x_test": np.zeros((2, 28, 28))}, r"lacks x_train, y_train"),
                            ({"x_train": np.zeros((2, 28, 28)), "y_train": np.array([0, 7])}, r"label 7 is outside 0\.\.1"),
                            ({"x_train": np.zeros((2, 28)), "y_train": np.array([0, 1])}, r"images must be")):
        bad = tmp_path / "bad.npz"
        np.savez(bad, **arrays)
        with pytest.raises(UsageError, match=pattern):
            load_own_data(str(bad), XRAY)
    with pytest.raises(UsageError, match=r"this run's task is text"):
        load_own_data(str(tmp_path), SPAM)


def test_hashed_tokens_need_no_vocabulary_and_are_the_same_everywhere():
    ids = token_ids("Free entry in 2 a wkly comp to win FA Cup final tkts!", 8, 1 << 15)
    assert ids.tolist() == token_ids("free ENTRY in 2 a wkly comp to win fa cup final tkts !", 8, 1 << 15).tolist()
    assert (ids > 0).all() and ids.max() < 1 << 15  # cut at the right: the first 8 words
    short = token_ids("hi there", 5, 100)
    assert short[:3].tolist() == [0, 0, 0] and (short[3:] > 0).all()  # padded at the left
    assert token_ids("hi", 3, 100)[-1] == 1 + __import__("zlib").crc32(b"hi") % 99


def test_a_task_crosses_the_wire_checked():
    task = make_task("text", "ham,spam", 28, 1, None, None, 30, 1 << 15, None)
    assert task.positive == "spam" and Task.from_json(json.loads(json.dumps(task.to_json()))) == task
    for changes, pattern in (({"kind": "video"}, "kind"), ({"classes": ["a"]}, "2..1000 distinct"),
                             ({"size": 10**6}, "size"), ({"std": [0.0]}, "std"), ({"positive": "x"}, "positive")):
        with pytest.raises(BadMessage, match=pattern):
            Task.from_json({**task.to_json(), "kind": "image", **changes})


def test_the_shipped_demo_data_is_deduplicated_and_split_with_its_attribution(tmp_path):
    pairs = read_spam()
    assert len(pairs) == 5160 and len({text.strip() for _, text in pairs}) == len(pairs)  # 414 repeats gone
    prepared = prepare_spam(tmp_path / "spam", 5, split="dirichlet", alpha=0.3)
    test_texts = {line.split("\t", 1)[1] for line in prepared.test_data.read_text().splitlines()}
    train_texts = {line.split("\t", 1)[1] for path in prepared.client_data for line in path.read_text().splitlines()}
    assert not test_texts & train_texts and len(test_texts) + len(train_texts) == 5160
    assert "CC BY 4.0" in (prepared.client_data[0].parent / "DATA-README.md").read_text()
    rates = [float(r.rstrip("%")) for r in re.findall(r"(\d+)%", prepared.summary.split("spam ")[-1])]
    assert max(rates) - min(rates) > 10  # label skew: very different spam rates
    xray = prepare_chest_xray(tmp_path / "xray", 3)
    assert sorted(p.name for p in (xray.client_data[0] / "train").iterdir()) == ["NORMAL", "PNEUMONIA"]
    assert len(list((xray.test_data / "NORMAL").glob("*.png"))) == 234


@pytest.mark.processes
def test_a_federation_on_own_files_whose_server_reads_no_training_data(cluster, tmp_path):
    """Spam: each client its own .tsv; the server has only the held-out test set, and an empty data root."""
    prepared = prepare_spam(tmp_path / "data", 3)
    empty = tmp_path / "empty"
    empty.mkdir()
    server = cluster.server("--task", "text", "--classes", "ham,spam", "--test-data", str(prepared.test_data),
                            "--num-clients", "3", "--num-rounds", "3", "--local-epochs", "2", "--lr", "0.1",
                            "--federated-evaluation", "--time-to-wait", "60")
    clients = [cluster.client(k, "--data", str(path)) for k, path in enumerate(prepared.client_data, start=1)]
    assert [c.finish() for c in clients] == [0, 0, 0] and server.finish() == 0, server.output
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert rows[-1]["test_accuracy"] > 0.9 and rows[-1]["test_f1"] is not None
    assert all(r["fed_accuracy"] is not None and r["fed_examples"] > 0 for r in rows)  # round 3's by <EVALUATE>
    confusion = json.loads(rows[-1]["confusion"])
    assert len(confusion) == 2 and sum(map(sum, confusion)) == 1032
    server.wait_for(r"round 3: federated evaluation by 3 client\(s\) on \d+ examples")
    clients[0].wait_for(r"own data: \d+ training and \d+ test examples from text table")
    assert "Traceback" not in server.output


@pytest.mark.processes
def test_an_image_task_with_only_federated_evaluation(cluster, tmp_path):
    """Also the chest X-ray recipe's augmentation, through the wire: the clients augment their images."""
    prepared = prepare_chest_xray(tmp_path / "data", 2)
    server = cluster.server("--task", "image", "--classes", "NORMAL,PNEUMONIA", "--model", "logreg",
                            "--num-clients", "2", "--num-rounds", "2", "--time-to-wait", "60", "--augment", "affine")
    server.wait_for(r"the server has no test set of its own; federated evaluation")
    clients = [cluster.client(k, "--data", str(path)) for k, path in enumerate(prepared.client_data, start=1)]
    assert [c.finish() for c in clients] == [0, 0] and server.finish() == 0
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert rows[-1]["test_accuracy"] is None and rows[-1]["fed_accuracy"] > 0.6 and rows[-1]["fed_clients"] == 2
    server.wait_for(r"round 2/2  clients 2/2  no server test set")
    server.wait_for(r"final accuracy on the clients' test splits")
    assert (tmp_path / "run" / "accuracy.png").exists()
    for client in clients:
        client.wait_for(r"round 2: trained on \d+ examples \(affine augmentation\)")


@pytest.mark.processes
@pytest.mark.parametrize("client_args, pattern", [
    ([], r"this run's clients bring their own data \(texts of 30 hashed tokens, classes ham, spam\): pass --data PATH"),
    (["--data", "NOPE"], r"--data NOPE: no such file or folder"),
    (["--data", "BADLABEL"], r"label 'maybe' is not among the task's classes"),
], ids=["no --data", "a missing file", "an unknown label"])
def test_a_client_whose_data_does_not_fit_says_so_and_tells_the_server(cluster, tmp_path, client_args, pattern):
    bad = tmp_path / "bad.tsv"
    bad.write_text("ham\thello\nmaybe\tWIN\n")
    server = cluster.server("--task", "text", "--classes", "ham,spam", "--num-clients", "1", "--num-rounds", "1")
    args = [str(bad) if a == "BADLABEL" else a for a in client_args]
    client = cluster.client(1, *args)
    assert client.finish(timeout=120) == 2
    assert re.search(pattern, client.output) and "Traceback" not in client.output
    server.wait_for(r"client 1 left \(it reported an error: client setup failed: ")
    server.kill()


@pytest.mark.parametrize("args, message", [
    (["--task", "text"], "--task text needs --classes, e.g. --classes ham,spam"),
    (["--task", "image"], "--task image needs --classes, e.g. --classes NORMAL,PNEUMONIA"),
    (["--task", "image", "--classes", "a"], "must name at least two distinct classes"),
    (["--task", "text", "--classes", "ham,spam", "--model", "cnn"], "--model cnn is for images; a text task needs"),
    (["--task", "text", "--classes", "ham,spam", "--augment", "affine"], "--augment affine is for images"),
    (["--classes", "a,b"], "--classes applies to --task image or text"),
    (["--task", "image", "--classes", "a,b", "--partition", "shards"], "--partition applies to --task dataset"),
    (["--task", "image", "--classes", "a,b", "--test-data", "NOPE"], "--test-data NOPE: no such file or folder"),
    (["--task", "image", "--classes", "a,b", "--positive-class", "c"], "--positive-class 'c' is not one of"),
])
def test_bad_task_flags_on_the_server_are_one_line(args, message):
    code, output = run_cli("fl_server", args)  # main as the script runs it, in this process
    assert code == 2 and message in output and "Traceback" not in output, output


def test_the_plot_title_names_the_data_the_run_trains_on():
    from fedsock.config import ServerConfig
    from fedsock.prepare import run_title

    own = ServerConfig(task="image", classes="NORMAL,PNEUMONIA", augment="affine", num_clients=5)
    assert run_title(own) == ("fedsock: cnn on the clients' own data (NORMAL, PNEUMONIA), 5 clients, fedavg, "
                              "affine augmentation")
    assert run_title(ServerConfig(num_clients=3, partition="shards", strategy="fedavgm"), "fedsock simulation") == (
        "fedsock simulation: cnn on mnist, 3 clients, shards, fedavgm")


def test_a_test_set_folder_holding_only_test_is_the_servers_held_out_set(tmp_path):
    """A downloaded dataset's folder often has test/ alone beside train/ elsewhere: as --test-data it is the
    held-out set; as a client's --data it has nothing to train on, and says where the images go."""
    png(tmp_path / "chest_xray" / "test" / "NORMAL" / "a.png", 10)
    png(tmp_path / "chest_xray" / "test" / "PNEUMONIA" / "b.png", 200)
    held = load_own_data(str(tmp_path / "chest_xray"), XRAY, flag="--test-data")
    assert held.y.tolist() == [0, 1] and held.x.shape == (2, 1, 28, 28)
    with pytest.raises(UsageError, match=r"has a test/ folder but no train/: a client's training images go in "
                                         r"train/<class>/"):
        load_own_data(str(tmp_path / "chest_xray"), XRAY)


def test_check_data_reads_a_clients_data_offline_and_says_what_it_holds(tmp_path):
    """fl_client.py --check-data: no id, no server; the classes from the folders, the counts per split,
    and the server flags that fit; or the one thing that is wrong."""
    for name, value in (("NORMAL", 10), ("NORMAL", 20), ("PNEUMONIA", 200)):
        png(tmp_path / "xray" / "train" / name / f"{value}.png", value)
    png(tmp_path / "xray" / "test" / "PNEUMONIA" / "t.png", 90)
    code, printed = run_cli("fl_client", ["--check-data", str(tmp_path / "xray")])
    assert code == 0, printed
    assert "training examples: 3 (NORMAL 2, PNEUMONIA 1)" in printed
    assert "test examples: 1 (NORMAL 0, PNEUMONIA 1)" in printed
    assert "OK: it would join a server started with --task image --classes NORMAL,PNEUMONIA --image-size 28" in printed
    table = tmp_path / "messages.tsv"
    table.write_text("ham\thello there\nspam\tWIN a prize now\nham\tsee you\n")
    code, printed = run_cli("fl_client", ["--check-data", str(table), "--classes", "ham,spam"])
    assert code == 0 and "training examples: 3 (ham 2, spam 1)" in printed, printed
    assert "--task text --classes ham,spam --max-tokens 30" in printed
    for argv, said in ((["--check-data", str(table)], "a text table does not say its classes: add --classes"),
                       (["--check-data", str(table), "--classes", "ham,eggs"], "label 'spam' is not among the task's"),
                       (["--check-data", str(tmp_path / "nope")], "no such file or folder")):
        code, printed = run_cli("fl_client", argv)
        assert code == 2 and said in printed and "Traceback" not in printed, printed
        assert len(printed.strip().splitlines()) == 1, printed
