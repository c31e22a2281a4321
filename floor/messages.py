"""The floor's own wire message (``Refusal``) and how a world closes its message union.

Every wire message is a frozen, slotted dataclass with a ``TYPE`` tag, encoded by
``floor.codec``. Each world (the daemon in ``p2p``, a training peer in ``gossip``, the simulator)
lists the message classes it speaks and builds its registry with :func:`build_registry`; an
``floor.envelope.EnvelopeCodec`` decodes only the tags of the registry it was given. Nothing here
knows the messages of the layers above.
"""

from __future__ import annotations

import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar, Protocol

from floor.codec import schema_check

__all__ = ["FLOOR_MESSAGES", "Message", "Probe", "ProbeReply", "Refusal", "build_registry"]


class Message(Protocol):
    """What every wire message has: a class-level ``TYPE`` tag (``"membership.ping"``...)."""

    TYPE: ClassVar[str]


@dataclass(frozen=True, slots=True)
class Refusal:
    """A refusal sent back to a peer: a ``floor.errors.RefusalCode`` number and a reason."""

    TYPE: ClassVar[str] = "refusal"
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class Probe:
    """The first envelope sent to an address learnt from someone else (SIGNED, by POST).

    The transport itself answers with a SIGNED ``ProbeReply`` echoing ``nonce``: a reply
    signed by the peer the address was claimed for proves the address is that peer's, and
    only then does anything else go there.
    """

    TYPE: ClassVar[str] = "probe"
    nonce: bytes


@dataclass(frozen=True, slots=True)
class ProbeReply:
    """The answer to ``Probe``: the same nonce, signed by the peer that was probed."""

    TYPE: ClassVar[str] = "probe_reply"
    nonce: bytes


FLOOR_MESSAGES: tuple[type, ...] = (Refusal, Probe, ProbeReply)
"""The message classes every world's union includes (the transports answer ``Probe`` and
refuse with ``Refusal`` themselves)."""


def build_registry(classes: Iterable[type]) -> Mapping[str, type]:
    """Tag -> class for ``classes``, each checked by the codec; ``TypeError`` on a duplicate tag."""
    registry: dict[str, type] = {}
    for cls in classes:
        tag: str = cls.TYPE  # type: ignore[attr-defined]
        schema_check(cls)
        if tag in registry:
            raise TypeError(f"duplicate message type tag {tag!r}")
        registry[tag] = cls
    return types.MappingProxyType(registry)
