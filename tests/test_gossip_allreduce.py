"""Secure and plaintext group all-reduce over p2p's in-memory transport, on a virtual clock.

Covers: exact weighted means (secure == plaintext, bit for bit), consensus of 32 peers under
changing groups, 20% of peers crashing mid-round every round (every round ends by its deadline),
and no silent partial results: a lost or late chunk makes the round fail loudly, never fall
back to local values.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import random
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import pytest
import torch

from floor.envelope import EnvelopeCodec
from floor.errors import (
    AggregationAborted,
    AggregationError,
    ConfigError,
    MurmurError,
    OutOfStage,
    PeerUnreachable,
    RingOverflow,
)
from floor.identity import Identity, PeerId
from floor.transport.memory import MemoryNetwork, MemoryTransport
from gossip.allreduce import AllReduceConfig, AllReduceStats, GroupAveraging
from gossip.driver import Driver
from gossip.machine import AverageResult, Out
from gossip.matchmaking import Group, HashGrouping, Invitations, MatchConfig
from gossip.messages import MESSAGE_TYPES, PlainChunk, PlainChunkSum
from gossip.network import GossipHandler, StaticView, TransportNetwork
from mpc.fixedpoint import decode, encode, max_scale
from mpc.messages import ChunkSum, Input, Receipt, Reveal, View
from simulator.clock import new_virtual_loop

STAGE = 1.0


def run(coro_fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run on the virtual clock: deadlines cost no wall time."""
    with asyncio.Runner(loop_factory=new_virtual_loop) as runner:
        return runner.run(coro_fn())


class FaultyNet:
    """Wraps a Network: can crash (everything fails both ways), drop or delay chosen sends."""

    def __init__(self, inner: TransportNetwork) -> None:
        self.inner = inner
        self.down = False
        self.crash_before: type | None = None
        self.drop: Callable[[PeerId, Any], bool] = lambda peer, msg: False
        self.delay: Callable[[PeerId, Any], float] = lambda peer, msg: 0.0

    @property
    def local_id(self) -> PeerId:
        return self.inner.local_id

    async def send(self, peer: PeerId, message: Any, *, timeout: float | None = None) -> None:
        if self.crash_before is not None and isinstance(message, self.crash_before):
            self.down = True  # crashes just before sending its first message of this kind
        if self.down or self.drop(peer, message):
            raise PeerUnreachable("injected")
        wait = self.delay(peer, message)
        if wait:
            await asyncio.sleep(wait)
        await self.inner.send(peer, message, timeout=timeout)

    async def request(self, peer: PeerId, message: Any, *, timeout: float | None = None) -> Any:
        if self.down:
            raise PeerUnreachable("injected")
        return await self.inner.request(peer, message, timeout=timeout)

    def register(self, message_type: type, handler: GossipHandler) -> None:
        async def guarded(sender: PeerId, msg: Any) -> Any:
            if self.down:
                raise OutOfStage("crashed")  # the sender sees a failed send
            reply = handler(sender, msg)
            return (await reply) if inspect.isawaitable(reply) else reply

        self.inner.register(message_type, guarded)

    def unregister(self, message_type: type) -> None:
        self.inner.unregister(message_type)

    def view(self) -> Sequence[PeerId]:
        return self.inner.view()

    def time(self) -> float:
        return self.inner.time()


class FixedGroup:
    """A ``GroupFormer`` that hands out the group it was given (the tests choose groups)."""

    message_types: tuple[type, ...] = ()

    def __init__(self) -> None:
        self.next: Group | None = None
        self.formed: Group | None = None
        self.failure: str | None = None
        self.wake_at: float | None = None

    def start(self, now: float, round: int, view: Sequence[bytes]) -> Out:
        self.formed, self.next = self.next, None
        if self.formed is None:
            self.failure = "no group given"
        return []

    def receive(self, now: float, sender: bytes, message: Any) -> Out:
        raise OutOfStage("no messages")

    def wake(self, now: float) -> Out:
        return []

    def stop(self) -> Out:
        return []


