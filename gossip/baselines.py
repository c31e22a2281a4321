"""Plaintext averaging baselines on the same ``Network`` and ``Averager`` shape, for research.

* ``PairwiseGossip`` (randomized gossip, Boyd et al. 2006): once per period a peer averages with
  one random peer of its view; a peer is in at most one exchange at a time.
* ``PushSum`` (Kempe et al. 2003): mass ``(s, w)`` split between the peer and random
  out-neighbours on directed, asynchronous links; the estimate ``s / w`` converges to the
  weighted mean, and no reply is ever needed.
* ``Dpsgd`` (Lian et al. 2017): every round each peer sends its vector to its neighbours in a
  fixed topology and takes the Metropolis-Hastings weighted average; topologies come from
  networkx (``topology``: ring, random regular, Erdos-Renyi).

``build_averager`` picks any averager (these or the group ones) by name. Time is the loop's.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import networkx as nx
import torch
from torch import Tensor

from floor.errors import ConfigError, MalformedMessage, MurmurError
from floor.identity import Identity, PeerId
from gossip.allreduce import AllReduceConfig, Averager, AverageResult, GroupAllReduce, GroupAverager
from gossip.matchmaking import HashMatchmaker, MatchConfig, Matchmaker
from gossip.messages import DpsgdParams, PairwiseOffer, PairwiseReply, PushSumShare
from gossip.network import Network

__all__ = [
    "AVERAGERS",
    "Dpsgd",
    "PairwiseGossip",
    "PushSum",
    "build_averager",
    "metropolis_weights",
    "topology",
]

log = logging.getLogger("murmur.gossip.baselines")

AVERAGERS = ("secure", "plain", "pairwise", "push_sum", "dpsgd")
"""Names accepted by ``build_averager``."""


def _check_vector(vector: Tensor, weight: float) -> None:
    if vector.dim() != 1 or not vector.is_floating_point():
        raise ConfigError("vector must be a 1-D floating-point tensor")
    if not weight > 0:
        raise ConfigError(f"weight must be positive, got {weight!r}")


def _like(msg_vector: Any, shape: torch.Size) -> Tensor:
    if not isinstance(msg_vector, Tensor) or msg_vector.shape != shape:
        raise MalformedMessage(f"expected a tensor of shape {tuple(shape)}")
    if not msg_vector.is_floating_point() or not bool(torch.isfinite(msg_vector).all()):
        raise MalformedMessage("expected finite floating-point values")
    return msg_vector.to(torch.float64)


class PairwiseGossip:
    """Randomized pairwise gossip: one weighted pairwise average per peer and period.

    Both partners end with ``(w1 x1 + w2 x2) / (w1 + w2)`` and weight ``(w1 + w2) / 2``, so the
    weighted total is conserved when the reply arrives (a lost reply breaks conservation:
    this baseline has no recovery).
    """

    name = "pairwise"

    def __init__(
        self,
        net: Network,
        *,
        period_s: float = 1.0,
        timeout_s: float = 0.25,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 < timeout_s < period_s:
            raise ConfigError("need 0 < timeout_s < period_s")
        self._net, self.period_s, self.timeout_s = net, period_s, timeout_s
        self._rng = rng or random.Random(os.urandom(16))
        self._round: int | None = None
        self._x: Tensor | None = None
        self._w = 0.0
        self._busy = False
        self.exchanges = 0
        net.register(PairwiseOffer, self._on_offer)

    def close(self) -> None:
        """Unregister the handler."""
        self._net.unregister(PairwiseOffer)

    async def _on_offer(self, sender: PeerId, msg: PairwiseOffer) -> PairwiseReply:
        x = self._x
        if self._round != msg.round or self._busy or x is None or not msg.weight > 0:
            return PairwiseReply(False, torch.zeros(0), 0.0)
        theirs = _like(msg.vector, x.shape)
        reply = PairwiseReply(True, x.clone(), self._w)
        self._merge(theirs, float(msg.weight))
        return reply

    def _merge(self, theirs: Tensor, their_w: float) -> None:
        assert self._x is not None
        total = self._w + their_w
        self._x = (self._x * self._w + theirs * their_w) / total
        self._w = total / 2
        self.exchanges += 1

    async def average(self, vector: Tensor, weight: float, round: int) -> AverageResult:
        """Spend one period: start one exchange at a random time, answer others' offers."""
        _check_vector(vector, weight)
        end = self._net.time() + self.period_s
        self._x, self._w, self._round = vector.detach().to(torch.float64).clone(), weight, round
        before = self.exchanges
        try:
            await asyncio.sleep(self._rng.uniform(0, self.period_s - self.timeout_s))
            view = list(self._net.view())
            if view and not self._busy:
                self._busy = True
                try:
                    offer = PairwiseOffer(round, self._x, self._w)
                    reply = await self._net.request(
                        self._rng.choice(view), offer, timeout=self.timeout_s
                    )
                    if isinstance(reply, PairwiseReply) and reply.accept and reply.weight > 0:
                        self._merge(_like(reply.vector, self._x.shape), float(reply.weight))
                except MurmurError as exc:
                    log.debug("event=pairwise_failed error=%s", exc)
                finally:
                    self._busy = False
            await asyncio.sleep(max(0.0, end - self._net.time()))
            return AverageResult(
                self._x.to(vector.dtype), self._w, 1 + self.exchanges - before, round
            )
        finally:
            self._round = None


