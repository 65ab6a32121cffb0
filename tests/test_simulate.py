"""fl_simulate.py: many virtual clients on the server's own round engine.

The round logic itself is tested in-process (test_engine.py); here, that a simulation gives a
real federation's numbers, that its backends agree, that only the sampled clients train, that
simulated faults behave, that a resumed simulation ends where a straight one does, and that the
sockets transport runs a real server at scale. What needs no process of its own runs
fl_simulate.py's main in this one (`simulate_here`)."""

from __future__ import annotations

import asyncio
import re
import signal

import pytest
import torch

from conftest import FAST, ROOT, Proc, read_metrics
from support import run_cli

processes = pytest.mark.processes  # these start fl_simulate.py (or a server) as processes

LOGREG = ["--model", "logreg"]


def simulate_here(*args: str, output_dir) -> int:
    """fl_simulate.py's main in this process: its exit status."""
    import fl_simulate

    return fl_simulate.main(["--output-dir", str(output_dir), *args])


def simulate(cluster, *args: str, output_dir, env: dict | None = None) -> Proc:
    proc = Proc(["fl_simulate.py", "--output-dir", str(output_dir), *args], "simulation", env)
    cluster.procs.append(proc)
    return proc


@processes
def test_a_simulation_gives_a_real_federations_numbers(cluster, tmp_path):
    """Each virtual client trains exactly as fl_client.py would on the same share, with the same seed."""
    flags = ["--num-clients", "2", "--num-rounds", "2", "--seed", "3", "--partition", "dirichlet", "--alpha", "1"]
    server = cluster.server(*FAST, *flags, output_dir=tmp_path / "real")
    clients = [cluster.client(k) for k in (1, 2)]
    assert [c.finish() for c in clients] == [0, 0] and server.finish() == 0
    sim = simulate(cluster, *LOGREG, *flags, output_dir=tmp_path / "sim")
    assert sim.finish(timeout=300) == 0, sim.output
    real, simulated = read_metrics(tmp_path / "real" / "metrics.csv"), read_metrics(tmp_path / "sim" / "metrics.csv")
    keys = ("round", "clients", "test_accuracy", "test_loss", "train_loss")
    assert [{k: r[k] for k in keys} for r in real] == [{k: r[k] for k in keys} for r in simulated]
    a, b = torch.load(tmp_path / "real" / "model.pt"), torch.load(tmp_path / "sim" / "model.pt")
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert (tmp_path / "sim" / "accuracy.png").exists() and (tmp_path / "sim" / "checkpoint.fsck").exists()


@processes
def test_the_backends_agree(cluster, tmp_path):
    import fl_simulate

    flags = [*LOGREG, "--num-clients", "8", "--num-rounds", "2", "--seed", "1", "--quiet"]
    in_here = {"inprocess-1": ["--backend", "inprocess"], "inprocess-2": ["--backend", "inprocess", "--workers", "2"]}
    for name, backend in in_here.items():  # threads of this process: fl_simulate.py's main, here
        assert fl_simulate.main([*flags, *backend, "--output-dir", str(tmp_path / name)]) == 0
    elsewhere = {"processes-2": ["--backend", "processes", "--workers", "2"], "ray": ["--backend", "ray"]}
    procs = {name: simulate(cluster, *flags, *backend, output_dir=tmp_path / name) for name, backend in elsewhere.items()}
    for name, proc in procs.items():  # the two run side by side
        assert proc.finish(timeout=300) == 0, proc.output
        proc.wait_for(rf"8 virtual clients on the {elsewhere[name][1]} backend")  # ray: a local Ray cluster
    runs = {**in_here, **elsewhere}
    models = {name: torch.load(tmp_path / name / "model.pt") for name in runs}
    metrics = {name: read_metrics(tmp_path / name / "metrics.csv") for name in runs}
    # One worker, or workers in processes: every client's training is the same computation, bit for bit.
    # With several workers the updates arrive in another order, and the float64 sums may round in
    # their last bits: equal to far below float32's resolution.
    for name in runs:
        for tensor in models[name]:
            assert torch.allclose(models[name][tensor], models["inprocess-1"][tensor], rtol=0, atol=1e-6)
        assert [r["test_accuracy"] for r in metrics[name]] == [r["test_accuracy"] for r in metrics["inprocess-1"]]


