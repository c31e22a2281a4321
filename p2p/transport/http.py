"""The real transport: envelopes over HTTP/1.1 with aiohttp, one endpoint, ``POST /v1/envelope``.

The request body is the encoded envelope; the response is ``200`` with the reply envelope,
``204`` when there is no reply, or a refusal: an HTTP error status with the ``RefusalCode`` in
the ``Murmur-Refusal`` header. One ``ClientSession`` (connection reuse) serves all sends.
aiohttp errors become ``murmur.errors`` types here and nowhere else.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import Payload

from murmur.errors import (
    ConfigError,
    MessageTooLarge,
    NetworkError,
    PeerUnreachable,
    ProtocolError,
    RefusalCode,
    RemoteRefused,
    Timeout,
)
from p2p.config import HttpTransportConfig, format_address, parse_address
from p2p.envelope import EnvelopeCodec
from p2p.identity import PeerId
from p2p.transport.base import Transport

__all__ = [
    "ENVELOPE_PATH",
    "REFUSAL_HEADER",
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
}


_WRITE_CHUNK = 1 << 20


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


async def read_body(content: aiohttp.StreamReader, length: int | None, cap: int) -> bytearray:
    """Read a whole body into one buffer, refusing more than ``cap`` bytes.

    With a known length the buffer is allocated once and filled in place (no growth, no final
    copy); decoded tensors can then point into it.
    """
    if length is not None:
        if length > cap:
            raise MessageTooLarge(f"body of {length} bytes exceeds the cap of {cap}")
        buf = bytearray(length)
        view = memoryview(buf)
        pos = 0
        while pos < length:
            chunk = await content.readany()
            if not chunk:
                raise PeerUnreachable("the body ended early")
            end = pos + len(chunk)
            if end > length:
                raise MessageTooLarge("the body is longer than its Content-Length")
            view[pos:end] = chunk
            pos = end
        view.release()
        return buf
    buf = bytearray()
    while chunk := await content.readany():
        buf += chunk
        if len(buf) > cap:
            raise MessageTooLarge(f"body exceeds the cap of {cap} bytes")
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
        super().__init__(codec, default_timeout_s=self.config.request_timeout_s, admit=admit)
        self._listen = parse_address(listen)
        self._advertise = tuple(advertise)
        for address in self._advertise:
            parse_address(address)
        self._app = web.Application(client_max_size=self.config.max_message_size)
        self._app.router.add_post(ENVELOPE_PATH, self._on_envelope)
        self._app.router.add_routes(list(routes))
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
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

    async def start(self) -> None:
        """Listen on the configured address; ConfigError if it cannot (e.g. port in use)."""
        self._check_open()
        host, port = self._listen
        runner = web.AppRunner(
            self._app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=self.config.shutdown_timeout_s,
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

    async def _post(self, address: str, data: bytes, timeout: float) -> bytes | bytearray:
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

    # -- server side -----------------------------------------------------------------------
    async def _on_envelope(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await read_body(
                request.content, request.content_length, self.config.max_message_size
            )
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
        if not reply:
            return web.Response(status=204)
        return web.Response(status=200, body=reply, content_type=CONTENT_TYPE)

    async def _close_io(self) -> None:
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
