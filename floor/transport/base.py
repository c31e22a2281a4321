"""The small transport interface the protocols need, and the logic both implementations share.

A transport carries encoded, authenticated envelopes (``floor.envelope``) between peers. It can
send a message to a peer id (delivered and accepted by the peer's handler, or an error),
send a request and wait for the reply, contact an address whose peer id is not known yet
(bootstrap), and dispatch incoming envelopes to one handler per message type. Subclasses only
move bytes: ``_post(address, data, timeout) -> reply bytes``. Nothing here imports aiohttp.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, Self

from floor.envelope import Auth, EnvelopeCodec, Received
from floor.errors import (
    ConfigError,
    MalformedMessage,
    MurmurError,
    NetworkError,
    PeerUnreachable,
    ProtocolError,
    RefusalCode,
    TransportClosed,
    Unauthorized,
    UnknownMessageType,
    WrongRecipient,
)
from floor.identity import PeerId
from floor.messages import Message, Probe, ProbeReply

__all__ = [
    "ContactListener",
    "Handler",
    "OriginHandler",
    "PostFailure",
    "Transport",
    "reply_auth",
]

log = logging.getLogger("murmur.transport")

Handler = Callable[[Received], Awaitable[Message | None]]
"""Handles one received message; returns the reply (for requests) or None."""

OriginHandler = Callable[[Received, object], Awaitable[Message | None]]
"""Handles a message that must know the connection it came on (``origin``: the subclass's
handle for it, None when it has none); for transport-level messages such as relay requests."""

PostFailure = Callable[[Any, MurmurError], None]
"""``on_failure(message, error)`` of ``Transport.post``."""

ContactListener = Callable[[PeerId], None]
"""Called with the sender of every envelope that passed all checks (inbound or a reply)."""

DEFAULT_TIMEOUT_S = 10.0
MAX_ADDRESSES_PER_PEER = 8
OFFLOAD_BYTES = 1 << 20
"""Envelopes larger than this are checked and decoded in a worker thread, off the event loop
(hashing, MAC and seal checks release the GIL), so one big message never blocks the loop."""
PROBE_BACKOFF_S = (2.0, 300.0)
"""An address whose proof failed is not probed again for 2 s, then 4, 8... up to 300 s."""
PROBE_RATE = (10.0, 20.0)
"""Proofs started per second (token bucket: rate, burst), whatever the addresses learnt."""


def reply_auth(request_auth: Auth) -> Auth:
    """The authentication mode of a reply: the same as the request's.

    A SIGNED request gets a SIGNED reply, now addressed to the requester (whose id the
    request carried); SEALED and MAC requests get SEALED and MAC replies.
    """
    return request_auth


class Transport(abc.ABC):
    """Sends and receives envelopes for one local identity. Close with ``aclose()``.

    Every wait has a timeout (``timeout`` argument, or the transport's default). Failures are
    ``floor.errors`` types: ``PeerUnreachable``, ``Timeout``, ``TransportClosed``,
    ``RemoteRefused`` (the peer refused with a ``RefusalCode``), or a ``ProtocolError`` when a
    reply fails our own checks.
    """

    def __init__(
        self,
        codec: EnvelopeCodec,
        *,
        default_timeout_s: float = DEFAULT_TIMEOUT_S,
        admit: Callable[[PeerId], bool] | None = None,
        verify_addresses: bool = False,
    ) -> None:
        if default_timeout_s <= 0:
            raise ConfigError(f"default_timeout_s must be > 0, got {default_timeout_s}")
        self._codec = codec
        self._local_id: PeerId = codec.identity.peer_id
        self._default_timeout = default_timeout_s
        self._admit = admit
        self._handlers: dict[type, Handler] = {}
        self._origin_handlers: dict[type, OriginHandler] = {}
        self._inline: set[type] = {Probe}
        self._addresses: dict[PeerId, tuple[str, ...]] = {}
        self._listeners: list[ContactListener] = []
        self._waiters: set[asyncio.Task[object]] = set()
        self._posting: set[asyncio.Task[None]] = set()
        self._closed_waiters: set[asyncio.Task[object]] = set()
        self._closed = False
        self._verify = verify_addresses
        self._verified: set[tuple[PeerId, str]] = set()
        self._proving: dict[tuple[PeerId, str], asyncio.Task[None]] = {}
        self._failed: dict[str, tuple[float, float]] = {}  # address -> (retry at, next backoff)
        self._probe_tokens = PROBE_RATE[1]
        self._probe_refill = 0.0
        self.probes = 0
        """Address proofs this transport started (first contacts with learnt addresses)."""
        self._handlers[Probe] = self._on_probe
        self.accepted = 0
        """Inbound envelopes that passed every check and were handled."""
        self.refused = 0
        """Inbound envelopes refused (any refusal code)."""
        self.bytes_sent = 0
        """Envelope bytes this transport sent: requests, sends and replies (no HTTP framing)."""
        self.bytes_received = 0
        """Envelope bytes this transport received: inbound envelopes (refused ones too) and
        replies."""

    # -- identity and addresses ------------------------------------------------------------
    @property
    def local_id(self) -> PeerId:
        """The peer id this transport sends as."""
        return self._local_id

    @property
    @abc.abstractmethod
    def addresses(self) -> tuple[str, ...]:
        """The addresses where this transport can be reached (empty before it listens)."""

    @abc.abstractmethod
    def is_valid_address(self, address: str) -> bool:
        """Whether ``address`` has the form this transport can contact (no I/O)."""

    def accepts_address(self, address: str) -> bool:
        """Whether a peer may claim ``address`` in a record others relay (the address policy).

        Well-formed by default; the HTTP transport also refuses unspecified, link-local,
        multicast and (unless the network runs on loopback) loopback addresses.
        """
        return self.is_valid_address(address)

    def is_relayed(self, address: str) -> bool:
        """Whether ``address`` reaches its peer through a relay (which must not read what it
        forwards: every envelope sent there is SEALED). None of this base's addresses are."""
        return False

    def _route_auth(self, addresses: Sequence[str], auth: Auth) -> Auth:
        """``auth``, or SEALED when the peer is reached through a relay."""
        if auth is not Auth.SEALED and any(self.is_relayed(a) for a in addresses):
            return Auth.SEALED
        return auth

    def set_addresses(
        self, peer: PeerId, addresses: Sequence[str], *, verified: bool = False
    ) -> None:
        """Learn where ``peer`` can be reached (replaces the old list); drops refused ones.

        With address proofs on, an address is used only after a ``Probe`` there was answered
        by ``peer`` itself, unless ``verified`` (the caller knows it: an operator's flag).
        """
        valid = tuple(a for a in addresses if self.accepts_address(a))[:MAX_ADDRESSES_PER_PEER]
        old = self._addresses.get(peer, ())
        for address in old:
            if address not in valid:
                self._verified.discard((peer, address))
        if valid:
            self._addresses[peer] = valid
            if verified:
                self._verified.update((peer, a) for a in valid)
        else:
            self._addresses.pop(peer, None)

    def forget(self, peer: PeerId) -> None:
        """Forget the addresses of ``peer`` (and that they were proven)."""
        for address in self._addresses.pop(peer, ()):
            self._verified.discard((peer, address))

    def is_proven(self, peer: PeerId, address: str) -> bool:
        """Whether ``address`` may carry messages to ``peer`` (proven, or proofs are off)."""
        return not self._verify or (peer, address) in self._verified

    def addresses_of(self, peer: PeerId) -> tuple[str, ...]:
        """The known addresses of ``peer`` (empty if unknown)."""
        return self._addresses.get(peer, ())

    # -- handlers --------------------------------------------------------------------------
    def register(self, message_type: type, handler: Handler, *, inline: bool = False) -> None:
        """Handle incoming messages of ``message_type`` with ``handler`` (one per type).

        ``inline=True`` promises that the handler returns without suspending and without
        anything bound to the current task (``asyncio.timeout``, a ``TaskGroup``, a request):
        a stream then runs it in its reading task, with no task of its own. Any other handler
        starts in a task of its own, so its timeouts and cancellations are its own.
        """
        if message_type in self._handlers or message_type in self._origin_handlers:
            raise ConfigError(f"a handler for {message_type.__name__} is already registered")
        self._handlers[message_type] = handler
        if inline:
            self._inline.add(message_type)

    def register_with_origin(self, message_type: type, handler: OriginHandler) -> None:
        """Like ``register``, for a handler that is also told the connection (``origin``)."""
        if message_type in self._handlers or message_type in self._origin_handlers:
            raise ConfigError(f"a handler for {message_type.__name__} is already registered")
        self._origin_handlers[message_type] = handler

    def unregister(self, message_type: type) -> None:
        """Stop handling ``message_type`` (later messages of that type are refused)."""
        self._handlers.pop(message_type, None)
        self._inline.discard(message_type)

    def add_contact_listener(self, listener: ContactListener) -> None:
        """Call ``listener(peer)`` whenever an authenticated envelope arrives from ``peer``."""
        self._listeners.append(listener)

    # -- sending ---------------------------------------------------------------------------
    async def send(
        self,
        peer: PeerId,
        message: Message,
        *,
        auth: Auth = Auth.SEALED,
        timeout: float | None = None,
    ) -> None:
        """Deliver ``message`` to ``peer`` and wait until its handler accepted it."""
        await self._to_peer(peer, message, auth, timeout)

    def post(
        self,
        peer: PeerId,
        message: Message,
        *,
        auth: Auth = Auth.SEALED,
        timeout: float | None = None,
        on_failure: PostFailure | None = None,
    ) -> None:
        """Start delivering ``message`` to ``peer`` one-way and return at once.

        ``on_failure(message, error)`` hears of a failure within ``timeout``: a ``floor.errors``
        error (``RemoteRefused`` with the peer's code, ``PeerUnreachable``, ``Timeout``,
        ``TransportClosed``), called at once when the message cannot even start (no address,
        closed transport), else later from the event loop. No call means no failure was seen.
        Subclasses may send without a task (``_post_now``); otherwise, and when they cannot,
        a task awaits the same delivery as ``send``.
        """
        try:
            self._check_open()
            addresses = self._addresses.get(peer)
            if not addresses:
                raise PeerUnreachable(f"no known address for peer {peer.short()}")
            auth = self._route_auth(addresses, auth)
            data = self._codec.encode(message, recipient=peer, auth=auth)
        except MurmurError as exc:
            if on_failure is not None:
                on_failure(message, exc)
            return
        wait = self._default_timeout if timeout is None else timeout
        proven = (
            tuple(a for a in addresses if (peer, a) in self._verified)
            if self._verify
            else addresses
        )
        if proven and self._post_now(proven, data, wait, message, on_failure):
            return
        task = asyncio.create_task(
            self._post_later(peer, addresses, data, wait, message, on_failure)
        )
        self._posting.add(task)
        task.add_done_callback(self._posting.discard)

    def _post_now(
        self,
        addresses: tuple[str, ...],
        data: bytes,
        timeout: float,
        message: Message,
        on_failure: PostFailure | None,
    ) -> bool:
        """Send ``data`` one-way without a task if this transport can; False: it cannot."""
        return False

    async def _post_later(
        self,
        peer: PeerId,
        addresses: tuple[str, ...],
        data: bytes,
        timeout: float,
        message: Message,
        on_failure: PostFailure | None,
    ) -> None:
        try:
            self._check_open()
            await self._deliver(peer, addresses, data, timeout)
        except MurmurError as exc:
            if on_failure is not None:
                on_failure(message, exc)

    async def request(
        self,
        peer: PeerId,
        message: Message,
        *,
        auth: Auth = Auth.SEALED,
        timeout: float | None = None,
    ) -> Received:
        """Send ``message`` to ``peer`` and return its authenticated reply."""
        reply = await self._to_peer(peer, message, auth, timeout)
        return await self._check_reply(reply, expected=peer)

    async def request_address(
        self, address: str, message: Message, *, timeout: float | None = None
    ) -> Received:
        """Send a SIGNED ``message`` with no recipient to ``address`` (a peer not known yet).

        Used for bootstrap joins (an address the operator gave). Returns the reply, whose
        sender is whoever answered; that peer is then known to answer at ``address``.
        """
        self._check_open()
        if not self.is_valid_address(address):
            raise ConfigError(f"not a valid address: {address!r}")
        data = self._codec.encode(message, recipient=None, auth=Auth.SIGNED)
        reply = await self._exchange(address, data, timeout)
        received = await self._check_reply(reply, expected=None)
        if received.auth == Auth.SIGNED:
            self._verified.add((received.sender, address))
        return received

    async def _to_peer(
        self, peer: PeerId, message: Message, auth: Auth, timeout: float | None
    ) -> bytes | bytearray | memoryview:
        self._check_open()
        addresses = self._addresses.get(peer)
        if not addresses:
            raise PeerUnreachable(f"no known address for peer {peer.short()}")
        auth = self._route_auth(addresses, auth)
        data = self._codec.encode(message, recipient=peer, auth=auth)
        return await self._deliver(peer, addresses, data, timeout)

    async def _deliver(
        self, peer: PeerId, addresses: tuple[str, ...], data: bytes, timeout: float | None
    ) -> bytes | bytearray | memoryview:
        """Exchange ``data`` with the first of ``addresses`` that answers (proving it first)."""
        last: NetworkError | None = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self._default_timeout if timeout is None else timeout)
        for address in addresses:
            try:
                if not self.is_proven(peer, address):
                    await self._prove(peer, address, max(deadline - loop.time(), 1e-3))
                return await self._exchange(address, data, max(deadline - loop.time(), 1e-3))
            except PeerUnreachable as exc:
                last = exc
        assert last is not None  # the loop ran at least once
        raise last

    # -- address proofs ----------------------------------------------------------------------
    async def _prove(self, peer: PeerId, address: str, timeout: float) -> None:
        """Probe ``address`` once (shared by concurrent senders); PeerUnreachable if it fails."""
        key = (peer, address)
        task = self._proving.get(key)
        if task is None:
            now = asyncio.get_running_loop().time()
            failed = self._failed.get(self._failure_key(peer, address))
            if failed is not None and now < failed[0]:
                raise PeerUnreachable(
                    f"{address} failed its proof; next try in {failed[0] - now:.0f} s"
                )
            self._probe_tokens = min(
                PROBE_RATE[1], self._probe_tokens + (now - self._probe_refill) * PROBE_RATE[0]
            )
            self._probe_refill = now
            if self._probe_tokens < 1:
                raise PeerUnreachable("too many address proofs at once; try later")
            self._probe_tokens -= 1
            self.probes += 1
            task = asyncio.create_task(self._probe(peer, address, timeout))
            self._proving[key] = task
            task.add_done_callback(lambda _: self._proving.pop(key, None))
        await asyncio.shield(task)

    def _failure_key(self, peer: PeerId, address: str) -> str:
        """What a failed proof backs off: the address; through a relay, the relay and peer
        (one relay serves many peers, and losing one of them says nothing of the others)."""
        return f"{address}>{peer}" if self.is_relayed(address) else address

    async def _probe(self, peer: PeerId, address: str, timeout: float) -> None:
        nonce = os.urandom(16)
        # Through a relay the probe is sealed (the relay forwards nothing it could read); the
        # sealed answer proves the peer as well as a signature: only it holds the link key.
        auth = Auth.SEALED if self.is_relayed(address) else Auth.SIGNED
        data = self._codec.encode(Probe(nonce), recipient=peer, auth=auth)
        fail_key = self._failure_key(peer, address)
        try:
            reply = await self._exchange(address, data, timeout, probe=True)
            received = await self._check_reply(reply, expected=peer)
            if (
                received.auth != auth
                or type(received.message) is not ProbeReply
                or received.message.nonce != nonce
            ):
                raise WrongRecipient(f"the answer to a probe is not a {auth.name} ProbeReply")
        except (NetworkError, ProtocolError) as exc:
            now = asyncio.get_running_loop().time()
            backoff = self._failed.get(fail_key, (0.0, PROBE_BACKOFF_S[0]))[1]
            self._failed[fail_key] = (now + backoff, min(2 * backoff, PROBE_BACKOFF_S[1]))
            log.info(
                "event=address_proof_failed peer=%s address=%s error=%s retry_s=%.0f",
                peer.short(),
                address,
                type(exc).__name__,
                backoff,
            )
            raise PeerUnreachable(f"{address} did not prove to be {peer.short()}: {exc}") from None
        self._failed.pop(fail_key, None)
        if address in self._addresses.get(peer, ()):
            self._verified.add((peer, address))

    async def _post_probe(
        self, address: str, data: bytes, timeout: float
    ) -> bytes | bytearray | memoryview:
        """How a probe travels: like ``_post`` (the HTTP transport: one POST, no stream)."""
        return await self._post(address, data, timeout)

    async def _on_probe(self, received: Received) -> ProbeReply:
        message = received.message
        assert isinstance(message, Probe)
        return ProbeReply(message.nonce)

    async def _decode(self, data: bytes | bytearray | memoryview) -> Received:
        """``codec.decode``, in a worker thread for envelopes above ``OFFLOAD_BYTES``."""
        if len(data) > OFFLOAD_BYTES:
            return await asyncio.to_thread(self._codec.decode, data)
        return self._codec.decode(data)

    async def _check_reply(
        self, reply: bytes | bytearray | memoryview, expected: PeerId | None
    ) -> Received:
        if not reply:
            raise MalformedMessage("the peer sent no reply to a request")
        received = await self._decode(reply)
        if expected is not None and received.sender != expected:
            raise WrongRecipient(
                f"reply came from {received.sender.short()}, not {expected.short()}"
            )
        self._notify(received.sender)
        return received

    async def _exchange(
        self, address: str, data: bytes, timeout: float | None, *, probe: bool = False
    ) -> bytes | bytearray | memoryview:
        """Run ``_post`` (``_post_probe`` for a probe) with a deadline; a close while waiting
        raises ``TransportClosed``."""
        task = asyncio.current_task()
        if task is None:  # pragma: no cover - always inside a task under asyncio
            raise RuntimeError("transport calls must run inside an asyncio task")
        wait = self._default_timeout if timeout is None else timeout
        self._waiters.add(task)
        self.bytes_sent += len(data)
        try:
            post = self._post_probe if probe else self._post
            reply = await post(address, data, wait)
            self.bytes_received += len(reply)
            return reply
        except asyncio.CancelledError:
            if task in self._closed_waiters:
                self._closed_waiters.discard(task)
                task.uncancel()
                raise TransportClosed("transport closed while waiting") from None
            raise
        except NetworkError:
            if self._closed:
                raise TransportClosed("transport closed while waiting") from None
            raise
        finally:
            self._waiters.discard(task)

    @abc.abstractmethod
    async def _post(
        self, address: str, data: bytes, timeout: float
    ) -> bytes | bytearray | memoryview:
        """Deliver ``data`` to ``address``; return the reply bytes (empty when none).

        Raises ``PeerUnreachable``, ``Timeout`` or ``RemoteRefused``; never a library error.
        """

    # -- receiving -------------------------------------------------------------------------
    async def _serve_envelope(
        self,
        data: bytes | bytearray | memoryview,
        *,
        reply_wanted: bool = True,
        origin: object = None,
        eager: bool = False,
    ) -> bytes:
        """Check and handle one inbound envelope; return the encoded reply (b"" for none).

        Raises ``ProtocolError`` (with its refusal code) when the envelope is refused. With
        ``reply_wanted=False`` (a one-way post) a handler's reply is dropped unencoded.
        ``origin`` is passed to handlers registered with ``register_with_origin``. ``eager``:
        the caller runs this coroutine's first step in its own task (``start_eagerly``); a
        handler not registered ``inline`` is then started only after one suspension, when
        the coroutine runs in a task of its own (else an ``asyncio.timeout`` in the handler
        would cancel the caller's task, and the handler's wait would never end).
        """
        self.bytes_received += len(data)
        try:
            received = await self._decode(data)
            if self._admit is not None and not self._admit(received.sender):
                raise Unauthorized("the sender is not on the allowlist")
            kind = type(received.message)
            handler = self._handlers.get(kind)
            with_origin = self._origin_handlers.get(kind) if handler is None else None
            if handler is None and with_origin is None:
                raise UnknownMessageType(f"no handler for {kind.__name__}")
            self._notify(received.sender)
            if eager and kind not in self._inline:
                await asyncio.sleep(0)
            try:
                if with_origin is not None:
                    reply = await with_origin(received, origin)
                else:
                    assert handler is not None
                    reply = await handler(received)
            except ProtocolError:
                raise
            except Exception as exc:
                log.exception("event=handler_failed type=%s", type(received.message).__name__)
                raise ProtocolError("the handler failed", code=RefusalCode.INTERNAL) from exc
        except ProtocolError:
            self.refused += 1
            raise
        self.accepted += 1
        if reply is None or not reply_wanted:
            return b""
        encoded = self._codec.encode(
            reply, recipient=received.sender, auth=reply_auth(received.auth)
        )
        self.bytes_sent += len(encoded)
        return encoded

    def _notify(self, peer: PeerId) -> None:
        for listener in self._listeners:
            listener(peer)

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """Whether ``aclose()`` was called."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise TransportClosed("the transport is closed")

    async def aclose(self) -> None:
        """Close the transport: pending waits raise ``TransportClosed``. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for task in list(self._waiters):
            self._closed_waiters.add(task)
            task.cancel()
        await self._close_io()
        if self._posting:  # posts that never reached _exchange fail as closed
            await asyncio.gather(*self._posting, return_exceptions=True)

    @abc.abstractmethod
    async def _close_io(self) -> None:
        """Release sockets, sessions and tasks (called once)."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
