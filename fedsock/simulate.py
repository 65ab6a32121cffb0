"""Many virtual clients, trained for real, on the server's own round engine.

    python fl_simulate.py --num-clients 100 --fraction-fit 0.1 --num-rounds 20 --model cnn

A virtual client is a `ClientProxy` (fedsock/clients.py) that holds an id and the
indices of its examples, nothing more: the training set is loaded once, normalised once
and shared read-only, and only the clients picked for a round train, on a model that a
worker keeps for whoever it trains next. So N can be far larger than the live models
memory could hold. The rounds are `fedsock.engine.RoundEngine`'s: the same sampling,
strategies, retries and timeouts, the same console lines, metrics.csv, plot, model and
checkpoint as a real federation, and, for the same seed and settings, the same numbers
(each virtual client trains exactly as fl_client.py would on the same share).

Where the clients train (--backend):
- `inprocess`: in this process, one after another (--workers 1) or on a few threads.
- `processes`: a pool of --workers processes on this machine; the data is in shared memory.
- `ray`: Ray tasks, placed by Ray's scheduler with --client-cpus/--client-gpus each, on this
  machine or a cluster (--ray-address). Ray is an optional extra: pip install -e '.[ray]'.

`--transport sockets` instead starts a real fl_server.py and runs the virtual clients
against it over TCP with the normal protocol (their training still on the backend):
fedsock/simulate_sockets.py. The command line is fl_simulate.py's.

`--virtual-clock` (or any speed profile: --speed-sigma, --slow-share, --availability) makes time
virtual: each fit takes its client's profile's time, in a discrete-event simulation that the event
loop runs (fedsock/virtual_time.py); the clients still train for real. Over --transport sockets the
same profiles apply in real time instead (fedsock/simulate_sockets.py).
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

import client_helper
import neural_net_helper as nnh
from fedsock import config as settings
from fedsock.attack import UpdateRecorder
from fedsock.clients import ClientPool, Dropped, FitIns, FitRes, UnconnectedProxy
from fedsock.compression import compress_update, decoded_update, scratch_for
from fedsock.identity import Identity, enrolled_identities
from fedsock.secagg import MASKED, ClientSession
from fedsock.config import ServerConfig, setting
from fedsock.console import UsageError
from fedsock.buffered import engine_class
from fedsock.events import Console, Events
from fedsock.prepare import compression_of, output_observers, run_title
from fedsock.run_control import stop_on_signals
from fedsock.run_files import RunFiles
from fedsock.transport import Traffic
from fedsock.virtual_time import Availability, SpeedProfiles, held, run_virtual, sleep_until
from socket_methods import decode_weights, encode_weights

WHO = "simulation"
SIMULATION = "simulation"
VIRTUAL_CLOCK = "virtual clock (fedsock/virtual_time.py)"
PROFILE_FLAGS = ("virtual_examples_per_s", "speed_sigma", "slow_share", "slow_factor", "availability",
                 "availability_period_s")  # each turns the clock on


@dataclass
class SimulationConfig(ServerConfig):
    """A server's settings, and where and how its virtual clients run."""

    backend: str = setting("inprocess", "where the virtual clients train: inprocess, processes (a pool on this "
                                        "machine) or ray (a Ray cluster)", group=SIMULATION,
                           choices=("inprocess", "processes", "ray"))
    workers: int = setting(1, "clients training at once: threads (inprocess) or processes (processes)",
                           group=SIMULATION, type=settings.positive_int, metavar="W")
    ray_address: str | None = setting(None, "the Ray cluster to use (default: start one on this machine)",
                                      group=SIMULATION, metavar="ADDRESS")
    client_cpus: float = setting(1.0, "ray: the CPUs each virtual client's task asks Ray for", group=SIMULATION,
                                 type=settings.positive_float, metavar="CPUS")
    client_gpus: float = setting(0.0, "ray: the GPUs each virtual client's task asks Ray for (a fraction shares "
                                      "one)", group=SIMULATION, type=settings.non_negative_float, metavar="GPUS")
    transport: str = setting("inprocess", "inprocess (fast), or sockets: a real fl_server.py over TCP, "
                                          "the clients speaking the protocol", group=SIMULATION,
                             choices=("inprocess", "sockets"))
    drop_rate: float = setting(0.0, "the chance that a picked client fails in a round (a simulated crash)",
                               group=SIMULATION, type=settings.number(float, 0, 1), metavar="P")
    straggler_rate: float = setting(0.0, "the chance that a picked client is slow in a round", group=SIMULATION,
                                    type=settings.number(float, 0, 1), metavar="P")
    straggler_delay_s: float = setting(10.0, "how much later a straggler's update comes", group=SIMULATION,
                                       flag="--straggler-delay", type=settings.non_negative_float)
    virtual_clock: bool = setting(False, "time is virtual: each fit takes its client's profile's time (below), "
                                         "the clients still train for real, and every timeout is in virtual "
                                         "seconds (on with any of the profile flags)", group=VIRTUAL_CLOCK)
    virtual_examples_per_s: float = setting(100.0, "a client of speed 1 trains this many examples per virtual "
                                                   "second", group=VIRTUAL_CLOCK, type=settings.positive_float,
                                            metavar="RATE")
    speed_sigma: float = setting(0.0, "each client's slowness is lognormal(0, S), drawn from (seed, client id)",
                                 group=VIRTUAL_CLOCK, type=settings.non_negative_float, metavar="S")
    slow_share: float = setting(0.0, "a share P of the clients (exactly round(P·N), drawn from the seed) are "
                                     "--slow-factor times slower", group=VIRTUAL_CLOCK,
                                type=settings.number(float, 0, 1), metavar="P")
    slow_factor: float = setting(10.0, "how many times slower the --slow-share clients are", group=VIRTUAL_CLOCK,
                                 type=settings.positive_float, metavar="F")
    availability: float = setting(1.0, "each client is here in a virtual period with probability P, drawn from "
                                       "(seed, client id, period); a fit its going away cuts short is lost",
                                  group=VIRTUAL_CLOCK, type=settings.number(float, 0, 1), metavar="P")
    availability_period_s: float = setting(600.0, "the virtual periods of --availability (real seconds over "
                                                  "--transport sockets)", group=VIRTUAL_CLOCK,
                                           flag="--availability-period", type=settings.positive_float)


