"""Acceptance: the few-line path end to end on local daemons and in the simulator, same code."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

import murmur
from floor.errors import ConfigError, Timeout
from gossip.tasks import credit_task
from p2p.config import MembershipConfig

# In-process peers train in threads at once; torch's "Full backward hook" warning, which
# dp.dpsgd silences with a (process-wide, not thread-safe) catch_warnings, can slip through.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")

FAST = MembershipConfig(exchange_interval_s=0.2, ping_interval_s=0.2)
TASK = credit_task(n_samples=900, seed=1)


def make_model() -> nn.Module:
    """The user's model code, shared by both paths below."""
    return nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 2))


def describe(x: torch.Tensor, y: torch.Tensor) -> murmur.Training:
    """The user's description, shared by both paths below."""
    return murmur.Training(
        model=make_model,
        data=(x, y),
        lr=0.3,
        eval_data=(TASK.x_test, TASK.y_test),
        # Under DP every weight is 1 and this model's parameters stay below 16: with
        # ring="auto" the daemons average in Z_2^32 (the simulator models Z_2^64).
        averaging=murmur.SecureGroups(size=3, ring="auto", value_bound=16.0),
        privacy=murmur.Privacy(epsilon=8.0, delta=1e-5, clip=1.0, unit="record"),
        rounds=2,
        local_steps=3,
    )


async def _three_daemons(n: int) -> list[list[murmur.RoundReport]]:
    """Three real daemons on loopback, in this process, one shard each."""
    shards = [torch.arange(i, TASK.n_train, n) for i in range(n)]
    async with (
        murmur.Peer(membership=FAST) as first,
        murmur.Peer(bootstrap=first.address, membership=FAST) as second,
        murmur.Peer(bootstrap=[first.address], membership=FAST) as third,
    ):
        peers = (first, second, third)
        reports = await asyncio.gather(
            *(
                p.run(describe(TASK.x_train[idx], TASK.y_train[idx]))
                for p, idx in zip(peers, shards, strict=True)
            )
        )
        assert all(str(p.peer_id) in {str(q) for q in first.peers()} for p in peers[1:])
    return reports


def test_same_description_on_local_daemons_and_in_the_simulator() -> None:
    n = 3
    reports = asyncio.run(_three_daemons(n))
    for per_peer in reports:
        assert [r.round for r in per_peer] == [1, 2]
        eps = [r.epsilon for r in per_peer]
        assert 0.0 < eps[0] < eps[1] <= 8.0 + 1e-6
        assert all(r.accuracy is not None and r.bytes_sent > 0 for r in per_peer)
    for r in range(2):
        ok = [p[r] for p in reports if p[r].status == "ok"]
        assert ok, f"round {r + 1}: no peer completed a group"
        assert all(rep.group_size == 3 for rep in ok)
        # one group of three holds one model afterwards: the same loss everywhere
        assert len({round(rep.loss or 0.0, 6) for rep in ok}) == 1
    # -- the same description, simulated: every peer's shard out of the same tensors --------
    result = murmur.simulate(describe(TASK.x_train, TASK.y_train), peers=n)
    assert [rec.round for rec in result.records] == [0, 1, 2]
    assert result.records[-1].epsilon == pytest.approx(reports[0][-1].epsilon, rel=1e-3)
    assert result.scenario.group_size == 3 and result.scenario.algorithm == "secure"


def test_sync_peer_alone_says_how_many_peers_joined() -> None:
    x, y = TASK.x_train[:100], TASK.y_train[:100]
    with murmur.SyncPeer(membership=FAST) as peer:
        assert peer.address.startswith("127.0.0.1:")
        with pytest.raises(Timeout, match="only 0 of 2 other peers"):
            peer.train(describe(x, y), join_timeout_s=0.3)
        dpsgd = dataclasses.replace(describe(x, y), averaging=murmur.Baseline("dpsgd"))
        with pytest.raises(ConfigError, match="simulator"):
            peer.train(dpsgd)


def test_a_kept_data_dir_keeps_the_identity(tmp_path: Path) -> None:
    ids = []
    for _ in range(2):
        with murmur.SyncPeer(data_dir=tmp_path, membership=FAST) as peer:
            ids.append(str(peer.peer.peer_id))
    assert ids[0] == ids[1]
    with murmur.SyncPeer(membership=FAST) as throwaway:
        assert str(throwaway.peer.peer_id) != ids[0]
        tmp = throwaway.peer.config.data_dir
        assert tmp.exists()
    assert not tmp.exists()  # a temporary data dir is removed


def test_one_call_train_starts_waits_and_leaves() -> None:
    x, y = TASK.x_train[:100], TASK.y_train[:100]
    with pytest.raises(Timeout, match="only 0 of 4 other peers"):
        murmur.train(describe(x, y), wait_for_peers=4, join_timeout_s=0.2)