class PushSum:
    """Push-sum on directed, asynchronous links; ``average`` returns the estimate ``s / w``.

    The first call's ``weight`` is the peer's initial mass; later calls take the caller's
    ``vector`` as the new estimate at the current push-sum weight (so local training composes,
    as in stochastic gradient push). Shares that arrive at any time are absorbed at the end of
    the period. A share whose delivery failed is kept (mass is conserved when a failure is
    known). ``out_neighbours`` defaults to the membership view.
    """

    name = "push_sum"

    def __init__(
        self,
        net: Network,
        *,
        out_neighbours: Callable[[], Sequence[PeerId]] | None = None,
        fanout: int = 1,
        period_s: float = 1.0,
        rng: random.Random | None = None,
    ) -> None:
        if fanout < 1 or not period_s > 0:
            raise ConfigError("need fanout >= 1 and period_s > 0")
        self._net, self.fanout, self.period_s = net, fanout, period_s
        self._out = out_neighbours or net.view
        self._rng = rng or random.Random(os.urandom(16))
        self._w: float | None = None
        self._inbox: list[tuple[Tensor, float]] = []
        net.register(PushSumShare, self._on_share)

    def close(self) -> None:
        """Unregister the handler."""
        self._net.unregister(PushSumShare)

    @property
    def weight(self) -> float | None:
        """The current push-sum weight (None before the first call)."""
        return self._w

    async def _on_share(self, sender: PeerId, msg: PushSumShare) -> None:
        if not msg.w > 0 or not isinstance(msg.s, Tensor) or msg.s.dim() != 1:
            raise MalformedMessage("a push-sum share needs a 1-D tensor and a positive weight")
        self._inbox.append((_like(msg.s, msg.s.shape), float(msg.w)))

    def _absorb(self, s: Tensor, w: float) -> tuple[Tensor, float]:
        inbox, self._inbox = self._inbox, []
        for s_in, w_in in inbox:
            if s_in.shape == s.shape:
                s, w = s + s_in, w + w_in
        return s, w

    async def average(self, vector: Tensor, weight: float, round: int) -> AverageResult:
        """Absorb shares, push a share to random out-neighbours, wait a period, absorb again."""
        _check_vector(vector, weight)
        end = self._net.time() + self.period_s
        w = weight if self._w is None else self._w
        s, w = self._absorb(vector.detach().to(torch.float64) * w, w)
        out = list(self._out())
        targets = self._rng.sample(out, min(self.fanout, len(out)))
        part = 1.0 / (len(targets) + 1)
        share = PushSumShare(round, s * part, w * part)
        results = await asyncio.gather(
            *(self._net.send(t, share, timeout=self.period_s) for t in targets),
            return_exceptions=True,
        )
        kept = 1 + sum(1 for r in results if isinstance(r, BaseException))
        s, w = s * (part * kept), w * (part * kept)
        self._w = w
        await asyncio.sleep(max(0.0, end - self._net.time()))
        s, w = self._absorb(s, w)
        self._w = w
        return AverageResult((s / w).to(vector.dtype), w, 1 + len(targets), round)


def topology(kind: str, n: int, *, degree: int = 4, p: float = 0.2, seed: int = 0) -> nx.Graph:
    """A connected undirected topology on nodes ``0..n-1`` built by networkx.

    ``kind``: ``"ring"`` (cycle), ``"random_regular"`` (``degree``-regular), ``"erdos_renyi"``
    (G(n, p)). Raises ``ConfigError`` for bad arguments or a disconnected draw.
    """
    if n < 2:
        raise ConfigError("a topology needs at least 2 nodes")
    if kind == "ring":
        graph = nx.cycle_graph(n)
    elif kind == "random_regular":
        if not 0 < degree < n or (degree * n) % 2:
            raise ConfigError(f"no {degree}-regular graph on {n} nodes")
        graph = nx.random_regular_graph(degree, n, seed=seed)
    elif kind == "erdos_renyi":
        if not 0 < p <= 1:
            raise ConfigError(f"p must be in (0, 1], got {p!r}")
        graph = nx.erdos_renyi_graph(n, p, seed=seed)
    else:
        raise ConfigError(f"unknown topology {kind!r}: ring, random_regular, erdos_renyi")
    if not nx.is_connected(graph):
        raise ConfigError(f"the {kind} draw with seed {seed} is not connected")
    return graph


def metropolis_weights(graph: nx.Graph, peers: Sequence[PeerId], me: PeerId) -> dict[PeerId, float]:
    """Metropolis-Hastings mixing weights of ``me``'s neighbours (node i = ``peers[i]``).

    ``w_ij = 1 / (1 + max(deg i, deg j))``; the self weight is 1 minus their sum. The matrix is
    symmetric and doubly stochastic, so D-PSGD preserves the (unweighted) mean.
    """
    if graph.number_of_nodes() != len(peers):
        raise ConfigError("the topology must have one node per peer")
    i = list(peers).index(me)
    return {peers[j]: 1.0 / (1 + max(graph.degree[i], graph.degree[j])) for j in graph.neighbors(i)}


