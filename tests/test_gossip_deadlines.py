"""Adaptive stage deadlines (``gossip.deadlines``): the estimator, how group runs use it, and a
simulated network with stragglers where adaptive deadlines drop them and fixed ones wait."""

from __future__ import annotations

import contextlib
import itertools
import random

import nacl.signing
import pytest
import torch

from floor.errors import AggregationError, ConfigError, OutOfStage
from gossip.allreduce import PLAIN_STAGES, STAGES, AllReduceConfig, PlainGroup, SecureGroup
from gossip.deadlines import MARGIN, WARMUP, WINDOW, StageDeadlines
from gossip.matchmaking import Group, Invitations, MatchConfig
from gossip.messages import GroupFormed, InviteReply, PlainChunk
from simulator.config import Scenario
from simulator.engine import run_scenario


def _estimator(**kw: object) -> StageDeadlines:
    return StageDeadlines(2, ceiling=2.0, floor=0.1, **kw)  # type: ignore[arg-type]


def test_the_ceiling_holds_until_a_stage_has_enough_samples() -> None:
    d = _estimator()
    assert d.timeouts() == (2.0, 2.0)
    d.observe([(0, 0.05)] * (WARMUP - 1))
    assert d.timeouts() == (2.0, 2.0)
    d.observe([(0, 0.05)])
    first, second = d.timeouts()
    assert first == pytest.approx(MARGIN * 0.05) and second == 2.0  # stage 1 still has none


def test_timeouts_stay_within_the_floor_and_the_ceiling() -> None:
    d = _estimator()
    d.observe([(0, 0.001)] * WINDOW + [(1, 30.0)] * WINDOW)
    assert d.timeouts() == (0.1, 2.0)


def test_a_minority_of_stragglers_does_not_move_the_bound_a_majority_does() -> None:
    rng = random.Random(1)
    d = _estimator()
    # one message in eight comes from a straggler 1.5 s late
    d.observe([(0, 1.5 if rng.random() < 0.125 else rng.uniform(0.05, 0.1)) for _ in range(WINDOW)])
    assert d.timeouts()[0] <= MARGIN * 0.1 < 1.5  # the straggler is past the bound: dropped
    d.observe([(0, rng.uniform(0.4, 0.5)) for _ in range(WINDOW)])
    assert MARGIN * 0.4 <= d.timeouts()[0] <= 2.0  # the whole network slowed down: follow it


def test_fixed_deadlines_never_move() -> None:
    d = _estimator(adaptive=False)
    d.observe([(0, 0.01)] * WINDOW)
    assert d.timeouts() == (2.0, 2.0)
    assert d.accept((0.3, 0.3)) == (2.0, 2.0)


def test_an_inviters_proposal_is_clamped_to_the_members_own_bounds() -> None:
    d = _estimator()
    assert d.accept((0.001, 99.0)) == (0.1, 2.0)
    assert d.accept((0.5, 0.7)) == (0.5, 0.7)
    assert d.accept((0.5,)) == d.timeouts()  # wrong length: its own
    assert d.accept((float("nan"), 0.5)) == d.timeouts()


def test_the_state_round_trips_and_a_malformed_one_is_refused() -> None:
    d = _estimator()
    d.observe([(0, 0.05), (1, 0.2)] * WARMUP)
    e = _estimator()
    e.restore(d.state())
    assert e.timeouts() == d.timeouts() and e.state() == d.state()
    e.restore(b"")  # afresh
    assert e.timeouts() == (2.0, 2.0)
    with pytest.raises(ConfigError):
        e.restore(d.state()[:-3])
    with pytest.raises(ConfigError):
        StageDeadlines(3, ceiling=2.0, floor=0.1).restore(d.state())


def _group(k: int = 4) -> tuple[Group, list[bytes], bytes]:
    seeds = [bytes([i]) * 32 for i in range(1, k + 1)]
    ids = sorted(bytes(nacl.signing.SigningKey(s).verify_key) for s in seeds)
    mine = seeds[0]
    return Group(1, b"g" * 16, tuple(ids), None), ids, mine


