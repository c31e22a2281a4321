"""The closed union of wire messages: every message type any peer may send, by its type tag.

Each message is a frozen, slotted dataclass with a ``TYPE`` tag, encoded by ``p2p.codec``.
Membership messages are defined here; mpc/ and gossip/ message classes are added to the union
below (this module may import their message modules; never the other way round).
"""

from __future__ import annotations

import math
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar, Union

import msgpack

from gossip.messages import (
    DpsgdParams,
    GroupCancelled,
    GroupFormed,
    Invite,
    InviteReply,
    PairwiseOffer,
    PairwiseReply,
    PlainChunk,
    PlainChunkSum,
    PushSumShare,
)
from mpc.messages import (
    Backup,
    ChunkSum,
    Input,
    ReassignedChunk,
    Receipt,
    Reveal,
    View,
)
from p2p.codec import schema_check
from p2p.identity import Identity, PeerId, verify_signature

__all__ = [
    "MESSAGE_TYPES",
    "Exchange",
    "ExchangeReply",
    "Join",
    "JoinReply",
    "Message",
    "PeerRecord",
    "Ping",
    "Pong",
    "Refusal",
    "build_registry",
]

_RECORD_DOMAIN = "murmur-peer-record-v1"


@dataclass(frozen=True, slots=True)
class PeerRecord:
    """A peer's signed claim of its listening addresses at a time (wall-clock seconds)."""

    TYPE: ClassVar[str] = "peer_record"
    peer_id: PeerId
    addresses: tuple[str, ...]
    timestamp: float
    signature: bytes

    @staticmethod
    def signed_bytes(peer_id: PeerId, addresses: tuple[str, ...], timestamp: float) -> bytes:
        """The canonical bytes a record's signature covers."""
        payload = [_RECORD_DOMAIN, peer_id.raw, list(addresses), float(timestamp)]
        result: bytes = msgpack.packb(payload, use_bin_type=True)
        return result

    @classmethod
    def create(cls, identity: Identity, addresses: tuple[str, ...], timestamp: float) -> PeerRecord:
        """A record for ``identity``, signed by it."""
        addresses = tuple(addresses)
        data = cls.signed_bytes(identity.peer_id, addresses, timestamp)
        return cls(identity.peer_id, addresses, float(timestamp), identity.sign(data))

    def verify(self) -> None:
        """Check the signature by ``peer_id``; raises ``BadSignature``."""
        if not math.isfinite(self.timestamp):
            from murmur.errors import BadSignature

            raise BadSignature("peer record timestamp is not finite")
        data = self.signed_bytes(self.peer_id, self.addresses, self.timestamp)
        verify_signature(self.peer_id, data, self.signature)


@dataclass(frozen=True, slots=True)
class Join:
    """A newcomer's request to a bootstrap peer, carrying its own signed record."""

    TYPE: ClassVar[str] = "join"
    record: PeerRecord


@dataclass(frozen=True, slots=True)
class JoinReply:
    """The bootstrap peer's answer to ``Join``: records of peers it knows."""

    TYPE: ClassVar[str] = "join_reply"
    records: tuple[PeerRecord, ...]


@dataclass(frozen=True, slots=True)
class Exchange:
    """A periodic peer-exchange (shuffle) offer of records."""

    TYPE: ClassVar[str] = "exchange"
    records: tuple[PeerRecord, ...]


@dataclass(frozen=True, slots=True)
class ExchangeReply:
    """The answer to ``Exchange``: records in return."""

    TYPE: ClassVar[str] = "exchange_reply"
    records: tuple[PeerRecord, ...]


@dataclass(frozen=True, slots=True)
class Ping:
    """A liveness probe."""

    TYPE: ClassVar[str] = "ping"
    seq: int


@dataclass(frozen=True, slots=True)
class Pong:
    """The answer to ``Ping`` with the same ``seq``."""

    TYPE: ClassVar[str] = "pong"
    seq: int


@dataclass(frozen=True, slots=True)
class Refusal:
    """A refusal sent back to a peer: a ``murmur.errors.RefusalCode`` number and a reason."""

    TYPE: ClassVar[str] = "refusal"
    code: int
    reason: str


Message = Union[  # noqa: UP007 - a named alias that other packages extend
    PeerRecord,
    Join,
    JoinReply,
    Exchange,
    ExchangeReply,
    Ping,
    Pong,
    Refusal,
    # secure aggregation (mpc.messages)
    Input,
    Backup,
    Receipt,
    View,
    Reveal,
    ReassignedChunk,
    ChunkSum,
    # matchmaking, plaintext all-reduce and baselines (gossip.messages)
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
]


def build_registry(classes: Iterable[type]) -> Mapping[str, type]:
    """Tag -> class for ``classes``, each checked by the codec; TypeError on a duplicate tag."""
    registry: dict[str, type] = {}
    for cls in classes:
        schema_check(cls)
        tag: str = cls.TYPE  # type: ignore[attr-defined]
        if tag in registry:
            raise TypeError(f"duplicate message type tag {tag!r}")
        registry[tag] = cls
    return types.MappingProxyType(registry)


#: Type tag -> message class, for every member of ``Message``.
MESSAGE_TYPES: Mapping[str, type] = build_registry(Message.__args__)  # type: ignore[attr-defined]
