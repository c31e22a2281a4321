"""One group round of 8 peers over real aiohttp on loopback: secure vs plaintext vs gloo.

In one run, on the same data (8 float32 vectors of d elements, weights 1..8), every peer
running the daemon's machine (``gossip.allreduce.GroupAveraging``) under the asyncio ``Driver``:

* ``secure + matchmaking``: a whole round as the learner runs it: matchmaking by invitation
  (``Invitations``), then the secure group (``SecureGroup``: mpc SecAgg, butterfly);
* ``secure all-reduce``: the same on the hash group of the 8 (``HashGrouping``: no messages);
* ``plain + matchmaking`` and ``plain all-reduce``: our plaintext group on the same encoding;
* ``gloo all-reduce``: ``torch.distributed.all_reduce`` (gloo, 8 processes via
  ``torch.multiprocessing.spawn``, TCP on loopback) of the same float32 vectors, and of int64
  vectors of the same length (the bytes our ring moves).

Two modes for our peers, both run by default: ``processes`` (like gloo, each of the 8 peers in
its own spawned process with its own event loop and ``HttpTransport``; rounds start together at
a common ``time.perf_counter()`` instant (CLOCK_MONOTONIC, one clock for all processes on Linux)
and a round lasts until the last peer finished) and ``one process`` (8 ``HttpTransport``s in ONE
event loop: the wall time is the sum of the 8 peers' CPU, so CPU per peer is measured exactly).

    python -m bench.bench_group_round [--d 1000000] [--reps 5] [--mode both|processes|one]
                                      [--out bench/results/group_round.md]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import functools
import gc
import hashlib
import os
import platform
import random
import socket
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from floor.envelope import EnvelopeCodec
from floor.identity import Identity
from gossip.allreduce import AllReduceConfig, GroupAveraging
from gossip.driver import Driver
from gossip.machine import AverageResult, Out
from gossip.matchmaking import Group, HashGrouping, Invitations, MatchConfig
from gossip.network import StaticView, TransportNetwork
from p2p.daemon import tune_malloc
from p2p.messages import MESSAGE_TYPES
from p2p.transport.http import HttpTransport, HttpTransportConfig

N = 8


def _data(d: int) -> tuple[list[torch.Tensor], list[float]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(d, generator=gen) for _ in range(N)], [float(i + 1) for i in range(N)]


RINGS = {
    "64": {"bits": 64, "bound": 1e4},
    "auto": {"bits": None, "bound": 64.0},
}
"""``--ring``: 64 = Z_2^64 at the library's default public bound; auto = ``bits=None`` with the
public bound 64 (every |w x| here is < 45), for which a group of 8 picks Z_2^32 (scale 2^22)."""
_RING = "64"  # set by main() and by every peer process


class _Former:
    """A group former chosen per round: invitations (matchmaking) or the hash group of the 8
    (an already formed group, no messages)."""

    def __init__(self, me: bytes, rank: int) -> None:
        match = MatchConfig(target_size=N)  # defaults: min 3, back-off <= 50 ms
        self.invite = Invitations(me, match, rng=random.Random(rank))
        self.hashed = HashGrouping(me, size=N)
        self.match = True
        self.message_types = self.invite.message_types

    @property
    def _use(self) -> Invitations | HashGrouping:
        return self.invite if self.match else self.hashed

    @property
    def formed(self) -> Group | None:
        return self._use.formed

    @formed.setter
    def formed(self, value: Group | None) -> None:
        self._use.formed = value

    @property
    def failure(self) -> str | None:
        return self._use.failure

    @failure.setter
    def failure(self, value: str | None) -> None:
        self._use.failure = value

    @property
    def proposed(self) -> tuple[float, ...]:
        return self.invite.proposed

    @proposed.setter
    def proposed(self, value: tuple[float, ...]) -> None:
        self.invite.proposed = self.hashed.proposed = value

    @property
    def wake_at(self) -> float | None:
        return self._use.wake_at

    def start(self, now: float, round: int, view: Any) -> Out:
        return self._use.start(now, round, view)

    def receive(self, now: float, sender: bytes, message: Any) -> Out:
        return self.invite.receive(now, sender, message)  # only invitations send messages

    def wake(self, now: float) -> Out:
        return self._use.wake(now)

    def stop(self) -> Out:
        return self._use.stop()


class _Peer:
    """One peer of ours in one mode (secure or plain): its network, former and driver."""

    def __init__(
        self, rank: int, identity: Identity, transport: HttpTransport, view: StaticView, mode: str
    ) -> None:
        self.net = TransportNetwork(transport, view)
        me = identity.peer_id.raw
        self.former = _Former(me, rank)
        config = AllReduceConfig(stage_timeout_s=10.0, **RINGS[_RING])  # type: ignore[arg-type]
        machine = GroupAveraging(
            identity.seed(), me, self.former, secure=mode == "secure", config=config
        )
        self.driver = Driver(self.net, machine)

    async def run(self, x: torch.Tensor, w: float, r: int, *, match: bool) -> AverageResult:
        """One round: with matchmaking, or on the hash group of the 8."""
        self.former.match = match
        return await self.driver.average(x, w, r)


MODES = ("secure", "plain")
"""Each mode has its own 8 peers (and identities) per path: the two machines' matchmaking
messages are of one type, so one transport serves one of them."""


def _settle(freeze: bool) -> None:
    """After set-up: collect, and optionally freeze what is alive (imports, caches, peers)
    so that full collections during the rounds do not rescan it. Without this, one process
    holds ~250,000 objects after importing torch and a full collection takes ~130 ms here,
    landing in whichever round happens to trigger it."""
    gc.collect()
    if freeze:
        gc.freeze()


def _identity(rank: int, k: int = 0) -> Identity:
    """Peer ``rank`` of the ``k``-th set (path and mode): each has its own 8 identities, so
    that nothing cached per identity or group in one process is shared between them."""
    return Identity.from_seed(bytes([k * N + rank + 1]) * 32)


def _transport(identity: Identity, path: str) -> HttpTransport:
    config = HttpTransportConfig(stream=path == "stream")
    return HttpTransport(
        EnvelopeCodec(identity, message_types=MESSAGE_TYPES), listen="127.0.0.1:0", config=config
    )


async def _ours(
    d: int, reps: int, paths: list[str], freeze: bool
) -> dict[str, dict[str, list[float]]]:
    """All peers in this process and event loop; one set of 8 transports per path and mode.

    The paths run interleaved (every repetition runs all variants on each path in turn), so
    that a change in the machine's load hits them alike.
    """
    everything: list[HttpTransport] = []
    peers: dict[str, dict[str, list[_Peer]]] = {path: {} for path in paths}
    for k, path in enumerate(paths):
        for m, mode in enumerate(MODES):
            idents = [_identity(r, 2 * k + m) for r in range(N)]
            view = StaticView([i.peer_id for i in idents])
            transports = [_transport(i, path) for i in idents]
            everything += transports
            for t in transports:
                await t.start()
            for t in transports:
                for u in transports:
                    t.set_addresses(u.local_id, u.addresses, verified=True)
            peers[path][mode] = [
                _Peer(r, idents[r], t, view, mode) for r, t in enumerate(transports)
            ]
    xs, ws = _data(d)
    times: dict[str, dict[str, list[float]]] = {path: {} for path in paths}
    cpus: dict[str, dict[str, list[float]]] = {path: {} for path in paths}
    incomplete = dict.fromkeys(paths, 0)
    rnd = 0

    async def timed(path: str, name: str, make: Callable[[int], list[Awaitable[Any]]]) -> list[Any]:
        """Time one round; a round where not all 8 ended in one group is counted and redone."""
        nonlocal rnd
        for _ in range(5):
            rnd += 1
            start, cpu = time.perf_counter(), time.process_time()
            out = await asyncio.gather(*make(rnd), return_exceptions=True)
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
            sizes = {getattr(o, "size", getattr(o, "group_size", 0)) for o in out}
            if sizes == {N}:
                times[path].setdefault(name, []).append(elapsed)
                cpus[path].setdefault(name, []).append(cpu)
                return list(out)
            incomplete[path] += 1
            print(f"{name}: incomplete group, redone", flush=True)
            await asyncio.sleep(0.5)  # let the failed attempt's stragglers time out
        raise RuntimeError(f"{name}: no complete group in 5 attempts")

    def round_of(group: list[_Peer], match: bool) -> Callable[[int], list[Awaitable[Any]]]:
        return lambda r: [p.run(xs[i], ws[i], r, match=match) for i, p in enumerate(group)]

    try:
        for sets in peers.values():  # open the connections between all pairs
            for group in sets.values():
                rnd += 1
                await asyncio.gather(*(p.run(torch.zeros(8), 1.0, rnd, match=False) for p in group))
        _settle(freeze)
        for rep in range(reps + 1):  # the first repetition warms up connections and caches
            for path, sets in peers.items():
                results: list[Any] = []
                for match in (False, True):
                    for mode, group in sets.items():
                        name = f"{mode} + matchmaking" if match else f"{mode} all-reduce"
                        results += await timed(path, name, round_of(group, match))
                if not all(torch.equal(a.vector, results[0].vector) for a in results):
                    raise RuntimeError("the peers' results differ")
            if rep == 0:
                times = {path: {} for path in paths}
                cpus = {path: {} for path in paths}
    finally:
        for t in everything:
            await t.aclose()
    for path in paths:
        times[path]["_incomplete"] = [float(incomplete[path])]
        times[path].update({f"_cpu {k}": v for k, v in cpus[path].items()})
    return times


class _Sync:
    """What the 8 peer processes share: a barrier, the next start instant, round outcomes."""

    def __init__(self, ctx: Any, paths: int) -> None:
        self.barrier = ctx.Barrier(N)
        self.start_at = ctx.Value("d", 0.0)
        self.ok = ctx.Array("b", N)
        self.ports = ctx.Array("i", N * paths)

    async def wait(self) -> None:
        """Wait for all peers at the barrier while this process's event loop keeps serving."""
        await asyncio.to_thread(self.barrier.wait, 120.0)


