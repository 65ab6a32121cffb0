"""What happens in a run, as events, and the observers that show or keep it.

The round engine and the lobby print nothing and write no file themselves: they
emit events, and observers subscribe. The console lines are one observer
(`Console`), the run's files another (`fedsock.run_files.RunFiles`); a dashboard
is one more. Events are emitted on the event loop's thread, and an observer must
not block it: one that does slow work (files) hands it to a thread of its own and
finishes it in `flush()`, which the engine awaits between rounds and at the end.
"""

from __future__ import annotations

import time
import asyncio
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from fedsock.console import say, warn
from fedsock.virtual_time import held

WHO = "server"


@dataclass
class Event:
    @property
    def kind(self) -> str:
        return type(self).__name__


@dataclass
class Listening(Event):
    address: str
    transport: str
    auth: str
    output_dir: str


@dataclass
class ClientJoined(Event):
    client_id: int
    peer: str
    rejoined: bool
    policy: dict[str, Any] | None = None  # its <HELLO>'s privacy policy (fedsock.policy); None: it stated none


@dataclass
class ClientReady(Event):
    client_id: int
    num_examples: int
    ready: int  # clients ready now
    num_clients: int
    label_counts: list[int] | None = None  # its training examples per class, if its <READY> said


@dataclass
class ClientLeft(Event):
    client_id: int
    reason: str


@dataclass
class ConnectionRefused(Event):
    peer: str
    reason: str
    client_id: int | None = None


@dataclass
class Notice(Event):
    """A line for people that belongs to no other event (the lobby waiting, a round retried)."""

    message: str
    warning: bool = False


@dataclass
class TrainingStarted(Event):
    client_ids: list[int]
    first_round: int
    num_rounds: int
    model: str
    dataset: str
    strategy: str
    session: int = 1  # --stay: the sessions after the first continue from the last model


@dataclass
class SettingsChanged(Event):
    """The run's settings changed (the dashboard's launch settings, a new session's rounds):
    config.json is written again."""

    config: Any  # the ServerConfig, changed in place


@dataclass
class SessionFinished(Event):
    """--stay: a session's rounds are done; the clients stay connected for the next one."""

    session: int
    rounds_completed: int


@dataclass
class UpdateArriving(Event):
    """A client's update has begun to arrive (its <UPDATE> header is in; the weights follow)."""

    number: int
    client_id: int


@dataclass
class ClientProgress(Event):
    """How far a client's training of a round has come (its optional <PROGRESS>), 0..1."""

    number: int
    client_id: int
    done: float


@dataclass
class UpdateDiscarded(Event):
    """A client's update was not used: it came after its round closed, or could not be kept."""

    number: int
    client_id: int
    reason: str
    warning: bool = False


@dataclass
class RoundStarted(Event):
    number: int
    attempt: int
    picked: list[int]  # sent the model now
    expected: list[int]  # picked, and those still training this round's model from an earlier attempt
    idle: int  # ready clients that were not picked


@dataclass
class UpdateAccepted(Event):
    number: int
    client_id: int
    num_examples: int
    metrics: dict[str, float]


@dataclass
class ClientDropped(Event):
    number: int
    client_id: int
    reason: str
    timed_out: bool = False


@dataclass
class RoundFailed(Event):
    number: int
    got: int
    needed: int
    retry: int  # 0 when the run gives up
    retries: int


@dataclass
class RoundAggregated(Event):
    """A round's model is made; its evaluation follows (RoundFinished). `row` holds what is known now:
    the round's clients, time, traffic and training loss (a view need not wait for the evaluation)."""

    row: dict[str, Any]
    num_rounds: int


@dataclass
class RoundFinished(Event):
    """A round's model is made and evaluated. `row` is its line of metrics.csv; `checkpoint`
    holds what a resume needs (weights, strategy state), for the observer that keeps it."""

    row: dict[str, Any]
    num_rounds: int
    checkpoint: Any = field(default=None, repr=False)


@dataclass
class FederatedEvaluation(Event):
    """The clients' own evaluation of a round's model, on their test splits, added up."""

    number: int
    clients: int
    examples: int
    scores: dict[str, float]


@dataclass
class MetricsUpdated(Event):
    """A saved round's metrics changed (its federated evaluation came in): the files are written again."""

    checkpoint: Any = field(default=None, repr=False)


