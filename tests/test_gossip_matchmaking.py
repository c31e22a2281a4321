"""Matchmaking without a server, over p2p's in-memory transport on a virtual clock."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from floor.envelope import EnvelopeCodec
from floor.errors import ConfigError, GroupFormationFailed, RemoteRefused
from floor.identity import Identity
from floor.transport.memory import MemoryNetwork, MemoryTransport
from gossip.driver import Driver
from gossip.machine import AverageResult, Out, RoundJob
from gossip.matchmaking import (
    Group,
    GroupFormer,
    HashGrouping,
    Invitations,
    MatchConfig,
    hash_groups,
)
from gossip.messages import MESSAGE_TYPES, GroupFormed
from gossip.network import Network, StaticView, TransportNetwork
from simulator.clock import new_virtual_loop


class FormOnly:
    """A machine that only forms this peer's group (``gossip.machine.Machine``), so the
    tests can run a former with the daemon's ``Driver`` and look at the groups."""

    name = "form-only"

    def __init__(self, former: GroupFormer) -> None:
        self.former = former
        self.message_types = former.message_types
        self.group: Group | None = None
        self._done = False

    @property
    def wake_at(self) -> float | None:
        return self.former.wake_at

    @property
    def done(self) -> bool:
        return self._done

    def begin(self, now: float, job: RoundJob) -> Out:
        self._job = job
        return self._check(self.former.start(now, job.round, job.view))

    def receive(self, now: float, sender: bytes, message: Any) -> Out:
        return self._check(self.former.receive(now, sender, message))

    def wake(self, now: float) -> Out:
        return self._check(self.former.wake(now))

    def _check(self, out: Out) -> Out:
        f = self.former
        if f.formed is not None or f.failure is not None:
            self.group, f.formed = f.formed, None
            self._done = True
        return out

    def outcome(self) -> AverageResult:
        self._done = False
        failure, self.former.failure = self.former.failure, None
        if failure is not None:
            raise GroupFormationFailed(failure)
        return AverageResult(self._job.vector, 1.0, 1, self._job.round)

    def cancel(self, now: float) -> Out:
        return self.former.stop()


class Matchmaker:
    """A former run by the daemon's driver: ``await form_group(round)`` -> its group."""

    def __init__(self, net: TransportNetwork, former: GroupFormer | None = None) -> None:
        self.machine = FormOnly(former or Invitations(net.local_id.raw))
        self.driver = Driver(net, self.machine)

    async def form_group(self, rnd: int) -> Group:
        await self.driver.average(torch.zeros(1), 1.0, rnd)
        assert self.machine.group is not None
        return self.machine.group


def invitations(net: TransportNetwork, cfg: MatchConfig, seed: int) -> Matchmaker:
    return Matchmaker(net, Invitations(net.local_id.raw, cfg, rng=random.Random(seed)))


