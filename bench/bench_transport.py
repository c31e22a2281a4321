"""Transport throughput on loopback: plain socket vs raw aiohttp POST vs Murmur envelopes.

Every variant runs a receiver and a sender in two separate processes. All variants run in one
run, interleaved round by round (A B C ... A B C ...), so that a busy machine slows them all
alike; the table shows the median and the best time per message. Murmur rows time
``HttpTransport.send`` end to end: encode with authentication, POST, the receiver's checks
(door, replay, MAC/seal/signature), decode into a tensor, and the 204 back. ``tuned`` means
``p2p.daemon.tune_malloc()`` (what the daemon does at start); ``default`` is glibc's default.

    python -m bench.bench_transport              # markdown table on stdout
    python -m bench.bench_transport --rounds 4   # fewer rounds
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

ROOT = Path(__file__).resolve().parent.parent
SIZES = {"1 MB": 2**20, "4 MB": 4 * 2**20, "40 MB": 40 * 2**20}
SERVER_SEED = b"S" * 32
CLIENT_SEED = b"C" * 32


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- plain socket -------------------------------------------------------------------------------
def serve_socket(port: int) -> None:
    """Receive length-prefixed blobs into one preallocated buffer; ack each with one byte."""
    listener = socket.create_server(("127.0.0.1", port))
    print("ready", flush=True)
    buf = bytearray(max(SIZES.values()) + 8)
    view = memoryview(buf)
    while True:
        conn, _ = listener.accept()
        with conn:
            while _serve_one(conn, buf, view):
                pass


def _serve_one(conn: socket.socket, buf: bytearray, view: memoryview) -> bool:
    got = 0
    while got < 8:
        n = conn.recv_into(view[got:8])
        if n == 0:
            return False
        got += n
    size = int.from_bytes(buf[:8], "little")
    got = 0
    while got < size:
        got += conn.recv_into(view[got:size])
    conn.sendall(b"k")
    return True


class SocketSender:
    """Length-prefixed blobs over one TCP connection."""

    def __init__(self, port: int) -> None:
        self.conn = socket.create_connection(("127.0.0.1", port))
        self.payloads = {size: os.urandom(size) for size in SIZES.values()}

    async def send(self, size: int) -> float:
        payload = self.payloads[size]
        t0 = time.perf_counter()
        self.conn.sendall(size.to_bytes(8, "little"))
        self.conn.sendall(payload)
        self.conn.recv(1)
        return time.perf_counter() - t0

    async def aclose(self) -> None:
        self.conn.close()


# -- raw aiohttp --------------------------------------------------------------------------------
async def serve_aiohttp(port: int) -> None:
    from aiohttp import web

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()  # aiohttp's own way: grow a bytearray, then copy to bytes
        return web.Response(status=204, headers={"X-Len": str(len(body))})

    app = web.Application(client_max_size=2**30)
    app.router.add_post("/", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


class AiohttpSender:
    """Plain POSTs of the same bytes with one ClientSession."""

    def __init__(self, port: int) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession()
        self.url = f"http://127.0.0.1:{port}/"
        self.payloads = {size: os.urandom(size) for size in SIZES.values()}

    async def send(self, size: int) -> float:
        from p2p.transport.http import EnvelopePayload

        t0 = time.perf_counter()
        async with self.session.post(self.url, data=EnvelopePayload(self.payloads[size])) as r:
            await r.read()
            assert r.status == 204
        return time.perf_counter() - t0

    async def aclose(self) -> None:
        await self.session.close()


# -- Murmur transport ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Blob:
    """The benchmark message: one float32 tensor."""

    TYPE: ClassVar[str] = "bench_blob"
    data: torch.Tensor


def _codec(seed: bytes) -> Any:
    from floor.envelope import EnvelopeCodec
    from floor.identity import Identity
    from floor.messages import build_registry
    from p2p.messages import MESSAGE_TYPES

    registry = build_registry([*MESSAGE_TYPES.values(), Blob])
    return EnvelopeCodec(Identity.from_seed(seed), message_types=registry), Blob


async def serve_murmur(port: int) -> None:
    from p2p.config import HttpTransportConfig
    from p2p.transport.http import HttpTransport

    codec, blob = _codec(SERVER_SEED)
    config = HttpTransportConfig(max_message_size=2**30 - 1)
    transport = HttpTransport(codec, listen=f"127.0.0.1:{port}", config=config)

    async def keep(received: Any) -> None:
        assert received.message.data.numel() > 0

    transport.register(blob, keep)
    await transport.start()
    print("ready", flush=True)
    await asyncio.Event().wait()


class MurmurSender:
    """``HttpTransport.send`` of a tensor message with the given authentication."""

    def __init__(self, port: int, auth_name: str, stream_all: bool = False) -> None:
        from floor.envelope import Auth
        from floor.identity import Identity
        from p2p.config import HttpTransportConfig
        from p2p.transport.http import HttpTransport

        codec, blob = _codec(CLIENT_SEED)
        config = HttpTransportConfig(
            max_message_size=2**30 - 1,
            request_timeout_s=60,
            stream_max_body=2**31 if stream_all else HttpTransportConfig().stream_max_body,
        )
        self.server_id = Identity.from_seed(SERVER_SEED).peer_id
        self.auth = Auth[auth_name]
        self.messages = {size: blob(data=torch.rand(size // 4)) for size in SIZES.values()}
        self.transport = HttpTransport(codec, config=config)
        self.transport.set_addresses(self.server_id, [f"127.0.0.1:{port}"], verified=True)

    async def send(self, size: int) -> float:
        t0 = time.perf_counter()
        await self.transport.send(self.server_id, self.messages[size], auth=self.auth)
        return time.perf_counter() - t0

    async def aclose(self) -> None:
        await self.transport.aclose()


# -- small messages: per-message CPU ------------------------------------------------------------
SMALL_PATHS = {"POST": False, "stream": True}


async def _small_peers(n: int, stream: bool, first_seed: int = 1) -> list[Any]:
    from floor.envelope import EnvelopeCodec
    from floor.identity import Identity
    from p2p.config import HttpTransportConfig
    from p2p.messages import MESSAGE_TYPES, Ping, Pong
    from p2p.transport.http import HttpTransport

    config = HttpTransportConfig(stream=stream)
    peers = [
        HttpTransport(
            EnvelopeCodec(Identity.from_seed(bytes([i]) * 32), message_types=MESSAGE_TYPES),
            config=config,
        )
        for i in range(first_seed, first_seed + n)
    ]

    async def pong(received: Any) -> Any:
        return Pong(seq=received.message.seq)

    for t in peers:
        t.register(Ping, pong)
        await t.start()
    for t in peers:
        for u in peers:
            t.set_addresses(u.local_id, u.addresses, verified=True)
    return peers


async def small_rate(n: int, stream: bool, per_pair: int, window: int, auth_name: str) -> float:
    """CPU microseconds per request (both ends, one process): ``n`` peers all-to-all.

    Every ordered pair runs ``per_pair`` SEALED/MAC ``Ping`` -> ``Pong`` requests, ``window``
    at a time per pair. Envelopes are ~130 bytes.
    """
    from floor.envelope import Auth
    from p2p.messages import Ping

    auth = Auth[auth_name]
    peers = await _small_peers(n, stream)

    async def pair(a: Any, b: Any, count: int) -> None:
        async def one(k: int) -> None:
            for seq in range(k, count, window):
                await a.request(b.local_id, Ping(seq=seq), auth=auth)

        await asyncio.gather(*(one(k) for k in range(window)))

    pairs = [(a, b) for a in peers for b in peers if a is not b]
    try:
        await asyncio.gather(*(pair(a, b, 2 * window) for a, b in pairs))  # warm up
        cpu = time.process_time()
        await asyncio.gather(*(pair(a, b, per_pair) for a, b in pairs))
        cpu = time.process_time() - cpu
    finally:
        for t in peers:
            await t.aclose()
    return cpu / (per_pair * len(pairs)) * 1e6


def _latency_server(address: Any, stream: bool) -> None:
    """Child process: a Pong server; puts its address on ``address`` and serves for a minute."""

    async def serve() -> None:
        peers = await _small_peers(1, stream)
        address.put(peers[0].addresses[0])
        await asyncio.sleep(60)

    asyncio.run(serve())


async def _latency_client(address: str, stream: bool, count: int) -> list[float]:
    from floor.identity import Identity
    from p2p.messages import Ping

    (client,) = await _small_peers(1, stream, first_seed=2)  # the server process is seed 1
    server = Identity.from_seed(b"\x01" * 32).peer_id
    client.set_addresses(server, [address], verified=True)
    try:
        for seq in range(50):  # warm up (opens the connection or stream)
            await client.request(server, Ping(seq=seq))
        times = []
        for seq in range(count):
            t0 = time.perf_counter()
            await client.request(server, Ping(seq=seq))
            times.append(time.perf_counter() - t0)
        return times
    finally:
        await client.aclose()


def latency(rounds: int, count: int = 2000) -> dict[str, list[float]]:
    """Round-trip time of sequential SEALED requests between two processes, per path."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    result: dict[str, list[float]] = {}
    for _ in range(rounds):
        for path, stream in SMALL_PATHS.items():
            queue = ctx.SimpleQueue()
            proc = ctx.Process(target=_latency_server, args=(queue, stream), daemon=True)
            proc.start()
            try:
                times = asyncio.run(_latency_client(queue.get(), stream, count))
            finally:
                proc.kill()
                proc.join()
            result.setdefault(path, []).append(statistics.median(times) * 1e6)
    return result