@dataclass
class RoundSaved(Event):
    """The round's files are written (its checkpoint is whole): the round line is printed now, so
    that a server killed after printing it resumes from that round."""

    row: dict[str, Any]
    num_rounds: int


@dataclass
class RunFinished(Event):
    completed: bool
    rounds_completed: int
    message: str
    output_dir: str
    drops: list[str]


class Observer:
    """Receives every event. `flush()` finishes what an observer does in the background."""

    def notify(self, event: Event) -> None:
        pass

    async def flush(self) -> None:
        pass


class BackgroundObserver(Observer):
    """An observer whose work (writing files) runs in a thread of its own, one piece after another, off the
    event loop: `submit` queues a piece, `flush()` waits for what is queued (and raises what it raised),
    `close()` ends the thread."""

    def __init__(self, thread_name: str):
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)
        self.pending: list[Future] = []

    def submit(self, work: Callable[..., Any], *args: Any) -> None:
        self.pending.append(self.executor.submit(work, *args))

    async def flush(self) -> None:
        pending, self.pending = self.pending, []
        for future in pending:
            await held(asyncio.wrap_future(future))  # a simulation's virtual clock waits for the file

    def close(self) -> None:
        self.executor.shutdown(wait=True)


class Events:
    """The observers of a run, in order; the engine and the lobby emit through this."""

    def __init__(self, observers: list[Observer] | None = None):
        self.observers: list[Observer] = list(observers or [])

    def emit(self, event: Event) -> None:
        for observer in self.observers:
            observer.notify(event)

    def notice(self, message: str, warning: bool = False) -> None:
        self.emit(Notice(message, warning))

    async def flush(self) -> None:
        for observer in self.observers:
            await observer.flush()


def id_ranges(ids) -> str:
    """Client IDs as runs, "1-3, 5, 7-9", so that a thousand of them fit on a line."""
    runs: list[list[int]] = []
    for i in sorted(ids):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


