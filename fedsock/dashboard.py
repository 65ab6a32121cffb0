"""The live dashboard: a web page of the run, served from the server's own event loop.

`fl_server.py --dashboard [HOST:]PORT` adds a `Dashboard` to the run's observers. It
keeps what the page shows (the lobby, the rounds, each client's last numbers, the
warnings) from the run's events, and pushes what changed to every open page as
server-sent events, in one batch every quarter of a second: an event costs the round
engine a dict update, whatever the number of pages or clients.

    GET  /?token=TOKEN     the printed link: sets the cookie, then 303 to /
    GET  /                 the page (fedsock/static/: dashboard.html, .js, .css, and uPlot)
    GET  /api/state        everything the page shows, as one JSON object (its `privacy`: the Privacy card)
    GET  /api/events       the live feed (text/event-stream): `snapshot`, then batches of changes
    GET  /api/client/<id>  one client's rounds (loss, local accuracy, fit and upload times) and label counts
    GET  /download/<file>  model.pt (the current global model), metrics.csv, accuracy.png
    POST /api/start        {"num_rounds", "local_epochs", "batch_size", "lr"}: --start manual's launch
    POST /api/stop         end the run as SIGINT does, with the checkpoint whole
    POST /api/more         {"rounds": N}: --stay's next session
    GET  /runs, /api/runs, /api/runs/<name>/metrics   the runs beside this one, compared (fedsock/run_history.py)

Every request needs the dashboard's token, loopback included: on a shared machine any
local user can reach 127.0.0.1, and Stop or model.pt are not theirs. The page's own files
need it too: they hold nothing secret, but a rule without exceptions forgets no new path.
The token is fresh
for each run (`secrets.token_urlsafe(32)`) and the server prints it once, in its link
`dashboard: http://HOST:PORT/?token=...`, as Jupyter does. Opening that link stores it in
an HttpOnly, SameSite=Strict cookie (named with the port: cookies are shared by every port
of a host) and redirects to the bare URL, so the token leaves the address bar; scripts send
`Authorization: Bearer TOKEN`. It replaces the federation's --auth-token-file token here:
that one is every client's (a client could have pressed Stop), and the page's plain HTTP
would have sent it in clear, where a listener could then join the federation with it.

Because the cookie goes with every request, actions are refused unless they come from the
page itself: a JSON body with the `X-Fedsock-Action` header (a cross-site page cannot send
one without a CORS preflight, which this server never grants), and no foreign `Origin`.
The `Host` must name this dashboard (an address, `localhost`, the bind host, and beyond
loopback this machine's names), so a DNS-rebinding page cannot reach it, wherever it listens.
Nothing secret is shown: no token, no file path.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import math
import re
import secrets
import socket
import time
from collections import deque
from pathlib import Path
from typing import Any

from aiohttp import web

from fedsock.config import LAUNCH_LIMITS
from fedsock.console import warn
from fedsock.events import WHO, Event, Observer, drop_line, id_ranges, round_line
from fedsock.identity import fingerprint
from fedsock.model_card import run_model_card
from fedsock.policy import policy_text
from fedsock.privacy import ACCOUNTED, Accountant
from fedsock.run_files import metrics_text, model_bytes, plot_png
from fedsock.run_history import RunsFolder, RunsView

STATIC = Path(__file__).resolve().parent / "static"
PUSH_EVERY_S = 0.25  # changes are batched: at most four pushes a second, to each page
MAX_PAGES = 32  # open live feeds; one more gets 503
QUEUE_BATCHES = 64  # batches a slow page may fall behind before it is cut off (it reconnects to a snapshot)
LOG_LINES, REFUSALS_KEPT = 500, 50
HISTORY_ROUNDS = 1000  # each client's last rounds kept for its view (six numbers a round)
CONFUSION_SHOWN = 50  # classes up to which the confusion matrix itself goes to the page (beyond: per class only)
CLIENT_IN_NOTICE = re.compile(r"client (\d+)\b")  # a notice about one client is filed under it
# What the page may show of the config: no token or key file, no path.
SHOWN_SETTINGS = (
    "model", "task", "dataset", "partition", "alpha", "num_clients", "min_clients", "num_rounds", "clients_per_round",
    "fraction_fit", "sampling", "strategy", "proximal_mu", "server_lr", "server_momentum", "trim_fraction",
    "byzantine_clients", "local_epochs", "batch_size", "lr", "lr_decay", "augment", "dp_clip", "dp_noise_multiplier", "dp_epsilon", "dp_mode",
    "secure_aggregation", "compression", "compress_broadcast", "seed", "round_timeout_s", "start", "stay", "async_buffer",
)
DOWNLOADS = {"model.pt": "application/octet-stream", "metrics.csv": "text/csv; charset=utf-8",
             "accuracy.png": "image/png"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
                               "frame-ancestors 'none'; form-action 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",  # a framed Start button could be clicked by a page the user did not mean to use
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def parse_address(value: str) -> tuple[str, int]:
    """`PORT`, `HOST:PORT` or `[IPv6]:PORT`; ValueError with a sentence."""
    host, port = "127.0.0.1", value
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        if not rest.startswith(":"):
            raise ValueError(f"{value!r}: write an IPv6 host as [HOST]:PORT")
        port = rest[1:]
    elif ":" in value:
        host, port = value.rsplit(":", 1)
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r}: the port must be a number 0..65535 (0 picks a free one)")
    if not host:
        raise ValueError(f"{value!r}: the host is empty")
    return host, int(port)


NO_DEFENCE = ("No privacy protection: the server sees every client's update in the clear, and updates can leak "
              "training data (docs/tutorials/what-updates-leak.md shows a curious server reconstructing digits "
              "from them).")
CENTRAL_IN_CLEAR = ("The server clips and noises the updates itself, so it sees each client's update in the clear: "
                    "DP protects the clients from whoever gets the model, not from the server, which must be trusted.")
CENTRAL_SUM_IN_CLEAR = ("The server adds the noise to the unmasked sum, so it sees that sum without noise: DP protects "
                        "the clients from whoever gets the model; from the server, only secure aggregation does "
                        "(it sees no single update).")
SUM_LEAKS = ("Secure aggregation hides each client's update, not their sum: the sum, and the model made from it, "
             "can still leak training data. Differential privacy (--dp-clip) bounds that leak.")
MODES = {
    "central": "central: the server clips each update and adds the noise (it sees the updates, so it must be trusted)",
    "local": "local: each client clips its own update and adds all the noise before sending it",
    "distributed": "distributed: each client clips its update and adds its share of the noise; secure aggregation "
                   "shows the server only the noised sum",
}
RELATIONS = {"add-remove": "add-or-remove-one client (runs that differ by one client's presence)",
             "replace": "replace-one client (runs that differ in one client's data)"}


def privacy_warnings(dp_mode: str | None, secure: bool) -> list[dict[str, str]]:
    """What the Privacy card warns of, for DP's mode (None: no DP) and secure aggregation: `danger` when
    nothing protects the updates, `note` where a protection leaves something in the clear."""
    if dp_mode is None:
        return [{"level": "note", "text": SUM_LEAKS}] if secure else [{"level": "danger", "text": NO_DEFENCE}]
    if dp_mode == "central":
        return [{"level": "note", "text": CENTRAL_SUM_IN_CLEAR if secure else CENTRAL_IN_CLEAR}]
    return []


class PrivacyPanel:
    """The Privacy card's facts: what protects the clients, and the epsilon spent and planned. The settings
    are fixed for the run; epsilon spent is the last released round's (metrics.csv's), and epsilon planned
    is computed once per round (or change of --num-rounds), never per push or page."""

    def __init__(self, engine):
        self.engine = engine
        self.fixed = self.settings()
        self._planned_key: tuple | None = None
        self._planned: float | None = None

    def settings(self) -> dict[str, Any]:
        engine, config, strategy = self.engine, self.engine.config, self.engine.strategy
        privacy, secure = engine.privacy, engine.secure
        n = engine.pool.num_clients
        sampling = config.sampling if strategy.sampled else "none"
        if sampling == "none":
            sampling_text = "none: every ready client trains every round (so sampling adds no privacy)"
        elif sampling == "poisson":
            sampling_text = (f"Poisson: each ready client with probability q = {strategy.sampling_rate(n):.3g} "
                             f"(about {strategy.sampling_rate(n) * n:.3g} of {n} a round)")
        else:
            sampling_text = f"fixed: {strategy.clients_to_sample(n)} of the {n} clients a round, without replacement"
        facts: dict[str, Any] = {
            "dp": privacy is not None, "sampling": sampling, "sampling_text": sampling_text,
            "secure_aggregation": secure is not None, "secure_text": "",
            "compression": "" if config.compression == "none" and config.compress_broadcast == "none" else
            f"updates {config.compression}, broadcast {config.compress_broadcast}",
            "warnings": privacy_warnings(privacy.settings.mode if privacy else None, secure is not None),
        }
        if privacy is not None:
            s = privacy.settings
            method = privacy.accountant.method_for([s.noise_multiplier])
            facts.update(mode=s.mode, mode_text=MODES[s.mode], clip=s.clip, noise_multiplier=s.noise_multiplier,
                         delta=s.delta, relation=s.relation, relation_text=RELATIONS[s.relation],
                         accounting=method, accounting_text=ACCOUNTED[method], budget=privacy.budget)
        if secure is not None:
            picked = strategy.clients_to_pick(n)  # secure aggregation goes with no Poisson sampling
            shown = f"threshold {secure.threshold(picked)} of {picked} clients a round"
            key = secure.settings.federation_key
            facts["secure_text"] = shown + (f", with identities (federation {fingerprint(key)})" if key is not None
                                            else ", without identities (it holds against a server that follows "
                                                 "the protocol, not one that lies)")
        return facts

    def state(self) -> dict[str, Any]:
        privacy = self.engine.privacy
        if privacy is None:
            return self.fixed
        metrics = self.engine.metrics
        last = next((row for row in reversed(metrics) if row.get("epsilon") is not None), None)
        return {**self.fixed, "epsilon_spent": last["epsilon"] if last else 0.0,
                "rounds_spent": last["round"] if last else 0, "epsilon_planned": self.planned(),
                "planned_rounds": self.engine.config.num_rounds}

    def planned(self) -> float:
        """The budget, if one was set (the noise was planned to spend it); else what the rounds done and
        the rounds still to run at the planned sampling would spend, from a copy of the server's accountant
        (asking the server's own would evict the answer it keeps for its next round)."""
        engine, privacy = self.engine, self.engine.privacy
        if privacy.budget is not None:
            return privacy.budget
        spent = privacy.accountant
        key = (len(spent.history), engine.config.num_rounds)
        if key != self._planned_key:
            n, strategy = engine.pool.num_clients, engine.strategy
            to_run = max(engine.config.num_rounds - len(spent.history), 0)
            copy = Accountant(spent.delta, spent.sampling, [list(e) for e in spent.history])
            one = [privacy.settings.noise_multiplier, n, strategy.clients_to_sample(n), strategy.sampling_rate(n)]
            self._planned, self._planned_key = copy.epsilon([one] * to_run), key
        return self._planned


def per_class_scores(confusion) -> list[dict[str, Any]]:
    """Each class's precision, recall, F1 and support from a confusion matrix (row: true class, column:
    predicted). A class never predicted has no precision, one never present no recall (None, not 0); F1 is 0
    when either is 0."""
    import numpy as np

    counts = np.asarray(confusion, dtype=np.int64)
    hits, actual, predicted = np.diag(counts), counts.sum(axis=1), counts.sum(axis=0)
    scores = []
    for k in range(len(counts)):
        precision = float(hits[k] / predicted[k]) if predicted[k] else None
        recall = float(hits[k] / actual[k]) if actual[k] else None
        if precision == 0 or recall == 0:  # never right about it: F1 0, even where the other is unknown
            f1 = 0.0
        elif precision is not None and recall is not None:
            f1 = 2 * precision * recall / (precision + recall)
        else:
            f1 = None
        scores.append({"precision": precision, "recall": recall, "f1": f1, "support": int(actual[k])})
    return scores


class Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class RoundViews:
    """What the page shows of the rounds (part of DashboardState): each round's row for the charts, as
    soon as it is aggregated and again once evaluated, and the evaluation detail of the newest model."""

    def on_RoundAggregated(self, e) -> None:
        """The round is on the charts at once (its time, traffic, training loss); its evaluation follows."""
        if self.current.get("number") == e.row["round"]:  # the next round may already be under way
            self.current = {}
            self.waiting_for, self._waiting_text = set(), None
        self.evaluating = e.row["round"]
        self.keep_round(e.row)

    def on_RoundFinished(self, e) -> None:
        if self.evaluating == e.row["round"]:
            self.evaluating = None
        self.keep_round(e.row)
        self.keep_evaluation(e.row)

    def on_RoundSaved(self, e) -> None:
        row = e.row
        if self.current.get("number") == row["round"]:
            self.current = {}
        self.keep_round(row)
        try:
            line = round_line(row, e.num_rounds)  # the server's own round line
        except (KeyError, TypeError, ValueError):  # a row without every column
            line = f"round {row['round']}/{e.num_rounds} done"
        self.note(line)

    def keep_round(self, row: dict[str, Any]) -> None:
        keep = ("round", "clients", "expected", "train_loss", "seconds", "bytes_sent", "bytes_received",
                "max_fit_seconds", "test_accuracy", "test_loss", "test_f1", "fed_accuracy", "fed_loss", "fed_f1",
                "epsilon", "session", "resumed", "staleness", "mean_staleness")
        kept = {k: row.get(k) for k in keep}
        old = self.rounds.get(row["round"])
        if old is not None:  # the clients' evaluation may have come in already
            kept.update({k: old[k] for k in ("fed_accuracy", "fed_loss", "fed_f1") if kept[k] is None})
        self.rounds[row["round"]] = kept
        if not row.get("positive", self.positive() is not None):  # F1 is of a task's positive class; MNIST has none
            kept.update(test_f1=None, fed_f1=None)
        self._dirty_rounds.add(row["round"])

    def keep_evaluation(self, row: dict[str, Any]) -> None:
        """The confusion matrix of a round's model (the server's test set's, else the clients' sum) and
        each class's precision, recall and F1: computed once per round, not per push."""
        confusion = row.get("confusion")
        if not confusion:
            return
        classes = self.classes(len(confusion))
        self.evaluation = {
            "round": row["round"], "classes": classes, "per_class": per_class_scores(confusion),
            "source": "the server's test set" if row.get("test_accuracy") is not None else "the clients' test splits",
            "confusion": confusion if len(classes) <= CONFUSION_SHOWN else None,
        }
        self._evaluation_dirty = True

    def on_MetricsUpdated(self, e) -> None:
        if self.engine.metrics:
            self.keep_evaluation(self.engine.metrics[-1])

    def classes(self, count: int) -> list[str]:
        task = getattr(self.engine, "task", None)
        names = list(task.classes) if task is not None else []
        return names if len(names) == count else [str(k) for k in range(count)]

    def positive(self) -> str | None:
        task = getattr(self.engine, "task", None)
        return task.positive if task is not None else None

    def on_FederatedEvaluation(self, e) -> None:
        row = self.rounds.get(e.number)
        if row is not None:
            positive = self.engine.task is not None and self.engine.task.positive is not None
            row.update(fed_accuracy=e.scores.get("accuracy"), fed_loss=e.scores.get("loss"),
                       fed_f1=e.scores.get("f1") if positive else None)
            self._dirty_rounds.add(e.number)
        self.note(f"round {e.number}: the clients' evaluation, by {e.clients} client(s) on {e.examples} examples: "
                  f"acc {100 * e.scores['accuracy']:.2f}%  loss {e.scores['loss']:.4f}")


class ClientViews:
    """What the page shows of each client within a round (part of DashboardState): its training and
    upload progress, who the round waits for, and the client's own view (its rounds, its label counts)."""

    def on_ClientProgress(self, e) -> None:
        entry = self.progress.get(e.client_id)
        if entry is not None and entry[1] is None:  # its update has not begun to arrive
            entry[0] = e.done
            self._dirty_progress.add(e.client_id)

    def on_UpdateArriving(self, e) -> None:
        self.client(e.client_id).update(state="uploading", round=e.number)
        self.progress[e.client_id] = [1.0, 0.0]
        self.uploading[e.client_id] = time.monotonic()
        self._dirty_progress.add(e.client_id)

    def round_done_by(self, client_id: int) -> None:
        """The client's part of the round is over (its update came, or it dropped out): nobody waits for it."""
        if client_id in self.waiting_for:
            self.waiting_for.discard(client_id)
            self._waiting_text = None
        self.uploading.pop(client_id, None)
        if self.progress.pop(client_id, None) is not None:
            self._dirty_progress.add(client_id)

    def read_uploads(self) -> None:
        """Each arriving update's share, read from its connection now (bytes in of its weights frame), to
        the percent; a client whose share moved is sent with the next batch (one waiting in TCP is not)."""
        connected = self.engine.pool.connected
        for client_id in self.uploading:
            entry = self.progress.get(client_id)
            reader = getattr(connected.get(client_id), "upload_progress", None)
            if entry is None or reader is None:
                continue
            share = round(reader(), 2)
            if share > entry[1]:  # only forward: once whole, the reader is on the next frame
                entry[1] = share
                self._dirty_progress.add(client_id)

    def progress_now(self, ids) -> dict[int, list | None]:
        return {client_id: self.progress.get(client_id) for client_id in ids}

    def client_detail(self, client_id: int) -> dict[str, Any] | None:
        """One client's view: its rounds and its label balance (from the counts it reported)."""
        if client_id not in self.clients:
            return None
        counts = self.label_counts.get(client_id)
        return {"id": client_id, "history": list(self.history.get(client_id, ())), "label_counts": counts,
                "classes": self.classes(len(counts)) if counts is not None else None}


class DashboardState(RoundViews, ClientViews, Observer):
    """What the page shows, kept from the run's events; `changes()` is what changed since the last call."""

    def __init__(self, engine):
        self.engine = engine
        self.clients: dict[int, dict[str, Any]] = {}
        self.rounds: dict[int, dict[str, Any]] = {}
        self.log: deque = deque(maxlen=LOG_LINES)
        self.refused: deque = deque(maxlen=REFUSALS_KEPT)
        self.refusals = 0
        self.listening: dict[str, str] = {}
        self.current: dict[str, Any] = {}  # the round in progress: number, attempt, picked
        self.message = ""  # how the run ended
        self.started_at: float | None = None  # when training started (the headline's elapsed time)
        self.finished_at: float | None = None
        self.evaluating: int | None = None  # the round whose model is being evaluated now
        self.waiting_for: set[int] = set()  # the current round's clients whose update has not come yet
        self._waiting_text: str | None = None  # id_ranges of waiting_for, made again only when it changed
        # the current round's clients: [share trained, share of the update received (None: not arriving)]
        self.progress: dict[int, list] = {}
        self.uploading: dict[int, float] = {}  # client -> when its update began to arrive
        self.history: dict[int, deque] = {}  # client -> [round, loss, local accuracy, fit s, upload s, examples]
        self.label_counts: dict[int, list[int]] = {}
        self.evaluation: dict[str, Any] = {}  # the last evaluated model's confusion matrix and per-class scores
        self._dirty_progress: set[int] = set()
        self._evaluation_dirty = False
        self._dirty_clients: set[int] = set()
        self._dirty_rounds: set[int] = set()
        self._new_log: list = []
        self._new_refused: list = []
        self._last: dict[str, Any] = {}  # the run, settings and privacy as last sent
        self.privacy = PrivacyPanel(engine)
        for row in engine.metrics:  # a resumed run's rounds so far: its charts go on from them, with the mark
            self.keep_round(row)
        self.model_card = run_model_card(engine.config, getattr(engine, "task", None))  # static: in each snapshot

    # ---- events
    def notify(self, event: Event) -> None:
        handler = getattr(self, "on_" + event.kind, None)
        if handler is not None:
            handler(event)

    def client(self, client_id: int) -> dict[str, Any]:
        self._dirty_clients.add(client_id)
        row = self.clients.get(client_id)
        if row is None:
            row = self.clients[client_id] = {"id": client_id, "peer": "", "joined": None, "state": "connected",
                                             "round": None, "reason": "", "examples": None, "loss": None,
                                             "accuracy": None, "fit_seconds": None, "upload_seconds": None,
                                             "policy": None, "policy_text": ""}
        return row

    def note(self, message: str, warning: bool = False, client: int | None = None) -> None:
        """A line of the page's log: its level (info, warning) and the client it is about, for the filters."""
        if client is None:
            found = CLIENT_IN_NOTICE.match(message)
            client = int(found.group(1)) if found else None
        entry = {"time": time.time(), "message": message, "warning": warning,
                 "level": "warning" if warning else "info", "client": client}
        self.log.append(entry)
        self._new_log.append(entry)

    def on_Listening(self, e) -> None:
        self.listening = {"address": e.address, "transport": e.transport, "auth": e.auth}

    def on_ClientJoined(self, e) -> None:
        row = self.client(e.client_id)
        row.update(peer=e.peer, joined=time.time(), state="connected", reason="rejoined" if e.rejoined else "",
                   policy=e.policy, policy_text=policy_text(e.policy))
        self.note(f"client {e.client_id} joined from {e.peer}" + (" (rejoined)" if e.rejoined else ""),
                  client=e.client_id)

    def on_ClientReady(self, e) -> None:
        self.client(e.client_id).update(state="waiting", examples=e.num_examples, reason="")
        if e.label_counts is not None:
            self.label_counts[e.client_id] = e.label_counts
        self.note(f"client {e.client_id} is ready: {e.num_examples} training examples", client=e.client_id)

    def on_ClientLeft(self, e) -> None:
        self.client(e.client_id).update(state="left", reason=e.reason)
        self.round_done_by(e.client_id)
        self.note(f"client {e.client_id} left ({e.reason})", client=e.client_id)

    def on_ConnectionRefused(self, e) -> None:
        self.refusals += 1
        entry = {"time": time.time(), "peer": e.peer, "client_id": e.client_id, "reason": e.reason}
        self.refused.append(entry)
        self._new_refused.append(entry)
        row = self.clients.get(e.client_id)
        if e.client_id is not None and (row is None or row["state"] in ("left", "dropped", "refused")):
            self.client(e.client_id).update(state="refused", peer=e.peer, reason=e.reason)  # a live one stays as it is

    def on_Notice(self, e) -> None:
        self.note(e.message, e.warning)

    def on_TrainingStarted(self, e) -> None:
        if self.started_at is None:
            self.started_at = time.time()
        self.note(f"session {e.session}: rounds {e.first_round}..{e.num_rounds} with {len(e.client_ids)} client(s)")

    def on_RoundStarted(self, e) -> None:
        self.current = {"number": e.number, "attempt": e.attempt, "picked": len(e.picked),
                        "picked_ids": id_ranges(e.picked), "population": len(e.picked) + e.idle,
                        "started": time.time()}
        self.waiting_for, self._waiting_text = set(e.expected), None
        for client_id in e.picked:
            self.client(client_id).update(state="training", round=e.number, reason="")
            self.progress[client_id] = [0.0, None]
            self._dirty_progress.add(client_id)
        self.note(f"round {e.number}" + (f" (retry {e.attempt})" if e.attempt else "") +
                  f": the model went to {len(e.picked)} client(s)" +
                  (f", picked from {len(e.picked) + e.idle} ready" if e.idle else ""))

    def on_UpdateAccepted(self, e) -> None:
        metrics = e.metrics
        since = self.uploading.get(e.client_id)
        upload_s = time.monotonic() - since if since is not None else None
        self.round_done_by(e.client_id)
        self.client(e.client_id).update(
            state="waiting", round=e.number, examples=e.num_examples, loss=metrics.get("train_loss"),
            accuracy=metrics.get("local_test_accuracy"), fit_seconds=metrics.get("fit_seconds"),
            upload_seconds=upload_s)
        history = self.history.get(e.client_id)
        if history is None:
            history = self.history[e.client_id] = deque(maxlen=HISTORY_ROUNDS)
        history.append([e.number, metrics.get("train_loss"), metrics.get("local_test_accuracy"),
                        metrics.get("fit_seconds"), upload_s, e.num_examples])

    def on_UpdateDiscarded(self, e) -> None:
        self.round_done_by(e.client_id)
        self.client(e.client_id).update(state="waiting", reason=e.reason)
        self.note(f"client {e.client_id}: {e.reason}", e.warning, client=e.client_id)

    def on_ClientDropped(self, e) -> None:
        self.round_done_by(e.client_id)
        self.client(e.client_id).update(state="dropped", reason=e.reason if not e.timed_out else
                                        f"no update within {e.reason}")
        self.note(drop_line(e), warning=True, client=e.client_id)

    def on_RoundFailed(self, e) -> None:
        self.note(f"round {e.number}: {e.got} update(s) arrived, {e.needed} needed"
                  + (f"; retry {e.retry} of {e.retries}" if e.retry else "; giving up"), warning=True)

    def on_SessionFinished(self, e) -> None:
        self.note(f"session {e.session} finished after round {e.rounds_completed}; the clients stay connected")

    def on_RunFinished(self, e) -> None:
        self.message = e.message
        self.finished_at = time.time()
        self.evaluating = None
        self.note(e.message)

    # ---- what the page gets
    def run(self) -> dict[str, Any]:
        """The run as it is now: computed when a batch goes out, so it is never stale."""
        engine, pool, config = self.engine, self.engine.pool, self.engine.config
        phase = engine.control.phase
        if engine.control.waiting_for_launch():
            phase = "waiting for start"
        return {
            "phase": phase, "session": engine.control.session, "rounds_done": engine.rounds_done,
            "num_rounds": config.num_rounds, "round": self.current, "ready": len(pool.members),
            "connected": len(pool.connected), "num_clients": pool.num_clients, "needed": engine.needed,
            "start": config.start, "stay": config.stay, "message": self.message, "refusals": self.refusals,
            "stopping": engine.control.stopping.is_set(), "started_at": self.started_at,
            "finished_at": self.finished_at, "evaluating": self.evaluating, "positive": self.positive(),
            "waiting_for": len(self.waiting_for), "waiting_ids": self.waiting_text(),
        }

    def waiting_text(self) -> str:
        """Who the round waits for, as id ranges (cut short: a thousand ids are no headline)."""
        if self._waiting_text is None:
            text = id_ranges(self.waiting_for)
            self._waiting_text = text if len(text) <= 120 else text[:120].rsplit(",", 1)[0] + ", …"
        return self._waiting_text

    def settings(self) -> dict[str, Any]:
        config = self.engine.config
        return {name: getattr(config, name) for name in SHOWN_SETTINGS if hasattr(config, name)}

    def snapshot(self) -> dict[str, Any]:
        return {
            "run": self.run(), "settings": self.settings(), "privacy": self.privacy.state(),
            "listening": self.listening, "model_card": self.model_card,
            "limits": {name: [low, high] for name, (_, low, high) in LAUNCH_LIMITS.items()},
            "clients": list(self.clients.values()),
            "rounds": [self.rounds[n] for n in sorted(self.rounds)], "log": list(self.log),
            "refused": list(self.refused), "progress": dict(self.progress),
            "evaluation": self.evaluation, "server_time": time.time(),
        }

    def changes(self) -> dict[str, Any] | None:
        """What changed since the last call (None: nothing did)."""
        batch: dict[str, Any] = {}
        for key, value in (("run", self.run()), ("settings", self.settings()), ("privacy", self.privacy.state())):
            if value != self._last.get(key):
                batch[key] = self._last[key] = value
        if self._dirty_clients:
            batch["clients"] = [self.clients[i] for i in sorted(self._dirty_clients)]
        if self._dirty_rounds:
            batch["rounds"] = [self.rounds[n] for n in sorted(self._dirty_rounds)]
        if self._new_log:
            batch["log"] = self._new_log
        if self._new_refused:
            batch["refused"] = self._new_refused
        self.read_uploads()
        if self._dirty_progress:
            batch["progress"] = self.progress_now(self._dirty_progress)
        if self._evaluation_dirty:
            batch["evaluation"] = self.evaluation
        self._dirty_clients, self._dirty_rounds, self._new_log, self._new_refused = set(), set(), [], []
        self._dirty_progress, self._evaluation_dirty = set(), False
        return batch or None


class Access:
    """Who may use the dashboard: a Host that names it, and the run's token (see the module's docstring)."""

    def __init__(self):
        self.token = secrets.token_urlsafe(32)  # this run's: shown only in `link`, which the server prints
        self.url, self.cookie = "", ""
        self.names: set[str] = set()  # the Host names it answers to (an address is always fine)

    def opened(self, url: str, port: int, names: set[str]) -> None:
        self.url, self.cookie, self.names = url, f"fedsock-dashboard-{port}", names

    @property
    def link(self) -> str:
        return f"{self.url}?token={self.token}"

    def check(self, request) -> web.Response | None:
        """Raise Refused, or pass (None), or answer a sign-in itself (its redirect)."""
        self.check_host(request)
        response = self.sign_in(request)
        if response is None:
            self.check_token(request)
        return response

    def check_host(self, request) -> None:
        """The Host must name this dashboard. A DNS-rebinding page reaches it under the attacker's own
        name, so a name must be one of ours; an address cannot be rebound, so any address is fine.
        The refusal lists no names: a rebinding page can read it."""
        given = request.headers.get("Host", "")  # not request.host: without one, it asks the DNS
        name = host_name(given)
        if not is_address(name) and name not in self.names:
            raise Refused(403, f"this dashboard answers only to its own addresses and names, not to Host {given!r}")

    def sign_in(self, request) -> web.Response | None:
        """`GET ...?token=T`, the printed link: T goes into the cookie, and the browser to the bare URL."""
        if "token" not in request.query or request.method not in ("GET", "HEAD"):
            return None
        self.refuse_unless(request.query["token"])
        bare = request.rel_url.with_query({k: v for k, v in request.query.items() if k != "token"})
        response = web.Response(status=303, headers={"Location": str(bare)})
        response.set_cookie(self.cookie, self.token, path="/", httponly=True, samesite="Strict")
        return response

    def check_token(self, request) -> None:
        """The token, from the cookie the link set or as `Authorization: Bearer TOKEN`."""
        given = request.headers.get("Authorization", "")
        self.refuse_unless(given[len("Bearer "):].strip() if given.startswith("Bearer ")
                           else request.cookies.get(self.cookie, ""))

    def refuse_unless(self, given: str) -> None:
        if not hmac.compare_digest(given.encode("utf-8", "replace"), self.token.encode()):
            raise Refused(403, f"this dashboard needs its token: open the link the server printed "
                               f"(dashboard: {self.url}?token=...), or send Authorization: Bearer TOKEN")


class Dashboard(Observer):
    """The web server: aiohttp in the run's own event loop (see the module's docstring)."""

    def __init__(self, host: str, port: int, engine, title: str, loopback: bool):
        self.host, self.port, self.engine, self.title = host, port, engine, title
        self.state = DashboardState(engine)
        self.access = Access()
        self.loopback = loopback
        self.pages: set[asyncio.Queue] = set()
        self.runner = None
        self.pusher: asyncio.Task | None = None
        self.url = ""  # the bare URL; access.link carries the token
        self.broken = False
        self.downloading = asyncio.Lock()

    # ---- Observer
    def notify(self, event: Event) -> None:
        try:
            self.state.notify(event)
        except Exception as exc:  # a bug here must not end the federation: the page is only a view
            self.failed(exc)

    def failed(self, exc: Exception) -> None:
        if not self.broken:
            self.broken = True
            warn(WHO, f"internal: the dashboard stopped following the run ({type(exc).__name__}: {exc}); "
                      f"the federation goes on")

    # ---- life
    async def start(self) -> str:
        """Listen; the page's URL. UsageError-worthy failures raise OSError."""
        @web.middleware
        async def checks(request, handler):
            return await self.checks(request, handler)

        app = web.Application(middlewares=[checks], client_max_size=64 * 1024)
        app.router.add_get("/", self.page)
        app.router.add_get("/static/{name}", self.static)
        app.router.add_get("/api/state", self.api_state)
        app.router.add_get("/api/events", self.api_events)
        app.router.add_get("/api/client/{id}", self.api_client)
        app.router.add_get("/download/{name}", self.download)
        app.router.add_post("/api/start", self.api_start)
        app.router.add_post("/api/stop", self.api_stop)
        app.router.add_post("/api/more", self.api_more)
        if self.engine.output_dir:  # the runs beside this one (fedsock/run_history.py)
            output = Path(self.engine.output_dir).resolve()
            RunsView(RunsFolder(output.parent, SHOWN_SETTINGS, output.name), live=True).add_routes(app.router)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port, reuse_address=True)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        self.port = port
        shown = f"[{host}]" if ":" in host else host
        if host in ("0.0.0.0", "::"):
            shown = "127.0.0.1" if host == "0.0.0.0" else "[::1]"
        self.url = f"http://{shown}:{port}/"
        names = {"localhost"} | ({self.host.lower()} if not is_address(self.host) else set())
        if not self.loopback:  # getfqdn may ask the DNS: not in the event loop
            names |= await asyncio.get_running_loop().run_in_executor(None, machine_names)
        self.access.opened(self.url, port, names)
        self.pusher = asyncio.ensure_future(self.push_loop())
        return self.url

    async def close(self) -> None:
        """Send the last changes (the run's end), end every live feed, stop listening."""
        if self.pusher is not None:
            self.pusher.cancel()
            self.push()
        for queue in list(self.pages):
            end_feed(queue, keep=True)
        if self.runner is not None:
            await self.runner.cleanup()

    async def push_loop(self) -> None:
        while True:
            await asyncio.sleep(PUSH_EVERY_S)  # a period: batches what happened meanwhile
            self.push()

    def push(self) -> None:
        """What changed, to every open page (a bug here warns once; the federation goes on)."""
        try:
            self._push()
        except Exception as exc:
            self.failed(exc)

    def _push(self) -> None:
        batch = self.state.changes()
        if batch is None or not self.pages:
            return
        data = dumps(batch)
        for queue in list(self.pages):
            try:
                queue.put_nowait(data)
            except asyncio.QueueFull:  # a page that cannot keep up reconnects and gets a snapshot
                self.pages.discard(queue)
                end_feed(queue, keep=False)

    # ---- handlers
    async def checks(self, request, handler):
        return await answer_checked(self.access, request, handler)

    async def page(self, request):
        return web.FileResponse(STATIC / "dashboard.html", headers={"Content-Type": "text/html; charset=utf-8"})

    async def static(self, request):
        return await static_file(request)

    async def api_state(self, request):
        return web.json_response(self.state.snapshot(), dumps=dumps)

    async def api_client(self, request):
        text = request.match_info["id"]
        detail = self.state.client_detail(int(text)) if text.isdigit() and len(text) < 10 else None
        if detail is None:
            raise Refused(404, f"no client {text[:20]!r} in this run")
        return web.json_response(detail, dumps=dumps)

    async def api_events(self, request):
        if len(self.pages) >= MAX_PAGES:
            raise Refused(503, f"{MAX_PAGES} pages are open already")
        queue: asyncio.Queue = asyncio.Queue(maxsize=QUEUE_BATCHES)
        self.pages.add(queue)  # before the first await: MAX_PAGES holds however many connect at once
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                               "X-Accel-Buffering": "no"})
        try:
            for name, value in SECURITY_HEADERS.items():
                response.headers.setdefault(name, value)
            await response.prepare(request)
            snapshot = dumps(self.state.snapshot())
            await response.write(f"event: snapshot\ndata: {snapshot}\n\n".encode())
            while True:
                try:
                    data = await asyncio.wait_for(queue.get(), 15)
                except asyncio.TimeoutError:
                    await response.write(b": keep-alive\n\n")  # proxies and browsers drop a silent stream
                    continue
                if data is None:
                    break
                await response.write(f"data: {data}\n\n".encode())
        except ConnectionResetError:
            pass  # the page went away
        finally:
            self.pages.discard(queue)
        return response

    async def download(self, request):
        name = request.match_info["name"]
        if name not in DOWNLOADS:
            raise web.HTTPNotFound()
        if self.downloading.locked():  # each one is a copy of the model or a plot: one at a time
            raise Refused(429, "another download is being made; try again in a moment")
        async with self.downloading:
            return await self.make_download(name)

    async def make_download(self, name: str):
        engine = self.engine
        if name == "metrics.csv":
            body = metrics_text(engine.metrics).encode()
        else:
            if name == "accuracy.png" and not engine.metrics:
                raise Refused(404, "no round has finished yet: there is nothing to plot")
            loop = asyncio.get_running_loop()
            if name == "model.pt":  # the model the next round starts from (or the final one)
                body = await loop.run_in_executor(None, model_bytes, engine.model.tensors)
            else:
                body = await loop.run_in_executor(None, plot_png, list(engine.metrics), self.title,
                                                  engine.task.positive if engine.task else None)
        return web.Response(body=body, headers={"Content-Type": DOWNLOADS[name],
                                                "Content-Disposition": f'attachment; filename="{name}"'})

    async def action(self, request) -> dict[str, Any]:
        """The checks every action passes besides the token: from this page (the cookie goes with a
        cross-site request too), and JSON."""
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"{request.scheme}://{request.host}":
            raise Refused(403, f"a request from {origin} may not act on this run")
        if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
            raise Refused(403, "a cross-site request may not act on this run")
        if request.headers.get("X-Fedsock-Action") != "1" or request.content_type != "application/json":
            raise Refused(403, "actions come from the dashboard page (a JSON body and its X-Fedsock-Action header)")
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError, LookupError):  # LookupError: an unknown charset
            raise Refused(400, "the request body is not JSON") from None
        if not isinstance(body, dict):
            raise Refused(400, "the request body must be a JSON object")
        return body

    async def api_start(self, request):
        body = await self.action(request)
        try:
            message = self.engine.control.request_launch({k: v for k, v in body.items() if v not in (None, "")})
        except ValueError as exc:
            raise Refused(409, str(exc)) from None
        return self.done(f"dashboard: {message}")

    async def api_stop(self, request):
        await self.action(request)
        engine = self.engine
        if engine.control.phase == "finished":
            raise Refused(409, "the run has already ended")
        if not engine.control.stopping.is_set():
            engine.control.request_stop("the Stop button on the dashboard")
        return self.done("dashboard: stopping; the run ends after its current step, with its checkpoint whole")

    async def api_more(self, request):
        body = await self.action(request)
        try:
            message = self.engine.control.request_more(body.get("rounds"))
        except ValueError as exc:
            raise Refused(409, str(exc)) from None
        return self.done(f"dashboard: {message}")

    def done(self, message: str):
        self.engine.events.notice(message)
        return web.json_response({"ok": True, "message": message})


