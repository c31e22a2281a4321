"""The real transport: envelopes over HTTP/1.1 with aiohttp on one port.

``POST /v1/envelope``: the request body is the encoded envelope; the response is ``200`` with
the reply envelope, ``204`` when there is no reply, or a refusal: an HTTP error status with the
``RefusalCode`` in the ``Murmur-Refusal`` header. ``GET /v1/stream``: a WebSocket carrying many
envelopes and their replies (``p2p.transport.stream``); the sender uses it for envelopes up to
``stream_max_body`` bytes (per-message cost ~3x lower than a POST) and POST for larger ones and
for peers without the endpoint; ``post`` (one-way, no acknowledgement) writes straight to an open
stream, without a task. aiohttp errors become ``floor.errors`` types here and in
``stream.py`` and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import Payload

from floor.envelope import Auth, EnvelopeCodec
from floor.errors import (
    ConfigError,
    MalformedMessage,
    MessageTooLarge,
    NetworkError,
    NoRoute,
    Overloaded,
    PeerUnreachable,
    ProtocolError,
    RefusalCode,
    RemoteRefused,
    Timeout,
    TransportClosed,
)
from floor.identity import PeerId
from floor.messages import Message
from floor.transport.base import PostFailure, Transport
from p2p.config import HttpTransportConfig, format_address, parse_address
from p2p.transport.relay import (
    RELAY_PATH,
    RelayGrant,
    RelayRequest,
    TokenBucket,
    is_relay_address,
    relay_address,
    relay_target,
)
from p2p.transport.stream import (
    FRAME,
    KIND_ENVELOPE,
    KIND_POST,
    KIND_REFUSAL,
    KIND_RELAY,
    KIND_RELAY_POST,
    KIND_REPLY,
    STREAM_PATH,
    STREAM_PROTOCOL,
    ClientStream,
    FrameWriter,
    StreamGone,
    refusal_frame,
    start_eagerly,
)

__all__ = [
    "ENVELOPE_PATH",
    "REFUSAL_HEADER",
    "RELAY_PATH",
    "STREAM_PATH",
    "HttpTransport",
    "HttpTransportConfig",
    "format_address",
    "parse_address",
]

log = logging.getLogger("murmur.transport")

ENVELOPE_PATH = "/v1/envelope"
REFUSAL_HEADER = "Murmur-Refusal"
CONTENT_TYPE = "application/vnd.murmur.envelope"

# HTTP status for each refusal; the header carries the exact code.
_STATUS: dict[RefusalCode, int] = {
    RefusalCode.TOO_LARGE: 413,
    RefusalCode.UNAUTHORIZED: 403,
    RefusalCode.INTERNAL: 500,
    RefusalCode.BUSY: 503,
    RefusalCode.NO_ROUTE: 502,
}
_RELAY_BURST_S = 4.0
"""A relayed peer's byte and message buckets hold this many seconds of their rates."""


class Relayed:
    """A peer this transport relays for: its stream, its budgets, the forwards it owes."""

    __slots__ = ("_next", "bytes", "forwarded", "messages", "peer", "pending", "writer", "ws")

    def __init__(
        self,
        peer: PeerId,
        ws: web.WebSocketResponse,
        writer: FrameWriter,
        config: HttpTransportConfig,
        now: float,
    ) -> None:
        self.peer = peer
        self.ws = ws
        self.writer = writer
        rate_b, rate_m = config.relay_bytes_per_s, config.relay_messages_per_s
        self.bytes = TokenBucket(rate_b, rate_b * _RELAY_BURST_S, now)
        self.messages = TokenBucket(rate_m, rate_m * _RELAY_BURST_S, now)
        self.pending: dict[int, tuple[asyncio.Future[tuple[int, bytes]], asyncio.TimerHandle]] = {}
        self._next = 0
        self.forwarded = 0

    def take_id(self) -> int:
        request_id = self._next
        self._next = (request_id + 1) & 0xFFFFFFFF
        return request_id

    def fail_all(self, error: Exception) -> None:
        pending, self.pending = self.pending, {}
        for future, handle in pending.values():
            handle.cancel()
            if not future.done():
                future.set_exception(error)


class ByteBudget:
    """Bytes received but not yet handled, against a cap: ``take`` raises ``Overloaded``."""

    __slots__ = ("cap", "held", "peak", "refused")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.held = 0
        self.peak = 0
        self.refused = 0

    def take(self, n: int) -> None:
        if self.held + n > self.cap:
            self.refused += 1
            raise Overloaded(f"{self.held + n} in-flight bytes would exceed {self.cap}")
        self.held += n
        self.peak = max(self.peak, self.held)

    def give(self, n: int) -> None:
        self.held -= n


_WRITE_CHUNK = 1 << 20
"""Client streams ping at this interval; one that gets no pong within half of it is closed."""
_STREAM_MAX_FRAME = 1 << 20
"""The server reads stream frames up to this size, whatever its envelope cap: an envelope over a
smaller cap is refused as TOO_LARGE without ending the stream, and a frame over it ends the
stream, so one stream holds at most ``stream_max_inflight`` x 1 MiB of unanswered frames.
Senders never stream an envelope above it (``stream_max_body`` is clamped): those go by POST,
whose bodies are checked against the cap as they arrive."""


