"""A persistent envelope stream per peer address: a WebSocket on the transport's own port.

``GET /v1/stream`` upgrades to a WebSocket (subprotocol ``murmur-stream-v1``). Every WebSocket
message is one binary frame ``request id (u32 LE) | kind (u8) | payload``:

* client -> server, kind 1 ``ENVELOPE``: payload = one encoded envelope;
* server -> client, kind 2 ``REPLY``: the envelope was accepted; payload = the reply envelope,
  empty when there is none (a one-way send);
* server -> client, kind 3 ``REFUSAL``: payload = ``code (u16 LE) | "CODE_NAME: reason"``.

Replies are matched to requests by id, so many requests are in flight on one stream and a slow
handler does not hold up the others. Each envelope gets exactly the checks of the POST path
(``Transport._serve_envelope``). A frame that is not binary, too short or of an unknown kind
closes the stream; an undecodable envelope in a well-formed frame is refused like any other.
This module holds the framing and the client side; the server side is in ``http.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Callable

import aiohttp
from aiohttp import WSMsgType

from murmur.errors import (
    MessageTooLarge,
    NetworkError,
    PeerUnreachable,
    ProtocolError,
    RefusalCode,
    RemoteRefused,
)

__all__ = [
    "FRAME",
    "KIND_ENVELOPE",
    "KIND_REFUSAL",
    "KIND_REPLY",
    "STREAM_PATH",
    "STREAM_PROTOCOL",
    "ClientStream",
    "StreamGone",
    "refusal_frame",
]

log = logging.getLogger("murmur.transport")

STREAM_PATH = "/v1/stream"
STREAM_PROTOCOL = "murmur-stream-v1"
FRAME = struct.Struct("<IB")
"""Frame header: request id, kind."""
KIND_ENVELOPE = 1
KIND_REPLY = 2
KIND_REFUSAL = 3
_CODE = struct.Struct("<H")
_MAX_REASON = 200
_IDS = 1 << 32


class StreamGone(Exception):
    """The stream was closed before the frame was written: nothing reached the peer."""


def refusal_frame(request_id: int, exc: ProtocolError) -> bytes:
    """The REFUSAL frame for ``exc`` (its code and a short reason)."""
    reason = f"{exc.code.name}: {exc}".encode(errors="replace")[:_MAX_REASON]
    return FRAME.pack(request_id, KIND_REFUSAL) + _CODE.pack(int(exc.code)) + reason


def _refused(address: str, payload: memoryview) -> NetworkError:
    if len(payload) < _CODE.size:
        return RemoteRefused(f"{address} refused without a code", code=RefusalCode.INTERNAL)
    (value,) = _CODE.unpack_from(payload)
    try:
        code = RefusalCode(value)
    except ValueError:
        code = RefusalCode.INTERNAL
    reason = bytes(payload[_CODE.size :]).decode(errors="replace")
    return RemoteRefused(f"{address} refused ({code.name}): {reason}", code=code)


class ClientStream:
    """Our side of one stream to ``address``: sends envelopes, matches replies by request id.

    A reader task owns the receiving side; when the stream ends (peer closed, error, garbage)
    every pending request fails with ``PeerUnreachable`` (or ``MessageTooLarge`` for a reply
    over our cap) and ``on_close`` is called once.
    """

    def __init__(
        self,
        ws: aiohttp.ClientWebSocketResponse,
        address: str,
        on_close: Callable[[ClientStream], None],
    ) -> None:
        self.address = address
        self._ws = ws
        self._on_close = on_close
        self._pending: dict[int, asyncio.Future[memoryview]] = {}
        self._next_id = 0
        self._closed = False
        self._reader = asyncio.create_task(self._read(), name=f"murmur-stream {address}")

    @property
    def closed(self) -> bool:
        """Whether the stream ended (no new request can use it)."""
        return self._closed or self._ws.closed

    @property
    def idle(self) -> bool:
        """Whether no request is waiting for a reply."""
        return not self._pending

    async def exchange(self, data: bytes) -> memoryview:
        """Send one envelope; return the reply payload (empty: accepted, no reply).

        Raises ``StreamGone`` if nothing could be written, ``RemoteRefused`` for a refusal,
        ``PeerUnreachable`` if the stream ended while waiting. The caller bounds the wait.
        """
        if self.closed:
            raise StreamGone(self.address)
        request_id = self._next_id
        self._next_id = (request_id + 1) % _IDS
        future: asyncio.Future[memoryview] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            try:
                await self._ws.send_bytes(FRAME.pack(request_id, KIND_ENVELOPE) + data)
            except (ConnectionError, aiohttp.ClientError, RuntimeError):
                raise StreamGone(self.address) from None
            return await future
        finally:
            self._pending.pop(request_id, None)

    async def _read(self) -> None:
        error: NetworkError | ProtocolError = PeerUnreachable(
            f"the stream to {self.address} closed"
        )
        try:
            while True:
                msg = await self._ws.receive()
                if msg.type != WSMsgType.BINARY:
                    if msg.type == WSMsgType.ERROR and isinstance(msg.data, Exception):
                        if getattr(msg.data, "code", None) == aiohttp.WSCloseCode.MESSAGE_TOO_BIG:
                            error = MessageTooLarge(f"a reply from {self.address} is too large")
                    elif msg.type == WSMsgType.TEXT:
                        log.debug("event=stream_garbage address=%s", self.address)
                    break
                data: bytes = msg.data
                if len(data) < FRAME.size:
                    log.debug("event=stream_garbage address=%s", self.address)
                    break
                request_id, kind = FRAME.unpack_from(data)
                future = self._pending.get(request_id)
                if future is None or future.done():
                    continue  # the reply to a request that timed out
                payload = memoryview(data)[FRAME.size :]
                if kind == KIND_REPLY:
                    future.set_result(payload)
                elif kind == KIND_REFUSAL:
                    future.set_exception(_refused(self.address, payload))
                else:
                    log.debug("event=stream_garbage address=%s kind=%d", self.address, kind)
                    break
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the reader must end cleanly whatever aiohttp raised
            log.debug("event=stream_failed address=%s error=%r", self.address, exc)
        finally:
            self._finish(error)

    def _finish(self, error: NetworkError | ProtocolError) -> None:
        if not self._closed:
            self._closed = True
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(error)
            self._on_close(self)

    async def aclose(self) -> None:
        """Close the WebSocket and stop the reader; pending requests fail."""
        self._finish(PeerUnreachable(f"the stream to {self.address} was closed"))
        with contextlib.suppress(ConnectionError, aiohttp.ClientError, RuntimeError, TimeoutError):
            await self._ws.close()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
