"""The persistent envelope stream of HttpTransport (GET /v1/stream): reuse, reconnects, refusals,
peers closing mid-request, garbage frames, many requests in flight, and the POST fallback."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
import torch

from floor.envelope import Auth, EnvelopeCodec, Received
from floor.errors import (
    ConfigError,
    OutOfStage,
    PeerUnreachable,
    RefusalCode,
    RemoteRefused,
    Timeout,
)
from floor.identity import Identity
from p2p.messages import Ping, Pong
from p2p.transport.http import HttpTransport, HttpTransportConfig
from p2p.transport.stream import FRAME, KIND_ENVELOPE, KIND_REFUSAL, STREAM_PATH, STREAM_PROTOCOL
from tests.test_transport_conformance import REGISTRY, Blob

MAKE = Callable[..., Awaitable[HttpTransport]]


@pytest.fixture
async def make() -> AsyncIterator[MAKE]:
    """Factory of started HttpTransports (seeded identities); all closed after the test."""
    made: list[HttpTransport] = []

    async def factory(
        seed: int,
        *,
        listen: str = "127.0.0.1:0",
        max_message_size: int = 64 * 2**20,
        **config: object,
    ) -> HttpTransport:
        identity = Identity.from_seed(bytes([seed]) * 32)
        codec = EnvelopeCodec(identity, max_message_size=max_message_size, message_types=REGISTRY)
        cfg = dataclasses.replace(
            HttpTransportConfig(request_timeout_s=5.0, max_message_size=max_message_size),
            **config,
        )
        transport = HttpTransport(codec, listen=listen, config=cfg)
        await transport.start()
        made.append(transport)
        return transport

    yield factory
    for transport in made:
        await transport.aclose()


def introduce(a: HttpTransport, b: HttpTransport) -> None:
    a.set_addresses(b.local_id, b.addresses, verified=True)
    b.set_addresses(a.local_id, a.addresses, verified=True)


async def pong(received: Received) -> Pong:
    assert isinstance(received.message, Ping)
    return Pong(seq=received.message.seq)


def pong_after(release: asyncio.Event) -> Callable[[Received], Awaitable[Pong]]:
    """A Ping handler that holds Ping 0 until ``release`` is set and answers others at once."""

    async def handler(received: Received) -> Pong:
        assert isinstance(received.message, Ping)
        if received.message.seq == 0:
            await release.wait()
        return Pong(seq=received.message.seq)

    return handler


def streams(t: HttpTransport) -> int:
    """Open outbound streams of ``t``."""
    return len(t._streams)


def inbound(t: HttpTransport) -> int:
    """Open inbound streams of ``t``."""
    return len(t._inbound)


async def test_requests_and_sends_share_one_stream(make: MAKE) -> None:
    a, b = await make(1), await make(2)
    introduce(a, b)
    b.register(Ping, pong)
    for seq in range(5):
        reply = await a.request(b.local_id, Ping(seq=seq), auth=Auth.MAC)
        assert reply.message == Pong(seq=seq) and reply.auth == Auth.MAC
    got: list[int] = []

    async def keep(received: Received) -> None:
        assert isinstance(received.message, Blob)
        got.append(received.message.tag)

    b.register(Blob, keep)
    await a.send(b.local_id, Blob(tag=3, data=torch.arange(100.0)))
    assert got == [3]
    assert streams(a) == 1 and inbound(b) == 1
    assert b.accepted == 6 and b.refused == 0


async def test_large_envelopes_go_by_post_and_arrive_intact(make: MAKE) -> None:
    a, b = await make(1, stream_max_body=4096), await make(2)
    introduce(a, b)
    got: list[torch.Tensor] = []

    async def keep(received: Received) -> None:
        assert isinstance(received.message, Blob)
        got.append(received.message.data)

    b.register(Blob, keep)
    data = torch.rand(50_000)
    await a.send(b.local_id, Blob(tag=1, data=data), auth=Auth.MAC)
    assert torch.equal(got[0], data)
    assert streams(a) == 0 and inbound(b) == 0  # nothing was small enough for the stream
    await a.send(b.local_id, Blob(tag=2, data=torch.rand(10)), auth=Auth.MAC)
    assert streams(a) == 1 and len(got) == 2


async def test_reconnects_after_the_peer_restarts(make: MAKE) -> None:
    a, b = await make(1), await make(2)
    introduce(a, b)
    b.register(Ping, pong)
    assert (await a.request(b.local_id, Ping(seq=1))).message == Pong(seq=1)
    address = b.addresses[0]
    await b.aclose()
    with pytest.raises(PeerUnreachable):  # nobody listens now
        await a.request(b.local_id, Ping(seq=2))
    b2 = await make(2, listen=address)  # same identity, same port
    b2.register(Ping, pong)
    assert (await a.request(b.local_id, Ping(seq=3))).message == Pong(seq=3)
    assert streams(a) == 1 and inbound(b2) == 1


async def test_refusal_codes_come_back_typed(make: MAKE) -> None:
    a, b = await make(1), await make(2)
    introduce(a, b)

    async def refuse(received: Received) -> Pong:
        raise OutOfStage("not now")

    async def broken(received: Received) -> None:
        raise ValueError("bug")

    b.register(Ping, refuse)
    b.register(Blob, broken)
    with pytest.raises(RemoteRefused) as info:
        await a.request(b.local_id, Ping(seq=1))
    assert info.value.code == RefusalCode.OUT_OF_STAGE
    with pytest.raises(RemoteRefused) as info:
        await a.send(b.local_id, Blob(tag=1, data=torch.zeros(4)))
    assert info.value.code == RefusalCode.INTERNAL
    with pytest.raises(RemoteRefused) as info:  # no handler
        await b.request(a.local_id, Ping(seq=1))
    assert info.value.code == RefusalCode.UNKNOWN_TYPE
    assert streams(a) == 1 and b.refused == 2  # refusals do not end the stream


async def test_envelope_over_the_receivers_cap_is_too_large(make: MAKE) -> None:
    a, b = await make(1), await make(2, max_message_size=4096)
    introduce(a, b)
    b.register(Blob, pong)  # never reached
    with pytest.raises(RemoteRefused) as info:
        await a.send(b.local_id, Blob(tag=1, data=torch.zeros(4000)), auth=Auth.MAC)
    assert info.value.code == RefusalCode.TOO_LARGE
    assert streams(a) == 1  # it went over the stream and was refused there


async def test_network_key_is_checked_on_the_stream(make: MAKE) -> None:
    a = await make(1)
    codec = EnvelopeCodec(
        Identity.from_seed(b"\x02" * 32), network_key=b"k" * 32, message_types=REGISTRY
    )
    b = HttpTransport(codec, config=HttpTransportConfig(request_timeout_s=5.0))
    await b.start()
    try:
        introduce(a, b)
        b.register(Ping, pong)
        with pytest.raises(RemoteRefused) as info:
            await a.request(b.local_id, Ping(seq=1))
        assert info.value.code == RefusalCode.UNAUTHORIZED
        assert streams(a) == 1 and b.accepted == 0
    finally:
        await b.aclose()


async def test_peer_closing_mid_request_fails_it_as_unreachable(make: MAKE) -> None:
    a, b = await make(1), await make(2)
    introduce(a, b)
    entered = asyncio.Event()

    async def stuck(received: Received) -> Pong:
        entered.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    b.register(Ping, stuck)
    pending = asyncio.ensure_future(a.request(b.local_id, Ping(seq=1), timeout=60))
    await entered.wait()
    await b.aclose()
    with pytest.raises(PeerUnreachable):  # not a Timeout after 60 s
        await pending
    assert streams(a) == 0


async def test_a_timed_out_request_leaves_the_stream_usable(make: MAKE) -> None:
    a, b = await make(1), await make(2)
    introduce(a, b)
    release = asyncio.Event()
    b.register(Ping, pong_after(release))
    with pytest.raises(Timeout):
        await a.request(b.local_id, Ping(seq=0), timeout=0.2)
    release.set()  # its late reply arrives and is dropped
    for seq in range(1, 4):
        assert (await a.request(b.local_id, Ping(seq=seq))).message == Pong(seq=seq)
    assert streams(a) == 1


async def test_a_handler_on_a_stream_owns_its_timeouts(make: MAKE) -> None:
    """A stream runs a frame's first step in its reading task; a handler that sets a timeout
    must still get its own TimeoutError (the first CI failure of the relays: a dial-back's
    timeout cancelled the stream's task instead, and the handler waited forever)."""
    a, b = await make(1), await make(2)
    introduce(a, b)
    outcomes: list[str] = []
    reader: list[asyncio.Task[object] | None] = []

    async def slow(received: Received) -> Pong:
        assert isinstance(received.message, Ping)
        reader.append(asyncio.current_task())
        try:
            async with asyncio.timeout(0.1):
                await asyncio.Event().wait()
        except TimeoutError:
            outcomes.append("timed out")
        return Pong(seq=received.message.seq)

    b.register(Ping, slow)
    for seq in range(3):
        reply = await a.request(b.local_id, Ping(seq=seq), timeout=5.0)
        assert reply.message == Pong(seq=seq)
    assert outcomes == ["timed out"] * 3
    assert streams(a) == 1 and inbound(b) == 1  # the stream's reading task was not cancelled
    assert len({id(t) for t in reader}) == 3  # each handler ran in a task of its own


async def test_an_inline_handler_runs_without_a_task_and_may_request_in_a_task(
    make: MAKE,
) -> None:
    """``inline=True`` handlers run in the stream's reading task; a handler that makes a
    request of its own (bound to its task) works on a stream when it is not inline."""
    a, b = await make(1), await make(2)
    introduce(a, b)
    a.register(Ping, pong)
    tasks: list[asyncio.Task[object] | None] = []

    async def relay_ping(received: Received) -> None:
        assert isinstance(received.message, Blob)
        tasks.append(asyncio.current_task())
        reply = await b.request(a.local_id, Ping(seq=received.message.tag), timeout=5.0)
        assert reply.message == Pong(seq=received.message.tag)

    async def count(received: Received) -> None:
        tasks.append(asyncio.current_task())

    b.register(Blob, relay_ping)
    b.register(Pong, count, inline=True)
    await a.send(b.local_id, Blob(tag=7, data=torch.zeros(1)))
    await a.send(b.local_id, Pong(seq=1))
    await a.send(b.local_id, Pong(seq=2))
    # Both Pongs ran in the same (reading) task; the Blob handler in another.
    assert tasks[1] is tasks[2] and tasks[0] is not tasks[1]
    assert b.refused == 0


async def test_many_requests_in_flight_on_one_stream_match_their_replies(make: MAKE) -> None:
    a, b = await make(1), await make(2, stream_max_inflight=16)
    introduce(a, b)
    rng = random.Random(5)

    async def shuffled(received: Received) -> Pong:
        assert isinstance(received.message, Ping)
        await asyncio.sleep(rng.random() * 0.01)  # replies come back out of order
        return Pong(seq=received.message.seq)

    b.register(Ping, shuffled)
    replies = await asyncio.gather(*(a.request(b.local_id, Ping(seq=i)) for i in range(300)))
    assert [r.message for r in replies] == [Pong(seq=i) for i in range(300)]
    assert streams(a) == 1 and inbound(b) == 1 and b.accepted == 300


async def _raw_stream(
    address: str,
) -> tuple[aiohttp.ClientSession, aiohttp.ClientWebSocketResponse]:
    session = aiohttp.ClientSession()
    ws = await session.ws_connect(f"http://{address}{STREAM_PATH}", protocols=(STREAM_PROTOCOL,))
    return session, ws


@pytest.mark.parametrize(
    "garbage",
    [
        "text",
        b"",
        b"\x01\x00",  # shorter than a frame header
        FRAME.pack(7, 9) + b"x" * 20,  # unknown kind
        "raw",  # bytes that are not a WebSocket frame at all
    ],
)
async def test_garbage_frames_close_the_stream_and_the_peer_keeps_serving(
    make: MAKE, garbage: str | bytes
) -> None:
    a, b = await make(1), await make(2)
    introduce(a, b)
    b.register(Ping, pong)
    session, ws = await _raw_stream(b.addresses[0])
    try:
        if garbage == "text":
            await ws.send_str("hello")
        elif garbage == "raw":
            transport = ws._writer.transport  # write below the WebSocket framing
            transport.write(b"\xff" * 64)
        else:
            assert isinstance(garbage, bytes)
            await ws.send_bytes(garbage)
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    finally:
        await ws.close()
        await session.close()
    assert (await a.request(b.local_id, Ping(seq=1))).message == Pong(seq=1)


async def test_a_garbage_envelope_in_a_good_frame_is_refused(make: MAKE) -> None:
    b = await make(2)
    b.register(Ping, pong)
    session, ws = await _raw_stream(b.addresses[0])
    try:
        for request_id, junk in ((5, b"MRM" + bytes(60)), (6, b"not an envelope")):
            await ws.send_bytes(FRAME.pack(request_id, KIND_ENVELOPE) + junk)
            msg = await asyncio.wait_for(ws.receive(), 5)
            assert msg.type == aiohttp.WSMsgType.BINARY
            rid, kind = FRAME.unpack_from(msg.data)
            (code,) = struct.unpack_from("<H", msg.data, FRAME.size)
            assert (rid, kind) == (request_id, KIND_REFUSAL)
            assert code in (RefusalCode.MALFORMED, RefusalCode.UNSUPPORTED_VERSION)
    finally:
        await ws.close()
        await session.close()
    assert b.refused == 2 and b.accepted == 0


async def test_close_with_open_streams_leaves_no_tasks(make: MAKE) -> None:
    a, b = await make(1), await make(2)
    introduce(a, b)
    b.register(Ping, pong)
    a.register(Ping, pong)
    await asyncio.gather(*(a.request(b.local_id, Ping(seq=i)) for i in range(5)))
    await asyncio.gather(*(b.request(a.local_id, Ping(seq=i)) for i in range(5)))
    release = asyncio.Event()

    async def stuck(received: Received) -> None:
        await release.wait()

    b.register(Blob, stuck)
    pending = asyncio.ensure_future(a.send(b.local_id, Blob(tag=1, data=torch.zeros(4))))
    await asyncio.sleep(0.05)
    await b.aclose()
    await a.aclose()
    with pytest.raises((PeerUnreachable, Timeout)):
        await pending
    await asyncio.sleep(0)
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert others == []


async def test_a_peer_without_the_stream_endpoint_is_reached_by_post(make: MAKE) -> None:
    from aiohttp import web

    b = await make(2)
    b.register(Ping, pong)
    target = b.addresses[0]

    async def forward(request: web.Request) -> web.Response:  # an "old" peer: POST only
        async with (
            aiohttp.ClientSession() as s,
            s.post(f"http://{target}/v1/envelope", data=await request.read()) as resp,
        ):
            return web.Response(status=resp.status, body=await resp.read())

    app = web.Application()
    app.router.add_post("/v1/envelope", forward)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        a = await make(1)
        a.set_addresses(b.local_id, [f"127.0.0.1:{port}"], verified=True)
        for seq in range(3):
            assert (await a.request(b.local_id, Ping(seq=seq))).message == Pong(seq=seq)
        assert streams(a) == 0 and inbound(b) == 0
    finally:
        await runner.cleanup()


async def test_a_chunked_post_body_is_read_whole(make: MAKE) -> None:
    """The POST path without Content-Length (chunked transfer) reassembles the envelope."""
    a, b = await make(1), await make(2)
    got: list[torch.Tensor] = []

    async def keep(received: Received) -> None:
        assert isinstance(received.message, Blob)
        got.append(received.message.data)

    b.register(Blob, keep)
    data = torch.rand(30_000)
    envelope = a._codec.encode(Blob(tag=1, data=data), recipient=b.local_id, auth=Auth.MAC)

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(envelope), 7_000):
            yield envelope[start : start + 7_000]
            await asyncio.sleep(0)

    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://{b.addresses[0]}/v1/envelope", data=pieces()) as resp,
    ):
        assert resp.status == 204
        assert "Content-Length" not in resp.request_info.headers
    assert len(got) == 1 and torch.equal(got[0], data)


