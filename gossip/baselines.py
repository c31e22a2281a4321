"""Plaintext averaging baselines as sans-IO machines (``gossip.machine.Machine``), for research.

* :class:`Pairwise` (randomized gossip, Boyd et al. 2006): once per period a peer offers its
  state to one random peer of its view, which answers with its own and both take the weighted
  average; a peer is in at most one exchange at a time (it declines offers while its own is
  unanswered).
* :class:`PushSum` (Kempe et al. 2003): mass ``(s, w)`` split between the peer and random
  out-neighbours on directed, asynchronous links; the estimate ``s / w`` converges to the
  weighted mean, and no reply is ever needed. Shares that arrive at any time (between rounds
  too) are absorbed at the start and the end of the period; a share that is lost is lost mass.
* :class:`Dpsgd` (Lian et al. 2017): every round each peer sends its vector to its neighbours
  in a fixed topology and takes the Metropolis-Hastings weighted average; topologies come from
  networkx (:func:`topology`). A neighbour silent past ``timeout_s`` is skipped.

Time and randomness come only from the arguments (a seeded ``random.Random`` repeats a run).
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Mapping, Sequence
from typing import Any

import networkx as nx
import torch
from torch import Tensor

from floor.errors import ConfigError, InconsistentMessage, MalformedMessage, OutOfStage
from gossip.machine import AverageResult, Out, RoundJob, check_contribution
from gossip.messages import DpsgdParams, PairwiseOffer, PairwiseReply, PushSumShare
from gossip.spec import TOPOLOGIES

__all__ = ["Dpsgd", "Pairwise", "PushSum", "metropolis_weights", "topology"]

log = logging.getLogger("murmur.gossip.baselines")


def _pick(rng: random.Random, view: Sequence[bytes], me: bytes | None) -> bytes | None:
    """A random peer of ``view`` other than ``me`` (a view may be a snapshot holding ``me``)."""
    for _ in range(8):
        if not view:
            return None
        partner = rng.choice(view)
        if partner != me:
            return partner
    others = [p for p in view if p != me]
    return rng.choice(others) if others else None


def _finite_like(value: Any, numel: int | None = None) -> Tensor:
    if not isinstance(value, Tensor) or value.dim() != 1:
        raise MalformedMessage("expected a 1-D tensor")
    if numel is not None and value.numel() != numel:
        raise MalformedMessage(f"expected {numel} values, got {value.numel()}")
    if not value.is_floating_point() or not bool(torch.isfinite(value).all()):
        raise MalformedMessage("expected finite floating-point values")
    return value.to(torch.float64)


class _Round:
    """What every baseline keeps about its running round."""

    def __init__(self) -> None:
        self.job: RoundJob | None = None
        self.end = 0.0
        self.done = False
        self.result: AverageResult | None = None

    def begin(self, job: RoundJob, end: float) -> None:
        if self.job is not None or self.done:
            raise ConfigError("a round is already running on this peer")
        check_contribution(job.vector, job.weight)
        self.job, self.end = job, end

    def finish(self, result: AverageResult) -> None:
        self.job, self.done, self.result = None, True, result

    def outcome(self) -> AverageResult:
        if not self.done or self.result is None:
            raise OutOfStage("the round is not over")
        result, self.result, self.done = self.result, None, False
        return result

    def cancel(self) -> None:
        self.job, self.done, self.result = None, False, None


class Pairwise:
    """Randomized pairwise gossip: one weighted pairwise average per peer and period.

    Both partners end with ``(w1 x1 + w2 x2) / (w1 + w2)`` and weight ``(w1 + w2) / 2``, so the
    weighted total is conserved when the reply arrives (a lost reply breaks conservation: this
    baseline has no recovery).
    """

    name = "pairwise"
    message_types: tuple[type, ...] = (PairwiseOffer, PairwiseReply)

    def __init__(
        self,
        *,
        period_s: float = 1.0,
        timeout_s: float | None = None,
        rng: random.Random | None = None,
        me: bytes | None = None,
    ) -> None:
        timeout = period_s / 4 if timeout_s is None else timeout_s
        self.me = me
        if not 0 < timeout < period_s:
            raise ConfigError("pairwise gossip needs 0 < timeout_s < period_s")
        self.period_s, self.timeout_s = period_s, timeout
        self._rng = rng or random.Random(os.urandom(16))
        self._r = _Round()
        self._x: Tensor | None = None
        self._w = 0.0
        self._offer_at: float | None = None
        self._partner: bytes | None = None
        self._reply_by = 0.0
        self._exchanges = 0
        self.exchanges = 0
        """Exchanges completed (as offerer or as partner), all rounds."""

    @property
    def wake_at(self) -> float | None:
        """The offer time, the reply deadline or the end of the period."""
        if self._r.job is None:
            return None
        times = [self._r.end]
        if self._offer_at is not None:
            times.append(self._offer_at)
        if self._partner is not None:
            times.append(self._reply_by)
        return min(times)

    @property
    def done(self) -> bool:
        """The period is over."""
        return self._r.done

    def begin(self, now: float, job: RoundJob) -> Out:
        """Spend one period: offer once at a random time, answer others' offers meanwhile."""
        self._r.begin(job, now + self.period_s)
        self._x = job.vector.detach().to(torch.float64).clone()
        self._w = job.weight
        self._exchanges = 0
        self._offer_at = now + self._rng.uniform(0, self.period_s - self.timeout_s)
        return []

    def wake(self, now: float) -> Out:
        """Offer, give up on a late reply, or end the period."""
        job = self._r.job
        if job is None:
            return []
        out: Out = []
        if self._partner is not None and now >= self._reply_by:
            self._partner = None
        if self._offer_at is not None and now >= self._offer_at:
            self._offer_at = None
            partner = _pick(self._rng, job.view, self.me)
            if partner is not None and self._partner is None and self._x is not None:
                self._partner, self._reply_by = partner, now + self.timeout_s
                out.append((partner, PairwiseOffer(job.round, self._x, self._w)))
        if now >= self._r.end:
            self._partner = None
            assert self._x is not None
            self._r.finish(
                AverageResult(self._x.to(job.vector.dtype), self._w, 1 + self._exchanges, job.round)
            )
        return out

    def receive(self, now: float, sender: bytes, message: Any) -> Out:
        """An offer (answered) or the reply to ours (merged)."""
        job, x = self._r.job, self._x
        if type(message) is PairwiseOffer:
            weight = message.weight
            ok = (
                job is not None
                and x is not None
                and message.round == job.round
                and self._partner is None
                and isinstance(weight, float)
                and math.isfinite(weight)
                and weight > 0
            )
            if not ok or x is None or job is None:
                return [(sender, PairwiseReply(False, torch.zeros(0), 0.0, message.round))]
            theirs = _finite_like(message.vector, x.numel())
            reply = PairwiseReply(True, x.clone(), self._w, job.round)
            self._merge(theirs, weight)
            return [(sender, reply)]
        if type(message) is PairwiseReply:
            if job is None or sender != self._partner or message.round != job.round:
                raise InconsistentMessage("a reply to no offer of this peer")
            self._partner = None
            if message.accept and x is not None:
                weight = message.weight
                if not (isinstance(weight, float) and math.isfinite(weight) and weight > 0):
                    raise MalformedMessage("a pairwise weight must be positive and finite")
                self._merge(_finite_like(message.vector, x.numel()), weight)
            return []
        raise MalformedMessage(f"not a pairwise message: {type(message).__name__}")

    def _merge(self, theirs: Tensor, their_w: float) -> None:
        assert self._x is not None
        total = self._w + their_w
        self._x = (self._x * self._w + theirs * their_w) / total
        self._w = total / 2
        self._exchanges += 1
        self.exchanges += 1

    def outcome(self) -> AverageResult:
        """The state after the period."""
        return self._r.outcome()

    def cancel(self, now: float) -> Out:
        """Stop the period now."""
        self._r.cancel()
        self._partner = self._offer_at = None
        return []


