"""Federations across hosts: the server in one Linux network namespace, each client in another,
joined by bench/netlab.py's switch, with TLS and a token as a real deployment would use them.

Each case impairs the links (delay, loss, a slow link, a partition in the middle of a round)
and checks that the federation finishes, or fails cleanly with the documented messages: no
hang (every wait is bounded), no traceback, nothing lost. The table of round times under each
condition comes from bench/network.py. Without permission to make namespaces (not root, no
`ip`, a container that forbids it) the module is skipped, and says why.
"""

from __future__ import annotations

import math
import time

import pytest

from conftest import Proc, read_metrics
from netlab import NetLab, unavailable
from pki import Authority

REASON = unavailable()
pytestmark = [pytest.mark.processes,
              pytest.mark.skipif(REASON is not None, reason=f"network namespaces: {REASON}")]

TOKEN = "netns-enrolment-token-5d1e"
ROUNDS = 3


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """A CA, the server's certificate for its namespace address, and the token file."""
    folder = tmp_path_factory.mktemp("deploy")
    ca = Authority(folder, "ca")
    token = folder / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    return {"ca": ca.path, "server": ca.issue("server", ips=["10.99.0.1"]), "token": str(token)}


class Hosts:
    """A lab of `server` and client namespaces; every process started is ended by PID."""

    def __init__(self, clients: int):
        self.lab = NetLab(["server", *[f"c{k}" for k in range(1, clients + 1)]], Proc)
        self.procs: list[Proc] = []

    def server(self, deployment, *args: str, output_dir) -> tuple[Proc, int]:
        cert, key = deployment["server"]
        proc = self.lab.run("server", ["fl_server.py", "--host", self.lab.address("server"), "--server-port", "0",
                                       "--tls-cert", cert, "--tls-key", key, "--auth-token-file", deployment["token"],
                                       "--output-dir", str(output_dir), *args], "server")
        self.procs.append(proc)
        return proc, int(proc.wait_for(r"listening on [\d.]+:(\d+) \(TLS, token", timeout=90).group(1))

    def client(self, deployment, k: int, port: int, *args: str) -> Proc:
        proc = self.lab.run(f"c{k}", ["fl_client.py", "--client-id", str(k), "--server-host",
                                      self.lab.address("server"), "--server-port", str(port), "--tls-ca",
                                      deployment["ca"], "--auth-token-file", deployment["token"], *args], f"client {k}")
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
        self.lab.close()


@pytest.fixture
def hosts():
    made: list[Hosts] = []
    yield lambda clients=2: made.append(Hosts(clients)) or made[-1]
    for h in made:
        h.close()


def no_traceback(*procs: Proc) -> None:
    for proc in procs:
        assert "Traceback" not in proc.output, proc.output


FED = ["--model", "logreg", "--num-clients", "2", "--num-rounds", str(ROUNDS), "--time-to-wait", "60"]


@pytest.mark.parametrize("impairment", [{}, {"delay_ms": 50}, {"loss": 0.02}, {"loss": 0.10}, {"rate_mbit": 10}],
                         ids=["clean", "50ms-delay", "2pct-loss", "10pct-loss", "10mbit"])
def test_a_federation_across_impaired_links_finishes(hosts, deployment, tmp_path, impairment):
    h = hosts()
    for k in (1, 2):
        h.lab.impair(f"c{k}", **impairment)
    server, port = h.server(deployment, *FED, output_dir=tmp_path / "run")
    clients = [h.client(deployment, k, port, "--quiet") for k in (1, 2)]
    assert [c.finish(timeout=300) for c in clients] == [0, 0], [c.output for c in clients]
    assert server.finish(timeout=60) == 0, server.output
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert [r["clients"] for r in rows] == [2] * ROUNDS
    assert rows[-1]["test_accuracy"] > 0.85
    no_traceback(server, *clients)
    sent, lost = h.lab.stats()["c1"]
    if impairment.get("loss"):  # the switch really lost what it was told to, and TCP made up for it
        p = impairment["loss"]  # binomial: within 4 standard deviations of p·sent (and not nothing)
        assert 0 < lost and abs(lost - p * sent) <= 4 * math.sqrt(sent * p * (1 - p)) + 1, (sent, lost)