def run(coro_fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    with asyncio.Runner(loop_factory=new_virtual_loop) as runner:
        return runner.run(coro_fn())


def make(n: int, seed: int = 0) -> tuple[list[TransportNetwork], list[MemoryTransport]]:
    memory = MemoryNetwork()
    idents = [
        Identity.from_seed(hashlib.sha256(f"mm{seed}-{i}".encode()).digest()) for i in range(n)
    ]
    transports = [
        MemoryTransport(EnvelopeCodec(i, message_types=MESSAGE_TYPES), memory) for i in idents
    ]
    for t in transports:
        for u in transports:
            t.set_addresses(u.local_id, u.addresses, verified=True)
    view = StaticView([i.peer_id for i in idents])
    return [TransportNetwork(t, view) for t in transports], transports


async def close(transports: list[MemoryTransport]) -> None:
    for t in transports:
        await t.aclose()


def check_partition(
    groups: list[Group | BaseException], ids: list[bytes], cfg: MatchConfig
) -> None:
    """Every formed group is seen identically by all its members; nobody is in two groups."""
    by_id: dict[bytes, Group] = {}
    owner: dict[bytes, bytes] = {}
    for peer, g in zip(ids, groups, strict=True):
        if isinstance(g, BaseException):
            assert isinstance(g, GroupFormationFailed), repr(g)
            continue
        assert peer in g.members
        assert cfg.min_size <= g.size <= cfg.target_size
        assert list(g.members) == sorted(g.members)
        assert by_id.setdefault(g.id, g) == g
        assert peer not in owner
        owner[peer] = g.id
    for g in by_id.values():
        assert all(owner.get(m) == g.id for m in g.members)  # each member holds this group


def test_32_ready_peers_form_valid_groups_that_change_every_round() -> None:
    cfg = MatchConfig(target_size=8, min_size=3)

    async def main() -> tuple[list[list[Group | BaseException]], list[bytes], float]:
        nets, transports = make(32)
        mms = [invitations(n, cfg, i) for i, n in enumerate(nets)]
        loop = asyncio.get_running_loop()
        rounds = []
        start = loop.time()
        for rnd in range(3):
            rounds.append(
                list(
                    await asyncio.gather(*(m.form_group(rnd) for m in mms), return_exceptions=True)
                )
            )
        elapsed = loop.time() - start
        await close(transports)
        return rounds, [n.local_id.raw for n in nets], elapsed

    rounds, ids, elapsed = run(main)
    assert elapsed <= 3 * cfg.round_timeout_s
    partitions = []
    for groups in rounds:
        check_partition(groups, ids, cfg)
        formed = [g for g in groups if isinstance(g, Group)]
        assert len(formed) >= 24  # most peers are grouped in every round
        partitions.append({g.members for g in formed})
    assert partitions[0] != partitions[1] != partitions[2]


def test_too_few_ready_peers_dissolve_and_fail_by_the_deadline() -> None:
    cfg = MatchConfig(target_size=8, min_size=3, round_timeout_s=2.0)

    async def main() -> tuple[list[Any], float]:
        nets, transports = make(2)
        mms = [invitations(n, cfg, i) for i, n in enumerate(nets)]
        loop = asyncio.get_running_loop()
        start = loop.time()
        out = await asyncio.gather(*(m.form_group(0) for m in mms), return_exceptions=True)
        elapsed = loop.time() - start
        await close(transports)
        return list(out), elapsed

    out, elapsed = run(main)
    assert all(isinstance(o, GroupFormationFailed) for o in out)  # a pair never averages
    assert elapsed <= cfg.round_timeout_s + cfg.form_timeout_s + cfg.invite_timeout_s


def test_peers_ready_for_another_round_do_not_join() -> None:
    cfg = MatchConfig(target_size=4, min_size=3, round_timeout_s=1.0)

    async def main() -> list[Any]:
        nets, transports = make(4)
        mms = [invitations(n, cfg, i) for i, n in enumerate(nets)]
        out = await asyncio.gather(
            *(m.form_group(r) for m, r in zip(mms, [0, 0, 1, 1], strict=True)),
            return_exceptions=True,
        )
        await close(transports)
        return list(out)

    assert all(isinstance(o, GroupFormationFailed) for o in run(main))


def test_a_group_list_without_an_accepted_invitation_is_refused() -> None:
    async def main() -> None:
        nets, transports = make(3)
        Matchmaker(nets[1])
        bogus = GroupFormed(0, b"i" * 16, b"g" * 16, tuple(n.local_id for n in nets))
        with pytest.raises(RemoteRefused):
            await nets[0].send(nets[1].local_id, bogus)
        await close(transports)

    run(main)


def test_the_transport_adapter_is_a_network() -> None:
    async def main() -> None:
        nets, transports = make(2)
        assert isinstance(nets[0], Network)
        assert list(nets[0].view()) == [nets[1].local_id]  # never itself
        await close(transports)

    run(main)


def test_config_is_checked() -> None:
    with pytest.raises(ConfigError):
        MatchConfig(target_size=4, min_size=5)
    with pytest.raises(ConfigError):
        MatchConfig(min_size=1)
    with pytest.raises(ConfigError):
        MatchConfig(backoff_s=0)


def _ids(n: int) -> list[bytes]:
    return [hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(n)]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(3, 70), size=st.integers(3, 12), rnd=st.integers(0, 2**32))
def test_hash_groups_partition_the_peers(n: int, size: int, rnd: int) -> None:
    peers = _ids(n)
    groups = hash_groups(rnd, peers, size=size, min_size=3)
    flat = [p for g in groups for p in g]
    assert sorted(flat) == sorted(peers)
    assert len(set(flat)) == n
    for g in groups:
        assert len(g) >= min(size, n) and (n < size or len(g) < 2 * size)
    assert hash_groups(rnd, list(reversed(peers)), size=size) == groups  # order-free


def test_hash_groups_change_with_the_round_and_refuse_tiny_networks() -> None:
    peers = _ids(32)
    assert hash_groups(1, peers, size=8) != hash_groups(2, peers, size=8)
    with pytest.raises(GroupFormationFailed):
        hash_groups(0, peers[:2], size=8)


def test_hash_matchmakers_agree_without_messages() -> None:
    async def main() -> tuple[list[Group], list[bytes]]:
        nets, transports = make(20)
        out = [
            await Matchmaker(n, HashGrouping(n.local_id.raw, size=6)).form_group(5) for n in nets
        ]
        assert all(n.sent == 0 for n in nets)
        await close(transports)
        return out, [n.local_id.raw for n in nets]

    groups, ids = run(main)
    check_partition(list(groups), ids, MatchConfig(target_size=11, min_size=6))
    assert sum(g.size for g in {g.id: g for g in groups}.values()) == 20


def test_seeded_matchmaking_on_the_virtual_clock_repeats_exactly() -> None:
    def once() -> list[list[tuple[bytes, tuple[bytes, ...]] | str]]:
        async def main() -> list[list[tuple[bytes, tuple[bytes, ...]] | str]]:
            nets, transports = make(16, seed=9)
            mms = [invitations(n, MatchConfig(), i) for i, n in enumerate(nets)]
            out = []
            for rnd in range(2):
                groups = await asyncio.gather(
                    *(m.form_group(rnd) for m in mms), return_exceptions=True
                )
                out.append(
                    [
                        (g.id, g.members) if isinstance(g, Group) else type(g).__name__
                        for g in groups
                    ]
                )
            await close(transports)
            return out

        result: list[list[tuple[bytes, tuple[bytes, ...]] | str]] = run(main)
        return result

    assert once() == once()
