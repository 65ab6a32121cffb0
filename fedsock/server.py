"""The server's process around the round engine: TLS and tokens, the listening socket, the
lobby that admits clients, the observers (console, run files, dashboard) and the signals.

`run_server` is everything `fl_server.py` does after parsing its flags:

    prepare (fedsock/prepare.py)  ->  listen  ->  Lobby (fedsock/lobby.py) admits clients
    ->  RoundEngine.run (fedsock/engine.py)  ->  the clients are told <FINISHED>
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import resource
import socket
from pathlib import Path
from typing import Any

from fedsock import compression, resume_guard, secagg, security
from fedsock.attack import UpdateRecorder
from fedsock.clients import ClientPool
from fedsock.config import ServerConfig
from fedsock.console import UsageError, say, warn
from fedsock.buffered import engine_class
from fedsock.engine import RoundEngine
from fedsock.events import Console, Events, Listening
from fedsock.lobby import PROGRESS_EVERY_S, RECEIVE_BUFFERS, Lobby, ReceiveBuffers
from fedsock.prepare import (WHO, Setup, compression_of, federated_evaluation, make_output_dir, output_observers,
                             prepare_training, required_features, run_title)
from fedsock.run_control import stop_on_signals
from fedsock.run_files import Checkpoint, RunFiles, save_config, seal_key
from fedsock.transport import Traffic
from socket_methods import encode_bitmap


def run_server(config: ServerConfig, checkpoint: Checkpoint | None) -> int:
    """Prepare, listen, train; the exit status."""
    raise_file_limit()
    setup = prepare(config, checkpoint)
    if checkpoint is not None:
        say(WHO, f"resuming from {config.resume}: round {checkpoint.round} of {config.num_rounds} was the last completed")
        if checkpoint.round >= config.num_rounds:
            raise UsageError(f"the checkpoint already has all {config.num_rounds} rounds; raise --num-rounds to go on")
    listener = open_listener(config.host, config.server_port)  # a port in use fails before any file is made
    try:
        output_dir = make_output_dir(config.output_dir)
        save_config(config, output_dir)
    except BaseException:
        listener.close()
        raise
    return asyncio.run(serve(config, setup, listener, output_dir))


class Welcome:
    """What a joining client is told (<METADATA>), and how many examples it may claim."""

    def __init__(self, config: ServerConfig, setup: Setup, engine: RoundEngine):
        self.config, self.setup, self.engine = config, setup, engine

    @property
    def num_rounds(self) -> int:  # the dashboard may change it before the start, and each new session
        return self.config.num_rounds

    def next_round(self, client_id: int) -> int:
        return self.engine.next_round(client_id)

    def round_now(self) -> int:
        """The round under way, or the next one between rounds (what a refused latecomer is told)."""
        return self.engine.rounds_done + 1

    def max_examples(self, client_id: int) -> int:
        if not self.setup.partitions:  # own data: the server knows nothing of it but this bound
            return self.config.max_client_examples
        return len(self.setup.partitions[client_id - 1])

    def fields(self, client_id: int) -> dict[str, Any]:
        c, own = self.config, not self.setup.partitions
        return dict(
            client_id=client_id, num_clients=c.num_clients, dataset="" if own else c.dataset,
            partition="own" if own else c.partition, alpha=c.alpha, seed=c.seed, model=c.model,
            num_rounds=c.num_rounds, round_timeout_s=c.round_timeout_s, heartbeat_s=c.heartbeat_s,
            next_round=self.next_round(client_id), train_size=self.setup.train_size,
            partition_bitmap=None if own else encode_bitmap(self.setup.partitions[client_id - 1], self.setup.train_size),
            task=self.setup.task.to_json(), federated_evaluation=federated_evaluation(c),
            required_features=required_features(c), compression=compression_of(c).to_json(),
            secure_aggregation=c.secure_aggregation, identities=c.secure_aggregation and c.federation is not None,
            **self.privacy_fields(),
            # only a dashboard shows the clients' progress: without one, they need not send it
            **({"progress_every_s": PROGRESS_EVERY_S} if c.dashboard else {}),
        )

    def privacy_fields(self) -> dict[str, Any]:
        """What a client's policy checks at the welcome: where the DP noise goes, and how much."""
        privacy = self.setup.strategy.privacy
        if privacy is None:
            return {"dp_mode": "none", "dp_noise_multiplier": 0.0}
        return {"dp_mode": privacy.settings.mode, "dp_noise_multiplier": privacy.settings.noise_multiplier}


def prepare(config: ServerConfig, checkpoint: Checkpoint | None) -> Setup:
    """The server's setup: TLS and tokens, then what every run needs (prepare_training)."""
    tls = security.server_tls_context(config.tls_cert, config.tls_key, config.tls_client_ca)
    if config.auth_token_file and config.auth_tokens_file:
        raise UsageError("use --auth-token-file or --auth-tokens-file, not both")
    per_client = security.read_client_secrets(config.auth_tokens_file, WHO) if config.auth_tokens_file else None
    shared = None if per_client else security.load_token(config.auth_token_file, WHO)
    auth = "per-client" if per_client is not None else "shared" if shared is not None else "none"
    protections = resume_guard.Protections.of_run(config, tls is not None, auth)
    secrets = resume_guard.run_secrets(config.tls_key, shared, per_client)
    if checkpoint is not None:
        resume_guard.check_resume(checkpoint, protections, secrets, config.resume, config.allow_weaker_resume, WHO)
        say_unprotected(checkpoint, protections)
    setup = prepare_training(config, checkpoint)
    setup.tls, setup.auth = tls, security.Authenticator(shared, per_client)
    setup.protections, setup.seal_key = protections.to_json(), seal_key(secrets)
    return setup


