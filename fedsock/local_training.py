"""A client's local training: its examples, its model, and what it does with each <MODEL>.

Imported by fedsock/client.py only once the server has welcomed the client: PyTorch and the
data load here, so `fl_client.py --help` and the first connection never wait for them.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable

import numpy as np
import torch

import client_helper
import neural_net_helper as nnh
from fedsock import compression
from fedsock.config import ClientConfig
from fedsock.console import FedsockError, UsageError, say
from fedsock.identity import Identity
from fedsock.own_data import load_own_data
from fedsock.policy import Policy, PrivacyLedger
from fedsock.privacy import ExampleLevelDP
from fedsock.secagg import MASKED, ClientSession
from fedsock.tasks import Task
from fedsock.transport import BlockingConnection
from socket_methods import (
    ERROR,
    EVALUATION,
    PROGRESS,
    SECAGG_UNMASK,
    UPDATE,
    BadMessage,
    WeightsBuffer,
    WeightsSender,
    check_finite,
    check_layout,
    decode_bitmap,
    encode_message,
    weights_layout,
)


class Progress:
    """How a round's training shows: a bar on a terminal, lines every N% for logs, or nothing."""

    def __init__(self, config: ClientConfig):
        self.config = config
        self.bar = None

    def start(self, total: int, description: str):
        if self.config.progress_every:
            every = self.config.progress_every
            marks = {-(-total * pct // 100): pct for pct in range(every, 100, every)}  # batch -> percent
            started = time.perf_counter()

            def line(done: int) -> None:
                if done in marks:
                    say(self.config.who, f"{description}: {marks[done]}% trained ({done}/{total} batches, "
                                         f"{time.perf_counter() - started:.1f} s)")

            return line
        if self.config.quiet or not sys.stderr.isatty():
            return None
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=f"{self.config.who} {description}", unit="batch", leave=False)
        return lambda done: self.bar.update(done - self.bar.n)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def progress_reports(send: Callable[[list], None], number: int, total: int, every_s: float,
                     shown: Callable[[int], None] | None) -> Callable[[int], None]:
    """A batch callback that also tells the server how far the round's training has come (<PROGRESS>): at
    most every `every_s` (the server's progress_every_s) and every 5% more, so a thousand clients send at most
    twenty reports each a round; never the last batch (the update says that). `shown` is the local bar's."""
    last = [time.monotonic(), 0.0]

    def batch_done(done: int) -> None:
        if shown is not None:
            shown(done)
        fraction, now = done / total, time.monotonic()
        if done < total and now - last[0] >= every_s and fraction - last[1] >= 0.05:
            last[:] = [now, fraction]
            send([encode_message(PROGRESS, round=number, done=round(fraction, 4))])

    return batch_done


def load_examples(config: ClientConfig, meta: dict[str, Any], task: Task) -> tuple:
    """This client's training and local test examples (x, y, test x, test y): its partition of a dataset
    every party has (the welcome's bitmap says which examples), or its own files, checked against the task."""
    if meta["dataset"]:  # a dataset every party has: the server says which examples are this client's
        if config.data:
            raise UsageError(f"this run trains on {meta['dataset']}, split by the server; --data is for runs whose "
                             f"server was started with --task image or text")
        if meta["dataset"] not in client_helper.DATASETS:
            raise BadMessage(f"the server asks for dataset {meta['dataset']!r} and model {meta['model']!r}, "
                             f"unknown here")
        train = client_helper.load_split(meta["dataset"], "train", config.data_root)
        if len(train.labels) != meta["train_size"]:
            raise BadMessage(f"the server's {meta['dataset']} has {meta['train_size']} training examples, this "
                             f"client's copy has {len(train.labels)}: not the same dataset")
        if meta["partition_bitmap"] is None:
            raise BadMessage("the server named a dataset but gave this client no partition_bitmap")
        indices = decode_bitmap(meta["partition_bitmap"], len(train.labels))
        if not len(indices):
            raise BadMessage("the server gave this client no training examples (an empty partition)")
        mine, local_test = client_helper.split_local(indices, meta["seed"], config.client_id)
        xs, ys, test_x, test_y = train.images[mine], train.labels[mine], train.images[local_test], train.labels[local_test]
    else:  # its own files, checked against the task
        if not config.data:
            raise UsageError(f"this run's clients bring their own data ({task.describe()}): pass --data PATH")
        own = load_own_data(config.data, task, config.data_format, config.label_column, config.text_column)
        if own.test_x is None:  # no test split of its own: hold out 10%, as every client does
            mine, local_test = client_helper.split_local(np.arange(len(own.y)), meta["seed"], config.client_id)
            xs, ys, test_x, test_y = own.x[mine], own.y[mine], own.x[local_test], own.y[local_test]
        else:
            xs, ys, test_x, test_y = own.x, own.y, own.test_x, own.test_y
        if not len(ys):
            raise UsageError(f"--data {config.data} leaves no training examples")
        say(config.who, f"own data: {len(ys)} training and {len(test_y)} test examples from {own.source}")
    return xs, ys, test_x, test_y


class LocalTrainer:
    """This client's data and model, loaded once and kept for the whole run."""

    def __init__(self, config: ClientConfig, meta: dict[str, Any], policy: Policy | None = None,
                 identity: Identity | None = None):
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        if meta["model"] not in nnh.MODELS:
            raise BadMessage(f"the server asks for model {meta['model']!r}, unknown here")
        self.task = task = Task.from_json(meta["task"])
        if not nnh.model_fits(meta["model"], task.kind):
            raise BadMessage(f"the server asks for model {meta['model']!r} for a {task.kind} task")
        nbytes = nnh.model_nbytes(meta["model"], task)  # before the data or the model takes any memory
        if nbytes > config.max_message_mb * 2**20:
            raise BadMessage(f"the {meta['model']} model has {nbytes / 2**20:.1f} MB of weights, over this "
                             f"client's --max-message-mb {config.max_message_mb:g}")
        self.device = nnh.choose_device(config.device)
        xs, ys, test_x, test_y = load_examples(config, meta, task)
        self.data = nnh.LocalData(*nnh.to_tensors(xs, ys, task, self.device),
                                  *nnh.to_tensors(test_x, test_y, task, self.device))
        self.model = nnh.build_model(meta["model"], task, meta["seed"]).to(self.device)
        self.federated_evaluation = meta["federated_evaluation"]
        self.layout = weights_layout(nnh.get_weights(self.model))
        self.compression = compression.Compression.from_json(meta["compression"])
        self.secagg = None  # secure aggregation: this client's side of each round's protocol
        if meta["secure_aggregation"]:
            self.secagg = ClientSession(config.client_id, sum(t.numel() for t in nnh.get_weights(self.model).values()),
                                        identity, policy)
        self.ledger = PrivacyLedger(policy or Policy(), meta["dp_mode"])  # each <MODEL>'s DP, against the policy
        # what the model arrives as: its own layout, or the compressed broadcast's
        self.model_wire_layout = compression.update_layout(self.layout, self.compression.broadcast)
        self.received = WeightsBuffer(self.model_wire_layout)
        self.residual: dict = {}  # topk's error feedback: what was not sent yet
        self.sender = WeightsSender()
        # CPU weights are sent from the model's own memory; others are copied out once, into this.
        self.send_buffer = bytearray(self.layout["nbytes"]) if self.device.type != "cpu" else None
        self.seed = meta["seed"]
        self.num_rounds = meta["num_rounds"]
        self.progress = Progress(config)
        self.progress_every_s = meta.get("progress_every_s")  # absent: the server wants no <PROGRESS>
        nnh.warm_up(self.model, self.data.x, self.data.y)
        self.dp_sgd = None
        if config.dp_sgd:
            if "augment" in meta["required_features"]:  # every <MODEL> of this run will ask for it
                raise UsageError("this client trains with --dp-sgd, which it cannot combine with the run's "
                                 "augmentation (the server's --augment)")

            self.dp_sgd = ExampleLevelDP(self.model, config.dp_sgd_noise_multiplier, config.dp_sgd_clip,
                                         config.dp_sgd_delta)

    @property
    def num_examples(self) -> int:
        return len(self.data.x)

    def label_counts(self) -> list[int]:
        """Its training examples per class, for <READY>: counts only, never an example."""
        return torch.bincount(self.data.y.cpu(), minlength=self.task.num_classes).tolist()

    def fit(self, conn: BlockingConnection, message: dict[str, Any], order=None) -> list:
        """Receive the global weights, train, test locally; the <UPDATE> frames to send. With the connection's
        `order`, and a server that asks for them (progress_every_s), <PROGRESS> reports go out while it trains."""
        number = message["round"]
        augment = message.get("augment", "none")
        if augment not in nnh.AUGMENTATIONS or (augment != "none" and self.task.kind == "text"):
            raise BadMessage(f"<MODEL> asks for augmentation {augment[:40]!r}, which this client does not know for "
                             f"{self.task.kind} examples")
        if self.dp_sgd is not None and (message["proximal_mu"] > 0 or "dp_clip" in message or augment != "none"):
            reason = ("this client trains with --dp-sgd, which it cannot combine with the run's "
                      + ("FedProx proximal term" if message["proximal_mu"] > 0 else
                         "augmentation" if augment != "none" else "client-side update noise"))
            conn.send([encode_message(ERROR, message=reason)])
            raise FedsockError(reason)
        threshold = self.secagg.threshold(number) if self.secagg is not None else None
        privacy = self.ledger.check_model(message, threshold)  # the policy's DP checks, before any training
        tensors = self.receive_model(conn, message)
        evaluation = {}
        if self.federated_evaluation:  # what the received model (last round's) scores on this client's test split
            nnh.set_weights(self.model, tensors)
            loss_sum, confusion = nnh.evaluate_counts(self.model, self.data.test_x, self.data.test_y,
                                                      self.task.num_classes)
            evaluation = dict(eval_round=number - 1, eval_loss_sum=loss_sum, eval_confusion=confusion.tolist())
        description = f"round {number}/{self.num_rounds}" if number <= self.num_rounds else f"round {number}"
        batches = nnh.batches_per_round(self.num_examples, message["local_epochs"], message["batch_size"])
        progress = self.progress.start(batches, description)
        if order is not None and self.progress_every_s:
            def send(frames: list) -> None:
                order.send(PROGRESS)
                conn.send(frames)

            progress = progress_reports(send, number, batches, self.progress_every_s, progress)
        try:
            metrics = nnh.local_round(
                self.model, self.data, tensors, epochs=message["local_epochs"], batch_size=message["batch_size"],
                lr=message["lr"], proximal_mu=message["proximal_mu"], augment=augment, dp_clip=message.get("dp_clip"),
                dp_noise_std=message.get("dp_noise_std", 0.0), dp_sgd=self.dp_sgd,
                seed=hash((self.seed, self.config.client_id, number)) & 0x7FFFFFFF,
                progress=progress,
            )
        finally:
            self.progress.stop()
        if self.config.slowdown > 1:  # --slowdown: a slow device on purpose; it reports the time it took, slowed
            time.sleep((self.config.slowdown - 1) * metrics["fit_seconds"])
            metrics["fit_seconds"] *= self.config.slowdown
        if self.dp_sgd is not None:
            metrics["dp_sgd_epsilon"] = self.dp_sgd.epsilon()
            privacy += f", DP-SGD epsilon {metrics['dp_sgd_epsilon']:.3g} at delta {self.config.dp_sgd_delta:g}"
        augmented = f" ({augment} augmentation)" if augment != "none" else ""
        say(self.config.who, f"round {number}: trained on {self.num_examples} examples{augmented}, loss {metrics['train_loss']:.4f}, "
                             f"local test acc {100 * metrics['local_test_accuracy']:.2f}%, {metrics['fit_seconds']:.1f} s"
                             f"{privacy}")
        weights, extra = nnh.get_weights(self.model), {}
        if self.secagg is not None:  # the delta, weighted, quantised and masked: all the server sees of it
            masked = self.secagg.masked_update(number, tensors, weights, self.num_examples)
            weights = {MASKED: torch.from_numpy(masked)}
        elif self.compression.kind != "none":  # the delta from the model received, made small
            # int8's stochastic rounding: seeded by (seed, client, round), as a simulation's is
            rounding = torch.Generator().manual_seed(hash((self.seed, self.config.client_id, number, 8)) & 0x7FFFFFFF)
            weights, params = compression.compress_update(tensors, weights, self.compression, self.residual, rounding)
            extra = {"compression_params": params} if params else {}
        return self.sender.frames(
            UPDATE, weights, out=self.send_buffer, round=number, client_id=self.config.client_id,
            num_examples=self.num_examples, **metrics, **evaluation, **extra,
        )

    def receive_model(self, conn: BlockingConnection, message: dict[str, Any]) -> dict:
        """The weights frame behind a <MODEL> or <EVALUATE>, checked; decoded if the broadcast is compressed."""
        check_layout(message["weights"], self.model_wire_layout)
        conn.recv_blob(self.received.buffer)
        tensors = self.received.tensors  # views of the bytes just received
        check_finite(tensors)
        kind = self.compression.broadcast
        if kind == "none":
            if "broadcast_params" in message:
                raise BadMessage("broadcast_params with a model that is not compressed")
            return tensors
        params = compression.check_params(kind, message.get("broadcast_params"), self.layout, "broadcast_params")
        return compression.decode_broadcast(kind, tensors, params, nnh.get_weights(self.model))

    def secure_aggregation(self, message: dict[str, Any]) -> tuple[str, dict] | None:
        """A secure-aggregation message from the server; the answer to send, if any."""
        if self.secagg is None:
            raise BadMessage(f"{message['header']} in a run without secure aggregation")
        answer = self.secagg.answer(message)
        if message["header"] == SECAGG_UNMASK and not self.config.quiet:
            say(self.config.who, f"round {message['round']}: revealed the shares to unmask {len(message['survivors'])} "
                                 f"updates ({len(message['dropped'])} dropped)")
        return answer

    def evaluate(self, conn: BlockingConnection, message: dict[str, Any]) -> list:
        """<EVALUATE>: the model of the run's last round, on this client's test split; the <EVALUATION>."""
        nnh.set_weights(self.model, self.receive_model(conn, message))
        loss_sum, confusion = nnh.evaluate_counts(self.model, self.data.test_x, self.data.test_y,
                                                  self.task.num_classes)
        accuracy = float(confusion.trace()) / max(int(confusion.sum()), 1)
        say(self.config.who, f"evaluated round {message['round']}'s model on {int(confusion.sum())} test examples: "
                             f"acc {100 * accuracy:.2f}%")
        return [encode_message(EVALUATION, round=message["round"], eval_loss_sum=loss_sum,
                               eval_confusion=confusion.tolist())]