class PushSum:
    """Push-sum; a round returns the estimate ``s / w``.

    The first round's ``weight`` is the peer's initial mass; later rounds take the caller's
    ``vector`` as the new estimate at the current push-sum weight (so local training composes,
    as in stochastic gradient push). ``out_neighbours`` (raw ids) replaces the view as the
    targets of this peer's shares (a directed topology).
    """

    name = "push-sum"
    message_types: tuple[type, ...] = (PushSumShare,)

    def __init__(
        self,
        *,
        fanout: int = 1,
        period_s: float = 1.0,
        out_neighbours: Sequence[bytes] | None = None,
        rng: random.Random | None = None,
        max_inbox: int = 4096,
        me: bytes | None = None,
    ) -> None:
        self.me = me
        if fanout < 1 or not period_s > 0:
            raise ConfigError("push-sum needs fanout >= 1 and period_s > 0")
        self.fanout, self.period_s = fanout, period_s
        self._out = None if out_neighbours is None else list(out_neighbours)
        self._rng = rng or random.Random(os.urandom(16))
        self._r = _Round()
        self._w: float | None = None
        self._s: Tensor | None = None
        self._inbox: list[tuple[Tensor, float]] = []
        self._max_inbox = max_inbox
        self._targets = 0

    @property
    def weight(self) -> float | None:
        """The current push-sum weight (None before the first round)."""
        return self._w

    @property
    def wake_at(self) -> float | None:
        """The end of the period."""
        return self._r.end if self._r.job is not None else None

    @property
    def done(self) -> bool:
        """The period is over."""
        return self._r.done

    def begin(self, now: float, job: RoundJob) -> Out:
        """Absorb shares, push a share to random out-neighbours, wait a period."""
        self._r.begin(job, now + self.period_s)
        w = job.weight if self._w is None else self._w
        s, w = self._absorb(job.vector.detach().to(torch.float64) * w, w)
        pool = job.view if self._out is None else self._out
        # Draw one extra in case the view (a shared snapshot) holds this peer itself.
        drawn = self._rng.sample(pool, min(self.fanout + 1, len(pool)))
        targets = [t for t in drawn if t != self.me][: self.fanout]
        part = 1.0 / (len(targets) + 1)
        share = PushSumShare(job.round, s * part, w * part)
        self._s, self._w = s * part, w * part
        self._targets = len(targets)
        return [(t, share) for t in targets]

    def receive(self, now: float, sender: bytes, message: Any) -> Out:
        """A share of someone's mass: kept until absorbed."""
        if type(message) is not PushSumShare:
            raise MalformedMessage(f"not a push-sum message: {type(message).__name__}")
        w = message.w
        if not (isinstance(w, float) and math.isfinite(w) and w > 0):
            raise MalformedMessage("a push-sum share needs a positive, finite weight")
        if len(self._inbox) >= self._max_inbox:
            raise OutOfStage("this peer's push-sum inbox is full")
        self._inbox.append((_finite_like(message.s), w))
        return []

    def wake(self, now: float) -> Out:
        """End the period: absorb what arrived."""
        job = self._r.job
        if job is None or now < self._r.end:
            return []
        assert self._s is not None and self._w is not None
        s, w = self._absorb(self._s, self._w)
        self._s, self._w = None, w
        self._r.finish(AverageResult((s / w).to(job.vector.dtype), w, 1 + self._targets, job.round))
        return []

    def _absorb(self, s: Tensor, w: float) -> tuple[Tensor, float]:
        inbox, self._inbox = self._inbox, []
        for s_in, w_in in inbox:
            if s_in.shape == s.shape:
                s, w = s + s_in, w + w_in
        return s, w

    def outcome(self) -> AverageResult:
        """The estimate after the period."""
        return self._r.outcome()

    def cancel(self, now: float) -> Out:
        """Stop the period now (the mass kept for this round is put back)."""
        if self._r.job is not None and self._s is not None:
            self._inbox.append((self._s, self._w or 0.0))
            self._s = None
        self._r.cancel()
        return []