def test_a_group_run_waits_each_stage_its_own_timeout() -> None:
    group, _, seed = _group()
    me = bytes(nacl.signing.SigningKey(seed).verify_key)
    cfg = AllReduceConfig(stage_timeout_s=2.0)
    plain = PlainGroup(me, group, torch.zeros(8), 1.0, cfg, (0.3, 0.7))
    plain.start(10.0)
    assert plain.wake_at == pytest.approx(10.3)
    plain.wake(10.3)  # nothing arrived: the reduce stage closes on its deadline
    assert plain.wake_at == pytest.approx(11.0)
    assert plain.stages is not None and plain.stages.timed_out == {0}
    secure = SecureGroup(seed, group, torch.zeros(8), 1.0, cfg, (0.4, 0.5, 0.6, 0.7, 0.8))
    secure.start(5.0)
    assert secure.wake_at == pytest.approx(5.4)
    with pytest.raises(ConfigError):
        SecureGroup(seed, group, torch.zeros(8), 1.0, cfg, (0.4, 0.5))
    assert len(AllReduceConfig().deadlines_for(True).timeouts()) == STAGES
    assert len(AllReduceConfig().deadlines_for(False).timeouts()) == PLAIN_STAGES


def test_invited_members_run_on_the_inviters_timeouts() -> None:
    ids = sorted(bytes([i]) * 32 for i in range(1, 5))
    match = MatchConfig(target_size=4, min_size=3)
    inviter = Invitations(ids[0], match, rng=random.Random(0))
    inviter.proposed = (0.25, 0.5, 0.75, 1.0, 1.25)
    out = inviter.start(0.0, 1, ids)
    out += inviter.wake(inviter.wake_at or 0.0)  # the back-off ends: invitations go out
    invites = [(to, m) for to, m in out if type(m).__name__ == "Invite"]
    assert len(invites) == 3
    formed: list[tuple[bytes, GroupFormed]] = []
    joiners = {}
    for to, msg in invites:
        joiner = Invitations(to, match, rng=random.Random(1))
        joiner.start(0.0, 1, ids)
        reply = joiner.receive(0.01, ids[0], msg)
        joiners[to] = joiner
        for _, r in reply:
            assert isinstance(r, InviteReply)
            formed += [(p, f) for p, f in inviter.receive(0.02, to, r) if type(f) is GroupFormed]
    assert inviter.formed is not None
    assert inviter.formed.deadlines == (0.25, 0.5, 0.75, 1.0, 1.25)
    assert {f.deadlines_ms for _, f in formed} == {(250, 500, 750, 1000, 1250)}
    for to, f in formed:
        joiners[to].receive(0.03, ids[0], f)
        got = joiners[to].formed
        assert got is not None and got.deadlines == inviter.formed.deadlines


def _stragglers(adaptive: bool) -> list[object]:
    s = Scenario(
        peers=16,
        rounds=8,
        algorithm="secure",
        privacy="none",
        group_size=8,
        stage_timeout_s=3.0,
        min_stage_timeout_s=0.3,
        adaptive_deadlines=adaptive,
        latency_ms=40.0,
        latency_jitter_ms=10.0,
        stragglers=0.125,  # two of sixteen peers
        straggler_slowdown=10.0,  # ready ~1.8 s after the others
        seed=3,
    )
    return list(run_scenario(s).records[1:])


def test_adaptive_deadlines_drop_stragglers_that_fixed_ones_wait_for() -> None:
    fixed, adaptive = _stragglers(False), _stragglers(True)
    durations = [
        [b.virtual_time_s - a.virtual_time_s for a, b in itertools.pairwise([fixed[0], *rows])]  # type: ignore[attr-defined]
        for rows in (fixed, adaptive)
    ]
    # fixed: every round waits for the two stragglers (ready ~2 s after the others), counts them
    assert all(r.dropped == 0 and r.failed_averages == 0 for r in fixed)  # type: ignore[attr-defined]
    # adaptive: the first rounds are as slow (the ceiling until enough samples); later rounds
    # close the input stage at the learned bound and finish without the stragglers, which end
    # at once when they find their group past its receipts (their own round fails: 2 per round)
    late = adaptive[2:]
    assert all(r.dropped == 2 and r.failed_averages == 2 for r in late)  # type: ignore[attr-defined]
    assert all(r.groups_completed == r.groups_formed == 2 for r in late)  # type: ignore[attr-defined]
    # the lockstep round still lasts until the stragglers are ready, no longer
    assert max(durations[1][3:]) < min(durations[0][1:])


