"""Fault injection with real processes: clients killed or stalled, the server killed, interrupted and resumed."""

import errno
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import FAST, read_metrics
from fedsock.run_files import read_checkpoint

pytestmark = pytest.mark.processes  # every test here starts real processes


def test_client_killed_mid_round_the_rest_finish(cluster, tmp_path):
    # Three local epochs make each round last a few seconds: the kill lands inside round 2.
    server = cluster.server(*FAST, "--num-clients", "3", "--num-rounds", "4", "--local-epochs", "3",
                            "--round-timeout", "120")
    clients = [cluster.client(k) for k in (1, 2, 3)]
    server.wait_for(r"round 1/4  clients 3/3")  # printed after round 2's model went out
    clients[1].kill()  # SIGKILL while it trains round 2
    assert clients[0].finish() == 0 and clients[2].finish() == 0
    assert server.finish() == 0
    server.wait_for(r"dropped: .*client 2 in round 2 \(connection closed")
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert [r["clients"] for r in rows] == [3, 2, 2, 2]
    # The closed socket was noticed at once: round 2 took about as long as training, far from the timeout.
    assert rows[1]["seconds"] < 60
    assert rows[-1]["test_accuracy"] > 0.88


def test_stalled_client_is_left_out_after_the_round_timeout(cluster, tmp_path):
    server = cluster.server(*FAST, "--num-clients", "2", "--num-rounds", "3", "--local-epochs", "2",
                            "--round-timeout", "6")
    clients = [cluster.client(k) for k in (1, 2)]
    server.wait_for(r"round 1/3  clients 2/2")
    clients[1].signal(signal.SIGSTOP)  # alive, connected, silent
    try:
        assert clients[0].finish() == 0
        assert server.finish() == 0
    finally:
        clients[1].signal(signal.SIGCONT)
    server.wait_for(r"client 2 sent no update within 6 s in round 2; left out of that round")
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert [r["clients"] for r in rows] == [2, 1, 1]
    assert rows[-1]["test_accuracy"] > 0.88
    # Woken up, the stalled client finds the run over and says so.
    clients[1].finish()
    assert "Traceback" not in clients[1].output


def test_server_killed_then_resumed_continues_metrics(cluster, tmp_path):
    out = tmp_path / "run"
    server = cluster.server(*FAST, "--num-clients", "2", "--num-rounds", "4", "--local-epochs", "2")
    clients = [cluster.client(k) for k in (1, 2)]
    server.wait_for(r"round 2/4  clients 2/2")
    server.kill()  # SIGKILL: no chance to clean up
    for client in clients:
        assert client.finish(timeout=60) == 1
        client.wait_for(r"error: the server at 127.0.0.1:\d+ (closed|dropped) the connection")
    state = read_checkpoint(out / "checkpoint.fsck")
    assert state.round >= 2
    before = read_metrics(out / "metrics.csv")[: state.round]

    resumed = cluster.server("--resume", str(out / "checkpoint.fsck"), "--time-to-wait", "30")
    resumed.wait_for(rf"resuming from .*round {state.round} of 4 was the last completed")
    clients = [cluster.client(k) for k in (1, 2)]
    assert [c.finish() for c in clients] == [0, 0]
    assert resumed.finish() == 0
    rows = read_metrics(out / "metrics.csv")
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert rows[: state.round] == before  # the history is kept, not redone
    assert rows[-1]["test_accuracy"] > 0.88


def test_sigint_tells_clients_and_leaves_a_checkpoint(cluster, tmp_path):
    out = tmp_path / "run"
    server = cluster.server(*FAST, "--num-clients", "2", "--num-rounds", "20", "--local-epochs", "2")
    clients = [cluster.client(k) for k in (1, 2)]
    server.wait_for(r"round 1/20  clients 2/2")
    server.signal(signal.SIGINT)
    assert server.finish(timeout=60) == 130
    server.wait_for(r"SIGINT: stopping after round \d+")
    for client in clients:
        assert client.finish(timeout=60) == 0
        client.wait_for(r"server: the server was stopped \(SIGINT\) after round \d+; it can resume from its checkpoint")
        assert "Traceback" not in client.output
    # The clients left because they were told to: that is the run's clean end, not a drop.
    assert "dropped" not in server.output and "goes on without it" not in server.output, server.output
    state = read_checkpoint(out / "checkpoint.fsck")
    assert 1 <= state.round < 20 and len(read_metrics(out / "metrics.csv")) == state.round
    assert not (out / "checkpoint.fsck.tmp").exists()


