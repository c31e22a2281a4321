"""The four attacks of issue 14 against real daemons, before and after the fix, side by side.

Each attack runs against a fresh ``murmur start`` subprocess on 127.0.0.1 (default settings,
the daemon tests' fast membership) while a client polls ``GET /v1/status`` every 20 ms:

1. trickle: N connections each declare ``Content-Length: 64 MiB`` and send 3 bytes; RSS growth
   after 2 s, and how long until the daemon closes them;
2. amplify: one SIGNED join from a fresh key whose body is 63 MiB of empty msgpack arrays;
   peak RSS growth, RSS kept afterwards, the longest status answer (the loop blocked);
3. replay: the replay cache itself (both versions loaded from their trees), flooded with
   2x its capacity by one sender stamping now+115 s (and now+9 s); then honest envelopes
   stamped now (the daemon-level flood is ``tests/test_hardening.py``);
4. forge: a stranger re-joins every 0.5 s for 20 s with a record naming a bystander service
   on loopback; what reaches the bystander.

``--before REV`` runs the same attacks against a git worktree of REV (the code before the
fix) in the same invocation. Always stops the daemons and removes the worktree.

    python -m bench.bench_hardening [--before 057ca49] [--connections 100] [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.bench_daemon_training import free_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "hardening.md"
CONFIG = """
log_level = "warning"
[membership]
exchange_interval_s = 0.3
ping_interval_s = 0.25
ping_timeout_s = 0.6
suspect_after_s = 1.0
dead_after_s = 2.0
join_timeout_s = 1.0
join_attempts = 2
join_retry_delay_s = 0.2
"""


@dataclass
class Daemon:
    tree: Path
    workdir: Path
    name: str
    extra: tuple[str, ...] = ()
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Daemon:
        config = self.workdir / "bench.toml"
        config.write_text(CONFIG)
        log = open(self.workdir / f"{self.name}.log", "ab")  # noqa: SIM115 - the child owns it
        env = {**os.environ, "PYTHONPATH": str(self.tree)}
        cmd = [sys.executable, "-m", "p2p.cli", "start", "--listen", self.address]
        cmd += ["--data-dir", str(self.workdir / self.name), "--config", str(config)]
        self.proc = subprocess.Popen(
            [*cmd, *self.extra], stdout=subprocess.DEVNULL, stderr=log, cwd=self.tree, env=env
        )
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                self.status()
                return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"daemon {self.name} did not start")

    def status(self) -> dict[str, Any]:
        import json

        url = f"http://{self.address}/v1/status"
        with urllib.request.urlopen(url, timeout=2) as resp:
            result: dict[str, Any] = json.loads(resp.read())
            return result

    def rss_mb(self) -> float:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Watch:
    """Polls status every 20 ms (longest answer, failures) and samples RSS (peak)."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.longest = 0.0
        self.failures = 0
        self.peak_rss = daemon.rss_mb()
        self._tasks: list[asyncio.Task[None]] = []

    async def _poll(self) -> None:
        url = f"http://{self.daemon.address}/v1/status"
        async with aiohttp.ClientSession() as session:
            while True:
                start = time.perf_counter()
                try:
                    async with asyncio.timeout(30), session.get(url) as resp:
                        await resp.read()
                except (TimeoutError, aiohttp.ClientError):
                    self.failures += 1
                self.longest = max(self.longest, time.perf_counter() - start)
                await asyncio.sleep(0.02)

    async def _rss(self) -> None:
        while True:
            self.peak_rss = max(self.peak_rss, self.daemon.rss_mb())
            await asyncio.sleep(0.02)

    async def __aenter__(self) -> Watch:
        self._tasks = [asyncio.create_task(self._poll()), asyncio.create_task(self._rss())]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


# ---------------------------------------------------------------- 1. trickle


async def trickle(daemon: Daemon, connections: int) -> dict[str, Any]:
    await asyncio.sleep(1.0)
    before = daemon.rss_mb()
    head = (
        b"POST /v1/envelope HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/vnd.murmur.envelope\r\n"
        b"Content-Length: 67108864\r\n\r\nMRM"
    )
    async with Watch(daemon) as watch:
        conns = []
        for _ in range(connections):
            reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
            writer.write(head)
            await writer.drain()
            conns.append((reader, writer))
        start = time.monotonic()
        await asyncio.sleep(2.0)
        grown = daemon.rss_mb() - before

        async def closed_after(reader: asyncio.StreamReader) -> float:
            try:
                async with asyncio.timeout(45):
                    await reader.read()
                return time.monotonic() - start
            except (TimeoutError, ConnectionError):
                return float("inf")

        times = await asyncio.gather(*(closed_after(r) for r, _ in conns))
    for _, writer in conns:
        writer.close()
    await asyncio.sleep(1.0)
    return {
        "rss_growth_mb": grown,
        "kept_mb": daemon.rss_mb() - before,
        "closed": sum(t != float("inf") for t in times),
        "closed_after_s": max(t for t in times) if times else 0.0,
        "status_max_ms": watch.longest * 1e3,
        "status_failures": watch.failures,
    }


