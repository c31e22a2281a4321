"""gossip's own wire messages: matchmaking, plaintext group all-reduce and the baselines.

Each is a frozen, slotted dataclass with a ``TYPE`` tag ``"gossip.*"`` and only the field types
``floor.codec`` carries (int, float, bool, bytes, Tensor, PeerId, tuples of those). ``SECRET``
tells the network adapter how to authenticate a message (as in ``mpc.messages``):
``True`` -> sealed (encrypted and authenticated to its recipient), ``False`` -> MAC (integrity
only, cheap for large tensors). The secure all-reduce itself uses ``mpc.messages``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from floor.identity import PeerId
from floor.messages import FLOOR_MESSAGES, build_registry
from mpc.messages import MESSAGE_TYPES as MPC_MESSAGE_TYPES

__all__ = [
    "MESSAGE_CLASSES",
    "MESSAGE_TYPES",
    "DpsgdParams",
    "GroupCancelled",
    "GroupFormed",
    "Invite",
    "InviteReply",
    "PairwiseOffer",
    "PairwiseReply",
    "PlainChunk",
    "PlainChunkSum",
    "PushSumShare",
]


@dataclass(frozen=True, slots=True)
class Invite:
    """Matchmaking request: join my group for ``round``; answered by an ``InviteReply`` message.

    ``invite`` is the inviter's random id for this attempt; ``expires_in`` the seconds (from
    sending) after which the inviter will have closed or dissolved the group.
    """

    TYPE: ClassVar[str] = "gossip.invite"
    SECRET: ClassVar[bool] = False

    round: int
    invite: bytes
    expires_in: float


@dataclass(frozen=True, slots=True)
class InviteReply:
    """The invitee's answer: ``accept`` commits it to this invitation until formed or cancelled.

    ``busy`` (when not accepting): ready for this round but inviting or committed elsewhere, so
    worth asking again before the inviter's deadline.
    """

    TYPE: ClassVar[str] = "gossip.invite_reply"
    SECRET: ClassVar[bool] = False

    invite: bytes
    accept: bool
    busy: bool = False


@dataclass(frozen=True, slots=True)
class GroupFormed:
    """The inviter closed the group: the full member list (sorted) and a fresh group id.

    Sent sealed to each member, so it is authenticated as coming from the inviter.
    """

    TYPE: ClassVar[str] = "gossip.group_formed"
    SECRET: ClassVar[bool] = True

    round: int
    invite: bytes
    group: bytes
    members: tuple[PeerId, ...]
    deadlines_ms: tuple[int, ...] = ()
    """The stage timeouts the group runs on, milliseconds (``gossip.deadlines``; empty: each
    member's own)."""


@dataclass(frozen=True, slots=True)
class GroupCancelled:
    """The inviter dissolved the attempt (too few accepted by the deadline): retry or skip."""

    TYPE: ClassVar[str] = "gossip.group_cancelled"
    SECRET: ClassVar[bool] = False

    round: int
    invite: bytes


@dataclass(frozen=True, slots=True)
class PlainChunk:
    """Plaintext all-reduce, reduce-scatter: chunk ``chunk`` of the sender's encoded input."""

    TYPE: ClassVar[str] = "gossip.plain_chunk"
    SECRET: ClassVar[bool] = False

    group: bytes
    round: int
    chunk: int
    data: Tensor
    deadlines_ms: tuple[int, ...] = ()
    """The sender's proposed stage timeouts, milliseconds (``gossip.deadlines``; empty: none)."""


@dataclass(frozen=True, slots=True)
class PlainChunkSum:
    """Plaintext all-reduce, all-gather: the ring sum of one chunk over ``contributors``."""

    TYPE: ClassVar[str] = "gossip.plain_chunk_sum"
    SECRET: ClassVar[bool] = False

    group: bytes
    round: int
    chunk: int
    data: Tensor
    contributors: tuple[PeerId, ...]


@dataclass(frozen=True, slots=True)
class PairwiseOffer:
    """Randomized pairwise gossip: my state; answered by a ``PairwiseReply`` message."""

    TYPE: ClassVar[str] = "gossip.pairwise_offer"
    SECRET: ClassVar[bool] = False

    round: int
    vector: Tensor
    weight: float


@dataclass(frozen=True, slots=True)
class PairwiseReply:
    """The answer to ``PairwiseOffer``: the partner's state before averaging, or a refusal."""

    TYPE: ClassVar[str] = "gossip.pairwise_reply"
    SECRET: ClassVar[bool] = False

    accept: bool
    vector: Tensor
    weight: float
    round: int


@dataclass(frozen=True, slots=True)
class PushSumShare:
    """Push-sum: a share of the sender's mass, ``(s, w)``, on a directed link (no reply)."""

    TYPE: ClassVar[str] = "gossip.push_sum"
    SECRET: ClassVar[bool] = False

    round: int
    s: Tensor
    w: float


@dataclass(frozen=True, slots=True)
class DpsgdParams:
    """D-PSGD: the sender's parameters for ``round``, to each neighbour of a fixed topology."""

    TYPE: ClassVar[str] = "gossip.dpsgd"
    SECRET: ClassVar[bool] = False

    round: int
    vector: Tensor


MESSAGE_CLASSES: tuple[type, ...] = (
    Invite,
    InviteReply,
    GroupFormed,
    GroupCancelled,
    PlainChunk,
    PlainChunkSum,
    PairwiseOffer,
    PairwiseReply,
    PushSumShare,
    DpsgdParams,
)
"""Every gossip message class (in the union below)."""

MESSAGE_TYPES: Mapping[str, type] = build_registry(
    [*FLOOR_MESSAGES, *MPC_MESSAGE_TYPES.values(), *MESSAGE_CLASSES]
)
"""The training world's union: what a peer's averaging exchanges (the floor's ``Refusal``,
``mpc``'s secure aggregation and the classes above). The daemon adds membership to it."""
