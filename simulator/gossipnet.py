"""The daemon's own averaging code (``gossip/``) on the simulated network.

``SimPeerNetwork`` implements ``gossip.network.Network`` for one simulated peer over
``simulator.network.SimNetwork``: ``send`` returns once the recipient's handler accepted the
message (or raises ``PeerUnreachable`` / ``RemoteRefused`` / ``Timeout``), ``request`` carries
the reply back over the network, the view is the round's membership snapshot, and time is the
virtual loop's. Timeouts are bucketed callbacks, never one loop timer per message; each send
still costs a future; a handler that does not suspend runs eagerly, without a task. ``post``
(``gossip.network.Poster``, which the group all-reduce uses when a network has it) sends with
no future, task or timer at all.

``GossipRound`` runs one round of ``gossip.baselines.build_averager``'s averager on every
active peer: ``secure``/``plain`` group all-reduce with hash grouping or the serverless
matchmaker (``matchmaking = "invite"``), ``pairwise``, ``push_sum`` or ``dpsgd``. Each peer
calls ``average()`` when its local training ends; a peer that leaves has its task cancelled.
"""

from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import networkx as nx
from torch import Tensor

from floor.errors import (
    AggregationError,
    MurmurError,
    PeerUnreachable,
    ProtocolError,
    RemoteRefused,
    Timeout,
)
from floor.identity import PeerId
from gossip.allreduce import AllReduceConfig, Averager
from gossip.baselines import build_averager
from gossip.matchmaking import MatchConfig
from gossip.network import GossipHandler
from simulator.config import Scenario
from simulator.network import SimNetwork

__all__ = ["AVERAGER_NAMES", "GossipRound", "SimPeerNetwork"]

AVERAGER_NAMES = {
    "secure-group": "secure",
    "group": "plain",
    "pairwise": "pairwise",
    "push-sum": "push_sum",
    "dpsgd": "dpsgd",
}
"""Simulator algorithm name -> ``gossip.baselines`` averager name."""


class SimPeerNetwork:
    """``gossip.network.Network`` for simulated peer ``peer``."""

    def __init__(
        self,
        net: SimNetwork,
        peer: int,
        view: Callable[[], Sequence[PeerId]],
        positions: Callable[[], Mapping[bytes, int]] | None = None,
    ) -> None:
        """``view()`` is the membership snapshot (this peer included or not); ``positions()``,
        if given, maps each raw id to its index in that snapshot (shared by all peers, so a
        peer's view costs a slice instead of comparing every id: O(n) per peer, not O(n^2)
        per round)."""
        self._net, self._peer, self._view, self._positions = net, peer, view, positions
        self._handlers: dict[type, GossipHandler] = {}
        self.default_timeout = 10.0

    @property
    def local_id(self) -> PeerId:
        """This peer's id."""
        return self._net.ids[self._peer]

    def _call(
        self, peer: PeerId, message: Any, timeout: float | None, want_reply: bool
    ) -> asyncio.Future[Any]:
        net = self._net
        fut: asyncio.Future[Any] = net.loop.create_future()
        target = net.index.get(peer.raw)
        if target is None:
            fut.set_exception(PeerUnreachable(f"unknown peer {peer.short()}"))
            return fut
        me = self._peer

        def settle(ok: bool, value: Any) -> None:
            if fut.done():
                return
            if not ok:
                if isinstance(value, ProtocolError):
                    fut.set_exception(RemoteRefused(f"refused: {value}", code=value.code))
                else:
                    fut.set_exception(PeerUnreachable(f"peer {peer.short()} unreachable"))
            elif not want_reply:
                fut.set_result(None)
            elif value is None:
                fut.set_exception(PeerUnreachable("the peer sent no reply"))
            else:  # the reply travels back over the network

                def back(delivered: bool, _: Any) -> None:
                    if fut.done():
                        return
                    if delivered:
                        fut.set_result(value)
                    else:
                        fut.set_exception(PeerUnreachable("the reply was lost"))

                net.post(target, me, value, on_result=back, deliver_to=_ignore)

        wait = self.default_timeout if timeout is None else timeout
        net.call_at(net.loop.time() + wait, _expire, fut, wait)
        net.post(me, target, message, on_result=settle)
        return fut

    def post(
        self,
        peer: PeerId,
        message: Any,
        *,
        timeout: float | None = None,
        on_failure: Callable[[Any, MurmurError], None] | None = None,
    ) -> None:
        """Send ``message`` without waiting (``gossip.network.Poster``): no future, task or
        timer. ``on_failure(message, error)`` is called when the outcome is known, if the
        message was lost or its recipient offline (``PeerUnreachable``), refused
        (``RemoteRefused``), or handled after ``timeout`` (``Timeout``, reported when the late
        handling happens rather than at the deadline)."""
        net = self._net
        target = net.index.get(peer.raw)
        if target is None:
            if on_failure is not None:
                on_failure(message, PeerUnreachable(f"unknown peer {peer.short()}"))
            return
        if on_failure is None:
            net.post(self._peer, target, message)
            return
        wait = self.default_timeout if timeout is None else timeout
        deadline = net.loop.time() + wait
        net.post(
            self._peer,
            target,
            message,
            on_result=functools.partial(self._posted, message, deadline, wait, on_failure),
        )

    def _posted(
        self,
        message: Any,
        deadline: float,
        wait: float,
        on_failure: Callable[[Any, MurmurError], None],
        ok: bool,
        value: Any,
    ) -> None:
        error: MurmurError
        if ok:
            if self._net.loop.time() <= deadline:
                return
            error = Timeout(f"not handled within {wait:g} s")
        elif isinstance(value, ProtocolError):
            error = RemoteRefused(f"refused: {value}", code=value.code)
        else:
            error = PeerUnreachable("the message was lost or its recipient is offline")
        on_failure(message, error)

    async def send(self, peer: PeerId, message: Any, *, timeout: float | None = None) -> None:
        """Deliver ``message``; return once ``peer``'s handler accepted it."""
        await self._call(peer, message, timeout, want_reply=False)

    async def request(self, peer: PeerId, message: Any, *, timeout: float | None = None) -> Any:
        """Send ``message`` and return the reply that came back over the network."""
        return await self._call(peer, message, timeout, want_reply=True)

    def register(self, message_type: type, handler: GossipHandler) -> None:
        """Handle ``message_type`` with ``handler(sender_id, message)``."""
        self._handlers[message_type] = handler
        ids = self._net.ids
        self._net.register(self._peer, message_type, lambda s, m: handler(ids[s], m))

    def unregister(self, message_type: type) -> None:
        """Stop handling ``message_type``."""
        self._handlers.pop(message_type, None)
        self._net.handlers[self._peer].pop(message_type, None)

    def view(self) -> Sequence[PeerId]:
        """The round's membership snapshot, without this peer."""
        members = self._view()
        me = self.local_id.raw
        if self._positions is not None:
            i = self._positions().get(me)
            if i is None:
                return list(members)
            return [*members[:i], *members[i + 1 :]]
        return [p for p in members if p.raw != me]

    def time(self) -> float:
        """The virtual clock."""
        return self._net.loop.time()