class EnvelopePayload(Payload):
    """A request body from an encoded envelope, written in 1 MiB slices without copies.

    (aiohttp's own bytes payload warns above 1 MiB, and one huge write makes asyncio copy the
    unsent rest into its buffer.)
    """

    _value: bytes

    def __init__(self, value: bytes) -> None:
        super().__init__(value, content_type=CONTENT_TYPE)
        self._size = len(value)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        """Not meaningful for binary envelopes; implemented because aiohttp requires it."""
        return self._value.decode(encoding, errors)

    async def write(self, writer: AbstractStreamWriter) -> None:
        """Write the envelope to ``writer`` in slices."""
        view = memoryview(self._value)
        for start in range(0, len(view), _WRITE_CHUNK):
            await writer.write(view[start : start + _WRITE_CHUNK])


def local_ip_toward(address: str | None, *, ipv6: bool = False) -> str:
    """The local IP the OS would use to reach ``address`` (HOST:PORT); no packet is sent."""
    family = socket.AF_INET6 if ipv6 else socket.AF_INET
    host, port = parse_address(address) if address else ("2001:db8::1" if ipv6 else "192.0.2.1", 9)
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((host, port))
            local: str = probe.getsockname()[0]
            return local
    except OSError:
        return "::1" if ipv6 else "127.0.0.1"


def is_loopback(remote: str | None) -> bool:
    """Whether the remote address of a request is a loopback address."""
    if remote is None:
        return False
    try:
        return ipaddress.ip_address(remote).is_loopback
    except ValueError:
        return False


