"""Whole simulated runs: determinism, virtual time, churn, and the files a run writes."""

from __future__ import annotations

import csv
import itertools
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from floor.errors import ConfigError
from simulator import Scenario, run_scenario, write_run
from simulator.cli import main
from simulator.engine import COLUMNS, Simulation
from simulator.output import plot_sweep

SMALL = dict(peers=12, rounds=6, privacy="none", group_size=4, lr=0.3)
REQUIRED = (
    "round",
    "virtual_time_s",
    "accuracy",
    "loss",
    "consensus_distance",
    "epsilon",
    "bytes_sent",
    "bytes_received",
    "active_peers",
    "dropped",
)


@pytest.mark.parametrize("engine", ["gossip", "direct"])
def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path, engine: str) -> None:
    s = Scenario(**SMALL, churn=0.1, loss=0.01, engine=engine)  # type: ignore[arg-type]
    a = write_run(run_scenario(s), tmp_path / "a", plots=False)
    b = write_run(run_scenario(s), tmp_path / "b", plots=False)
    c = write_run(run_scenario(s.replace(seed=1)), tmp_path / "c", plots=False)
    first = (a / "metrics.jsonl").read_bytes()
    assert first == (b / "metrics.jsonl").read_bytes()
    assert first != (c / "metrics.jsonl").read_bytes()


@pytest.mark.parametrize("engine", ["gossip", "direct"])
@pytest.mark.parametrize("algorithm", ["secure-group", "group", "push-sum", "pairwise", "dpsgd"])
def test_every_algorithm_learns(algorithm: str, engine: str) -> None:
    scenario = Scenario(**SMALL, algorithm=algorithm, engine=engine)  # type: ignore[arg-type]
    result = run_scenario(scenario)
    acc = [r.accuracy for r in result.records]
    assert acc[-1] > acc[0] + 0.2, acc
    assert result.records[-1].bytes_sent > 0


def test_virtual_time_runs_far_faster_than_it_simulates() -> None:
    s = Scenario(
        peers=8,
        rounds=50,
        privacy="none",
        group_size=8,
        latency_ms=1000.0,
        latency_jitter_ms=0.0,
        link_spread=0.0,
        stage_timeout_s=5.0,
    )
    result = run_scenario(s)
    virtual = result.records[-1].virtual_time_s
    # Five protocol stages (inputs, receipts, views, reveals, sums), 1 s per message: >= 5 s each.
    assert virtual >= 50 * 5.0
    # No wall-clock assertion (timings vary with the machine's load): a clock that did not
    # jump would need those 250+ s of real time, past the suite's 120 s per-test timeout.
    print(f"simulated {virtual:.0f} s in {result.wall_time_s:.1f} s of wall time")


def test_churn_never_hangs_and_accuracy_rises() -> None:
    s = Scenario(
        peers=16,
        rounds=100,
        privacy="none",
        group_size=6,
        churn=0.2,
        rejoin=0.6,
        churn_window_s=1.0,
        stragglers=0.1,
        straggler_slowdown=20.0,
        stage_timeout_s=1.0,
    )
    result = run_scenario(s)
    records = result.records
    assert len(records) == 101 and result.stats["forced_rounds"] == 0
    assert sum(r.dropped for r in records) > 0
    assert min(r.active_peers for r in records[1:]) < 16
    early = sum(r.accuracy for r in records[:3]) / 3
    late = sum(r.accuracy for r in records[-5:]) / 5
    assert late > early + 0.2, (early, late)


