"""A round's groups split among group workers (``simulator.parallel``): the same results for
any number of workers, typed errors when a worker fails, and no worker left behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from floor.errors import ConfigError
from simulator import Scenario, run_scenario, write_run
from simulator.engine import group_workers
from simulator.parallel import GroupJob, GroupPool, WorkerFailed
from simulator.ticks import round_groups

# Small, but with everything that happens to a group mid-round: peers leaving within the
# round, rejoining, stragglers past the stage deadline, lost messages and a partition.
EVENTFUL = dict(
    peers=48,
    rounds=5,
    group_size=6,
    engine="direct",
    churn=0.15,
    churn_window_s=3.0,
    stragglers=0.1,
    straggler_slowdown=15.0,
    loss=0.004,
    partition_start_s=4.0,
    partition_end_s=6.0,
    partition_fraction=0.2,
)


def _metrics(scenario: Scenario, out: Path) -> bytes:
    return (write_run(run_scenario(scenario), out, plots=False) / "metrics.jsonl").read_bytes()


@pytest.mark.parametrize("algorithm", ["secure-group", "group"])
def test_any_number_of_workers_gives_the_same_metrics(tmp_path: Path, algorithm: str) -> None:
    base = Scenario(**EVENTFUL, algorithm=algorithm, workers=1)  # type: ignore[arg-type]
    one = _metrics(base, tmp_path / "one")
    rows = [json.loads(line) for line in one.splitlines()]
    # The scenario really is eventful (otherwise the comparison would prove little).
    assert sum(r["dropped"] for r in rows) > 0
    assert rows[-1]["messages_lost"] > 0
    assert rows[-1]["accuracy"] > rows[0]["accuracy"]
    for workers in (2, 3):
        assert _metrics(base.replace(workers=workers), tmp_path / f"w{workers}") == one


def test_adaptive_deadlines_travel_with_their_peers_between_workers(tmp_path: Path) -> None:
    """A peer's learned deadlines are carried to whichever worker runs its next group, so the
    split still changes nothing."""
    base = Scenario(**EVENTFUL, algorithm="secure-group", workers=1)  # type: ignore[arg-type]
    adaptive = base.replace(adaptive_deadlines=True)
    one = _metrics(adaptive, tmp_path / "one")
    assert one != _metrics(base, tmp_path / "fixed")  # the deadlines really adapted
    assert _metrics(adaptive.replace(workers=2), tmp_path / "two") == one


def test_wire_fidelity_splits_the_same(tmp_path: Path) -> None:
    base = Scenario(
        peers=16, rounds=2, group_size=4, engine="direct", fidelity="wire", privacy="none"
    )
    one = _metrics(base.replace(workers=1), tmp_path / "one")
    assert _metrics(base.replace(workers=2), tmp_path / "two") == one


def test_the_run_reports_its_workers_and_their_memory() -> None:
    result = run_scenario(
        Scenario(peers=16, rounds=1, group_size=4, engine="direct", privacy="none", workers=2)
    )
    assert result.stats["group_workers"] == 2
    single = run_scenario(
        Scenario(peers=16, rounds=1, group_size=4, engine="direct", privacy="none", workers=1)
    )
    assert single.stats["group_workers"] == 1
    # Two processes' peak memory (each imports torch) is more than one's.
    assert result.peak_rss_mib > single.peak_rss_mib


def test_workers_default_to_one_per_core_only_for_large_group_runs() -> None:
    assert group_workers(Scenario(peers=100, engine="direct")) == 1
    assert group_workers(Scenario(peers=5000, engine="gossip")) == 1
    assert group_workers(Scenario(peers=5000, engine="direct", algorithm="push-sum")) == 1
    assert group_workers(Scenario(peers=10, engine="direct", workers=3)) == 3
    assert group_workers(Scenario(peers=5000, engine="direct")) >= 1


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"workers": -1}, "workers must be >= 0"),
        ({"workers": 2}, "workers above 1 needs engine = direct"),
        ({"workers": 2, "engine": "direct", "algorithm": "push-sum"}, "workers above 1"),
    ],
)
def test_bad_worker_settings_name_the_field(changes: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        Scenario(**changes)  # type: ignore[arg-type]


def _job(groups: list[list[int]], n: int, *, weights: list[float] | None = None) -> GroupJob:
    order = [p for g in groups for p in g]
    return GroupJob(
        rnd=1,
        t0=0.0,
        limit=60.0,
        groups=groups,
        vectors=torch.randn(len(order), 5, dtype=torch.float64).numpy(),
        weights=weights if weights is not None else [1.0] * len(order),
        ready=[0.1] * len(order),
        online=[True] * n,
        view=order,
        leaves=[],
    )


def test_a_worker_that_dies_is_a_typed_error_and_the_pool_still_closes() -> None:
    s = Scenario(peers=8, rounds=1, group_size=4, engine="direct", privacy="none", workers=2)
    pool = GroupPool(s, 2)
    remote = pool._remotes[0]
    try:
        remote.process.kill()
        remote.process.wait()
        contributions = {p: (torch.zeros(5, dtype=torch.float64), 1.0) for p in range(8)}
        with pytest.raises(WorkerFailed, match="went away"):
            pool.run(
                1,
                0.0,
                60.0,
                [[0, 1, 2, 3], [4, 5, 6, 7]],
                contributions,
                dict.fromkeys(range(8), 0.1),
                [True] * 8,
                list(range(8)),
                [],
            )
    finally:
        pool.close()
    assert remote.process.poll() is not None


def test_an_error_inside_a_worker_comes_back_with_its_traceback() -> None:
    s = Scenario(peers=8, rounds=1, group_size=4, engine="direct", privacy="none", workers=2)
    with GroupPool(s, 2) as pool:
        remote = pool._remotes[0]
        remote.send("run", _job([[0, 1, 2, 3]], 8, weights=[1.0]))  # one weight for four rows
        with pytest.raises(WorkerFailed, match="ValueError"):
            remote.receive()
        # The worker survived its failed job and still runs a good one.
        remote.send("run", _job([[4, 5, 6, 7]], 8))
        outcome = remote.receive()
        assert sorted(p for peers, _ in outcome.results for p in peers) == [4, 5, 6, 7]
        assert outcome.counted == {4, 5, 6, 7}
    assert remote.process.poll() is not None


def test_a_group_result_is_the_weighted_mean_of_its_members() -> None:
    s = Scenario(peers=8, rounds=1, group_size=4, engine="direct", privacy="none", workers=2)
    with GroupPool(s, 2) as pool:
        vectors = {p: torch.full((5,), float(p), dtype=torch.float64) for p in range(8)}
        weights = {p: float(p + 1) for p in range(8)}
        contributions = {p: (vectors[p], weights[p]) for p in range(8)}
        net = pool.local.net  # the machines find the round's hash groups themselves
        found = round_groups(s, 1, tuple(net.raw_ids)) or []
        groups = [[net.index[m] for m in g] for g in found]
        assert len(groups) == 2
        outcome = pool.run(
            1,
            0.0,
            60.0,
            groups,
            contributions,
            dict.fromkeys(range(8), 0.1),
            [True] * 8,
            list(range(8)),
            [],
        )
        got = {p: torch.from_numpy(row) for peers, row in outcome.results for p in peers}
        for group in groups:  # one group ran here, the other in the child process
            total = sum(weights[p] for p in group)
            mean = sum(weights[p] * vectors[p] for p in group) / total
            for p in group:
                assert torch.allclose(got[p], mean, atol=1e-5)
        assert outcome.counted == set(range(8)) and not outcome.forced
        tally = pool.settle(outcome.finish)
        assert tally.messages_sent == tally.messages_delivered > 0


def test_retransmission_recovers_lost_messages_at_the_cost_of_time_and_bytes() -> None:
    base = Scenario(peers=32, rounds=3, group_size=8, engine="direct", workers=1, loss=0.05)
    lossy = run_scenario(base)
    resent = run_scenario(base.replace(retransmit_ms=200.0))
    clean = run_scenario(base.replace(loss=0.0))
    # Without retransmission a lost receipt or view aborts a secure group; with it, the
    # messages arrive late and the groups complete.
    assert sum(r.dropped for r in lossy.records) > sum(r.dropped for r in resent.records)
    assert resent.stats["retransmissions"] > 0 and lossy.stats["retransmissions"] == 0
    last = resent.final()
    assert last.bytes_sent > last.bytes_received  # resent copies leave the sender only
    assert clean.final().bytes_sent == clean.final().bytes_received
    assert last.virtual_time_s > clean.final().virtual_time_s
    assert last.accuracy > resent.records[0].accuracy
    # Still one result for any number of workers.
    two = run_scenario(base.replace(retransmit_ms=200.0, workers=2))
    assert [r for r in two.records] == [r for r in resent.records]


def test_retransmit_ms_must_not_be_negative() -> None:
    with pytest.raises(ConfigError, match="retransmit_ms must be >= 0"):
        Scenario(retransmit_ms=-1.0)


def test_a_run_keeps_the_peers_protocol_warnings_off_the_console(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging

    before = logging.getLogger("murmur.gossip").level
    with caplog.at_level(logging.WARNING):
        result = run_scenario(Scenario(peers=16, rounds=1, group_size=8, loss=0.1))
    assert result.stats["failed_averages"] > 0  # the aborts are counted ...
    assert not [r for r in caplog.records if r.name.startswith("murmur.gossip")]  # ... not logged
    assert logging.getLogger("murmur.gossip").level == before
