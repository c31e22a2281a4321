"""Network and population models: latency, bandwidth, loss, partitions, churn, stragglers.

Everything random here is drawn from ``random.Random`` / numpy generators seeded from the
scenario's seed, in an order fixed by the (deterministic) order of events, so a run replays
exactly. Models:

* latency of one message from ``s`` to ``r``: the link's mean ``(a_s + a_r) / 2`` where each
  peer's access latency ``a`` is ``latency_ms`` times a lognormal factor (``link_spread``), then
  per message a draw from ``latency_dist`` around that mean with spread ``latency_jitter_ms``
  (from its own numpy stream, a block of standard variates at a time);
* bandwidth: each peer's uplink is ``bandwidth_mbps`` times a lognormal factor; a message
  occupies the sender's uplink for ``size / bandwidth`` (messages queue behind each other);
* loss: each message is lost with probability ``loss``; with ``retransmit_ms`` > 0 a lost
  message is sent again that much later instead (TCP-like; every try is lost with probability
  ``loss``, and after ``MAX_TRIES`` lost tries it stays lost; a resent copy counts as sent
  bytes but does not hold the uplink again);
* partition: during ``[partition_start_s, partition_end_s)`` a fixed ``partition_fraction`` of
  the peers cannot exchange messages with the rest;
* churn: at each round start every online peer leaves with probability ``churn`` (at a uniform
  time within ``churn_window_s``) and every offline peer rejoins with probability ``rejoin``;
* stragglers: a fixed ``stragglers`` fraction of peers takes ``straggler_slowdown`` times the
  ``compute_s`` of local training.
"""

from __future__ import annotations

import math
import random

import numpy as np

from simulator.config import Scenario

__all__ = ["MAX_TRIES", "LinkStream", "NetModel", "Population"]

_BLOCK = 1 << 16
MAX_TRIES = 8
"""With retransmission, a message whose every one of this many tries is lost stays lost."""


class LinkStream:
    """One stream of per-message randomness: loss draws and latency draws.

    The network has one default stream; a group round gives each group its own, seeded from
    the group, so a group's messages see the same draws whatever else runs beside it (which
    is what lets the simulator split a round's groups among worker processes).
    """

    __slots__ = ("_block", "_buffer", "_draws", "_kind", "_next", "access", "jitter", "rng")

    def __init__(
        self,
        access: list[float],
        kind: int,
        jitter: float,
        loss_seed: int | bytes,
        draw_seed: list[int],
        block: int = _BLOCK,
    ) -> None:
        self.access, self._kind, self.jitter = access, kind, jitter
        self.rng = random.Random(loss_seed)
        self._draws = np.random.default_rng(draw_seed)
        self._block = block
        self._buffer: list[float] = []
        self._next = 0

    def latency(self, sender: int, recipient: int) -> float:
        """One message's latency in seconds, drawn from the link's distribution."""
        access = self.access
        mean = 0.5 * (access[sender] + access[recipient])
        kind = self._kind
        if kind == 0:
            return mean
        j = self.jitter
        i = self._next
        if i == len(self._buffer):
            self._refill()
            i = 0
        self._next = i + 1
        z = self._buffer[i]
        if kind == 1:  # lognormal with this mean and standard deviation
            if mean <= 0.0:
                return 0.0
            sigma2 = math.log1p((j / mean) ** 2)
            return mean * math.exp(math.sqrt(sigma2) * z - 0.5 * sigma2)
        if kind == 2 or kind == 3:  # normal (z standard normal), uniform (z in [-1, 1))
            value = mean + j * z
        else:  # exponential: z standard exponential
            value = mean - j + j * z if mean > j else mean * z
        return value if value > 0.0 else 0.0

    def resends(self, loss: float) -> tuple[int, bool]:
        """After a first try was lost: ``(copies sent again, lost for good)``. A copy that gets
        through after ``r`` resends arrives ``r`` retransmission delays late; after
        ``MAX_TRIES`` lost tries (``MAX_TRIES - 1`` resends) the message stays lost."""
        rng, tries = self.rng, 1
        while tries < MAX_TRIES and rng.random() < loss:
            tries += 1
        return (tries - 1, True) if tries == MAX_TRIES else (tries, False)

    def _refill(self) -> None:
        """The next block of standard draws for the latency distribution (numpy, in one go)."""
        gen, block = self._draws, self._block
        if self._kind in (1, 2):
            values = gen.standard_normal(block)
        elif self._kind == 3:
            values = gen.uniform(-1.0, 1.0, block)
        else:
            values = gen.standard_exponential(block)
        self._buffer = values.tolist()
        self._next = 0


