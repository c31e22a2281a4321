"""One protocol core: both simulator engines run the daemon's machines, with the same results.

``engine = "gossip"`` drives every peer's machine with ``gossip.driver.Driver`` (the daemon's
asyncio driver); ``engine = "direct"`` with ``simulator.ticks.TickDriver`` from the network's
tick callbacks. For one seed, the metrics must be identical row for row, under loss, churn
and stragglers, for every algorithm and both matchmakings.
"""

from __future__ import annotations

from typing import Any

import pytest

from simulator.config import Scenario
from simulator.engine import run_scenario

HARSH: dict[str, Any] = {
    "peers": 24,
    "rounds": 3,
    "churn": 0.1,
    "stragglers": 0.1,
    "straggler_slowdown": 8.0,
    "eval_peers": 8,
}


def rows(**fields: Any) -> list[dict[str, Any]]:
    return run_scenario(Scenario(**{**HARSH, **fields})).rows()


@pytest.mark.parametrize(
    ("algorithm", "matchmaking"),
    [
        ("secure", "hash"),
        ("secure", "invite"),
        ("plain", "hash"),
        ("plain", "invite"),
        ("pairwise", "hash"),
        ("push-sum", "hash"),
        ("dpsgd", "hash"),
    ],
)
def test_both_engines_give_the_same_metrics(algorithm: str, matchmaking: str) -> None:
    gossip = rows(algorithm=algorithm, matchmaking=matchmaking, engine="gossip")
    direct = rows(algorithm=algorithm, matchmaking=matchmaking, engine="direct", workers=1)
    assert gossip == direct
    last = gossip[-1]
    assert last["messages_sent"] > 0 and last["active_peers"] > 0
    assert last["accuracy"] > gossip[0]["accuracy"]  # the peers did learn


@pytest.mark.parametrize("algorithm", ["secure", "plain", "pairwise", "push-sum"])
def test_lost_messages_are_lost_the_same_way_by_both(algorithm: str) -> None:
    gossip = rows(algorithm=algorithm, engine="gossip", loss=0.02)
    direct = rows(algorithm=algorithm, engine="direct", workers=1, loss=0.02)
    assert gossip == direct
    assert gossip[-1]["messages_lost"] > 0


def test_the_engines_differ_only_where_the_seed_does() -> None:
    """A different seed changes the run (the equality above is not a constant)."""
    a = rows(algorithm="secure", engine="direct", workers=1)
    b = rows(algorithm="secure", engine="direct", workers=1, seed=1)
    assert a != b


def test_a_peer_that_leaves_mid_round_is_dropped_the_same_way_by_both() -> None:
    fields = {**HARSH, "churn": 0.3, "churn_window_s": 0.5, "rejoin": 0.0}
    gossip = run_scenario(Scenario(**fields, engine="gossip"))
    direct = run_scenario(Scenario(**fields, engine="direct", workers=1))
    assert gossip.rows() == direct.rows()
    assert sum(r.dropped for r in direct.records) > 0
    assert direct.stats["failed_averages"] == gossip.stats["failed_averages"]


@pytest.mark.parametrize("model", ["logreg", "mlp"])
def test_distributed_noise_is_the_same_in_both_engines(model: str) -> None:
    """Peer-level privacy in secure groups (distributed noise shares, both trainers: stacked
    for logreg, one learner per peer for the MLP): identical rows, the three epsilons."""
    fields = {"privacy": "peer", "group_size": 6, "model": model, "matchmaking": "hash"}
    gossip = rows(engine="gossip", **fields)
    direct = rows(engine="direct", workers=1, **fields)
    assert gossip == direct
    last = gossip[-1]
    assert 0 < last["epsilon_central"] <= last["epsilon"] < last["epsilon_local"]
    assert last["accuracy"] > gossip[0]["accuracy"]
