"""Transport throughput on loopback: plain socket vs raw aiohttp POST vs Murmur envelopes.

Every variant runs a receiver and a sender in two separate processes, in one run, so the
numbers are comparable. Murmur rows time ``HttpTransport.send`` end to end: encode with
authentication, POST, the receiver's checks (door, replay, MAC/seal/signature), decode into
a tensor, and the 204 back. ``tuned`` means ``p2p.daemon.tune_malloc()`` (what the daemon does
at start); ``default`` is glibc's default allocator settings.

    python -m bench.bench_transport            # writes a markdown table to stdout
    python -m bench.bench_transport --reps 5   # fewer repetitions
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
SIZES = {"4 MB": 4 * 2**20, "40 MB": 40 * 2**20}
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


def client_socket(port: int, size: int, reps: int) -> list[float]:
    payload = os.urandom(size)
    conn = socket.create_connection(("127.0.0.1", port))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        conn.sendall(size.to_bytes(8, "little"))
        conn.sendall(payload)
        conn.recv(1)
        times.append(time.perf_counter() - t0)
    conn.close()
    return times


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


async def client_aiohttp(port: int, size: int, reps: int) -> list[float]:
    import aiohttp

    from p2p.transport.http import EnvelopePayload

    payload = os.urandom(size)
    times = []
    async with aiohttp.ClientSession() as session:
        for _ in range(reps):
            t0 = time.perf_counter()
            async with session.post(
                f"http://127.0.0.1:{port}/", data=EnvelopePayload(payload)
            ) as r:
                await r.read()
                assert r.status == 204
            times.append(time.perf_counter() - t0)
    return times


# -- Murmur transport ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Blob:
    """The benchmark message: one float32 tensor."""

    TYPE: ClassVar[str] = "bench_blob"
    data: torch.Tensor


def _codec(seed: bytes) -> Any:
    from p2p.envelope import EnvelopeCodec
    from p2p.identity import Identity
    from p2p.messages import Message, build_registry

    registry = build_registry([*Message.__args__, Blob])
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


async def client_murmur(port: int, size: int, reps: int, auth_name: str) -> list[float]:
    from p2p.config import HttpTransportConfig
    from p2p.envelope import Auth
    from p2p.identity import Identity
    from p2p.transport.http import HttpTransport

    codec, blob = _codec(CLIENT_SEED)
    config = HttpTransportConfig(max_message_size=2**30 - 1, request_timeout_s=60)
    server_id = Identity.from_seed(SERVER_SEED).peer_id
    message = blob(data=torch.rand(size // 4))
    times = []
    async with HttpTransport(codec, config=config) as transport:
        transport.set_addresses(server_id, [f"127.0.0.1:{port}"])
        for _ in range(reps):
            t0 = time.perf_counter()
            await transport.send(server_id, message, auth=Auth[auth_name])
            times.append(time.perf_counter() - t0)
    return times


# -- orchestration ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    name: str
    kind: str  # socket | aiohttp | murmur
    tuned: bool
    auth: str = ""


VARIANTS = [
    Variant("plain socket (recv_into one buffer)", "socket", False),
    Variant("raw aiohttp POST, default malloc", "aiohttp", False),
    Variant("raw aiohttp POST, tuned malloc", "aiohttp", True),
    Variant("Murmur MAC, default malloc", "murmur", False, "MAC"),
    Variant("Murmur MAC, tuned malloc (daemon default)", "murmur", True, "MAC"),
    Variant("Murmur SEALED, tuned malloc", "murmur", True, "SEALED"),
    Variant("Murmur SIGNED, tuned malloc", "murmur", True, "SIGNED"),
]


def _child(argv: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.bench_transport", *argv],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def run_variant(variant: Variant, reps: dict[str, int]) -> dict[str, list[float]]:
    port = _free_port()
    flags = ["--port", str(port), "--kind", variant.kind] + (["--tune"] if variant.tuned else [])
    server = _child(["--serve", *flags])
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError(f"{variant.name}: server did not start")
        client = _child(
            ["--client", *flags, "--auth", variant.auth or "MAC", "--reps-json", json.dumps(reps)]
        )
        out, _ = client.communicate(timeout=600)
        if client.returncode != 0:
            raise RuntimeError(f"{variant.name}: client failed")
        result: dict[str, list[float]] = json.loads(out.strip().splitlines()[-1])
        return result
    finally:
        server.kill()
        server.wait()


def child_main(args: argparse.Namespace) -> None:
    if args.tune:
        from p2p.daemon import tune_malloc

        tune_malloc()
    torch.set_num_threads(1)
    if args.serve:
        if args.kind == "socket":
            serve_socket(args.port)
        elif args.kind == "aiohttp":
            asyncio.run(serve_aiohttp(args.port))
        else:
            asyncio.run(serve_murmur(args.port))
        return
    reps: dict[str, int] = json.loads(args.reps_json)
    results: dict[str, list[float]] = {}
    for label, size in SIZES.items():
        n = reps[label] + 2  # two warm-up rounds, dropped
        if args.kind == "socket":
            times = client_socket(args.port, size, n)
        elif args.kind == "aiohttp":
            times = asyncio.run(client_aiohttp(args.port, size, n))
        else:
            times = asyncio.run(client_murmur(args.port, size, n, args.auth))
        results[label] = times[2:]
    print(json.dumps(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=10, help="timed messages per size (40 MB)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tune", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--auth", default="MAC", help=argparse.SUPPRESS)
    parser.add_argument("--reps-json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve or args.client:
        child_main(args)
        return
    reps = {"4 MB": args.reps * 3, "40 MB": args.reps}
    rows = []
    for variant in VARIANTS:
        result = run_variant(variant, reps)
        rows.append((variant, result))
        print(f"done: {variant.name}", file=sys.stderr, flush=True)
    base = {label: statistics.median(rows[0][1][label]) for label in SIZES}
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    print(f"repetitions: {reps} (median over timed messages after 2 warm-ups)\n")
    head = " | ".join(f"{label} ms | {label} GB/s | vs socket" for label in SIZES)
    print(f"| variant | {head} |")
    print("|---|" + "---:|" * (3 * len(SIZES)))
    for variant, result in rows:
        cells = []
        for label, size in SIZES.items():
            med = statistics.median(result[label])
            cells += [f"{med * 1e3:.1f}", f"{size / med / 1e9:.2f}", f"{base[label] / med:.2f}x"]
        print(f"| {variant.name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
