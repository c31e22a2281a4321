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
import ipaddress
import logging
import socket
from collections import OrderedDict
from collections.abc import Callable, Iterable

import aiohttp
from aiohttp import WSMsgType, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import Payload

from floor.envelope import EnvelopeCodec
from floor.errors import (
    ConfigError,
    MessageTooLarge,
    NetworkError,
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
from p2p.transport.stream import (
    FRAME,
    KIND_ENVELOPE,
    KIND_POST,
    KIND_REPLY,
    STREAM_PATH,
    STREAM_PROTOCOL,
    ClientStream,
    StreamGone,
    refusal_frame,
    start_eagerly,
)

__all__ = [
    "ENVELOPE_PATH",
    "REFUSAL_HEADER",
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
}


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
        self._app = web.Application(client_max_size=self.config.max_message_size)
        self._app.router.add_post(ENVELOPE_PATH, self._on_envelope)
        self._app.router.add_get(STREAM_PATH, self._on_stream)
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

    @property
    def addresses(self) -> tuple[str, ...]:
        """Advertised addresses if given, else the bound ``HOST:PORT`` (after ``start()``)."""
        return self._advertise or self._bound

    def is_valid_address(self, address: str) -> bool:
        """Whether ``address`` is a well-formed ``HOST:PORT`` with a non-zero port."""
        try:
            return parse_address(address)[1] != 0
        except ConfigError:
            return False

    def accepts_address(self, address: str) -> bool:
        """Whether a record may name ``address``: well-formed, and not an unspecified,
        link-local, multicast, broadcast or reserved IP (nor loopback, unless this network
        runs on loopback). Host names are taken: their first contact is a probe like any."""
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
                            return await stream.exchange(data)
                        except StreamGone:
                            continue
            except TimeoutError:
                raise Timeout(f"no answer from {address} within {timeout:g} s") from None
            timeout = max(deadline - loop.time(), 1e-3)
        return await self._post_http(address, data, timeout)

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
            stream = streams.get(address)
            if stream is None or stream.closed:
                continue
            if stream.congested(len(data)):  # the peer stopped reading: do not queue more
                if on_failure is not None:
                    on_failure(message, PeerUnreachable(f"the stream to {address} is congested"))
                return True
            deadline = asyncio.get_running_loop().time() + timeout
            if not stream.post(data, message, deadline, on_failure):
                return False
            streams.move_to_end(address)
            self.bytes_sent += len(data)
            return True
        return False

    async def _post_probe(
        self, address: str, data: bytes, timeout: float
    ) -> bytes | bytearray | memoryview:
        """A probe is one POST: an address not yet proven never gets a WebSocket upgrade."""
        return await self._post_http(address, data, timeout)

    async def _post_http(self, address: str, data: bytes, timeout: float) -> bytes | bytearray:
        url = f"http://{address}{ENVELOPE_PATH}"
        session = self._client()
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
            return web.Response(
                status=_STATUS.get(exc.code, 400),
                headers={REFUSAL_HEADER: str(int(exc.code))},
                text=f"{exc.code.name}: {exc}",
            )
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
                if kind != KIND_ENVELOPE and kind != KIND_POST:
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
                    if kind == KIND_ENVELOPE:
                        await ws.send_bytes(refusal_frame(request_id, exc))
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
                reply = await self._serve_envelope(envelope, reply_wanted=not one_way)
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
