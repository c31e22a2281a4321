"""Group all-reduce over a ``Network``: secure (``mpc.Member``) and plaintext, one result shape.

Both compute the weighted mean ``sum(w x) / sum(w)`` of a formed group (``gossip.matchmaking``):
each member contributes the vector ``[w * x, w]`` encoded in fixed point in Z_2^bits at a scale
every member derives from public parameters (``bound`` and the group size, via
``mpc.fixedpoint.max_scale`` and ``check_capacity``), so sums are exact integers and no weight
is revealed by the secure variant.

* ``GroupAllReduce.secure``: runs ``mpc.Member`` inside the group. Its messages go over the
  network sealed when their class says ``SECRET`` (revealed shares), MACed otherwise (masked
  data). A stage ends when everything arrived, or at its deadline (``stage_timeout_s``), when
  ``member.advance()`` is called; dropouts are tolerated up to ``k - t``.
* ``GroupAllReduce.plain``: butterfly reduce-scatter + all-gather of the same encoded vectors in
  the clear (a baseline). Each chunk sum names its contributors; a member accepts the result
  only if every chunk sum arrived and all name the same contributors.

Either every member that returns holds the exact group result, or the round fails loudly for
it: ``AggregationAborted`` is raised, a warning is logged and ``stats.aborted`` grows. A chunk
that is lost or late is never replaced by local values (Hivemind does that and reports success).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from floor.errors import (
    AggregationAborted,
    ConfigError,
    MurmurError,
    OutOfStage,
    ProtocolError,
    RingOverflow,
)
from floor.identity import Identity, PeerId
from gossip.matchmaking import Group, GroupFormer
from gossip.messages import PlainChunk, PlainChunkSum
from gossip.network import Network, Poster
from mpc.fixedpoint import Bits, check_capacity, decode, encode_, max_scale
from mpc.messages import MESSAGE_TYPES as MPC_TYPES
from mpc.protocol import Member, Stage, default_threshold
from mpc.survivors import chunk_bounds

__all__ = [
    "AllReduceConfig",
    "AllReduceStats",
    "AverageResult",
    "Averager",
    "GroupAllReduce",
    "GroupAverager",
]

log = logging.getLogger("murmur.gossip.allreduce")

_EARLY_GROUPS = 32
_EARLY_PER_GROUP = 256
_FINISHED_MEMORY = 1024


@dataclass(frozen=True)
class AverageResult:
    """The outcome of one averaging step for one peer.

    ``vector`` is the new value (the group's weighted mean, for group averaging); ``weight`` is
    the peer's new weight (the group's mean weight ``sum(w) / size``, which conserves the
    weighted total). ``group_size`` counts the inputs in the mean.
    """

    vector: Tensor
    weight: float
    group_size: int
    round: int
    group: bytes | None = None
    contributors: tuple[PeerId, ...] = ()
    """Whose inputs are in the mean (group averaging; empty for the baselines)."""
    total: Tensor | None = None
    """Group averaging: the exact group totals ``[sum w x, sum w]`` (decoded, float64)."""
    scale: float | None = None
    """Group averaging: the fixed-point scale the group encoded with."""


class Averager(Protocol):
    """The one shape every averaging algorithm has, so callers can pick one by name.

    ``average`` raises ``AggregationAborted`` or ``GroupFormationFailed`` (both
    ``AggregationError``) when the step failed for this peer: it keeps its model.
    """

    name: str

    async def average(self, vector: Tensor, weight: float, round: int) -> AverageResult:
        """Average ``vector`` (weight ``weight``) with other peers for ``round``."""
        ...


@dataclass(frozen=True)
class AllReduceConfig:
    """Group all-reduce parameters (public: every member must use the same)."""

    bits: Bits | None = 64
    """Ring width (32 or 64); ``None`` picks the narrower ring that still gives ``resolution``."""
    bound: float = 1e4
    """Public bound on every |w * x| and on w; a larger value is refused (``RingOverflow``)."""
    resolution: float = 2.0**-20
    """With ``bits=None``: the coarsest fixed-point step accepted (1 / scale). Z_2^32 is used
    when its scale for ``bound`` and the group size is at least ``1 / resolution``: half the
    bytes and half the mask work of Z_2^64."""
    stage_timeout_s: float = 1.0
    """Deadline of each protocol stage on the loop's clock."""
    threshold: int | None = None
    """Least number of counted inputs (default ceil(2k/3))."""
    degree: int | None = None
    """SecAgg+ mask-graph degree (None: complete graph)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.bound) and self.bound > 0):
            raise ConfigError(f"bound must be positive and finite, got {self.bound!r}")
        if not self.stage_timeout_s > 0:
            raise ConfigError(f"stage_timeout_s must be > 0, got {self.stage_timeout_s!r}")
        if self.bits not in (32, 64, None):
            raise ConfigError(f"bits must be 32, 64 or None, got {self.bits!r}")
        if not (math.isfinite(self.resolution) and 0 < self.resolution < 1):
            raise ConfigError(f"resolution must be in (0, 1), got {self.resolution!r}")

    def ring_bits(self, k: int) -> Bits:
        """The ring width a group of ``k`` uses (every member derives the same)."""
        if self.bits is not None:
            return self.bits
        narrow = max_scale(bound=self.bound, members=k, bits=32)
        return 32 if narrow * self.resolution >= 1 else 64


@dataclass
class AllReduceStats:
    """Counters (for status and metrics)."""

    completed: int = 0
    aborted: int = 0
    refused: int = 0
    """Inbound protocol messages refused (late, duplicate, inconsistent)."""
    send_failures: int = 0
    last_abort: str | None = None


@dataclass
class _Session:
    queue: asyncio.Queue[tuple[PeerId, Any]] = field(default_factory=asyncio.Queue)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


class GroupAllReduce:
    """Secure and plaintext group all-reduce for one peer. ``close()`` to unregister."""

    def __init__(
        self, net: Network, identity: Identity, config: AllReduceConfig | None = None
    ) -> None:
        if identity.peer_id != net.local_id:
            raise ConfigError("the identity is not the network's local peer")
        self.config = config or AllReduceConfig()
        self.stats = AllReduceStats()
        self._net = net
        self._identity = identity
        self._sessions: dict[bytes, _Session] = {}
        self._early: OrderedDict[bytes, list[tuple[PeerId, Any]]] = OrderedDict()
        self._finished: OrderedDict[bytes, None] = OrderedDict()
        self._types = (*MPC_TYPES.values(), PlainChunk, PlainChunkSum)
        self._post: Poster | None = getattr(net, "post", None)
        for cls in self._types:
            net.register(cls, self._on_message)

    def close(self) -> None:
        """Unregister the handlers."""
        for cls in self._types:
            self._net.unregister(cls)

    # ------------------------------------------------------------------ routing

    async def _on_message(self, sender: PeerId, msg: Any) -> None:
        session = self._sessions.get(msg.group)
        if session is not None:
            session.queue.put_nowait((sender, msg))
            return
        if msg.group in self._finished:
            raise OutOfStage("that group's round is over on this peer")
        early = self._early.get(msg.group)
        if early is None:
            if len(self._early) >= _EARLY_GROUPS:
                self._early.popitem(last=False)
            early = self._early[msg.group] = []
        if len(early) >= _EARLY_PER_GROUP:
            raise OutOfStage("too many messages for a group round that has not started here")
        early.append((sender, msg))

    def _open(self, group: bytes) -> _Session:
        if group in self._sessions or group in self._finished:
            raise ConfigError("this group's round already ran on this peer")
        session = self._sessions[group] = _Session()
        for item in self._early.pop(group, []):
            session.queue.put_nowait(item)
        return session

    def _close(self, group: bytes) -> None:
        session = self._sessions.pop(group)
        for task in session.tasks:
            task.cancel()
        self._finished[group] = None
        if len(self._finished) > _FINISHED_MEMORY:
            self._finished.popitem(last=False)

    def _dispatch(self, session: _Session, out: list[tuple[PeerId, Any]]) -> None:
        post = self._post
        if post is not None:  # no task per message (the simulator, the aiohttp stream)
            timeout = self.config.stage_timeout_s
            for peer, msg in out:
                post(peer, msg, timeout=timeout, on_failure=self._send_failed)
            return
        for peer, msg in out:
            task = asyncio.ensure_future(self._send(peer, msg))
            session.tasks.add(task)
            task.add_done_callback(session.tasks.discard)

    def _send_failed(self, msg: Any, exc: MurmurError) -> None:
        self.stats.send_failures += 1
        log.debug("event=send_failed type=%s error=%s", msg.TYPE, exc)

    async def _send(self, peer: PeerId, msg: Any) -> None:
        try:
            await self._net.send(peer, msg, timeout=self.config.stage_timeout_s)
        except MurmurError as exc:
            self.stats.send_failures += 1
            log.debug("event=send_failed type=%s peer=%s error=%s", msg.TYPE, peer.short(), exc)

    # ------------------------------------------------------------------ encoding

    def scale(self, k: int) -> float:
        """The fixed-point scale for a group of ``k``: the largest the ring allows for ``bound``."""
        return self._scale(k, self.config.ring_bits(k))

    def _scale(self, k: int, bits: Bits) -> float:
        bound = self.config.bound
        scale = max_scale(bound=bound, members=k, bits=bits)
        check_capacity(bound=bound, members=k, scale=scale, bits=bits)
        return scale

    def _encode(self, vector: Tensor, weight: float, k: int) -> tuple[Tensor, float]:
        if vector.dim() != 1 or not vector.is_floating_point():
            raise ConfigError("vector must be a 1-D floating-point tensor")
        if not (math.isfinite(weight) and weight > 0):
            raise ConfigError(f"weight must be positive and finite, got {weight!r}")
        contribution = torch.empty(vector.numel() + 1, dtype=torch.float64)
        torch.mul(vector.detach(), weight, out=contribution[:-1])
        contribution[-1] = weight
        lo, hi = (float(v) for v in torch.aminmax(contribution))  # NaN if any is NaN
        worst = max(-lo, hi)
        if math.isnan(lo) or math.isnan(hi):
            raise ConfigError("vector holds NaN")
        if not worst <= self.config.bound:
            raise RingOverflow(f"|w x| or w = {worst:.6g} exceeds the public bound")
        bits = self.config.ring_bits(k)  # the round's ring: later steps read it off the dtype
        scale = self._scale(k, bits)
        log.debug("event=encode k=%d ring_bits=%d scale=2^%d", k, bits, round(math.log2(scale)))
        return encode_(contribution, scale=scale, bits=bits), scale

    def _result(
        self,
        group: Group,
        ring: Tensor,
        scale: float,
        contributors: tuple[PeerId, ...],
        like: Tensor,
    ) -> AverageResult:
        total = decode(ring, scale=scale, bits=32 if ring.dtype == torch.int32 else 64)
        weight = float(total[-1])
        if not weight > 0:
            raise self._fail(group, "the group's total weight is not positive")
        self.stats.completed += 1
        return AverageResult(
            (total[:-1] / weight).to(like.dtype),
            weight / len(contributors),
            len(contributors),
            group.round,
            group.id,
            contributors,
            total,
            scale,
        )

    def _fail(self, group: Group, reason: str) -> AggregationAborted:
        self.stats.aborted += 1
        self.stats.last_abort = reason
        log.warning(
            "event=group_round_aborted round=%d group=%s size=%d reason=%s",
            group.round,
            group.id.hex()[:8],
            group.size,
            reason,
        )
        return AggregationAborted(f"group round aborted: {reason}")

    def _check_group(self, group: Group) -> None:
        if self._net.local_id not in group.members:
            raise ConfigError("this peer is not a member of the group")

    # ------------------------------------------------------------------ secure

    async def secure(self, group: Group, vector: Tensor, weight: float) -> AverageResult:
        """The group's weighted mean by secure aggregation; ``AggregationAborted`` on failure."""
        self._check_group(group)
        ring, scale = self._encode(vector, weight, group.size)
        cfg = self.config
        member = Member(
            self._identity.seed(),
            [m.raw for m in group.members],
            group=group.id,
            round=group.round,
            vector=ring,
            threshold=default_threshold(group.size) if cfg.threshold is None else cfg.threshold,
            degree=cfg.degree,
        )
        ids = {m.raw: m for m in group.members}
        session = self._open(group.id)
        try:
            await self._drive(member, session, ids)
        finally:
            # cancelled or failed mid-round: the member must still forget its pair secrets
            member.cancel("the round's driver stopped")
            self._close(group.id)
        if member.stage is not Stage.DONE:
            raise self._fail(group, member.abort_reason or "did not finish")
        counted = tuple(m for m in group.members if m.raw in (member.counted or ()))
        return self._result(group, member.output(), scale, counted, vector)

    async def _drive(self, member: Member, session: _Session, ids: dict[bytes, PeerId]) -> None:
        def send(out: list[tuple[bytes, Any]]) -> None:
            self._dispatch(session, [(ids[r], m) for r, m in out])

        timeout = self.config.stage_timeout_s
        send(member.start())
        stage = member.stage
        deadline = self._net.time() + timeout
        queue = session.queue
        while not member.finished:
            if queue.empty():  # wait (bounded by the stage deadline) only when nothing is queued
                try:
                    async with asyncio.timeout_at(deadline):
                        sender, msg = await queue.get()
                except TimeoutError:
                    send(member.advance())
                    sender = None
            else:
                sender, msg = queue.get_nowait()
            if sender is not None:
                try:
                    send(member.receive(sender.raw, msg))
                except ProtocolError as exc:
                    self.stats.refused += 1
                    log.debug("event=refused type=%s error=%s", msg.TYPE, exc)
            if member.stage != stage:
                # a member that finished a stage early still waits for one that waited the
                # whole stage: the next deadline counts from the later of now and the old one
                stage = member.stage
                deadline = max(self._net.time(), deadline) + timeout
        # let the last messages (chunk sums) leave before the session's sends are cancelled
        if session.tasks:
            await asyncio.wait(set(session.tasks), timeout=timeout)

    # ------------------------------------------------------------------ plaintext

    async def plain(self, group: Group, vector: Tensor, weight: float) -> AverageResult:
        """The group's weighted mean by plaintext butterfly all-reduce (same encoding, exact)."""
        self._check_group(group)
        ring, scale = self._encode(vector, weight, group.size)
        cfg = self.config
        k = group.size
        threshold = default_threshold(k) if cfg.threshold is None else cfg.threshold
        me = group.members.index(self._net.local_id)
        bounds = chunk_bounds(ring.numel(), k)
        session = self._open(group.id)
        try:
            outcome = await self._plain_rounds(group, session, ring, me, bounds)
        finally:
            self._close(group.id)
        if isinstance(outcome, str):
            raise self._fail(group, outcome)
        total, contributors = outcome
        if len(contributors) < threshold:
            raise self._fail(group, f"{len(contributors)} contributors, threshold {threshold}")
        return self._result(group, total, scale, contributors, vector)

    async def _plain_rounds(
        self,
        group: Group,
        session: _Session,
        ring: Tensor,
        me: int,
        bounds: list[tuple[int, int]],
    ) -> tuple[Tensor, tuple[PeerId, ...]] | str:
        members, k, rnd = group.members, group.size, group.round
        self._dispatch(
            session,
            [
                (m, PlainChunk(group.id, rnd, j, ring[bounds[j][0] : bounds[j][1]]))
                for j, m in enumerate(members)
                if j != me
            ],
        )
        lo, hi = bounds[me]
        mine: dict[PeerId, Tensor] = {members[me]: ring[lo:hi]}
        sums: dict[int, PlainChunkSum] = {}
        timeout = self.config.stage_timeout_s
        deadline = self._net.time() + timeout
        while len(mine) < k:  # reduce-scatter: collect my chunk from every member
            item = await self._next(session, deadline)
            if item is None:
                break
            self._plain_accept(item, group, me, bounds, ring.dtype, mine, sums, reducing=True)
        contributors = tuple(sorted(mine, key=lambda p: p.raw))
        mine_sum = torch.stack([mine[p] for p in contributors]).sum(dim=0, dtype=ring.dtype)
        own = PlainChunkSum(group.id, rnd, me, mine_sum, contributors)
        sums[me] = own
        self._dispatch(session, [(m, own) for j, m in enumerate(members) if j != me])
        deadline += timeout  # a slower reducer may send its sum at the end of the first stage
        while len(sums) < k:  # all-gather: collect every chunk sum
            item = await self._next(session, deadline)
            if item is None:
                break
            self._plain_accept(item, group, me, bounds, ring.dtype, mine, sums, reducing=False)
        if session.tasks:
            await asyncio.wait(set(session.tasks), timeout=timeout)
        if len(sums) < k:
            return f"chunk sums {sorted(set(range(k)) - set(sums))} never arrived"
        if any(s.contributors != contributors for s in sums.values()):
            return "reducers disagree on the contributors"
        return torch.cat([sums[j].data for j in range(k)]), contributors

    async def _next(self, session: _Session, deadline: float) -> tuple[PeerId, Any] | None:
        if not session.queue.empty():
            return session.queue.get_nowait()
        try:
            async with asyncio.timeout_at(deadline):
                return await session.queue.get()
        except TimeoutError:
            return None

    def _plain_accept(
        self,
        item: tuple[PeerId, Any],
        group: Group,
        me: int,
        bounds: list[tuple[int, int]],
        dtype: torch.dtype,
        mine: dict[PeerId, Tensor],
        sums: dict[int, PlainChunkSum],
        *,
        reducing: bool,
    ) -> None:
        sender, msg = item
        j = msg.chunk
        lo, hi = bounds[j] if 0 <= j < group.size else (0, -1)
        ok = (
            sender in group.members
            and msg.round == group.round
            and isinstance(msg.data, Tensor)
            and msg.data.dtype == dtype
            and msg.data.dim() == 1
            and msg.data.numel() == hi - lo
        )
        if ok and isinstance(msg, PlainChunk) and reducing and j == me and sender not in mine:
            mine[sender] = msg.data
        elif (
            ok
            and isinstance(msg, PlainChunkSum)
            and group.members[j] == sender
            and j not in sums
            and set(msg.contributors) <= set(group.members)
        ):
            sums[j] = msg
        else:  # late, duplicate or invalid: never used
            self.stats.refused += 1
            log.debug("event=refused type=%s sender=%s", msg.TYPE, sender.short())


class GroupAverager:
    """An ``Averager`` by groups: form a group (``GroupFormer``), then all-reduce inside it.

    ``secure=True`` (name ``"secure"``) uses ``GroupAllReduce.secure``, else ``"plain"``.
    """

    def __init__(
        self,
        former: GroupFormer,
        allreduce: GroupAllReduce,
        *,
        secure: bool = True,
        match_timeout_s: float | None = None,
    ) -> None:
        self.name = "secure" if secure else "plain"
        self.former = former
        self.allreduce = allreduce
        self._secure = secure
        self._match_timeout = match_timeout_s

    async def average(self, vector: Tensor, weight: float, round: int) -> AverageResult:
        """Form this round's group and return its weighted mean (or raise an AggregationError)."""
        group = await self.former.form_group(round, timeout=self._match_timeout)
        if self._secure:
            return await self.allreduce.secure(group, vector, weight)
        return await self.allreduce.plain(group, vector, weight)
