"""Matchmaking without a server, sans-IO: ready peers form groups of a target size by invitation.

``Invitations`` (DESIGN.md, round step 2) is one peer's matchmaker. ``start(now, round, view,
deadline)`` makes the peer ready: it waits a random back-off; an invitation for the same round
that arrives meanwhile is accepted (the peer commits to it and waits for the inviter's verdict);
otherwise it becomes an inviter: it invites ready peers sampled from its view (more as invitees
decline), and closes the group when full or at its deadline. A closed group gets a fresh random
id and its sorted member list, sent sealed to each member; an attempt below the minimum size is
cancelled and everyone in it tries again until the deadline, then the round fails
(``GroupFormationFailed``: skip the round, keep the model). A peer accepts an invitation only
while it is ready for that round, in back-off or yielding, and committed nowhere else, so it is
in at most one group at a time. Concurrent inviters resolve by invitation id: an inviter that has
not closed its group yields to an invitation with a smaller id (of concurrent inviters the
smallest never yields). Invitations and their answers are one-way messages; an unanswered
invitation counts as declined at its deadline (``invite_timeout_s``).

``HashGrouping`` is the deterministic option (:func:`hash_groups`): the groups follow from the
round number and the view alone, with no messages; all peers must share one view.

Both are used by ``gossip.allreduce.GroupAveraging`` and read time only from its arguments.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from floor.errors import ConfigError, GroupFormationFailed, InconsistentMessage, MalformedMessage
from floor.identity import PeerId
from gossip.machine import Out
from gossip.messages import GroupCancelled, GroupFormed, Invite, InviteReply
from gossip.spec import MAX_GROUP_SIZE

MAX_STAGES = 8
"""The most stage timeouts a ``gossip.group_formed`` may carry."""

__all__ = [
    "GROUP_ID_BYTES",
    "Group",
    "GroupFormer",
    "HashGrouping",
    "Invitations",
    "MatchConfig",
    "group_id_of",
    "hash_groups",
]

log = logging.getLogger("murmur.gossip.matchmaking")

GROUP_ID_BYTES = 16


@dataclass(frozen=True)
class Group:
    """A formed group: round, fresh group id, sorted member ids (raw), and who invited."""

    round: int
    id: bytes
    members: tuple[bytes, ...]
    leader: bytes | None = None
    deadlines: tuple[float, ...] = ()
    """The stage timeouts the group runs on (its inviter's, ``gossip.deadlines``); empty:
    each member's own."""

    @property
    def size(self) -> int:
        """Number of members."""
        return len(self.members)


@dataclass(frozen=True)
class MatchConfig:
    """Matchmaking parameters (seconds on the driver's clock)."""

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
    """How long a peer tries to form a group for one round (all attempts included)."""

    def __post_init__(self) -> None:
        if not 3 <= self.min_size <= self.target_size <= MAX_GROUP_SIZE:
            raise ConfigError(
                f"group sizes: need 3 <= min_group_size <= group_size <= {MAX_GROUP_SIZE} "
                f"(in a group of two the sum reveals the other member's update); got "
                f"min_group_size={self.min_size}, group_size={self.target_size}"
            )
        for name in ("backoff_s", "invite_timeout_s", "form_timeout_s", "round_timeout_s"):
            value = getattr(self, name)
            if not value > 0:
                raise ConfigError(f"{name} must be > 0, got {value!r}")


class GroupFormer(Protocol):
    """Sans-IO group formation for one peer: ``Invitations`` or ``HashGrouping``.

    ``start`` begins forming for a round; ``formed`` (a ``Group``) or ``failure`` (a reason)
    is set once it ended; ``stop`` abandons it.
    """

    message_types: tuple[type, ...]
    formed: Group | None
    failure: str | None
    proposed: tuple[float, ...]
    """The stage timeouts this peer proposes to the groups it forms (set before ``start``)."""

    @property
    def wake_at(self) -> float | None:
        """When ``wake`` is due."""
        ...

    def start(self, now: float, round: int, view: Sequence[bytes]) -> Out:
        """Begin forming this peer's group for ``round`` from ``view``."""
        ...

    def receive(self, now: float, sender: bytes, message: Any) -> Out:
        """A matchmaking message."""
        ...

    def wake(self, now: float) -> Out:
        """The deadline passed."""
        ...

    def stop(self) -> Out:
        """Abandon forming (the round was cancelled)."""
        ...


def _sorted(peers: Sequence[bytes]) -> tuple[bytes, ...]:
    return tuple(sorted(set(peers)))


# ---------------------------------------------------------------------- deterministic groups


def hash_groups(
    round: int, peers: Sequence[bytes], *, size: int, min_size: int = 3
) -> list[tuple[bytes, ...]]:
    """Split ``peers`` (raw ids) into groups of about ``size`` from the round and ids alone.

    Peers are ordered by BLAKE2b(round, id), then dealt into ``max(1, n // size)`` groups of
    near-equal size (so every group has ``size`` to ``2 * size - 1`` members when ``n >= size``).
    Raises ``GroupFormationFailed`` if there are fewer than ``min_size`` peers.
    """
    if not 2 <= min_size <= size:
        raise ConfigError(f"need 2 <= min_size <= size, got {min_size}, {size}")
    unique = _sorted(peers)
    if len(unique) < min_size:
        raise GroupFormationFailed(f"{len(unique)} peers, fewer than the minimum {min_size}")
    salt = b"murmur.gossip.hash-group" + round.to_bytes(8, "big")
    order = sorted(unique, key=lambda p: hashlib.blake2b(salt + p, digest_size=16).digest())
    count = max(1, len(order) // size)
    return [_sorted(order[i::count]) for i in range(count)]


def group_id_of(round: int, members: Sequence[bytes]) -> bytes:
    """The id of a hash group: BLAKE2b-128 of the round and its sorted members."""
    h = hashlib.blake2b(b"murmur.gossip.hash-group-id", digest_size=GROUP_ID_BYTES)
    h.update(round.to_bytes(8, "big"))
    for m in sorted(members):
        h.update(m)
    return h.digest()


_CACHE_ROUNDS = 8
_CACHE: list[tuple[int, int, int, Sequence[bytes], dict[bytes, Group]]] = []
"""The groups of the last views seen, by view identity: a simulator hands every peer the same
view object, so the groups are computed once per process and round, not once per peer (and
without hashing the whole view for every peer)."""


def _groups_by_member(
    round: int, view: Sequence[bytes], me: bytes, size: int, min_size: int
) -> dict[bytes, Group]:
    for r, s, ms, v, found in _CACHE:
        if (
            v is view
            and r == round
            and s == size
            and ms == min_size
            and (me in found or me in view)
        ):
            return found
    by_member: dict[bytes, Group] = {}
    peers = view if me in view else [me, *view]
    for members in hash_groups(round, peers, size=size, min_size=min_size):
        group = Group(round, group_id_of(round, members), members, None)
        for p in members:
            by_member[p] = group
    if me in view:  # a shared snapshot (every peer included): worth keeping for the others
        if len(_CACHE) >= _CACHE_ROUNDS:
            del _CACHE[0]
        _CACHE.append((round, size, min_size, view, by_member))
    return by_member


class HashGrouping:
    """Deterministic grouping (:func:`hash_groups`) of this peer and its view; no messages.

    Every peer must see the same view (a static list, or the simulator's round snapshot).
    """

    message_types: tuple[type, ...] = ()

    def __init__(self, me: bytes, *, size: int = 8, min_size: int = 3) -> None:
        if not 2 <= min_size <= size:
            raise ConfigError(f"need 2 <= min_size <= size, got {min_size}, {size}")
        self.me, self.size, self.min_size = me, size, min_size
        self.formed: Group | None = None
        self.failure: str | None = None
        self.proposed: tuple[float, ...] = ()  # unused: no formation message to carry it

    @property
    def wake_at(self) -> float | None:
        """Never: grouping is immediate."""
        return None

    def start(self, now: float, round: int, view: Sequence[bytes]) -> Out:
        """Find this peer's hash group at once (or fail: too few peers)."""
        self.formed, self.failure = None, None
        try:
            by_member = _groups_by_member(round, view, self.me, self.size, self.min_size)
        except GroupFormationFailed as exc:
            self.failure = str(exc)
            return []
        self.formed = by_member.get(self.me)
        if self.formed is None:  # pragma: no cover - hash_groups places every peer
            self.failure = "this peer is in no hash group"
        return []

    def receive(self, now: float, sender: bytes, message: Any) -> Out:
        """No messages."""
        raise InconsistentMessage("hash grouping exchanges no messages")

    def wake(self, now: float) -> Out:
        """Nothing to do."""
        return []

    def stop(self) -> Out:
        """Nothing to abandon."""
        return []


# ---------------------------------------------------------------------- invitations


class _State(enum.Enum):
    IDLE = 0
    BACKOFF = 1
    COMMITTED = 2
    INVITING = 3
    PAUSED = 4  # inviting, between two passes over the busy ones


class Invitations:
    """One peer's matchmaker by invitation (see the module docstring). Sans-IO.

    ``rng`` drives back-offs, sampling and, when given, the invitation and group ids (so a
    seeded simulation repeats exactly); without it, ids come from the OS CSPRNG.
    """

    message_types: tuple[type, ...] = (Invite, InviteReply, GroupFormed, GroupCancelled)

    def __init__(
        self, me: bytes, config: MatchConfig | None = None, *, rng: random.Random | None = None
    ) -> None:
        self.me = me
        self.config = config or MatchConfig()
        self._rng = rng or random.Random(os.urandom(16))
        self._new_id: Callable[[int], bytes] = os.urandom if rng is None else rng.randbytes
        self._state = _State.IDLE
        self._round: int | None = None
        self._view: Sequence[bytes] = ()
        self._deadline = 0.0
        self._due = 0.0  # the current state's own deadline
        self._commit: tuple[bytes, bytes] | None = None  # (inviter, invite id) accepted
        self._invite: bytes | None = None  # our invitation id while inviting
        self._close_at = 0.0
        self._candidates: list[bytes] = []
        self._asked: dict[bytes, float] = {}  # invitee -> when its answer is late
        self._accepted: list[bytes] = []
        self._busy: list[bytes] = []
        self.formed: Group | None = None
        self.failure: str | None = None
        self.proposed: tuple[float, ...] = ()
        self.defer = False
        """This peer cannot be dialled (it is reached through relays): its back-off before
        inviting is drawn from ``[backoff_s, 3 backoff_s]`` instead of ``[0, backoff_s]``, so
        reachable peers invite first and it is mostly an invitee. It still invites when
        nobody invites it."""
        self.groups_formed = 0
        """Groups this peer ended up in."""
        self.dissolved = 0
        """Attempts (ours or accepted) that were cancelled or expired."""
        self.failed = 0
        """Rounds for which no group formed by the deadline."""

    # ------------------------------------------------------------------ driving

    @property
    def wake_at(self) -> float | None:
        """The current state's deadline (None when idle)."""
        if self._state is _State.IDLE:
            return None
        if self._state is _State.INVITING and self._asked:
            return min(self._due, min(self._asked.values()))
        return self._due

    def start(self, now: float, round: int, view: Sequence[bytes]) -> Out:
        """Become ready for ``round`` and try to form a group until ``round_timeout_s``."""
        if self._state is not _State.IDLE:
            raise ConfigError("this peer is already forming a group")
        self.formed, self.failure = None, None
        self._round = round
        self._view = [p for p in view if p != self.me]
        self._deadline = now + self.config.round_timeout_s
        return self._next_attempt(now)

    def stop(self) -> Out:
        """Abandon forming: an inviter releases whoever it gathered."""
        out = self._release_all() if self._state in (_State.INVITING, _State.PAUSED) else []
        self._reset()
        return out

    def wake(self, now: float) -> Out:
        """A deadline passed: back-off over, a verdict or an answer late, the attempt closes."""
        state = self._state
        if state is _State.BACKOFF and now >= self._due:
            return self._end_backoff(now)
        if state is _State.COMMITTED and now >= self._due:
            self.dissolved += 1
            self._commit = None
            return self._next_attempt(now)
        if state is _State.PAUSED and now >= self._due:
            self._state = _State.INVITING
            self._due = self._close_at  # the pause's own deadline is spent
            self._candidates, self._busy = self._busy, []
            return self._invite_more(now)
        if state is _State.INVITING:
            for peer, late in list(self._asked.items()):
                if now >= late:
                    del self._asked[peer]  # no answer in time: as declined
            return self._invite_more(now)
        return []

    def receive(self, now: float, sender: bytes, message: Any) -> Out:
        """An invitation, an answer to ours, or a verdict on the invitation we accepted."""
        cls = type(message)
        if cls is Invite:
            return self._on_invite(now, sender, message)
        if cls is InviteReply:
            return self._on_reply(now, sender, message)
        if cls is GroupFormed:
            return self._on_formed(now, sender, message)
        if cls is GroupCancelled:
            if self._state is _State.COMMITTED and self._commit == (sender, message.invite):
                self.dissolved += 1
                self._commit = None
                return self._next_attempt(now)
            return []
        raise MalformedMessage(f"not a matchmaking message: {cls.__name__}")

    # ------------------------------------------------------------------ handlers

    def _on_invite(self, now: float, sender: bytes, msg: Invite) -> Out:
        cfg = self.config
        state = self._state
        yielding = (
            state in (_State.INVITING, _State.PAUSED)
            and self._invite is not None
            and msg.invite < self._invite
        )
        ok = (
            self._round == msg.round
            and (state is _State.BACKOFF or yielding)
            and self._commit is None
            and isinstance(msg.expires_in, float)
            and 0 < msg.expires_in <= cfg.form_timeout_s + cfg.invite_timeout_s
        )
        reply = InviteReply(msg.invite, ok, busy=not ok and self._round == msg.round)
        if not ok:
            return [(sender, reply)]
        out = self._release_all() if yielding else []
        self._commit = (sender, msg.invite)
        self._state = _State.COMMITTED
        self._due = now + msg.expires_in + cfg.invite_timeout_s
        self._invite = None
        return [*out, (sender, reply)]

    def _on_reply(self, now: float, sender: bytes, msg: InviteReply) -> Out:
        asking = self._state in (_State.INVITING, _State.PAUSED) and msg.invite == self._invite
        if not asking or sender not in self._asked:
            if msg.accept:  # it committed to an attempt we no longer run: release it
                return [(sender, GroupCancelled(self._round or 0, msg.invite))]
            return []
        del self._asked[sender]
        if msg.accept:
            self._accepted.append(sender)
        elif msg.busy:
            self._busy.append(sender)
        if self._state is _State.PAUSED:
            return []
        return self._invite_more(now)

    def _on_formed(self, now: float, sender: bytes, msg: GroupFormed) -> Out:
        if self._state is not _State.COMMITTED or self._commit != (sender, msg.invite):
            raise InconsistentMessage("a group list for an invitation this peer did not accept")
        if self._round != msg.round:
            raise InconsistentMessage("a group list for another round")
        raw = [m.raw if isinstance(m, PeerId) else None for m in msg.members]
        if any(r is None for r in raw):
            raise MalformedMessage("group members must be peer ids")
        members = _sorted([r for r in raw if r is not None])
        if (
            len(members) != len(msg.members)
            or self.me not in members
            or sender not in members
            or not self.config.min_size <= len(members) <= MAX_GROUP_SIZE
            or len(msg.group) != GROUP_ID_BYTES
            or len(msg.deadlines_ms) > MAX_STAGES
        ):
            raise InconsistentMessage("an invalid group list")
        # the receiving all-reduce clamps the inviter's timeouts to its own bounds
        deadlines = tuple(ms / 1000 for ms in msg.deadlines_ms)
        self._done(Group(msg.round, msg.group, members, sender, deadlines))
        return []

    # ------------------------------------------------------------------ transitions

    def _next_attempt(self, now: float) -> Out:
        if now >= self._deadline:
            self.failed += 1
            log.info("event=group_formation_failed round=%s", self._round)
            self._fail(f"no group of {self.config.min_size}+ formed in time")
            return []
        self._state = _State.BACKOFF
        backoff = self.config.backoff_s
        wait = (
            self._rng.uniform(backoff, 3 * backoff) if self.defer else self._rng.uniform(0, backoff)
        )
        self._due = now + min(wait, self._deadline - now)
        return []

    def _end_backoff(self, now: float) -> Out:
        if now >= self._deadline:
            return self._next_attempt(now)
        cfg = self.config
        self._state = _State.INVITING
        self._invite = self._new_id(16)
        self._close_at = min(now + cfg.form_timeout_s, self._deadline)
        self._due = self._close_at
        self._candidates = list(self._view)
        self._rng.shuffle(self._candidates)
        self._asked, self._accepted, self._busy = {}, [], []
        return self._invite_more(now)

    def _invite_more(self, now: float) -> Out:
        cfg = self.config
        need = cfg.target_size - 1
        out: Out = []
        if len(self._accepted) < need and now < self._close_at:
            assert self._invite is not None and self._round is not None
            msg = Invite(self._round, self._invite, self._close_at - now)
            wait = min(cfg.invite_timeout_s, self._close_at - now)
            while self._candidates and len(self._asked) + len(self._accepted) < need:
                peer = self._candidates.pop()
                self._asked[peer] = now + wait
                out.append((peer, msg))
            if self._asked:
                return out
            if self._busy:
                # a moment later, ask the busy ones again: their own attempt may have failed
                self._state = _State.PAUSED
                self._due = min(now + cfg.backoff_s, self._close_at)
                return out
        return out + self._close(now)

    def _close(self, now: float) -> Out:
        cfg = self.config
        assert self._invite is not None and self._round is not None
        invite, rnd = self._invite, self._round
        out: Out = [(p, GroupCancelled(rnd, invite)) for p in self._asked]
        accepted = self._accepted
        if len(accepted) + 1 < cfg.min_size:
            out += [(p, GroupCancelled(rnd, invite)) for p in accepted]
            if accepted:
                self.dissolved += 1
            self._invite = None
            self._asked, self._accepted, self._busy = {}, [], []
            return out + self._next_attempt(now)
        members = _sorted([*accepted, self.me])
        proposed = tuple(max(1, math.ceil(s * 1000)) for s in self.proposed)
        group = Group(
            rnd, self._new_id(GROUP_ID_BYTES), members, self.me, tuple(ms / 1000 for ms in proposed)
        )
        formed = GroupFormed(rnd, invite, group.id, tuple(PeerId(m) for m in members), proposed)
        out += [(p, formed) for p in accepted]
        log.debug("event=group_formed round=%d size=%d", rnd, group.size)
        self._done(group)
        return out

    def _release_all(self) -> Out:
        invite, rnd = self._invite, self._round
        if invite is None or rnd is None:
            return []
        cancel = GroupCancelled(rnd, invite)
        out: Out = [(p, cancel) for p in [*self._asked, *self._accepted]]
        if self._accepted:
            self.dissolved += 1
        self._asked, self._accepted, self._busy, self._candidates = {}, [], [], []
        self._invite = None
        return out

    def _done(self, group: Group) -> None:
        self.groups_formed += 1
        self._reset()
        self.formed = group

    def _fail(self, reason: str) -> None:
        self._reset()
        self.failure = reason

    def _reset(self) -> None:
        self._state = _State.IDLE
        self._round = None
        self._commit = None
        self._invite = None
        self._asked, self._accepted, self._busy, self._candidates = {}, [], [], []
