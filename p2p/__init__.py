"""The real network: identity, wire format, aiohttp transport, membership, the daemon.

The public names below are exported lazily (PEP 562), so ``import p2p`` stays cheap and
``import p2p.messages`` never pulls in aiohttp or the daemon. The transports live in
``p2p.transport`` (interface and in-memory) and ``p2p.transport.http`` (aiohttp).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from murmur._lazy import lazy_exports as _lazy_exports

if TYPE_CHECKING:
    from p2p.config import (
        DaemonConfig,
        HttpTransportConfig,
        MembershipConfig,
        format_address,
        load_config,
        parse_address,
    )
    from p2p.daemon import Daemon, load_network_key
    from p2p.envelope import Auth, EnvelopeCodec, Received
    from p2p.identity import Identity, PeerId, verify_signature
    from p2p.membership import Membership, PeerEntry, PeerView
    from p2p.messages import MESSAGE_TYPES, PeerRecord, Refusal

_EXPORTS: dict[str, str] = {
    "Identity": "p2p.identity",
    "PeerId": "p2p.identity",
    "verify_signature": "p2p.identity",
    "Auth": "p2p.envelope",
    "EnvelopeCodec": "p2p.envelope",
    "Received": "p2p.envelope",
    "MESSAGE_TYPES": "p2p.messages",
    "PeerRecord": "p2p.messages",
    "Refusal": "p2p.messages",
    "Membership": "p2p.membership",
    "PeerEntry": "p2p.membership",
    "PeerView": "p2p.membership",
    "DaemonConfig": "p2p.config",
    "HttpTransportConfig": "p2p.config",
    "MembershipConfig": "p2p.config",
    "format_address": "p2p.config",
    "load_config": "p2p.config",
    "parse_address": "p2p.config",
    "Daemon": "p2p.daemon",
    "load_network_key": "p2p.daemon",
}

__all__ = [
    "MESSAGE_TYPES",
    "Auth",
    "Daemon",
    "DaemonConfig",
    "EnvelopeCodec",
    "HttpTransportConfig",
    "Identity",
    "Membership",
    "MembershipConfig",
    "PeerEntry",
    "PeerId",
    "PeerRecord",
    "PeerView",
    "Received",
    "Refusal",
    "format_address",
    "load_config",
    "load_network_key",
    "parse_address",
    "verify_signature",
]


__getattr__, __dir__ = _lazy_exports("p2p", _EXPORTS, globals())
