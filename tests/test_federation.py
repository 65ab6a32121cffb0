"""Whole federations: a real server and real client processes on 127.0.0.1."""

import re
import socket

import pytest
import torch

from conftest import FAST, SHARED_DATA, free_port, read_metrics
from support import run_cli


def assert_no_traceback(proc):
    assert "Traceback" not in proc.output, proc.output


def test_client_ids_are_printed_as_runs():
    from fedsock.events import id_ranges

    assert id_ranges([3, 1, 2, 5, 7, 8, 9, 11]) == "1-3, 5, 7-9, 11"
    assert id_ranges(range(1, 1001)) == "1-1000" and id_ranges([4]) == "4" and id_ranges([]) == ""


@pytest.mark.processes
def test_federation_trains_and_keeps_its_results(cluster, tmp_path):
    server = cluster.server(*FAST, "--num-clients", "2", "--num-rounds", "3")
    clients = [cluster.client(1, "--progress-every", "50"), cluster.client(2)]
    assert [c.finish() for c in clients] == [0, 0]
    clients[0].wait_for(r"\[client 1\] round 2/3: 50% trained \(422/844 batches, \d+\.\d s\)")  # a line, not a bar
    assert server.finish() == 0
    server.wait_for(r"round 3/3  clients 2/2  test acc \d+\.\d\d%  loss \d\.\d+  \d+\.\d s")
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[-1]["test_accuracy"] > rows[0]["test_accuracy"] > 0.85  # it learns
    assert rows[-1]["test_loss"] < rows[0]["test_loss"]
    assert all(r["clients"] == 2 and r["bytes_sent"] > 2 * 31_000 and r["bytes_received"] > 2 * 31_000 for r in rows)
    model = torch.load(tmp_path / "run" / "model.pt")
    assert model["linear.weight"].shape == (10, 784)
    assert (tmp_path / "run" / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "run" / "checkpoint.fsck").stat().st_size > 31_000
    for client in clients:
        client.wait_for(r"server: training finished after 3 rounds; final test accuracy")
        assert_no_traceback(client)
    assert_no_traceback(server)


@pytest.mark.processes
def test_late_joiner_duplicate_and_unknown_ids_are_refused(cluster, tmp_path):
    server = cluster.server(*FAST, "--num-clients", "3", "--min-clients", "2", "--time-to-wait", "0",
                            "--num-rounds", "4", "--local-epochs", "2")
    honest = [cluster.client(k) for k in (1, 2)]
    server.wait_for("training starts with 2 client")
    duplicate, late, unknown = cluster.client(1), cluster.client(3), cluster.client(9)
    assert duplicate.finish() == 3
    duplicate.wait_for("error: the server says: client id 1 is already connected to this run")
    assert late.finish() == 3
    late.wait_for(r"error: the server says: training already started \(round \d of 4\); this run takes no new clients")
    assert unknown.finish() == 3
    unknown.wait_for(r"error: the server says: client id 9 is not part of this run \(ids are 1..3\)")
    assert [c.finish() for c in honest] == [0, 0]
    assert server.finish() == 0
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert len(rows) == 4 and all(r["clients"] == 2 for r in rows)  # unharmed
    assert rows[-1]["test_accuracy"] > 0.88
    for proc in (duplicate, late, unknown, server):
        assert_no_traceback(proc)


@pytest.mark.processes
def test_clients_may_start_before_the_server(cluster, tmp_path):
    port = free_port()
    clients = [cluster.client(k, port=port) for k in (1, 2)]
    clients[0].wait_for("waiting for the server")
    clients[1].wait_for("waiting for the server")
    server = cluster.server(*FAST, "--num-clients", "2", "--num-rounds", "1", "--server-port", str(port))
    assert cluster.port == port
    assert [c.finish() for c in clients] == [0, 0]
    assert server.finish() == 0