# ---------------------------------------------------------------- 2. amplify


def _amplified_join(target_port: int) -> bytes:
    """A signed Join from a fresh key whose body is 63 MiB of 0x90 (built with our codec)."""
    import floor.envelope as envelope_module
    from floor.envelope import Auth, EnvelopeCodec
    from floor.identity import Identity
    from p2p.messages import MESSAGE_TYPES, Join, PeerRecord

    fresh = Identity.generate()
    codec = EnvelopeCodec(fresh, message_types=MESSAGE_TYPES)
    n = 63 * 2**20
    packed = b"\x91\xdd" + struct.pack(">I", n) + b"\x90" * n
    body = struct.pack("<II", len(packed), 0) + packed
    original = envelope_module.encode_body_parts
    envelope_module.encode_body_parts = lambda _m: ([body], len(body))  # type: ignore[assignment]
    try:
        record = PeerRecord.create(fresh, (f"127.0.0.1:{target_port}",), time.time())
        return codec.encode(Join(record), recipient=None, auth=Auth.SIGNED)
    finally:
        envelope_module.encode_body_parts = original


async def amplify(daemon: Daemon) -> dict[str, Any]:
    from p2p.transport.http import EnvelopePayload

    await asyncio.sleep(1.0)
    envelope = _amplified_join(9)
    before = daemon.rss_mb()
    outcome = "?"
    async with Watch(daemon) as watch, aiohttp.ClientSession() as session:
        start = time.perf_counter()
        try:
            url = f"http://{daemon.address}/v1/envelope"
            async with (
                asyncio.timeout(120),
                session.post(url, data=EnvelopePayload(envelope)) as resp,
            ):
                await resp.read()
                outcome = f"HTTP {resp.status} code {resp.headers.get('Murmur-Refusal')}"
        except aiohttp.ClientError as exc:
            outcome = f"closed early ({type(exc).__name__})"
        answered = time.perf_counter() - start
        await asyncio.sleep(1.0)
    await asyncio.sleep(2.0)
    return {
        "outcome": outcome,
        "answered_s": answered,
        "peak_growth_mb": watch.peak_rss - before,
        "kept_mb": daemon.rss_mb() - before,
        "status_max_ms": watch.longest * 1e3,
        "status_failures": watch.failures,
    }


# ---------------------------------------------------------------- 3. replay (the cache itself)


def _load_replay(tree: Path) -> Any:
    spec = importlib.util.spec_from_file_location(
        f"replay_{abs(hash(tree))}", tree / "floor/replay.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ReplayCache


def replay(tree: Path, capacity: int, ahead: float) -> dict[str, Any]:
    cache_cls = _load_replay(tree)
    cache = cache_cls(120.0, capacity)
    per_sender = hasattr(cache, "per_sender")
    rng = random.Random(1)
    now = 10_000.0
    flooder, honest = b"f" * 32, b"h" * 32

    def add(sender: bytes, nonce: bytes, stamp: float, at: float) -> None:
        if per_sender:
            cache.add(sender, nonce, stamp, at)
        else:
            cache.add(nonce, stamp, at)

    start = time.perf_counter()
    refused_flood = 0
    for i in range(2 * capacity):
        try:  # +115 s: inside the old +-120 s window, past the new skew; +9 s: inside both
            add(flooder, rng.randbytes(24), now + ahead + i * 1e-6, now)
        except Exception:
            refused_flood += 1
    flood_s = time.perf_counter() - start
    refused: list[float] = []
    for step in range(200):  # honest envelopes stamped "now", over the next 100 s
        at = now + step * 0.5
        try:
            add(honest, rng.randbytes(24), at, at)
        except Exception:
            refused.append(at - now)
    return {
        "flood_refused": refused_flood,
        "flood_us_per_add": flood_s / (2 * capacity) * 1e6,
        "honest_refused": len(refused),
        "honest_refused_for_s": (max(refused) if refused else 0.0),
    }


# ---------------------------------------------------------------- 4. forge


async def forge(daemon: Daemon, seconds: float) -> dict[str, Any]:
    from floor.envelope import Auth, EnvelopeCodec
    from floor.identity import Identity
    from p2p.messages import MESSAGE_TYPES, Join, PeerRecord

    heads: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(2.0):
                heads.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    service = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    forger = Identity.generate()
    codec = EnvelopeCodec(forger, message_types=MESSAGE_TYPES)
    url = f"http://{daemon.address}/v1/envelope"
    metadata = 0
    async with aiohttp.ClientSession() as session:
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            record = PeerRecord.create(forger, (service,), time.time())
            async with session.post(
                url, data=codec.encode(Join(record), recipient=None, auth=Auth.SIGNED)
            ) as r:
                await r.read()
            other = Identity.generate()  # and a record naming the cloud metadata address
            rec = PeerRecord.create(other, ("169.254.169.254:80",), time.time())
            data = EnvelopeCodec(other, message_types=MESSAGE_TYPES).encode(
                Join(rec), recipient=None, auth=Auth.SIGNED
            )
            async with session.post(url, data=data) as r:
                await r.read()
            peers = await asyncio.to_thread(_get_peers, daemon)  # right after the join
            metadata += any("169.254.169.254:80" in p["addresses"] for p in peers)
            await asyncio.sleep(0.5)
    server.close()
    return {
        "requests": len(heads),
        "upgrades": sum(b"upgrade: websocket" in h.lower() for h in heads),
        "non_probe": sum(not h.startswith(b"POST /v1/envelope ") for h in heads),
        "link_local_records_taken": metadata,
    }


def _get_peers(daemon: Daemon) -> list[dict[str, Any]]:
    import json

    with urllib.request.urlopen(f"http://{daemon.address}/v1/peers", timeout=2) as resp:
        result: list[dict[str, Any]] = json.loads(resp.read())
        return result


# ---------------------------------------------------------------- driver


@contextmanager
def worktree(rev: str | None) -> Iterator[Path | None]:
    if rev is None:
        yield None
        return
    path = Path(tempfile.mkdtemp(prefix="murmur-before-"))
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(path), rev],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    try:
        yield path
    finally:
        subprocess.run(
            ["git", "worktree", "remove", "--force", str(path)], cwd=ROOT, capture_output=True
        )
        shutil.rmtree(path, ignore_errors=True)


