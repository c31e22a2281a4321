"""Transports: the small interface (``base``) and its in-memory implementation.

The aiohttp implementation is ``p2p.transport.http.HttpTransport``; it is not imported here so
that code above the transport (gossip) never pulls in aiohttp.
"""

from p2p.transport.base import ContactListener, Handler, PostFailure, Transport, reply_auth
from p2p.transport.memory import MemoryNetwork, MemoryTransport

__all__ = [
    "ContactListener",
    "Handler",
    "MemoryNetwork",
    "MemoryTransport",
    "PostFailure",
    "Transport",
    "reply_auth",
]