class Reducer:
    """One peer's secure and plain group machines, each run by a ``Driver`` on its network."""

    def __init__(self, net: Any, ident: Identity, config: AllReduceConfig) -> None:
        self.formers = {mode: FixedGroup() for mode in ("secure", "plain")}
        self.machines = {
            mode: GroupAveraging(
                ident.seed(), ident.peer_id.raw, f, secure=mode == "secure", config=config
            )
            for mode, f in self.formers.items()
        }
        self.drivers = {mode: Driver(net, m) for mode, m in self.machines.items()}

    async def _run(self, mode: str, group: Group, x: torch.Tensor, w: float) -> AverageResult:
        self.formers[mode].next = group
        return await self.drivers[mode].average(x, w, group.round)

    async def secure(self, group: Group, x: torch.Tensor, w: float) -> AverageResult:
        return await self._run("secure", group, x, w)

    async def plain(self, group: Group, x: torch.Tensor, w: float) -> AverageResult:
        return await self._run("plain", group, x, w)

    @property
    def stats(self) -> AllReduceStats:
        a, b = (m.stats for m in self.machines.values())
        return AllReduceStats(
            completed=a.completed + b.completed,
            recovered=a.recovered + b.recovered,
            aborted=a.aborted + b.aborted,
        )

    @property
    def send_failures(self) -> int:
        return sum(d.send_failures for d in self.drivers.values())

    def close(self) -> None:
        for d in self.drivers.values():
            d.close()


class Peers:
    """n peers on one MemoryNetwork, each with secure and plain group machines over a
    FaultyNet."""

    def __init__(self, n: int, *, seed: int = 0, config: AllReduceConfig | None = None) -> None:
        self.memory = MemoryNetwork()
        self.identities = [
            Identity.from_seed(hashlib.sha256(f"ar{seed}-{i}".encode()).digest()) for i in range(n)
        ]
        self.transports = [
            MemoryTransport(
                EnvelopeCodec(ident, message_types=MESSAGE_TYPES),
                self.memory,
                default_timeout_s=STAGE,
            )
            for ident in self.identities
        ]
        for t in self.transports:
            for u in self.transports:
                t.set_addresses(u.local_id, u.addresses, verified=True)
        self.ids = [i.peer_id for i in self.identities]
        self.view = StaticView(self.ids)
        self.nets = [FaultyNet(TransportNetwork(t, self.view)) for t in self.transports]
        cfg = config or AllReduceConfig(stage_timeout_s=STAGE)
        self.reducers = [
            Reducer(net, ident, cfg) for net, ident in zip(self.nets, self.identities, strict=True)
        ]

    def group(self, indices: Sequence[int], round: int = 0, gid: bytes = b"g" * 16) -> Group:
        return Group(round, gid, tuple(sorted(self.ids[i].raw for i in indices)))

    def close_reducers(self) -> None:
        for r in self.reducers:
            r.close()

    async def aclose(self) -> None:
        for t in self.transports:
            await t.aclose()


def scale_for(k: int) -> float:
    return AllReduceConfig().scale(k)


def exact_total(xs: Sequence[torch.Tensor], ws: Sequence[float], k: int) -> torch.Tensor:
    """The group totals [sum w x, sum w] as the fixed-point ring computes them (exact)."""
    scale = scale_for(k)
    ring = sum(
        encode(
            torch.cat([x.double() * w, torch.tensor([w], dtype=torch.float64)]),
            scale=scale,
            bits=64,
        )
        for x, w in zip(xs, ws, strict=True)
    )
    assert isinstance(ring, torch.Tensor)
    return decode(ring, scale=scale, bits=64)


def consensus_distance(vectors: Sequence[torch.Tensor]) -> float:
    stacked = torch.stack([v.double() for v in vectors])
    return float((stacked - stacked.mean(dim=0)).norm(dim=1).pow(2).mean().sqrt())