def test_a_ten_second_partition_in_the_middle_of_a_round_is_ridden_out(hosts, deployment, tmp_path):
    h = hosts()
    server, port = h.server(deployment, *FED, output_dir=tmp_path / "run")
    clients = [h.client(deployment, 1, port), h.client(deployment, 2, port, "--quiet")]
    # Round 1's line comes just before round 2's model goes out, and client 1 needs longer than it takes us
    # to react to train on it: the partition holds round 2's model or its update, whichever is crossing.
    server.wait_for(r"round 1/\d+ ", timeout=120)
    h.lab.impair("c1", hold=True)
    time.sleep(10)  # the partition itself: what is under test, not a synchronisation
    h.lab.impair("c1", hold=False)
    assert [c.finish(timeout=300) for c in clients] == [0, 0], [c.output for c in clients]
    assert server.finish(timeout=60) == 0, server.output
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert [r["clients"] for r in rows] == [2] * ROUNDS  # nobody was dropped: 10 s is below every timeout
    assert rows[1]["seconds"] >= 9.5  # round 2 waited out the partition
    no_traceback(server, *clients)


# A cnn update (6.7 MB) over 10 Mbit/s takes over 5 s: longer than this stall timeout. The
# clients hold 1/20 of MNIST each, so that their training is short.
CNN_FED = ["--model", "cnn", "--num-clients", "20", "--min-clients", "1", "--num-rounds", "1", "--time-to-wait", "0",
           "--stall-timeout", "2", "--round-timeout", "120", "--round-retries", "0"]


def test_a_slow_link_upload_longer_than_the_stall_timeout_is_taken(hosts, deployment, tmp_path):
    h = hosts(1)
    h.lab.impair("c1", rate_mbit=10)
    server, port = h.server(deployment, *CNN_FED, output_dir=tmp_path / "run")
    client = h.client(deployment, 1, port, "--quiet")
    assert client.finish(timeout=300) == 0, client.output
    assert server.finish(timeout=60) == 0, server.output
    row = read_metrics(tmp_path / "run" / "metrics.csv")[0]
    assert row["clients"] == 1
    assert row["bytes_received"] / row["seconds"] < 10e6 / 8 * 1.05  # it really crossed the 10 Mbit/s link
    assert row["seconds"] > 2 * 5.0  # the model down and the update up: each over 5 s
    no_traceback(server, client)


def test_a_link_that_goes_dead_mid_upload_is_cut_off_at_the_stall_timeout(hosts, deployment, tmp_path):
    h = hosts(1)
    h.lab.impair("c1", rate_mbit=10)
    server, port = h.server(deployment, *CNN_FED, output_dir=tmp_path / "run")
    client = h.client(deployment, 1, port)
    client.wait_for(r"round 1: trained", timeout=240)
    h.lab.wait_traffic("c1", frames=1000)  # about 1.5 MB of its update are through
    h.lab.impair("c1", hold=True)  # now nothing more gets through
    held = time.monotonic()
    server.wait_for(r"client 1 \([\d.:]+\): stalled: no byte of a frame for 2 s .*; disconnected", timeout=60)
    assert time.monotonic() - held < 10  # the stall timeout (2 s), not the round's (120 s)
    h.lab.impair("c1", hold=False)
    assert server.finish(timeout=60) != 0
    server.wait_for(r"fl_server.py: error: round 1 failed 1 times; the last good model is round 0")
    assert client.finish(timeout=120) != 0  # told by a reset when the link comes back, or by its own timeout
    no_traceback(server, client)
    assert "fl_client.py: error: the server at 10.99.0.1" in client.output, client.output


def test_a_client_whose_link_dies_while_it_trains_is_dropped_within_the_stall_timeout(hosts, deployment, tmp_path):
    """Nothing is read from a training client, so no read can notice; its kernel's missing ACKs of the
    server's heartbeats do (TCP_USER_TIMEOUT = --stall-timeout). The round goes on with client 2."""
    h = hosts()
    server, port = h.server(deployment, "--model", "mlp", "--num-clients", "2", "--min-clients", "1",
                            "--num-rounds", "1", "--time-to-wait", "120", "--stall-timeout", "2",
                            "--heartbeat-interval", "1", "--round-timeout", "120", output_dir=tmp_path / "run")
    clients = [h.client(deployment, 1, port, "--progress-every", "25"), h.client(deployment, 2, port, "--quiet")]
    clients[0].wait_for(r"round 1/1: 25% trained", timeout=120)
    h.lab.impair("c1", hold=True)
    held = time.monotonic()
    server.wait_for(r"client 1 in round 1 \(connection closed: .*timed out.*\); the round goes on without it", timeout=60)
    assert time.monotonic() - held < 15  # a heartbeat (1 s) left unacknowledged for 2 s, not the round timeout
    assert server.finish(timeout=120) == 0, server.output
    row = read_metrics(tmp_path / "run" / "metrics.csv")[0]
    assert row["clients"] == 1
    assert clients[1].finish(timeout=60) == 0
    no_traceback(server, *clients)
