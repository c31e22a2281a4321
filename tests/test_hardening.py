"""The four attacks of issue 14, against real daemons over aiohttp on 127.0.0.1.

Each test runs the attack as an unauthenticated (or freshly keyed) stranger would and checks
that it fails: memory stays bounded by what was sent, the event loop keeps answering, honest
envelopes keep passing, and no forged address gets more than a bounded number of probes.
Latencies are reported by ``bench/bench_hardening.py``; here a status request only has to
answer within its 2 s timeout (a blocked loop took 17-24 s before).
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from test_daemon_support import FAST_CONFIG, DaemonProc, wait_until

import floor.envelope as envelope_module
from floor.envelope import Auth, EnvelopeCodec
from floor.errors import RefusalCode
from floor.identity import Identity, PeerId
from p2p.messages import MESSAGE_TYPES, Join, PeerRecord, Ping
from p2p.transport.http import EnvelopePayload

# The daemon tests' fast membership, plus a replay capacity and short body and idle deadlines.
HARDENED_CONFIG = (
    "replay_capacity = {replay_capacity}\n"
    + FAST_CONFIG
    + "body_timeout_s = {body_timeout_s}\nidle_timeout_s = {idle_timeout_s}\n"
)
BODY_TIMEOUT_S = 2.0
IDLE_TIMEOUT_S = 3.0

Hardened = Callable[..., DaemonProc]


@pytest.fixture
def hardened(tmp_path: Path) -> Iterator[Hardened]:
    """Daemon subprocesses with short body and idle deadlines; all stopped at teardown."""
    made: list[DaemonProc] = []

    def factory(name: str, *extra: str, replay_capacity: int = 1_000_000) -> DaemonProc:
        config = tmp_path / f"{name}.toml"
        config.write_text(
            HARDENED_CONFIG.format(
                replay_capacity=replay_capacity,
                body_timeout_s=BODY_TIMEOUT_S,
                idle_timeout_s=IDLE_TIMEOUT_S,
            )
        )
        # info, not the fast config's debug: one log line per refused envelope is the
        # daemon's own cost under a flood, not what these tests measure
        proc = DaemonProc(tmp_path, name, config, "--log-level", "info", *extra)
        made.append(proc)
        return proc

    yield factory
    for proc in made:
        proc.stop()


def rss_mb(daemon: DaemonProc) -> float:
    """The daemon's resident set size in MB (Linux /proc)."""
    assert daemon.proc is not None
    for line in Path(f"/proc/{daemon.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class StatusProbe:
    """Polls ``GET /v1/status`` every 50 ms during an attack; each must answer within 2 s."""

    def __init__(self, daemon: DaemonProc) -> None:
        self.url = f"http://{daemon.address}/v1/status"
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        async with aiohttp.ClientSession() as session:
            while True:
                start = time.perf_counter()
                try:
                    async with (
                        asyncio.timeout(2.0),
                        session.get(self.url) as resp,
                    ):
                        await resp.read()
                        if resp.status != 200:
                            self.failures.append(f"HTTP {resp.status}")
                except (TimeoutError, aiohttp.ClientError) as exc:
                    self.failures.append(type(exc).__name__)
                self.latencies.append(time.perf_counter() - start)
                await asyncio.sleep(0.05)

    async def __aenter__(self) -> StatusProbe:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, exc_type: object, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        if exc_type is not None:
            return  # the test failed already: let its error show
        assert self.latencies, "the status probe never ran"
        assert not self.failures, f"status did not answer: {self.failures[:5]}"


def _status(daemon: DaemonProc) -> dict[str, Any]:
    return daemon.status()


# ---------------------------------------------------------------- 1. Content-Length pre-allocation


async def test_trickling_bodies_cost_only_what_was_sent_and_are_cut_off(
    hardened: Hardened,
) -> None:
    daemon = hardened("trickle").start()
    await asyncio.to_thread(daemon.wait_ready)
    await asyncio.sleep(0.5)
    before = rss_mb(daemon)
    head = (
        b"POST /v1/envelope HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/vnd.murmur.envelope\r\n"
        b"Content-Length: 67108864\r\n\r\nMRM"
    )
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    async with StatusProbe(daemon):
        for _ in range(100):
            reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
            writer.write(head)
            await writer.drain()
            conns.append((reader, writer))
        idle = await asyncio.open_connection("127.0.0.1", daemon.port)  # sends nothing at all
        slow = await asyncio.open_connection("127.0.0.1", daemon.port)  # headers byte by byte
        slow[1].write(b"POST /v1/envelope HTTP/1.1\r\nHost: x\r\n")

        async def trickle_headers() -> float:
            began = time.monotonic()
            while time.monotonic() - began < IDLE_TIMEOUT_S + 10.0:
                try:
                    slow[1].write(b"X")
                    await slow[1].drain()
                    async with asyncio.timeout(0.5):
                        if await slow[0].read(100) == b"":
                            break
                except TimeoutError:
                    continue
                except ConnectionError:
                    break
            return time.monotonic() - began

        header_trickle = asyncio.create_task(trickle_headers())
        await asyncio.sleep(1.0)
        grown = rss_mb(daemon) - before
        # 100 declared 64 MiB bodies were 6.4 GiB of zero-filled buffers before the fix.
        assert grown < 64, f"RSS grew {grown:.0f} MB for 100 trickling connections"
        assert _status(daemon)["inflight_bytes"] <= 100 * 64 * 1024
        # Every trickling connection is closed by the body deadline, the idle one by the
        # idle deadline; reading to EOF returns (a 408 may come first).
        start = time.monotonic()
        for reader, _ in conns:
            async with asyncio.timeout(BODY_TIMEOUT_S + 5.0):
                await reader.read()
        async with asyncio.timeout(IDLE_TIMEOUT_S + 5.0):
            assert await idle[0].read() == b""
        assert time.monotonic() - start < IDLE_TIMEOUT_S + 5.0
        assert await header_trickle < IDLE_TIMEOUT_S + 3.0  # cut off, however slow it writes
    slow[1].close()
    for _, writer in conns:
        writer.close()
    idle[1].close()
    status = _status(daemon)
    assert status["inflight_bytes"] == 0
    assert status["refused"] >= 100


# ---------------------------------------------------------------- 2. msgpack amplification


def _signed_with_body(codec: EnvelopeCodec, message: object, body: bytes) -> bytes:
    """A validly signed envelope of ``message``'s type whose body is ``body`` (any bytes)."""
    original = envelope_module.encode_body_parts
    envelope_module.encode_body_parts = lambda _m: ([body], len(body))  # type: ignore[assignment]
    try:
        return codec.encode(message, recipient=None, auth=Auth.SIGNED)  # type: ignore[arg-type]
    finally:
        envelope_module.encode_body_parts = original


async def test_a_signed_join_of_empty_arrays_is_refused_from_its_head(hardened: Hardened) -> None:
    daemon = hardened("amplify").start()
    await asyncio.to_thread(daemon.wait_ready)
    await asyncio.sleep(0.5)
    before = rss_mb(daemon)
    fresh = Identity.generate()
    codec = EnvelopeCodec(fresh, message_types=MESSAGE_TYPES, max_message_size=64 * 2**20)
    n = 63 * 2**20
    packed = b"\x91\xdd" + struct.pack(">I", n) + b"\x90" * n
    body = struct.pack("<II", len(packed), 0) + packed
    record = PeerRecord.create(fresh, ("127.0.0.1:9",), time.time())
    envelope = _signed_with_body(codec, Join(record), body)
    assert len(envelope) < 64 * 2**20
    url = f"http://{daemon.address}/v1/envelope"
    codes: list[str | None] = []
    async with StatusProbe(daemon), aiohttp.ClientSession() as session:
        for _ in range(3):
            try:
                async with (
                    asyncio.timeout(10),
                    session.post(url, data=EnvelopePayload(envelope)) as resp,
                ):
                    await resp.read()
                    assert resp.status == 413
                    codes.append(resp.headers.get("Murmur-Refusal"))
            except aiohttp.ClientError:
                codes.append("reset")  # refused before the upload ended: the socket closed
        # And the same bytes inside the type's msgpack cap: refused as malformed, cheaply.
        small = b"\x91\xdc\xff\xff" + b"\x90" * 0xFFFF
        small_body = struct.pack("<II", len(small), 0) + small
        async with session.post(url, data=_signed_with_body(codec, Join(record), small_body)) as r:
            assert r.status == 400 and r.headers.get("Murmur-Refusal") == "2"
    assert set(codes) <= {str(int(RefusalCode.TOO_LARGE)), "reset"}
    grown = rss_mb(daemon) - before
    assert grown < 64, f"RSS grew {grown:.0f} MB for three 63 MiB amplification bodies"
    assert _status(daemon)["peers"] == 0


# ---------------------------------------------------------------- 3. replay-cache floor


async def test_a_replay_flood_cannot_make_honest_envelopes_stale(hardened: Hardened) -> None:
    victim = hardened("victim", replay_capacity=2000).start()
    status = await asyncio.to_thread(victim.wait_ready)
    neighbour = hardened("neighbour", "--bootstrap", victim.address).start()
    neighbour_id = (await asyncio.to_thread(neighbour.wait_ready))["peer_id"]
    victim_id = status["peer_id"]
    await asyncio.to_thread(
        wait_until,
        lambda: (
            victim.peer_ids("alive") == {neighbour_id}
            and neighbour.peer_ids("alive") == {victim_id}
        ),
        10.0,
        "the victim and its neighbour see each other",
    )
    target = PeerId.parse(victim_id)
    flooder = Identity.generate()
    ahead = EnvelopeCodec(flooder, message_types=MESSAGE_TYPES, clock=lambda: time.time() + 115.0)
    near = EnvelopeCodec(flooder, message_types=MESSAGE_TYPES, clock=lambda: time.time() + 9.0)
    honest = EnvelopeCodec(Identity.generate(), message_types=MESSAGE_TYPES)
    strangers = [EnvelopeCodec(Identity.generate(), message_types=MESSAGE_TYPES) for _ in range(40)]
    url = f"http://{victim.address}/v1/envelope"
    flood_codes: dict[str, int] = {}
    honest_codes: list[int] = []

    async def post(session: aiohttp.ClientSession, data: bytes) -> tuple[int, str | None]:
        async with session.post(url, data=data) as resp:
            await resp.read()
            return resp.status, resp.headers.get("Murmur-Refusal")

    async def honest_pinger(session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        seq = 0
        while not stop.is_set():
            seq += 1
            ping = honest.encode(Ping(seq), recipient=target, auth=Auth.MAC)
            honest_codes.append((await post(session, ping))[0])
            await asyncio.sleep(0.02)

    connector = aiohttp.TCPConnector(limit=32)
    async with StatusProbe(victim), aiohttp.ClientSession(connector=connector) as session:
        stop = asyncio.Event()
        pinger = asyncio.create_task(honest_pinger(session, stop))
        limit = asyncio.Semaphore(32)

        async def flood(data: bytes) -> None:
            async with limit:
                status, code = await post(session, data)
                key = f"{status}/{code}"
                flood_codes[key] = flood_codes.get(key, 0) + 1

        envelopes = []
        for i in range(2500):  # ahead by 115 s, inside the old window: the old attack
            envelopes.append(ahead.encode(Ping(i), recipient=target, auth=Auth.MAC))
        for i in range(2500):  # ahead by 9 s, inside the allowed skew: fills its own share
            envelopes.append(near.encode(Ping(i), recipient=target, auth=Auth.MAC))
        for i in range(2400):  # 40 fresh identities, 60 signed pings each: 1.2x the cache
            codec = strangers[i % 40]
            envelopes.append(codec.encode(Ping(i), recipient=target, auth=Auth.SIGNED))
        await asyncio.gather(*(flood(e) for e in envelopes))
        await asyncio.sleep(0.5)  # right after the flood
        stop.set()
        await pinger
    assert flood_codes.get(f"400/{int(RefusalCode.STALE)}", 0) >= 2500  # the +115 s ones
    assert flood_codes.get("200/None", 0) >= 2500  # the rest passed, each into its share
    assert honest_codes and set(honest_codes) == {200}, sorted(set(honest_codes))
    # Nobody dropped anybody: the victim and its neighbour still see each other.
    await asyncio.sleep(3.0)  # longer than dead_after_s
    assert victim.peer_ids("alive") == {neighbour_id}
    assert neighbour.peer_ids("alive") == {victim_id}


# ---------------------------------------------------------------- 4. address forgery


class Bystander:
    """A plain TCP service on loopback that records what connects to it (not a Murmur peer)."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(2.0):
                head = await reader.readuntil(b"\r\n\r\n")
            self.requests.append(head)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"127.0.0.1:{port}"

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def test_forged_addresses_get_refused_or_one_bounded_probe(hardened: Hardened) -> None:
    bootstrap = hardened("boot").start()
    await asyncio.to_thread(bootstrap.wait_ready)
    neighbour = hardened("next", "--bootstrap", bootstrap.address).start()
    await asyncio.to_thread(neighbour.wait_ready)
    bystander = Bystander()
    service = await bystander.start()
    url = f"http://{bootstrap.address}/v1/envelope"
    try:
        async with aiohttp.ClientSession() as session:

            async def join(identity: Identity, addresses: tuple[str, ...]) -> int:
                codec = EnvelopeCodec(identity, message_types=MESSAGE_TYPES)
                record = PeerRecord.create(identity, addresses, time.time())
                data = codec.encode(Join(record), recipient=None, auth=Auth.SIGNED)
                async with session.post(url, data=data) as resp:
                    await resp.read()
                    return resp.status

            # Addresses no record may name: never taken into the view.
            for bad in ("169.254.169.254:80", "0.0.0.0:7070", "224.0.0.1:9", "[ff02::1]:9"):
                assert await join(Identity.generate(), (bad,)) == 200
            forger = Identity.generate()
            start = time.monotonic()
            while time.monotonic() - start < 10.0:  # re-join with a fresh record twice a second
                assert await join(forger, (service,)) == 200
                await asyncio.sleep(0.5)
        peers = bootstrap.peers()
        assert all(p["peer_id"] != str(forger.peer_id) or p["state"] != "alive" for p in peers)
        named = {a for p in peers for a in p["addresses"]}
        assert not named & {"169.254.169.254:80", "0.0.0.0:7070", "224.0.0.1:9", "[ff02::1]:9"}
        # 10 s of forged records: the probes back off (2, 4, 8 s), and nothing but a probe
        # POST ever reaches the bystander (no WebSocket upgrade, no protocol message).
        assert 1 <= len(bystander.requests) <= 5, len(bystander.requests)
        for head in bystander.requests:
            assert head.startswith(b"POST /v1/envelope "), head[:60]
            assert b"upgrade" not in head.lower()
        assert str(forger.peer_id) not in neighbour.peer_ids()  # never passed on
    finally:
        bystander.close()