def codec_floor(auth_name: str, count: int = 4000) -> float:
    """CPU microseconds to encode and decode one request and its reply, with no transport."""
    from floor.envelope import Auth, EnvelopeCodec
    from floor.identity import Identity
    from p2p.messages import MESSAGE_TYPES, Ping, Pong

    auth = Auth[auth_name]
    a = EnvelopeCodec(Identity.from_seed(b"\x01" * 32), message_types=MESSAGE_TYPES)
    b = EnvelopeCodec(Identity.from_seed(b"\x02" * 32), message_types=MESSAGE_TYPES)
    cpu = time.process_time()
    for seq in range(count):
        got = b.decode(a.encode(Ping(seq=seq), recipient=b.identity.peer_id, auth=auth))
        a.decode(b.encode(Pong(seq=seq), recipient=got.sender, auth=auth))
    return (time.process_time() - cpu) / count * 1e6


def small_main(rounds: int) -> None:
    """Print the per-request CPU table, the POST and stream paths interleaved."""
    cases = [
        ("one pair, 1 at a time", 2, 2000, 1),
        ("one pair, 16 in flight", 2, 4000, 16),
        ("8 peers all-to-all, 4 in flight per pair", 8, 100, 4),
    ]
    results: dict[tuple[str, str, str], list[float]] = {}
    floor: dict[str, list[float]] = {}
    for _ in range(rounds):
        for auth in ("SEALED", "MAC"):
            floor.setdefault(auth, []).append(codec_floor(auth))
        for label, n, per_pair, window in cases:
            for auth in ("SEALED", "MAC"):
                for path, stream in SMALL_PATHS.items():
                    us = asyncio.run(small_rate(n, stream, per_pair, window, auth))
                    results.setdefault((label, auth, path), []).append(us)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python"
        f" {platform.python_version()}; {rounds} rounds; 1-minute load at the end"
        f" {os.getloadavg()[0]:.1f}\n"
    )
    print(
        "CPU microseconds per request (a Ping envelope and its Pong reply, ~170 bytes each),"
        " both ends in one process; POST = one `POST /v1/envelope` per envelope, stream = the"
        " persistent WebSocket. The codec row is encode + decode of both envelopes with no"
        " transport at all (the floor).\n"
    )
    print("| case | auth | POST us (median / best) | stream us (median / best) | POST / stream |")
    print("|---|---|---:|---:|---:|")
    for label, _, _, _ in cases:
        for auth in ("SEALED", "MAC"):
            post, strm = results[(label, auth, "POST")], results[(label, auth, "stream")]
            mp_, ms_ = statistics.median(post), statistics.median(strm)
            print(
                f"| {label} | {auth} | {mp_:.0f} / {min(post):.0f} | {ms_:.0f} / {min(strm):.0f}"
                f" | {mp_ / ms_:.2f}x |"
            )
    for auth, values in floor.items():
        med = statistics.median(values)
        print(f"| codec only (no transport) | {auth} | {med:.0f} / {min(values):.0f} | - | - |")
    lat = latency(rounds)
    post, strm = statistics.median(lat["POST"]), statistics.median(lat["stream"])
    print(
        "\nRound-trip latency of one SEALED request at a time between two processes (median"
        f" of 2,000 per run, median / best of {rounds} runs):\n"
    )
    print("| path | round trip us (median / best) |\n|---|---:|")
    print(f"| POST | {post:.0f} / {min(lat['POST']):.0f} |")
    print(f"| stream | {strm:.0f} / {min(lat['stream']):.0f} |")