def test_only_the_sampled_clients_of_a_thousand_train(capsys, tmp_path):
    code = simulate_here(*LOGREG, "--num-clients", "1000", "--clients-per-round", "10", "--num-rounds", "3",
                         output_dir=tmp_path / "sim")
    output = capsys.readouterr().out
    assert code == 0, output
    rows = read_metrics(tmp_path / "sim" / "metrics.csv")
    assert [(r["clients"], r["round"]) for r in rows] == [(10, 1), (10, 2), (10, 3)]
    picked = re.findall(r"round (\d): picked 10 of 1000 ready clients", output)
    assert picked == ["1", "2", "3"]
    assert rows[-1]["test_accuracy"] > 0.6  # 600 examples a round (10 clients of 60): it learns


@processes
def test_simulated_drops_and_stragglers_are_reproducible(cluster, tmp_path):
    flags = [*LOGREG, "--num-clients", "10", "--num-rounds", "4", "--drop-rate", "0.3", "--straggler-rate", "0.2",
             "--straggler-delay", "12", "--round-timeout", "8", "--seed", "4"]
    # A straggler's update comes 12 s late: past the 8 s round timeout, and 4 s into the rounds after,
    # far from where one ends (a round without a straggler takes well under a second). Every other
    # client answers well within the timeout even on a busy machine. So the same clients miss the same
    # rounds in both runs.
    outputs = []
    for attempt in (1, 2):
        proc = simulate(cluster, *flags, output_dir=tmp_path / f"run{attempt}")
        assert proc.finish(timeout=300) == 0, proc.output
        outputs.append(proc)
    first, second = (read_metrics(tmp_path / f"run{k}" / "metrics.csv") for k in (1, 2))
    assert [r["clients"] for r in first] == [r["clients"] for r in second]
    assert [r["test_accuracy"] for r in first] == [r["test_accuracy"] for r in second]
    assert any(r["clients"] < 10 for r in first)
    assert "(a simulated crash (--drop-rate)); the round goes on without it" in outputs[0].output
    assert re.search(r"sent no update within 8 s in round \d", outputs[0].output)


@processes
def test_the_sockets_transport_runs_a_real_server(cluster, tmp_path):
    proc = simulate(cluster, *LOGREG, "--num-clients", "30", "--num-rounds", "2", "--transport", "sockets",
                    output_dir=tmp_path / "sim")
    assert proc.finish(timeout=300) == 0, proc.output
    proc.wait_for(r"\[server\] listening on 127\.0\.0\.1:\d+")
    proc.wait_for(r"30 of 30 virtual clients finished; 60 client-rounds trained; server exit 0")
    rows = read_metrics(tmp_path / "sim" / "metrics.csv")
    assert [r["clients"] for r in rows] == [30, 30] and rows[0]["bytes_received"] > 30 * 31_000


def test_a_resumed_simulation_ends_where_a_straight_one_does(tmp_path):
    """--resume continues a simulation from its checkpoint: 2 rounds, then resumed to 4, end bit for bit
    where 4 straight rounds do (fedadam, so that the server optimiser's state must come back too)."""
    flags = [*LOGREG, "--num-clients", "20", "--clients-per-round", "4", "--strategy", "fedadam", "--seed", "5",
             "--quiet"]
    assert simulate_here(*flags, "--num-rounds", "4", output_dir=tmp_path / "straight") == 0
    assert simulate_here(*flags, "--num-rounds", "2", output_dir=tmp_path / "parts") == 0
    assert simulate_here("--resume", str(tmp_path / "parts" / "checkpoint.fsck"), "--num-rounds", "4", "--quiet",
                         output_dir=tmp_path / "parts") == 0
    a, b = read_metrics(tmp_path / "straight" / "metrics.csv"), read_metrics(tmp_path / "parts" / "metrics.csv")
    assert [r["round"] for r in b] == [1, 2, 3, 4]
    assert [r["test_accuracy"] for r in a] == [r["test_accuracy"] for r in b]
    x, y = torch.load(tmp_path / "straight" / "model.pt"), torch.load(tmp_path / "parts" / "model.pt")
    assert all(torch.equal(x[name], y[name]) for name in x)


