"""The simulated network: exact message sizes, tick-grouped delivery, loss and partitions."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import types
import typing
from typing import Any

import torch

import mpc
from floor.envelope import Auth, EnvelopeCodec
from floor.errors import MurmurError
from floor.identity import Identity, PeerId
from gossip import messages as gossip_messages
from gossip.messages import PushSumShare as ModelShare
from simulator.clock import new_virtual_loop
from simulator.config import Scenario
from simulator.messages import registry, wire_size
from simulator.network import SimNetwork


def _sample(tp: Any, rng: random.Random) -> Any:
    """A random value of field type ``tp`` (lengths and integers around msgpack's size steps)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        options = [a for a in args if a is not type(None)]
        return None if len(options) < len(args) and rng.random() < 0.3 else _sample(options[0], rng)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_sample(args[0], rng) for _ in range(rng.randrange(0, 9)))
        return tuple(_sample(a, rng) for a in args)
    if origin is dict:
        return {_sample(args[0], rng): _sample(args[1], rng) for _ in range(rng.randrange(0, 9))}
    if tp is bytes:
        return rng.randbytes(rng.choice([0, 1, 32, 255, 256, 70_000]))
    if tp is bool:
        return rng.random() < 0.5
    if tp is int:
        return rng.choice([0, 1, 5, 127, 128, 255, 256, 65_535, 65_536, 2**32, 2**40])
    if tp is float:
        return rng.random() * 1e6
    if tp is str:
        return "é" * rng.randrange(0, 40)
    if tp is PeerId:
        return PeerId(rng.randbytes(32))
    if tp is torch.Tensor:
        dtype = rng.choice([torch.int64, torch.float32, torch.float64, torch.uint8])
        return torch.zeros(rng.choice([0, 1, 7, 81, 82, 650]), dtype=dtype)
    if dataclasses.is_dataclass(tp):
        return _build(tp, rng)
    raise AssertionError(f"no sample for field type {tp!r}")


def _build(cls: Any, rng: random.Random) -> Any:
    hints = typing.get_type_hints(cls)
    return cls(**{f.name: _sample(hints[f.name], rng) for f in dataclasses.fields(cls)})


def _all_message_types() -> list[type]:
    """Every message class the simulator may carry (p2p, mpc, gossip, simulator), by name-free
    discovery so a protocol's renamed messages are covered as they are."""
    classes = list(registry().values())
    for value in vars(gossip_messages).values():
        if isinstance(value, type) and isinstance(getattr(value, "TYPE", None), str):
            classes.append(value)
    return list(dict.fromkeys(classes))


def test_wire_size_matches_the_codec_for_every_message_type() -> None:
    a, b = Identity.from_seed(bytes([3]) * 32), Identity.from_seed(bytes([9]) * 32)
    classes = _all_message_types()
    codec = EnvelopeCodec(a, message_types={c.TYPE: c for c in classes})  # type: ignore[attr-defined]
    rng = random.Random(5)
    checked: dict[type, int] = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        base = _build(cls, rng)
        # One field at a time varies, so messages that share a cache key but differ in that
        # field's value are compared (a key missing something that decides the size fails).
        for f in dataclasses.fields(cls):
            for _ in range(25):
                try:
                    msg = dataclasses.replace(base, **{f.name: _sample(hints[f.name], rng)})
                except (TypeError, ValueError, MurmurError):
                    continue  # a message whose own checks refuse this value
                for auth in [Auth.SEALED] if getattr(cls, "SECRET", True) else list(Auth):
                    expected = len(codec.encode(msg, recipient=b.peer_id, auth=auth))
                    assert wire_size(msg, auth) == expected, (cls.__name__, f.name, auth)
                    assert wire_size(msg, auth) == expected  # now from the cache
                checked[cls] = checked.get(cls, 0) + 1
    assert set(mpc.MESSAGE_TYPES.values()) <= set(checked)
    assert all(count >= 20 for count in checked.values()), checked


def _exchange(
    scenario: Scenario, n: int, count: int
) -> tuple[SimNetwork, list[tuple[float, int, int]]]:
    got: list[tuple[float, int, int]] = []

    async def main() -> SimNetwork:
        loop = asyncio.get_running_loop()
        net = SimNetwork(loop, scenario, n, [True] * n)

        def note(sender: int, msg: ModelShare) -> None:
            got.append((loop.time(), sender, msg.round))

        for p in range(n):
            net.register(p, ModelShare, note)
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
    from floor.errors import MalformedMessage, PeerUnreachable, RemoteRefused
    from gossip.messages import PairwiseOffer, PairwiseReply
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
            return PairwiseReply(True, msg.vector * 2, msg.weight, msg.round)

        peers[1].register(PairwiseOffer, answer)
        start = loop.time()
        reply = await peers[0].request(net.ids[1], PairwiseOffer(1, torch.ones(3), 1.0))
        assert torch.equal(reply.vector, torch.full((3,), 2.0))
        assert loop.time() - start >= 0.2  # there and back
        assert peers[0].view() == [net.ids[1], net.ids[2]]
        positions = {raw: i for i, raw in enumerate(net.raw_ids)}
        indexed = SimPeerNetwork(net, 1, lambda: net.ids, lambda: positions)
        assert indexed.view() == [net.ids[0], net.ids[2]]  # the same view, by position
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


def test_sim_peer_network_post_reports_only_failures() -> None:
    from floor.errors import MalformedMessage, PeerUnreachable, RemoteRefused
    from floor.errors import Timeout as SendTimeout
    from gossip.messages import PairwiseOffer
    from simulator.gossipnet import SimPeerNetwork

    failures: list[tuple[int, str]] = []

    def failed(msg: PairwiseOffer, exc: MurmurError) -> None:
        failures.append((msg.round, type(exc).__name__))

    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        online = [True] * 3
        scenario = Scenario(latency_ms=100.0, latency_jitter_ms=0.0, link_spread=0.0)
        net = SimNetwork(loop, scenario, 3, online)
        peers = [SimPeerNetwork(net, i, lambda: net.ids) for i in range(3)]
        handled: list[int] = []

        async def take(sender: PeerId, msg: PairwiseOffer) -> None:
            if msg.round < 0:
                raise MalformedMessage("negative round")
            handled.append(msg.round)

        peers[1].register(PairwiseOffer, take)
        peers[2].register(PairwiseOffer, take)
        stranger = Identity.from_seed(bytes([1]) * 32).peer_id
        peers[0].post(net.ids[1], PairwiseOffer(1, torch.ones(2), 1.0), on_failure=failed)
        peers[0].post(net.ids[1], PairwiseOffer(-2, torch.ones(2), 1.0), on_failure=failed)
        peers[0].post(stranger, PairwiseOffer(3, torch.ones(2), 1.0), on_failure=failed)
        peers[0].post(
            net.ids[1], PairwiseOffer(4, torch.ones(2), 1.0), timeout=0.01, on_failure=failed
        )
        peers[0].post(net.ids[2], PairwiseOffer(6, torch.ones(2), 1.0))  # no callback wanted
        online[2] = False
        peers[0].post(net.ids[2], PairwiseOffer(5, torch.ones(2), 1.0), on_failure=failed)
        await asyncio.sleep(5.0)
        return handled

    with asyncio.Runner(loop_factory=new_virtual_loop) as runner:
        handled = runner.run(main())
    assert handled == [1, 4]  # the late one is still handled, as a real late message would be
    assert sorted(failures) == [
        (-2, RemoteRefused.__name__),
        (3, PeerUnreachable.__name__),
        (4, SendTimeout.__name__),
        (5, PeerUnreachable.__name__),
    ]
