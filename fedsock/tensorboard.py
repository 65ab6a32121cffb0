"""`--tensorboard DIR`: the run's metrics as TensorBoard scalars, for people who keep their other runs there.

`TensorBoardLog` is an observer, like fedsock.run_files.RunFiles, and reads the same thing: the rows of
each checkpoint (`RoundFinished`, `MetricsUpdated`). Every numeric column of metrics.csv becomes a
scalar, the round its step, tagged by what it measures ("test/accuracy", "traffic/bytes_sent", ...);
the settings and the model card go to the text tab, and the settings that shape the model to the
HParams tab, so that runs can be compared by them.

A row can change after it was first written (the clients' evaluation of round r arrives with round
r+1, or at the end). A new value is simply written; but TensorBoard keeps every value logged at a step,
so a value that changed would show twice. Then the log says "restart from step s" (a SessionLog START
event, which TensorBoard reads as: forget what was logged at s and after) and writes the rows from s
again. A resumed run does the same from its first round, in a new event file in the same folder
(TensorBoard reads them as one run): the event files end with metrics.csv's numbers, to float32.

The writing, and the flush after each round (so that `tensorboard --logdir` shows it live), happen in a
thread of its own; a folder that cannot be written is a warning, never the end of the run.
"""

from __future__ import annotations

import math
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from fedsock.console import UsageError, warn
from fedsock.events import BackgroundObserver, MetricsUpdated, RoundFinished
from fedsock.run_files import METRIC_COLUMNS, Checkpoint

INSTALL = "pip install tensorboard (or pip install -e '.[tensorboard]')"
TAGS = {
    "clients": "federation/clients",
    "test_accuracy": "test/accuracy", "test_loss": "test/loss", "test_precision": "test/precision",
    "test_recall": "test/recall", "test_f1": "test/f1",
    "train_loss": "train/loss",
    "seconds": "time/round_seconds", "max_fit_seconds": "time/max_fit_seconds", "sum_fit_seconds": "time/sum_fit_seconds",
    "bytes_sent": "traffic/bytes_sent", "bytes_received": "traffic/bytes_received",
    "epsilon": "privacy/epsilon",
    "fed_accuracy": "federated/accuracy", "fed_loss": "federated/loss", "fed_precision": "federated/precision",
    "fed_recall": "federated/recall", "fed_f1": "federated/f1", "fed_clients": "federated/clients",
    "fed_examples": "federated/examples",
    "virtual_seconds": "time/virtual_seconds",
}
NOT_SCALARS = ("round", "confusion", "session", "resumed")  # the step itself, a matrix, where sessions began


def missing_tensorboard() -> str | None:
    """The sentence to say when the tensorboard package (which torch's writer needs) is missing; None when it is not."""
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return f"--tensorboard needs the tensorboard package, which is not installed: {INSTALL}"
    return None


def require_tensorboard() -> None:
    if missing := missing_tensorboard():
        raise UsageError(missing)


def scalars_of(rows: list[dict[str, Any]]) -> dict[tuple[str, int], float]:
    """(tag, round) -> value for every numeric cell of metrics.csv's rows."""
    out = {}
    for row in rows:
        for column in METRIC_COLUMNS:
            value = row.get(column)
            if column in NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            out[(TAGS.get(column, f"other/{column}"), row["round"])] = float(value)
    return out


def same(a: float | None, b: float | None) -> bool:
    return a == b or (a is not None and b is not None and math.isnan(a) and math.isnan(b))


def settings_markdown(config: Any) -> str:
    """The run's settings as a Markdown table, without the file paths of its secrets."""
    from fedsock.config import SecuritySettings

    hidden = {spec.name for spec in fields(SecuritySettings)} | {"federation"}
    rows = [f"| {name} | {value} |" for name, value in asdict(config).items() if name not in hidden]
    return "| setting | value |\n|---|---|\n" + "\n".join(rows)