_Outcome = tuple[
    int,
    dict[str, dict[str, list[float]]],
    dict[str, dict[str, list[float]]],
    list[float],
    list[str],
    int,
]


async def _peer_process(
    rank: int,
    d: int,
    reps: int,
    paths: list[str],
    sync: _Sync,
    out: Any,
    freeze: bool,
    profile: str = "",
) -> None:
    sets = [(path, mode) for path in paths for mode in MODES]  # set k: _identity(r, k)
    identities = [_identity(rank, k) for k in range(len(sets))]
    transports = [_transport(identities[k], path) for k, (path, _) in enumerate(sets)]
    for k, transport in enumerate(transports):
        await transport.start()
        sync.ports[k * N + rank] = int(transport.addresses[0].rsplit(":", 1)[1])
    await sync.wait()
    peers: dict[str, dict[str, _Peer]] = {path: {} for path in paths}
    for k, ((path, mode), transport) in enumerate(zip(sets, transports, strict=True)):
        for r in range(N):
            address = f"127.0.0.1:{sync.ports[k * N + r]}"
            transport.set_addresses(_identity(r, k).peer_id, [address], verified=True)
        view = StaticView([_identity(r, k).peer_id for r in range(N)])
        peers[path][mode] = _Peer(rank, identities[k], transport, view, mode)
    xs, ws = _data(d)
    x, w = xs[rank], ws[rank]
    ends: dict[str, dict[str, list[float]]] = {path: {} for path in paths}
    cpus: dict[str, dict[str, list[float]]] = {path: {} for path in paths}
    late: list[float] = []
    digests: list[str] = []
    incomplete = 0
    rnd = 0
    profiles: dict[str, cProfile.Profile] = {}

    async def timed(path: str, name: str, make: Callable[[int], Awaitable[Any]]) -> Any:
        """One round started by all peers at the same instant; redone if a group was short."""
        nonlocal rnd, incomplete
        for _ in range(5):
            rnd += 1
            await sync.wait()
            if rank == 0:
                sync.start_at.value = time.perf_counter() + 0.03
            await sync.wait()
            start_at = sync.start_at.value
            await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
            late.append(time.perf_counter() - start_at)
            prof = profiles.setdefault(f"{path} {name}", cProfile.Profile()) if profile else None
            cpu = time.process_time()
            if prof is not None:
                prof.enable()
            try:
                result = await make(rnd)
            except Exception as exc:  # a failed round is counted and redone
                result = exc
            end, cpu = time.perf_counter() - start_at, time.process_time() - cpu
            if prof is not None:
                prof.disable()
            size = getattr(result, "size", getattr(result, "group_size", 0))
            sync.ok[rank] = size == N
            await sync.wait()
            if all(sync.ok[:]):
                ends[path].setdefault(name, []).append(end)
                cpus[path].setdefault(name, []).append(cpu)
                return result
            incomplete += 1
            if rank == 0:
                print(f"{name}: incomplete group, redone", flush=True)
            await asyncio.sleep(0.5)
        raise RuntimeError(f"{name}: no complete group in 5 attempts")

    try:
        await sync.wait()
        for mine in peers.values():
            for peer in mine.values():
                rnd += 1
                await sync.wait()
                await peer.run(torch.zeros(8), 1.0, rnd, match=False)
        _settle(freeze)
        for rep in range(reps + 1):
            for path, mine in peers.items():
                got: dict[str, AverageResult] = {}
                for match in (False, True):
                    for mode, peer in mine.items():
                        name = f"{mode} + matchmaking" if match else f"{mode} all-reduce"
                        run = functools.partial(peer.run, x, w, match=match)
                        got[name] = await timed(path, name, run)
                s = got["secure + matchmaking"]
                if not all(torch.equal(s.vector, o.vector) for o in got.values()):
                    raise RuntimeError(f"peer {rank}: secure and plain results differ")
                digests.append(hashlib.sha256(s.vector.numpy().tobytes()).hexdigest())
            if rep == 0:
                ends = {path: {} for path in paths}
                cpus = {path: {} for path in paths}
                late = []
        await sync.wait()  # nobody closes while others still talk
    finally:
        for transport in transports:
            await transport.aclose()
    for key, prof in profiles.items():
        prof.dump_stats(Path(profile) / f"peer{rank} {key}.prof")
    out.put((rank, ends, cpus, late, digests, incomplete))


