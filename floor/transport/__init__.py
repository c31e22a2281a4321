"""Transports: the small interface (``base``) and its in-memory implementation (``memory``).

The aiohttp implementation is ``p2p.transport.http.HttpTransport`` (a layer above): nothing
here imports aiohttp, so code above the floor (gossip) can use transports without it.
"""

from floor.transport.base import ContactListener, Handler, PostFailure, Transport, reply_auth
from floor.transport.memory import MemoryNetwork, MemoryTransport

__all__ = [
    "ContactListener",
    "Handler",
    "MemoryNetwork",
    "MemoryTransport",
    "PostFailure",
    "Transport",
    "reply_auth",
]
