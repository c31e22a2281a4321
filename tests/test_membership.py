"""Membership: the socket-free PeerView, and Membership driven over the in-memory transport."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from floor.envelope import EnvelopeCodec
from floor.errors import ConfigError, PeerUnreachable, RefusalCode, RemoteRefused
from floor.identity import Identity, PeerId
from floor.transport.memory import MemoryNetwork, MemoryTransport
from p2p.membership import (
    Membership,
    MembershipConfig,
    PeerView,
    record_from_json,
    record_to_json,
)
from p2p.messages import MESSAGE_TYPES, PeerRecord

CONFIG = MembershipConfig(
    max_view=4,
    max_passive=3,
    suspect_after_s=2.0,
    dead_after_s=5.0,
    ping_interval_s=1.0,
    tombstone_s=50.0,
)
WALL = 1_700_000_000.0


def ident(n: int) -> Identity:
    return Identity.from_seed(bytes([n]) * 32)


def rec(n: int, t: float = WALL, addresses: tuple[str, ...] = ("mem:x",)) -> PeerRecord:
    return PeerRecord.create(ident(n), addresses, t)


def view(config: MembershipConfig = CONFIG, **kw: object) -> PeerView:
    return PeerView(
        ident(0).peer_id,
        config,
        valid_address=lambda a: a.startswith("mem:"),
        rng=random.Random(1),
        **kw,  # type: ignore[arg-type]
    )


def test_good_record_enters_and_newer_replaces_older() -> None:
    v = view()
    assert v.offer(rec(1), now=0.0, wall_now=WALL)
    assert not v.offer(rec(1), now=0.0, wall_now=WALL)  # same timestamp: nothing new
    assert v.offer(rec(1, WALL + 5, ("mem:y",)), now=0.0, wall_now=WALL)
    assert v.known(ident(1).peer_id).addresses == ("mem:y",)  # type: ignore[union-attr]
    assert not v.offer(rec(1, WALL + 1), now=0.0, wall_now=WALL)  # older: ignored
    assert v.known(ident(1).peer_id).timestamp == WALL + 5  # type: ignore[union-attr]


def test_bad_records_are_dropped() -> None:
    v = view()
    good = rec(1)
    forged = dataclasses.replace(good, addresses=("mem:evil",))
    assert not v.offer(forged, now=0.0, wall_now=WALL)  # signature covers the addresses
    assert not v.offer(rec(2, addresses=("http://bad",)), now=0.0, wall_now=WALL)
    assert not v.offer(rec(3, addresses=()), now=0.0, wall_now=WALL)
    assert not v.offer(rec(4, addresses=("mem:a",) * 9), now=0.0, wall_now=WALL)
    assert not v.offer(rec(5, WALL + 10_000), now=0.0, wall_now=WALL)  # far future
    assert not v.offer(rec(0), now=0.0, wall_now=WALL)  # ourselves
    assert v.active == {} and v.passive == {}


def test_allowlist_filters_records() -> None:
    allowed = {ident(1).peer_id}
    v = view(admit=allowed.__contains__)
    assert v.offer(rec(1), now=0.0, wall_now=WALL)
    assert not v.offer(rec(2), now=0.0, wall_now=WALL)


def test_suspicion_then_removal_then_tombstone() -> None:
    v = view()
    peer = ident(1).peer_id
    v.offer(rec(1), now=0.0, wall_now=WALL)
    assert v.live() == []  # not confirmed until it talks to us
    assert v.due_for_ping(0.0) == [peer]
    v.seen(peer, 0.5)
    assert [e.record.peer_id for e in v.live()] == [peer]
    assert v.due_for_ping(1.0) == []
    assert v.due_for_ping(1.6) == [peer]
    assert v.tick(3.0) == [] and v.live() == []  # suspected, still in the view
    assert peer in v.active
    v.seen(peer, 3.1)  # it answered: suspicion cleared
    assert len(v.live()) == 1
    assert v.tick(8.2) == [peer]
    assert peer not in v.active
    # Gossip still carrying the old record cannot bring it back...
    assert not v.offer(rec(1), now=9.0, wall_now=WALL)
    # ...but a restarted peer signs a newer record.
    assert v.offer(rec(1, WALL + 60), now=9.0, wall_now=WALL + 60)
    assert peer in v.active


def test_view_is_capped_and_refilled_from_the_reserve() -> None:
    v = view()
    for n in range(1, 9):
        v.offer(rec(n), now=0.0, wall_now=WALL)
    assert len(v.active) == CONFIG.max_view
    assert len(v.passive) == CONFIG.max_passive
    for peer in list(v.active)[:2]:
        v.seen(peer, 4.0)
    removed = v.tick(5.5)
    assert len(removed) == 2
    assert len(v.active) == CONFIG.max_view  # refilled
    assert len(v.passive) == CONFIG.max_passive - 2


def test_samples_only_live_peers() -> None:
    v = view()
    for n in range(1, 5):
        v.offer(rec(n), now=0.0, wall_now=WALL)
    v.seen(ident(1).peer_id, 0.0)
    v.seen(ident(2).peer_id, 0.0)
    assert {r.peer_id for r in v.sample_records(10)} == {ident(1).peer_id, ident(2).peer_id}
    assert [r.peer_id for r in v.sample_records(10, exclude=ident(1).peer_id)] == [ident(2).peer_id]
    assert len(v.sample_peers(1)) == 1


def test_record_json_round_trip_and_errors() -> None:
    r = rec(1)
    assert record_from_json(record_to_json(r)) == r
    for bad in [None, {}, {"peer_id": "x", "addresses": [], "timestamp": 1, "signature": ""}]:
        with pytest.raises(ConfigError):
            record_from_json(bad)


def test_config_checks() -> None:
    with pytest.raises(ConfigError):
        MembershipConfig(max_view=0)
    with pytest.raises(ConfigError):
        MembershipConfig(suspect_after_s=5.0, dead_after_s=1.0)


# -- Membership over the in-memory transport ------------------------------------------------

FAST = MembershipConfig(
    exchange_interval_s=0.05,
    ping_interval_s=0.05,
    ping_timeout_s=0.2,
    suspect_after_s=0.3,
    dead_after_s=0.6,
    join_timeout_s=0.5,
    join_attempts=2,
    join_retry_delay_s=0.05,
)


class Node:
    def __init__(
        self, n: int, network: MemoryNetwork, data_dir: Path | None = None, key: bytes | None = None
    ) -> None:
        self.identity = ident(n)
        codec = EnvelopeCodec(self.identity, network_key=key, message_types=MESSAGE_TYPES)
        self.transport = MemoryTransport(codec, network, name=f"n{n}-{id(self)}")
        self.membership = Membership(self.identity, self.transport, FAST, data_dir=data_dir)
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.ensure_future(self.membership.run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await self.task
            self.task = None
        await self.transport.aclose()

    def live(self) -> set[PeerId]:
        return {e.record.peer_id for e in self.membership.view.live()}


@pytest.fixture
async def nodes() -> AsyncIterator[list[Node]]:
    made: list[Node] = []
    yield made
    for node in made:
        await node.stop()


async def wait_for(condition: object, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def test_nodes_find_each_other_from_one_bootstrap_and_drop_the_dead(
    nodes: list[Node],
) -> None:
    network = MemoryNetwork()
    nodes.extend(Node(n, network) for n in range(1, 9))
    first = nodes[0]
    first.start()
    for node in nodes[1:]:
        assert await node.membership.join(first.transport.addresses) == 1
        node.start()
    ids = {node.identity.peer_id for node in nodes}
    await wait_for(lambda: all(node.live() == ids - {node.identity.peer_id} for node in nodes))
    gone = nodes.pop()
    await gone.stop()
    await wait_for(
        lambda: all(gone.identity.peer_id not in n.membership.view.active for n in nodes)
    )


async def test_restarted_node_keeps_its_view_and_rejoins(nodes: list[Node], tmp_path: Path) -> None:
    network = MemoryNetwork()
    a, b = Node(1, network), Node(2, network, data_dir=tmp_path)
    nodes.extend([a, b])
    a.start()
    await b.membership.join(a.transport.addresses)
    b.membership.save()
    await b.stop()
    again = Node(2, network, data_dir=tmp_path)
    nodes.append(again)
    assert a.identity.peer_id in again.membership.view.passive  # learnt from peers.json
    assert await again.membership.join([]) == 1  # rejoined through the stored peer
    again.start()
    await wait_for(
        lambda: again.identity.peer_id in a.live() and a.identity.peer_id in again.live()
    )


async def test_join_failures(nodes: list[Node]) -> None:
    network = MemoryNetwork()
    keyed = Node(1, network, key=b"k" * 32)
    stranger = Node(2, network)
    nodes.extend([keyed, stranger])
    with pytest.raises(RemoteRefused) as info:
        await stranger.membership.join(keyed.transport.addresses)
    assert info.value.code == RefusalCode.UNAUTHORIZED
    assert keyed.membership.view.active == {} and keyed.membership.view.passive == {}
    with pytest.raises(PeerUnreachable):
        await stranger.membership.join(["mem:nobody"])
    assert await stranger.membership.join([]) == 0  # nothing to join: start alone