def _peer_main(
    rank: int,
    d: int,
    reps: int,
    paths: list[str],
    sync: _Sync,
    out: Any,
    env: tuple[bool, bool, str, str],
) -> None:
    global _RING
    tuned, freeze, _RING, profile = env
    torch.set_num_threads(1)
    if tuned:
        tune_malloc()
    asyncio.run(_peer_process(rank, d, reps, paths, sync, out, freeze, profile))


def _ours_processes(
    d: int, reps: int, paths: list[str], env: tuple[bool, bool, str, str]
) -> dict[str, dict[str, list[float]]]:
    """One spawned process per peer; a round lasts from the common start to the last finish."""
    ctx = mp.get_context("spawn")
    sync = _Sync(ctx, len(paths) * len(MODES))
    out = ctx.SimpleQueue()
    procs = [
        ctx.Process(target=_peer_main, args=(r, d, reps, paths, sync, out, env), daemon=True)
        for r in range(N)
    ]
    for proc in procs:
        proc.start()
    results: list[_Outcome] = [out.get() for _ in range(N)]
    for proc in procs:
        proc.join(30)
    results.sort(key=lambda item: item[0])
    if len({tuple(r[4]) for r in results}) != 1:
        raise RuntimeError("the peers' results differ")
    late = [max(values) for values in zip(*(r[3] for r in results), strict=True)]
    runs: dict[str, dict[str, list[float]]] = {}
    for path in paths:
        times: dict[str, list[float]] = {}
        for name in results[0][1][path]:
            rounds = zip(*(r[1][path][name] for r in results), strict=True)
            times[name] = [max(ends) for ends in rounds]
            cpu_rounds = zip(*(r[2][path][name] for r in results), strict=True)
            times[f"_cpu {name}"] = [sum(c) for c in cpu_rounds]
        times["_incomplete"] = [float(results[0][5])]
        times["_late"] = late
        runs[path] = times
    return runs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _gloo_worker(rank: int, port: int, d: int, reps: int, out: Any) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=N)
    xs, ws = _data(d)
    result: dict[str, list[float]] = {}
    for name, tensor in (
        ("gloo all-reduce (float32)", xs[rank] * ws[rank]),
        ("gloo all-reduce (int64, our ring's bytes)", torch.zeros(d + 1, dtype=torch.int64)),
    ):
        for rep in range(reps + 1):
            buf = tensor.clone()
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(buf)
            elapsed = time.perf_counter() - start
            dist.barrier()
            if rep:
                result.setdefault(name, []).append(elapsed)
    if rank == 0:
        out.put(result)
    dist.destroy_process_group()


