"""What each finished round leaves: its row of metrics, its evaluation, and a checkpoint.

The engine hands a finished round's model to `RoundReports.report`, which evaluates it in a
worker thread while the next round's model is already going out, then tells the observers
(`RoundFinished` carries the checkpoint that fedsock.run_files.RunFiles writes). The engine
awaits `settle()` before it collects the next round, so the files of round r are on disk
before round r+1 can finish.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any, Callable

from fedsock.clients import GlobalModel
from fedsock.config import ServerConfig
from fedsock.events import Events, RoundAggregated, RoundFinished, RoundSaved
from fedsock.privacy import Privacy
from fedsock.run_files import Checkpoint
from fedsock.tasks import Task


class RoundReports:
    """The run's rows (metrics.csv's), and the evaluation and report of the last finished round."""

    def __init__(self, config: ServerConfig, events: Events, evaluate: Callable[[dict], dict[str, float]],
                 metrics: list[dict[str, Any]], privacy: Privacy | None, task: Task | None):
        self.config, self.events, self.evaluate = config, events, evaluate
        self.metrics, self.privacy, self.task = metrics, privacy, task
        self.pending: asyncio.Future | None = None  # the last round's evaluation and files
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="evaluate")

    def checkpoint(self, number: int, model: GlobalModel, strategy_state: dict) -> Checkpoint:
        extra = {"privacy": self.privacy.to_json()} if self.privacy is not None else {}
        return Checkpoint(asdict(self.config), number, [dict(r) for r in self.metrics], model.tensors,
                          strategy_state, extra)

    def start(self, row: dict[str, Any], model: GlobalModel, strategy_state: dict) -> None:
        """Report a finished round in the background; `settle()` waits for it."""
        self.events.emit(RoundAggregated(dict(row), self.config.num_rounds))
        self.pending = asyncio.ensure_future(self.report(row, model, strategy_state))

    async def report(self, row: dict[str, Any], model: GlobalModel, strategy_state: dict) -> None:
        """Evaluate the round's model (in the worker thread), then tell the observers, and wait for
        their files."""
        loop = asyncio.get_running_loop()
        row.update(await loop.run_in_executor(self.worker, self.evaluate, model.tensors))
        row["positive"] = bool(self.task and self.task.positive is not None)
        self.metrics.append(row)
        self.events.emit(RoundFinished(row, self.config.num_rounds, self.checkpoint(row["round"], model,
                                                                                    strategy_state)))
        await self.events.flush()
        self.events.emit(RoundSaved(row, self.config.num_rounds))

    async def settle(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            await pending

    def close(self) -> None:
        self.worker.shutdown(wait=True)
