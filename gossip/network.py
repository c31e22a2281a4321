"""The network interface gossip needs, and its adapter over p2p's ``Transport``.

gossip's drivers talk to a ``Network``: the local peer id, ``send`` (one-way, returns once
the peer's handler accepted the message) and ``request`` (returns the reply) to a peer id, one
handler per message type, the current membership view, and the event loop's clock; optionally
``post`` (one-way without waiting, ``Poster``) and ``call_at`` (timers on the network's own
schedule, which the simulator orders with its deliveries). The daemon
uses ``TransportNetwork`` over its aiohttp transport and membership; tests use it over p2p's
in-memory transport; the simulator provides its own implementation. Time is always the running
loop's (``loop.time()``, ``asyncio.sleep``, timeouts), never the wall clock, so a virtual-clock
loop runs gossip unchanged.

How a message is authenticated is the adapter's choice, from the class's ``SECRET`` flag
(``mpc.messages``, ``gossip.messages``): secret -> ``Auth.SEALED``, else ``Auth.MAC``.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from floor.envelope import Auth, Received
from floor.errors import MurmurError
from floor.identity import PeerId
from floor.transport.base import Transport

__all__ = [
    "GossipHandler",
    "Network",
    "Poster",
    "StaticView",
    "TransportNetwork",
    "auth_for",
]

GossipHandler = Callable[[PeerId, Any], Any]
"""Handles one message from a peer: ``handler(sender, message)`` -> a reply (for requests),
None, or an awaitable of either (awaited by the adapter).

A handler should return quickly: the averaging drivers' handlers are synchronous. Raising a
``floor.errors.ProtocolError`` refuses the message (the sender sees ``RemoteRefused``).
"""


@runtime_checkable
class Network(Protocol):
    """What gossip needs from a network. Every wait is bounded by ``timeout`` (seconds).

    Failures are ``floor.errors`` types: ``PeerUnreachable``, ``Timeout``, ``TransportClosed``,
    ``RemoteRefused``, or a ``ProtocolError`` for a reply that fails the checks.
    """

    @property
    def local_id(self) -> PeerId:
        """This peer's id."""
        ...

    async def send(self, peer: PeerId, message: Any, *, timeout: float | None = None) -> None:
        """Deliver ``message`` to ``peer``; return once its handler accepted it."""
        ...

    async def request(self, peer: PeerId, message: Any, *, timeout: float | None = None) -> Any:
        """Send ``message`` to ``peer`` and return the reply message."""
        ...

    def register(self, message_type: type, handler: GossipHandler) -> None:
        """Handle incoming messages of ``message_type`` with ``handler`` (one per type)."""
        ...

    def unregister(self, message_type: type) -> None:
        """Stop handling ``message_type``."""
        ...

    def view(self) -> Sequence[PeerId]:
        """The peers this peer currently knows to be alive (never includes itself)."""
        ...

    def time(self) -> float:
        """The event loop's clock, in seconds (virtual under the simulator)."""
        ...


class Poster(Protocol):
    """An optional ``Network`` capability: ``network.post`` sends without waiting.

    ``post(peer, message, timeout=..., on_failure=...)`` starts delivering ``message`` and
    returns at once; if delivery fails (or is refused) by ``timeout``, ``on_failure(message,
    error)`` is called with a ``floor.errors`` error. No call means no failure was seen: a
    network may report a failure it cannot rule out (e.g. the connection closed before a
    refusal could come back), and may leave a refusal that arrives after ``timeout`` unreported.
    ``on_failure`` may be called before ``post`` returns (no address, closed network). gossip
    uses it when a network has it (the simulator's, and ``TransportNetwork`` over a stream, so
    that a message costs no task); otherwise it awaits ``send`` in a task.
    """

    def __call__(
        self,
        peer: PeerId,
        message: Any,
        *,
        timeout: float | None = None,
        on_failure: Callable[[Any, MurmurError], None] | None = None,
    ) -> None: ...


def auth_for(message: object) -> Auth:
    """How to authenticate ``message``: sealed if its class says ``SECRET`` (default), else MAC."""
    return Auth.SEALED if getattr(type(message), "SECRET", True) else Auth.MAC


class StaticView:
    """A fixed membership view (tests, hash-based grouping); ``remove`` models departures."""

    def __init__(self, peers: Sequence[PeerId], *, exclude: PeerId | None = None) -> None:
        self._peers = [p for p in peers if p != exclude]

    def __call__(self) -> list[PeerId]:
        return list(self._peers)

    def remove(self, peer: PeerId) -> None:
        """Forget ``peer``."""
        self._peers = [p for p in self._peers if p != peer]


class TransportNetwork:
    """A ``Network`` over a p2p ``Transport`` plus a view provider.

    ``view`` is a callable returning the live peers, e.g. ``lambda: [e.record.peer_id for e in
    membership.view.live()]`` in the daemon, or a ``StaticView``. The adapter never owns the
    transport: closing it is the caller's job.
    """

    def __init__(self, transport: Transport, view: Callable[[], Sequence[PeerId]]) -> None:
        self._transport = transport
        self._view = view
        self.sent = 0
        """Messages this peer sent (send, post and request)."""

    @property
    def local_id(self) -> PeerId:
        """This peer's id (the transport's)."""
        return self._transport.local_id

    @property
    def transport(self) -> Transport:
        """The underlying transport."""
        return self._transport

    async def send(self, peer: PeerId, message: Any, *, timeout: float | None = None) -> None:
        """Deliver ``message`` (sealed or MACed by ``auth_for``) and wait for its acceptance."""
        self.sent += 1
        await self._transport.send(peer, message, auth=auth_for(message), timeout=timeout)

    def post(
        self,
        peer: PeerId,
        message: Any,
        *,
        timeout: float | None = None,
        on_failure: Callable[[Any, MurmurError], None] | None = None,
    ) -> None:
        """Deliver ``message`` one-way without waiting (``Poster``; ``Transport.post``).

        Over an open stream of the aiohttp transport it is one frame with no acknowledgement
        and no task; otherwise the transport awaits the usual delivery in a task.
        """
        self.sent += 1
        self._transport.post(
            peer, message, auth=auth_for(message), timeout=timeout, on_failure=on_failure
        )

    async def request(self, peer: PeerId, message: Any, *, timeout: float | None = None) -> Any:
        """Send ``message`` and return the reply message (authenticated as the request was)."""
        self.sent += 1
        received = await self._transport.request(
            peer, message, auth=auth_for(message), timeout=timeout
        )
        return received.message

    def register(self, message_type: type, handler: GossipHandler) -> None:
        """Register ``handler`` for ``message_type`` on the transport."""

        async def adapter(received: Received) -> Any:
            reply = handler(received.sender, received.message)
            if inspect.isawaitable(reply):
                # Its own task: it may wait, time out or send (the adapter is inline).
                reply = await asyncio.ensure_future(reply)
            return reply

        self._transport.register(message_type, adapter, inline=True)

    def unregister(self, message_type: type) -> None:
        """Remove the handler of ``message_type``."""
        self._transport.unregister(message_type)

    def view(self) -> list[PeerId]:
        """The provider's live peers, without this peer."""
        me = self.local_id
        return [p for p in self._view() if p != me]

    def time(self) -> float:
        """The running loop's clock."""
        return asyncio.get_running_loop().time()

    def call_at(self, when: float, callback: Callable[..., Any], *args: Any) -> None:
        """Run ``callback(*args)`` at loop time ``when`` (the drivers' deadlines)."""
        asyncio.get_running_loop().call_at(when, callback, *args)
