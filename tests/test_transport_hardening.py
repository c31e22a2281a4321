"""The HTTP transport's defences, piece by piece: address policy and proofs, byte budgets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from floor.envelope import EnvelopeCodec, Received
from floor.errors import PeerUnreachable, RefusalCode, RemoteRefused
from floor.identity import Identity
from floor.messages import build_registry
from p2p.messages import MESSAGE_TYPES, Ping, Pong
from p2p.transport.http import HttpTransport, HttpTransportConfig


@dataclass(frozen=True, slots=True)
class Blob:
    TYPE: ClassVar[str] = "test_hardening_blob"
    data: torch.Tensor


REGISTRY = build_registry([*MESSAGE_TYPES.values(), Blob])
Make = Callable[..., Awaitable[HttpTransport]]


@pytest.fixture
async def make() -> AsyncIterator[Make]:
    made: list[HttpTransport] = []
    seeds = iter(range(1, 1000))

    async def factory(listen: str = "127.0.0.1:0", **config: object) -> HttpTransport:
        identity = Identity.from_seed(bytes([next(seeds)]) * 32)
        codec = EnvelopeCodec(identity, message_types=REGISTRY)
        settings = HttpTransportConfig(request_timeout_s=3.0, **config)  # type: ignore[arg-type]
        transport = HttpTransport(codec, listen=listen, config=settings)
        await transport.start()
        made.append(transport)
        return transport

    yield factory
    for transport in made:
        await transport.aclose()


async def pong(received: Received) -> Pong:
    assert isinstance(received.message, Ping)
    return Pong(seq=received.message.seq)


# ---------------------------------------------------------------- the address policy


@pytest.mark.parametrize(
    ("address", "on_loopback", "off_loopback"),
    [
        ("10.1.2.3:7070", True, True),
        ("203.0.113.9:7070", True, True),
        ("peer.example.org:7070", True, True),
        ("[2001:db8::1]:7070", True, True),
        ("127.0.0.1:7070", True, False),
        ("localhost:7070", True, False),
        ("[::1]:7070", True, False),
        ("[::ffff:127.0.0.1]:7070", True, False),
        ("169.254.169.254:80", False, False),
        ("[fe80::1]:80", False, False),
        ("0.0.0.0:7070", False, False),
        ("[::]:7070", False, False),
        ("224.0.0.1:7070", False, False),
        ("[ff02::1]:7070", False, False),
        ("255.255.255.255:7070", False, False),
        ("240.0.0.1:7070", False, False),
        ("10.1.2.3:0", False, False),
        ("not an address", False, False),
    ],
)
async def test_records_may_name_only_routable_addresses(
    address: str, on_loopback: bool, off_loopback: bool
) -> None:
    codec = EnvelopeCodec(Identity.from_seed(b"p" * 32), message_types=REGISTRY)
    local = HttpTransport(codec, listen="127.0.0.1:0")
    public = HttpTransport(codec, listen="0.0.0.0:0")
    forced = HttpTransport(
        codec, listen="0.0.0.0:0", config=HttpTransportConfig(allow_loopback_peers=True)
    )
    assert local.accepts_address(address) is on_loopback
    assert public.accepts_address(address) is off_loopback
    assert forced.accepts_address(address) is on_loopback
    local.set_addresses(codec.peer_id, [address])
    assert local.addresses_of(codec.peer_id) == ((address,) if on_loopback else ())


# ---------------------------------------------------------------- address proofs


async def test_the_first_send_to_a_learnt_address_is_a_probe_answered_by_that_peer(
    make: Make,
) -> None:
    a, b = await make(), await make()
    b.register(Ping, pong)
    a.set_addresses(b.local_id, b.addresses)  # learnt from a record: not proven
    assert not a.is_proven(b.local_id, b.addresses[0])
    reply = await a.request(b.local_id, Ping(seq=4))
    assert reply.message == Pong(seq=4)
    assert a.probes == 1 and a.is_proven(b.local_id, b.addresses[0])
    assert b.accepted == 2  # the probe, then the ping
    for seq in range(3):  # proven once: no more probes
        await a.request(b.local_id, Ping(seq=seq))
    assert a.probes == 1
    a.set_addresses(b.local_id, [*b.addresses, "10.9.9.9:1"])  # the proven one stays proven
    assert a.is_proven(b.local_id, b.addresses[0])
    a.forget(b.local_id)
    assert not a.is_proven(b.local_id, b.addresses[0])


class Service:
    """Something else listening on loopback: records each request head, answers 200."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            self.heads.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"


