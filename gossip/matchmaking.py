"""Matchmaking without a server: ready peers form groups of a target size by invitation.

``Matchmaker.form_group(round)`` (DESIGN.md, round step 2): the peer waits a random back-off; if
an invitation for the same round arrives meanwhile it accepts the first one and waits for the
inviter's verdict; otherwise it becomes an inviter, invites ready peers sampled from its view
(more as invitees decline) and closes the group when full or at its deadline. A closed group
gets a fresh random id and its sorted member list, sent sealed to each member; an attempt
below the minimum size is cancelled and everyone in it retries until the round's deadline,
then ``GroupFormationFailed`` (skip the round, keep the model). A peer accepts an invitation
only while it is ready for that round, waiting, and in no other attempt, so it is in at most
one group at a time. Every step has a deadline on the loop's clock.

``HashMatchmaker`` is the deterministic option (``hash_groups``): the groups follow from the
round number and the peer ids alone, with no messages; all peers must share one view.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from floor.errors import (
    ConfigError,
    GroupFormationFailed,
    InconsistentMessage,
    MurmurError,
)
from floor.identity import PeerId
from gossip.messages import GroupCancelled, GroupFormed, Invite, InviteReply
from gossip.network import Network

__all__ = [
    "Group",
    "GroupFormer",
    "HashMatchmaker",
    "MatchConfig",
    "Matchmaker",
    "hash_groups",
]

log = logging.getLogger("murmur.gossip.matchmaking")

GROUP_ID_BYTES = 16
MAX_GROUP_SIZE = 256


@dataclass(frozen=True)
class Group:
    """A formed group: round, fresh group id, sorted member ids, and who invited (if anyone)."""

    round: int
    id: bytes
    members: tuple[PeerId, ...]
    leader: PeerId | None = None

    @property
    def size(self) -> int:
        """Number of members."""
        return len(self.members)


class GroupFormer(Protocol):
    """Anything that forms the group of one round: ``Matchmaker`` or ``HashMatchmaker``."""

    async def form_group(self, round: int, *, timeout: float | None = None) -> Group:
        """The group this peer is in for ``round``; ``GroupFormationFailed`` if none formed."""
        ...


@dataclass(frozen=True)
class MatchConfig:
    """Matchmaking parameters (seconds on the loop's clock)."""

    target_size: int = 8
    """k: the inviter closes the group when it has this many members."""
    min_size: int = 3
    """Smaller groups dissolve (with 2, a sum reveals the other's value)."""
    backoff_s: float = 0.05
    """Upper end of the uniform random back-off before inviting."""
    invite_timeout_s: float = 0.25
    """How long an inviter waits for one invitee's answer."""
    form_timeout_s: float = 0.5
    """An inviter closes (or dissolves) its group at most this long after starting to invite."""
    round_timeout_s: float = 5.0
    """Default deadline of ``form_group`` (all retries included)."""

    def __post_init__(self) -> None:
        if not 2 <= self.min_size <= self.target_size <= MAX_GROUP_SIZE:
            raise ConfigError(
                f"need 2 <= min_size <= target_size <= {MAX_GROUP_SIZE}, "
                f"got {self.min_size}, {self.target_size}"
            )
        for name in ("backoff_s", "invite_timeout_s", "form_timeout_s", "round_timeout_s"):
            value = getattr(self, name)
            if not value > 0:
                raise ConfigError(f"{name} must be > 0, got {value!r}")


def _sorted(peers: Sequence[PeerId]) -> tuple[PeerId, ...]:
    return tuple(sorted(set(peers), key=lambda p: p.raw))


class Matchmaker:
    """Forms groups by invitation over a ``Network``. One per peer; ``close()`` to unregister.

    ``rng`` drives back-offs, sampling and, when given, the invitation and group ids (so a
    seeded simulation repeats exactly); without it, ids come from the OS CSPRNG.
    """

    def __init__(
        self,
        net: Network,
        config: MatchConfig | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config or MatchConfig()
        self._net = net
        self._rng = rng or random.Random(os.urandom(16))
        # ids are public but must not collide; an injected rng (simulation) makes runs repeat
        self._new_id: Callable[[int], bytes] = os.urandom if rng is None else rng.randbytes
        self._ready: int | None = None  # the round we are forming a group for
        self._waiting = False  # in back-off: may accept an invitation
        self._inviting: bytes | None = None  # our own invitation id while we invite
        self._yield: asyncio.Future[None] | None = None  # set when we yield to another inviter
        self._wake: asyncio.Future[None] | None = None
        self._commit: tuple[PeerId, bytes] | None = None  # (inviter, invite id) accepted
        self._commit_expiry = 0.0
        self._outcome: asyncio.Future[Group | None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.formed = 0
        """Groups this peer ended up in."""
        self.dissolved = 0
        """Attempts (ours or accepted) that were cancelled or expired."""
        self.failed = 0
        """Rounds for which no group formed by the deadline."""
        net.register(Invite, self._on_invite)
        net.register(GroupFormed, self._on_formed)
        net.register(GroupCancelled, self._on_cancelled)

    def close(self) -> None:
        """Unregister the handlers and cancel best-effort notifications."""
        for cls in (Invite, GroupFormed, GroupCancelled):
            self._net.unregister(cls)
        for task in list(self._tasks):
            task.cancel()

    # ------------------------------------------------------------------ handlers

    async def _on_invite(self, sender: PeerId, msg: Invite) -> InviteReply:
        # An inviter that has not closed its group yet yields to an invitation with a smaller
        # id (a strict order: of concurrent inviters the smallest never yields, and the others
        # end up in its group). A yielding inviter cancels its own attempt; the peers it had
        # gathered are released, answer "busy" meanwhile, and are asked again by the winner.
        yielding = (
            self._inviting is not None
            and self._yield is not None
            and not self._yield.done()
            and msg.invite < self._inviting
        )
        ok = (
            self._ready == msg.round
            and (self._waiting or yielding)
            and self._commit is None
            and 0 < msg.expires_in <= self.config.form_timeout_s + self.config.invite_timeout_s
        )
        if ok:
            if yielding and self._yield is not None:
                self._yield.set_result(None)
            loop = asyncio.get_running_loop()
            self._commit = (sender, msg.invite)
            self._commit_expiry = self._net.time() + msg.expires_in + self.config.invite_timeout_s
            self._outcome = loop.create_future()
            if self._wake is not None and not self._wake.done():
                self._wake.set_result(None)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "event=invite me=%s from=%s accept=%s yielding=%s waiting=%s",
                self._net.local_id.short(),
                sender.short(),
                ok,
                yielding,
                self._waiting,
            )
        return InviteReply(msg.invite, ok, busy=not ok and self._ready == msg.round)

    async def _on_formed(self, sender: PeerId, msg: GroupFormed) -> None:
        if self._commit != (sender, msg.invite) or self._ready != msg.round:
            raise InconsistentMessage("a group list for an invitation this peer did not accept")
        members = _sorted(msg.members)
        if (
            len(members) != len(msg.members)
            or self._net.local_id not in members
            or sender not in members
            or not self.config.min_size <= len(members) <= MAX_GROUP_SIZE
            or len(msg.group) != GROUP_ID_BYTES
        ):
            raise InconsistentMessage("an invalid group list")
        if self._outcome is not None and not self._outcome.done():
            self._outcome.set_result(Group(msg.round, msg.group, members, sender))

    async def _on_cancelled(self, sender: PeerId, msg: GroupCancelled) -> None:
        if self._commit == (sender, msg.invite) and self._outcome and not self._outcome.done():
            self._outcome.set_result(None)

    # ------------------------------------------------------------------ forming

    async def form_group(self, round: int, *, timeout: float | None = None) -> Group:
        """Form (or join) a group for ``round`` by ``timeout`` seconds from now.

        Raises ``GroupFormationFailed`` if no group of at least ``min_size`` formed in time.
        An invitation accepted just before the deadline is waited for until it expires, so the
        call can overrun ``timeout`` by at most ``form_timeout_s + invite_timeout_s``.
        """
        if self._ready is not None:
            raise ConfigError("form_group is already running on this peer")
        deadline = self._net.time() + (self.config.round_timeout_s if timeout is None else timeout)
        self._ready = round
        try:
            while self._net.time() < deadline:
                group = await self._attempt(round, deadline)
                if group is not None:
                    self.formed += 1
                    return group
            self.failed += 1
            log.info("event=group_formation_failed round=%d", round)
            raise GroupFormationFailed(f"no group of {self.config.min_size}+ formed in time")
        finally:
            self._ready = None
            self._waiting = False
            self._commit = None
            self._outcome = None

    async def _attempt(self, round: int, deadline: float) -> Group | None:
        loop = asyncio.get_running_loop()
        self._commit, self._outcome = None, None
        self._wake = loop.create_future()
        self._waiting = True
        backoff = min(self._rng.uniform(0, self.config.backoff_s), deadline - self._net.time())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._wake), max(backoff, 0.0))
        self._waiting = False
        if self._accepted():  # an invitation arrived during the back-off
            return await self._await_verdict()
        if self._net.time() >= deadline:
            return None
        group = await self._invite(round, deadline)
        if group is None and self._accepted():  # we yielded to another inviter
            return await self._await_verdict()
        return group

    def _accepted(self) -> bool:
        return self._commit is not None

    async def _await_verdict(self) -> Group | None:
        assert self._outcome is not None
        remaining = self._commit_expiry - self._net.time()
        try:
            group = await asyncio.wait_for(asyncio.shield(self._outcome), max(remaining, 0.0))
        except TimeoutError:
            group = None
        if group is None:
            self.dissolved += 1
        self._commit, self._outcome = None, None
        return group

    async def _invite(self, round: int, deadline: float) -> Group | None:
        invite_id = self._new_id(16)
        self._inviting = invite_id
        self._yield = asyncio.get_running_loop().create_future()
        try:
            return await self._invite_from(round, deadline, invite_id, self._yield)
        finally:
            self._inviting, self._yield = None, None

    async def _invite_from(
        self, round: int, deadline: float, invite_id: bytes, yielded: asyncio.Future[None]
    ) -> Group | None:
        cfg = self.config
        close_at = min(self._net.time() + cfg.form_timeout_s, deadline)
        candidates = list(self._net.view())
        self._rng.shuffle(candidates)
        need = cfg.target_size - 1
        accepted: list[PeerId] = []
        asked: dict[asyncio.Task[str], PeerId] = {}
        msg = Invite(round, invite_id, close_at - self._net.time())

        async def ask(peer: PeerId) -> str:
            wait = min(cfg.invite_timeout_s, close_at - self._net.time())
            try:
                reply = await self._net.request(peer, msg, timeout=max(wait, 1e-6))
            except MurmurError:
                return "no"
            if not isinstance(reply, InviteReply) or reply.invite != invite_id:
                return "no"
            return "yes" if reply.accept else "busy" if reply.busy else "no"

        busy: list[PeerId] = []  # ready for this round, but inviting or committed elsewhere
        while len(accepted) < need and self._net.time() < close_at and not yielded.done():
            while candidates and len(asked) + len(accepted) < need:
                peer = candidates.pop()
                asked[asyncio.ensure_future(ask(peer))] = peer
            if not asked:
                if not busy:
                    break
                # a moment later, ask the busy ones again: their own attempt may have failed
                candidates, busy = busy, []
                with contextlib.suppress(TimeoutError):
                    pause = min(cfg.backoff_s, close_at - self._net.time())
                    await asyncio.wait_for(asyncio.shield(yielded), max(pause, 0.0))
                continue
            waiting: set[asyncio.Future[Any]] = {*asked, yielded}
            done, _ = await asyncio.wait(
                waiting, timeout=close_at - self._net.time(), return_when=asyncio.FIRST_COMPLETED
            )
            for task in [t for t in asked if t in done]:  # in asking order: deterministic
                peer = asked.pop(task)
                answer = task.result()
                if answer == "yes":
                    accepted.append(peer)
                elif answer == "busy":
                    busy.append(peer)
        self._inviting = None  # closing: no more yielding from here on
        for task, peer in asked.items():  # unanswered: they may have accepted; release them
            task.cancel()
            self._notify(peer, GroupCancelled(round, invite_id))
        if len(accepted) + 1 < cfg.min_size or yielded.done():
            for peer in accepted:
                self._notify(peer, GroupCancelled(round, invite_id))
            if accepted:
                self.dissolved += 1
            return None
        members = _sorted([*accepted, self._net.local_id])
        group = Group(round, self._new_id(GROUP_ID_BYTES), members, self._net.local_id)
        formed = GroupFormed(round, invite_id, group.id, members)
        await asyncio.gather(*(self._tell(p, formed) for p in accepted))
        log.debug("event=group_formed round=%d size=%d", round, group.size)
        return group

    async def _tell(self, peer: PeerId, msg: GroupFormed | GroupCancelled) -> None:
        with contextlib.suppress(MurmurError):
            await self._net.send(peer, msg, timeout=self.config.invite_timeout_s)

    def _notify(self, peer: PeerId, msg: GroupCancelled) -> None:
        task = asyncio.ensure_future(self._tell(peer, msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def hash_groups(
    round: int, peers: Sequence[PeerId], *, size: int, min_size: int = 3
) -> list[tuple[PeerId, ...]]:
    """Split ``peers`` into groups of about ``size`` from the round number and the ids alone.

    Peers are ordered by BLAKE2b(round, id), then dealt into ``max(1, n // size)`` groups of
    near-equal size (so every group has ``size`` to ``2 * size - 1`` members when ``n >= size``).
    Raises ``GroupFormationFailed`` if there are fewer than ``min_size`` peers.
    """
    if not 2 <= min_size <= size:
        raise ConfigError(f"need 2 <= min_size <= size, got {min_size}, {size}")
    unique = _sorted(peers)
    if len(unique) < min_size:
        raise GroupFormationFailed(f"{len(unique)} peers, fewer than the minimum {min_size}")
    salt = round.to_bytes(8, "big")
    order = sorted(
        unique,
        key=lambda p: hashlib.blake2b(b"murmur.gossip.hash-group" + salt + p.raw).digest(),
    )
    count = max(1, len(order) // size)
    return [_sorted(order[i::count]) for i in range(count)]


_HASH_GROUP_ROUNDS = 16
_HASH_GROUPS: dict[tuple[int, int, int, frozenset[bytes]], dict[bytes, Group]] = {}
"""(round, size, min_size, the ids seen) -> member id -> its group: the ``hash_groups`` of one
view computed once per process, not once per peer (the simulator runs every peer in one process
and all of them see the same membership). Bounded: the oldest views go first."""


def _hash_groups_by_member(
    round: int, peers: Sequence[PeerId], *, size: int, min_size: int
) -> dict[bytes, Group]:
    key = (round, size, min_size, frozenset([p.raw for p in peers]))
    found = _HASH_GROUPS.get(key)
    if found is not None:
        return found
    by_member: dict[bytes, Group] = {}
    for members in hash_groups(round, peers, size=size, min_size=min_size):
        gid = hashlib.blake2b(
            b"murmur.gossip.hash-group-id"
            + round.to_bytes(8, "big")
            + b"".join(p.raw for p in members),
            digest_size=GROUP_ID_BYTES,
        ).digest()
        group = Group(round, gid, members, None)
        for p in members:
            by_member[p.raw] = group
    if len(_HASH_GROUPS) >= _HASH_GROUP_ROUNDS:
        del _HASH_GROUPS[next(iter(_HASH_GROUPS))]
    _HASH_GROUPS[key] = by_member
    return by_member


class HashMatchmaker:
    """Deterministic grouping (``hash_groups``) of this peer and its view; no messages.

    Every peer must see the same view (a static list, or the simulator's full membership). The
    grouping of a view is computed once per process and round and shared by the peers that see
    the same view (the simulator's peers): O(n log n) per round instead of per peer.
    """

    def __init__(self, net: Network, *, size: int = 8, min_size: int = 3) -> None:
        if not 2 <= min_size <= size:
            raise ConfigError(f"need 2 <= min_size <= size, got {min_size}, {size}")
        self._net, self.size, self.min_size = net, size, min_size

    async def form_group(self, round: int, *, timeout: float | None = None) -> Group:
        """The hash group of this peer for ``round`` (``timeout`` is unused: no waiting)."""
        me = self._net.local_id
        by_member = _hash_groups_by_member(
            round, [me, *self._net.view()], size=self.size, min_size=self.min_size
        )
        group = by_member.get(me.raw)
        if group is None:  # pragma: no cover - hash_groups places every peer
            raise GroupFormationFailed("this peer is in no hash group")
        return group