class NetModel:
    """Per-message latency, per-peer bandwidth, loss and partitions for ``n`` peers."""

    def __init__(self, scenario: Scenario, n: int, seed: int) -> None:
        s = scenario
        gen = np.random.default_rng([seed, 0x4E4554])
        spread = s.link_spread
        # A mean-preserving lognormal factor per peer.
        access = s.latency_ms / 1000.0 * np.exp(spread * gen.standard_normal(n) - spread**2 / 2)
        self.access: list[float] = access.tolist()
        bw = s.bandwidth_mbps * 1e6 / 8.0 * np.exp(s.bandwidth_spread * gen.standard_normal(n))
        self.seconds_per_byte: list[float] = (1.0 / bw).tolist()
        self.seed = seed
        self.loss = s.loss
        self.retransmit_s = s.retransmit_ms / 1000.0
        self.jitter = s.latency_jitter_ms / 1000.0
        self.dist = s.latency_dist
        self.partition = (s.partition_start_s, s.partition_end_s)
        cut = gen.permutation(n)[: round(s.partition_fraction * n)]
        self.side = np.zeros(n, dtype=bool)
        self.side[cut] = True
        self.side_list: list[bool] = self.side.tolist()
        # Latency draws come from their own numpy stream, a block of standard variates at a
        # time (per-message Python draws were ~2 us each at 1,000 peers); loss has its own.
        kinds = {"lognormal": 1, "normal": 2, "uniform": 3, "exponential": 4}
        self._kind = 0 if s.latency_dist == "constant" or self.jitter == 0.0 else kinds[self.dist]
        self.stream = LinkStream(
            self.access, self._kind, self.jitter, seed * 7919 + 17, [seed, 0x4C4154]
        )

    def group_stream(self, key: bytes) -> LinkStream:
        """A stream of its own for the group ``key`` (its id: unique per round), with a small
        block (a group of 8 sends ~300 messages a round)."""
        words = [int.from_bytes(key[i : i + 4], "big") for i in range(0, len(key), 4)]
        return LinkStream(
            self.access,
            self._kind,
            self.jitter,
            self.seed.to_bytes(8, "big") + key,
            [self.seed, 0x47524F, *words],
            block=512,
        )

    def partitioned(self, sender: int, recipient: int, now: float) -> bool:
        """Whether a partition separates the two peers at virtual time ``now``."""
        start, end = self.partition
        return start <= now < end and bool(self.side[sender] != self.side[recipient])


class Population:
    """Who is online, who leaves when, and how long each peer computes."""

    def __init__(self, scenario: Scenario, n: int, seed: int) -> None:
        self.scenario = scenario
        gen = np.random.default_rng([seed, 0x504F50])
        self.online = [True] * n
        slow = np.zeros(n, dtype=bool)
        slow[gen.permutation(n)[: round(scenario.stragglers * n)]] = True
        self.straggler: list[bool] = slow.tolist()
        self.rng = random.Random(seed * 104729 + 3)

    def round_start(self, now: float) -> list[tuple[int, float]]:
        """Apply rejoins and pick this round's leavers; returns ``[(peer, leave_time), ...]``."""
        s, rng = self.scenario, self.rng
        leaving: list[tuple[int, float]] = []
        for i, up in enumerate(self.online):
            if not up:
                if rng.random() < s.rejoin:
                    self.online[i] = True
            elif s.churn > 0.0 and rng.random() < s.churn:
                leaving.append((i, now + rng.random() * s.churn_window_s))
        return leaving

    def compute_time(self, peer: int) -> float:
        """Virtual seconds of local training for ``peer`` this round (with 10% jitter)."""
        s = self.scenario
        base = s.compute_s * (s.straggler_slowdown if self.straggler[peer] else 1.0)
        return base * (0.9 + 0.2 * self.rng.random())
