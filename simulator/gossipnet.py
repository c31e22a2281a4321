"""The daemon's own averaging code (``gossip/``) on the simulated network.

``SimPeerNetwork`` implements ``gossip.network.Network`` for one simulated peer over
``simulator.network.SimNetwork``: ``send`` returns once the recipient's handler accepted the
message (or raises ``PeerUnreachable`` / ``RemoteRefused`` / ``Timeout``), ``request`` carries
the reply back over the network, the view is the round's membership snapshot, and time is the
virtual loop's. Timeouts are bucketed callbacks, never one loop timer per message; each send
still costs a future; a handler that does not suspend runs eagerly, without a task. ``post``
(``gossip.network.Poster``, which the group all-reduce uses when a network has it) sends with
no future, task or timer at all.

``call_at`` schedules on the network's tick buckets, where ``gossip.driver.Driver`` keeps its
machine's alarm (``simulator.ticks`` runs the engine's rounds with it).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from floor.errors import (
    MurmurError,
    PeerUnreachable,
    ProtocolError,
    RemoteRefused,
    Timeout,
)
from floor.identity import PeerId
from gossip.network import GossipHandler
from simulator.network import SimNetwork

__all__ = ["SimPeerNetwork"]


class SimPeerNetwork:
    """``gossip.network.Network`` for simulated peer ``peer``."""

    def __init__(
        self,
        net: SimNetwork,
        peer: int,
        view: Callable[[], Sequence[PeerId]],
        positions: Callable[[], Mapping[bytes, int]] | None = None,
    ) -> None:
        """``view()`` is the membership snapshot (this peer included or not); ``positions()``,
        if given, maps each raw id to its index in that snapshot (shared by all peers, so a
        peer's view costs a slice instead of comparing every id: O(n) per peer, not O(n^2)
        per round)."""
        self._net, self._peer, self._view, self._positions = net, peer, view, positions
        self._handlers: dict[type, GossipHandler] = {}
        self.default_timeout = 10.0

    @property
    def local_id(self) -> PeerId:
        """This peer's id."""
        return self._net.ids[self._peer]

    def _call(
        self, peer: PeerId, message: Any, timeout: float | None, want_reply: bool
    ) -> asyncio.Future[Any]:
        net = self._net
        fut: asyncio.Future[Any] = net.loop.create_future()
        target = net.index.get(peer.raw)
        if target is None:
            fut.set_exception(PeerUnreachable(f"unknown peer {peer.short()}"))
            return fut
        me = self._peer

        def settle(ok: bool, value: Any) -> None:
            if fut.done():
                return
            if not ok:
                if isinstance(value, ProtocolError):
                    fut.set_exception(RemoteRefused(f"refused: {value}", code=value.code))
                else:
                    fut.set_exception(PeerUnreachable(f"peer {peer.short()} unreachable"))
            elif not want_reply:
                fut.set_result(None)
            elif value is None:
                fut.set_exception(PeerUnreachable("the peer sent no reply"))
            else:  # the reply travels back over the network

                def back(delivered: bool, _: Any) -> None:
                    if fut.done():
                        return
                    if delivered:
                        fut.set_result(value)
                    else:
                        fut.set_exception(PeerUnreachable("the reply was lost"))

                net.post(target, me, value, on_result=back, deliver_to=_ignore)

        wait = self.default_timeout if timeout is None else timeout
        net.call_at(net.loop.time() + wait, _expire, fut, wait)
        net.post(me, target, message, on_result=settle)
        return fut

    def post(
        self,
        peer: PeerId,
        message: Any,
        *,
        timeout: float | None = None,
        on_failure: Callable[[Any, MurmurError], None] | None = None,
    ) -> None:
        """Send ``message`` without waiting (``gossip.network.Poster``): no future, task or
        timer. ``on_failure(message, error)`` is called when the outcome is known, if the
        message was lost or its recipient offline (``PeerUnreachable``), refused
        (``RemoteRefused``), or handled after ``timeout`` (``Timeout``, reported when the late
        handling happens rather than at the deadline)."""
        net = self._net
        target = net.index.get(peer.raw)
        if target is None:
            if on_failure is not None:
                on_failure(message, PeerUnreachable(f"unknown peer {peer.short()}"))
            return
        if on_failure is None:
            net.post(self._peer, target, message)
            return
        wait = self.default_timeout if timeout is None else timeout
        deadline = net.loop.time() + wait
        net.post(
            self._peer,
            target,
            message,
            on_result=functools.partial(self._posted, message, deadline, wait, on_failure),
        )

    def _posted(
        self,
        message: Any,
        deadline: float,
        wait: float,
        on_failure: Callable[[Any, MurmurError], None],
        ok: bool,
        value: Any,
    ) -> None:
        error: MurmurError
        if ok:
            if self._net.loop.time() <= deadline:
                return
            error = Timeout(f"not handled within {wait:g} s")
        elif isinstance(value, ProtocolError):
            error = RemoteRefused(f"refused: {value}", code=value.code)
        else:
            error = PeerUnreachable("the message was lost or its recipient is offline")
        on_failure(message, error)

    async def send(self, peer: PeerId, message: Any, *, timeout: float | None = None) -> None:
        """Deliver ``message``; return once ``peer``'s handler accepted it."""
        await self._call(peer, message, timeout, want_reply=False)

    async def request(self, peer: PeerId, message: Any, *, timeout: float | None = None) -> Any:
        """Send ``message`` and return the reply that came back over the network."""
        return await self._call(peer, message, timeout, want_reply=True)

    def register(self, message_type: type, handler: GossipHandler) -> None:
        """Handle ``message_type`` with ``handler(sender_id, message)``."""
        self._handlers[message_type] = handler
        ids = self._net.ids
        self._net.register(self._peer, message_type, lambda s, m: handler(ids[s], m))

    def unregister(self, message_type: type) -> None:
        """Stop handling ``message_type``."""
        self._handlers.pop(message_type, None)
        self._net.handlers[self._peer].pop(message_type, None)

    def view(self) -> Sequence[PeerId]:
        """The round's membership snapshot, without this peer."""
        members = self._view()
        me = self.local_id.raw
        if self._positions is not None:
            i = self._positions().get(me)
            if i is None:
                return list(members)
            return [*members[:i], *members[i + 1 :]]
        return [p for p in members if p.raw != me]

    def time(self) -> float:
        """The virtual clock."""
        return self._net.loop.time()

    def call_at(self, when: float, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` at virtual time ``when``, in the network's tick order."""
        self._net.call_at(when, fn, *args)


def _ignore(sender: int, message: Any) -> None:
    return None


def _expire(fut: asyncio.Future[Any], wait: float) -> None:
    if not fut.done():
        fut.set_exception(Timeout(f"no answer within {wait:g} s"))
