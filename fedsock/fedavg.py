"""Federated averaging (McMahan et al. 2017) as pure functions over tensors.

The server folds each update into a running weighted sum the moment it
arrives, so its memory holds one sum per tensor however many clients report.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch


class RunningAverage:
    """The example-weighted mean of the updates added so far.

    Sums are kept in float64: each float32 value times an integer example count is
    exact there, so the result does not depend on the order in which updates arrive.
    """

    def __init__(self, template: Mapping[str, torch.Tensor]):
        self._dtypes = {name: t.dtype for name, t in template.items()}
        self._sums = {name: torch.zeros(t.shape, dtype=torch.float64) for name, t in template.items()}
        self.total_examples = 0
        self.count = 0

    def add(self, tensors: Mapping[str, torch.Tensor], num_examples: int) -> None:
        if num_examples <= 0:
            raise ValueError("an update must carry at least one example")
        for name, total in self._sums.items():
            total.add_(tensors[name], alpha=num_examples)  # promoted to float64 on the fly, no temporary
        self.total_examples += num_examples
        self.count += 1

    def result(self) -> dict[str, torch.Tensor]:
        if not self.count:
            raise ValueError("no update to average")
        averaged = {}
        for name, total in self._sums.items():
            mean = total / self.total_examples
            dtype = self._dtypes[name]
            if dtype == torch.bool:
                mean = mean >= 0.5
            elif not dtype.is_floating_point:
                mean = mean.round()
            averaged[name] = mean.to(dtype)
        return averaged


def fedavg(updates: Iterable[tuple[Mapping[str, torch.Tensor], int]]) -> dict[str, torch.Tensor]:
    """Weighted mean of (weights, num_examples) pairs, weights in proportion to examples."""
    updates = list(updates)
    if not updates:
        raise ValueError("no update to average")
    running = RunningAverage(updates[0][0])
    for tensors, num_examples in updates:
        running.add(tensors, num_examples)
    return running.result()
