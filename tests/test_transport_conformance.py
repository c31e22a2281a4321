"""One conformance suite for every Transport: in-memory and aiohttp (trio's check_streams idea)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import ClassVar

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
    TransportClosed,
)
from floor.identity import Identity, PeerId
from floor.messages import build_registry
from floor.transport.base import Transport
from floor.transport.memory import MemoryNetwork, MemoryTransport
from p2p.messages import MESSAGE_TYPES, Ping, Pong
from p2p.transport.http import HttpTransport, HttpTransportConfig


@dataclass(frozen=True, slots=True)
class Blob:
    """A test message carrying a tensor (large bodies)."""

    TYPE: ClassVar[str] = "test_blob"
    tag: int
    data: torch.Tensor


REGISTRY = build_registry([*MESSAGE_TYPES.values(), Blob])
MAKE = Callable[..., Awaitable[Transport]]


@pytest.fixture(params=["memory", "http", "http_post"])
async def make(request: pytest.FixtureRequest) -> AsyncIterator[MAKE]:
    """Factory of started transports of one kind; all are closed after the test.

    ``http`` sends small envelopes over the persistent stream (the default), ``http_post``
    sends every envelope as one POST.
    """
    kind: str = request.param
    network = MemoryNetwork()
    made: list[Transport] = []
    seeds = iter(range(1, 1000))

    async def factory(
        *,
        network_key: bytes | None = None,
        max_message_size: int = 64 * 2**20,
        admit: Callable[[PeerId], bool] | None = None,
        timeout: float = 5.0,
    ) -> Transport:
        identity = Identity.from_seed(bytes([next(seeds)]) * 32)
        codec = EnvelopeCodec(
            identity,
            network_key=network_key,
            max_message_size=max_message_size,
            message_types=REGISTRY,
        )
        transport: Transport
        if kind == "memory":
            transport = MemoryTransport(codec, network, default_timeout_s=timeout, admit=admit)
        else:
            config = HttpTransportConfig(
                request_timeout_s=timeout,
                max_message_size=max_message_size,
                stream=kind == "http",
            )
            http = HttpTransport(codec, listen="127.0.0.1:0", config=config, admit=admit)
            await http.start()
            transport = http
        made.append(transport)
        return transport

    yield factory
    for transport in made:
        await transport.aclose()


def introduce(a: Transport, b: Transport) -> None:
    a.set_addresses(b.local_id, b.addresses, verified=True)
    b.set_addresses(a.local_id, a.addresses, verified=True)


async def pong(received: Received) -> Pong:
    assert isinstance(received.message, Ping)
    return Pong(seq=received.message.seq + 1)


@pytest.mark.parametrize("auth", [Auth.SEALED, Auth.SIGNED, Auth.MAC])
async def test_request_reply_round_trip(make: MAKE, auth: Auth) -> None:
    a, b = await make(), await make()
    introduce(a, b)
    b.register(Ping, pong)
    reply = await a.request(b.local_id, Ping(seq=41), auth=auth)
    assert reply.message == Pong(seq=42)
    assert reply.sender == b.local_id
    assert reply.auth == auth


async def test_send_returns_after_the_handler_accepted(make: MAKE) -> None:
    a, b = await make(), await make()
    introduce(a, b)
    got: list[tuple[PeerId, int]] = []

    async def handler(received: Received) -> None:
        assert isinstance(received.message, Ping)
        await asyncio.sleep(0.01)
        got.append((received.sender, received.message.seq))

    b.register(Ping, handler)
    await a.send(b.local_id, Ping(seq=7))
    assert got == [(a.local_id, 7)]
    assert b.accepted == 1 and b.refused == 0


async def test_request_to_an_address_reaches_an_unknown_peer(make: MAKE) -> None:
    a, b = await make(), await make()
    b.register(Ping, pong)
    reply = await a.request_address(b.addresses[0], Ping(seq=1))
    assert reply.sender == b.local_id
    assert reply.message == Pong(seq=2)


async def test_contact_listener_sees_authenticated_senders(make: MAKE) -> None:
    a, b = await make(), await make()
    introduce(a, b)
    b.register(Ping, pong)
    seen_a: list[PeerId] = []
    seen_b: list[PeerId] = []
    a.add_contact_listener(seen_a.append)
    b.add_contact_listener(seen_b.append)
    await a.request(b.local_id, Ping(seq=1))
    assert seen_b == [a.local_id]
    assert seen_a == [b.local_id]


async def test_unknown_peer_and_dead_address_are_unreachable(make: MAKE) -> None:
    a, b = await make(), await make()
    with pytest.raises(PeerUnreachable):
        await a.send(b.local_id, Ping(seq=1))
    introduce(a, b)
    await b.aclose()
    with pytest.raises(PeerUnreachable):
        await a.request(b.local_id, Ping(seq=1))


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (OutOfStage("not now"), RefusalCode.OUT_OF_STAGE),
        (RuntimeError("bug"), RefusalCode.INTERNAL),
    ],
)
async def test_handler_errors_come_back_as_refusal_codes(
    make: MAKE, error: Exception, code: RefusalCode
) -> None:
    a, b = await make(), await make()
    introduce(a, b)

    async def failing(received: Received) -> None:
        raise error

    b.register(Ping, failing)
    with pytest.raises(RemoteRefused) as info:
        await a.request(b.local_id, Ping(seq=1))
    assert info.value.code == code
    assert b.refused == 1 and b.accepted == 0


async def test_message_without_handler_is_refused_as_unknown_type(make: MAKE) -> None:
    a, b = await make(), await make()
    introduce(a, b)
    with pytest.raises(RemoteRefused) as info:
        await a.send(b.local_id, Ping(seq=1))
    assert info.value.code == RefusalCode.UNKNOWN_TYPE


async def test_replayed_envelope_is_refused(make: MAKE) -> None:
    a, b = await make(), await make()
    introduce(a, b)
    b.register(Ping, pong)
    data = a._codec.encode(Ping(seq=1), recipient=b.local_id, auth=Auth.SEALED)
    assert await a._exchange(b.addresses[0], data, 5.0)
    with pytest.raises(RemoteRefused) as info:
        await a._exchange(b.addresses[0], data, 5.0)
    assert info.value.code == RefusalCode.REPLAYED


async def test_a_slow_handler_times_out(make: MAKE) -> None:
    a, b = await make(), await make()
    introduce(a, b)
    release = asyncio.Event()

    async def stuck(received: Received) -> Pong:
        await release.wait()
        return Pong(seq=0)

    b.register(Ping, stuck)
    with pytest.raises(Timeout):
        await a.request(b.local_id, Ping(seq=1), timeout=0.2)
    release.set()


async def test_close_fails_pending_and_later_calls(make: MAKE) -> None:
    a, b = await make(), await make()
    introduce(a, b)
    release = asyncio.Event()

    async def stuck(received: Received) -> Pong:
        await release.wait()
        return Pong(seq=0)

    b.register(Ping, stuck)
    pending = asyncio.ensure_future(a.request(b.local_id, Ping(seq=1), timeout=30))
    await asyncio.sleep(0.1)
    await a.aclose()
    await a.aclose()  # idempotent
    with pytest.raises(TransportClosed):
        await pending
    with pytest.raises(TransportClosed):
        await a.send(b.local_id, Ping(seq=2))
    assert a.closed
    release.set()


async def test_async_with_closes(make: MAKE) -> None:
    a = await make()
    async with a as entered:
        assert entered is a
    assert a.closed
    with pytest.raises(TransportClosed):
        await a.request_address("127.0.0.1:9", Ping(seq=1))


async def test_network_key_and_allowlist_refuse_at_the_door(make: MAKE) -> None:
    key = bytes(range(32))
    keyed, stranger = await make(network_key=key), await make()
    introduce(keyed, stranger)
    keyed.register(Ping, pong)
    with pytest.raises(RemoteRefused) as info:
        await stranger.request(keyed.local_id, Ping(seq=1))
    assert info.value.code == RefusalCode.UNAUTHORIZED
    friend = await make(network_key=key)
    introduce(keyed, friend)
    assert (await friend.request(keyed.local_id, Ping(seq=1))).message == Pong(seq=2)

    allowed = {friend.local_id}
    gate = await make(network_key=key, admit=allowed.__contains__)
    gate.register(Ping, pong)
    introduce(gate, friend)
    introduce(gate, keyed)
    assert (await friend.request(gate.local_id, Ping(seq=3))).message == Pong(seq=4)
    with pytest.raises(RemoteRefused) as info:
        await keyed.request(gate.local_id, Ping(seq=1))
    assert info.value.code == RefusalCode.UNAUTHORIZED


async def test_large_tensor_moves_intact_with_mac(make: MAKE) -> None:
    a, b = await make(), await make()
    introduce(a, b)
    got: list[torch.Tensor] = []

    async def keep(received: Received) -> None:
        assert isinstance(received.message, Blob)
        got.append(received.message.data)

    b.register(Blob, keep)
    data = torch.randn(2**20)  # 4 MB
    await a.send(b.local_id, Blob(tag=1, data=data), auth=Auth.MAC)
    assert torch.equal(got[0], data)


async def test_body_over_the_receivers_cap_is_refused(make: MAKE) -> None:
    a, b = await make(), await make(max_message_size=2**20)
    introduce(a, b)
    b.register(Blob, pong)  # never reached
    with pytest.raises(RemoteRefused) as info:
        await a.send(b.local_id, Blob(tag=1, data=torch.zeros(2**19)), auth=Auth.MAC)
    assert info.value.code == RefusalCode.TOO_LARGE


async def test_concurrent_requests(make: MAKE) -> None:
    a, b = await make(), await make()
    introduce(a, b)
    b.register(Ping, pong)
    replies = await asyncio.gather(*(a.request(b.local_id, Ping(seq=i)) for i in range(50)))
    assert sorted(r.message.seq for r in replies) == list(range(1, 51))  # type: ignore[union-attr]


async def test_one_handler_per_type(make: MAKE) -> None:
    a = await make()
    a.register(Ping, pong)
    with pytest.raises(ConfigError):
        a.register(Ping, pong)
    a.unregister(Ping)
    a.register(Ping, pong)


async def test_addresses_are_validated(make: MAKE) -> None:
    a, b = await make(), await make()
    assert a.is_valid_address(b.addresses[0])
    assert not a.is_valid_address("")
    assert not a.is_valid_address("no address at all")
    a.set_addresses(b.local_id, ["garbage", *b.addresses], verified=True)
    assert a.addresses_of(b.local_id) == b.addresses
    a.forget(b.local_id)
    assert a.addresses_of(b.local_id) == ()


async def test_post_delivers_in_order_and_reports_failures(make: MAKE) -> None:
    """``post`` on every transport: delivered with the usual checks, failures typed."""
    key = bytes(range(32))
    a, b, stranger = await make(network_key=key), await make(network_key=key), await make()
    introduce(a, b)
    introduce(stranger, b)
    got: list[tuple[PeerId, int]] = []
    done = asyncio.Event()

    async def keep(received: Received) -> None:
        assert isinstance(received.message, Ping)
        got.append((received.sender, received.message.seq))
        if len(got) == 60:
            done.set()

    async def refuse(received: Received) -> None:
        raise OutOfStage("not now")

    b.register(Ping, keep)
    b.register(Pong, refuse)
    failures: list[tuple[object, Exception]] = []
    failed = asyncio.Event()

    def on_failure(message: object, error: Exception) -> None:
        failures.append((message, error))
        failed.set()

    await a.send(b.local_id, Ping(seq=-1))  # the first envelope opens any stream
    got.clear()
    for seq in range(60):
        a.post(b.local_id, Ping(seq=seq), auth=Auth.MAC, on_failure=on_failure)
    async with asyncio.timeout(10):
        await done.wait()
    assert got == [(a.local_id, seq) for seq in range(60)] and failures == []
    refused = Pong(seq=1)
    a.post(b.local_id, refused, on_failure=on_failure)
    async with asyncio.timeout(10):
        await failed.wait()
    assert failures[0][0] is refused
    error = failures[0][1]
    assert isinstance(error, RemoteRefused) and error.code == RefusalCode.OUT_OF_STAGE
    failed.clear()
    stranger.post(b.local_id, Ping(seq=1), on_failure=on_failure)  # no network key
    async with asyncio.timeout(10):
        await failed.wait()
    error = failures[1][1]
    assert isinstance(error, RemoteRefused) and error.code == RefusalCode.UNAUTHORIZED
    a.post(stranger.local_id, Ping(seq=1), on_failure=on_failure)  # no address: at once
    assert isinstance(failures[2][1], PeerUnreachable)
    a.post(b.local_id, Ping(seq=99))  # no callback wanted: no error either
    await a.aclose()
    a.post(b.local_id, Ping(seq=1), on_failure=on_failure)
    assert isinstance(failures[3][1], TransportClosed)
    assert len(got) == 60 or got[60:] == [(a.local_id, 99)]


async def test_close_leaves_no_tasks(make: MAKE) -> None:
    a, b = await make(), await make()
    introduce(a, b)
    b.register(Ping, pong)
    await asyncio.gather(*(a.request(b.local_id, Ping(seq=i)) for i in range(5)))
    await a.aclose()
    await b.aclose()
    await asyncio.sleep(0)
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert others == []


def test_transport_package_api_and_no_aiohttp_below_http() -> None:
    """gossip may import floor.transport (base, memory): that must not pull in aiohttp."""
    import subprocess
    import sys

    import floor.transport as package

    assert sorted(package.__all__) == [
        "ContactListener",
        "Handler",
        "MemoryNetwork",
        "MemoryTransport",
        "PostFailure",
        "Transport",
        "reply_auth",
    ]
    assert all(hasattr(package, name) for name in package.__all__)
    code = "import sys, floor.transport.memory; print('aiohttp' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