class Console(Observer):
    """The server's lines on the terminal. `quiet` keeps only round lines, warnings and the end."""

    # A flood of refused connections would drown everything else: per reason, at most
    # REFUSAL_LINES lines in each REFUSAL_WINDOW_S, then a count of the ones not shown.
    REFUSAL_WINDOW_S = 5.0
    REFUSAL_LINES = 10

    def __init__(self, quiet: bool = False, who: str = WHO):
        self.quiet, self.who = quiet, who
        self._refusals: dict[str, list] = {}  # reason -> [window start, lines shown, lines not shown]
        self.rejoins: list[str] = []  # for the end-of-run summary, beside the drops

    def info(self, message: str) -> None:
        if not self.quiet:
            say(self.who, message)

    def notify(self, event: Event) -> None:
        handler = getattr(self, "on_" + event.kind, None)
        if handler is not None:
            handler(event)

    def on_Listening(self, e: Listening) -> None:
        say(self.who, f"listening on {e.address} ({e.transport}, {e.auth}); output in {e.output_dir}")

    def on_ClientJoined(self, e: ClientJoined) -> None:
        self.info(f"client {e.client_id} joined from {e.peer}{' (rejoined)' if e.rejoined else ''}")
        if e.rejoined:
            self.rejoins.append(f"{time.strftime('%H:%M:%S')} client {e.client_id} rejoined from {e.peer}")

    def on_ClientReady(self, e: ClientReady) -> None:
        self.info(f"client {e.client_id} is ready: {e.num_examples} training examples ({e.ready}/{e.num_clients} ready)")

    def on_ClientLeft(self, e: ClientLeft) -> None:
        self.info(f"client {e.client_id} left ({e.reason})")

    def on_ConnectionRefused(self, e: ConnectionRefused) -> None:
        key = e.reason if e.client_id is None else f"{e.client_id}: {e.reason}"
        now = time.monotonic()
        window = self._refusals.setdefault(key, [now, 0, 0])
        if now - window[0] >= self.REFUSAL_WINDOW_S:
            hidden = window[2]
            window[:] = [now, 0, 0]
        else:
            hidden = 0
        if window[1] >= self.REFUSAL_LINES:
            window[2] += 1
            return
        window[1] += 1
        more = f" ({hidden} more like it in the last {self.REFUSAL_WINDOW_S:g} s were not shown)" if hidden else ""
        who = f"refused client {e.client_id}: " if e.client_id is not None else ""
        warn(self.who, f"{e.peer}: {who}{e.reason}{more}")

    def on_Notice(self, e: Notice) -> None:
        if e.warning:
            warn(self.who, e.message)
        else:
            self.info(e.message)

    def on_TrainingStarted(self, e: TrainingStarted) -> None:
        if e.session > 1:
            say(self.who, f"session {e.session} starts with {len(e.client_ids)} client(s): rounds "
                          f"{e.first_round}..{e.num_rounds}, from the last global model")
            return
        say(self.who, f"training starts with {len(e.client_ids)} client(s) [{id_ranges(e.client_ids)}]: rounds "
                 f"{e.first_round}..{e.num_rounds} of {e.model} on {e.dataset}, strategy {e.strategy}")

    def on_UpdateDiscarded(self, e: UpdateDiscarded) -> None:
        self.on_Notice(Notice(f"client {e.client_id}: {e.reason}", e.warning))

    def on_SessionFinished(self, e: SessionFinished) -> None:
        say(self.who, f"session {e.session} finished after round {e.rounds_completed}; the clients stay connected. "
                      f"Train more rounds from the dashboard (or SIGUSR1); SIGINT ends the run")

    def on_RoundStarted(self, e: RoundStarted) -> None:
        if e.idle:  # sampling: say who was picked
            self.info(f"round {e.number}: picked {len(e.picked)} of {len(e.picked) + e.idle} ready clients "
                      f"[{id_ranges(e.picked)}]")

    def on_ClientDropped(self, e: ClientDropped) -> None:
        warn(self.who, drop_line(e))

    def on_RoundFailed(self, e: RoundFailed) -> None:
        say(self.who, f"round {e.number}: {e.got} update(s) arrived, {e.needed} needed; the global model stays as it was")
        if e.retry:
            say(self.who, f"retrying round {e.number} (retry {e.retry} of {e.retries})")

    def on_RoundSaved(self, e: RoundSaved) -> None:
        say(self.who, round_line(e.row, e.num_rounds))

    def on_FederatedEvaluation(self, e: FederatedEvaluation) -> None:
        f1 = f", precision {e.scores['precision']:.3f} recall {e.scores['recall']:.3f} F1 {e.scores['f1']:.3f}" \
            if "f1" in e.scores else ""
        say(self.who, f"round {e.number}: federated evaluation by {e.clients} client(s) on {e.examples} examples: "
                      f"acc {100 * e.scores['accuracy']:.2f}%  loss {e.scores['loss']:.4f}{f1}")

    def on_RunFinished(self, e: RunFinished) -> None:
        for line in e.drops:
            say(self.who, f"dropped: {line}")
        for line in self.rejoins:
            say(self.who, f"rejoined: {line}")
        say(self.who, f"{e.message}. Outputs in {e.output_dir}")


def drop_line(e: ClientDropped) -> str:
    if e.timed_out:
        return f"client {e.client_id} sent no update within {e.reason} in round {e.number}; left out of that round"
    return f"client {e.client_id} in round {e.number} ({e.reason}); the round goes on without it"


def round_line(row: dict[str, Any], num_rounds: int) -> str:
    """`round 3/10  clients 5/5  test acc 98.71%  loss 0.0410  2.3 s` (`  F1 0.912` for a task with a positive
    class, `  ε 1.23` with DP); without a server test set the clients' evaluation comes in its own line."""
    if row.get("test_accuracy") is not None:
        quality = f"test acc {100 * row['test_accuracy']:.2f}%  loss {row['test_loss']:.4f}"
        if row.get("test_f1") is not None and row.get("positive"):
            quality += f"  F1 {row['test_f1']:.3f}"
    else:
        quality = "no server test set"
    privacy = f"  ε {row['epsilon']:.3g}" if row.get("epsilon") is not None else ""
    stale = f"  staleness ≤ {row['staleness']}" if row.get("staleness") is not None else ""  # --async-buffer
    virtual = f" (virtual {row['virtual_seconds']:.1f} s)" if row.get("virtual_seconds") is not None else ""
    return (f"round {row['round']}/{num_rounds}  clients {row['clients']}/{row['expected']}  {quality}  "
            f"{row['seconds']:.1f} s{virtual}{privacy}{stale}")
