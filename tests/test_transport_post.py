"""One-way posts (``Transport.post``, stream frame kind 4): delivered and handled with every
check, answered only by a refusal (which reaches ``on_failure`` typed), garbage and oversize
post frames, the fallback to a task (no stream yet, POST-only peers, large envelopes),
ordering with many posts in flight and a congested socket, and streams closing mid-post."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import aiohttp
import pytest
import torch
from aiohttp import web

import p2p.transport.stream as stream_module
from floor.envelope import Auth, EnvelopeCodec, Received
from floor.errors import (
    MurmurError,
    OutOfStage,
    PeerUnreachable,
    RefusalCode,
    RemoteRefused,
    TransportClosed,
)
from floor.identity import Identity
from gossip.network import StaticView, TransportNetwork
from p2p.messages import Ping, Pong
from p2p.transport.http import HttpTransport
from p2p.transport.stream import (
    FRAME,
    KIND_ENVELOPE,
    KIND_POST,
    KIND_REFUSAL,
    KIND_REPLY,
    STREAM_PATH,
    STREAM_PROTOCOL,
)
from tests.test_transport_conformance import REGISTRY, Blob
from tests.test_transport_stream import MAKE, inbound, introduce, make, pong, streams

__all__ = ["make"]  # the fixture, re-exported for pytest


class Failures:
    """An ``on_failure`` callback that records what it heard."""

    def __init__(self) -> None:
        self.seen: list[tuple[Any, MurmurError]] = []
        self.changed = asyncio.Event()

    def __call__(self, message: Any, error: MurmurError) -> None:
        self.seen.append((message, error))
        self.changed.set()

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(10):
            while len(self.seen) < count:
                self.changed.clear()
                await self.changed.wait()


class Inbox:
    """A handler that records the tags/seqs it got, in order, and can wait for a count."""

    def __init__(self) -> None:
        self.got: list[int] = []
        self.changed = asyncio.Event()

    async def __call__(self, received: Received) -> None:
        message = received.message
        self.got.append(message.tag if isinstance(message, Blob) else message.seq)
        self.changed.set()

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(10):
            while len(self.got) < count:
                self.changed.clear()
                await self.changed.wait()


def blob(tag: int, n: int = 4) -> Blob:
    return Blob(tag=tag, data=torch.full((n,), float(tag)))


async def open_stream(a: HttpTransport, b: HttpTransport) -> None:
    """Open a's stream to b with one acknowledged send (later posts go out as one-way frames)."""
    b.register(Ping, pong)
    assert (await a.request(b.local_id, Ping(seq=-1))).message == Pong(seq=-1)
    assert streams(a) == 1


async def test_a_post_on_an_open_stream_is_handled_without_a_task(make: MAKE) -> None:
    a, b = await make(1), await make(2)
    introduce(a, b)
    await open_stream(a, b)
    inbox, failures = Inbox(), Failures()
    b.register(Blob, inbox)
    accepted = b.accepted
    a.post(b.local_id, blob(7), auth=Auth.MAC, on_failure=failures)
    assert not a._posting  # written straight to the stream: no task
    await inbox.wait_for(1)
    assert inbox.got == [7] and b.accepted == accepted + 1 and b.refused == 0
    assert failures.seen == [] and streams(a) == 1 and inbound(b) == 1


async def test_a_refused_post_reaches_on_failure_typed(make: MAKE) -> None:
    a, b = await make(1), await make(2)
    introduce(a, b)
    await open_stream(a, b)

    async def refuse(received: Received) -> None:
        raise OutOfStage("not now")

    async def late_refusal(received: Received) -> None:
        await asyncio.sleep(0.01)  # suspends: the server finishes it in a task
        raise OutOfStage("later")

    b.register(Blob, refuse)
    failures = Failures()
    a.post(b.local_id, blob(1), on_failure=failures)  # sealed (the default)
    await failures.wait_for(1)
    message, error = failures.seen[0]
    assert isinstance(message, Blob) and message.tag == 1
    assert isinstance(error, RemoteRefused) and error.code == RefusalCode.OUT_OF_STAGE
    b.unregister(Blob)
    a.post(b.local_id, blob(2), on_failure=failures)  # no handler at all
    await failures.wait_for(2)
    error = failures.seen[1][1]
    assert isinstance(error, RemoteRefused) and error.code == RefusalCode.UNKNOWN_TYPE
    b.register(Blob, late_refusal)
    a.post(b.local_id, blob(3), on_failure=failures)
    await failures.wait_for(3)
    error = failures.seen[2][1]
    assert isinstance(error, RemoteRefused) and error.code == RefusalCode.OUT_OF_STAGE
    assert b.refused == 3 and streams(a) == 1  # refusals do not end the stream