def _gloo(d: int, reps: int) -> dict[str, list[float]]:
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(_gloo_worker, args=(_free_port(), d, reps, queue), nprocs=N, join=True)  # type: ignore[attr-defined,no-untyped-call]
    result: dict[str, list[float]] = queue.get()
    return result


VARIANTS = (
    "secure all-reduce",
    "plain all-reduce",
    "secure + matchmaking",
    "plain + matchmaking",
)
GLOO = ("gloo all-reduce (float32)", "gloo all-reduce (int64, our ring's bytes)")


MALLOC = {
    "tuned": "every peer process calls `p2p.daemon.tune_malloc()` as `murmur start` does"
    " (glibc keeps large buffers on the heap instead of a fresh mmap per 1 MB message).",
    "default": "glibc's defaults (a fresh mmap, page-faulted in, for every buffer >= 128 KiB).",
}


GC = {
    "freeze": "`gc.collect(); gc.freeze()` after set-up in every peer process, as the simulator"
    " does (the ~250,000 objects alive after importing torch are not rescanned by full"
    " collections, which took ~130 ms each).",
    "default": "Python's default (a full collection, ~130 ms here, lands in some rounds).",
}


def _med(values: list[float]) -> float:
    return statistics.median(values) * 1000


def _report(runs: dict[str, dict[str, list[float]]], args: argparse.Namespace, wall: float) -> str:
    """``runs`` maps "processes/stream", "one/post", ... and "gloo" to their times."""
    gloo = runs.pop("gloo")
    g = _med(gloo[GLOO[0]])
    paths = [p for p in ("stream", "post") if p in args.paths]
    lines = [
        "## gossip: one group round of 8 peers over aiohttp on loopback",
        "",
        f"Command: `python -m bench.bench_group_round --d {args.d} --reps {args.reps}"
        f" --mode {args.mode} --paths {','.join(args.paths)} --malloc {args.malloc}"
        f" --gc {args.gc} --ring {args.ring}` (median"
        f" of {args.reps} after one warm-up; whole run {wall:.0f} s wall).",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores shared with other engineers'"
        f" jobs (load average {args.load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at"
        f" the end); Python {platform.python_version()}, torch {torch.__version__}.",
        "",
        f"Data: 8 float32 vectors of d = {args.d:,}, weights 1..8; ours encodes `[w x, w]`"
        + (
            " in Z_2^64 (8 bytes per element: the int64 gloo row moves the same bytes)."
            if args.ring == "64"
            else " with `AllReduceConfig(bits=None, bound=64)`: the group picks Z_2^32 (4 bytes"
            " per element, the float32 gloo row's bytes; fixed-point step 2^-22)."
        )
        + " *processes*:"
        " each"
        " of our 8 peers in its own process (spawn) with its own event loop and `HttpTransport`"
        " (real sockets on 127.0.0.1, full envelopes), rounds started at a common instant, time"
        " to the last peer's finish: like gloo's 8 processes, all on the same cores. *one"
        " process*: the 8 peers in one event loop, so the wall time is the sum of their CPU."
        " CPU ms per peer = the 8 peers' process CPU for the round / 8. Paths: *stream* ="
        " envelopes up to 256 KiB over one WebSocket per peer pair, larger ones by POST"
        " (the default); *POST* = every envelope one `POST /v1/envelope`. Malloc"
        f" {args.malloc}: {MALLOC[args.malloc]} GC {args.gc}: {GC[args.gc]}",
        "",
    ]
    head = "| variant | path |"
    rule = "|---|---|"
    modes = [m for m in ("processes", "one") if any(k.startswith(m) for k in runs)]
    for mode in modes:
        label = "processes" if mode == "processes" else "one process"
        head += f" {label} median ms | min ms | / plain + mm | / gloo | CPU ms per peer |"
        rule += "---:|---:|---:|---:|---:|"
    lines += [head, rule]
    for name in VARIANTS:
        for path in paths:
            row = f"| {name} | {path} |"
            for mode in modes:
                t = runs[f"{mode}/{path}"]
                m, plain = _med(t[name]), _med(t["plain + matchmaking"])
                cpu = _med(t[f"_cpu {name}"]) / N
                row += f" {m:.0f} | {min(t[name]) * 1000:.0f} | {m / plain:.2f}x | {m / g:.1f}x"
                row += f" | {cpu:.1f} |"
            lines.append(row)
    for name in GLOO:
        m = _med(gloo[name])
        lines.append(
            f"| {name} | - | {m:.0f} | {min(gloo[name]) * 1000:.0f} | - | {m / g:.1f}x | - |"
            + " - | - | - | - | - |" * (len(modes) - 1)
        )
    lines.append("")
    for key, t in runs.items():
        secure, plain = _med(t["secure + matchmaking"]), _med(t["plain + matchmaking"])
        mode, path = key.split("/")
        extra = ""
        if "_late" in t:
            extra = (
                f"; the last peer to start began {_med(t['_late']):.1f} ms (median; max"
                f" {max(t['_late']) * 1000:.1f}) after the common instant"
            )
        # each repetition runs the two back to back: the ratio within a repetition cancels
        # the drift of the machine's load between repetitions
        paired = sorted(
            a / b for a, b in zip(t["secure + matchmaking"], t["plain + matchmaking"], strict=True)
        )
        q1, q3 = paired[len(paired) // 4], paired[(3 * len(paired)) // 4]
        lines.append(
            f"- {'processes' if mode == 'processes' else 'one process'}, {path}: secure round"
            f" **{secure:.0f} ms** (goal <= 150: {'met' if secure <= 150 else 'not met'}),"
            f" **{secure / plain:.2f}x** plaintext (goal <= 1.5x:"
            f" {'met' if secure / plain <= 1.5 else 'not met'}); paired per repetition: median"
            f" {statistics.median(paired):.2f}x, quartiles {q1:.2f}x-{q3:.2f}x; rounds redone"
            f" for a short group: {sum(t['_incomplete']):.0f}{extra}."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=1_000_000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--mode", choices=("both", "processes", "one"), default="both")
    parser.add_argument(
        "--paths",
        type=lambda v: v.split(","),
        default=["stream"],
        help="comma-separated transport paths: stream (the default path), post (POST only)",
    )
    parser.add_argument(
        "--malloc",
        choices=("tuned", "default"),
        default="tuned",
        help="tuned: p2p.daemon.tune_malloc() in every peer process, as the daemon does",
    )
    parser.add_argument(
        "--gc",
        choices=("freeze", "default"),
        default="freeze",
        help="freeze: gc.freeze() after set-up in every peer process (as the simulator does)",
    )
    parser.add_argument(
        "--ring",
        choices=tuple(RINGS),
        default="64",
        help="64: Z_2^64, public bound 1e4 (the defaults); auto: bits=None, bound 64 (Z_2^32)",
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="processes mode: every peer writes a cProfile of each variant's rounds to this"
        " directory ('peerR PATH VARIANT.prof'; profiling slows the rounds: not for timing)",
    )
    args = parser.parse_args()
    global _RING
    _RING = args.ring
    args.load_start = os.getloadavg()[0]
    if not set(args.paths) <= {"stream", "post"}:
        parser.error("--paths takes stream and/or post")
    torch.set_num_threads(1)  # as in the simulator: intra-op threads thrash on a shared box
    args.tuned = args.malloc == "tuned"
    if args.tuned:
        tune_malloc()  # what `murmur start` does (large bodies: no fresh mmap per buffer)
    start = time.perf_counter()
    runs: dict[str, dict[str, list[float]]] = {}
    if args.mode in ("both", "processes"):
        if args.profile is not None:
            args.profile.mkdir(parents=True, exist_ok=True)
        env = (args.tuned, args.gc == "freeze", args.ring, str(args.profile or ""))
        for path, times in _ours_processes(args.d, args.reps, args.paths, env).items():
            runs[f"processes/{path}"] = times
    if args.mode in ("both", "one"):
        for path, times in asyncio.run(
            _ours(args.d, args.reps, args.paths, args.gc == "freeze")
        ).items():
            runs[f"one/{path}"] = times
    runs["gloo"] = _gloo(args.d, args.reps)
    text = _report(runs, args, time.perf_counter() - start)
    print(text)
    if args.out is not None:
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