async def run_tree(tree: Path, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in ("trickle", "amplify", "forge"):
            daemon = Daemon(tree, work, name).start()
            try:
                if name == "trickle":
                    out[name] = await trickle(daemon, args.connections)
                elif name == "amplify":
                    out[name] = await amplify(daemon)
                else:
                    out[name] = await forge(daemon, args.forge_seconds)
            finally:
                daemon.stop()
    out["replay"] = replay(tree, args.replay_capacity, 115.0)
    out["replay9"] = replay(tree, args.replay_capacity, 9.0)
    return out


def _row(label: str, values: dict[str, Any]) -> str:
    cells = []
    for value in values.values():
        cells.append(f"{value:.1f}" if isinstance(value, float) else str(value))
    return f"| {label} | " + " | ".join(cells) + " |"


NOTES = """
How to read it. *before* is the code before issue 14 (a git worktree of that commit, run in
the same invocation); *after* is this tree with default settings. `status_max_ms` is the
longest `GET /v1/status` answer during the attack (the event loop blocked at least that long).
Trickling connections are closed at `transport.body_timeout_s` (30 s); before, never.
Attack 3 loads each version's `floor/replay.py` and floods it in process (filling the daemon's
1,000,000-entry cache over HTTP takes minutes); `flood_us_per_add` is the cache's own cost per
accepted-or-refused envelope (the per-sender accounting costs ~0.3-0.9 us more). The
daemon-level flood (one identity at now+115 s and now+9 s plus 40 fresh identities, 1.2x a
2,000-entry cache) is `tests/test_hardening.py`: honest pings are accepted throughout and right
after, and the victim and its neighbour keep each other in view. Attack 4's bystander gets the
probes of the backoff (t = 0, 2, 6, 14 s), each one signed POST; before, 121 requests in 20 s,
among them protocol messages and a WebSocket upgrade, and every link-local record was taken."""


def report(results: dict[str, dict[str, dict[str, Any]]], args: argparse.Namespace) -> str:
    lines = [
        "## Hardening: the attacks of issue 14, before and after",
        "",
        f"`python -m bench.bench_hardening --before {args.before} --connections "
        f"{args.connections} --write` on this machine (2 cores); one daemon per attack, "
        "status polled every 20 ms during it.",
        *NOTES.splitlines(),
        "",
    ]
    heads = {
        "trickle": f"1. {args.connections} connections declaring 64 MiB, sending 3 bytes",
        "amplify": "2. one signed join of 63 MiB of empty msgpack arrays",
        "replay": f"3a. replay cache ({args.replay_capacity:,} entries) flooded 2x by one "
        "sender at now+115 s, then 200 honest envelopes over 100 s",
        "replay9": "3b. the same flood stamped now+9 s (inside the new skew)",
        "forge": f"4. a record naming a bystander, re-joined every 0.5 s for "
        f"{args.forge_seconds:g} s (plus link-local records)",
    }
    for attack, title in heads.items():
        lines += [f"### {title}", ""]
        first = next(iter(results.values()))[attack]
        lines.append("| code | " + " | ".join(first) + " |")
        lines.append("|---|" + "---|" * len(first))
        for label, per_tree in results.items():
            lines.append(_row(label, per_tree[attack]))
        lines.append("")
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> None:
    results: dict[str, dict[str, dict[str, Any]]] = {}
    with worktree(args.before) as before:
        if before is not None:
            results[f"before ({args.before})"] = await run_tree(before, args)
            print(results)
        results["after"] = await run_tree(ROOT, args)
    text = report(results, args)
    print(text)
    if args.write:
        RESULTS.write_text(text + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=None, help="git revision to compare against")
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--replay-capacity", type=int, default=100_000)
    parser.add_argument("--forge-seconds", type=float, default=20.0)
    parser.add_argument("--write", action="store_true", help="write bench/results/hardening.md")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