@pytest.mark.processes
def test_no_server_is_one_line_and_non_zero(cluster):
    client = cluster.client(1, "--connect-timeout", "1", port=free_port())
    assert client.finish(timeout=30) == 1
    assert client.output.strip().endswith("(tried for 1 s: Connection refused)")
    client.wait_for(r"fl_client.py: error: no server at 127.0.0.1:\d+")
    assert_no_traceback(client)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--num-rounds", "0"], "must be at least 1"),
        (["--round-timeout", "nan"], "must be a positive number"),
        (["--seed", "-1"], "--seed: must be 0..4294967295, got -1"),
        (["--lr", "-1"], "must be a positive number"),
        (["--model", "resnet"], "invalid choice"),
        (["--min-clients", "4", "--num-clients", "2"], "--min-clients 4 is more than --num-clients 2"),
        (["--partition", "dirichlet", "--alpha", "0.0001", "--num-clients", "50"], "raise --alpha"),
        (["--tls-cert", "nope.pem"], "--tls-cert and --tls-key go together"),
        (["--tls-cert", "nope.pem", "--tls-key", "nope.key"], "cannot load --tls-cert/--tls-key"),
        (["--resume", "no-such-checkpoint"], "cannot resume from no-such-checkpoint"),
        (["--num-clients", "65000"], "--num-clients 65000 would leave clients with fewer than 10 of the 60000 training "
                                     "examples; use --num-clients 6000 or fewer"),
        (["--server-momentum", "0.9"], "--server-momentum applies to --strategy fedavgm, not fedavg"),
        (["--strategy", "krum", "--num-clients", "4"], "krum with --byzantine-clients 1 needs at least 5 updates a round"),
        (["--clients-per-round", "3", "--fraction-fit", "0.5"], "use --clients-per-round or --fraction-fit, not both"),
        (["--clients-per-round", "9"], "--clients-per-round 9 is more than --num-clients 5"),
        (["--initial-model", "nope.pt"], "cannot read --initial-model nope.pt"),
        (["--fraction-fit", "0"], "--fraction-fit: must be 0..1"),
        (["--lr-decay", "1.5"], "--lr-decay: must be 0..1, got 1.5"),
    ],
)
def test_bad_server_flags_are_one_line_errors(args, message):
    code, output = run_cli("fl_server", args)  # main as the script runs it, in this process
    assert code == 2 and message in output and "Traceback" not in output, output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--client-id", "0"], "--client-id: must be at least 1, got 0"),
        (["--client-id", "two"], "must be a whole number"),
        (["--server-port", "70000"], "must be 1..65535"),
        (["--tls-cert", "x.pem"], "--tls-cert and --tls-key go together"),
    ],
)
def test_bad_client_flags_are_one_line_errors(args, message):
    code, output = run_cli("fl_client", ["--client-id", "1", "--server-port", str(free_port()), *args])
    assert code == 2 and message in output and "Traceback" not in output, output


@pytest.mark.processes
def test_help_names_each_setting_as_its_flag(cluster):
    """--help shows a flag's value by the flag's own name or unit, never an internal field name."""
    for program in ("fl_server.py", "fl_client.py"):
        proc = cluster.run_program(program, "--help")
        assert proc.finish(timeout=60) == 0
        assert not re.search(r"\b[A-Z_]+_S\b", proc.output), proc.output  # TIME_TO_WAIT_S, HEARTBEAT_S, ...
    server_help = cluster.procs[0].output
    for flag in ("--time-to-wait SECONDS", "--heartbeat-interval SECONDS", "--round-timeout SECONDS",
                 "--handshake-timeout SECONDS", "--num-clients N", "--clients-per-round K"):
        assert flag in server_help, flag