def topology(kind: str, n: int, *, degree: int = 4, p: float = 0.2, seed: int = 0) -> nx.Graph:
    """A connected undirected topology on nodes ``0..n-1`` built by networkx.

    ``kind``: ``"ring"`` (cycle), ``"regular"`` (random ``degree``-regular; ``degree + 1`` when
    ``degree * n`` is odd; complete when ``n <= degree + 1``), ``"complete"`` or
    ``"erdos_renyi"`` (G(n, p)). Raises ``ConfigError`` for bad arguments or a disconnected draw.
    """
    if n < 2:
        raise ConfigError("a topology needs at least 2 nodes")
    if kind == "ring":
        graph = nx.cycle_graph(n) if n > 2 else nx.complete_graph(n)
    elif kind == "complete" or (kind == "regular" and n <= degree + 1):
        graph = nx.complete_graph(n)
    elif kind == "regular":
        d = degree if (degree * n) % 2 == 0 else degree + 1
        if not 0 < d < n:
            raise ConfigError(f"topology_degree {degree} does not fit {n} peers")
        graph = nx.random_regular_graph(d, n, seed=seed)
    elif kind == "erdos_renyi":
        if not 0 < p <= 1:
            raise ConfigError(f"p must be in (0, 1], got {p!r}")
        graph = nx.erdos_renyi_graph(n, p, seed=seed)
    else:
        raise ConfigError(f"unknown topology {kind!r}: {', '.join(TOPOLOGIES)}")
    if not nx.is_connected(graph):
        raise ConfigError(f"the {kind} draw with seed {seed} is not connected")
    return graph