# Server settings a simulation has no use for (no listening socket of its own, no TLS, no lobby).
NOT_SIMULATED = {"host", "server_port", "time_to_wait_s", "handshake_timeout_s", "heartbeat_s", "max_message_mb",
                 "stall_timeout_s",
                 "max_pending", "tls_cert", "tls_key", "tls_client_ca", "auth_token_file", "auth_tokens_file",
                 "dashboard", "start", "stay"}


# --------------------------------------------------------------------------- the data, once


class SharedData:
    """The training split as normalised tensors, made once and only read after, and each virtual
    client's examples as index arrays: its share of the partition, split into its training part
    and its held-out 10% exactly as fl_client.py splits it."""

    def __init__(self, train: client_helper.Split, info: client_helper.DatasetInfo, partitions: list[np.ndarray],
                 seed: int):
        self.info = info
        self.x, self.y = nnh.to_tensors(train.images, train.labels, info, torch.device("cpu"))
        self.shares: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for client_id, part in enumerate(partitions, start=1):
            self.set_share(client_id, part, seed)

    def set_share(self, client_id: int, indices: np.ndarray, seed: int) -> None:
        self.shares[client_id] = client_helper.split_local(indices, seed, client_id)

    def share_memory(self) -> None:
        self.x.share_memory_()
        self.y.share_memory_()

    def num_examples(self, client_id: int) -> int:
        return len(self.shares[client_id][0])

    def local(self, client_id: int, device: torch.device) -> nnh.LocalData:
        return self.rows(self.shares[client_id], device)

    def rows(self, share: tuple[np.ndarray, np.ndarray], device: torch.device) -> nnh.LocalData:
        """A client's examples (its training part, its held-out part), gathered from the shared tensors."""
        mine, held_out = (torch.from_numpy(np.ascontiguousarray(i)) for i in share)
        return nnh.LocalData(self.x[mine].to(device), self.y[mine].to(device),
                             self.x[held_out].to(device), self.y[held_out].to(device))


def train_one(model: torch.nn.Module, data: nnh.LocalData, weights: dict, settings_: dict, seed: int, client_id: int,
              number: int) -> dict[str, float]:
    """A virtual client's round: what a real client's LocalTrainer.fit does (fedsock/local_training.py), with the same seed."""
    return nnh.local_round(model, data, weights, epochs=settings_["local_epochs"], batch_size=settings_["batch_size"],
                           lr=settings_["lr"], proximal_mu=settings_["proximal_mu"],
                           augment=settings_.get("augment", "none"), dp_clip=settings_.get("dp_clip"),
                           dp_noise_std=settings_.get("dp_noise_std", 0.0),
                           seed=hash((seed, client_id, number)) & 0x7FFFFFFF)


# --------------------------------------------------------------------------- backends