def _ignore(sender: int, message: Any) -> None:
    return None


def _expire(fut: asyncio.Future[Any], wait: float) -> None:
    if not fut.done():
        fut.set_exception(Timeout(f"no answer within {wait:g} s"))


class GossipRound:
    """One round of the daemon's averager on every active peer."""

    def __init__(self, net: SimNetwork, scenario: Scenario, graph: nx.Graph | None) -> None:
        self.net, self.scenario = net, scenario
        self._members: list[PeerId] = []
        self._positions: dict[bytes, int] = {}
        name = AVERAGER_NAMES[scenario.algorithm]
        s = scenario
        match = MatchConfig(target_size=s.group_size, min_size=min(3, s.group_size))
        allreduce = AllReduceConfig(
            stage_timeout_s=s.stage_timeout_s,
            threshold=s.threshold or None,
            degree=s.degree or None,
        )
        self.averagers: list[Averager] = []
        for p in range(net.n):
            pnet = SimPeerNetwork(net, p, self._view, self._member_positions)
            self.averagers.append(
                build_averager(
                    name,
                    pnet,
                    identity=net.identities[p],
                    match=match,
                    allreduce=allreduce,
                    hash_groups=s.matchmaking == "hash",
                    graph=graph,
                    peers=net.ids,
                    period_s=s.stage_timeout_s,
                    rng=random.Random(s.seed * 1_000_003 + p),
                )
            )
        self.results: dict[int, Tensor] = {}
        self.counted: set[int] = set()
        self.aborted_groups = 0
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._on_done: Callable[[], None] = lambda: None

    def _view(self) -> list[PeerId]:
        return self._members

    def _member_positions(self) -> dict[bytes, int]:
        return self._positions

    def begin(
        self,
        rnd: int,
        active: list[int],
        contributions: dict[int, tuple[Tensor, float]],
        ready_at: dict[int, float],
        on_done: Callable[[], None],
    ) -> None:
        """Start every active peer's ``average()`` at the end of its local training."""
        self.results, self.counted, self._tasks = {}, set(), {}
        self.aborted_groups = 0
        self._on_done = on_done
        self._members = [self.net.ids[p] for p in active]
        self._positions = {self.net.raw_ids[p]: i for i, p in enumerate(active)}
        self._open = {p for p in active if contributions[p][1] > 0}
        for p in sorted(self._open):
            self.net.call_at(ready_at[p], self._start, p, rnd, contributions[p])
        if not self._open:  # every budget is spent: the round is only local compute
            self.net.call_at(max(ready_at.values(), default=self.net.loop.time()), on_done)

    def _start(self, p: int, rnd: int, contribution: tuple[Tensor, float]) -> None:
        if p not in self._open:
            return
        vector, weight = contribution
        task = asyncio.ensure_future(self._average(p, rnd, vector, weight))
        self._tasks[p] = task

    async def _average(self, p: int, rnd: int, vector: Tensor, weight: float) -> None:
        try:
            res = await self.averagers[p].average(vector, weight, rnd)
        except AggregationError:
            self.aborted_groups += 1
        except asyncio.CancelledError:
            pass
        else:
            self.results[p] = res.vector
            me = self.net.ids[p]
            if not res.contributors or me in res.contributors:
                self.counted.add(p)
        finally:
            self._close(p)

    def _close(self, p: int) -> None:
        self._tasks.pop(p, None)
        if p in self._open:
            self._open.discard(p)
            if not self._open:
                self._on_done()

    def peer_left(self, p: int) -> None:
        """Cancel the peer's averaging (it is gone)."""
        task = self._tasks.get(p)
        if task is not None:
            task.cancel()
        elif p in self._open:
            self._close(p)

    def force_finish(self) -> None:
        """Cancel every averaging still running."""
        for p in sorted(self._open):
            self.peer_left(p)
