"""Every simulated peer's averaging machine, one round at a time, under either engine.

The peers run the daemon's machines (``gossip.run.build_machine``: secure or plain groups with
hash or invitation matchmaking, pairwise, push-sum, D-PSGD), built once per run and kept for
the whole run as a daemon keeps its own. Two drivers give them time and messages:

* ``engine = "gossip"``: ``gossip.driver.Driver``, the daemon's asyncio driver, over
  ``simulator.gossipnet.SimPeerNetwork`` (one future per peer and round; one-way posts);
* ``engine = "direct"``: :class:`TickDriver`, the same calls straight from the simulated
  network's tick callbacks, with no future, task or ``PeerId`` at all (for scale, and for the
  group workers of ``simulator.parallel``).

Both keep the machine's deadline with ``gossip.machine.Alarm`` on the network's tick buckets and
send what the machine returns in order, so one seed gives byte-identical metrics under either
engine (``tests/test_sim_conformance.py``).

:class:`PeerRounds` is the round the engine sees: ``begin`` schedules each active peer's start
at the end of its local training, with the round's membership snapshot as its view (one shared
tuple: hash grouping computes the round's groups once, not once per peer); a peer that leaves
is cancelled (its secrets forgotten); the round ends when every started peer has an outcome.
With hash matchmaking the engine knows the groups too, and gives each group its own loss and
latency stream and idle uplinks, so that a group's round depends on nothing outside it (what
lets ``simulator.parallel`` split a round's groups among processes).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Collection, Sequence
from typing import Any

import nacl.signing
import networkx as nx
from torch import Tensor

from floor.errors import (
    AggregationAborted,
    AggregationError,
    ConfigError,
    GroupFormationFailed,
    MurmurError,
)
from gossip.driver import Driver
from gossip.machine import Alarm, AverageResult, Machine, Out, RoundJob, wake_if_due
from gossip.matchmaking import group_id_of, hash_groups
from gossip.run import build_machine
from mpc.keys import warm_pair_roots
from mpc.state import default_threshold
from simulator.config import Scenario
from simulator.gossipnet import SimPeerNetwork
from simulator.network import SimNetwork

__all__ = ["PeerRounds", "TickDriver", "round_groups"]

Ended = Callable[[int, "AverageResult | AggregationError | None"], None]
"""``ended(peer, outcome)``: a result, the failure, or None (cancelled)."""


class TickDriver:
    """Runs peer ``peer``'s ``machine`` from ``net``'s callbacks (the direct engine)."""

    __slots__ = ("_alarm", "_armed", "_ended", "_net", "_peer", "_running", "machine")

    def __init__(self, net: SimNetwork, peer: int, machine: Machine, ended: Ended) -> None:
        self.machine = machine
        self._net, self._peer, self._ended = net, peer, ended
        self._alarm = Alarm(net.call_at, self._fire)
        self._running = False
        self._armed: float | None = None  # the last deadline asked of the alarm
        for cls in machine.message_types:
            net.register(peer, cls, self._on_message)

    def start(self, round: int, vector: Tensor, weight: float, view: Sequence[bytes]) -> None:
        """Begin the round now (a refused contribution raises, as ``Driver.start`` does)."""
        out = self.machine.begin(self._net.loop.time(), RoundJob(round, vector, weight, view))
        self._running = True
        self._after(out)

    def cancel(self) -> None:
        """End the running round now (the peer left or the round was ended by force)."""
        out = self.machine.cancel(self._net.loop.time())
        self._alarm.clear()
        self._armed = None
        if self._running:
            self._running = False
            self._ended(self._peer, None)
        self._send(out)

    def _on_message(self, sender: int, message: Any) -> None:
        # A ProtocolError refuses the message: the network counts it, as a daemon would. The
        # common case (_after's, inline: this runs once per message) sends and re-arms.
        net, machine = self._net, self.machine
        out = machine.receive(net.loop.time(), net.raw_ids[sender], message)
        if machine.done:
            self._after(out)
            return
        if out:
            net.post_many(self._peer, out)
        due = machine.wake_at
        if due is not None and due != self._armed:  # most messages leave the deadline be
            self._armed = due
            self._alarm.set(due)

    def _fire(self, when: float) -> None:
        machine = self.machine
        out = wake_if_due(machine, self._alarm, max(self._net.loop.time(), when))
        if out is not None:
            self._after(out)

    def _after(self, out: Out) -> None:
        self._send(out)
        machine = self.machine
        if machine.done:
            outcome: AverageResult | AggregationError
            try:
                outcome = machine.outcome()
            except AggregationError as exc:
                outcome = exc
            if self._running:
                self._running = False
                self._ended(self._peer, outcome)
            return
        self._armed = machine.wake_at
        self._alarm.set(self._armed)

    def _send(self, out: Out) -> None:
        if out:
            self._net.post_many(self._peer, out)


class _AsyncPeer:
    """The asyncio ``Driver`` of one peer, seen through the ``TickDriver`` interface."""

    __slots__ = ("_ended", "_fut", "_peer", "driver")

    def __init__(self, driver: Driver, peer: int, ended: Ended) -> None:
        self.driver, self._peer, self._ended = driver, peer, ended
        self._fut: asyncio.Future[AverageResult] | None = None

    def start(self, round: int, vector: Tensor, weight: float, view: Sequence[bytes]) -> None:
        fut = self.driver.start(vector, weight, round, view)
        self._fut = fut
        fut.add_done_callback(self._done)

    def _done(self, fut: asyncio.Future[AverageResult]) -> None:
        if fut is not self._fut:
            return
        self._fut = None
        if fut.cancelled():
            self._ended(self._peer, None)
            return
        exc = fut.exception()
        if exc is None:
            self._ended(self._peer, fut.result())
        elif isinstance(exc, AggregationError):
            self._ended(self._peer, exc)
        else:  # pragma: no cover - machines only fail with AggregationError
            raise exc

    def cancel(self) -> None:
        fut, self._fut = self._fut, None
        self.driver.cancel()
        if fut is not None:
            self._ended(self._peer, None)


def round_groups(
    scenario: Scenario, rnd: int, view: Sequence[bytes]
) -> list[tuple[bytes, ...]] | None:
    """The round's hash groups (raw ids), as every peer's ``HashGrouping`` finds them; None
    when groups are not hash groups (or too few peers to form one)."""
    s = scenario
    if not (s.grouped and s.matchmaking == "hash"):
        return None
    try:
        return hash_groups(rnd, view, size=s.group_size, min_size=s.spec().smallest_group)
    except GroupFormationFailed:
        return None


class PeerRounds:
    """One round at a time of every active peer's machine (see the module docstring)."""

    def __init__(
        self,
        net: SimNetwork,
        scenario: Scenario,
        graph: nx.Graph | None,
        *,
        warm_threads: int = 2,
    ) -> None:
        """``warm_threads``: threads that compute a round's pair keys up front (secure hash
        groups: the results are the same, only sooner)."""
        self.net, self.scenario = net, scenario
        self._warm_threads = warm_threads
        self._keys: dict[int, nacl.signing.SigningKey] = {}
        spec = scenario.spec()
        self.machines: list[Machine] = [
            build_machine(
                spec,
                seed=net.seeds[p],
                me=net.raw_ids[p],
                rng=random.Random(scenario.seed * 1_000_003 + p),
                matchmaking=scenario.matchmaking,
                graph=graph,
                peers=net.raw_ids,
            )
            for p in range(net.n)
        ]
        self._view: tuple[bytes, ...] = ()
        self.drivers: list[TickDriver | _AsyncPeer]
        if scenario.engine == "direct":
            self.drivers = [TickDriver(net, p, m, self._end) for p, m in enumerate(self.machines)]
        else:
            timeout = max(scenario.stage_timeout_s, 1.0)
            self.drivers = [
                _AsyncPeer(
                    Driver(
                        SimPeerNetwork(net, p, self._no_view),
                        m,
                        send_timeout_s=timeout,
                    ),
                    p,
                    self._end,
                )
                for p, m in enumerate(self.machines)
            ]
        self.results: dict[int, Tensor] = {}
        self.sizes: dict[int, int] = {}
        """Per peer with a result: how many members its group counted."""
        self.counted: set[int] = set()
        self.failed = 0
        """Peers of this round whose averaging failed (aborted group, no group formed)."""
        self.recovered = 0
        """Peers of this round whose secure group finished despite members dropping late."""
        self._groups: dict[bytes, int] = {}  # group id -> 0 aborted, 1 completed, 2 recovered
        self.failed_with_quorum = 0
        """Peers whose group aborted although at least t of its members had not left."""
        self._left: set[int] = set()  # peers that left during this round
        self._open: set[int] = set()
        self._started: set[int] = set()
        self._jobs: dict[int, tuple[Tensor, float]] = {}
        self._on_done: Callable[[], None] = lambda: None
        self._round = 0

    @staticmethod
    def _no_view() -> Sequence[Any]:
        return ()  # every start passes the round's snapshot

    def begin(
        self,
        rnd: int,
        active: Sequence[int],
        contributions: dict[int, tuple[Tensor, float]],
        ready_at: dict[int, float],
        on_done: Callable[[], None],
        *,
        view: Sequence[int] | None = None,
        mine: Collection[int] | None = None,
    ) -> None:
        """Start every active peer that contributes (weight > 0) at ``ready_at[peer]``.

        ``view`` (peer indices) is the round's membership snapshot (default: the contributing
        active peers); ``mine`` the peers this process runs (a group worker runs its groups
        only; default: all). ``on_done()`` runs once every started peer has an outcome.
        """
        net = self.net
        raw = net.raw_ids
        self.results, self.sizes, self.counted, self.failed = {}, {}, set(), 0
        self.recovered = 0
        self._groups = {}
        self.failed_with_quorum = 0
        self._left = set()
        self._on_done, self._round = on_done, rnd
        contributing = [p for p in active if contributions[p][1] > 0]
        members = contributing if view is None else list(view)
        self._view = tuple(raw[p] for p in members)
        run = contributing if mine is None else [p for p in contributing if p in mine]
        self._open = set(run)
        self._started = set()
        self._jobs = {p: contributions[p] for p in run}
        groups = round_groups(self.scenario, rnd, self._view)
        warm: list[tuple[nacl.signing.SigningKey, bytes, bytes]] = []
        if groups is not None:
            index = net.index
            for group in groups:
                peers = [index[m] for m in group]
                if mine is not None and peers[0] not in self._open:
                    continue
                # The group's own loss and latency draws, and idle uplinks: a group's round
                # depends on nothing outside it, so groups can run in any process, in any mix.
                net.use_stream(peers, net.model.group_stream(group_id_of(rnd, group)))
                net.idle_uplinks(peers)
                if self.scenario.algorithm == "secure" and not self.scenario.degree:
                    warm.extend((self._key(p), raw[p], other) for p in peers for other in group)
        if warm:
            # The round's new X25519 pair keys (~3,500 per 1,000 peers), split between threads
            # (libsodium releases the GIL) before any member needs them.
            warm_pair_roots(warm, threads=self._warm_threads)
        for p in sorted(self._open):
            net.call_at(ready_at[p], self._start, p, rnd)
        if not self._open:  # every budget is spent: the round is only local compute
            net.call_at(max(ready_at.values(), default=net.loop.time()), on_done)

    def _key(self, p: int) -> nacl.signing.SigningKey:
        key = self._keys.get(p)
        if key is None:
            key = self._keys[p] = nacl.signing.SigningKey(self.net.seeds[p])
        return key

    def _start(self, p: int, rnd: int) -> None:
        if p not in self._open or rnd != self._round or not self.net.online[p]:
            return
        vector, weight = self._jobs.pop(p)
        self._started.add(p)
        try:
            self.drivers[p].start(rnd, vector, weight, self._view)
        except (ConfigError, MurmurError):  # a contribution the protocol refuses
            self._started.discard(p)
            self.failed += 1
            self._close(p)

    def _end(self, p: int, outcome: AverageResult | AggregationError | None) -> None:
        if p not in self._started:
            return
        self._started.discard(p)
        if isinstance(outcome, AverageResult):
            self.results[p] = outcome.vector
            self.sizes[p] = outcome.group_size
            self.recovered += outcome.recovered
            if outcome.group is not None:  # a group completed when any member got its result
                state = 2 if outcome.recovered else 1
                self._groups[outcome.group] = max(state, self._groups.get(outcome.group, 0))
            if outcome.contributors:
                index = self.net.index
                self.counted.update(index[c] for c in outcome.contributors)
            else:
                self.counted.add(p)
        elif outcome is not None:
            self.failed += 1
            if isinstance(outcome, AggregationAborted) and outcome.group is not None:
                self._groups.setdefault(outcome.group, 0)
                index = self.net.index
                members = [index[m] for m in outcome.members if m in index]
                stayed = sum(1 for q in members if q not in self._left)
                if members and stayed >= self._threshold(len(members)):
                    self.failed_with_quorum += 1
        self._close(p)

    def _close(self, p: int) -> None:
        if p in self._open:
            self._open.discard(p)
            if not self._open:
                self._on_done()

    def _threshold(self, k: int) -> int:
        t = self.scenario.threshold
        return t if k / 2 < t <= k else default_threshold(k)

    def peer_left(self, p: int) -> None:
        """``p`` went offline: its running round is cancelled (its secrets forgotten)."""
        self._left.add(p)
        if p in self._started:
            self.drivers[p].cancel()
        else:
            self._jobs.pop(p, None)
            self._close(p)

    @property
    def group_counts(self) -> tuple[int, int, int]:
        """This round's groups: (formed, completed, recovered). A group is formed when any
        member ended its round in it, completed when any member got its result (recovered:
        from a secure group that finished although members dropped after their input); the
        rest aborted."""
        states = self._groups.values()
        return len(self._groups), sum(s > 0 for s in states), sum(s == 2 for s in states)

    @property
    def all_done(self) -> bool:
        """True once every peer of the round has an outcome."""
        return not self._open

    def force_finish(self) -> None:
        """End every running round now (the round's hard limit passed)."""
        for p in sorted(self._open):
            self.peer_left(p)
