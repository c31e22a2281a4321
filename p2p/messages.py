"""Membership's wire messages, and the daemon's closed union of wire messages.

Each message is a frozen, slotted dataclass with a ``TYPE`` tag, encoded by ``floor.codec``.
Membership messages (signed peer records, join, peer exchange, ping) are defined here; the
daemon's union (:data:`MESSAGE_TYPES`) adds them to the floor's ``Refusal`` and to what a
training peer speaks (``gossip.messages.MESSAGE_TYPES``: matchmaking, group all-reduce, the
baselines and ``mpc``'s secure aggregation). p2p sits above gossip, so it closes the union;
nothing below imports this module.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import msgpack

from floor.errors import BadSignature
from floor.identity import Identity, PeerId, verify_signature
from floor.messages import Refusal, build_registry
from gossip.messages import MESSAGE_TYPES as GOSSIP_MESSAGE_TYPES
from p2p.transport.relay import RELAY_MESSAGES

__all__ = [
    "MEMBERSHIP_MESSAGES",
    "MESSAGE_TYPES",
    "Exchange",
    "ExchangeReply",
    "Join",
    "JoinReply",
    "PeerRecord",
    "Ping",
    "Pong",
    "Refusal",
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


MEMBERSHIP_MESSAGES: tuple[type, ...] = (
    PeerRecord,
    Join,
    JoinReply,
    Exchange,
    ExchangeReply,
    Ping,
    Pong,
)
"""Membership's message classes."""

MESSAGE_TYPES: Mapping[str, type] = build_registry(
    [*GOSSIP_MESSAGE_TYPES.values(), *MEMBERSHIP_MESSAGES, *RELAY_MESSAGES]
)
"""Type tag -> message class for everything a daemon may receive (the daemon's world: with
the relay and reachability messages of ``p2p.transport.relay``)."""