async def answer_checked(access: Access, request, handler):
    """Every request, to the live page or the runs view: the Host check, the token, errors as one JSON
    sentence, the security headers."""
    try:
        response = access.check(request) or await handler(request)
    except Refused as exc:
        response = web.json_response({"error": str(exc)}, status=exc.status)
    except web.HTTPException as exc:  # 404, 405, 413: a sentence too
        response = web.json_response({"error": exc.reason}, status=exc.status)
    except Exception as exc:  # a bug: one warning line, a sentence for the page, and the run goes on
        warn(WHO, f"internal: the dashboard could not answer {request.method} {request.path}: "
                  f"{type(exc).__name__}: {exc}")
        response = web.json_response({"error": f"internal error: {type(exc).__name__}"}, status=500)
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


async def static_file(request):
    """One of fedsock/static/'s files, by its plain name."""
    name = request.match_info["name"]
    path = STATIC / name
    if "/" in name or name.startswith(".") or not path.is_file():
        raise web.HTTPNotFound()
    return web.FileResponse(path)


def host_name(host: str) -> str:
    """A Host header's name or address: no port, no IPv6 brackets, no final dot, lower case."""
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    return host.rstrip(".").lower()


def is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def machine_names() -> set[str]:
    """The names another machine may use for this one: its host name, short and qualified, and mDNS's."""
    host = socket.gethostname().lower()
    short = host.split(".")[0]
    return {name for name in (host, short, f"{short}.local", socket.getfqdn().lower()) if name}


def end_feed(queue: asyncio.Queue, keep: bool) -> None:
    """Put the end mark (None) in a page's queue: after what it holds (`keep`, if there is room for the
    mark), or instead of it (a page too far behind reconnects to a fresh snapshot anyway)."""
    if not keep or queue.full():
        while not queue.empty():
            queue.get_nowait()
    queue.put_nowait(None)


def dumps(value: Any) -> str:
    """JSON for the page; a NaN or infinite number (a diverged loss) becomes null, which JSON can say."""
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False, default=str)
    except ValueError:
        return json.dumps(finite(value), separators=(",", ":"), allow_nan=False, default=str)


def finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, deque)):
        return [finite(v) for v in value]
    return value