def run_hparams(config: Any) -> dict[str, Any]:
    """The settings that shape the model (the HParams tab compares runs by them): who trains, how, the
    strategy, DP, secure aggregation, compression and the data, without file paths."""
    from fedsock import config as settings

    groups = (settings.FederationSettings, settings.TrainingSettings, settings.StrategySettings, settings.DPSettings,
              settings.SecAggSettings, settings.CompressionSettings, settings.DataSettings)
    paths = {"data_root", "initial_model", "federation"}
    return {spec.name: getattr(config, spec.name) for group in groups for spec in fields(group)
            if spec.name not in paths and hasattr(config, spec.name)}


class TensorBoardLog(BackgroundObserver):
    """Writes each round's metrics as TensorBoard scalars to `log_dir` (see the module's docstring)."""

    def __init__(self, log_dir: str | Path, config: Any, resumed: Checkpoint | None = None,
                 model_card: str | None = None):
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        try:
            # purge_step: a resumed run's events replace those its first run logged from round 1 on
            self.writer = SummaryWriter(str(self.log_dir), purge_step=1 if resumed is not None else None)
        except OSError as exc:
            raise UsageError(f"cannot write to --tensorboard {log_dir}: {exc.strerror or exc}") from exc
        self.written: dict[tuple[str, int], float] = {}
        super().__init__("tensorboard")
        self.broken = False
        # step 0, before the first round: no restart marker (always at a round, 1 or later) can hide them
        self.writer.add_text("settings", settings_markdown(config), 0)
        if model_card:
            self.writer.add_text("model_card", model_card, 0)
        self.add_hparams(config)
        if resumed is not None:
            self.submit(self._write, resumed.metrics)

    def add_hparams(self, config: Any) -> None:
        """The HParams tab's record of this run (in its own folder, unlike SummaryWriter.add_hparams, which
        makes a new run of its own): its settings, and the metrics to compare runs by."""
        from torch.utils.tensorboard.summary import hparams

        metrics = {tag: 0.0 for tag in ("test/accuracy", "test/loss", "federated/accuracy", "train/loss")}
        for summary in hparams(run_hparams(config), metrics):
            self.writer._get_file_writer().add_summary(summary)

    def notify(self, event) -> None:
        if isinstance(event, (RoundFinished, MetricsUpdated)) and event.checkpoint is not None:
            self.submit(self._write, event.checkpoint.metrics)

    def _write(self, rows: list[dict[str, Any]]) -> None:
        if self.broken:
            return
        try:
            self.log(scalars_of(rows))
        except Exception as exc:  # a view of the run: its failure must not end the federation
            self.broken = True
            warn("tensorboard", f"stopped writing to {self.log_dir} ({type(exc).__name__}: {exc}); the run goes on, "
                                f"metrics.csv has every round")

    def log(self, scalars: dict[tuple[str, int], float]) -> None:
        """Write what is new; from the first step whose value changed (or went), everything again."""
        changed = [step for (tag, step), value in self.written.items() if not same(scalars.get((tag, step)), value)]
        if changed:
            start = min(changed)
            self.restart_at(start)
            self.written = {key: value for key, value in self.written.items() if key[1] < start}
        for (tag, step), value in sorted(scalars.items(), key=lambda item: (item[0][1], item[0][0])):
            if (tag, step) not in self.written:
                self.writer.add_scalar(tag, value, step)
                self.written[(tag, step)] = value
        self.writer.flush()

    def restart_at(self, step: int) -> None:
        """What SummaryWriter(purge_step=step) writes: TensorBoard forgets the events logged at `step` and after."""
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        self.writer._get_file_writer().add_event(Event(step=step, session_log=SessionLog(status=SessionLog.START)))

    def close(self) -> None:
        super().close()
        try:
            self.writer.close()
        except Exception:  # noqa: BLE001 - already warned in _write, or nothing left to lose
            pass
