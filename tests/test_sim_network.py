"""The simulated network: exact message sizes, tick-grouped delivery, loss and partitions."""

from __future__ import annotations

import asyncio

import torch

import mpc
from p2p.envelope import Auth, EnvelopeCodec
from p2p.identity import Identity
from simulator.clock import new_virtual_loop
from simulator.config import Scenario
from simulator.messages import ModelShare, PlainChunk, auth_for, registry, wire_size
from simulator.network import SimNetwork


def test_wire_size_matches_the_codec() -> None:
    a, b = Identity.from_seed(bytes(32)), Identity.from_seed(bytes([7]) * 32)
    codec = EnvelopeCodec(a, message_types=registry())
    messages = [
        ModelShare(3, torch.randn(650), 2.0),
        PlainChunk(b"g" * 16, 1, 2, torch.zeros(81, dtype=torch.float64), 1.0),
        mpc.Receipt(b"g" * 16, 1, (b"a" * 32, b"b" * 32), True),
        mpc.Reveal(b"g" * 16, 1, {b"a" * 32: b"s" * 33}, {}),
        mpc.MaskedChunk(b"g" * 16, 1, 0, torch.zeros(82, dtype=torch.int64), (b"x" * 32,)),
    ]
    for msg in messages:
        for auth in [auth_for(msg)] if getattr(msg, "SECRET", False) else list(Auth):
            assert wire_size(msg, auth) == len(codec.encode(msg, recipient=b.peer_id, auth=auth))


def _exchange(
    scenario: Scenario, n: int, count: int
) -> tuple[SimNetwork, list[tuple[float, int, int]]]:
    got: list[tuple[float, int, int]] = []

    async def main() -> SimNetwork:
        loop = asyncio.get_running_loop()
        net = SimNetwork(loop, scenario, n, [True] * n)
        for p in range(n):
            net.register(p, ModelShare, lambda s, m, p=p: got.append((loop.time(), s, m.round)))
        for i in range(count):
            net.post(i % n, (i + 1) % n, ModelShare(i, torch.zeros(10), 1.0))
        await asyncio.sleep(100.0)
        return net

    with asyncio.Runner(loop_factory=new_virtual_loop) as runner:
        return runner.run(main()), got


def test_deliveries_share_one_timer_per_tick_and_arrive_after_latency() -> None:
    s = Scenario(latency_ms=1000.0, latency_jitter_ms=0.0, link_spread=0.0, tick_ms=10.0)
    net, got = _exchange(s, 8, 400)
    assert len(got) == 400
    assert net.timers <= 3  # one tick bucket for every simultaneous arrival
    assert all(t >= 1.0 for t, _, _ in got)
    assert (
        net.bytes_sent == net.bytes_received == 400 * wire_size(ModelShare(0, torch.zeros(10), 1.0))
    )
    _, again = _exchange(s, 8, 400)
    assert again == got  # same order, same virtual times


def test_loss_and_partition_drop_messages() -> None:
    lossy, got = _exchange(Scenario(loss=0.5), 8, 400)
    assert 100 < lossy.messages_lost < 300 and len(got) == 400 - lossy.messages_lost
    split = Scenario(partition_start_s=0.0, partition_end_s=10.0, partition_fraction=0.5)
    cut, got = _exchange(split, 8, 400)
    assert cut.messages_lost > 0 and cut.bytes_received < cut.bytes_sent


def test_wire_fidelity_delivers_checked_envelopes() -> None:
    net, got = _exchange(Scenario(fidelity="wire"), 4, 20)
    assert len(got) == 20 and net.refused == 0


def test_sim_peer_network_send_request_refusal_and_departure() -> None:
    from gossip.messages import PairwiseOffer, PairwiseReply
    from murmur.errors import MalformedMessage, PeerUnreachable, RemoteRefused
    from simulator.gossipnet import SimPeerNetwork

    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        online = [True] * 3
        net = SimNetwork(
            loop, Scenario(latency_ms=100.0, latency_jitter_ms=0.0, link_spread=0.0), 3, online
        )
        peers = [SimPeerNetwork(net, i, lambda: net.ids) for i in range(3)]
        seen: list[str] = []

        async def answer(sender: object, msg: PairwiseOffer) -> PairwiseReply:
            if msg.round < 0:
                raise MalformedMessage("negative round")
            seen.append(f"offer {msg.round}")
            return PairwiseReply(True, msg.vector * 2, msg.weight)

        peers[1].register(PairwiseOffer, answer)
        start = loop.time()
        reply = await peers[0].request(net.ids[1], PairwiseOffer(1, torch.ones(3), 1.0))
        assert torch.equal(reply.vector, torch.full((3,), 2.0))
        assert loop.time() - start >= 0.2  # there and back
        assert peers[0].view() == [net.ids[1], net.ids[2]]
        try:
            await peers[0].request(net.ids[1], PairwiseOffer(-1, torch.ones(3), 1.0))
        except RemoteRefused as exc:
            seen.append(f"refused {int(exc.code)}")
        online[2] = False
        try:
            await peers[0].send(net.ids[2], PairwiseOffer(2, torch.ones(3), 1.0), timeout=5.0)
        except PeerUnreachable:
            seen.append("unreachable")
        return seen

    with asyncio.Runner(loop_factory=new_virtual_loop) as runner:
        seen = runner.run(main())
    assert seen == ["offer 1", "refused 2", "unreachable"]


def test_cached_sizes_stay_exact_across_values() -> None:
    import random

    a, b = Identity.from_seed(bytes([3]) * 32), Identity.from_seed(bytes([9]) * 32)
    codec = EnvelopeCodec(a, message_types=registry())
    rng = random.Random(5)
    for _ in range(300):
        rnd, chunk, n = (
            rng.choice([0, 1, 127, 128, 255, 256, 70000]),
            rng.randrange(300),
            rng.randrange(0, 90),
        )
        holders = tuple(bytes([i]) * 32 for i in range(rng.randrange(0, 9)))
        for msg in (
            mpc.MaskedChunk(b"g" * 16, rnd, chunk, torch.zeros(n, dtype=torch.int64), holders),
            mpc.Receipt(b"g" * 16, rnd, holders, rng.random() < 0.5),
            mpc.Reveal(b"g" * 16, rnd, {h: b"s" * 33 for h in holders}, {}),
            ModelShare(rnd, torch.zeros(n), rng.random() * 1e6),
        ):
            auth = auth_for(msg)
            assert wire_size(msg, auth) == len(codec.encode(msg, recipient=b.peer_id, auth=auth))