async def test_post_failures_known_at_once_are_reported_at_once(make: MAKE) -> None:
    a, b = await make(1), await make(2, max_message_size=4096)
    failures = Failures()
    a.post(b.local_id, blob(1), on_failure=failures)  # no address known
    assert isinstance(failures.seen[-1][1], PeerUnreachable)
    introduce(a, b)
    await open_stream(a, b)
    a.post(b.local_id, blob(2, n=100_000), auth=Auth.MAC)  # nobody listens: no error either
    big = blob(3, n=2000)  # over b's 4 KiB cap, under ours: refused by b on the stream
    a.post(b.local_id, big, auth=Auth.MAC, on_failure=failures)
    await failures.wait_for(2)
    assert failures.seen[1][0] is big
    error = failures.seen[1][1]
    assert isinstance(error, RemoteRefused) and error.code == RefusalCode.TOO_LARGE
    await a.aclose()
    a.post(b.local_id, blob(4), on_failure=failures)
    assert isinstance(failures.seen[-1][1], TransportClosed)


async def test_many_posts_keep_their_order_with_sends_between(make: MAKE) -> None:
    a, b = await make(1), await make(2)
    introduce(a, b)
    await open_stream(a, b)
    inbox, failures = Inbox(), Failures()
    b.register(Blob, inbox)
    for tag in range(1000):
        if tag % 250 == 249:
            await a.send(b.local_id, blob(tag), auth=Auth.MAC)  # acknowledged, same stream
        else:
            a.post(b.local_id, blob(tag), auth=Auth.MAC, on_failure=failures)
    await inbox.wait_for(1000)
    assert inbox.got == list(range(1000))
    assert failures.seen == [] and streams(a) == 1 and b.refused == 0


async def test_first_posts_and_large_ones_fall_back_to_a_task_and_arrive(make: MAKE) -> None:
    a, b = await make(1, stream_max_body=4096), await make(2)
    introduce(a, b)
    inbox, failures = Inbox(), Failures()
    b.register(Blob, inbox)
    a.post(b.local_id, blob(1), auth=Auth.MAC, on_failure=failures)  # no stream yet
    assert len(a._posting) == 1
    a.post(b.local_id, blob(2, n=50_000), auth=Auth.MAC, on_failure=failures)  # too large
    assert len(a._posting) == 2
    await inbox.wait_for(2)
    assert sorted(inbox.got) == [1, 2] and failures.seen == []
    assert streams(a) == 1  # the first small post opened the stream for later ones
    before = set(a._posting)
    a.post(b.local_id, blob(3), auth=Auth.MAC, on_failure=failures)
    assert a._posting == before  # no new task: straight to the stream
    await inbox.wait_for(3)


async def test_posts_to_a_post_only_peer_fall_back_and_arrive(make: MAKE) -> None:
    # b takes one stream and a raw client holds it: b answers a's upgrade with 429
    a, b = await make(1), await make(2, max_connections=1)
    introduce(a, b)
    inbox, failures = Inbox(), Failures()
    b.register(Blob, inbox)
    session, ws = await _raw(b.addresses[0])
    try:
        for tag in range(20):
            a.post(b.local_id, blob(tag), auth=Auth.MAC, on_failure=failures)
        await inbox.wait_for(20)
        assert sorted(inbox.got) == list(range(20)) and failures.seen == []
        assert streams(a) == 0 and b.addresses[0] in a._no_stream

        async def refuse(received: Received) -> None:
            raise OutOfStage("no")

        b.unregister(Blob)
        b.register(Blob, refuse)
        a.post(b.local_id, blob(99), on_failure=failures)
        await failures.wait_for(1)
        error = failures.seen[0][1]
        assert isinstance(error, RemoteRefused) and error.code == RefusalCode.OUT_OF_STAGE
    finally:
        await ws.close()
        await session.close()