def test_sigint_between_stay_sessions_ends_a_completed_run_with_exit_0(cluster, tmp_path):
    """--stay: once a session's rounds are done, Ctrl-C is how the run is ended. Every round asked for was
    done, so the run is complete: exit 0, and the clients are told <FINISHED> with completed true (the
    "training finished" message, which only a completed run sends), not that the server was stopped."""
    out = tmp_path / "run"
    server = cluster.server(*FAST, "--num-clients", "1", "--num-rounds", "1", "--stay")
    client = cluster.client(1)
    server.wait_for(r"session 1 finished after round 1; the clients stay connected")
    client.wait_for(r"server: session 1 ended after round 1; stay connected")
    server.signal(signal.SIGINT)
    assert server.finish(timeout=60) == 0, server.output
    server.wait_for(r"SIGINT: the run ends after session 1")
    assert client.finish(timeout=60) == 0, client.output
    client.wait_for(r"server: training finished after 1 rounds")
    assert "stopped" not in client.output and "Traceback" not in client.output + server.output
    assert read_checkpoint(out / "checkpoint.fsck").round == 1


def test_sigterm_exits_143_with_the_checkpoint_intact(cluster, tmp_path):
    out = tmp_path / "run"
    server = cluster.server(*FAST, "--num-clients", "1", "--num-rounds", "20", "--local-epochs", "2")
    client = cluster.client(1)
    server.wait_for(r"round 1/20  clients 1/1")
    server.signal(signal.SIGTERM)
    assert server.finish(timeout=60) == 143
    assert client.finish(timeout=60) == 0
    state = read_checkpoint(out / "checkpoint.fsck")
    assert state.config["num_rounds"] == 20 and state.round >= 1


def test_resume_refuses_a_changed_model_and_a_finished_run(cluster, tmp_path):
    out = tmp_path / "run"
    server = cluster.server(*FAST, "--num-clients", "1", "--num-rounds", "1")
    client = cluster.client(1)
    assert client.finish() == 0 and server.finish() == 0
    changed = cluster.server("--resume", str(out / "checkpoint.fsck"), "--model", "cnn", wait=False)
    assert changed.finish(timeout=60) == 2
    assert "--model cannot change on --resume (the run used 'logreg')" in changed.output
    done = cluster.server("--resume", str(out / "checkpoint.fsck"), wait=False)
    assert done.finish(timeout=60) == 2
    assert "raise --num-rounds to go on" in done.output
    (out / "broken.fsck").write_bytes((out / "checkpoint.fsck").read_bytes()[:-100])
    broken = cluster.server("--resume", str(out / "broken.fsck"), wait=False)
    assert broken.finish(timeout=60) == 2
    assert "cannot resume from" in broken.output and "cut short" in broken.output


def test_a_client_gives_up_when_the_server_goes_silent(cluster, tmp_path):
    """A server that stops answering (SIGSTOP: no FIN, no RST) is given up on after the announced timeout."""
    server = cluster.server(*FAST, "--num-clients", "2", "--num-rounds", "3", "--heartbeat-interval", "1",
                            "--min-clients", "2", "--time-to-wait", "60")
    client = cluster.client(1, quiet=False)
    client.wait_for("server: waiting for clients: 1 of 2 ready")  # the lobby is long, but the server is alive
    server.signal(signal.SIGSTOP)
    try:
        assert client.finish(timeout=60) == 1  # three missed heartbeats: 3 x 1 s + 2 s
    finally:
        server.signal(signal.SIGCONT)
    client.wait_for(r"error: the server at 127.0.0.1:\d+ sent nothing for 5 s; giving up")


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs of the test's own, so that the test can fill the disk under a running server."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill (needs root): {made.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def fill(folder: Path) -> Path:
    """Write zeros into `folder` until its file system is full."""
    filler = folder / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(bytes(64 << 10))
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


