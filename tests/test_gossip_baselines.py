"""Baselines over p2p's in-memory transport on a virtual clock: push-sum, pairwise, D-PSGD."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import networkx as nx
import pytest
import torch

from floor.envelope import EnvelopeCodec
from floor.errors import ConfigError
from floor.identity import Identity
from floor.transport.memory import MemoryNetwork, MemoryTransport
from gossip.allreduce import GroupAveraging
from gossip.baselines import Dpsgd, Pairwise, PushSum, metropolis_weights, topology
from gossip.driver import Averager, Driver
from gossip.machine import AverageResult
from gossip.messages import MESSAGE_TYPES
from gossip.network import StaticView, TransportNetwork
from gossip.run import build_machine
from gossip.spec import ALGORITHMS, RunSpec
from simulator.clock import new_virtual_loop


def run(coro_fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    with asyncio.Runner(loop_factory=new_virtual_loop) as runner:
        return runner.run(coro_fn())


def make(
    n: int, seed: int = 0
) -> tuple[list[TransportNetwork], list[MemoryTransport], list[Identity]]:
    memory = MemoryNetwork()
    idents = [
        Identity.from_seed(hashlib.sha256(f"bl{seed}-{i}".encode()).digest()) for i in range(n)
    ]
    transports = [
        MemoryTransport(EnvelopeCodec(i, message_types=MESSAGE_TYPES), memory) for i in idents
    ]
    for t in transports:
        for u in transports:
            t.set_addresses(u.local_id, u.addresses, verified=True)
    view = StaticView([i.peer_id for i in idents])
    return [TransportNetwork(t, view) for t in transports], transports, idents


def distance(vectors: Sequence[torch.Tensor]) -> float:
    stacked = torch.stack([v.double() for v in vectors])
    return float((stacked - stacked.mean(dim=0)).norm(dim=1).pow(2).mean().sqrt())


async def rounds(
    averagers: Sequence[Averager],
    xs: list[torch.Tensor],
    ws: list[float],
    count: int,
    stop: float | None = None,
) -> tuple[list[torch.Tensor], list[float], list[float]]:
    d = [distance(xs)]
    for rnd in range(count):
        out = await asyncio.gather(
            *(a.average(x, w, rnd) for a, x, w in zip(averagers, xs, ws, strict=True))
        )
        xs = [r.vector for r in out]
        ws = [r.weight for r in out]
        d.append(distance(xs))
        if stop is not None and d[-1] < stop * d[0]:
            break
    return xs, ws, d


def test_push_sum_32_peers_reach_the_weighted_mean() -> None:
    gen = torch.Generator().manual_seed(1)
    n = 32
    xs = [torch.randn(8, generator=gen, dtype=torch.float64) for _ in range(n)]
    ws = [float(w) for w in torch.randint(1, 10, (n,), generator=gen)]
    target = sum(x * w for x, w in zip(xs, ws, strict=True)) / sum(ws)

    async def main() -> tuple[list[torch.Tensor], list[float], list[float]]:
        nets, transports, _ = make(n, 1)
        avg = [
            Driver(net, PushSum(rng=random.Random(i), me=net.local_id.raw))
            for i, net in enumerate(nets)
        ]
        out = await rounds(avg, xs, ws, 200, stop=1e-6)
        for t in transports:
            await t.aclose()
        return out

    final, _, d = run(main)
    assert d[-1] < 1e-6 * d[0]
    assert len(d) - 1 <= 200
    for x in final:  # mass conservation: the consensus is the weighted mean
        assert torch.allclose(x, target, atol=1e-5)


def test_push_sum_on_a_directed_ring_converges() -> None:
    """Links only go one way (i -> i+1): push-sum needs no reply and no symmetric link."""
    n = 6
    xs = [torch.full((3,), float(i)) for i in range(n)]

    async def main() -> list[float]:
        nets, transports, idents = make(n, 2)
        ids = [i.peer_id.raw for i in idents]
        graph = nx.DiGraph([(i, (i + 1) % n) for i in range(n)])
        avg = [
            Driver(net, PushSum(out_neighbours=[ids[j] for j in graph.successors(i)]))
            for i, net in enumerate(nets)
        ]
        _, _, d = await rounds(avg, xs, [1.0] * n, 80)
        for t in transports:
            await t.aclose()
        return d

    d = run(main)
    assert d[-1] < 1e-3 * d[0]


def test_push_sum_a_share_that_is_not_delivered_is_lost_mass_not_a_wrong_estimate() -> None:
    """Push-sum has no acknowledgement: an undelivered share is lost mass (the weight halves),
    but the estimate s / w the peer keeps is still its own value, never skewed."""

    async def main() -> tuple[AverageResult, Driver]:
        nets, transports, _ = make(2, 3)
        await transports[1].aclose()  # the only out-neighbour is gone
        driver = Driver(nets[0], PushSum(me=nets[0].local_id.raw))
        result = await driver.average(torch.tensor([2.0, 4.0]), 3.0, 0)
        await asyncio.sleep(0.1)
        await transports[0].aclose()
        return result, driver

    r, driver = run(main)
    assert torch.equal(r.vector, torch.tensor([2.0, 4.0])) and r.weight == 1.5
    assert driver.send_failures == 1


def test_pairwise_gossip_conserves_the_total_and_contracts() -> None:
    gen = torch.Generator().manual_seed(4)
    n = 16
    xs = [torch.randn(5, generator=gen, dtype=torch.float64) for _ in range(n)]
    ws = [1.0 + i for i in range(n)]
    total = sum(x * w for x, w in zip(xs, ws, strict=True))

    async def main() -> tuple[list[torch.Tensor], list[float], list[float]]:
        nets, transports, _ = make(n, 4)
        machines = [Pairwise(rng=random.Random(i), me=n.local_id.raw) for i, n in enumerate(nets)]
        avg = [Driver(net, m) for net, m in zip(nets, machines, strict=True)]
        out = await rounds(avg, xs, ws, 25)
        assert sum(m.exchanges for m in machines) > 0
        for t in transports:
            await t.aclose()
        return out

    final, weights, d = run(main)
    assert d[-1] < 0.05 * d[0]
    after = sum(x * w for x, w in zip(final, weights, strict=True))
    assert torch.allclose(after, total, atol=1e-9)


@pytest.mark.parametrize("kind", ["ring", "regular", "erdos_renyi"])
def test_dpsgd_on_a_fixed_topology_keeps_the_mean(kind: str) -> None:
    n = 12
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(4, generator=gen, dtype=torch.float64) for _ in range(n)]
    mean = torch.stack(xs).mean(dim=0)
    graph = topology(kind, n, degree=3 + 1, p=0.4, seed=3)

    async def main() -> tuple[list[torch.Tensor], list[float]]:
        nets, transports, idents = make(n, 5)
        ids = sorted(i.peer_id.raw for i in idents)
        machines = [Dpsgd(metropolis_weights(graph, ids, net.local_id.raw)) for net in nets]
        avg = [Driver(net, m) for net, m in zip(nets, machines, strict=True)]
        final, _, d = await rounds(avg, xs, [1.0] * n, 30)
        assert all(m.missed == 0 for m in machines)
        for t in transports:
            await t.aclose()
        return final, d

    final, d = run(main)
    assert d[-1] < 0.5 * d[0]
    assert torch.allclose(torch.stack(final).mean(dim=0), mean, atol=1e-12)


def test_dpsgd_skips_a_silent_neighbour_by_its_deadline() -> None:
    async def main() -> tuple[AverageResult, int, float]:
        nets, transports, idents = make(3, 6)
        ids = [i.peer_id.raw for i in idents]
        graph = topology("ring", 3)
        machine = Dpsgd(metropolis_weights(graph, ids, ids[0]), timeout_s=0.5)
        avg = Driver(nets[0], machine)
        Driver(nets[1], Dpsgd(metropolis_weights(graph, ids, ids[1])))  # never averages
        loop = asyncio.get_running_loop()
        start = loop.time()
        result = await avg.average(torch.ones(2), 1.0, 0)
        elapsed = loop.time() - start
        for t in transports:
            await t.aclose()
        return result, machine.missed, elapsed

    result, missed, elapsed = run(main)
    assert missed == 2 and result.group_size == 1 and elapsed == pytest.approx(0.5)
    assert torch.equal(result.vector, torch.ones(2))


def test_topologies_are_checked() -> None:
    with pytest.raises(ConfigError):
        topology("torus", 5)
    with pytest.raises(ConfigError):
        topology("regular", 10, degree=0)  # no neighbours
    with pytest.raises(ConfigError):
        topology("erdos_renyi", 30, p=0.01, seed=1)  # disconnected
    g = topology("ring", 5)
    assert nx.is_connected(g) and all(d == 2 for _, d in g.degree)


def test_build_machine_by_name() -> None:
    idents = [Identity.from_seed(bytes([i]) * 32) for i in range(3)]
    ids = [i.peer_id.raw for i in idents]
    names = []
    for name in ALGORITHMS:
        machine = build_machine(
            RunSpec(algorithm=name),
            seed=idents[0].seed(),
            me=ids[0],
            graph=topology("ring", 3),
            peers=ids,
        )
        names.append(machine.name)
        assert isinstance(machine, GroupAveraging) == (name in ("secure", "plain"))
    assert names == list(ALGORITHMS)
    with pytest.raises(ConfigError):
        RunSpec(algorithm="best")
    with pytest.raises(ConfigError):  # D-PSGD needs its fixed topology
        build_machine(RunSpec(algorithm="dpsgd"), seed=idents[0].seed(), me=ids[0])
    with pytest.raises(ConfigError):
        build_machine(RunSpec(), seed=idents[0].seed(), me=ids[0], matchmaking="lottery")