async def test_a_stream_closing_mid_post_loses_nothing_silently(make: MAKE) -> None:
    a, b = await make(1), await make(2)
    introduce(a, b)
    await open_stream(a, b)
    inbox, failures = Inbox(), Failures()
    release = asyncio.Event()

    async def stuck_after_ten(received: Received) -> None:
        await inbox(received)
        if len(inbox.got) > 10:
            await release.wait()  # b is busy when it closes

    b.register(Blob, stuck_after_ten)
    for tag in range(300):
        a.post(b.local_id, blob(tag), auth=Auth.MAC, on_failure=failures)
    await inbox.wait_for(11)
    await b.aclose()
    await failures.wait_for(1)
    await asyncio.sleep(0.05)  # any straggling callback
    reported = {message.tag for message, _ in failures.seen}
    assert all(isinstance(error, PeerUnreachable) for _, error in failures.seen)
    assert set(inbox.got) | reported == set(range(300))  # each handled, or reported
    assert streams(a) == 0
    a.post(b.local_id, blob(300), on_failure=failures)  # nobody listens now: reported
    await failures.wait_for(len(failures.seen) + 1)
    assert failures.seen[-1][0].tag == 300


async def test_closing_the_sender_mid_post_reports_transport_closed(make: MAKE) -> None:
    a, b = await make(1), await make(2)
    introduce(a, b)
    await open_stream(a, b)
    release = asyncio.Event()

    async def stuck(received: Received) -> None:
        await release.wait()

    b.register(Blob, stuck)
    failures = Failures()
    for tag in range(5):
        a.post(b.local_id, blob(tag), on_failure=failures)
    await a.aclose()
    assert sorted(m.tag for m, _ in failures.seen) == list(range(5))
    assert all(isinstance(error, TransportClosed) for _, error in failures.seen)
    release.set()
    await b.aclose()
    await asyncio.sleep(0)
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert others == []  # no reader, drain, post or handler task outlives the transports


async def _raw(address: str) -> tuple[aiohttp.ClientSession, aiohttp.ClientWebSocketResponse]:
    session = aiohttp.ClientSession()
    ws = await session.ws_connect(
        f"http://{address}{STREAM_PATH}", protocols=(STREAM_PROTOCOL,), max_msg_size=0
    )
    return session, ws


async def _next_frame(ws: aiohttp.ClientWebSocketResponse) -> tuple[int, int, bytes]:
    msg = await asyncio.wait_for(ws.receive(), 5)
    assert msg.type == aiohttp.WSMsgType.BINARY
    request_id, kind = FRAME.unpack_from(msg.data)
    return request_id, kind, msg.data[FRAME.size :]


async def test_on_the_wire_a_post_gets_no_answer_unless_refused(make: MAKE) -> None:
    b = await make(2, max_message_size=8192)
    b.register(Ping, pong)  # replies Pong, but a post's reply is dropped
    codec = EnvelopeCodec(Identity.from_seed(b"\x01" * 32), message_types=REGISTRY)
    ping = codec.encode(Ping(seq=1), recipient=b.local_id, auth=Auth.MAC)
    session, ws = await _raw(b.addresses[0])
    try:
        await ws.send_bytes(FRAME.pack(1, KIND_POST) + ping)  # accepted: silent
        await ws.send_bytes(FRAME.pack(2, KIND_POST) + ping)  # a replay: refused
        await ws.send_bytes(FRAME.pack(3, KIND_POST) + b"not an envelope")
        await ws.send_bytes(FRAME.pack(4, KIND_POST))  # an empty envelope
        await ws.send_bytes(FRAME.pack(5, KIND_POST) + b"x" * 10_000)  # over b's cap
        fresh = codec.encode(Ping(seq=2), recipient=b.local_id, auth=Auth.MAC)
        await ws.send_bytes(FRAME.pack(6, KIND_ENVELOPE) + fresh)
        answers = [await _next_frame(ws) for _ in range(5)]
    finally:
        await ws.close()
        await session.close()
    refusals = {rid: struct.unpack_from("<H", p)[0] for rid, kind, p in answers[:4]}
    assert all(kind == KIND_REFUSAL for _, kind, _ in answers[:4])
    assert refusals[2] == RefusalCode.REPLAYED
    assert refusals[3] in (RefusalCode.MALFORMED, RefusalCode.UNSUPPORTED_VERSION)
    assert refusals[4] in (RefusalCode.MALFORMED, RefusalCode.UNSUPPORTED_VERSION)
    assert refusals[5] == RefusalCode.TOO_LARGE
    rid, kind, payload = answers[4]  # the stream survived all of it
    assert (rid, kind) == (6, KIND_REPLY) and payload
    assert b.accepted == 2 and b.refused == 4


