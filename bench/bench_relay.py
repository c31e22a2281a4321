"""The cost of a relay: a request through one relay beside the same request sent directly,
in one run, interleaved (A B A B ...), on loopback in one process.

Three daemons: ``a`` (reachable, relays for ``c``), ``b`` (reachable, the sender) and ``c``
(``no_listen``: reached only through ``a``). Each round times ``n`` sequential Ping/Pong
requests b -> a (direct) and b -> c (through a), and ``k`` one-way 100 KB posts each way,
awaited by the receiver's count. The relayed path adds one hop (a's head check and two stream
writes) and seals what the direct path would MAC.

    python -m bench.bench_relay              # markdown table on stdout
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from floor.envelope import Auth, Received
from floor.messages import Refusal
from p2p.config import DaemonConfig, HttpTransportConfig, MembershipConfig
from p2p.daemon import Daemon
from p2p.messages import Ping

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--k", type=int, default=100)
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


if __name__ == "__main__":
    main()
