"""A persistent envelope stream per peer address: a WebSocket on the transport's own port.

``GET /v1/stream`` upgrades to a WebSocket (subprotocol ``murmur-stream-v1``). Every WebSocket
message is one binary frame ``request id (u32 LE) | kind (u8) | payload``:

* client -> server, kind 1 ``ENVELOPE``: payload = one encoded envelope; the server answers with
  kind 2 or 3;
* server -> client, kind 2 ``REPLY``: the envelope was accepted; payload = the reply envelope,
  empty when there is none (a one-way send);
* server -> client, kind 3 ``REFUSAL``: payload = ``code (u16 LE) | "CODE_NAME: reason"``;
* client -> server, kind 4 ``POST``: payload = one encoded envelope, one-way: the server answers
  only when it refused the envelope (or its handler failed), with a kind 3 frame naming the id;
  silence is success, and a handler's reply to a post is dropped;
* client -> server, kinds 5 ``RELAY`` and 6 ``RELAY_POST``: like 1 and 4, for an envelope the
  server is to forward to a peer it relays for (``p2p.transport.relay``);
* server -> client, kind 1 on a *relay stream* (one whose client asked the server to relay for
  it): an envelope the server forwards to the client, answered by the client with kind 2 or 3.

Replies are matched to requests by id, so many requests are in flight on one stream and a slow
handler does not hold up the others. Each envelope gets exactly the checks of the POST path
(``Transport._serve_envelope``). A frame that is not binary, too short or of an unknown kind
closes the stream; an undecodable envelope in a well-formed frame is refused like any other.

Frames are written in the order ``exchange`` and ``post`` are called, without a task
(``FrameWriter``): the write is started in the caller and completes at once unless the socket is
congested; then that frame's flow-control wait, and every frame written after it, go to one
drain task per stream. This module holds the framing and the client side; the server side is in
``http.py``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import struct
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp
from aiohttp import WSMsgType

from floor.errors import (
    MessageTooLarge,
    MurmurError,
    NetworkError,
    PeerUnreachable,
    ProtocolError,
    RefusalCode,
    RemoteRefused,
)

__all__ = [
    "FRAME",
    "KIND_ENVELOPE",
    "KIND_POST",
    "KIND_REFUSAL",
    "KIND_RELAY",
    "KIND_RELAY_POST",
    "KIND_REPLY",
    "MAX_BACKLOG_BYTES",
    "STREAM_PATH",
    "STREAM_PROTOCOL",
    "ClientStream",
    "FrameWriter",
    "PostFailure",
    "StreamGone",
    "refusal_frame",
    "start_eagerly",
]

log = logging.getLogger("murmur.transport")

STREAM_PATH = "/v1/stream"
STREAM_PROTOCOL = "murmur-stream-v1"
FRAME = struct.Struct("<IB")
"""Frame header: request id, kind."""
KIND_ENVELOPE = 1
KIND_REPLY = 2
KIND_REFUSAL = 3
KIND_POST = 4
KIND_RELAY = 5
KIND_RELAY_POST = 6
_CODE = struct.Struct("<H")
_MAX_REASON = 200
_IDS = 1 << 32
MAX_BACKLOG_BYTES = 32 * 2**20
"""Frame bytes a congested stream queues before new posts to it fail at once."""

PostFailure = Callable[[Any, MurmurError], None]
"""``on_failure(message, error)`` of a one-way post (``gossip.network.Poster``)."""


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


def start_eagerly(coro: Coroutine[Any, Any, None]) -> Coroutine[Any, Any, None] | None:
    """Run ``coro`` up to its first suspension in the caller, as an eager task would.

    Returns None when it finished there (the common case: nothing to schedule), else a coroutine
    that drives it to its end, to run as a task. Exceptions of the first step propagate.
    The first step runs in the *caller's* task: whatever it binds to the current task (an
    ``asyncio.timeout``, a ``TaskGroup``) binds to the caller, so it must suspend before any
    such thing (``Transport._serve_envelope(eager=True)`` does for handlers not inline).
    """
    try:
        yielded = coro.send(None)
    except StopIteration:
        return None
    return _resume(coro, yielded)


async def _resume(coro: Coroutine[Any, Any, None], yielded: Any) -> None:
    """Drive a coroutine that suspended on ``yielded`` (a future, or None) to its end, as
    its task: a cancellation of this task (a timeout the coroutine set after its first step,
    a close) cancels the future it waits on and is thrown into it, as ``Task`` does."""
    while True:
        try:
            if yielded is None:
                await asyncio.sleep(0)
            else:
                await asyncio.wait((yielded,))
                yielded._asyncio_future_blocking = False
        except asyncio.CancelledError as exc:
            if yielded is not None:
                yielded._asyncio_future_blocking = False
                yielded.cancel()
            try:
                yielded = coro.throw(exc)
            except StopIteration:
                return
            continue
        try:
            yielded = coro.send(None)
        except StopIteration:
            return


_WRITE_ERRORS = (ConnectionError, aiohttp.ClientError, RuntimeError)


class FrameWriter:
    """Writes frames to one WebSocket (either end) in call order, without a task when it can.

    ``write`` starts the send in the caller; it completes at once unless the socket is
    congested, and then that frame's flow-control wait, and every frame written after it, go
    to one drain task. ``on_broken`` is called once if a queued write fails.
    """

    __slots__ = ("_on_broken", "_ws", "backlog", "backlog_bytes", "drain", "name")

    def __init__(
        self,
        ws: aiohttp.ClientWebSocketResponse | Any,
        name: str,
        on_broken: Callable[[], None],
    ) -> None:
        self._ws = ws
        self.name = name
        self.backlog: collections.deque[bytes] = collections.deque()
        self.backlog_bytes = 0
        self.drain: asyncio.Task[None] | None = None
        self._on_broken = on_broken

    @property
    def closed(self) -> bool:
        """Whether the WebSocket is closed."""
        return bool(self._ws.closed)

    def congested(self, size: int) -> bool:
        """Whether ``size`` more bytes would take the queue over ``MAX_BACKLOG_BYTES``."""
        return self.backlog_bytes + size > MAX_BACKLOG_BYTES

    def write(self, frame: bytes) -> None:
        """Write ``frame`` now, or queue it behind a congested socket; StreamGone if closed."""
        if self._ws.closed:
            raise StreamGone(self.name)
        if self.drain is not None:
            self.backlog.append(frame)
            self.backlog_bytes += len(frame)
            return
        try:
            rest = start_eagerly(self._ws.send_bytes(frame))
        except _WRITE_ERRORS:
            raise StreamGone(self.name) from None
        if rest is not None:
            # The frame is in the socket's buffer; the socket is congested. Later frames queue
            # behind the flow-control wait, so they keep their order.
            self.drain = asyncio.create_task(self._flush(rest), name=f"murmur-drain {self.name}")

    async def _flush(self, rest: Coroutine[Any, Any, None]) -> None:
        try:
            await rest
            while self.backlog and not self._ws.closed:
                frame = self.backlog.popleft()
                self.backlog_bytes -= len(frame)
                await self._ws.send_bytes(frame)
        except _WRITE_ERRORS as exc:
            log.debug("event=stream_write_failed stream=%s error=%r", self.name, exc)
            self._on_broken()
            with contextlib.suppress(*_WRITE_ERRORS, TimeoutError):
                await self._ws.close()
        finally:
            self.backlog.clear()
            self.backlog_bytes = 0
            self.drain = None


ReverseServe = Callable[["ClientStream", int, memoryview], None]
"""``serve(stream, request id, envelope)``: handle a frame the server sent on a relay stream."""


class ClientStream:
    """Our side of one stream to ``address``: sends envelopes, matches replies by request id.

    A reader task owns the receiving side; when the stream ends (peer closed, error, garbage)
    every pending request fails with ``PeerUnreachable`` (or ``MessageTooLarge`` for a reply
    over our cap), so does every post still within its timeout that asked to hear of failures,
    and ``on_close`` is called once.
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
        self._posts: dict[int, tuple[Any, PostFailure, float]] = {}
        self._expiry: collections.deque[tuple[float, int]] = collections.deque()
        self._writer = FrameWriter(ws, address, self._broken)
        self.serve: ReverseServe | None = None
        """Set on a relay stream: handles the envelopes the server forwards to us."""
        self._next_id = 0
        self._closed = False
        self._loop = asyncio.get_running_loop()
        self._reader = asyncio.create_task(self._read(), name=f"murmur-stream {address}")

    @property
    def closed(self) -> bool:
        """Whether the stream ended (no new request can use it)."""
        return self._closed or self._ws.closed

    @property
    def idle(self) -> bool:
        """Whether no request waits for a reply and no post can still be refused."""
        self._expire()
        return (
            not self._pending
            and not self._posts
            and self._writer.drain is None
            and self.serve is None  # a relay stream is never idle
        )

    def _take_id(self) -> int:
        request_id = self._next_id
        self._next_id = (request_id + 1) % _IDS
        return request_id

    # -- writing ---------------------------------------------------------------------------
    def _write(self, frame: bytes) -> None:
        """Write ``frame`` in order (``FrameWriter``); StreamGone if the stream ended."""
        if self._closed:
            raise StreamGone(self.address)
        self._writer.write(frame)

    def write_answer(self, frame: bytes) -> None:
        """Write the answer to a frame the server sent (relay streams); dropped if closed."""
        with contextlib.suppress(StreamGone):
            self._write(frame)

    def _broken(self) -> None:
        self._finish(PeerUnreachable(f"the stream to {self.address} broke while writing"))

    async def exchange(self, data: bytes, kind: int = KIND_ENVELOPE) -> memoryview:
        """Send one envelope; return the reply payload (empty: accepted, no reply).

        Raises ``StreamGone`` if nothing could be written, ``RemoteRefused`` for a refusal,
        ``PeerUnreachable`` if the stream ended while waiting. The caller bounds the wait.
        """
        request_id = self._take_id()
        self._write(FRAME.pack(request_id, kind) + data)
        future: asyncio.Future[memoryview] = self._loop.create_future()
        self._pending[request_id] = future
        try:
            return await future
        finally:
            self._pending.pop(request_id, None)

    def congested(self, size: int) -> bool:
        """Whether ``size`` more bytes would take the queue of a congested stream over its cap
        (``MAX_BACKLOG_BYTES``): the peer has not been reading for a while."""
        return self._writer.congested(size)

    def post(
        self,
        data: bytes,
        message: Any,
        deadline: float,
        on_failure: PostFailure | None,
        kind: int = KIND_POST,
    ) -> bool:
        """Send one envelope one-way (kind ``POST``); False if the stream cannot take it.

        No task and no future: the frame is written at once. If the peer refuses it by
        ``deadline`` (the loop's clock), or the stream ends before then,
        ``on_failure(message, error)`` is called (from the stream's reader): ``RemoteRefused``
        with the peer's code, ``PeerUnreachable`` for a stream that ended (the post may or may
        not have been handled). A refusal that arrives after the deadline may go unreported.
        """
        if self.closed:
            return False
        request_id = self._take_id()
        try:
            self._write(FRAME.pack(request_id, kind) + data)
        except StreamGone:
            return False
        if on_failure is not None:
            self._expire()
            self._posts[request_id] = (message, on_failure, deadline)
            self._expiry.append((deadline, request_id))
        return True

    def _expire(self) -> None:
        """Forget posts past their deadline (their refusals are no longer reported)."""
        expiry = self._expiry
        if not expiry:
            return
        now = self._loop.time()
        posts = self._posts
        while expiry and expiry[0][0] < now:
            posts.pop(expiry.popleft()[1], None)

    # -- reading ---------------------------------------------------------------------------
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
                if kind == KIND_ENVELOPE and self.serve is not None:
                    self.serve(self, request_id, memoryview(data)[FRAME.size :])
                    continue
                if kind != KIND_REPLY and kind != KIND_REFUSAL:
                    log.debug("event=stream_garbage address=%s kind=%d", self.address, kind)
                    break
                payload = memoryview(data)[FRAME.size :]
                future = self._pending.get(request_id)
                if future is None:
                    posted = self._posts.pop(request_id, None)
                    if posted is not None and kind == KIND_REFUSAL:
                        _call(posted, _refused(self.address, payload))
                    continue  # else the reply to a request that timed out, or a late refusal
                if future.done():
                    continue
                if kind == KIND_REPLY:
                    future.set_result(payload)
                else:
                    future.set_exception(_refused(self.address, payload))
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
            now = self._loop.time()
            posts = [p for p in self._posts.values() if p[2] >= now]
            self._posts.clear()
            self._expiry.clear()
            for posted in posts:
                _call(posted, error)
            self._on_close(self)

    async def aclose(self, error: NetworkError | None = None) -> None:
        """Close the WebSocket and stop the reader; pending requests and posts fail with
        ``error`` (default ``PeerUnreachable``)."""
        self._finish(error or PeerUnreachable(f"the stream to {self.address} was closed"))
        with contextlib.suppress(ConnectionError, aiohttp.ClientError, RuntimeError, TimeoutError):
            await self._ws.close()
        drain = self._writer.drain
        tasks = [self._reader] if drain is None else [self._reader, drain]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _call(posted: tuple[Any, PostFailure, float], error: MurmurError) -> None:
    message, on_failure, _ = posted
    try:
        on_failure(message, error)
    except Exception:  # a failing callback must not end the stream's reader
        log.exception("event=post_callback_failed")