class InProcessBackend:
    """Virtual clients train in this process, on --workers threads, each with a model of its own."""

    name = "inprocess"

    def __init__(self, data: SharedData, model_name: str, seed: int, workers: int, device: torch.device):
        self.data, self.model_name, self.seed, self.device = data, model_name, seed, device
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="virtual-client")
        self.local = threading.local()

    async def fit(self, client_id: int, ins: FitIns) -> tuple[dict, dict[str, float]]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self._fit, client_id, ins.round, ins.model.tensors, ins.settings)

    def _fit(self, client_id: int, number: int, weights: dict, settings_: dict) -> tuple[dict, dict[str, float]]:
        model = getattr(self.local, "model", None)
        if model is None:
            model = self.local.model = nnh.build_model(self.model_name, self.data.info, self.seed).to(self.device)
            nnh.warm_up(model, self.data.x[:32].to(self.device), self.data.y[:32].to(self.device))
        metrics = train_one(model, self.data.local(client_id, self.device), weights, settings_, self.seed,
                            client_id, number)
        return {name: t.detach().cpu().clone() for name, t in model.state_dict().items()}, metrics

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


_WORKER: dict[str, Any] = {}  # a pool worker's data and model, set up once per process


def _worker_start(data: SharedData, model_name: str, seed: int, threads: int) -> None:
    torch.set_num_threads(max(threads, 1))
    model = nnh.build_model(model_name, data.info, seed)
    nnh.warm_up(model, data.x[:32], data.y[:32])
    _WORKER.update(data=data, seed=seed, model=model)


def _worker_ready() -> bool:
    return bool(_WORKER)


def _worker_fit(client_id: int, share: tuple, number: int, layout: dict, blob: bytearray, settings_: dict):
    weights = decode_weights(layout, blob)
    model = _WORKER["model"]
    metrics = train_one(model, _WORKER["data"].rows(share, torch.device("cpu")), weights, settings_,
                        _WORKER["seed"], client_id, number)
    out_layout, out_blob = encode_weights(nnh.get_weights(model))
    return out_layout, out_blob, metrics


class ProcessBackend:
    """Virtual clients train in a pool of --workers processes; the training set is shared with them
    through shared memory (it is not copied), the global model is sent with each task."""

    name = "processes"

    def __init__(self, data: SharedData, model_name: str, seed: int, workers: int, threads: int):
        import torch.multiprocessing as mp  # registers the reductions that share tensors' memory

        data.share_memory()
        self.data = data
        self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                        initializer=_worker_start, initargs=(data, model_name, seed, threads))
        for started in [self.pool.submit(_worker_ready) for _ in range(workers)]:  # start them all before round 1
            started.result()

    async def fit(self, client_id: int, ins: FitIns) -> tuple[dict, dict[str, float]]:
        loop = asyncio.get_running_loop()
        layout, blob, metrics = await loop.run_in_executor(
            self.pool, _worker_fit, client_id, self.data.shares[client_id], ins.round, ins.model.layout, ins.model.blob,
            ins.settings)
        return decode_weights(layout, blob), metrics

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


_RAY_MODELS: dict[tuple, torch.nn.Module] = {}  # a Ray worker process keeps the models it built


def _ray_fit(x: np.ndarray, y: np.ndarray, shares: tuple, info: client_helper.DatasetInfo, model_name: str,
             seed: int, client_id: int, number: int, layout: dict, blob: bytearray, settings_: dict, use_gpu: bool):
    device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
    key = (model_name, info.name, seed, device.type)
    if key not in _RAY_MODELS:
        torch.set_num_threads(1)
        _RAY_MODELS[key] = nnh.build_model(model_name, info, seed).to(device)
    model = _RAY_MODELS[key]
    mine, held_out = (torch.from_numpy(np.ascontiguousarray(i)) for i in shares)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)  # read-only views of Ray's object store
    data = nnh.LocalData(xs[mine].to(device), ys[mine].to(device), xs[held_out].to(device), ys[held_out].to(device))
    metrics = train_one(model, data, decode_weights(layout, blob), settings_, seed, client_id, number)
    out_layout, out_blob = encode_weights(nnh.get_weights(model))
    return out_layout, out_blob, metrics


