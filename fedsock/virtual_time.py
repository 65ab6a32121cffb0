"""A virtual clock for in-process simulations (fl_simulate.py --virtual-clock), and the clients' speeds.

The clients train for real, so accuracy is real, but time is virtual: a discrete-event simulation
run by the asyncio event loop itself. `VirtualTimeLoop.time()` is the virtual now, and when the loop
has nothing to do but wait for its next timer, it jumps to that timer instead of sleeping. A virtual
client trains for real, then sleeps (in virtual seconds) until its finish time: the start of its fit
plus its profile's fit time. So the engine sees updates in virtual-time order, whatever order their
real training ended in, and every timeout of the engine (a round's, a buffer's) is in virtual seconds
too. Neither engine knows: they read `loop.time()` as always.

The one rule that makes it correct (conservative, in the sense of discrete-event simulation): time
does not move while any real work is pending, such as a client's training, the server's evaluation or a
file write, because such work may yet schedule an earlier event. Work started with `loop.run_in_executor`
is counted by the loop; other real waits go through `held`. Real work therefore costs no virtual time:
only the profiles' fit times do (and --straggler-delay). Network time is not modelled.

Clients that finish at the same virtual instant are released together, in the order of their ids, so
the order of updates, and the model, do not depend on which thread finished first.
"""

from __future__ import annotations

import asyncio
import math
import selectors
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Awaitable

import numpy as np

REAL_POLL_S = 1.0  # while real work is pending, how often the loop looks again if nothing wakes it


class VirtualSelector(selectors.DefaultSelector):
    """The loop's selector: where the loop would sleep until its next timer, it advances the clock instead,
    unless real work is pending (then it waits for that, in real time)."""

    def __init__(self, loop: "VirtualTimeLoop"):
        super().__init__()
        self.loop = loop

    def select(self, timeout: float | None = None):
        if timeout is None or timeout <= 0:
            return super().select(timeout)
        if self.loop.pending_real_work:
            return super().select(REAL_POLL_S)  # a finished thread wakes the loop; virtual time stands still
        events = super().select(0)
        if not events:
            self.loop.virtual_s += timeout
        return events


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock is virtual seconds from `start_s` (a resumed run's last virtual time)."""

    def __init__(self, start_s: float = 0.0):
        self.virtual_s = start_s
        self.pending_real_work = 0
        self.due: dict[float, list[tuple[int, asyncio.Future]]] = {}  # instant -> (client id, its wake-up)
        super().__init__(VirtualSelector(self))

    def time(self) -> float:
        return self.virtual_s

    def run_in_executor(self, executor, func, *args) -> asyncio.Future:
        future = super().run_in_executor(executor, func, *args)
        self.hold(future)
        return future

    def hold(self, future: asyncio.Future) -> None:
        """Virtual time stands still until `future` is done."""
        self.pending_real_work += 1
        future.add_done_callback(self._let_go)

    def _let_go(self, _future: asyncio.Future) -> None:
        self.pending_real_work -= 1

    def wake_at(self, virtual_s: float, client_id: int) -> asyncio.Future:
        """A future done at the virtual instant `virtual_s`; those due at the same instant are done in the
        order of their client ids (a timer heap would order them by when they were asked for)."""
        future = self.create_future()
        if virtual_s not in self.due:
            self.due[virtual_s] = []
            self.call_at(virtual_s, self._wake, virtual_s)
        self.due[virtual_s].append((client_id, future))
        return future

    def _wake(self, virtual_s: float) -> None:
        for _, future in sorted(self.due.pop(virtual_s), key=lambda waiting: waiting[0]):
            if not future.done():
                future.set_result(None)


async def held(awaitable: Awaitable[Any]) -> Any:
    """Await real work (a thread's future, a Ray task): on a VirtualTimeLoop, time stands still until it is done."""
    loop = asyncio.get_running_loop()
    if not isinstance(loop, VirtualTimeLoop):
        return await awaitable
    future = asyncio.ensure_future(awaitable)
    loop.hold(future)
    return await future


def virtual_now() -> float | None:
    """The virtual seconds of a simulation's clock; None on an ordinary loop (real time), or outside one."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    return loop.virtual_s if isinstance(loop, VirtualTimeLoop) else None


async def sleep_until(virtual_s: float, client_id: int) -> None:
    """Sleep until the virtual instant `virtual_s` (on a VirtualTimeLoop; on another, as many real seconds)."""
    loop = asyncio.get_running_loop()
    if isinstance(loop, VirtualTimeLoop):
        await loop.wake_at(virtual_s, client_id)
    else:
        await asyncio.sleep(max(0.0, virtual_s - loop.time()))


def run_virtual(coroutine, start_s: float = 0.0) -> Any:
    """asyncio.run, on a VirtualTimeLoop."""
    with asyncio.Runner(loop_factory=lambda: VirtualTimeLoop(start_s)) as runner:
        return runner.run(coroutine)


# --------------------------------------------------------------------------- the clients' speeds


@dataclass(frozen=True)
class SpeedProfiles:
    """How long each virtual client's fit takes in virtual seconds: its examples × local epochs at
    `examples_per_s`, times its slowness. A client's slowness is lognormal(0, `sigma`) (its compute speed
    is lognormal(0, sigma), so is its inverse), drawn from (seed, client id); and exactly
    round(`slow_share` × N) clients, drawn from the seed, are `slow_factor` times slower still."""

    seed: int
    num_clients: int
    examples_per_s: float = 100.0
    sigma: float = 0.0
    slow_share: float = 0.0
    slow_factor: float = 10.0

    @cached_property
    def slow_clients(self) -> frozenset[int]:
        count = round(self.slow_share * self.num_clients)
        order = np.random.default_rng([self.seed, 0x510E]).permutation(np.arange(1, self.num_clients + 1))
        return frozenset(int(i) for i in order[:count])

    def slowness(self, client_id: int) -> float:
        factor = self.slow_factor if client_id in self.slow_clients else 1.0
        if self.sigma:
            draw = np.random.default_rng([self.seed, client_id, 0x5BEED]).standard_normal()
            factor *= float(np.exp(self.sigma * draw))
        return factor

    def fit_seconds(self, client_id: int, num_examples: int, local_epochs: int) -> float:
        return num_examples * local_epochs / self.examples_per_s * self.slowness(client_id)

    @cached_property
    def fastest(self) -> float:
        return min(self.slowness(k) for k in range(1, self.num_clients + 1))

    def real_slowdown(self, client_id: int) -> float:
        """Over sockets, where time is real: how many times as long a client's real training is made to take
        (as fl_client.py --slowdown does). Its slowness, divided by the fastest client's where that is under 1:
        real training cannot be sped up, so the clients keep the virtual clock's ratios, the fastest at the
        machine's speed."""
        return self.slowness(client_id) / min(1.0, self.fastest)