def test_a_simulation_with_identities_signs_every_key_and_gives_the_same_model(tmp_path, capsys):
    """fl_simulate.py --federation: each virtual client signs with the identity enrolled beside the
    federation key, and checks its peers'; the model is the one without identities, within the
    quantisation bound (the masks and the rounding are random). A client without an identity there
    is one line."""
    from fedsock import enrol

    enrol.enrol(tmp_path / "federation", [1, 2, 3, 4, 5])
    federation = str(tmp_path / "federation" / "federation.pub")
    flags = [*LOGREG, "--num-clients", "5", "--num-rounds", "2", "--secure-aggregation", "--quiet"]
    assert simulate_here(*flags, output_dir=tmp_path / "plain") == 0
    assert simulate_here(*flags, "--federation", federation, output_dir=tmp_path / "signed") == 0
    plain, signed = (torch.load(tmp_path / name / "model.pt") for name in ("plain", "signed"))
    assert max(float((plain[k] - signed[k]).abs().max()) for k in plain) < 1e-6
    code, output = run_cli("fl_simulate", [*flags, "--num-clients", "6", "--federation", federation,
                                           "--output-dir", str(tmp_path / "six")])
    assert code == 2 and f"no identity for client 6 beside {federation}" in output, output


@processes
def test_secure_aggregation_over_the_sockets_transport_gives_the_plain_model(cluster, tmp_path):
    """Virtual clients over TCP run the client's side of secure aggregation against the real server:
    the same model as the plain run, within the quantisation bound."""
    flags = [*LOGREG, "--num-clients", "6", "--num-rounds", "2", "--transport", "sockets"]
    for name, extra in (("plain", []), ("secure", ["--secure-aggregation"])):
        proc = simulate(cluster, *flags, *extra, output_dir=tmp_path / name)
        assert proc.finish(timeout=300) == 0, proc.output
        proc.wait_for(r"6 of 6 virtual clients finished; 12 client-rounds trained; server exit 0")
    plain, secure = (torch.load(tmp_path / name / "model.pt") for name in ("plain", "secure"))
    assert max(float((plain[k] - secure[k]).abs().max()) for k in plain) < 1e-5
    rows = read_metrics(tmp_path / "secure" / "metrics.csv")
    assert [r["clients"] for r in rows] == [6, 6]


@processes
def test_a_missing_ray_is_one_line(cluster, tmp_path):
    (tmp_path / "noray").mkdir()
    (tmp_path / "noray" / "ray.py").write_text("raise ImportError('No module named ray')\n")
    proc = simulate(cluster, *LOGREG, "--backend", "ray", output_dir=tmp_path / "sim",
                    env={"PYTHONPATH": f"{tmp_path / 'noray'}:{ROOT}"})
    assert proc.finish(timeout=120) == 2
    assert "fl_simulate.py: error: --backend ray needs Ray, an optional extra: pip install -e '.[ray]'" in proc.output
    assert "Traceback" not in proc.output


@pytest.mark.parametrize("args, message", [
    (["--workers", "2", "--backend", "ray"], "--workers applies to --backend inprocess and processes"),
    (["--client-gpus", "1"], "--ray-address, --client-cpus and --client-gpus apply to --backend ray"),
    (["--drop-rate", "1.5"], "--drop-rate: must be 0..1"),
    (["--transport", "sockets", "--drop-rate", "0.1"], "--drop-rate and --straggler-rate apply to --transport inprocess"),
    (["--transport", "sockets", "--virtual-clock"], "--virtual-clock and --virtual-examples-per-s apply to "
                                                    "--transport inprocess; over sockets, time is real"),
    (["--transport", "sockets", "--slow-share", "0.2", "--virtual-examples-per-s", "50"],
     "--virtual-clock and --virtual-examples-per-s apply to --transport inprocess"),
])
def test_simulation_flags_that_make_no_sense_are_one_line(tmp_path, args, message):
    code, output = run_cli("fl_simulate", [*LOGREG, *args, "--output-dir", str(tmp_path / "sim")])
    assert code == 2 and message in output and "Traceback" not in output, output