class RayBackend:
    """Virtual clients train as Ray tasks, each asking for --client-cpus and --client-gpus; the training
    set is put in Ray's object store once, and every task reads it from there."""

    name = "ray"

    def __init__(self, data: SharedData, model_name: str, seed: int, address: str | None, cpus: float, gpus: float):
        try:
            import ray
        except ImportError:
            raise UsageError("--backend ray needs Ray, an optional extra: pip install -e '.[ray]'") from None
        import warnings

        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        self.ray = ray
        ray.init(address=address, ignore_reinit_error=True, include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR")
        self.data, self.model_name, self.seed = data, model_name, seed
        self.x, self.y = ray.put(data.x.numpy()), ray.put(data.y.numpy())
        self.task = ray.remote(_ray_fit).options(num_cpus=cpus, num_gpus=gpus)
        self.use_gpu = gpus > 0

    async def fit(self, client_id: int, ins: FitIns) -> tuple[dict, dict[str, float]]:
        reference = self.task.remote(self.x, self.y, self.data.shares[client_id], self.data.info, self.model_name,
                                     self.seed, client_id, ins.round, ins.model.layout, ins.model.blob, ins.settings,
                                     self.use_gpu)
        layout, blob, metrics = await reference
        return decode_weights(layout, blob), metrics

    def close(self) -> None:
        self.ray.shutdown()


# --------------------------------------------------------------------------- virtual clients


class Faults:
    """Which picked clients fail or straggle in a round: drawn from (seed, round, client id), so the
    same run meets the same faults on any backend."""

    def __init__(self, seed: int, drop_rate: float, straggler_rate: float, straggler_delay_s: float):
        self.seed, self.drop_rate, self.straggler_rate, self.delay_s = seed, drop_rate, straggler_rate, straggler_delay_s

    def fate(self, client_id: int, number: int) -> tuple[bool, float]:
        """(drops, seconds of delay) for this client in this round."""
        if not (self.drop_rate or self.straggler_rate):
            return False, 0.0
        draw_drop, draw_slow = np.random.default_rng([self.seed, number, client_id, 0xFA]).random(2)
        return bool(draw_drop < self.drop_rate), self.delay_s if draw_slow < self.straggler_rate else 0.0


class VirtualClient(UnconnectedProxy):
    """A ClientProxy that trains on the backend: an id and a count; its data stays in SharedData."""

    def __init__(self, client_id: int, num_examples: int, backend, faults: Faults, codec: "UpdateCodec | None" = None,
                 secure_length: int | None = None, identity: Identity | None = None,
                 speeds: SpeedProfiles | None = None, availability: Availability | None = None):
        self.client_id, self.num_examples, self.backend, self.faults = client_id, num_examples, backend, faults
        self.codec = codec
        # on a virtual clock: how long its fits take, and when it is here
        self.speeds, self.availability = speeds, availability
        # secure aggregation: this client's side of it, exactly as fl_client.py runs it
        self.session = ClientSession(client_id, secure_length, identity) if secure_length is not None else None
        self.residual: dict[str, torch.Tensor] = {}  # topk's error feedback, as a real client keeps it

    async def fit(self, ins: FitIns) -> FitRes:
        drops, delay_s = self.faults.fate(self.client_id, ins.round)
        if drops:
            raise Dropped("a simulated crash (--drop-rate)")
        if self.speeds is None:
            if delay_s:
                await asyncio.sleep(delay_s)  # a simulated straggler: its update really comes this much later
            return await self.train(ins)
        # On the virtual clock: train for real (virtual time stands still meanwhile), then wait for the
        # virtual instant this fit ends, so that the engine sees it in virtual-time order.
        start_s = asyncio.get_running_loop().time()
        finish_s = start_s + delay_s + self.speeds.fit_seconds(self.client_id, self.num_examples,
                                                               ins.settings["local_epochs"])
        leaves_s = self.availability.leaves_at(self.client_id, start_s, finish_s) if self.availability else None
        if leaves_s is not None:  # it goes away first: its fit is lost, so it need not train
            await sleep_until(leaves_s, self.client_id)
            raise Dropped("went away (--availability)")
        result = await self.train(ins)
        await sleep_until(finish_s, self.client_id)
        return result

    async def train(self, ins: FitIns) -> FitRes:
        tensors, metrics = await held(self.backend.fit(self.client_id, ins))
        if self.codec is not None:
            tensors = self.codec.round_trip(ins.model, tensors, self.client_id, ins.round, self.residual)
        if self.session is not None:
            masked = self.session.masked_update(ins.round, ins.model.tensors, tensors, self.num_examples)
            tensors = {MASKED: torch.from_numpy(masked)}
        return FitRes(self.client_id, ins.round, self.num_examples, tensors, metrics)

    async def secagg(self, header: str, fields: dict, reply: str | None) -> dict | None:
        answer = self.session.answer({"header": header, **fields})
        return None if answer is None else {"header": answer[0], **answer[1]}


class UpdateCodec:
    """--compression in a simulation: each update is compressed as fl_client.py would send it and
    decoded as the server would, so that accuracy pays exactly what the wire would cost."""

    def __init__(self, compression, template: Mapping[str, torch.Tensor], seed: int):
        self.compression, self.seed = compression, seed
        self.scratch = scratch_for(template)

    def round_trip(self, model, tensors, client_id: int, number: int, residual: dict) -> Mapping[str, torch.Tensor]:
        rounding = torch.Generator().manual_seed(hash((self.seed, client_id, number, 8)) & 0x7FFFFFFF)
        sent, params = compress_update(model.tensors, tensors, self.compression, residual, rounding)
        return decoded_update(self.compression, sent, params or None, model.tensors, self.scratch, model.layout)


def make_backend(config: SimulationConfig, data: SharedData):
    if config.backend == "processes":
        return ProcessBackend(data, config.model, config.seed, config.workers, config.threads)
    if config.backend == "ray":
        return RayBackend(data, config.model, config.seed, config.ray_address, config.client_cpus, config.client_gpus)
    return InProcessBackend(data, config.model, config.seed, config.workers, nnh.choose_device(config.device))


def speed_profiles(config: SimulationConfig) -> SpeedProfiles | None:
    """The clients' speeds on a virtual clock; None without one."""
    if not config.virtual_clock:
        return None
    return SpeedProfiles(config.seed, config.num_clients, config.virtual_examples_per_s, config.speed_sigma,
                         config.slow_share, config.slow_factor)


def availability_of(config: SimulationConfig) -> Availability | None:
    if not config.virtual_clock or config.availability >= 1:
        return None
    return Availability(config.seed, config.availability, config.availability_period_s)


async def come_and_go(pool: ClientPool, clients: list[VirtualClient], availability: Availability) -> None:
    """--availability: at the start of each virtual period, the clients away in it leave the pool and those
    here (re)join it. Runs until the simulation ends."""
    period = availability.period(asyncio.get_running_loop().time())
    while True:
        for client in clients:
            if availability.here(client.client_id, period) and client.client_id not in pool.members:
                pool.joined(client)
                pool.add(client)
            elif not availability.here(client.client_id, period) and client.client_id in pool.members:
                pool.remove(client.client_id)
        period += 1
        await sleep_until(period * availability.period_s, 0)


def run_simulation(config: SimulationConfig, setup, data: SharedData, backend, output_dir: Path) -> int:
    """The simulation, on a virtual clock (which a resumed run's continues from) or in real time."""
    if not config.virtual_clock:
        return asyncio.run(simulate(config, setup, data, backend, output_dir))
    last = setup.checkpoint.metrics[-1] if setup.checkpoint and setup.checkpoint.metrics else {}
    return run_virtual(simulate(config, setup, data, backend, output_dir), last.get("virtual_seconds") or 0.0)


async def simulate(config: SimulationConfig, setup, data: SharedData, backend, output_dir: Path) -> int:
    files = RunFiles(output_dir, run_title(config, "fedsock simulation"), setup.checkpoint, setup.protections,
                     positive=setup.task.positive if setup.task else None)
    outputs = output_observers(config, setup, output_dir, WHO)
    events = Events([Console(config.quiet, WHO), files, *outputs])
    pool = ClientPool(config.num_clients)
    faults = Faults(config.seed, config.drop_rate, config.straggler_rate, config.straggler_delay_s)
    codec = None
    if config.compression != "none":
        codec = UpdateCodec(compression_of(config), setup.model.tensors, config.seed)
    ids = range(1, config.num_clients + 1)
    identities = enrolled_identities(config.federation, ids) if setup.secure and config.federation else {}
    speeds, availability = speed_profiles(config), availability_of(config)
    clients = [VirtualClient(client_id, data.num_examples(client_id), backend, faults, codec,
                             setup.secure.length if setup.secure is not None else None, identities.get(client_id),
                             speeds, availability) for client_id in ids]
    comings = None
    if availability is None:
        for client in clients:
            pool.joined(client)
            pool.add(client)
    else:  # those here in the first period join at once; then each period's come and go
        config = replace(config, time_to_wait_s=0.0)  # nobody else is coming: start with those here
        comings = asyncio.ensure_future(come_and_go(pool, clients, availability))
    recorder = UpdateRecorder(config.record_updates, config, setup.task, events) if config.record_updates else None
    engine = engine_class(config)(config, setup.strategy, pool, setup.model, setup.evaluate, events, Traffic(),
                                  setup.checkpoint, setup.secure, output_dir=str(output_dir), recorder=recorder)
    stop_on_signals(engine.control, WHO)
    try:
        return await engine.run()
    finally:
        if comings is not None:
            comings.cancel()
        files.close()
        for observer in outputs:
            observer.close()
