"""Plaintext neighbour-averaging baselines over the simulated network: pairwise, push-sum, D-PSGD.

Interim implementations in the simulator (sans-IO, one ``ModelShare`` message per edge) until
``gossip/baselines.py`` lands with the daemon's versions:

* ``pairwise``: each round the online peers are paired at random; partners average.
* ``push-sum`` (Kempe et al. 2003): each peer keeps a mass ``w`` (1 at the start), sends half
  of ``(w x, w)`` to one random online peer and keeps half; its model is ``s / w``. The round
  ends when every send has been delivered or lost (lost mass is gone, as in the real thing).
* ``dpsgd`` (Lian et al. 2017): a fixed topology (ring, random regular, complete) with
  Metropolis weights; ``x_i += sum_j W_ij (x_j - x_i)`` over the neighbours heard from.

A peer waits for its expected messages until ``stage_timeout_s`` after its own training ends.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable

import networkx as nx
import torch
from torch import Tensor

from floor.errors import ConfigError
from simulator.messages import ModelShare
from simulator.network import SimNetwork

__all__ = ["NeighbourRound", "topology"]


def topology(kind: str, n: int, degree: int, seed: int) -> list[list[int]]:
    """Neighbour lists of a fixed graph on ``n`` peers (deterministic for a seed)."""
    if kind == "complete":
        return [[j for j in range(n) if j != i] for i in range(n)]
    if kind == "ring" or n <= degree + 1:
        if kind != "ring":
            return topology("complete", n, degree, seed)
        return [sorted({(i - 1) % n, (i + 1) % n} - {i}) for i in range(n)]
    d = degree if (degree * n) % 2 == 0 else degree + 1
    if d >= n:
        raise ConfigError(f"topology_degree {degree} is too large for {n} peers")
    graph = nx.random_regular_graph(d, n, seed=seed)
    return [sorted(graph.neighbors(i)) for i in range(n)]


class NeighbourRound:
    """One round of a neighbour-averaging baseline (``pairwise``, ``push-sum``, ``dpsgd``)."""

    def __init__(
        self, net: SimNetwork, algorithm: str, *, timeout: float, seed: int, graph: list[list[int]]
    ) -> None:
        self.net, self.algorithm, self.timeout = net, algorithm, timeout
        self.rng = random.Random(seed * 31 + 7)
        self.graph = graph
        self.degree = [len(g) for g in graph]
        self.mass = [1.0] * net.n  # push-sum weights, kept across rounds
        self.results: dict[int, Tensor] = {}
        self.counted: set[int] = set()
        self._inbox: dict[int, list[tuple[int, Tensor, float]]] = {}
        self._expect: dict[int, set[int]] = {}
        self._own: dict[int, Tensor] = {}
        self._open: set[int] = set()
        self._rnd = 0
        self._on_done: Callable[[], None] = lambda: None
        for p in range(net.n):
            net.register(p, ModelShare, self._receiver(p))

    def _receiver(self, p: int) -> Callable[[int, ModelShare], None]:
        def handle(sender: int, msg: ModelShare) -> None:
            if msg.round == self._rnd and p in self._inbox:
                self._inbox[p].append((sender, msg.data, msg.weight))
                if self.algorithm != "push-sum" and sender in self._expect.get(p, ()):
                    self._expect[p].discard(sender)
                    if not self._expect[p]:
                        self._finalize(p)

        return handle

    def begin(
        self,
        rnd: int,
        active: list[int],
        contributions: dict[int, tuple[Tensor, float]],
        ready_at: dict[int, float],
        on_done: Callable[[], None],
    ) -> None:
        """Decide who talks to whom this round and schedule every peer's send."""
        self._rnd, self._on_done = rnd, on_done
        self.results, self.counted = {}, set()
        self._inbox = {p: [] for p in active}
        self._own = {p: contributions[p][0].double() for p in active}
        self._open = set(active)
        targets: dict[int, list[int]] = {}
        if self.algorithm == "pairwise":
            order = list(active)
            self.rng.shuffle(order)
            for a, b in zip(order[::2], order[1::2], strict=False):
                targets[a], targets[b] = [b], [a]
            for p in order[len(order) - len(order) % 2 :]:
                targets[p] = []
        elif self.algorithm == "dpsgd":
            up = set(active)
            for p in active:
                targets[p] = [q for q in self.graph[p] if q in up]
        else:  # push-sum: one random other online peer each
            for p in active:
                if len(active) < 2:
                    targets[p] = []
                    continue
                q = active[self.rng.randrange(len(active) - 1)]
                targets[p] = [active[-1] if q == p else q]
        self._expect = {p: set(targets[p]) for p in active} if self.algorithm != "push-sum" else {}
        for p in active:
            self.net.call_at(ready_at[p], self._send, p, targets[p])
        if not active:
            on_done()

    def _send(self, p: int, targets: list[int]) -> None:
        if p not in self._open:
            return
        own = self._own[p]
        if self.algorithm == "push-sum":
            half = self.mass[p] / 2.0
            self.mass[p] = half
            self._inbox[p].append((p, own * half, half))
            if not targets:
                self._finalize(p)
                return
            msg = ModelShare(self._rnd, own * half, half)
            self.net.post(p, targets[0], msg, functools.partial(self._sent, p))
            return
        msg = ModelShare(self._rnd, own, 1.0)
        for q in targets:
            self.net.post(p, q, msg)
        if not self._expect[p]:
            self._finalize(p)
        else:
            self.net.call_at(self.net.loop.time() + self.timeout, self._finalize, p)

    def _sent(self, p: int, delivered: bool, reply: object) -> None:
        self._finalize(p)

    def peer_left(self, p: int) -> None:
        """``p`` went offline: it takes no further part this round."""
        if p in self._open:
            self._close(p)

    def force_finish(self) -> None:
        """End the round now for every peer still open."""
        for p in sorted(self._open):
            self._finalize(p)

    def _finalize(self, p: int) -> None:
        if p not in self._open:
            return
        if self.algorithm == "push-sum":
            return self._finalize_push(p)
        own, got = self._own[p], self._inbox[p]
        if self.algorithm == "pairwise":
            if got:
                self.results[p] = (own + got[0][1].double()) / 2.0
                self.counted.add(p)
        else:
            new = own.clone()
            for q, data, _ in got:
                w = 1.0 / (1.0 + max(self.degree[p], self.degree[q]))
                new += w * (data.double() - own)
            self.results[p] = new
            if not self._expect[p]:
                self.counted.add(p)
        self._close(p)

    def _finalize_push(self, p: int) -> None:
        # Called when p's own send resolved; the round ends when every send has resolved.
        self._close(p)

    def _close(self, p: int) -> None:
        self._open.discard(p)
        if self._open:
            return
        if self.algorithm == "push-sum":
            online = self.net.online
            for q, inbox in self._inbox.items():
                if not online[q]:
                    continue
                s = sum((d.double() for _, d, _ in inbox), torch.zeros_like(self._own[q]))
                w = sum(weight for _, _, weight in inbox)
                self.mass[q] = w
                if w > 0:
                    self.results[q] = s / w
                    self.counted.add(q)
        self._on_done()