async def test_stream_count_is_capped_idle_ones_evicted_busy_ones_kept(make: MAKE) -> None:
    a = await make(1, max_connections=1)
    b, c = await make(2), await make(3)
    introduce(a, b)
    introduce(a, c)
    b.register(Ping, pong)
    release = asyncio.Event()
    c.register(Ping, pong_after(release))
    assert (await a.request(b.local_id, Ping(seq=1))).message == Pong(seq=1)
    assert list(a._streams) == [b.addresses[0]]
    assert (await a.request(c.local_id, Ping(seq=2))).message == Pong(seq=2)
    assert list(a._streams) == [c.addresses[0]]  # b's idle stream made room
    pending = asyncio.ensure_future(a.request(c.local_id, Ping(seq=0)))
    await asyncio.sleep(0.05)
    assert (await a.request(b.local_id, Ping(seq=3))).message == Pong(seq=3)  # by POST
    assert list(a._streams) == [c.addresses[0]]
    release.set()
    assert (await pending).message == Pong(seq=0)


async def test_envelopes_over_the_stream_frame_limit_go_by_post(make: MAKE) -> None:
    # a sender configured to stream bigger envelopes than a receiver reads on a stream (1 MiB)
    a, b = await make(1, stream_max_body=4 * 2**20), await make(2)
    introduce(a, b)
    got: list[torch.Tensor] = []

    async def keep(received: Received) -> None:
        assert isinstance(received.message, Blob)
        got.append(received.message.data)

    b.register(Blob, keep)
    data = torch.rand(400_000)  # 1.6 MB: under the envelope cap, over the stream frame limit
    await a.send(b.local_id, Blob(tag=1, data=data), auth=Auth.MAC)
    assert len(got) == 1 and torch.equal(got[0], data)
    assert streams(a) == 0 and inbound(b) == 0  # the sender clamps: it went by POST
    await a.send(b.local_id, Blob(tag=2, data=torch.rand(10)), auth=Auth.MAC)
    assert len(got) == 2 and streams(a) == 1  # small ones still use the stream


