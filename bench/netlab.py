"""Separate hosts on one machine: network namespaces joined by a switch that can impair each link.

Each host is a Linux network namespace with one TAP device and a private address (10.99.0.0/24,
which exists only inside these namespaces). The switch is this file run as a process
(`netlab.py relay`): it holds the other end of every TAP device and forwards Ethernet frames
between them, as a learning switch does, after putting each through the impairments of the
links it crosses (its sender's and its receiver's):

- `delay_ms`: each frame is held this long, each way (so a round trip gains twice as much);
- `loss`: each frame is dropped with this probability, each way (a seeded RNG);
- `rate_mbit`: each direction of the link carries at most this many megabits per second, with
  a drop-tail queue of QUEUE_MS of traffic (a router's buffer);
- `hold`: while on, every frame to or from the host is dropped: a partition (cable pulled).

Why a user-space switch, not the kernel's: this machine's kernel has no `netem` qdisc, and tc's
`tbf`, which it has, shapes only what leaves an interface, so it cannot shape the direction
towards one client on a shared server link. The switch shapes both directions of every link
the same way, in one place. Its own cost is measured in bench/network.py (a link without
impairments against loopback).

The switch takes commands on its standard input, one per line, and answers each with
`relay: ok N` (N counts the commands), which is what callers synchronise on:
    set HOST_INDEX [delay_ms=X] [loss=P] [rate_mbit=R] [hold=0|1]
    stats
    after HOST_INDEX FRAMES   (answered once the host has sent FRAMES more frames through the switch)
"""

from __future__ import annotations