def test_a_message_that_comes_after_its_group_ended_is_still_a_sample() -> None:
    """Late messages are what tells a peer its deadlines are too short: one that arrives after
    the round ended (refused) still becomes a sample of its stage."""
    from gossip.allreduce import GroupAveraging
    from gossip.machine import RoundJob
    from gossip.matchmaking import HashGrouping

    ids = sorted(bytes([i]) * 32 for i in range(1, 4))
    cfg = AllReduceConfig(stage_timeout_s=1.0, min_stage_timeout_s=0.1, adaptive_deadlines=True)
    peers = {
        m: GroupAveraging(m, m, HashGrouping(m, size=3, min_size=3), secure=False, config=cfg)
        for m in ids
    }
    queue: list[tuple[bytes, bytes, object]] = []
    held: list[tuple[bytes, bytes, object]] = []
    slow = ids[2]  # its chunks to the others arrive only after their round ended
    for m, p in peers.items():
        out = p.begin(0.0, RoundJob(1, torch.full((6,), float(ids.index(m))), 1.0, ids))
        queue += [(m, to, msg) for to, msg in out]
    while queue:
        sender, to, msg = queue.pop(0)
        if sender == slow and type(msg).__name__ == "PlainChunk":
            held.append((sender, to, msg))
            continue
        out = peers[to].receive(0.01, sender, msg)
        queue += [(to, t, m) for t, m in out]
    for p in peers.values():
        p.wake(1.0)  # the reduce stage closes without the slow member's chunks
    for p in peers.values():
        p.wake(2.0)
    fast = peers[ids[0]]
    assert fast.done
    with contextlib.suppress(AggregationError):  # the sums of the wake were not delivered
        fast.outcome()
    before = fast.deadlines.state()
    late = [(s, m) for s, to, m in held if to == ids[0]]
    assert late
    with pytest.raises(OutOfStage):
        fast.receive(2.5, *late[0])
    after = fast.deadlines.state()
    assert after[0] == before[0] + 1  # one more reduce-stage sample (2.5 s late)
    with pytest.raises(OutOfStage):  # the same message again is no second sample
        fast.receive(2.6, *late[0])
    assert fast.deadlines.state() == after


def test_members_without_an_inviter_agree_on_the_largest_proposal() -> None:
    """Hash groups: each member proposes its timeouts in its first-stage messages; the first
    stage's deadline rises with what is heard, and the later stages take the largest proposal."""
    group, ids, seed = _group(4)
    me = bytes(nacl.signing.SigningKey(seed).verify_key)
    others = [m for m in ids if m != me]
    cfg = AllReduceConfig(stage_timeout_s=2.0, min_stage_timeout_s=0.1, adaptive_deadlines=True)
    run = PlainGroup(me, group, torch.zeros(8), 1.0, cfg, (0.3, 0.4))
    out = run.start(0.0)
    assert {m.deadlines_ms for _, m in out} == {(300, 400)}  # its own proposal goes out
    assert run.wake_at == pytest.approx(0.3)
    j = group.members.index(me)
    chunk = run.ring[: run._bounds[j][1] - run._bounds[j][0]]
    run.receive(0.05, others[0], PlainChunk(group.id, 1, j, chunk.clone(), (900, 1500)))
    assert run.wake_at == pytest.approx(0.9)  # the first stage waits as long as the slowest
    run.receive(0.06, others[1], PlainChunk(group.id, 1, j, chunk.clone(), (5000, 9999999)))
    assert run.wake_at == pytest.approx(2.0)  # ... within this member's own ceiling
    run.wake(2.0)
    assert run.stages is not None and run.stages.timeouts == (0.3, 2.0)


def test_a_soft_deadline_waits_on_when_too_few_members_were_heard() -> None:
    group, ids, seed = _group(4)  # threshold 3: the member needs 2 others to go on
    me = bytes(nacl.signing.SigningKey(seed).verify_key)
    others = [m for m in ids if m != me]
    cfg = AllReduceConfig(stage_timeout_s=2.0, min_stage_timeout_s=0.1, adaptive_deadlines=True)
    run = PlainGroup(me, group, torch.zeros(8), 1.0, cfg, (0.3, 0.3), agreed=True)
    run.start(0.0)
    j = group.members.index(me)
    chunk = run.ring[: run._bounds[j][1] - run._bounds[j][0]]
    run.receive(0.05, others[0], PlainChunk(group.id, 1, j, chunk.clone()))
    assert run.wake(0.3) == [] and run.wake_at == pytest.approx(2.0)  # one heard: waits on
    run.receive(0.5, others[1], PlainChunk(group.id, 1, j, chunk.clone()))
    assert run.wake_at == pytest.approx(0.3)  # two heard: it may close at once
    assert run.wake(0.5)  # it closes and sends its chunk sums
    fixed = PlainGroup(me, group, torch.zeros(8), 1.0, AllReduceConfig(), (0.3, 0.3))
    fixed.start(0.0)
    fixed.wake(0.3)  # fixed deadlines close with whatever arrived
    assert fixed.stages is not None and fixed.stages.timed_out == {0}