def test_a_virtual_clock_gives_the_same_run_on_one_worker_or_two_and_resumes_its_time(tmp_path, capsys):
    """fl_simulate.py with speed profiles and FedBuff: the updates reach the engine in virtual-time order, so
    two workers (whose real training ends in any order) give one worker's metrics, virtual times and model.
    A resumed run's clock goes on from its checkpoint's (its in-flight updates are lost, as in a real resume)."""
    flags = [*LOGREG, "--num-clients", "6", "--async-buffer", "2", "--slow-share", "0.34", "--speed-sigma", "0.5",
             "--max-staleness", "20", "--seed", "2", "--num-rounds", "6"]
    assert simulate_here(*flags, output_dir=tmp_path / "one") == 0
    output = capsys.readouterr().out
    assert re.search(r"round 6/6  clients 2/2  test acc \d+\.\d\d%  loss \d\.\d+  \d+\.\d s \(virtual \d+\.\d s\)  "
                     r"staleness ≤ \d+", output), output
    assert simulate_here(*flags, "--workers", "2", "--quiet", output_dir=tmp_path / "two") == 0
    one, two = read_metrics(tmp_path / "one" / "metrics.csv"), read_metrics(tmp_path / "two" / "metrics.csv")
    keys = ("round", "virtual_seconds", "staleness", "test_accuracy", "train_loss")
    assert [[r[k] for k in keys] for r in one] == [[r[k] for k in keys] for r in two]
    assert max(r["staleness"] for r in one) > 0 and one[-1]["virtual_seconds"] > one[0]["virtual_seconds"] > 0
    a, b = torch.load(tmp_path / "one" / "model.pt"), torch.load(tmp_path / "two" / "model.pt")
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert simulate_here(*flags, "--num-rounds", "3", "--quiet", output_dir=tmp_path / "parts") == 0
    assert simulate_here("--resume", str(tmp_path / "parts" / "checkpoint.fsck"), "--num-rounds", "5", "--quiet",
                         output_dir=tmp_path / "parts") == 0
    parts = read_metrics(tmp_path / "parts" / "metrics.csv")
    assert [r["virtual_seconds"] for r in parts[:3]] == [r["virtual_seconds"] for r in one[:3]]
    assert parts[2]["virtual_seconds"] < parts[3]["virtual_seconds"] < parts[4]["virtual_seconds"]


# ---- the speed profiles over sockets, in real time (fedsock/simulate_sockets.py)


def sockets_and_clock(*flags: str):
    """The same command line's config over sockets and on the virtual clock."""
    import fl_simulate

    common = [*LOGREG, "--num-clients", "10", "--seed", "7", *flags]
    sockets, _ = fl_simulate.parse_config([*common, "--transport", "sockets"])
    clocked, _ = fl_simulate.parse_config(common)
    return sockets, clocked


def test_over_sockets_the_same_clients_are_slow_as_on_the_virtual_clock():
    from fedsock.simulate import speed_profiles
    from fedsock.simulate_sockets import real_profiles

    sockets, clocked = sockets_and_clock("--slow-share", "0.3", "--slow-factor", "8")
    assert not sockets.virtual_clock and clocked.virtual_clock
    (real, availability), virtual = real_profiles(sockets), speed_profiles(clocked)
    ids = range(1, 11)
    assert availability is None and len(real.slow_clients) == 3 and real.slow_clients == virtual.slow_clients
    assert [real.real_slowdown(k) for k in ids] == [virtual.slowness(k) for k in ids]
    assert sorted({real.real_slowdown(k) for k in ids}) == [1.0, 8.0]