def say_unprotected(checkpoint: Checkpoint, now: resume_guard.Protections) -> None:
    """An unsealed checkpoint's record of "no protections" may be an edit by whoever could write it:
    the operator who expected them reads, at start, what this run goes without."""
    missing = resume_guard.unprotected(now)
    if checkpoint.seal is None and missing:
        say(WHO, f"resuming from an unsealed checkpoint without {', '.join(missing)}: if its run had them, the "
                 f"file was edited (stop, and resume with their flags)")


def open_listener(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UsageError(f"--host {host}: {exc.strerror}") from exc
    family, _, _, _, address = infos[0]
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(address)
        listener.listen(1024)
    except OSError as exc:
        listener.close()
        if exc.errno == errno.EADDRINUSE:
            raise UsageError(f"port {port} on {host} is already in use (another server?); pick another --server-port") from exc
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    listener.setblocking(False)
    return listener


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def raise_file_limit() -> None:
    """A thousand clients need a thousand file descriptors; many systems start at 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def update_layout(config: ServerConfig, setup: Setup) -> dict[str, Any]:
    """The layout every update must have: the model's, compressed, or one masked vector."""
    if setup.secure is not None:
        return secagg.masked_layout(setup.secure.length)
    return compression.update_layout(setup.model.layout, config.compression, config.topk_fraction)


async def serve(config: ServerConfig, setup: Setup, listener: socket.socket, output_dir: Path) -> int:
    host, port = listener.getsockname()[:2]
    title = run_title(config)
    files = RunFiles(output_dir, title, setup.checkpoint, setup.protections, setup.seal_key,
                     setup.task.positive if setup.task else None)
    outputs = output_observers(config, setup, output_dir)
    events = Events([Console(config.quiet), files, *outputs])
    pool, traffic = ClientPool(config.num_clients), Traffic()
    recorder = UpdateRecorder(config.record_updates, config, setup.task, events) if config.record_updates else None
    engine = engine_class(config)(config, setup.strategy, pool, setup.model, setup.evaluate, events, traffic,
                                  setup.checkpoint, setup.secure, setup.task, federated_evaluation(config),
                                  str(output_dir), recorder)
    lobby = Lobby(
        listener=listener, pool=pool, events=events, traffic=traffic, tls=setup.tls, auth=setup.auth,
        welcome=Welcome(config, setup, engine),
        buffers=ReceiveBuffers(update_layout(config, setup), min(RECEIVE_BUFFERS, config.num_clients), output_dir),
        status=lambda: engine.control.status(engine.current), handshake_timeout_s=config.handshake_timeout_s, round_timeout_s=config.round_timeout_s,
        heartbeat_s=config.heartbeat_s, max_pending=config.max_pending,
        require_client_cert=bool(config.tls_client_ca), required_features=required_features(config),
        compression=compression_of(config), stall_timeout_s=config.stall_timeout_s,
    )
    loop = asyncio.get_running_loop()
    stop_on_signals(engine.control, WHO)
    loop.set_exception_handler(
        lambda _, context: warn(WHO, f"internal: {context.get('message')} {context.get('exception') or ''}"))
    transport = "TLS" + (" with client certificates" if config.tls_client_ca else "") if setup.tls else "plain TCP"
    auth = "token authentication" if setup.auth.required else "no authentication"
    if not is_loopback(config.host) and not (setup.tls and setup.auth.required):
        warn(WHO, f"listening on {config.host} without TLS and a token: anyone who can reach this port can join and read the model")
    dashboard = await open_dashboard(config, engine, events, title) if config.dashboard else None
    events.emit(Listening(f"{host}:{port}", transport, auth, str(output_dir)))
    if dashboard is not None:
        say(WHO, f"dashboard: {dashboard.access.link}")  # the one place its token is shown: not an event, not in a file
    lobby.start()
    try:
        return await engine.run()
    finally:
        lobby.close()
        files.close()
        for observer in outputs:
            observer.close()
        if dashboard is not None:
            await dashboard.close()


async def open_dashboard(config: ServerConfig, engine: RoundEngine, events: Events, title: str):
    """--dashboard: the page, in this event loop; it observes the run's events like the console."""
    from fedsock.dashboard import Dashboard, parse_address

    host, port = parse_address(config.dashboard)
    loopback = is_loopback(host)
    dashboard = Dashboard(host, port, engine, title, loopback)
    try:
        await dashboard.start()
    except OSError as exc:
        await dashboard.close()
        if exc.errno == errno.EADDRINUSE:
            raise UsageError(f"--dashboard {config.dashboard}: port {port} is already in use; pick another") from exc
        raise UsageError(f"--dashboard {config.dashboard}: cannot listen: {exc.strerror or exc}") from exc
    if not loopback:
        message = (f"the dashboard listens on {host} over plain HTTP: its token and downloads cross the network "
                   f"unencrypted; on an untrusted network keep it on 127.0.0.1 and use ssh -L")
        if host in ("0.0.0.0", "::"):
            names = ", ".join(sorted(name for name in dashboard.access.names if name not in ("localhost", host)))
            message += f"; from another machine, open its link with this machine's address or name ({names})"
        warn(WHO, message)
    events.observers.append(dashboard)
    return dashboard