# -- orchestration ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    name: str
    kind: str  # socket | aiohttp | murmur
    tuned: bool
    auth: str = ""
    stream_all: bool = False


VARIANTS = [
    Variant("plain socket (recv_into one buffer)", "socket", False),
    Variant("raw aiohttp POST, default malloc", "aiohttp", False),
    Variant("raw aiohttp POST, tuned malloc", "aiohttp", True),
    Variant("Murmur MAC, default malloc", "murmur", False, "MAC"),
    Variant("Murmur MAC, tuned malloc (daemon default)", "murmur", True, "MAC"),
    Variant("Murmur MAC, tuned malloc, stream forced for all sizes", "murmur", True, "MAC", True),
    Variant("Murmur SEALED, tuned malloc", "murmur", True, "SEALED"),
    Variant("Murmur SIGNED, tuned malloc", "murmur", True, "SIGNED"),
]


def _child(argv: list[str], stdin: bool = False) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.bench_transport", *argv],
        stdin=subprocess.PIPE if stdin else None,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def _ready(proc: subprocess.Popen[str], what: str) -> None:
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError(f"{what} did not start")


async def client_loop(args: argparse.Namespace) -> None:
    """Serve "SIZE REPS" commands from stdin with one long-lived sender; print times as JSON."""
    sender: SocketSender | AiohttpSender | MurmurSender
    if args.kind == "socket":
        sender = SocketSender(args.port)
    elif args.kind == "aiohttp":
        sender = AiohttpSender(args.port)
    else:
        sender = MurmurSender(args.port, args.auth, args.stream_all)
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        size, reps = (int(x) for x in line.split())
        times = [await sender.send(size) for _ in range(reps)]
        print(json.dumps(times), flush=True)
    await sender.aclose()