async def test_an_address_that_is_not_the_peer_gets_one_probe_then_backs_off(
    make: Make,
) -> None:
    a, b = await make(), await make()
    service = Service()
    address = await service.start()
    try:
        a.set_addresses(b.local_id, [address])  # a record claiming someone else's service
        errors: list[object] = []
        for seq in range(5):
            with pytest.raises(PeerUnreachable) as info:
                await a.request(b.local_id, Ping(seq=seq))
            errors.append(info.value)
            a.post(b.local_id, Ping(seq=seq), on_failure=lambda _m, e: errors.append(e))
        await asyncio.sleep(0.2)
        assert len(service.heads) == 1  # one probe; the retries wait for the backoff
        assert service.heads[0].startswith(b"POST /v1/envelope ")
        assert b"upgrade" not in service.heads[0].lower()  # never a WebSocket upgrade
        assert "next try in" in str(errors[-1]) or "next try in" in str(errors[1])
        assert a.probes == 1
    finally:
        assert service.server is not None
        service.server.close()


async def test_another_peers_address_does_not_prove_a_claim(make: Make) -> None:
    a, b, c = await make(), await make(), await make()
    got: list[Received] = []

    async def record(received: Received) -> None:
        got.append(received)

    c.register(Ping, record)
    a.set_addresses(b.local_id, c.addresses)  # b's record names c's address
    with pytest.raises(PeerUnreachable, match="did not prove"):
        await a.send(b.local_id, Ping(seq=1))
    assert got == []  # c never saw the message meant for b


async def test_many_learnt_addresses_are_probed_at_a_bounded_rate(make: Make) -> None:
    a = await make()
    ids = [Identity.from_seed(bytes([200 + i]) * 32).peer_id for i in range(40)]
    for i, peer in enumerate(ids):  # forged records: nothing listens there
        a.set_addresses(peer, [f"127.0.0.1:{9 + i}"])
    results = await asyncio.gather(
        *(a.send(peer, Ping(seq=1), timeout=1.0) for peer in ids), return_exceptions=True
    )
    assert all(isinstance(r, PeerUnreachable) for r in results)
    assert a.probes <= 20  # the burst of the token bucket; the rest wait for tokens


# ---------------------------------------------------------------- in-flight byte budgets


async def test_bodies_over_the_global_in_flight_budget_are_refused_busy(make: Make) -> None:
    b = await make(max_message_size=64 * 1024, max_inflight_bytes=1, stream=False)
    a = await make(stream=False)
    a.set_addresses(b.local_id, b.addresses, verified=True)
    release = asyncio.Event()
    entered = asyncio.Event()

    async def slow(received: Received) -> None:
        entered.set()
        await release.wait()

    b.register(Blob, slow)
    blob = Blob(torch.zeros(10_000))  # 40 KB: two of them exceed the 64 KiB budget
    first = asyncio.create_task(a.send(b.local_id, blob))
    await entered.wait()
    assert b.inflight.held > 40_000
    with pytest.raises(RemoteRefused) as info:
        await a.send(b.local_id, blob)
    assert info.value.code == RefusalCode.BUSY
    release.set()
    await first
    assert b.inflight.held == 0 and b.inflight.refused == 1
    await a.send(b.local_id, blob)  # room again


async def test_a_stream_holds_at_most_its_connection_budget(make: Make) -> None:
    b = await make(max_connection_inflight=100_000)
    a = await make()
    a.set_addresses(b.local_id, b.addresses, verified=True)
    release = asyncio.Event()

    async def slow(received: Received) -> None:
        await release.wait()

    b.register(Blob, slow)
    blob = Blob(torch.zeros(10_000))  # 40 KB frames on one stream
    sends = [asyncio.create_task(a.send(b.local_id, blob)) for _ in range(6)]
    await asyncio.sleep(0.5)
    assert b.inflight.held <= 100_000
    release.set()
    results = await asyncio.gather(*sends, return_exceptions=True)
    busy = [r for r in results if isinstance(r, RemoteRefused) and r.code == RefusalCode.BUSY]
    assert len(busy) >= 3 and len(busy) + results.count(None) == 6
    assert b.inflight.held == 0
