"""When a run trains: the lobby before the first round, sessions (--stay), and stopping.

The round engine (fedsock/engine.py) asks `RunControl` whether and when to train; the
dashboard, SIGUSR1 and the signals ask it for a start, more rounds or a stop. It owns
the run's phase:

    lobby -> training -> (between sessions -> training)* -> finished

and never touches a socket: it knows the clients as the pool's members.
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any, Callable

from fedsock import config as settings
from fedsock.clients import ClientPool, Stopped, wait_any
from fedsock.config import ServerConfig
from fedsock.console import say
from fedsock.events import Events, SessionFinished, SettingsChanged, TrainingStarted


class RunControl:
    """The run's phase and the requests that move it: launch (--start manual), more rounds
    (--stay), stop (SIGINT, SIGTERM, the dashboard's Stop)."""

    def __init__(self, config: ServerConfig, pool: ClientPool, events: Events, needed: int,
                 rounds_done: Callable[[], int], resumed_rows: list[dict[str, Any]] | None = None):
        self.config, self.pool, self.events, self.needed = config, pool, events, needed
        self.rounds_done = rounds_done  # the engine's count, read when a request needs it
        self.phase = "lobby"
        self.stopping = asyncio.Event()
        self.stop_reason = ""
        self.launch = asyncio.Event()  # --start manual: Start pressed (or SIGUSR1)
        self.more = asyncio.Event()  # --stay: another session asked for
        self.more_rounds = 0
        self.session = 1
        self.session_start = rounds_done()  # the rounds done when this session began
        # metrics.csv's `session` counts the run's sessions across its processes: a resume begins a new one
        # (rows from before the column existed count as session 1).
        self.sessions_before = max((int(r.get("session") or 1) for r in resumed_rows), default=1) \
            if resumed_rows else 0

    def session_columns(self) -> dict[str, int | None]:
        """A round's `session` and `resumed` (1 for every round of a session that a --resume began) columns."""
        resumed = self.sessions_before > 0 and self.session == 1
        return {"session": self.sessions_before + self.session, "resumed": 1 if resumed else None}

    def request_stop(self, reason: str) -> None:
        """Ask the run to end after what it is doing now."""
        self.stop_reason = reason
        self.stopping.set()

    def waiting_for_launch(self) -> bool:
        return self.phase == "lobby" and self.config.start == "manual" and not self.launch.is_set()

    def request_launch(self, changes: dict[str, Any] | None = None) -> str:
        """Start training now (--start manual), with `changes` to the launch settings; a sentence
        saying what happens. ValueError: not now, or a setting outside its limits (nothing changed)."""
        config = self.config
        if config.start != "manual":
            raise ValueError("this server starts by itself (--start auto)")
        if not self.waiting_for_launch():
            raise ValueError("training has already started" if self.phase != "lobby" else
                             "Start was pressed already; training begins once enough clients are ready")
        # Only what differs from the run's settings is checked: a value from the command line stands.
        given = {k: v for k, v in (changes or {}).items() if getattr(config, k, object()) != v}
        changed = settings.check_launch_settings(given)
        if changed.get("num_rounds", config.num_rounds) <= self.rounds_done():
            raise ValueError(f"num_rounds must be more than the {self.rounds_done()} round(s) this run has done")
        if "num_rounds" in changed and config.dp_epsilon is not None:
            raise ValueError(f"the noise was planned for --dp-epsilon {config.dp_epsilon:g} over "
                             f"{config.num_rounds} rounds: restart the server to plan for another number")
        if len(self.pool.members) < self.needed and changes is not None:
            raise ValueError(f"{len(self.pool.members)} client(s) ready, {self.needed} needed to start")
        for name, value in changed.items():
            setattr(config, name, value)
        if changed:
            self.events.emit(SettingsChanged(config))
        self.launch.set()
        return "training starts" + "".join(f"; {name.replace('_', ' ')} {value:g}" for name, value in changed.items())

    def request_more(self, rounds: int) -> str:
        """--stay: another session of `rounds` rounds from the last global model."""
        if self.phase != "between sessions":
            raise ValueError("more rounds can be asked for only when a session has ended (with --stay)")
        try:
            rounds = settings.check_launch_settings({"num_rounds": rounds})["num_rounds"]
        except ValueError as exc:
            raise ValueError(str(exc).replace("num_rounds", "rounds", 1)) from None
        self.more_rounds = rounds
        self.more.set()
        return f"{rounds} more round(s)"

    def signal_go(self) -> None:
        """SIGUSR1: start (--start manual), or with --stay another session as long as the last one."""
        try:
            if self.waiting_for_launch():
                self.events.notice(f"SIGUSR1: {self.request_launch()}")
            elif self.phase == "between sessions":
                last = max(self.rounds_done() - self.session_start, 1)
                self.events.notice(f"SIGUSR1: {self.request_more(last)}")
            else:
                self.events.notice("SIGUSR1: nothing to start now", warning=True)
        except ValueError as exc:
            self.events.notice(f"SIGUSR1: {exc}", warning=True)

    def status(self, round_: Any) -> str:
        """What the server is waiting for, in words (the text of <WAITING>); `round_`: the one open."""
        pool = self.pool
        if round_ is not None:
            return f"round {round_.number}: {len(round_.reported)} of {len(round_.expected)} updates in"
        if self.waiting_for_launch():
            return f"waiting for Start on the dashboard: {len(pool.members)} of {pool.num_clients} clients ready"
        if self.phase == "between sessions":
            return f"session {self.session} is over after round {self.rounds_done()}; waiting for more rounds"
        if not pool.training_started:
            return (f"waiting for clients: {len(pool.members)} of {pool.num_clients} ready, "
                    f"training starts with at least {self.needed}")
        return f"between rounds: {len(pool.idle())} client(s) ready, {self.needed} needed"

    def training_started(self) -> TrainingStarted:
        config = self.config
        data = config.dataset if config.task == "dataset" else "their own data"
        return TrainingStarted(sorted(self.pool.members), self.rounds_done() + 1, config.num_rounds, config.model,
                               data, config.strategy, self.session)

    async def wait_for_start(self) -> None:
        """The lobby: wait for the first ready client, then --time-to-wait for the others (or until
        all --num-clients are ready), and never start with fewer than the rounds need."""
        pool, config = self.pool, self.config
        if config.start == "manual":
            self.events.notice("waiting for Start training on the dashboard (or SIGUSR1)" if config.dashboard else
                               f"waiting for SIGUSR1 to start training (--start manual): kill -USR1 {os.getpid()}")
            await wait_any(self.launch, self.stopping, None)
            if self.stopping.is_set():
                raise Stopped
        await pool.wait_until(lambda: bool(pool.members), None, self.stopping)
        if config.start == "auto" and config.time_to_wait_s and len(pool.members) < config.num_clients:
            self.events.notice(f"first client is ready; waiting {config.time_to_wait_s:g} s for more "
                               f"(up to {config.num_clients})")
            await pool.wait_until(lambda: len(pool.members) >= config.num_clients, config.time_to_wait_s, self.stopping)
        if len(pool.members) < self.needed:
            self.events.notice(f"{len(pool.members)} client(s) ready, {self.needed} needed: waiting for more")
            await pool.wait_until(lambda: len(pool.members) >= self.needed, None, self.stopping)
        pool.training_started = True
        self.phase = "training"
        self.events.emit(self.training_started())

    async def next_session(self) -> bool:
        """--stay: the session is over; keep the clients and wait for more rounds (True) or a stop (False)."""
        done = self.rounds_done()
        self.more.clear()
        self.phase = "between sessions"  # from now on, request_more may set `more`
        self.events.emit(SessionFinished(self.session, done))
        await self.events.flush()  # the model and the plot of this session are on disk
        note = f"session {self.session} ended after round {done}; stay connected: another session may follow"
        await asyncio.gather(*(c.end_session(self.session, done, note) for c in list(self.pool.connected.values())))
        await wait_any(self.more, self.stopping, None)
        if self.stopping.is_set():
            self.events.notice(f"{self.stop_reason}: the run ends after session {self.session}")
            return False
        self.session += 1
        self.session_start = done
        self.config.num_rounds = done + self.more_rounds
        self.events.emit(SettingsChanged(self.config))
        self.phase = "training"
        self.events.emit(self.training_started())
        return True


def stop_on_signals(control: RunControl, who: str) -> None:
    """SIGINT and SIGTERM end the run after its current step, with the checkpoint whole; a second one
    at once. SIGUSR1 is --start manual's and --stay's go, without a browser."""

    def on_signal(signum: signal.Signals) -> None:
        if control.stopping.is_set():
            say(who, "second signal: exiting at once (the last checkpoint is intact)")
            os._exit(128 + signum)
        control.request_stop(signal.Signals(signum).name)

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    loop.add_signal_handler(signal.SIGUSR1, control.signal_go)
