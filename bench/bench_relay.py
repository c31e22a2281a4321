"""The cost of a relay: a request through one relay beside the same request sent directly,
in one run, interleaved (A B A B ...), on loopback in one process.

Three daemons: ``a`` (reachable, relays for ``c``), ``b`` (reachable, the sender) and ``c``
(``no_listen``: reached only through ``a``). Each round times ``n`` sequential Ping/Pong
requests b -> a (direct) and b -> c (through a), and ``k`` one-way 100 KB posts each way,
awaited by the receiver's count. The relayed path adds one hop (a's head check and two stream
writes) and seals what the direct path would MAC.

``--round-d D`` (default 1e6; 0 skips it) also times a secure group round of 8 peers at
d = D (the daemon's ``GroupAveraging`` machine under the asyncio ``Driver``, on the hash
group of the 8: no matchmaking) with one member reached only through a relay (another member
of the group) beside the same round with all 8 direct, interleaved, all 16 transports in this
one event loop (so a round's time is the sum of all peers' CPU, the relay's included).

    python -m bench.bench_relay              # markdown tables on stdout
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import tempfile
import time
from pathlib import Path

import torch

from floor.envelope import Auth, EnvelopeCodec, Received
from floor.identity import Identity
from floor.messages import Refusal
from gossip.allreduce import AllReduceConfig, GroupAveraging
from gossip.driver import Driver
from gossip.matchmaking import HashGrouping
from gossip.network import StaticView, TransportNetwork
from p2p.config import DaemonConfig, HttpTransportConfig, MembershipConfig
from p2p.daemon import Daemon
from p2p.messages import MESSAGE_TYPES, Ping
from p2p.transport.http import HttpTransport

FAST = MembershipConfig(exchange_interval_s=0.2, ping_interval_s=0.5)


def _config(root: Path, name: str, **kw: object) -> DaemonConfig:
    return DaemonConfig(
        listen="127.0.0.1:0",
        data_dir=root / name,
        membership=FAST,
        tune_malloc=False,
        transport=HttpTransportConfig(relays=1, relay_messages_per_s=100_000),
        **kw,  # type: ignore[arg-type]
    )


async def _run(rounds: int, n: int, k: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"ping direct": [], "ping relayed": []}
    times |= {"post 100 KB direct": [], "post 100 KB relayed": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        async with Daemon(_config(root, "a")) as a:
            boot = (a.transport.addresses[0],)
            async with (
                Daemon(_config(root, "b", bootstrap=boot)) as b,
                Daemon(_config(root, "c", bootstrap=boot, no_listen=True)) as c,
            ):
                while not (c.transport.relays and b.transport.addresses_of(c.identity.peer_id)):
                    await asyncio.sleep(0.05)
                while not b.transport.addresses_of(c.identity.peer_id)[0].startswith("relay:"):
                    await asyncio.sleep(0.05)
                got = {a.identity.peer_id: 0, c.identity.peer_id: 0}
                arrived = asyncio.Event()

                def counter(me: Daemon) -> object:
                    async def handle(received: Received) -> None:
                        got[me.identity.peer_id] += 1
                        if got[me.identity.peer_id] % k == 0:
                            arrived.set()

                    return handle

                for d in (a, c):
                    d.transport.register(Refusal, counter(d))  # type: ignore[arg-type]
                blob = Refusal(code=0, reason="x" * 100_000)
                targets = {"direct": a.identity.peer_id, "relayed": c.identity.peer_id}
                for target in targets.values():  # warm up: proofs, streams
                    await b.transport.request(target, Ping(seq=0), auth=Auth.MAC)
                for _ in range(rounds):
                    for how, target in targets.items():
                        start = time.perf_counter()
                        for seq in range(n):
                            await b.transport.request(target, Ping(seq=seq), auth=Auth.MAC)
                        times[f"ping {how}"].append((time.perf_counter() - start) / n)
                        arrived.clear()
                        start = time.perf_counter()
                        for _ in range(k):
                            b.transport.post(target, blob, auth=Auth.MAC)
                        await asyncio.wait_for(arrived.wait(), 60)
                        times[f"post 100 KB {how}"].append((time.perf_counter() - start) / k)
    return times


N = 8
"""Members of the timed secure group."""


async def _secure_rounds(d: int, reps: int) -> tuple[dict[str, list[float]], list[int]]:
    """Time secure group rounds of 8: all direct vs one member behind a relay, interleaved.

    Each peer runs the daemon's machine (``GroupAveraging``, secure, Z_2^64) under the asyncio
    ``Driver`` on its own ``HttpTransport``; the group is the hash group of the 8 (no
    matchmaking messages), so only the group protocol is timed. Returns the round times per
    path and the bytes the relay forwarded in each relayed round.
    """
    everything: list[HttpTransport] = []
    drivers: dict[str, list[Driver]] = {}
    relay = relayed = None
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(d, generator=gen) for _ in range(N)]
    for k, how in enumerate(("direct", "relayed")):
        idents = [Identity.from_seed(bytes([k * N + r + 1]) * 32) for r in range(N)]
        transports = []
        for r, identity in enumerate(idents):
            codec = EnvelopeCodec(identity, message_types=MESSAGE_TYPES)
            behind = how == "relayed" and r == N - 1
            t = HttpTransport(codec, listen="127.0.0.1:0", serve_peers=not behind)
            await t.start()
            transports.append(t)
        everything += transports
        if how == "relayed":
            relay, relayed = transports[0], transports[-1]
            relay.reachable, relay.relay_capacity = True, 4
            relayed.reachable = False
            relayed.set_addresses(relay.local_id, relay.addresses, verified=True)
            await relayed.open_relay(relay.local_id, relay.addresses[0], timeout=10.0)
        for t in transports:
            for u in transports:
                if u is not t:
                    # The relayed peer's address is its relay address, proven by a sealed
                    # probe through the relay in the warm-up round, as in the daemon.
                    t.set_addresses(u.local_id, u.addresses, verified=u is not relayed)
        view = StaticView([i.peer_id for i in idents])
        config = AllReduceConfig(stage_timeout_s=30.0)
        drivers[how] = [
            Driver(
                TransportNetwork(t, view),
                GroupAveraging(
                    i.seed(), i.peer_id.raw, HashGrouping(i.peer_id.raw, size=N), config=config
                ),
            )
            for i, t in zip(idents, transports, strict=True)
        ]
    assert relay is not None and relayed is not None
    assert all(a.startswith("relay:") for a in relayed.addresses), relayed.addresses
    times: dict[str, list[float]] = {"direct": [], "relayed": []}
    forwarded: list[int] = []
    try:
        gc.collect()
        for rnd in range(reps + 1):  # the first round warms up proofs, streams and caches
            for how, group in drivers.items():
                before = relay.relay_forwarded_bytes
                start = time.perf_counter()
                out = await asyncio.gather(
                    *(p.average(xs[i], float(i + 1), rnd) for i, p in enumerate(group))
                )
                elapsed = time.perf_counter() - start
                if {o.group_size for o in out} != {N}:
                    raise RuntimeError(f"{how}: a member's round did not count all {N}")
                if rnd:
                    times[how].append(elapsed)
                    if how == "relayed":
                        forwarded.append(relay.relay_forwarded_bytes - before)
    finally:
        for group in drivers.values():
            for p in group:
                p.close()
        for t in everything:
            await t.aclose()
    return times, forwarded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--round-d", type=float, default=1e6)
    parser.add_argument("--round-reps", type=int, default=5)
    args = parser.parse_args()
    times = asyncio.run(_run(args.rounds, args.n, args.k))
    print(f"`python -m bench.bench_relay --rounds {args.rounds} --n {args.n} --k {args.k}`\n")
    print("| path | median per message | best | relayed / direct (median) |")
    print("|---|---:|---:|---:|")
    for kind in ("ping", "post 100 KB"):
        direct = statistics.median(times[f"{kind} direct"])
        for how in ("direct", "relayed"):
            values = times[f"{kind} {how}"]
            med = statistics.median(values)
            ratio = f"{med / direct:.2f}x" if how == "relayed" else ""
            print(f"| {kind} {how} | {med * 1e6:.0f} us | {min(values) * 1e6:.0f} us | {ratio} |")
    d = int(args.round_d)
    if d:
        rounds, forwarded = asyncio.run(_secure_rounds(d, args.round_reps))
        print(f"\nSecure group round of {N}, d = {d:,}, {args.round_reps} rounds each, interleaved")
        print(f"(`--round-d {d} --round-reps {args.round_reps}`):\n")
        print("| round | median | best | relayed / direct (median) | relay forwarded per round |")
        print("|---|---:|---:|---:|---:|")
        direct = statistics.median(rounds["direct"])
        for how in ("direct", "relayed"):
            values = rounds[how]
            med = statistics.median(values)
            ratio = f"{med / direct:.2f}x" if how == "relayed" else ""
            moved = f"{statistics.median(forwarded) / 2**20:.1f} MiB" if how == "relayed" else ""
            print(f"| {how} | {med:.3f} s | {min(values):.3f} s | {ratio} | {moved} |")


if __name__ == "__main__":
    main()