async def test_a_refused_stream_is_tried_again_after_stream_retry_s(make: MAKE) -> None:
    b = await make(3, max_connections=1)
    b.register(Ping, pong)
    first, second = await make(4), await make(5, stream_retry_s=0.2)
    introduce(first, b)
    introduce(second, b)
    assert (await first.request(b.local_id, Ping(seq=1))).message == Pong(seq=1)
    assert (await second.request(b.local_id, Ping(seq=2))).message == Pong(seq=2)
    assert streams(second) == 0  # refused (429): POST for now
    await first.aclose()  # b's one stream slot frees up
    for _ in range(200):
        if inbound(b) == 0:
            break
        await asyncio.sleep(0.01)
    assert (await second.request(b.local_id, Ping(seq=3))).message == Pong(seq=3)
    assert streams(second) == 0  # still within stream_retry_s: no new attempt yet
    await asyncio.sleep(0.25)
    assert (await second.request(b.local_id, Ping(seq=4))).message == Pong(seq=4)
    assert streams(second) == 1 and inbound(b) == 1


def test_stream_timings_must_be_positive() -> None:
    for name in ("stream_heartbeat_s", "stream_retry_s"):
        with pytest.raises(ConfigError, match=name):
            HttpTransportConfig(**{name: 0.0})  # type: ignore[arg-type]


async def test_inbound_streams_are_capped_and_the_rest_use_post(make: MAKE) -> None:
    b = await make(3, max_connections=1)
    b.register(Ping, pong)
    first, second = await make(4), await make(5)
    introduce(first, b)
    introduce(second, b)
    assert (await first.request(b.local_id, Ping(seq=1))).message == Pong(seq=1)
    assert (await second.request(b.local_id, Ping(seq=2))).message == Pong(seq=2)
    assert inbound(b) == 1 and streams(first) == 1 and streams(second) == 0
    assert b.accepted == 2 and b.refused == 0