@pytest.mark.processes
def test_port_in_use_and_missing_data(cluster, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = cluster.server("--server-port", str(port), wait=False)
        assert server.finish(timeout=60) == 2
        assert f"port {port} on 127.0.0.1 is already in use" in server.output
    empty = tmp_path / "empty"
    empty.mkdir()
    server = cluster.server("--data-root", str(empty), wait=False)
    assert server.finish(timeout=60) == 2
    assert "MNIST files are missing" in server.output
    for proc in cluster.procs:
        assert_no_traceback(proc)


@pytest.mark.processes
def test_use_cuda_switch(cluster):
    server = cluster.server("--use-cuda", "--model", "logreg", wait=False)
    if torch.cuda.is_available():
        server.wait_for("on cuda")
    else:
        assert server.finish(timeout=60) == 2
        assert "--device cuda was asked for, but PyTorch sees no CUDA device here" in server.output
    assert_no_traceback(server)


@pytest.mark.processes
def test_fashion_mnist_from_a_data_root(cluster, tmp_path):
    server = cluster.server(*FAST, "--dataset", "fashion-mnist", "--data-root", str(SHARED_DATA),
                            "--num-clients", "2", "--num-rounds", "2")
    clients = [cluster.client(k, "--data-root", str(SHARED_DATA)) for k in (1, 2)]
    assert [c.finish() for c in clients] == [0, 0]
    assert server.finish() == 0
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert rows[-1]["test_accuracy"] > 0.75


@pytest.mark.processes
def test_client_without_data_says_so_and_the_server_hears_why(cluster, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    # Training needs two clients, so the broken one leaves from the lobby; then 2 and 3 run.
    server = cluster.server(*FAST, "--num-clients", "3", "--min-clients", "2", "--num-rounds", "2", "--time-to-wait", "0")
    broken = cluster.client(1, "--data-root", str(empty))
    assert broken.finish() == 2
    broken.wait_for(r"fl_client.py: error: MNIST files are missing under .*empty")
    server.wait_for(r"client 1 left \(it reported an error: client setup failed: MNIST files are missing")
    honest = [cluster.client(2), cluster.client(3)]
    assert [c.finish() for c in honest] == [0, 0] and server.finish() == 0
    assert_no_traceback(broken)


def test_bad_policy_files_and_identities_are_one_line_errors(tmp_path):
    """--config's TOML, --identity's file and the server's --federation: each mistake, one line, exit 2."""
    from fedsock import enrol

    enrol.enrol(tmp_path / "federation", [1, 2])
    fed = tmp_path / "federation"
    tampered = tmp_path / "tampered.identity"
    text = (fed / "client-1.identity").read_text()
    tampered.write_text(text.replace('"client_id": 1', '"client_id": 2'))
    files = {"bad.toml": "require_dp = [", "unknown.toml": "min_clients = 3\n", "typed.toml": "require_dp = 3\n",
             "low.toml": "min_round_clients = 1\n"}
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    client = [
        (["--config", str(tmp_path / "missing.toml")], f"cannot read --config {tmp_path / 'missing.toml'}"),
        (["--config", str(tmp_path / "bad.toml")], "is not a TOML file"),
        (["--config", str(tmp_path / "unknown.toml")], "'min_clients' is not a setting of fl_client.py"),
        (["--config", str(tmp_path / "typed.toml")], "require_dp must be true or false"),
        (["--config", str(tmp_path / "low.toml")], "--min-round-clients: must be at least 2"),
        (["--identity", str(tmp_path / "none.identity")], "cannot read the identity file"),
        (["--identity", str(fed / "client-2.identity")], "is the identity of client 2, not of client 1"),
        (["--identity", str(tampered)], "is the identity of client 2, not of client 1"),
        (["--identity", str(fed / "federation.pub")], "not a fedsock identity file"),
    ]
    for args, message in client:
        code, output = run_cli("fl_client", ["--client-id", "1", "--server-port", str(free_port()), *args])
        assert code == 2 and message in output and "Traceback" not in output, (args, output)
    (tmp_path / "relabelled.identity").write_text(text.replace('"client_id": 1', '"client_id": 3'))
    code, output = run_cli("fl_client", ["--client-id", "3", "--server-port", str(free_port()),
                                         "--identity", str(tmp_path / "relabelled.identity")])
    assert code == 2 and "its certificate does not verify under its federation key" in output, output
    server = [
        (["--federation", str(fed / "federation.pub")], "--federation needs --secure-aggregation"),
        (["--secure-aggregation", "--federation", str(fed / "federation.key")], "is the federation's private key"),
        (["--secure-aggregation", "--federation", str(tmp_path / "none.pub")], "cannot read the federation key file"),
    ]
    for args, message in server:
        code, output = run_cli("fl_server", ["--output-dir", str(tmp_path / "run"), *args])
        assert code == 2 and message in output and "Traceback" not in output, (args, output)