async def test_a_post_frame_over_the_stream_limit_ends_only_that_stream(make: MAKE) -> None:
    a, b = await make(1), await make(2)
    introduce(a, b)
    b.register(Ping, pong)
    session, ws = await _raw(b.addresses[0])
    try:
        await ws.send_bytes(FRAME.pack(1, KIND_POST) + bytes(2 * 2**20))
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    finally:
        await ws.close()
        await session.close()
    assert (await a.request(b.local_id, Ping(seq=1))).message == Pong(seq=1)


@pytest.mark.parametrize("cap", [None, 2**20])
async def test_a_congested_stream_queues_posts_in_order(
    cap: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer that does not read: frames queue behind the socket's flow control, in order;
    beyond the queue's cap, posts fail at once (``PeerUnreachable``) and are not sent."""
    if cap is not None:
        monkeypatch.setattr(stream_module, "MAX_BACKLOG_BYTES", cap)
    reading = asyncio.Event()
    failures = Failures()
    seen: list[tuple[int, int]] = []
    done = asyncio.Event()
    total = 80

    async def slow_stream(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=(STREAM_PROTOCOL,), max_msg_size=0)
        await ws.prepare(request)
        await reading.wait()
        while len(seen) < total - len(failures.seen):
            msg = await ws.receive()
            if msg.type != aiohttp.WSMsgType.BINARY:
                break
            seen.append(FRAME.unpack_from(msg.data))
        done.set()
        await ws.close()
        return ws

    app = web.Application()
    app.router.add_get(STREAM_PATH, slow_stream)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    codec = EnvelopeCodec(Identity.from_seed(b"\x01" * 32), message_types=REGISTRY)
    a = HttpTransport(codec)
    await a.start()
    try:
        b_id = Identity.from_seed(b"\x02" * 32).peer_id
        a.set_addresses(b_id, [f"127.0.0.1:{port}"], verified=True)
        stream = await a._stream_to(f"127.0.0.1:{port}")
        assert stream is not None
        for tag in range(total):  # 200 KB each: the socket's buffers fill up
            a.post(b_id, blob(tag, n=50_000), auth=Auth.MAC, on_failure=failures)
        assert stream._writer.drain is not None and stream._writer.backlog  # congested: queued
        assert not a._posting
        reading.set()
        async with asyncio.timeout(20):
            await done.wait()
        sent = total - len(failures.seen)
        assert [kind for _, kind in seen] == [KIND_POST] * sent
        ids = [rid for rid, _ in seen]
        assert ids == sorted(ids) and len(set(ids)) == sent
        if cap is None:
            assert failures.seen == []
        else:  # the first frames went out, the rest failed at once
            assert 0 < sent < total
            assert [m.tag for m, _ in failures.seen] == list(range(sent, total))
            assert all(isinstance(e, PeerUnreachable) for _, e in failures.seen)
    finally:
        await a.aclose()
        await runner.cleanup()


async def test_transport_network_post_carries_gossip_messages(make: MAKE) -> None:
    a, b = await make(1), await make(2)
    introduce(a, b)
    await open_stream(a, b)
    net_a = TransportNetwork(a, StaticView([a.local_id, b.local_id]))
    net_b = TransportNetwork(b, StaticView([a.local_id, b.local_id]))
    got: list[tuple[bytes, int]] = []

    async def keep(sender: Any, message: Any) -> None:
        got.append((sender.raw, message.tag))

    net_b.register(Blob, keep)
    failures = Failures()
    for tag in range(3):
        net_a.post(b.local_id, blob(tag), timeout=5.0, on_failure=failures)
    assert net_a.sent == 3 and not a._posting
    async with asyncio.timeout(10):
        while len(got) < 3:
            await asyncio.sleep(0.01)
    assert got == [(a.local_id.raw, t) for t in range(3)] and failures.seen == []
    net_b.unregister(Blob)
    net_a.post(b.local_id, blob(9), on_failure=failures)
    await failures.wait_for(1)
    assert isinstance(failures.seen[0][1], RemoteRefused)