def test_over_sockets_lognormal_speeds_keep_the_clocks_ratios_with_the_fastest_at_real_speed():
    """Real training cannot be sped up: a slowness under 1 scales every client's up, the ratios stay."""
    from fedsock.simulate import speed_profiles
    from fedsock.simulate_sockets import real_profiles

    sockets, clocked = sockets_and_clock("--speed-sigma", "0.5", "--slow-share", "0.2")
    (real, _), virtual = real_profiles(sockets), speed_profiles(clocked)
    slowdowns, slowness = [real.real_slowdown(k) for k in range(1, 11)], [virtual.slowness(k) for k in range(1, 11)]
    assert min(slowness) < 1 and min(slowdowns) == pytest.approx(1.0)
    assert [a / b for a, b in zip(slowdowns, slowness)] == pytest.approx([1 / min(slowness)] * 10)


def fake_sessions_client(client_id: int, presence, refused_from: int | None = None):
    """A SocketClient whose sessions are faked: each waits until it is cancelled (the client goes away) or
    the server is gone, and is recorded in `spans` as (start, end) in seconds from the start of training,
    the end None for one that lasted to the end. From its session number `refused_from` on, each is
    refused a connection instead (the server's listener is closed)."""
    from fedsock.simulate_sockets import SocketClient

    class FakeSessions(SocketClient):
        async def session(self) -> None:
            loop, signals = asyncio.get_running_loop(), self.presence.signals
            start = loop.time() - ORIGIN_S
            if refused_from is not None and len(self.spans) + 1 >= refused_from:
                raise ConnectionRefusedError(111, "Connect call failed")
            try:
                await signals.over.wait()
            except asyncio.CancelledError:
                self.spans.append((start, loop.time() - ORIGIN_S))
                raise
            self.spans.append((start, None))

    client = FakeSessions(client_id, 0, None, None, 0, presence=presence)
    client.spans = []
    return client


ORIGIN_S = 5.0  # when training starts, in the test's virtual seconds: every client has joined by then


def test_over_sockets_a_client_is_connected_exactly_while_its_periods_say_it_is_here():
    """--availability over sockets, on a virtual clock so that the instants are exact: each client joins
    before training starts, leaves at the start of each period it is away in (at once, if it is away
    in the first) and comes back at the start of the next period it is here in."""
    from fedsock.simulate_sockets import Presence, ServerSignals
    from fedsock.virtual_time import Availability, run_virtual

    availability = Availability(seed=2, share=0.5, period_s=10.0)  # client 1: away, here, away, here, away, here

    async def federation():
        signals = ServerSignals(asyncio.get_running_loop())
        clients = [fake_sessions_client(k, Presence(availability, signals)) for k in range(1, 5)]
        runs = asyncio.gather(*(c.run() for c in clients))
        await asyncio.sleep(ORIGIN_S)  # virtual seconds: the scenario's timeline, nothing waits for real
        signals._start()
        await asyncio.sleep(55.0)  # 5.5 periods of training
        signals.over.set()
        await runs
        return clients

    clients = run_virtual(federation())
    for client in clients:
        expected, start, connected = [], -ORIGIN_S, True
        for period in range(6):
            here = availability.here(client.client_id, period)
            if connected and not here:
                expected.append((start, 10.0 * period))
            elif here and not connected:
                start = 10.0 * period
            connected = here
        if connected:
            expected.append((start, None))
        assert [(a, b) for a, b in client.spans] == [(pytest.approx(a), b if b is None else pytest.approx(b))
                                                     for a, b in expected], client.client_id
        assert client.departures == sum(b is not None for _, b in expected)
    assert clients[0].spans == [(-ORIGIN_S, 0.0), (10.0, 20.0), (30.0, 40.0), (50.0, None)]