def _is_loopback_host(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _next_chunk(content: aiohttp.StreamReader) -> bytes:
    """The next buffered body chunk as aiohttp received it (b"" at the end of the body).

    ``readany()`` would join every chunk buffered so far into one new ``bytes`` (a copy that
    ``read_body`` makes anyway); ``readchunk()`` hands them over one by one.
    """
    while not content.at_eof():  # an empty body's reader answers (b"", True) forever
        chunk, end_of_http_chunk = await content.readchunk()
        if chunk or not end_of_http_chunk:
            return chunk
    return b""


async def read_body(
    content: aiohttp.StreamReader,
    length: int | None,
    cap: int,
    budget: ByteBudget | None = None,
    codec: EnvelopeCodec | None = None,
) -> bytearray:
    """Read a whole body into one growing buffer, refusing more than ``cap`` bytes.

    Memory follows what arrived, never what ``length`` (Content-Length) claims: a sender
    cannot make us allocate bytes it has not sent. Each chunk is charged to ``budget`` as it
    arrives (``Overloaded`` when it is full); the caller gives back ``len(result)`` when done
    with it, and on an error this function gives back what it took. The buffer is writable,
    so decoded tensors can point into it. With ``codec`` and a known length, the envelope's
    head is checked as soon as it arrived (``EnvelopeCodec.check_head``): a body too large
    for its message type, or without the network key, is refused before the rest is read.
    """
    if length is not None and length > cap:
        raise MessageTooLarge(f"body of {length} bytes exceeds the cap of {cap}")
    limit = cap if length is None else length
    need = None if codec is None or length is None else 0  # 0: head size not known yet
    buf = bytearray()
    try:
        while chunk := await _next_chunk(content):
            if len(buf) + len(chunk) > limit:
                if length is None:
                    raise MessageTooLarge(f"body exceeds the cap of {cap} bytes")
                raise MessageTooLarge("the body is longer than its Content-Length")
            if budget is not None:
                budget.take(len(chunk))
            buf += chunk
            if need is not None and codec is not None and length is not None:
                if not need:
                    need = codec.head_size(buf) or 0
                if need and len(buf) >= min(need, length):
                    codec.check_head(buf, length)
                    need = None
    except BaseException:
        if budget is not None:
            budget.give(len(buf))
        raise
    if length is not None and len(buf) < length:
        if budget is not None:
            budget.give(len(buf))
        raise PeerUnreachable("the body ended early")
    return buf


class HttpTransport(Transport):
    """A ``Transport`` over aiohttp. ``await start()`` to listen, ``aclose()`` to stop.

    ``routes`` adds more endpoints on the same port (the daemon's ``/v1/status``).
    """

    def __init__(
        self,
        codec: EnvelopeCodec,
        *,
        listen: str = "127.0.0.1:0",
        config: HttpTransportConfig | None = None,
        admit: Callable[[PeerId], bool] | None = None,
        routes: Iterable[web.AbstractRouteDef] = (),
        advertise: Iterable[str] = (),
        route_hint: str | None = None,
        serve_peers: bool = True,
    ) -> None:
        self.config = config or HttpTransportConfig()
        super().__init__(
            codec,
            default_timeout_s=self.config.request_timeout_s,
            admit=admit,
            verify_addresses=self.config.verify_addresses,
        )
        self._listen = parse_address(listen)
        self.inflight = ByteBudget(
            max(self.config.max_inflight_bytes, self.config.max_message_size)
        )
        """Inbound bytes received and not yet handled (all connections)."""
        allow = self.config.allow_loopback_peers
        self._allow_loopback = _is_loopback_host(self._listen[0]) if allow is None else allow
        self._advertise = tuple(advertise)
        for address in self._advertise:
            parse_address(address)
        self._serve_peers = serve_peers
        self._app = web.Application(client_max_size=self.config.max_message_size)
        if serve_peers:
            self._app.router.add_post(ENVELOPE_PATH, self._on_envelope)
            self._app.router.add_get(STREAM_PATH, self._on_stream)
            self._app.router.add_post(RELAY_PATH, self._on_relay_post)
        self._app.router.add_routes(list(routes))
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._stream_session: aiohttp.ClientSession | None = None
        self._streams: OrderedDict[str, ClientStream] = OrderedDict()
        self._connecting: dict[str, asyncio.Task[ClientStream | None]] = {}
        self._no_stream: dict[str, float] = {}  # address -> loop time to try a stream again
        self._inbound: set[web.WebSocketResponse] = set()
        self._serving: set[asyncio.Task[None]] = set()
        self._bound: tuple[str, ...] = ()
        self._route_hint = route_hint
        # Relaying for others (server side) ...
        self.relay_capacity = 0
        """Peers this transport relays for at most now (set by ``p2p.reach`` once this peer
        knows it is reachable; 0: it grants no relay)."""
        self._relayed: dict[PeerId, Relayed] = {}
        self._relayed_ws: dict[web.WebSocketResponse, Relayed] = {}
        self._answers: dict[web.WebSocketResponse, FrameWriter] = {}
        self.relay_forwarded = 0
        """Envelopes this transport forwarded as a relay."""
        self.relay_forwarded_bytes = 0
        self.relay_refused = 0
        """Envelopes refused as a relay (not sealed, no route, over a budget)."""
        # ... and being relayed (client side).
        self.reachable: bool | None = None if serve_peers else False
        """Whether others can dial this peer (None: not known yet; False: it names its
        relays instead of its own address)."""
        self._relays: dict[PeerId, tuple[str, ClientStream]] = {}
        self.on_relay_lost: Callable[[PeerId], None] | None = None
        """Called with a relay's id when its stream ends."""
        self.register_with_origin(RelayRequest, self._on_relay_request)

    @property
    def addresses(self) -> tuple[str, ...]:
        """Where others reach this peer: advertised addresses if given, else the bound
        ``HOST:PORT`` (after ``start()``); once it is known to be unreachable (or it does not
        listen for peers), the relay addresses of its relays instead."""
        if self.reachable is False:
            return tuple(relay_address(address) for address, _ in self._relays.values())
        return self._advertise or self._bound

    @property
    def direct_addresses(self) -> tuple[str, ...]:
        """This peer's own addresses (empty when it serves no peer connections)."""
        return (self._advertise or self._bound) if self._serve_peers else ()

    @property
    def relays(self) -> dict[PeerId, str]:
        """The relays that forward to this peer now: relay id -> its address."""
        return {peer: address for peer, (address, _) in self._relays.items()}

    @property
    def relaying_for(self) -> list[PeerId]:
        """The peers this transport relays for now."""
        return list(self._relayed)

    def is_relayed(self, address: str) -> bool:
        """Whether ``address`` is a relay address (``relay:HOST:PORT``)."""
        return is_relay_address(address)

    def is_valid_address(self, address: str) -> bool:
        """Whether ``address`` is a well-formed ``HOST:PORT`` (or ``relay:HOST:PORT``) with a
        non-zero port."""
        if is_relay_address(address):
            address = relay_target(address)
        try:
            return parse_address(address)[1] != 0
        except ConfigError:
            return False

    def accepts_address(self, address: str) -> bool:
        """Whether a record may name ``address``: well-formed, and not an unspecified,
        link-local, multicast, broadcast or reserved IP (nor loopback, unless this network
        runs on loopback). Host names are taken: their first contact is a probe like any.
        A relay address is judged by the relay's own address."""
        if is_relay_address(address):
            address = relay_target(address)
        try:
            host, port = parse_address(address)
        except ConfigError:
            return False
        if port == 0:
            return False
        if host.lower() == "localhost" or host.lower().endswith(".localhost"):
            return self._allow_loopback
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return True  # a DNS name
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip.is_loopback:  # before is_reserved: ::1 lies in the reserved ::/8
            return self._allow_loopback
        if ip.is_unspecified or ip.is_link_local or ip.is_multicast or ip.is_reserved:
            return False
        return ip != ipaddress.IPv4Address("255.255.255.255")

    async def start(self) -> None:
        """Listen on the configured address; ConfigError if it cannot (e.g. port in use)."""
        self._check_open()
        host, port = self._listen
        runner = web.AppRunner(
            self._app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=self.config.shutdown_timeout_s,
            keepalive_timeout=self.config.idle_timeout_s,
        )
        await runner.setup()
        site = web.TCPSite(runner, host, port, backlog=256)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise ConfigError(
                f"cannot listen on {format_address(host, port)}: {exc.strerror or exc}"
            ) from None
        self._runner = runner
        bound: list[str] = []
        server = site._server
        for sock in getattr(server, "sockets", None) or ():
            name = sock.getsockname()
            ip = name[0]
            if ipaddress.ip_address(ip).is_unspecified:
                # Bound to all interfaces: advertise the local address that routes to the
                # bootstrap peer (or to a public address); --advertise overrides this guess.
                ip = local_ip_toward(self._route_hint, ipv6=":" in ip)
            bound.append(format_address(ip, name[1]))
        self._bound = tuple(bound)
        self._client()

    # -- client side -----------------------------------------------------------------------
    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            # Sending before start() (or without listening) still works: open a session lazily.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=self.config.max_connections,
                    limit_per_host=self.config.max_connections_per_peer,
                ),
                timeout=aiohttp.ClientTimeout(total=None, connect=self.config.connect_timeout_s),
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding"),
            )
        return self._session

    async def _post(
        self, address: str, data: bytes, timeout: float
    ) -> bytes | bytearray | memoryview:
        kind, path = KIND_ENVELOPE, ENVELOPE_PATH
        if is_relay_address(address):
            address, kind, path = relay_target(address), KIND_RELAY, RELAY_PATH
        if self.config.stream and len(data) <= min(self.config.stream_max_body, _STREAM_MAX_FRAME):
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            try:
                async with asyncio.timeout_at(deadline):
                    for _ in range(2):  # a stream that closed under us is replaced once
                        stream = self._streams.get(address)
                        if stream is not None and not stream.closed:
                            self._streams.move_to_end(address)  # least recently used first
                        else:
                            stream = await self._stream_to(address)
                            if stream is None:
                                break
                        try:
                            return await stream.exchange(data, kind)
                        except StreamGone:
                            continue
            except TimeoutError:
                raise Timeout(f"no answer from {address} within {timeout:g} s") from None
            timeout = max(deadline - loop.time(), 1e-3)
        return await self._post_http(address, data, timeout, path=path)

    def _post_now(
        self,
        addresses: tuple[str, ...],
        data: bytes,
        timeout: float,
        message: Message,
        on_failure: PostFailure | None,
    ) -> bool:
        """One-way frame on an already open stream to the first address that has one.

        False (the caller falls back to a task awaiting the usual delivery) when streams are off,
        the envelope is too large for the stream, or no stream is open yet or it just closed. A
        post to a stream whose queue is full (the peer stopped reading) fails at once.
        """
        config = self.config
        if not config.stream or len(data) > min(config.stream_max_body, _STREAM_MAX_FRAME):
            return False
        streams = self._streams
        for address in addresses:
            kind = KIND_POST
            if is_relay_address(address):
                address, kind = relay_target(address), KIND_RELAY_POST
            stream = streams.get(address)
            if stream is None or stream.closed:
                continue
            if stream.congested(len(data)):  # the peer stopped reading: do not queue more
                if on_failure is not None:
                    on_failure(message, PeerUnreachable(f"the stream to {address} is congested"))
                return True
            deadline = asyncio.get_running_loop().time() + timeout
            if not stream.post(data, message, deadline, on_failure, kind):
                return False
            streams.move_to_end(address)
            self.bytes_sent += len(data)
            return True
        return False

    async def _post_probe(
        self, address: str, data: bytes, timeout: float
    ) -> bytes | bytearray | memoryview:
        """A probe is one POST: an address not yet proven never gets a WebSocket upgrade."""
        if is_relay_address(address):
            return await self._post_http(relay_target(address), data, timeout, path=RELAY_PATH)
        return await self._post_http(address, data, timeout)

    async def dial_once(
        self, address: str, message: Message, recipient: PeerId, *, timeout: float
    ) -> None:
        """POST ``message`` (SIGNED, to ``recipient``) to ``address`` on a new connection,
        closed after (a dial-back: a connection this peer already holds must not stand in for
        a fresh one). Raises ``PeerUnreachable``, ``Timeout`` or ``RemoteRefused``."""
        self._check_open()
        if is_relay_address(address) or not self.accepts_address(address):
            raise ConfigError(f"will not dial {address!r}")
        data = self._codec.encode(message, recipient=recipient, auth=Auth.SIGNED)
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True, limit=1),
            timeout=aiohttp.ClientTimeout(total=None, connect=self.config.connect_timeout_s),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )
        try:
            self.bytes_sent += len(data)
            await self._post_http(address, data, timeout, session=session)
        finally:
            await session.close()

    async def _post_http(
        self,
        address: str,
        data: bytes,
        timeout: float,
        *,
        path: str = ENVELOPE_PATH,
        session: aiohttp.ClientSession | None = None,
    ) -> bytes | bytearray:
        url = f"http://{address}{path}"
        session = session or self._client()
        try:
            async with (
                asyncio.timeout(timeout),
                session.post(url, data=EnvelopePayload(data)) as resp,
            ):
                if resp.status == 204:
                    return b""
                if resp.status == 200:
                    return await read_body(
                        resp.content, resp.content_length, self.config.max_message_size
                    )
                raise _refusal(address, resp.status, resp.headers.get(REFUSAL_HEADER))
        except TimeoutError:
            raise Timeout(f"no answer from {address} within {timeout:g} s") from None
        except (NetworkError, ProtocolError):
            raise
        except (aiohttp.ClientError, OSError) as exc:
            raise PeerUnreachable(f"cannot reach {address}: {type(exc).__name__}: {exc}") from None

    # -- client streams --------------------------------------------------------------------
    async def _stream_to(self, address: str) -> ClientStream | None:
        """The open stream to ``address``, connecting once if needed; None: use POST."""
        stream = self._streams.get(address)
        if stream is not None and not stream.closed:
            self._streams.move_to_end(address)
            return stream
        retry_at = self._no_stream.get(address)
        if retry_at is not None:
            if asyncio.get_running_loop().time() < retry_at:
                return None
            del self._no_stream[address]
        task = self._connecting.get(address)
        if task is None:
            if len(self._streams) >= self.config.max_connections and not self._evict_idle():
                return None  # every stream is busy: this one goes by POST
            task = asyncio.create_task(self._connect(address), name=f"murmur-connect {address}")
            self._connecting[address] = task
            task.add_done_callback(self._connected)
        return await asyncio.shield(task)

    def _no_stream_for_now(self, address: str) -> None:
        retry_at = asyncio.get_running_loop().time() + self.config.stream_retry_s
        self._no_stream[address] = retry_at

    def _connected(self, task: asyncio.Task[ClientStream | None]) -> None:
        for address, pending in list(self._connecting.items()):
            if pending is task:
                del self._connecting[address]
        if not task.cancelled():
            task.exception()  # retrieved here: every waiter may have timed out already

    def _evict_idle(self) -> bool:
        """Close the least recently used idle stream; False if every stream is busy."""
        for address, stream in self._streams.items():
            if stream.idle:
                del self._streams[address]
                task = asyncio.create_task(stream.aclose())
                self._serving.add(task)
                task.add_done_callback(self._serving.discard)
                return True
        return False

    async def _connect(self, address: str) -> ClientStream | None:
        if self._stream_session is None:
            self._stream_session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, force_close=True),
                timeout=aiohttp.ClientTimeout(total=None, connect=self.config.connect_timeout_s),
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding"),
            )
        url = f"http://{address}{STREAM_PATH}"
        try:
            async with asyncio.timeout(self.config.request_timeout_s):
                ws = await self._stream_session.ws_connect(
                    url,
                    protocols=(STREAM_PROTOCOL,),
                    timeout=aiohttp.ClientWSTimeout(
                        ws_receive=None, ws_close=self.config.shutdown_timeout_s
                    ),
                    heartbeat=self.config.stream_heartbeat_s,
                    max_msg_size=self.config.max_message_size + FRAME.size,
                    compress=0,
                )
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status == 503:  # the peer is shutting down
                raise PeerUnreachable(f"{address} is closing") from None
            # A peer without the stream endpoint, behind something that refuses the upgrade,
            # or holding as many streams as it takes (429): POST only for a while.
            log.info("event=no_stream address=%s status=%s", address, exc.status)
            self._no_stream_for_now(address)
            return None
        except TimeoutError:
            raise Timeout(f"no stream to {address} within the request timeout") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise PeerUnreachable(f"cannot reach {address}: {type(exc).__name__}: {exc}") from None
        if ws.protocol != STREAM_PROTOCOL:
            await ws.close()
            self._no_stream_for_now(address)
            return None
        if self._closed:
            await ws.close()
            raise PeerUnreachable("the transport closed while connecting")
        stream = ClientStream(ws, address, self._stream_closed)
        self._streams[address] = stream
        return stream

    def _stream_closed(self, stream: ClientStream) -> None:
        if self._streams.get(stream.address) is stream:
            del self._streams[stream.address]
        if stream.serve is not None:
            for relay, (_, held) in list(self._relays.items()):
                if held is stream:
                    del self._relays[relay]
                    log.info("event=relay_lost relay=%s address=%s", relay.short(), stream.address)
                    if self.on_relay_lost is not None:
                        self.on_relay_lost(relay)

    # -- being relayed (client side) ---------------------------------------------------------
    async def open_relay(self, relay: PeerId, address: str, *, timeout: float) -> RelayGrant:
        """Ask ``relay`` (at ``address``) to relay for this peer over a stream to it.

        On a grant the stream stays open, carries the envelopes the relay forwards to us, and
        the relay appears in ``addresses`` (when this peer is unreachable). Raises
        ``PeerUnreachable`` (no stream, or the relay declined) or ``Timeout``.
        """
        self._check_open()
        if relay in self._relays:
            raise ConfigError(f"{relay.short()} already relays for this peer")
        data = self._codec.encode(RelayRequest(want_s=3600.0), recipient=relay, auth=Auth.SEALED)
        try:
            async with asyncio.timeout(timeout):
                stream = await self._stream_to(address)
                if stream is None:
                    raise PeerUnreachable(f"{address} offers no stream to relay over")
                stream.serve = self._serve_reverse
                try:
                    reply = await stream.exchange(data)
                    received = await self._check_reply(reply, expected=relay)
                except BaseException:
                    stream.serve = None
                    raise
        except TimeoutError:
            raise Timeout(f"no relay answer from {address} within {timeout:g} s") from None
        grant = received.message
        if type(grant) is not RelayGrant or received.auth is not Auth.SEALED:
            stream.serve = None
            raise MalformedMessage("the answer to a relay request is not a sealed RelayGrant")
        if not grant.granted:
            stream.serve = None
            raise PeerUnreachable(f"{relay.short()} will not relay: {grant.reason}")
        if stream.closed:
            raise PeerUnreachable(f"the stream to {address} closed")
        self._relays[relay] = (address, stream)
        log.info("event=relay_granted relay=%s address=%s", relay.short(), address)
        return grant

    async def close_relay(self, relay: PeerId) -> None:
        """Stop being relayed by ``relay`` (closes the stream; no ``on_relay_lost`` call)."""
        held = self._relays.pop(relay, None)
        if held is not None:
            await held[1].aclose()

    def _serve_reverse(self, stream: ClientStream, request_id: int, envelope: memoryview) -> None:
        """An envelope a relay forwarded to us: check and handle it, answer on the stream."""
        size = len(envelope)
        try:
            self.inflight.take(size)
        except Overloaded as exc:
            stream.write_answer(refusal_frame(request_id, exc))
            return
        rest = start_eagerly(self._serve_reverse_frame(stream, request_id, envelope, size))
        if rest is not None:
            task = asyncio.create_task(rest)
            self._serving.add(task)
            task.add_done_callback(self._serving.discard)

    async def _serve_reverse_frame(
        self, stream: ClientStream, request_id: int, envelope: memoryview, size: int
    ) -> None:
        try:
            try:
                reply = await self._serve_envelope(envelope, eager=True)
                frame = FRAME.pack(request_id, KIND_REPLY) + reply
            except ProtocolError as exc:
                log.debug("event=refused code=%d reason=%s", int(exc.code), exc)
                frame = refusal_frame(request_id, exc)
            except Exception:  # a bug must not end the relay stream
                log.exception("event=stream_frame_failed")
                frame = refusal_frame(
                    request_id, ProtocolError("internal error", code=RefusalCode.INTERNAL)
                )
            stream.write_answer(frame)
        finally:
            self.inflight.give(size)

    # -- relaying for others (server side) ---------------------------------------------------
    async def _on_relay_request(self, received: Any, origin: object) -> RelayGrant:
        """Grant or decline a relay request; a grant binds the sender to the stream it used."""
        cfg = self.config
        peer: PeerId = received.sender

        def no(reason: str) -> RelayGrant:
            log.info("event=relay_declined peer=%s reason=%s", peer.short(), reason)
            return RelayGrant(False, reason, 0, 0)

        if not isinstance(origin, web.WebSocketResponse) or origin.closed:
            return no("ask over a stream: the relay forwards down the stream it was asked on")
        if received.auth is not Auth.SEALED:
            return no("a relay request must be sealed")
        if self.reachable is not True:
            return no("this peer is not known to be reachable")
        old = self._relayed.get(peer)
        if old is None and len(self._relayed) >= self.relay_capacity:
            return no(f"relaying for {len(self._relayed)} peers, the most it takes")
        if old is not None:
            self._unbind(old, NoRoute("the peer moved to another stream"))
        bound = self._relayed_ws.get(origin)
        if bound is not None:  # a stream relays for the one peer that asked on it
            return no("this stream already carries another peer's relay")
        writer = self._answers.get(origin) or FrameWriter(origin, f"relay {peer.short()}", _noop)
        self._answers[origin] = writer
        now = asyncio.get_running_loop().time()
        client = Relayed(peer, origin, writer, cfg, now)
        self._relayed[peer] = client
        self._relayed_ws[origin] = client
        log.info("event=relay_started peer=%s relaying_for=%d", peer.short(), len(self._relayed))
        return RelayGrant(True, "", cfg.relay_bytes_per_s, cfg.relay_messages_per_s)

    def _unbind(self, client: Relayed, error: Exception) -> None:
        if self._relayed.get(client.peer) is client:
            del self._relayed[client.peer]
        if self._relayed_ws.get(client.ws) is client:
            del self._relayed_ws[client.ws]
        client.fail_all(error)

    def _forward(self, data: bytes | bytearray | memoryview) -> asyncio.Future[tuple[int, bytes]]:
        """Write ``data`` down the stream of the peer it is addressed to; a future of that
        peer's answer (kind, payload). Raises ``ProtocolError`` when the relay refuses it."""
        try:
            auth, recipient = self._codec.route(data)
            if auth is not Auth.SEALED:
                raise MalformedMessage("a relay forwards only sealed envelopes")
            client = self._relayed.get(recipient) if recipient is not None else None
            if client is None:
                raise NoRoute("this peer does not relay for the recipient")
            size = len(data)
            loop = asyncio.get_running_loop()
            now = loop.time()
            if len(client.pending) >= self.config.relay_max_pending:
                raise Overloaded("too many forwarded envelopes await the relayed peer")
            if client.writer.congested(size):
                raise Overloaded("the relayed peer is not reading")
            if not client.messages.take(1, now):
                raise Overloaded("over the relayed peer's message rate")
            if not client.bytes.take(size, now):
                raise Overloaded("over the relayed peer's byte rate")
            request_id = client.take_id()
            try:
                client.writer.write(FRAME.pack(request_id, KIND_ENVELOPE) + data)
            except StreamGone:
                self._unbind(client, NoRoute("the relayed peer's stream closed"))
                raise NoRoute("the relayed peer's stream closed") from None
        except ProtocolError:
            self.relay_refused += 1
            raise
        future: asyncio.Future[tuple[int, bytes]] = loop.create_future()
        handle = loop.call_later(self.config.request_timeout_s, _expire, client, request_id)
        client.pending[request_id] = (future, handle)
        client.forwarded += 1
        self.relay_forwarded += 1
        self.relay_forwarded_bytes += size
        return future

    def _relay_answer(self, ws: web.WebSocketResponse, data: bytes) -> bool:
        """A REPLY or REFUSAL frame from a peer we relay for; False: ws is not a relay stream."""
        client = self._relayed_ws.get(ws)
        if client is None:
            return False
        request_id, kind = FRAME.unpack_from(data)
        held = client.pending.pop(request_id, None)
        if held is not None:
            future, handle = held
            handle.cancel()
            if not future.done():
                future.set_result((kind, bytes(memoryview(data)[FRAME.size :])))
        return True

    def _relay_frame(
        self, ws: web.WebSocketResponse, request_id: int, envelope: memoryview, one_way: bool
    ) -> None:
        """Forward a kind 5 or 6 frame; its answer (a refusal only, for 6) goes back on ws."""
        writer = self._answers.get(ws)
        if writer is None:
            writer = self._answers[ws] = FrameWriter(ws, "relay answers", _noop)
        try:
            future = self._forward(envelope)
        except ProtocolError as exc:
            with contextlib.suppress(StreamGone):
                writer.write(refusal_frame(request_id, exc))
            return

        def answered(done: asyncio.Future[tuple[int, bytes]]) -> None:
            if done.cancelled():
                return
            error = done.exception()
            if error is not None:
                if one_way and not isinstance(error, ProtocolError):
                    return
                exc = error if isinstance(error, ProtocolError) else NoRoute(str(error))
                frame = refusal_frame(request_id, exc)
            else:
                kind, payload = done.result()
                if one_way and kind != KIND_REFUSAL:
                    return
                frame = FRAME.pack(request_id, kind) + payload
            with contextlib.suppress(StreamGone):
                writer.write(frame)

        future.add_done_callback(answered)

    async def _on_relay_post(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/relay``: forward the body; answer with the relayed peer's answer."""
        held = 0
        try:
            try:
                async with asyncio.timeout(self.config.body_timeout_s):
                    body = await read_body(
                        request.content,
                        request.content_length,
                        self.config.max_message_size,
                        self.inflight,
                        self._codec,
                    )
            except TimeoutError:
                if request.transport is not None:
                    request.transport.close()
                return web.Response(status=408, headers={REFUSAL_HEADER: "2"})
            held = len(body)
            future = self._forward(body)
            self.inflight.give(held)
            held = 0
            try:
                async with asyncio.timeout(self.config.request_timeout_s):
                    kind, payload = await future
            except TimeoutError:
                raise Overloaded("the relayed peer did not answer in time") from None
        except ProtocolError as exc:
            return _refusal_response(exc.code, str(exc))
        except (PeerUnreachable, OSError, aiohttp.ClientError):
            return web.Response(status=400, headers={REFUSAL_HEADER: "2"})
        finally:
            self.inflight.give(held)
        if kind == KIND_REFUSAL:
            code = int.from_bytes(payload[:2], "little") if len(payload) >= 2 else 14
            try:
                refusal = RefusalCode(code)
            except ValueError:
                refusal = RefusalCode.INTERNAL
            return web.Response(
                status=_STATUS.get(refusal, 400),
                headers={REFUSAL_HEADER: str(int(refusal))},
                text=payload[2:].decode(errors="replace"),
            )
        if not payload:
            return web.Response(status=204)
        return web.Response(status=200, body=payload, content_type=CONTENT_TYPE)

    # -- server side -----------------------------------------------------------------------
    async def _on_envelope(self, request: web.Request) -> web.StreamResponse:
        held = 0
        try:
            try:
                async with asyncio.timeout(self.config.body_timeout_s):
                    body = await read_body(
                        request.content,
                        request.content_length,
                        self.config.max_message_size,
                        self.inflight,
                        self._codec,
                    )
            except ProtocolError:
                self.refused += 1  # refused from its head, before _serve_envelope
                raise
            except TimeoutError:
                self.refused += 1
                log.info("event=body_timeout remote=%s", request.remote)
                if request.transport is not None:
                    request.transport.close()  # a trickling sender: drop the connection
                return web.Response(status=408, headers={REFUSAL_HEADER: "2"})
            held = len(body)
            reply = await self._serve_envelope(body)
        except ProtocolError as exc:
            log.debug("event=refused code=%d reason=%s", int(exc.code), exc)
            return _refusal_response(exc.code, str(exc))
        except (PeerUnreachable, OSError, aiohttp.ClientError):
            # The sender went away mid-body: nobody will read this answer.
            return web.Response(status=400, headers={REFUSAL_HEADER: "2"})
        finally:
            self.inflight.give(held)
        if not reply:
            return web.Response(status=204)
        return web.Response(status=200, body=reply, content_type=CONTENT_TYPE)

    async def _on_stream(self, request: web.Request) -> web.StreamResponse:
        """Serve one inbound stream, frames in order.

        Each ENVELOPE or POST frame is handled right here up to the handler's first suspension
        (gossip's handlers never suspend: no task at all); a frame whose handling suspends
        goes on in its own task, so a slow handler does not hold up the others.
        """
        if self._closed:
            return web.Response(status=503)
        ws = web.WebSocketResponse(
            protocols=(STREAM_PROTOCOL,),
            compress=False,
            heartbeat=2 * self.config.stream_heartbeat_s,
            timeout=self.config.shutdown_timeout_s,
            max_msg_size=_STREAM_MAX_FRAME + FRAME.size,
        )
        if not ws.can_prepare(request).ok:
            return web.Response(status=400, text="expected a murmur-stream-v1 WebSocket")
        if len(self._inbound) >= self.config.max_connections:
            log.info("event=stream_refused reason=too_many_streams remote=%s", request.remote)
            return web.Response(status=429, text="too many streams: use POST")
        await ws.prepare(request)
        self._inbound.add(ws)
        slots = asyncio.Semaphore(self.config.stream_max_inflight)
        budget = ByteBudget(self.config.max_connection_inflight)
        try:
            while True:
                await slots.acquire()
                msg = await ws.receive()
                data = msg.data
                if msg.type != WSMsgType.BINARY or len(data) < FRAME.size:
                    kind = 0
                else:
                    request_id, kind = FRAME.unpack_from(data)
                if (kind in (KIND_REPLY, KIND_REFUSAL)) and self._relay_answer(ws, data):
                    slots.release()
                    continue
                relay = kind in (KIND_RELAY, KIND_RELAY_POST)
                if kind != KIND_ENVELOPE and kind != KIND_POST and not relay:
                    slots.release()
                    if msg.type in (WSMsgType.BINARY, WSMsgType.TEXT):
                        log.debug("event=stream_garbage remote=%s", request.remote)
                        await ws.close(code=aiohttp.WSCloseCode.PROTOCOL_ERROR)
                    break
                size = len(data)
                try:
                    budget.take(size)
                    try:
                        self.inflight.take(size)
                    except Overloaded:
                        budget.give(size)
                        raise
                except Overloaded as exc:
                    slots.release()
                    if kind == KIND_ENVELOPE or relay:
                        await ws.send_bytes(refusal_frame(request_id, exc))
                    continue
                if relay:
                    try:
                        envelope = memoryview(data)[FRAME.size :]
                        self._relay_frame(ws, request_id, envelope, kind == KIND_RELAY_POST)
                    finally:
                        slots.release()
                        budget.give(size)
                        self.inflight.give(size)
                    continue
                rest = start_eagerly(
                    self._serve_frame(
                        ws,
                        request_id,
                        memoryview(data)[FRAME.size :],
                        slots,
                        kind == KIND_POST,
                        (budget, size),
                    )
                )
                if rest is not None:
                    task = asyncio.create_task(rest)
                    self._serving.add(task)
                    task.add_done_callback(self._serving.discard)
        finally:
            self._inbound.discard(ws)
            self._answers.pop(ws, None)
            client = self._relayed_ws.get(ws)
            if client is not None:
                self._unbind(client, NoRoute("the relayed peer's stream closed"))
                log.info("event=relay_ended peer=%s", client.peer.short())
        return ws

    async def _serve_frame(
        self,
        ws: web.WebSocketResponse,
        request_id: int,
        envelope: memoryview,
        slots: asyncio.Semaphore,
        one_way: bool,
        held: tuple[ByteBudget, int],
    ) -> None:
        """Handle one frame; answer an ENVELOPE always, a POST only with a refusal."""
        try:
            try:
                reply = await self._serve_envelope(
                    envelope, reply_wanted=not one_way, origin=ws, eager=True
                )
                if one_way:
                    return
                frame = FRAME.pack(request_id, KIND_REPLY) + reply
            except ProtocolError as exc:
                log.debug("event=refused code=%d reason=%s", int(exc.code), exc)
                frame = refusal_frame(request_id, exc)
            except Exception:  # a bug must not end the stream (frames are handled in its loop)
                log.exception("event=stream_frame_failed")
                frame = refusal_frame(
                    request_id, ProtocolError("internal error", code=RefusalCode.INTERNAL)
                )
            if not ws.closed:
                await ws.send_bytes(frame)
        except (ConnectionError, aiohttp.ClientError, RuntimeError):
            pass  # the sender went away: nobody will read this answer
        finally:
            slots.release()
            held[0].give(held[1])
            self.inflight.give(held[1])

    async def _close_io(self) -> None:
        for client in list(self._relayed.values()):
            self._unbind(client, NoRoute("the relay closed"))
        self._relays.clear()
        for task in list(self._connecting.values()):
            task.cancel()
        for task in list(self._serving):
            task.cancel()
        streams = list(self._streams.values())
        self._streams.clear()
        closed = TransportClosed("the transport was closed")
        await asyncio.gather(
            *(s.aclose(closed) for s in streams),
            *(ws.close(code=aiohttp.WSCloseCode.GOING_AWAY) for ws in list(self._inbound)),
            *self._connecting.values(),
            *self._serving,
            return_exceptions=True,
        )
        if self._stream_session is not None:
            await self._stream_session.close()
            self._stream_session = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def _refusal_response(code: RefusalCode, reason: str) -> web.Response:
    """The HTTP answer to a refused envelope: the code's status, the header, the reason."""
    return web.Response(
        status=_STATUS.get(code, 400),
        headers={REFUSAL_HEADER: str(int(code))},
        text=f"{code.name}: {reason}",
    )


def _noop() -> None:
    """A server-side writer's ``on_broken``: the stream's own read loop sees it end."""


def _expire(client: Relayed, request_id: int) -> None:
    """A forwarded request the relayed peer did not answer in time: stop waiting for it."""
    held = client.pending.pop(request_id, None)
    if held is not None and not held[0].done():
        held[0].set_exception(Overloaded("the relayed peer did not answer in time"))


def _refusal(address: str, status: int, header: str | None) -> NetworkError:
    """The error for a non-2xx answer: RemoteRefused with the peer's code, if it sent one."""
    try:
        code = RefusalCode(int(header)) if header is not None else None
    except ValueError:
        code = None
    if code is None:
        if status == 413:
            code = RefusalCode.TOO_LARGE
        elif status == 404 or status == 405:
            return PeerUnreachable(f"{address} is not a Murmur peer (HTTP {status})")
        else:
            code = RefusalCode.INTERNAL
    return RemoteRefused(f"{address} refused ({code.name}, HTTP {status})", code=code)
