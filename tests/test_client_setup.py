"""A client's setup against a hostile welcome: the model that <METADATA> describes is measured before
anything of it is built. In-process: the client's LocalTrainer, given the welcome's fields."""

from __future__ import annotations

import pytest
import torch

import neural_net_helper as nnh
from fedsock.config import ClientConfig
from fedsock.local_training import LocalTrainer
from fedsock.tasks import make_task
from socket_methods import BadMessage


def test_a_welcome_that_describes_a_huge_model_is_refused_before_it_is_built(monkeypatch):
    # The schema allows a text task of 4 M token buckets: textgru's embedding alone is 512 MB.
    task = make_task("text", "ham,spam", 28, 1, None, None, 30, 1 << 22, None)
    built_for_real = []
    real_build = nnh.build_model

    def watched_build(name, spec, seed=0):
        if torch.empty(0).device.type != "meta":  # a model with memory behind its weights
            built_for_real.append(name)
        return real_build(name, spec, seed)

    monkeypatch.setattr(nnh, "build_model", watched_build)
    meta = {"model": "textgru", "task": task.to_json(), "dataset": "", "seed": 0}
    with pytest.raises(BadMessage, match=r"the textgru model has 512\.1 MB of weights, over this client's "
                                         r"--max-message-mb 64"):
        LocalTrainer(ClientConfig(client_id=1, data="unused.tsv"), meta)
    assert built_for_real == []


def test_the_size_counted_without_memory_is_the_built_models():
    task = make_task("image", "a,b", 28, 1, None, None, 30, 2, None)
    for name in ("logreg", "mlp", "cnn"):
        model = nnh.build_model(name, task)
        assert nnh.model_nbytes(name, task) == sum(t.numel() * t.element_size() for t in model.state_dict().values())