def test_a_full_disk_ends_the_run_cleanly_and_the_files_agree(cluster, small_disk):
    out = small_disk / "run"
    server = cluster.server(*FAST, "--num-clients", "2", "--num-rounds", "12", "--local-epochs", "3", output_dir=out)
    clients = [cluster.client(k) for k in (1, 2)]
    server.wait_for(r"round 2/12  clients 2/2")
    filler = fill(small_disk)
    assert server.finish(timeout=120) == 1
    error = server.wait_for(r"fl_server.py: error: cannot write the checkpoint \S+checkpoint.fsck for round (\d+): "
                            r"No space left on device; the checkpoint of round (\d+) is intact: resume with --resume")
    failed, safe = int(error.group(1)), int(error.group(2))
    assert failed == safe + 1
    for client in clients:  # told the run is over, with why: not a crash
        assert client.finish(timeout=60) == 0
        client.wait_for(r"server: cannot write the checkpoint .* for round \d+: No space left on device")
    assert not list(out.glob("*.tmp")), list(out.glob("*"))
    assert read_checkpoint(out / "checkpoint.fsck").round == safe
    assert [r["round"] for r in read_metrics(out / "metrics.csv")] == list(range(1, safe + 1))  # they agree
    assert "Traceback" not in server.output
    # Room again: the run resumes from the safe round, and metrics.csv has each round once.
    filler.unlink()
    resumed = cluster.server("--resume", str(out / "checkpoint.fsck"), "--time-to-wait", "30", "--num-rounds",
                             str(safe + 2), "--local-epochs", "1", output_dir=out)  # two more rounds prove it
    clients = [cluster.client(k) for k in (1, 2)]
    assert [c.finish() for c in clients] == [0, 0] and resumed.finish() == 0
    assert [r["round"] for r in read_metrics(out / "metrics.csv")] == list(range(1, safe + 3))


def test_an_output_folder_that_vanishes_mid_run_ends_it_cleanly(cluster, tmp_path):
    out = tmp_path / "run"
    server = cluster.server(*FAST, "--num-clients", "1", "--num-rounds", "12", "--local-epochs", "3")
    client = cluster.client(1)
    server.wait_for(r"round 2/12  clients 1/1")
    shutil.rmtree(out)
    assert server.finish(timeout=120) == 1
    server.wait_for(r"fl_server.py: error: cannot write the checkpoint \S+ for round \d+: No such file or directory; "
                    r"the checkpoint of round \d+ is intact")
    assert client.finish(timeout=60) == 0  # <FINISHED> came, with the reason
    client.wait_for(r"server: cannot write the checkpoint")
    assert "Traceback" not in server.output


def test_a_damaged_checkpoint_is_one_line_that_names_it(cluster, tmp_path):
    out = tmp_path / "run"
    server = cluster.server(*FAST, "--num-clients", "1", "--num-rounds", "1")
    assert cluster.client(1).finish() == 0 and server.finish() == 0
    data = bytearray((out / "checkpoint.fsck").read_bytes())
    data[len(data) // 2] ^= 0x40
    (out / "damaged.fsck").write_bytes(data)
    (out / "empty.fsck").write_bytes(b"")
    for name, reason in (("damaged.fsck", "it is damaged: its SHA-256 checksum does not match its contents"),
                         ("empty.fsck", r"the file is empty \(0 bytes\), not a checkpoint")):
        resumed = cluster.server("--resume", str(out / name), "--num-rounds", "3", wait=False)
        assert resumed.finish(timeout=60) == 2
        assert re.search(rf"^fl_server.py: error: cannot resume from \S+{name}: {reason}", resumed.output, re.M), resumed.output
        assert "Traceback" not in resumed.output


def test_a_server_stopped_before_its_first_checkpoint_does_not_promise_one(cluster, tmp_path):
    server = cluster.server(*FAST, "--num-clients", "2", "--time-to-wait", "60")
    server.signal(signal.SIGTERM)
    assert server.finish(timeout=60) == 143
    server.wait_for(r"the server was stopped \(SIGTERM\) before any round completed; there is no checkpoint to resume from")
    assert not (tmp_path / "run" / "checkpoint.fsck").exists()