class Dpsgd:
    """D-PSGD gossip on a fixed topology: send to neighbours, average with Metropolis weights.

    A neighbour whose vector does not arrive by ``timeout_s`` is skipped and its weight stays
    on this peer (``missed`` counts them; ``group_size`` says how many vectors were mixed).
    """

    name = "dpsgd"

    def __init__(
        self, net: Network, weights: Mapping[PeerId, float], *, timeout_s: float = 0.5
    ) -> None:
        if not timeout_s > 0 or sum(weights.values()) > 1 + 1e-9:
            raise ConfigError("need timeout_s > 0 and neighbour weights summing to at most 1")
        self._net, self.timeout_s = net, timeout_s
        self._weights = dict(weights)
        self._inbox: dict[int, dict[PeerId, Tensor]] = {}
        self._arrived: asyncio.Event | None = None
        self.missed = 0
        net.register(DpsgdParams, self._on_params)

    def close(self) -> None:
        """Unregister the handler."""
        self._net.unregister(DpsgdParams)

    async def _on_params(self, sender: PeerId, msg: DpsgdParams) -> None:
        if sender not in self._weights:
            raise MalformedMessage("parameters from a peer that is not a neighbour")
        if not isinstance(msg.vector, Tensor) or msg.vector.dim() != 1:
            raise MalformedMessage("D-PSGD parameters must be a 1-D tensor")
        self._inbox.setdefault(msg.round, {})[sender] = msg.vector
        if len(self._inbox) > 64:  # forget the oldest rounds
            del self._inbox[min(self._inbox)]
        if self._arrived is not None:
            self._arrived.set()

    async def average(self, vector: Tensor, weight: float, round: int) -> AverageResult:
        """Exchange with every neighbour for ``round`` and mix (``weight`` is returned as is)."""
        _check_vector(vector, weight)
        x = vector.detach().to(torch.float64)
        msg = DpsgdParams(round, vector.detach())
        sends = asyncio.gather(
            *(self._net.send(p, msg, timeout=self.timeout_s) for p in self._weights),
            return_exceptions=True,
        )
        deadline = self._net.time() + self.timeout_s
        got = self._inbox.setdefault(round, {})
        while len(got) < len(self._weights) and self._net.time() < deadline:
            self._arrived = asyncio.Event()
            try:
                async with asyncio.timeout_at(deadline):
                    await self._arrived.wait()
            except TimeoutError:
                break
        self._arrived = None
        await sends
        got = self._inbox.pop(round, {})
        mixed = x.clone()
        for peer, w in self._weights.items():
            theirs = got.get(peer)
            if theirs is None or theirs.shape != x.shape:
                self.missed += 1
                continue
            mixed += w * (theirs.to(torch.float64) - x)
        for old in [r for r in self._inbox if r < round]:
            del self._inbox[old]
        return AverageResult(mixed.to(vector.dtype), weight, 1 + len(got), round)


def build_averager(
    name: str,
    net: Network,
    *,
    identity: Identity | None = None,
    match: MatchConfig | None = None,
    allreduce: AllReduceConfig | None = None,
    hash_groups: bool = False,
    graph: nx.Graph | None = None,
    peers: Sequence[PeerId] | None = None,
    period_s: float = 1.0,
    rng: random.Random | None = None,
) -> Averager:
    """The averager called ``name`` (one of ``AVERAGERS``) for the peer on ``net``.

    ``"secure"`` and ``"plain"`` need ``identity`` (and use ``Matchmaker``, or
    ``HashMatchmaker`` with ``hash_groups``); ``"dpsgd"`` needs ``graph`` and ``peers`` (node i
    is ``peers[i]``).
    """
    if name in ("secure", "plain"):
        if identity is None:
            raise ConfigError(f"the {name} averager needs the peer's identity")
        cfg = match or MatchConfig()
        former: HashMatchmaker | Matchmaker
        if hash_groups:
            former = HashMatchmaker(net, size=cfg.target_size, min_size=cfg.min_size)
        else:
            former = Matchmaker(net, cfg, rng=rng)
        reducer = GroupAllReduce(net, identity, allreduce)
        return GroupAverager(former, reducer, secure=name == "secure")
    if name == "pairwise":
        return PairwiseGossip(net, period_s=period_s, timeout_s=period_s / 4, rng=rng)
    if name == "push_sum":
        return PushSum(net, period_s=period_s, rng=rng)
    if name == "dpsgd":
        if graph is None or peers is None:
            raise ConfigError("the dpsgd averager needs a topology graph and the peer list")
        weights = metropolis_weights(graph, peers, net.local_id)
        return Dpsgd(net, weights, timeout_s=period_s / 2)
    raise ConfigError(f"unknown averager {name!r}; choose from {', '.join(AVERAGERS)}")