def child_main(args: argparse.Namespace) -> None:
    if args.tune:
        from p2p.daemon import tune_malloc

        tune_malloc()
    torch.set_num_threads(1)
    if args.client:
        asyncio.run(client_loop(args))
    elif args.kind == "socket":
        serve_socket(args.port)
    elif args.kind == "aiohttp":
        asyncio.run(serve_aiohttp(args.port))
    else:
        asyncio.run(serve_murmur(args.port))


def measure(rounds: int) -> dict[str, dict[str, list[float]]]:
    """Start every variant's server and client, then time them interleaved."""
    procs: list[subprocess.Popen[str]] = []
    clients: dict[str, subprocess.Popen[str]] = {}
    try:
        for variant in VARIANTS:
            port = _free_port()
            flags = ["--port", str(port), "--kind", variant.kind]
            flags += ["--tune"] if variant.tuned else []
            flags += ["--stream-all"] if variant.stream_all else []
            server = _child(["--serve", *flags])
            procs.append(server)
            _ready(server, variant.name)
            client = _child(["--client", *flags, "--auth", variant.auth or "MAC"], stdin=True)
            procs.append(client)
            _ready(client, variant.name)
            clients[variant.name] = client
        results: dict[str, dict[str, list[float]]] = {
            v.name: {k: [] for k in SIZES} for v in VARIANTS
        }
        per_round = {"1 MB": 6, "4 MB": 3, "40 MB": 1}
        for r in range(rounds + 1):  # round 0 warms up and is dropped
            order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
            for variant in order:
                client = clients[variant.name]
                assert client.stdin is not None and client.stdout is not None
                for label, size in SIZES.items():
                    client.stdin.write(f"{size} {per_round[label]}\n")
                    client.stdin.flush()
                    times = json.loads(client.stdout.readline())
                    if r:
                        results[variant.name][label] += times
        return results
    finally:
        for proc in procs:
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in procs:
            try:
                proc.wait(timeout=5 if proc.stdin is not None else 0.01)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12, help="interleaved rounds")
    parser.add_argument(
        "--small", action="store_true", help="per-message CPU of small requests instead"
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tune", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stream-all", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--auth", default="MAC", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve or args.client:
        child_main(args)
        return
    if args.small:
        torch.set_num_threads(1)
        small_main(args.rounds)
        return
    results = measure(args.rounds)
    base = {label: statistics.median(results[VARIANTS[0].name][label]) for label in SIZES}
    load = os.getloadavg()[0]
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    print(
        f"{args.rounds} interleaved rounds (6 x 1 MB, 3 x 4 MB and 1 x 40 MB per variant per"
        " round);"
    )
    print(f"1-minute load average at the end: {load:.1f}\n")
    head = " | ".join(f"{lb} median ms | {lb} GB/s (median / best) | vs socket" for lb in SIZES)
    print(f"| variant | {head} |")
    print("|---|" + "---:|" * (3 * len(SIZES)))
    for variant in VARIANTS:
        cells = []
        for label, size in SIZES.items():
            times = results[variant.name][label]
            med, best = statistics.median(times), min(times)
            cells += [
                f"{med * 1e3:.1f}",
                f"{size / med / 1e9:.2f} / {size / best / 1e9:.2f}",
                f"{base[label] / med:.2f}x",
            ]
        print(f"| {variant.name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