@dataclass(frozen=True)
class Availability:
    """Clients that come and go: virtual time is cut into periods of `period_s`, and in each a client is
    here with probability `share`, drawn from (seed, client id, period). A client away in a period is out
    of the pool, and a fit that a client's going away cuts short is lost (it drops when the client goes)."""

    seed: int
    share: float = 1.0
    period_s: float = 600.0

    def here(self, client_id: int, period: int) -> bool:
        if self.share >= 1:
            return True
        return bool(np.random.default_rng([self.seed, client_id, period, 0xA7A1]).random() < self.share)

    def period(self, virtual_s: float) -> int:
        return math.floor(virtual_s / self.period_s)

    def next_period(self, client_id: int, period: int, here: bool, horizon: int = 100_000) -> int | None:
        """The first period from `period` on in which the client is here (`here`) or away; None if there is
        none within `horizon` periods (with a share of 0 or 1 it never changes)."""
        if (here and self.share <= 0) or (not here and self.share >= 1):
            return None
        for later in range(period, period + horizon):
            if self.here(client_id, later) == here:
                return later
        return None

    def leaves_at(self, client_id: int, start_s: float, finish_s: float) -> float | None:
        """When a client that starts a fit at `start_s` goes away before `finish_s`: `start_s` itself if it is
        away in that period already, else the start of the first period it is away in; None if it stays."""
        period = self.period(start_s)
        horizon = max(1, math.ceil(finish_s / self.period_s) - period)  # the periods that begin before finish_s
        away = self.next_period(client_id, period, here=False, horizon=horizon)
        if away is None:
            return None
        return start_s if away == period else away * self.period_s
