"""How good the global model is: on the server's test set, and on the clients' own test splits.

`Evaluator` tests the global weights on the server's held-out set (in the engine's worker
thread). `FederatedEvaluation` adds up what the clients measured of a model on their own
test splits: counts (a loss sum and a confusion matrix), so the total is exact whatever
the split sizes. A client evaluates the model it receives before it trains on it, so
round r's <UPDATE> carries the evaluation of round r-1's model; the last model is asked
for with <EVALUATE>.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import torch

import neural_net_helper as nnh
from fedsock.clients import ClientProxy, EvalRes, GlobalModel
from fedsock.events import Events, FederatedEvaluation as Evaluated
from fedsock.tasks import Task


class Evaluator:
    """The server's test set and a model to evaluate the global weights on (in the worker thread):
    accuracy, loss, precision, recall and F1 of the task's positive class, and the confusion matrix.
    Without a test set (clients with their own data, no --test-data) it measures nothing."""

    def __init__(self, model: torch.nn.Module, test: tuple[torch.Tensor, torch.Tensor] | None, task: Task):
        self.model, self.test, self.task = model, test, task

    def __call__(self, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        if self.test is None:
            return {}
        nnh.set_weights(self.model, tensors)
        loss_sum, confusion = nnh.evaluate_counts(self.model, *self.test, self.task.num_classes)
        return {f"test_{k}": v for k, v in nnh.scores(confusion, loss_sum, self.task.positive_index).items()} | {
            "confusion": confusion.tolist()}


class FederatedEvaluation:
    """The clients' evaluations of each round's model, added up until that round's row is written."""

    def __init__(self, events: Events, task: Task | None):
        self.events, self.task = events, task
        self.counts: dict[int, list] = {}  # round -> [clients, loss sum, confusion]

    def note(self, number: int, loss_sum: float, confusion: np.ndarray) -> None:
        entry = self.counts.setdefault(number, [0, 0.0, 0])
        entry[0], entry[1], entry[2] = entry[0] + 1, entry[1] + loss_sum, entry[2] + confusion

    def attach(self, number: int, metrics: list[dict[str, Any]]) -> None:
        """Put the clients' evaluation of round `number`'s model into its row (written with the next
        checkpoint), and say it."""
        entry = self.counts.pop(number, None)
        row = next((r for r in metrics if r["round"] == number), None)
        if entry is None or row is None or "fed_clients" in row:  # --stay: a session's end evaluated it already
            return
        clients, loss_sum, confusion = entry
        scores = nnh.scores(confusion, loss_sum, self.task.positive_index if self.task else None)
        if not scores:
            return
        row.update({f"fed_{k}": v for k, v in scores.items()}, fed_clients=clients, fed_examples=int(confusion.sum()))
        if "confusion" not in row or row.get("test_accuracy") is None:
            row["confusion"] = confusion.tolist()
        self.events.emit(Evaluated(number, clients, int(confusion.sum()), scores))

    async def ask(self, proxies: list[ClientProxy], number: int, model: GlobalModel, timeout_s: float) -> None:
        """The last model's evaluation: no round follows to carry it, so each idle client is asked."""
        answers = await asyncio.gather(*(asyncio.wait_for(p.evaluate(number, model), timeout_s) for p in proxies),
                                       return_exceptions=True)
        for answer in answers:
            if isinstance(answer, EvalRes):
                self.note(number, answer.loss_sum, answer.confusion)
