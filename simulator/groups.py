"""Group averaging rounds over the simulated network: secure (``mpc.Member``) and plaintext.

Every round the online peers are split into groups of about ``group_size`` by a deterministic
hash of (seed, round, peer id) (DESIGN.md: "a deterministic hash-based grouping is also useful
in the simulator"). Inside a group each member runs a sans-IO state machine with the
interface of ``mpc.Member`` (``start()``, ``receive(sender, msg)``, ``advance()``, each
returning ``[(recipient_id, message), ...]``):

* ``secure-group``: ``mpc.Member`` itself, the daemon's secure aggregation (pairwise masks,
  Shamir shares, butterfly reduce, dropout recovery): every mask, share and seal is real. A
  member contributes ``encode(w * (theta + private delta) || w)`` in Z_2^64 and divides the
  decoded sum by the summed weight;
* ``group``: ``PlainMember``, the same butterfly reduce-scatter/all-gather in plaintext.

A member starts when its local training ends (its ``compute_s``). The runner keeps one
deadline per group and stage (``stage_timeout_s``): when it passes, the members still at the
group's earliest stage ``advance()``, which is how peers that left or straggle are detected.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from floor.errors import ProtocolError
from mpc import MESSAGE_TYPES as MPC_TYPES
from mpc import Member, Stage, warm_pair_roots
from mpc.fixedpoint import Bits, decode, encode
from simulator.messages import PlainChunk, PlainSum
from simulator.network import SimNetwork

__all__ = ["GroupRound", "PlainMember", "hash_groups"]

_SCALE = 2.0**20
_BITS: Bits = 64
Outgoing = list[tuple[bytes, Any]]


class MemberLike(Protocol):
    """The sans-IO interface shared by ``mpc.Member`` and ``PlainMember``."""

    @property
    def stage(self) -> int: ...

    @property
    def finished(self) -> bool: ...

    def start(self) -> Outgoing: ...

    def receive(self, sender: bytes, msg: Any) -> Outgoing: ...

    def advance(self) -> Outgoing: ...


def hash_groups(
    peers: Sequence[int], ids: Sequence[bytes], size: int, seed: int, rnd: int
) -> list[list[int]]:
    """Split ``peers`` into groups of ``size`` (the last few join earlier groups), by hash order."""
    salt = seed.to_bytes(8, "big") + rnd.to_bytes(8, "big")
    order = sorted(peers, key=lambda p: hashlib.blake2b(salt + ids[p], digest_size=8).digest())
    count = max(1, len(order) // size)
    groups = [order[g * size : (g + 1) * size] for g in range(count)]
    for j, p in enumerate(order[count * size :]):
        groups[j % count].append(p)
    return [g for g in groups if len(g) >= 2]


class PlainMember:
    """A plaintext butterfly all-reduce member: chunk j of every weighted vector goes to member
    j, which sums it with the weights and sends the chunk sum to everyone. Stages: 1 reduce,
    2 gather, 3 done. A missing chunk sum at the deadline keeps the member's own values there.
    """

    def __init__(
        self,
        me: bytes,
        members: Sequence[bytes],
        *,
        group: bytes,
        round: int,
        vector: Tensor,
        weight: float,
    ) -> None:
        self.id, self.members = me, tuple(sorted(members))
        self.group, self.round, self.k = group, round, len(self.members)
        self._me = self.members.index(me)
        n = vector.numel()
        self._bounds = [(n * j // self.k, n * (j + 1) // self.k) for j in range(self.k)]
        self._x = vector.double()
        self._w = float(weight)
        self._acc: Tensor | None = None
        self._wacc = 0.0
        self._from: set[bytes] = set()
        self._sums: dict[int, tuple[Tensor, float]] = {}
        self._pending: list[tuple[bytes, PlainSum]] = []
        self.stage = 1
        self._started = False
        self.result: Tensor | None = None

    @property
    def finished(self) -> bool:
        """True once the average is known."""
        return self.stage == 3

    def start(self) -> Outgoing:
        """Send chunk j of ``w * x`` to member j."""
        self._started = True
        y = self._x * self._w
        out: Outgoing = []
        for j, m in enumerate(self.members):
            lo, hi = self._bounds[j]
            if j == self._me:
                self._add(m, y[lo:hi], self._w)
            else:
                out.append((m, PlainChunk(self.group, self.round, j, y[lo:hi], self._w)))
        return out + self._check()

    def _add(self, sender: bytes, data: Tensor, weight: float) -> None:
        self._acc = data.clone() if self._acc is None else self._acc + data
        self._wacc += weight
        self._from.add(sender)

    def receive(self, sender: bytes, msg: Any) -> Outgoing:
        """Handle a chunk (stage 1) or a chunk sum (stage 2)."""
        if isinstance(msg, PlainChunk):
            if self.stage != 1 or msg.chunk != self._me or sender in self._from:
                raise ProtocolError("unexpected plaintext chunk")
            self._add(sender, msg.data, msg.weight)
            return self._check()
        if isinstance(msg, PlainSum):
            if self.stage == 1:
                self._pending.append((sender, msg))
                return []
            if self.stage == 2 and msg.chunk not in self._sums:
                self._sums[msg.chunk] = (msg.data, msg.weight)
            return self._check()
        raise ProtocolError("not a plaintext group message")

    def _check(self) -> Outgoing:
        if self.stage == 1 and self._started and len(self._from) == self.k:
            return self.advance()
        if self.stage == 2 and len(self._sums) == self.k:
            return self.advance()
        return []

    def advance(self) -> Outgoing:
        """Close the current stage with what arrived."""
        if not self._started or self.finished:
            return []
        if self.stage == 1:
            self.stage = 2
            assert self._acc is not None
            total = PlainSum(self.group, self.round, self._me, self._acc, self._wacc)
            self._sums[self._me] = (self._acc, self._wacc)
            out: Outgoing = [(m, total) for m in self.members if m != self.id]
            for sender, msg in self._pending:
                out += self.receive(sender, msg)
            self._pending.clear()
            return out + self._check()
        parts = []
        for j, (lo, hi) in enumerate(self._bounds):
            got = self._sums.get(j)
            parts.append(got[0] / got[1] if got is not None and got[1] > 0 else self._x[lo:hi])
        self.result = torch.cat(parts)
        self.stage = 3
        return []


@dataclass
class _Group:
    gid: bytes
    peers: list[int]
    members: dict[int, MemberLike]
    min_stage: int = 0
    at_min: int = 0  # live members at min_stage
    deadline: float = 0.0  # when the group's lowest live stage times out
    checking: bool = False  # a deadline check is scheduled
    done: bool = False


class GroupRound:
    """Runs one round of group averaging among the online peers (secure or plaintext)."""

    def __init__(
        self,
        net: SimNetwork,
        *,
        secure: bool,
        timeout: float,
        threshold: int,
        degree: int,
        warm_threads: int = 2,
    ) -> None:
        self.net, self.secure, self.timeout = net, secure, timeout
        self.warm_threads = warm_threads
        self.threshold, self.degree = threshold, degree
        self._groups: list[_Group] = []
        self._of: dict[int, _Group] = {}
        self._open = 0
        self._on_done: Callable[[], None] = lambda: None
        self.results: dict[int, Tensor] = {}
        self.counted: set[int] = set()
        self.aborted_groups = 0
        types = list(MPC_TYPES.values()) if secure else [PlainChunk, PlainSum]
        for p in range(net.n):
            handler = functools.partial(self._on_message, p)
            for t in types:
                net.register(p, t, handler)

    def begin(
        self,
        rnd: int,
        groups: list[list[int]],
        contributions: dict[int, tuple[Tensor, float]],
        ready_at: dict[int, float],
        on_done: Callable[[], None],
    ) -> None:
        """Form the members of every group and schedule each member's start."""
        net = self.net
        self._groups, self._of, self.results, self.counted = [], {}, {}, set()
        self.aborted_groups = 0
        self._on_done = on_done
        encoded = self._encode_all(groups, contributions) if self.secure else {}
        for peers in groups:
            ids = [net.raw_ids[p] for p in peers]
            gid = hashlib.blake2b(
                b"murmur.sim.group" + rnd.to_bytes(8, "big") + b"".join(sorted(ids)), digest_size=16
            ).digest()
            members: dict[int, MemberLike] = {}
            k = len(peers)
            threshold = (
                min(self.threshold, k) if self.threshold and self.threshold > k / 2 else None
            )
            degree = self.degree if 0 < self.degree < k - 1 else None
            for p in peers:
                if self.secure:
                    members[p] = Member(
                        net.seeds[p],
                        ids,
                        group=gid,
                        round=rnd,
                        vector=encoded[p],
                        threshold=threshold,
                        degree=degree,
                    )
                else:
                    vector, weight = contributions[p]
                    members[p] = PlainMember(
                        net.raw_ids[p], ids, group=gid, round=rnd, vector=vector, weight=weight
                    )
            group = _Group(gid, list(peers), members)
            # The group's own loss and latency draws, and idle uplinks: a group's round depends
            # on nothing outside it, so groups can run in any process, in any mix.
            net.use_stream(peers, net.model.group_stream(gid))
            net.idle_uplinks(peers)
            self._groups.append(group)
            for p in peers:
                self._of[p] = group
        if self.secure:
            # The round's new pair keys (X25519, ~3,500 per 1,000 peers) on two threads at once,
            # before any member needs them (the results are the same: only faster).
            every = (m for g in self._groups for m in g.members.values())
            warm_pair_roots((m for m in every if isinstance(m, Member)), threads=self.warm_threads)
        self._open = len(self._groups)
        for group in self._groups:
            for p in group.peers:
                net.call_at(ready_at[p], self._start, p)
            self._update(group)
        if self._open == 0:
            on_done()

    @staticmethod
    def _encode_all(
        groups: list[list[int]], contributions: dict[int, tuple[Tensor, float]]
    ) -> dict[int, Tensor]:
        """Every member's ring input ``encode(w * theta || w)``, in one batched encoding (the
        same values as one by one: the encoding is elementwise); rows are views."""
        order = [p for peers in groups for p in peers]
        if not order:
            return {}
        vectors = torch.stack([contributions[p][0] for p in order]).double()
        weights = torch.tensor([contributions[p][1] for p in order], dtype=torch.float64)
        flat = torch.cat([vectors * weights.unsqueeze(1), weights.unsqueeze(1)], dim=1)
        rows = encode(flat, scale=_SCALE, bits=_BITS).unbind(0)
        return dict(zip(order, rows, strict=True))

    # ------------------------------------------------------------------ events

    def _send(self, p: int, out: Outgoing) -> None:
        if out:
            self.net.post_many(p, out)

    def _start(self, p: int) -> None:
        group = self._of.get(p)
        if group is None or group.done or not self.net.online[p]:
            return
        self._send(p, group.members[p].start())
        self._update(group)

    def _on_message(self, p: int, sender: int, msg: Any) -> None:
        group = self._of.get(p)
        if group is None or group.done or msg.group != group.gid:
            raise ProtocolError("no member of that group here")
        member = group.members[p]
        before = member.stage
        out = member.receive(self.net.raw_ids[sender], msg)
        if out:
            self.net.post_many(p, out)
        if member.stage != before:
            # Only the last live member to leave the group's lowest stage, or one finishing,
            # can change the group's lowest live stage or end it: skip the scan otherwise.
            if member.finished or before < group.min_stage:
                self._update(group)
            elif before == group.min_stage:
                group.at_min -= 1
                if group.at_min <= 0:
                    self._update(group)

    def peer_left(self, p: int) -> None:
        """``p`` went offline: its member stops; its group may now be finished."""
        group = self._of.get(p)
        if group is not None and not group.done:
            self._update(group)

    def _live(self, group: _Group) -> list[tuple[int, MemberLike]]:
        online = self.net.online
        return [(p, m) for p, m in group.members.items() if online[p] and not m.finished]

    def _update(self, group: _Group) -> None:
        if group.done:
            return
        online = self.net.online
        lowest, count = -1, 0
        for p, m in group.members.items():
            if not online[p] or m.finished:
                continue
            stage = m.stage
            if count == 0 or stage < lowest:
                lowest, count = stage, 1
            elif stage == lowest:
                count += 1
        if count == 0:
            self._finish(group)
            return
        group.at_min = count
        if lowest != group.min_stage:
            group.min_stage = lowest
            self._arm(group)

    def _arm(self, group: _Group) -> None:
        # Deadlines go through the network's tick buckets, ordered by (time, scheduling order)
        # like every other event of the group (a loop timer due at the same instant as a tick
        # could run before or after it depending on the other timers in the heap). A stage
        # change only moves the deadline later, so one scheduled check per group suffices: a
        # check that finds the deadline moved schedules itself again for the new one.
        net = self.net
        group.deadline = net.loop.time() + self.timeout
        if not group.checking:
            group.checking = True
            net.call_at(group.deadline, self._deadline, group)

    def _deadline(self, group: _Group) -> None:
        group.checking = False
        if group.done:
            return
        net = self.net
        if net.tick_of(net.loop.time()) < net.tick_of(group.deadline):
            group.checking = True  # the stage changed since: check again at its deadline
            net.call_at(group.deadline, self._deadline, group)
            return
        for p, m in self._live(group):
            if m.stage == group.min_stage:
                self._send(p, m.advance())
        self._update(group)
        if not group.done and not group.checking:
            self._arm(group)

    @property
    def all_done(self) -> bool:
        """True once every group of the round has ended."""
        return self._open == 0

    def force_finish(self) -> None:
        """End every open group now (the round's hard limit passed)."""
        for group in self._groups:
            if not group.done:
                self._finish(group)

    def _finish(self, group: _Group) -> None:
        group.done = True
        result: Tensor | None = None
        counted: frozenset[bytes] = frozenset()
        for p, m in group.members.items():
            if self.secure:
                assert isinstance(m, Member)
                if m.stage is not Stage.DONE:
                    m.cancel("the group round ended first")  # forget its pair secrets
                    continue
                if result is None:
                    total = decode(m.output(), scale=_SCALE, bits=_BITS)
                    weight = float(total[-1])
                    result = total[:-1] / weight if weight > 0 else None
                    counted = m.counted or frozenset()
            else:
                assert isinstance(m, PlainMember)
                if m.result is None:
                    continue
                self.results[p] = m.result
                self.counted.add(p)
                continue
            if result is not None:
                self.results[p] = result
        if self.secure and result is None:
            self.aborted_groups += 1
        index = self.net.index
        self.counted.update(index[c] for c in counted)
        # Let the members (their chunks, shares and views) go now: a deadline check still
        # scheduled for this group holds the group, not them.
        group.members = {}
        self._open -= 1
        if self._open == 0:
            self._on_done()