@pytest.mark.parametrize("server_ends_at_s, fails", [(12.0, False), (100.0, True)])
def test_over_sockets_a_client_refused_as_it_comes_back_fails_unless_the_server_is_ending(server_ends_at_s, fails):
    """Client 1 (seed 2) is away in the first period and comes back at 10 s to a closed listener: as the
    server ends (its output ends at 12 s), that is no failure; long before it ends, it is."""
    from fedsock.simulate_sockets import Presence, ServerSignals
    from fedsock.virtual_time import Availability, run_virtual

    async def federation():
        signals = ServerSignals(asyncio.get_running_loop())
        client = fake_sessions_client(1, Presence(Availability(seed=2, share=0.5, period_s=10.0), signals),
                                      refused_from=2)
        runs = asyncio.ensure_future(client.run())
        await asyncio.sleep(ORIGIN_S)  # virtual seconds: the scenario's timeline
        signals._start()
        await asyncio.wait([runs], timeout=server_ends_at_s)
        signals.over.set()
        await asyncio.gather(runs, return_exceptions=True)
        return runs

    runs = run_virtual(federation())
    assert isinstance(runs.exception(), ConnectionRefusedError) if fails else runs.exception() is None


@processes
def test_over_sockets_the_slowed_clients_really_take_longer(cluster, tmp_path):
    """--slow-share over sockets: the slowed clients' training sleeps its extra for real, which the
    server's own round times show (a synchronous round lasts as long as its slowest fit)."""
    from fedsock.virtual_time import SpeedProfiles

    proc = simulate(cluster, *LOGREG, "--num-clients", "4", "--num-rounds", "2", "--transport", "sockets",
                    "--slow-share", "0.5", "--slow-factor", "6", output_dir=tmp_path / "sim")
    assert proc.finish(timeout=300) == 0, proc.output
    slowed = sorted(SpeedProfiles(0, 4, slow_share=0.5).slow_clients)  # seed 0, fl_simulate.py's default
    proc.wait_for(rf"time is real: clients {slowed[0]}, {slowed[1]} 6x slower")
    times = proc.wait_for(r"real seconds a fit took, training and sleep \(median\): slowed clients (\d+\.\d+) s "
                          r"\(4 fits\), the others (\d+\.\d+) s \(4 fits\)")
    slow_s, other_s = float(times.group(1)), float(times.group(2))
    assert slow_s > 3 * other_s
    rows = read_metrics(tmp_path / "sim" / "metrics.csv")
    assert [r["clients"] for r in rows] == [4, 4]
    for row in rows:  # the server's own clock: a round lasted as long as the slowed fit it reports
        assert row["seconds"] >= row["max_fit_seconds"] >= slow_s / 2
    assert "Traceback" not in proc.output


@processes
def test_over_sockets_an_away_client_closes_its_connection_and_rejoins(cluster, tmp_path):
    """--availability over sockets with FedBuff: with seed 2, clients 1 and 3 are away in the first
    2-second period (they leave as training starts) and here in the second, when they reconnect as
    the same ids. The run has versions enough to outlast that on any machine; once both are back and
    versions are being made, Ctrl-C ends it as a user would (no wait on the clock's speed)."""
    proc = simulate(cluster, *LOGREG, "--num-clients", "4", "--num-rounds", "100000", "--transport", "sockets",
                    "--async-buffer", "2", "--max-staleness", "50", "--availability", "0.5",
                    "--availability-period", "2", "--seed", "2", output_dir=tmp_path / "sim")
    proc.wait_for(r"\[server\] WARNING: client [13] in round 1 \(connection closed\)", timeout=120)  # away at once
    for client_id in (1, 3):
        proc.wait_for(rf"\[server\] client {client_id} joined from 127\.0\.0\.1:\d+ \(rejoined\)", timeout=120)
    proc.wait_for(r"\[server\] round \d+/100000  clients 2/2", timeout=120)
    proc.signal(signal.SIGINT)
    assert proc.finish(timeout=120) == 130, proc.output
    assert read_metrics(tmp_path / "sim" / "metrics.csv"), "no version was made"
    assert "Traceback" not in proc.output