def test_files_columns_and_values_are_sane(tmp_path: Path) -> None:
    out = tmp_path / "run"
    code = main(
        [
            "--peers",
            "10",
            "--rounds",
            "3",
            "--group-size",
            "5",
            "--epsilon",
            "4",
            "--noise-multiplier",
            "1.2",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    for r in rows:
        assert set(REQUIRED) <= set(r) and set(r) == set(COLUMNS)
        assert 0.0 <= r["accuracy"] <= 1.0 and math.isfinite(r["loss"])
        assert r["bytes_received"] <= r["bytes_sent"]
        assert 0 <= r["dropped"] <= r["active_peers"] <= 10
    assert (
        rows[0]["epsilon"] == 0
        and rows[0]["bytes_sent"] == 0
        and rows[0]["consensus_distance"] == 0
    )
    assert all(b["virtual_time_s"] > a["virtual_time_s"] for a, b in itertools.pairwise(rows))
    # A fixed noise multiplier with a cap of 4: the third contribution would exceed it.
    assert rows[1]["epsilon"] > 0 and all(
        b["epsilon"] >= a["epsilon"] for a, b in itertools.pairwise(rows)
    )
    assert max(r["epsilon"] for r in rows) <= 4.0 and rows[3]["epsilon"] == rows[2]["epsilon"]
    # Round 3: every budget is spent, so peers only compute (no contribution, no traffic).
    assert rows[0]["bytes_sent"] < rows[1]["bytes_sent"] < rows[2]["bytes_sent"]
    assert rows[3]["bytes_sent"] == rows[2]["bytes_sent"] and rows[3]["dropped"] == 10
    with open(out / "metrics.csv") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 4 and float(table[3]["epsilon"]) == rows[3]["epsilon"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scenario"]["peers"] == 10 and summary["wall_time_s"] > 0
    assert summary["peak_rss_mib"] > 0
    assert "wall" not in (out / "metrics.jsonl").read_text()
    for name in (
        "accuracy_vs_rounds",
        "accuracy_vs_bytes",
        "consensus_vs_rounds",
        "consensus_vs_bytes",
        "epsilon_vs_rounds",
    ):
        assert (out / f"{name}.png").stat().st_size > 1000


def test_a_sweep_writes_one_folder_per_run_and_a_combined_plot(tmp_path: Path) -> None:
    code = main(
        [
            "--peers",
            "8",
            "--rounds",
            "2",
            "--privacy",
            "none",
            "--group-size",
            "4",
            "--sweep",
            "algorithm=group,pairwise",
            "--out",
            str(tmp_path),
            "--quiet",
        ]
    )
    assert code == 0
    assert (tmp_path / "sweep.png").exists()
    for label in ("algorithm=group", "algorithm=pairwise"):
        assert (tmp_path / label / "metrics.jsonl").exists()


def test_per_peer_learners_and_stacked_training_both_learn() -> None:
    base = Scenario(**SMALL).replace(rounds=4)  # type: ignore[arg-type]
    for training in ("per-peer", "stacked"):
        result = run_scenario(base.replace(training=training))
        acc = [r.accuracy for r in result.records]
        assert acc[-1] > acc[0] + 0.2, (training, acc)
    dp = run_scenario(base.replace(training="per-peer", privacy="record", noise_multiplier=1.0))
    assert 0 < dp.records[1].epsilon < dp.records[-1].epsilon


def test_wire_fidelity_runs_the_same_protocol() -> None:
    base = Scenario(**SMALL).replace(rounds=2, peers=8)  # type: ignore[arg-type]
    wire = run_scenario(base.replace(fidelity="wire"))
    obj = run_scenario(base)
    assert wire.stats["refused"] == 0
    # Same bytes counted, same learning: only the envelope work differs.
    assert [r.bytes_sent for r in wire.records] == [r.bytes_sent for r in obj.records]
    assert [r.accuracy for r in wire.records] == [r.accuracy for r in obj.records]


def test_serverless_matchmaking_forms_groups_that_learn() -> None:
    s = Scenario(**SMALL).replace(rounds=3, matchmaking="invite")  # type: ignore[arg-type]
    result = run_scenario(s)
    acc = [r.accuracy for r in result.records]
    assert acc[-1] > acc[0] + 0.2, acc
    assert result.records[-1].messages_sent > 0


# ---------------------------------------------------------------- what a new user sees (#19)


def test_the_cli_prints_a_row_per_round_and_says_what_the_columns_mean(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    small = ["--peers", "8", "--rounds", "3", "--group-size", "4", "--no-plots"]
    assert main(small) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\s+(\d+)\s+([\d.]+)\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+8\s", out, re.M)
    assert [int(r[0]) for r in rows] == [0, 1, 2, 3], out  # one row per round, row 0 first
    assert "acc start: the initial model's metric" in out and "consensus: RMS L2" in out
    assert (tmp_path / "murmur-sim-out" / "metrics.jsonl").exists()
    # A second run without --out does not overwrite the first: it says where it writes.
    first = (tmp_path / "murmur-sim-out" / "metrics.jsonl").read_bytes()
    assert main([*small, "--seed", "5"]) == 0
    out = capsys.readouterr().out
    assert "murmur-sim-out/ holds an earlier run: writing to murmur-sim-out-2/" in out
    assert (tmp_path / "murmur-sim-out" / "metrics.jsonl").read_bytes() == first
    assert (tmp_path / "murmur-sim-out-2" / "metrics.jsonl").read_bytes() != first


def _figures(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Capture each figure as it is saved: file name -> figure."""
    import matplotlib.figure

    saved: dict[str, Any] = {}
    original = matplotlib.figure.Figure.savefig

    def spy(fig: Any, fname: Any, *args: Any, **kwargs: Any) -> None:
        saved[Path(fname).name] = fig
        original(fig, fname, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    return saved


def test_plots_say_what_they_measure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    saved = _figures(monkeypatch)
    scenario = Scenario(peers=8, rounds=3, group_size=4, churn=0.2, seed=2)
    result = Simulation(scenario).run()
    write_run(result, tmp_path)
    eps = saved["epsilon_vs_rounds.png"].axes[0]
    assert any(t.get_text() == "budget (8)" for t in eps.get_legend().get_texts())
    consensus = saved["consensus_vs_rounds.png"].axes[0]
    assert "RMS L2 of models to their mean" in consensus.get_ylabel()
    assert consensus.get_yscale() in ("linear", "log")  # never symlog with empty decades
    churn = saved["churn.png"].axes[0]
    assert "churn" in churn.get_title()
    assert (tmp_path / "churn.png").stat().st_size > 1000
    # In a sweep, a run identical to another (secure-group and group, by design) is named so.
    records = result.records
    plot_sweep({"group": records, "secure-group": records}, tmp_path, metric="accuracy")
    legend = [t.get_text() for t in saved["sweep.png"].axes[0].get_legend().get_texts()]
    assert legend == ["group", "secure-group (identical to group)"]


def test_the_synthetic_task_gives_each_peer_its_own_device_and_learns() -> None:
    scenario = Scenario(task="synthetic", peers=12, rounds=6, group_size=4, privacy="none")
    sim = Simulation(scenario)
    owners = sim.task.owners
    assert owners is not None and int(owners.max()) + 1 == 12  # one device per peer
    result = sim.run()
    assert result.records[-1].accuracy > result.records[0].accuracy + 0.2
    assert result.scenario.partition == "auto"
    with pytest.raises(ConfigError, match="partition natural needs a task"):
        Simulation(Scenario(task="digits", peers=6, rounds=1, partition="natural"))
    # Twice the peers, twice the data (digits stays at 1,797 rows whatever the peers).
    bigger = Simulation(scenario.replace(peers=24))
    assert bigger.task.n_train > 1.6 * sim.task.n_train


def test_a_task_too_small_for_the_peers_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--peers", "300", "--rounds", "1", "--quiet", "--no-plots", "--group-size", "4"]
    assert main([*args, "--out", str(tmp_path / "digits")]) == 0
    err = capsys.readouterr().err
    assert "note: digits-logreg has 1437 training rows, 4.8 per peer with 300 peers" in err
    assert "--task synthetic" in err
    assert main([*args, "--task", "synthetic", "--out", str(tmp_path / "synthetic")]) == 0
    assert "note:" not in capsys.readouterr().err


@pytest.mark.parametrize("engine", ["gossip", "direct"])
def test_secure_rounds_under_churn_count_failed_and_recovered_averages(engine: str) -> None:
    """Peers leaving mid-round: some secure groups finish by recovering (the two reducers of
    every chunk), and the per-round counts add up to the run's."""
    s = Scenario(
        peers=24,
        rounds=10,
        algorithm="secure",
        privacy="none",
        group_size=8,
        churn=0.2,
        rejoin=0.6,
        churn_window_s=2.0,
        engine=engine,  # type: ignore[arg-type]
    )
    result = run_scenario(s)
    rows = result.records[1:]
    assert sum(r.failed_averages for r in rows) == result.stats["failed_averages"]
    assert sum(r.recovered_averages for r in rows) > 0
    assert all(r.recovered_averages + r.failed_averages <= r.active_peers for r in rows)
    # the group counters: every formed group completed or aborted, recovered ones completed
    assert all(r.groups_completed + r.groups_aborted == r.groups_formed for r in rows)
    assert all(r.groups_recovered <= r.groups_completed for r in rows)
    assert sum(r.groups_recovered for r in rows) > 0
    assert sum(r.groups_aborted for r in rows) > 0
    assert all(r.groups_aborted == 0 for r in rows if r.failed_averages == 0)
    assert all(r.failed_with_quorum <= r.failed_averages for r in rows)


def test_groups_formed_and_completed_without_churn() -> None:
    s = Scenario(peers=24, rounds=2, algorithm="secure", privacy="none", group_size=8)
    rows = run_scenario(s).records[1:]
    assert [(r.groups_formed, r.groups_completed, r.groups_aborted) for r in rows] == [
        (3, 3, 0),
        (3, 3, 0),
    ]
    assert all(r.groups_recovered == 0 for r in rows)