import fcntl
import heapq
import os
import random
import select
import shutil
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve()
SUBNET = "10.99.0"
TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
QUEUE_MS = 50.0  # a shaped link's queue: this much traffic at its rate, then drop-tail
MAX_FRAME = 65536


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None: they can)."""
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    if not shutil.which("ip"):
        return "no `ip` command (apt-get install iproute2)"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun (TAP devices)"
    probe = f"fsk-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode:
        return f"`ip netns add` is not permitted here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


# --------------------------------------------------------------------------- the switch (a process)


@dataclass
class Direction:
    """One direction of a link: its rate and the time its queue drains."""

    rate_bps: float = 0.0  # 0: unlimited
    free_at: float = 0.0

    def depart(self, now: float, nbytes: int) -> float | None:
        """When a frame entering now leaves (serialised at the rate), or None: the queue is full."""
        if not self.rate_bps:
            return now
        start = max(now, self.free_at)
        if start - now > QUEUE_MS / 1000:
            return None
        self.free_at = start + nbytes * 8 / self.rate_bps
        return self.free_at


@dataclass
class Link:
    delay_s: float = 0.0
    loss: float = 0.0
    hold: bool = False
    up: Direction = None  # from the host
    down: Direction = None  # to the host
    frames: int = 0
    dropped: int = 0

    def __post_init__(self):
        self.up, self.down = Direction(), Direction()


def open_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    return fd


def relay(taps: list[str], seed: int) -> None:
    fds = [open_tap(name) for name in taps]
    links = [Link() for _ in taps]
    port_of_fd = {fd: i for i, fd in enumerate(fds)}
    where: dict[bytes, int] = {}  # MAC -> port (learnt)
    rng = random.Random(seed)
    pending: list[tuple[float, int, int, bytes]] = []  # (deliver at, seq, port, frame)
    seq = commands = 0
    waiting: list[tuple[int, int, int]] = []  # `after` commands: (port, frames to reach, command number)
    stdin = sys.stdin.fileno()
    print("relay: ready", flush=True)
    while True:
        now = time.monotonic()
        while pending and pending[0][0] <= now:
            _, _, port, frame = heapq.heappop(pending)
            try:
                os.write(fds[port], frame)
            except OSError:  # the host's queue is full, or it is down: the frame is lost, as on a wire
                links[port].dropped += 1
        wait = max(0.0, pending[0][0] - now) if pending else 1.0
        readable, _, _ = select.select([stdin, *fds], [], [], wait)
        now = time.monotonic()
        for fd in readable:
            if fd == stdin:
                line = sys.stdin.readline()
                if not line:
                    return  # the lab closed our input: the end
                commands += 1
                words = line.split()
                if words[:1] == ["after"]:
                    port = int(words[1])
                    waiting.append((port, links[port].frames + int(words[2]), commands))
                else:
                    print(f"relay: ok {commands} {command(words, links)}", flush=True)
                continue
            for _ in range(64):  # what is there, a bounded batch at a time
                try:
                    frame = os.read(fd, MAX_FRAME)
                except BlockingIOError:
                    break
                source = port_of_fd[fd]
                where[frame[6:12]] = source
                target = where.get(frame[0:6])
                for port in ([target] if target is not None else [p for p in range(len(fds)) if p != source]):
                    if port == source:
                        continue
                    at = carry(links[source], links[port], now, len(frame), rng)
                    if at is not None:
                        seq += 1
                        heapq.heappush(pending, (at, seq, port, frame))
        for entry in [w for w in waiting if links[w[0]].frames >= w[1]]:
            waiting.remove(entry)
            print(f"relay: ok {entry[2]} after", flush=True)


def carry(sender: Link, receiver: Link, now: float, nbytes: int, rng: random.Random) -> float | None:
    """When a frame from `sender`'s host reaches `receiver`'s, or None if one of the links loses it."""
    sender.frames += 1
    if sender.hold or receiver.hold or rng.random() < sender.loss or rng.random() < receiver.loss:
        sender.dropped += 1
        return None
    left = sender.up.depart(now, nbytes)
    if left is None:
        sender.dropped += 1
        return None
    arrives = receiver.down.depart(left + sender.delay_s, nbytes)
    if arrives is None:
        sender.dropped += 1
        return None
    return arrives + receiver.delay_s


def command(words: list[str], links: list[Link]) -> str:
    if words and words[0] == "stats":
        return " ".join(f"{i}:{link.frames}/{link.dropped}" for i, link in enumerate(links))
    if len(words) < 2 or words[0] != "set":
        return "unknown command"
    link = links[int(words[1])]
    for word in words[2:]:
        key, value = word.split("=", 1)
        if key == "delay_ms":
            link.delay_s = float(value) / 1000
        elif key == "loss":
            link.loss = float(value)
        elif key == "rate_mbit":
            link.up.rate_bps = link.down.rate_bps = float(value) * 1e6
        elif key == "hold":
            link.hold = value == "1"
    return "set"


# --------------------------------------------------------------------------- the lab (in the caller)


class NetLab:
    """Namespaces `hosts[i]` at 10.99.0.(i + 1), and the switch between them; `close()` removes it all.

    `proc_class` is the caller's process runner (bench/common.Proc or the tests' Proc)."""

    def __init__(self, hosts: list[str], proc_class, seed: int = 0):
        self.proc_class = proc_class
        self.tag = f"fsk{os.getpid() % 100000}"
        self.hosts = list(hosts)
        self.namespaces = {host: f"{self.tag}-{host}" for host in hosts}
        taps = [f"{self.tag}t{i}" for i in range(len(hosts))]
        self.commands = 0
        self.relay = proc_class([str(HERE), "relay", "--seed", str(seed), *taps], "relay", stdin_pipe=True)
        self.made: list[str] = []
        try:
            self.relay.wait_for(r"relay: ready", timeout=30)
            for i, (host, tap) in enumerate(zip(hosts, taps)):
                ns = self.namespaces[host]
                self._ip("netns", "add", ns)
                self.made.append(ns)
                self._ip("link", "set", tap, "netns", ns)
                self._ip("-n", ns, "addr", "add", f"{self.address(host)}/24", "dev", tap)
                self._ip("-n", ns, "link", "set", tap, "up")
                self._ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _ip(*args: str) -> None:
        done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
        if done.returncode:
            raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")

    def address(self, host: str) -> str:
        return f"{SUBNET}.{self.hosts.index(host) + 1}"

    def _command(self, line: str) -> str:
        self.commands += 1
        self.relay.popen.stdin.write(line + "\n")
        self.relay.popen.stdin.flush()
        return self.relay.wait_for(rf"relay: ok {self.commands} (.*)", timeout=10).group(1)

    def impair(self, host: str, *, delay_ms: float | None = None, loss: float | None = None,
               rate_mbit: float | None = None, hold: bool | None = None) -> None:
        """Change `host`'s link (both directions); only the settings given change."""
        settings = {"delay_ms": delay_ms, "loss": loss, "rate_mbit": rate_mbit,
                    "hold": None if hold is None else int(hold)}
        words = [f"{k}={v}" for k, v in settings.items() if v is not None]
        self._command(f"set {self.hosts.index(host)} {' '.join(words)}")

    def wait_traffic(self, host: str, frames: int, timeout_s: float = 60.0) -> None:
        """Return once `host` has sent `frames` more frames (a transfer is under way)."""
        self.commands += 1
        self.relay.popen.stdin.write(f"after {self.hosts.index(host)} {frames}\n")
        self.relay.popen.stdin.flush()
        self.relay.wait_for(rf"relay: ok {self.commands} after", timeout=timeout_s)

    def stats(self) -> dict[str, tuple[int, int]]:
        """Frames sent by each host and how many of them were lost."""
        parts = self._command("stats").split()
        return {self.hosts[int(p.split(":")[0])]: tuple(map(int, p.split(":")[1].split("/"))) for p in parts}

    def run(self, host: str, args: list[str], name: str, env: dict | None = None):
        """A Python program (a path relative to the repository) in `host`'s namespace."""
        return self.proc_class(["ip", "netns", "exec", self.namespaces[host], sys.executable, "-u", *args], name,
                               env, interpreter=None)

    def close(self) -> None:
        """Remove the namespaces this lab made, and end its switch (by its PID)."""
        for ns in self.made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self.made = []
        self.relay.close_stdin()
        try:
            self.relay.finish(timeout=10)
        except Exception:
            self.relay.kill()


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "relay":
        args = sys.argv[2:]
        seed = 0
        if args[:1] == ["--seed"]:
            seed, args = int(args[1]), args[2:]
        try:
            relay(args, seed)
        except KeyboardInterrupt:
            pass
    else:
        print(__doc__)