@pytest.mark.parametrize("mode", ["secure", "plain"])
def test_group_gets_the_exact_weighted_mean(mode: str) -> None:
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(37, generator=gen, dtype=torch.float64) for _ in range(8)]
    ws = [float(w) for w in torch.randint(1, 50, (8,), generator=gen)]

    async def main() -> list[AverageResult]:
        peers = Peers(8)
        group = peers.group(range(8))
        fns = [getattr(r, mode) for r in peers.reducers]
        out = await asyncio.gather(*(f(group, x, w) for f, x, w in zip(fns, xs, ws, strict=True)))
        await peers.aclose()
        return list(out)

    results = run(main)
    total = exact_total(xs, ws, 8)
    true_mean = sum(x * w for x, w in zip(xs, ws, strict=True)) / sum(ws)
    for r in results:
        assert r.group_size == 8
        assert r.total is not None and torch.equal(r.total, total)
        assert torch.equal(r.vector, results[0].vector)
        assert torch.allclose(r.vector, true_mean, atol=1e-9)
        assert r.weight == pytest.approx(sum(ws) / 8)


class PostingNet(FaultyNet):
    """A network with the optional ``post`` capability; counts what went through it."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.posted = 0
        self.failures: list[Any] = []
        self.tasks: set[asyncio.Task[None]] = set()

    def post(
        self,
        peer: PeerId,
        message: Any,
        *,
        timeout: float | None = None,
        on_failure: Callable[[Any, MurmurError], None] | None = None,
    ) -> None:
        self.posted += 1

        async def deliver() -> None:
            try:
                await self.send(peer, message, timeout=timeout)
            except MurmurError as exc:
                if on_failure is not None:
                    on_failure(message, exc)

        task = asyncio.ensure_future(deliver())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


@pytest.mark.parametrize("mode", ["secure", "plain"])
def test_a_network_that_posts_carries_the_round_without_send_tasks(mode: str) -> None:
    gen = torch.Generator().manual_seed(4)
    xs = [torch.randn(11, generator=gen, dtype=torch.float64) for _ in range(4)]

    async def main() -> tuple[list[AverageResult], list[PostingNet], list[Reducer]]:
        peers = Peers(4, seed=4)
        for r in peers.reducers:
            r.close()
        nets = [PostingNet(n.inner) for n in peers.nets]
        reducers = [
            Reducer(n, i, AllReduceConfig(stage_timeout_s=STAGE))
            for n, i in zip(nets, peers.identities, strict=True)
        ]
        group = peers.group(range(4))
        out = await asyncio.gather(
            *(getattr(r, mode)(group, x, 1.0) for r, x in zip(reducers, xs, strict=True))
        )
        await asyncio.gather(*(t for n in nets for t in set(n.tasks)))
        await peers.aclose()
        return list(out), nets, reducers

    results, nets, reducers = run(main)
    true_mean = sum(xs) / 4
    assert all(torch.allclose(r.vector, true_mean, atol=1e-9) for r in results)
    # all-to-all stages; a member sends the sums of both chunks it reduces (plain: its two
    # chunks to each reducer but itself, then two sums to everyone)
    per_member = {"secure": 4 * 3 + 2 * 3, "plain": 2 * 3 + 2 * 3}[mode]
    assert all(n.posted == per_member for n in nets)
    assert all(r.send_failures == 0 and r.stats.completed == 1 for r in reducers)


def test_secure_and_plain_agree_bit_for_bit() -> None:
    gen = torch.Generator().manual_seed(2)
    xs = [torch.randn(20, generator=gen, dtype=torch.float64) for _ in range(5)]

    async def main() -> tuple[list[AverageResult], list[AverageResult]]:
        peers = Peers(5, seed=2)
        out = []
        for mode, gid in (("secure", b"s" * 16), ("plain", b"p" * 16)):
            group = peers.group(range(5), gid=gid)
            out.append(
                await asyncio.gather(
                    *(
                        getattr(r, mode)(group, x, 2.0)
                        for r, x in zip(peers.reducers, xs, strict=True)
                    )
                )
            )
        await peers.aclose()
        return out[0], out[1]

    secure, plain = run(main)
    for s, p in zip(secure, plain, strict=True):
        assert torch.equal(s.vector, p.vector)


def test_values_beyond_the_public_bound_are_refused_before_sending() -> None:
    async def main() -> None:
        peers = Peers(3, config=AllReduceConfig(bound=10.0, stage_timeout_s=STAGE))
        with pytest.raises(RingOverflow):
            await peers.reducers[0].secure(peers.group(range(3)), torch.full((4,), 3.0), 5.0)
        with pytest.raises(ConfigError):
            await peers.reducers[0].plain(
                peers.group(range(3)), torch.tensor([1.0, float("nan")]), 1.0
            )
        with pytest.raises(RingOverflow):
            await peers.reducers[0].plain(
                peers.group(range(3)), torch.tensor([1.0, float("inf")]), 1.0
            )
        assert peers.nets[0].inner.sent == 0
        await peers.aclose()

    run(main)


def _rounds_until_consensus(mode: str, n: int, rounds: int, seed: int) -> list[float]:
    gen = torch.Generator().manual_seed(seed)

    async def main() -> list[float]:
        peers = Peers(n, seed=seed)
        peers.close_reducers()
        match = MatchConfig(target_size=8, min_size=3)
        averagers = [
            Driver(
                net,
                GroupAveraging(
                    ident.seed(),
                    ident.peer_id.raw,
                    Invitations(ident.peer_id.raw, match, rng=random.Random(seed * 1000 + i)),
                    secure=mode == "secure",
                    config=AllReduceConfig(stage_timeout_s=STAGE),
                ),
            )
            for i, (net, ident) in enumerate(zip(peers.nets, peers.identities, strict=True))
        ]
        xs = [torch.randn(16, generator=gen, dtype=torch.float64) for _ in range(n)]
        distances = [consensus_distance(xs)]
        for rnd in range(rounds):
            results = await asyncio.gather(
                *(a.average(x, 1.0, rnd) for a, x in zip(averagers, xs, strict=True)),
                return_exceptions=True,
            )
            xs = [
                r.vector if isinstance(r, AverageResult) else x
                for r, x in zip(results, xs, strict=True)
            ]
            distances.append(consensus_distance(xs))
            if distances[-1] < 1e-6 * distances[0]:
                break
        await peers.aclose()
        return distances

    return run(main)


def test_32_peers_reach_consensus_by_secure_group_averaging() -> None:
    distances = _rounds_until_consensus("secure", 32, rounds=20, seed=3)
    assert distances[-1] < 1e-6 * distances[0], distances
    assert len(distances) - 1 <= 20


def test_plain_group_rounds_conserve_the_weighted_total_exactly() -> None:
    gen = torch.Generator().manual_seed(4)
    n = 32
    xs = [torch.randn(10, generator=gen, dtype=torch.float64) for _ in range(n)]
    ws = [float(w) for w in torch.randint(1, 20, (n,), generator=gen)]

    async def main() -> tuple[list[AverageResult], list[bytes]]:
        peers = Peers(n, seed=4)
        peers.close_reducers()
        averagers = [
            Driver(
                net,
                GroupAveraging(
                    ident.seed(),
                    ident.peer_id.raw,
                    HashGrouping(ident.peer_id.raw, size=8),
                    secure=False,
                    config=AllReduceConfig(stage_timeout_s=STAGE),
                ),
            )
            for net, ident in zip(peers.nets, peers.identities, strict=True)
        ]
        out = await asyncio.gather(
            *(a.average(x, w, 7) for a, x, w in zip(averagers, xs, ws, strict=True))
        )
        await peers.aclose()
        return list(out), [p.raw for p in peers.ids]

    results, ids = run(main)
    scale = scale_for(8)
    index = {p: i for i, p in enumerate(ids)}
    seen: dict[bytes, torch.Tensor] = {}
    ring_total = torch.zeros(11, dtype=torch.int64)
    for r in results:
        assert r.total is not None and r.group is not None
        members = [index[p] for p in r.contributors]
        expected = exact_total([xs[i] for i in members], [ws[i] for i in members], 8)
        assert torch.equal(r.total, expected)  # exactly the ring sum of the members' inputs
        if r.group not in seen:
            seen[r.group] = r.total
            ring_total += torch.round(r.total * scale).to(torch.int64)
    everyone = sum(
        encode(torch.cat([x * w, torch.tensor([w], dtype=torch.float64)]), scale=scale, bits=64)
        for x, w in zip(xs, ws, strict=True)
    )
    assert len(seen) == n // 8 and all(r.group_size == 8 for r in results)
    assert torch.equal(ring_total, everyone)  # the network's weighted total, conserved exactly


CRASH_POINTS: list[type | None] = [
    None,
    Input,
    Receipt,
    View,
    Reveal,
    ChunkSum,
]


def test_20_percent_crash_mid_round_every_round_ends_by_its_deadline() -> None:
    n, rounds, crash = 32, 4, 6
    match = MatchConfig(target_size=8, min_size=3, round_timeout_s=2.0)
    # matchmaking deadline + 6 stages + the last sends, each bounded by STAGE
    bound = match.round_timeout_s + 8 * STAGE
    rng = random.Random(5)
    gen = torch.Generator().manual_seed(5)

    async def main() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        peers = Peers(n, seed=5)
        peers.close_reducers()
        averagers = [
            Driver(
                net,
                GroupAveraging(
                    ident.seed(),
                    ident.peer_id.raw,
                    Invitations(ident.peer_id.raw, match, rng=random.Random(50 + i)),
                    config=AllReduceConfig(stage_timeout_s=STAGE),
                ),
            )
            for i, (net, ident) in enumerate(zip(peers.nets, peers.identities, strict=True))
        ]
        ok = failed = 0
        for rnd in range(rounds):
            xs = [torch.randn(12, generator=gen, dtype=torch.float64) for _ in range(n)]
            for victim in rng.sample(range(n), crash):
                net = peers.nets[victim]
                when = rng.choice(CRASH_POINTS)
                if when is None:  # during matchmaking
                    loop.call_later(rng.uniform(0.0, match.backoff_s), setattr, net, "down", True)
                else:
                    net.crash_before = when
            start = loop.time()
            async with asyncio.timeout(bound):  # no peer hangs
                results = await asyncio.gather(
                    *(a.average(x, 1.0, rnd) for a, x in zip(averagers, xs, strict=True)),
                    return_exceptions=True,
                )
            assert loop.time() - start <= bound
            by_group: dict[bytes, AverageResult] = {}
            for r in results:
                if isinstance(r, BaseException):
                    assert isinstance(r, AggregationError), repr(r)  # typed, loud
                    failed += 1
                    continue
                ok += 1
                assert r.group is not None and r.total is not None and r.scale is not None
                members = [[p.raw for p in peers.ids].index(c) for c in r.contributors]
                ring = sum(
                    encode(
                        torch.cat([xs[i], torch.ones(1, dtype=torch.float64)]),
                        scale=r.scale,
                        bits=64,
                    )
                    for i in members
                )
                assert isinstance(ring, torch.Tensor)
                assert torch.equal(r.total, decode(ring, scale=r.scale, bits=64))  # exact
                first = by_group.setdefault(r.group, r)
                assert torch.equal(first.vector, r.vector)
            for net in peers.nets:
                net.down, net.crash_before = False, None
            await asyncio.sleep(STAGE)  # stray messages of the round die out
        await peers.aclose()
        return ok, failed

    ok, failed = run(main)
    assert ok > 0 and failed > 0


def _run_group(
    mode: str, k: int, setup: Callable[[Peers], None], seed: int = 6
) -> tuple[list[AverageResult | BaseException], list[torch.Tensor], Peers]:
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(30, generator=gen, dtype=torch.float64) for _ in range(k)]
    holder: list[Peers] = []

    async def main() -> list[AverageResult | BaseException]:
        peers = Peers(k, seed=seed)
        holder.append(peers)
        setup(peers)
        group = peers.group(range(k))
        loop = asyncio.get_running_loop()
        start = loop.time()
        async with asyncio.timeout(10 * STAGE):
            out = await asyncio.gather(
                *(getattr(r, mode)(group, x, 1.0) for r, x in zip(peers.reducers, xs, strict=True)),
                return_exceptions=True,
            )
        assert loop.time() - start <= 8 * STAGE
        await asyncio.sleep(3 * STAGE)  # let delayed messages land: they must change nothing
        await peers.aclose()
        return list(out)

    return run(main), xs, holder[0]


@pytest.mark.parametrize("fault", ["lost", "lost_twice", "late"])
def test_secure_a_lost_or_late_chunk_sum_fails_loudly_never_local(
    fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Chunk 5 is reduced by positions 5 and 0. The victim (position 3) loses one of its two
    sums (recovered: the other is the same sum), both (a typed abort, never a partial vector),
    or gets one late (exact either way)."""
    victim, chunk = 3, 5

    def setup(peers: Peers) -> None:
        members = peers.group(range(6)).members
        raws = [p.raw for p in peers.ids]
        target = members[victim]
        senders = [raws.index(members[chunk]), raws.index(members[0])]
        if fault == "lost":
            senders = senders[:1]

        def hit(peer: Any, msg: Any) -> bool:
            return isinstance(msg, ChunkSum) and msg.chunk == chunk and peer.raw == target

        for i in senders:
            if fault == "late":
                peers.nets[i].delay = lambda peer, msg: 3 * STAGE if hit(peer, msg) else 0.0
                break
            peers.nets[i].drop = hit

    caplog.set_level(logging.WARNING, logger="murmur.gossip.allreduce")
    results, xs, peers = _run_group("secure", 6, setup)
    raws = [p.raw for p in peers.ids]
    order = [raws.index(m) for m in peers.group(range(6)).members]
    exact = exact_total(xs, [1.0] * 6, 6)
    for pos, i in enumerate(order):
        r = results[i]
        if pos == victim and fault == "lost_twice":
            assert isinstance(r, AggregationAborted)  # a typed error, not a partial vector
            assert peers.reducers[i].stats.aborted == 1
        else:
            assert isinstance(r, AverageResult) and r.total is not None
            assert torch.equal(r.total, exact)
            if fault == "lost":  # only the victim missed a sum: only it finished by recovering
                assert r.recovered == (pos == victim)
                assert peers.reducers[i].stats.recovered == (pos == victim)
    if fault == "lost_twice":
        assert any("group_round_aborted" in rec.message for rec in caplog.records)


