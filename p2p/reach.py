"""Reachability: whether others can dial this peer, and the relays it keeps when they cannot.

``Reachability`` runs in the daemon's task group beside membership. A peer that listens asks
up to two peers it joined to dial it back (``DialBack``): each opens a new connection to the
address the peer names and sends a SIGNED ``DialProbe`` with the peer's fresh nonce. The peer
counts itself reachable once a probe with one of its nonces arrives, and only then relays for
others (``transport.relay_for``). A peer that was not reached, or that does not listen for peers
(``murmur start --no-listen``), keeps ``transport.relays`` relays: streams to reachable peers
that agreed to forward to it (``p2p.transport.relay``). Its record then names those relays
instead of its own address; when a relay's stream ends, another is asked and the record changes
with it (``Membership.announce`` spreads it at once). Every ``transport.reachability_recheck_s``
the check runs again: a peer reached now lets its relays go and names its own address again;
one no longer reached takes relays.

What a peer answering ``DialBack`` does is bounded: one dial per asking peer per
``DIAL_BACK_EVERY_S``, at most ``DIAL_BACK_RATE`` per second in all, only to an address the
transport's address policy accepts, and only a signed probe that names the asker as its
recipient (so it is useless against anyone else). A peer that lies in its answer can only make
the asker wrongly unreachable (it then uses relays): the asker believes the probe it received,
never the reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from collections.abc import Callable

from floor.envelope import Auth, Received
from floor.errors import NetworkError, Overloaded, ProtocolError
from floor.identity import PeerId
from p2p.config import HttpTransportConfig
from p2p.membership import Membership
from p2p.transport.http import HttpTransport
from p2p.transport.relay import (
    DialBack,
    DialBackReply,
    DialProbe,
    TokenBucket,
    is_relay_address,
)

__all__ = ["DIAL_BACK_EVERY_S", "DIAL_BACK_RATE", "Reachability"]

log = logging.getLogger("murmur.reach")

DIAL_BACK_EVERY_S = 10.0
"""A peer dials the same asker back at most this often."""
DIAL_BACK_RATE = (2.0, 4.0)
"""Dial-backs a peer makes per second in all (token bucket: rate, burst)."""
CHECK_PEERS = 2
"""Peers asked to dial back (the check succeeds if either reached us)."""
DECLINED_RETRY_S = 3.0
"""A peer that declined to relay (or failed to) is not asked again for this long."""
MAINTAIN_S = 2.0
"""How often the relay set is looked at (also at once when a relay is lost)."""


class Reachability:
    """Decides whether this peer is reachable and keeps its relays if not. ``run()`` loops."""

    def __init__(
        self,
        transport: HttpTransport,
        membership: Membership,
        config: HttpTransportConfig,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self._transport = transport
        self._membership = membership
        self._config = config
        self._rng = rng or random.Random()
        self._nonces: dict[bytes, asyncio.Event] = {}
        self._dialled: dict[PeerId, float] = {}
        self._bucket: TokenBucket | None = None
        self._declined: dict[PeerId, float] = {}
        self._lost = asyncio.Event()
        self.on_change: Callable[[bool], None] | None = None
        """Called with the new reachability once it is known (and when it changes)."""
        self.checks = 0
        """Dial-back checks made."""
        self._unknown = 0
        self.dial_backs = 0
        """Dial-backs made for others."""
        transport.register(DialBack, self._on_dial_back)
        transport.register(DialProbe, self._on_dial_probe)
        transport.on_relay_lost = self._relay_lost

    # -- answering others --------------------------------------------------------------------
    async def _on_dial_back(self, received: Received) -> DialBackReply:
        message = received.message
        assert isinstance(message, DialBack)
        loop = asyncio.get_running_loop()
        now = loop.time()
        peer = received.sender
        if self._bucket is None:
            self._bucket = TokenBucket(*DIAL_BACK_RATE, now)
        last = self._dialled.get(peer)
        if last is not None and now - last < DIAL_BACK_EVERY_S:
            # BUSY, not "not reached": the asker must not conclude it is unreachable (a peer
            # restarted within seconds asks again).
            raise Overloaded(f"one dial-back per {DIAL_BACK_EVERY_S:g} s")
        if is_relay_address(message.address) or not self._transport.accepts_address(
            message.address
        ):
            return DialBackReply(reached=False)
        if not self._bucket.take(1, now):
            raise Overloaded("too many dial-backs at once")
        if len(self._dialled) > 4096:
            self._dialled = {p: t for p, t in self._dialled.items() if now - t < DIAL_BACK_EVERY_S}
        self._dialled[peer] = now
        self.dial_backs += 1
        try:
            await self._transport.dial_once(
                message.address,
                DialProbe(message.nonce),
                peer,
                timeout=self._config.connect_timeout_s + 1.0,
            )
        except (NetworkError, ProtocolError) as exc:
            log.info(
                "event=dial_back peer=%s reached=false error=%s", peer.short(), type(exc).__name__
            )
            return DialBackReply(reached=False)
        log.info("event=dial_back peer=%s reached=true", peer.short())
        return DialBackReply(reached=True)

    async def _on_dial_probe(self, received: Received) -> None:
        message = received.message
        assert isinstance(message, DialProbe)
        event = self._nonces.get(message.nonce)
        if event is not None and received.auth is Auth.SIGNED:
            event.set()

    # -- our own reachability ----------------------------------------------------------------
    async def check(self) -> bool | None:
        """Ask up to ``CHECK_PEERS`` live peers to dial us back; None: nobody to ask yet."""
        transport = self._transport
        direct = transport.direct_addresses
        if not direct:
            return False
        live = [e.record.peer_id for e in self._membership.view.live()]
        if not live:
            # Nobody to ask (e.g. a bootstrap peer whose only joiners are outbound-only): a
            # peer that was joined through was dialled by the joiner, so it is reachable.
            if self._membership.joins_received:
                log.info("event=reachability_checked reachable=True by=joins_received")
                return True
            return None
        asked = self._rng.sample(live, min(CHECK_PEERS, len(live)))
        self.checks += 1
        nonces = {peer: os.urandom(16) for peer in asked}
        events = {nonce: asyncio.Event() for nonce in nonces.values()}
        self._nonces.update(events)
        wait = 2 * self._config.connect_timeout_s + 2.0
        try:
            results = await asyncio.gather(
                *(
                    transport.request(peer, DialBack(direct[0], nonce), timeout=wait)
                    for peer, nonce in nonces.items()
                ),
                return_exceptions=True,
            )
            answered = sum(1 for r in results if not isinstance(r, BaseException))
            if not any(e.is_set() for e in events.values()):
                # A probe may trail its sender's answer by a moment.
                waits = [asyncio.ensure_future(e.wait()) for e in events.values()]
                await asyncio.wait(waits, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
                for task in waits:
                    task.cancel()
        finally:
            for nonce in events:
                self._nonces.pop(nonce, None)
        reached = any(e.is_set() for e in events.values())
        if not reached and not answered:
            # Nobody answered: no verdict (asked again in a moment; logged once at info).
            self._unknown += 1
            log.log(
                logging.INFO if self._unknown == 1 else logging.DEBUG,
                "event=reachability_unknown asked=%d errors=%s",
                len(asked),
                ",".join(type(r).__name__ for r in results),
            )
            return None
        log.info(
            "event=reachability_checked reachable=%s asked=%d answered=%d address=%s",
            reached,
            len(asked),
            answered,
            direct[0],
        )
        return reached

    def _set(self, reachable: bool) -> None:
        transport = self._transport
        changed = transport.reachable is not reachable
        transport.reachable = reachable
        transport.relay_capacity = self._config.relay_for if reachable else 0
        if changed and self.on_change is not None:
            self.on_change(reachable)

    def _relay_lost(self, relay: PeerId) -> None:
        self._declined[relay] = asyncio.get_running_loop().time() + DECLINED_RETRY_S
        self._lost.set()

    async def run(self) -> None:
        """Decide reachability, then keep the relays this peer needs, until cancelled."""
        transport = self._transport
        if transport.reachable is None:
            if not self._config.dial_back:
                self._set(True)
            while transport.reachable is None:
                verdict = await self.check()
                if verdict is not None:
                    self._set(verdict)
                    break
                await asyncio.sleep(1.0)
        elif self.on_change is not None:
            self.on_change(transport.reachable)
        recheck = self._config.reachability_recheck_s
        loop = asyncio.get_running_loop()
        next_check = loop.time() + recheck
        while True:
            if recheck and self._config.dial_back and loop.time() >= next_check:
                await self._recheck()
                next_check = loop.time() + recheck
            if transport.reachable is False:
                await self._keep_relays()
            self._lost.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), MAINTAIN_S)

    async def _recheck(self) -> None:
        """Check again; on a change, switch between relays and this peer's own address."""
        transport = self._transport
        if not transport.direct_addresses:
            return  # --no-listen: never reachable, nothing to check
        verdict = await self.check()
        if verdict is None or verdict is transport.reachable:
            return
        log.info("event=reachability_changed reachable=%s", verdict)
        self._set(verdict)
        if verdict:
            # Reached now: its own address goes back in its record, the relays are let go.
            for relay in list(transport.relays):
                await transport.close_relay(relay)
            await self._membership.announce()
        # Not reached any more: run() takes relays next (and announces them).

    async def _keep_relays(self) -> None:
        transport = self._transport
        want = self._config.relays
        before = dict(transport.relays)
        loop = asyncio.get_running_loop()
        while len(transport.relays) < want:
            now = loop.time()
            candidates = [
                e.record
                for e in self._membership.view.live()
                if e.record.peer_id not in transport.relays
                and self._declined.get(e.record.peer_id, 0.0) <= now
                and any(not is_relay_address(a) for a in e.record.addresses)
            ]
            if not candidates:
                break
            record = self._rng.choice(candidates)
            address = next(a for a in record.addresses if not is_relay_address(a))
            try:
                await transport.open_relay(
                    record.peer_id, address, timeout=self._config.request_timeout_s
                )
            except (NetworkError, ProtocolError) as exc:
                self._declined[record.peer_id] = now + DECLINED_RETRY_S
                log.info(
                    "event=relay_refused relay=%s error=%s",
                    record.peer_id.short(),
                    exc,
                )
        if transport.relays != before:
            log.info(
                "event=relays_changed relays=%s",
                ",".join(sorted(transport.relays.values())) or "-",
            )
            await self._membership.announce()