def metropolis_weights(graph: nx.Graph, peers: Sequence[bytes], me: bytes) -> dict[bytes, float]:
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
    Vectors of a round that arrive before this peer begins it are kept (a few rounds at most).
    """

    name = "dpsgd"
    message_types: tuple[type, ...] = (DpsgdParams,)

    def __init__(self, weights: Mapping[bytes, float], *, timeout_s: float = 0.5) -> None:
        if not timeout_s > 0 or sum(weights.values()) > 1 + 1e-9:
            raise ConfigError("D-PSGD needs timeout_s > 0 and neighbour weights summing to <= 1")
        self.timeout_s = timeout_s
        self._weights = dict(weights)
        self._r = _Round()
        self._inbox: dict[int, dict[bytes, Tensor]] = {}
        self.missed = 0

    @property
    def wake_at(self) -> float | None:
        """The deadline for the neighbours' vectors."""
        return self._r.end if self._r.job is not None else None

    @property
    def done(self) -> bool:
        """Mixed."""
        return self._r.done

    def begin(self, now: float, job: RoundJob) -> Out:
        """Send the vector to every neighbour; mix when all arrived or at the deadline."""
        self._r.begin(job, now + self.timeout_s)
        for old in [r for r in self._inbox if r < job.round]:
            del self._inbox[old]
        msg = DpsgdParams(job.round, job.vector.detach())
        out: Out = [(p, msg) for p in self._weights]
        self._check(now)
        return out

    def receive(self, now: float, sender: bytes, message: Any) -> Out:
        """A neighbour's vector for some round."""
        if type(message) is not DpsgdParams:
            raise MalformedMessage(f"not a D-PSGD message: {type(message).__name__}")
        if sender not in self._weights:
            raise InconsistentMessage("parameters from a peer that is not a neighbour")
        job = self._r.job
        if job is not None and message.round < job.round:
            raise OutOfStage("parameters of an earlier round")
        vector = _finite_like(message.vector)
        got = self._inbox.get(message.round)
        if got is None:
            if len(self._inbox) >= 8:
                raise OutOfStage("parameters for too many rounds ahead")
            got = self._inbox[message.round] = {}
        got[sender] = vector
        self._check(now)
        return []

    def wake(self, now: float) -> Out:
        """The deadline passed: mix what arrived."""
        if self._r.job is not None and now >= self._r.end:
            self._mix()
        return []

    def _check(self, now: float) -> None:
        job = self._r.job
        if job is not None and len(self._inbox.get(job.round, ())) >= len(self._weights):
            self._mix()

    def _mix(self) -> None:
        job = self._r.job
        assert job is not None
        x = job.vector.detach().to(torch.float64)
        got = self._inbox.pop(job.round, {})
        mixed = x.clone()
        used = 0
        for peer, w in self._weights.items():
            theirs = got.get(peer)
            if theirs is None or theirs.shape != x.shape:
                self.missed += 1
                continue
            used += 1
            mixed += w * (theirs - x)
        self._r.finish(AverageResult(mixed.to(job.vector.dtype), job.weight, 1 + used, job.round))

    def outcome(self) -> AverageResult:
        """The mixed vector."""
        return self._r.outcome()

    def cancel(self, now: float) -> Out:
        """Stop the round now."""
        self._r.cancel()
        return []