def test_plain_a_late_chunk_at_one_reducer_is_covered_by_its_partner() -> None:
    """Reducer 2 closes without member 0's chunks; the partner reducers of its two chunks have
    everyone's, so every member takes the sums over all five (exact) and ignores reducer 2's."""

    def setup(peers: Peers) -> None:
        members = peers.group(range(5)).members
        sender = [p.raw for p in peers.ids].index(members[0])
        late = lambda peer, msg: (  # noqa: E731
            3 * STAGE if isinstance(msg, PlainChunk) and peer.raw == members[2] else 0.0
        )
        peers.nets[sender].delay = late

    results, xs, _ = _run_group("plain", 5, setup)
    exact = exact_total(xs, [1.0] * 5, 5)
    for r in results:
        assert isinstance(r, AverageResult) and r.total is not None, r
        assert torch.equal(r.total, exact) and r.group_size == 5 and r.recovered


def test_plain_late_chunks_at_both_reducers_of_a_chunk_fail_loudly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Both reducers of chunk 2 close without member 0's chunks: no contributor set has a sum
    for every chunk, so nobody may average, and nobody substitutes its own values."""

    def setup(peers: Peers) -> None:
        members = peers.group(range(5)).members
        sender = [p.raw for p in peers.ids].index(members[0])
        slow = {members[2], members[3]}
        late = lambda peer, msg: (  # noqa: E731
            3 * STAGE if isinstance(msg, PlainChunk) and peer.raw in slow else 0.0
        )
        peers.nets[sender].delay = late

    caplog.set_level(logging.WARNING, logger="murmur.gossip.allreduce")
    results, _, peers = _run_group("plain", 5, setup)
    assert all(isinstance(r, AggregationAborted) for r in results), results
    assert sum(r.stats.aborted for r in peers.reducers) == 5
    assert sum("reducers disagree" in rec.message for rec in caplog.records) == 5


def test_plain_a_lost_chunk_sum_is_covered_and_losing_both_fails_for_its_member_only() -> None:
    target_of = lambda peers: peers.group(range(5)).members[4]  # noqa: E731

    def one(peers: Peers) -> None:
        target = target_of(peers)
        peers.nets[1].drop = lambda peer, msg: isinstance(msg, PlainChunkSum) and peer.raw == target

    def every(peers: Peers) -> None:
        target = target_of(peers)
        for net in peers.nets:
            net.drop = lambda peer, msg: isinstance(msg, PlainChunkSum) and peer.raw == target

    results, xs, peers = _run_group("plain", 5, one)
    exact = exact_total(xs, [1.0] * 5, 5)
    for r in results:
        assert isinstance(r, AverageResult) and r.total is not None
        assert torch.equal(r.total, exact)
    results, xs, peers = _run_group("plain", 5, every)
    exact = exact_total(xs, [1.0] * 5, 5)
    for i, r in enumerate(results):
        if peers.ids[i].raw == target_of(peers):
            assert isinstance(r, AggregationAborted)
        else:
            assert isinstance(r, AverageResult) and r.total is not None
            assert torch.equal(r.total, exact)


def test_plain_a_crashed_member_is_left_out_and_the_rest_average_exactly() -> None:
    """The crashed member's two chunks keep their other reducer: the four others average
    exactly over themselves (the counted set is exact: no partial average)."""

    def setup(peers: Peers) -> None:
        peers.nets[2].down = True

    results, xs, peers = _run_group("plain", 5, setup)
    live = [i for i in range(5) if i != 2]
    exact = exact_total([xs[i] for i in live], [1.0] * 4, 5)
    for i in live:
        r = results[i]
        assert isinstance(r, AverageResult) and r.total is not None, r
        assert torch.equal(r.total, exact) and r.group_size == 4 and r.recovered
        assert peers.ids[2].raw not in r.contributors
    assert isinstance(results[2], AggregationAborted)


def test_a_group_below_threshold_aborts_and_members_keep_their_models() -> None:
    def setup(peers: Peers) -> None:
        for i in (0, 1, 2):
            peers.nets[i].down = True

    results, _, peers = _run_group("secure", 6, setup)
    for i in (3, 4, 5):
        assert isinstance(results[i], AggregationAborted)
        assert peers.reducers[i].stats.completed == 0


def test_secagg_plus_groups_give_the_exact_result_too() -> None:
    gen = torch.Generator().manual_seed(8)
    xs = [torch.randn(25, generator=gen, dtype=torch.float64) for _ in range(10)]

    async def main() -> list[AverageResult]:
        peers = Peers(10, seed=8, config=AllReduceConfig(stage_timeout_s=STAGE, degree=4))
        group = peers.group(range(10))
        out = await asyncio.gather(
            *(r.secure(group, x, 1.0) for r, x in zip(peers.reducers, xs, strict=True))
        )
        await peers.aclose()
        return list(out)

    exact = exact_total(xs, [1.0] * 10, 10)
    for r in run(main):
        assert r.total is not None and torch.equal(r.total, exact)


def test_messages_for_a_finished_round_are_refused_and_early_ones_are_kept() -> None:
    from floor.errors import RemoteRefused
    from gossip.messages import PlainChunk as Chunk

    async def main() -> None:
        peers = Peers(3, seed=9)
        group = peers.group(range(3))
        members = [[p.raw for p in peers.ids].index(m) for m in group.members]
        a, b, c = members
        # b's chunk for c arrives before c starts the round: c keeps it and uses it
        late_start = asyncio.Event()

        async def c_round() -> AverageResult:
            await late_start.wait()
            return await peers.reducers[c].plain(group, torch.ones(2), 1.0)

        task_c = asyncio.ensure_future(c_round())
        task_ab = asyncio.gather(
            peers.reducers[a].plain(group, torch.ones(2), 1.0),
            peers.reducers[b].plain(group, torch.ones(2), 1.0),
        )
        for _ in range(5):
            await asyncio.sleep(0)
        assert group.id in peers.reducers[c].machines["plain"]._early  # before c's round began
        late_start.set()
        results = [*await task_ab, await task_c]
        assert all(r.group_size == 3 for r in results)
        stale = Chunk(group.id, 0, 0, torch.zeros(1, dtype=torch.int64))
        with pytest.raises(RemoteRefused):
            await peers.nets[a].inner.send(peers.ids[c], stale)
        await peers.aclose()

    run(main)


def test_auto_ring_width_picks_32_bits_only_when_the_resolution_allows() -> None:
    auto = AllReduceConfig(bits=None, bound=64.0, guard_bits=0)
    assert auto.ring_bits(8) == 32  # scale 2^22 >= 2^20
    # the default headroom of 4 bits costs 4 bits of resolution: 2^18 < 2^20, so Z_2^64
    assert AllReduceConfig(bits=None, bound=64.0).ring_bits(8) == 64
    assert AllReduceConfig(bits=None, bound=4.0).ring_bits(8) == 32
    assert AllReduceConfig(bits=None, bound=1e4).ring_bits(8) == 64  # 32 bits: scale 2^14
    assert AllReduceConfig(bits=None, bound=64.0, resolution=2.0**-30).ring_bits(8) == 64
    assert AllReduceConfig(bits=64, bound=64.0).ring_bits(8) == 64
    assert AllReduceConfig(bits=32, bound=1e4).ring_bits(8) == 32
    with pytest.raises(ConfigError):
        AllReduceConfig(bits=16)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        AllReduceConfig(bits=None, resolution=0.0)
    gen = torch.Generator().manual_seed(8)
    xs = [torch.randn(29, generator=gen, dtype=torch.float64) for _ in range(8)]

    async def main() -> list[AverageResult]:
        peers = Peers(
            8,
            seed=8,
            config=AllReduceConfig(bits=None, bound=64.0, stage_timeout_s=STAGE, guard_bits=0),
        )
        out = []
        for mode, gid in (("secure", b"s" * 16), ("plain", b"p" * 16)):
            group = peers.group(range(8), gid=gid)
            out += await asyncio.gather(
                *(getattr(r, mode)(group, x, 3.0) for r, x in zip(peers.reducers, xs, strict=True))
            )
        await peers.aclose()
        return out

    results = run(main)
    scale = max_scale(bound=64.0, members=8, bits=32)
    ring = sum(
        encode(torch.cat([x * 3.0, torch.tensor([3.0], dtype=torch.float64)]), scale=scale, bits=32)
        for x in xs
    )
    assert isinstance(ring, torch.Tensor) and ring.dtype == torch.int32
    for r in results:
        assert r.scale == scale and r.total is not None
        assert torch.equal(r.total, decode(ring, scale=scale, bits=32))  # exact, in Z_2^32
        assert torch.allclose(r.vector, sum(xs) / 8, atol=8 / scale)
