"""Writing a run's files (metrics.jsonl, metrics.csv, summary.json), plots, and the end table.

``metrics.jsonl`` holds one row per round (row 0: the initial model) with only virtual-time
values, serialized with sorted keys and ``repr`` floats, so two runs with the same seed write
identical bytes. Wall time and memory go to ``summary.json`` only. Plots use matplotlib's Agg
backend (no display needed).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from floor.errors import ConfigError
from simulator.engine import COLUMNS, RoundRecord, RunResult

__all__ = [
    "LEGEND",
    "fresh_outdir",
    "plot_metrics",
    "plot_sweep",
    "records_table",
    "round_header",
    "round_row",
    "write_run",
]

CONSENSUS = "consensus distance (RMS L2 of models to their mean; 0: all agree)"
"""What the consensus columns and plots measure."""


def fresh_outdir(default: str | Path) -> tuple[Path, bool]:
    """``default``, or the first of ``default-2``, ``default-3``... holding no earlier run.

    Returns the directory and whether it differs from ``default`` (so the caller can say so):
    a second run without ``--out`` never overwrites the first one's files.
    """
    base = Path(default)
    candidate, n = base, 1
    while (candidate / "metrics.jsonl").exists() or (candidate / "summary.json").exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate, candidate != base


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _outdir(out: str | Path) -> Path:
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"out: cannot create directory {path}: {exc.strerror}") from None
    return path


def write_run(result: RunResult, out: str | Path, *, plots: bool = True) -> Path:
    """Write the metrics files, the summary and (by default) the plots of one run to ``out``."""
    path = _outdir(out)
    with open(path / "metrics.jsonl", "w", encoding="utf-8") as fh:
        for rec in result.records:
            row = {k: _clean(v) for k, v in asdict(rec).items()}
            fh.write(json.dumps(row, sort_keys=True) + "\n")
    with open(path / "metrics.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(COLUMNS)
        for rec in result.records:
            writer.writerow([getattr(rec, c) for c in COLUMNS])
    with open(path / "summary.json", "w", encoding="utf-8") as fh:
        json.dump(result.summary(), fh, indent=2, sort_keys=True, default=_clean)
        fh.write("\n")
    if plots:
        s = result.scenario
        title = f"{s.name}: {s.algorithm}, {s.peers} peers, {s.task}-{s.model}, DP {s.privacy}"
        budget = s.epsilon if s.privacy != "none" and s.epsilon < 1e8 else None
        plot_metrics(
            {s.name: result.records},
            path,
            metric=result.metric_name,
            title=title,
            budget=budget,
            churn=s.churn > 0 or s.stragglers > 0 or any(r.dropped for r in result.records),
        )
    return path


def _consensus_scale(ax: Any, values: Sequence[float]) -> None:
    """Log scale when the positive values span more than a decade, else linear from 0."""
    positive = [v for v in values if v > 0 and math.isfinite(v)]
    if positive and max(positive) / min(positive) > 10:
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0)


def plot_metrics(
    runs: Mapping[str, Sequence[RoundRecord]],
    out: str | Path,
    *,
    metric: str = "accuracy",
    title: str | None = None,
    budget: float | None = None,
    churn: bool = False,
) -> list[Path]:
    """Plot accuracy and consensus distance against rounds and bytes, epsilon against rounds.

    ``runs`` maps a label to its records; several runs share each figure (a sweep). With
    ``budget`` the epsilon plot draws the budget line; with ``churn``, ``churn.png`` shows
    the peers online and the contributions dropped in each round. Returns the PNG files
    written to ``out``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = _outdir(out)
    figures = [
        ("accuracy_vs_rounds.png", "round", "accuracy", "round", metric),
        ("accuracy_vs_bytes.png", "bytes_sent", "accuracy", "bytes sent (all peers, MB)", metric),
        ("consensus_vs_rounds.png", "round", "consensus_distance", "round", CONSENSUS),
        (
            "consensus_vs_bytes.png",
            "bytes_sent",
            "consensus_distance",
            "bytes sent (all peers, MB)",
            CONSENSUS,
        ),
        ("epsilon_vs_rounds.png", "round", "epsilon", "round", "epsilon spent (max over peers)"),
    ]
    written = []
    for name, x, y, xlabel, ylabel in figures:
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        for label, records in runs.items():
            xs = [getattr(r, x) / (1e6 if x == "bytes_sent" else 1) for r in records]
            (line,) = ax.plot(xs, [getattr(r, y) for r in records], marker=".", label=label)
            if y == "epsilon" and any(
                r.epsilon_central != r.epsilon or r.epsilon_local != r.epsilon for r in records
            ):
                # distributed noise: the budgeted epsilon, what happened, and own share only
                color = line.get_color()
                line.set_label(f"{label}: budgeted (worst case of every round)")
                ax.plot(
                    xs,
                    [r.epsilon_central for r in records],
                    ls="--",
                    color=color,
                    label=f"{label}: central (counted members)",
                )
                ax.plot(
                    xs,
                    [r.epsilon_local for r in records],
                    ls=":",
                    color=color,
                    label=f"{label}: local (own noise share only)",
                )
                ax.legend(fontsize=8)
        if y == "epsilon" and budget is not None:
            ax.axhline(budget, color="black", lw=1, ls="-.", label=f"budget ({budget:g})")
            ax.legend(fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel, fontsize=9 if y == "consensus_distance" else None)
        if y == "consensus_distance":
            _consensus_scale(ax, [r.consensus_distance for rs in runs.values() for r in rs])
        ax.grid(alpha=0.3)
        if title:
            ax.set_title(title, fontsize=10)
        if len(runs) > 1:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path / name)
        plt.close(fig)
        written.append(path / name)
    if churn:
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        for label, records in runs.items():
            rounds = [r.round for r in records[1:]]
            (line,) = ax.plot(
                rounds, [r.active_peers for r in records[1:]], label=f"{label}: online"
            )
            ax.bar(
                rounds,
                [r.dropped for r in records[1:]],
                color=line.get_color(),
                alpha=0.4,
                label=f"{label}: contributions not counted",
            )
            if any(r.failed_averages or r.recovered_averages for r in records[1:]):
                ax.plot(
                    rounds,
                    [r.failed_averages for r in records[1:]],
                    color=line.get_color(),
                    linestyle=":",
                    label=f"{label}: got no average (group aborted / none)",
                )
                ax.plot(
                    rounds,
                    [r.recovered_averages for r in records[1:]],
                    color=line.get_color(),
                    linestyle="--",
                    marker=".",
                    label=f"{label}: averaged by a group that recovered",
                )
        title = "churn: peers online when the round began, and those dropped"
        written.append(_save_counts(fig, ax, path / "churn.png", "peers", title))
        if any(r.groups_formed for rs in runs.values() for r in rs[1:]):
            fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
            for label, records in runs.items():
                rounds = [r.round for r in records[1:]]
                (line,) = ax.plot(
                    rounds, [r.groups_formed for r in records[1:]], label=f"{label}: formed"
                )
                color = line.get_color()
                for field, style, what in (
                    ("groups_completed", "--", "completed"),
                    ("groups_recovered", "-.", "completed by recovering"),
                    ("groups_aborted", ":", "aborted"),
                ):
                    values = [getattr(r, field) for r in records[1:]]
                    ax.plot(rounds, values, color=color, linestyle=style, label=f"{label}: {what}")
            title = "groups per round: formed, completed, recovered, aborted"
            written.append(_save_counts(fig, ax, path / "groups.png", "groups", title))
    return written


def _save_counts(fig: Any, ax: Any, target: Path, ylabel: str, title: str) -> Path:
    """Finish a per-round count plot (rounds on x, counts from 0 on y) and write it."""
    import matplotlib.pyplot as plt

    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(target)
    plt.close(fig)
    return target


def _same_as(runs: Mapping[str, Sequence[RoundRecord]]) -> dict[str, str]:
    """label -> the earlier label whose records are identical (drawn on top of each other)."""
    seen: dict[tuple[Any, ...], str] = {}
    out: dict[str, str] = {}
    for label, records in runs.items():
        key = tuple((r.accuracy, r.consensus_distance, r.epsilon) for r in records)
        if key in seen:
            out[label] = seen[key]
        else:
            seen[key] = label
    return out


def plot_sweep(runs: Mapping[str, Sequence[RoundRecord]], out: str | Path, *, metric: str) -> Path:
    """One combined figure of a sweep: accuracy, consensus and epsilon against rounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = _outdir(out)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), dpi=100)
    same = _same_as(runs)
    for label, records in runs.items():
        rounds = [r.round for r in records]
        style: dict[str, Any] = {"marker": ".", "label": label}
        if label in same:  # identical numbers: dashed on top, and the legend says so
            style.update(ls="--", marker="x", label=f"{label} (identical to {same[label]})")
        axes[0].plot(rounds, [r.accuracy for r in records], **style)
        axes[1].plot(rounds, [r.consensus_distance for r in records], **style)
        axes[2].plot(rounds, [r.epsilon for r in records], **style)
    ylabels = (metric, CONSENSUS, "epsilon spent (max over peers)")
    for ax, ylabel in zip(axes, ylabels, strict=True):
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel, fontsize=9)
        ax.grid(alpha=0.3)
    _consensus_scale(axes[1], [r.consensus_distance for rs in runs.values() for r in rs])
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    target = path / "sweep.png"
    fig.savefig(target)
    plt.close(fig)
    return target


LEGEND = (
    "acc start: the initial model's metric (round 0, before training); acc end: after the last "
    "round (mean over peers' own models, held-out data); consensus: RMS L2 distance of the "
    "peers' models to their mean (0: all agree); epsilon: the largest privacy spend of any "
    "peer; dropped: peer-rounds whose contribution was not counted (left, straggled, lost, "
    "aborted group); failed: peers that got no average (group aborted or never formed); "
    "recov: peers whose secure group finished although members dropped after their input; "
    "groups: groups completed / formed this round."
)
"""What the columns of :func:`records_table` and :func:`round_row` mean."""


def round_header(metric: str = "accuracy") -> str:
    """The header of the per-round table (the metric column named after the task's metric)."""
    head = (
        f"{'round':>5} {metric[:8]:>8} {'loss':>7} {'consensus':>10} {'epsilon':>8} "
        f"{'online':>6} {'dropped':>7} {'failed':>6} {'recov':>5} {'groups':>7} {'MB sent':>9} "
        f"{'virtual s':>10}"
    )
    return head + "\n" + "-" * len(head)


def round_row(record: RoundRecord) -> str:
    """One line of the per-round table."""
    return (
        f"{record.round:>5} {record.accuracy:>8.3f} {record.loss:>7.3f} "
        f"{record.consensus_distance:>10.4f} {record.epsilon:>8.2f} {record.active_peers:>6d} "
        f"{record.dropped:>7d} {record.failed_averages:>6d} {record.recovered_averages:>5d} "
        f"{f'{record.groups_completed}/{record.groups_formed}':>7} "
        f"{record.bytes_sent / 1e6:>9.1f} {record.virtual_time_s:>10.1f}"
    )


def records_table(results: Sequence[RunResult]) -> str:
    """A short text table: per run, first and last accuracy, consensus, epsilon, traffic, times."""
    head = (
        f"{'run':<22} {'acc start':>9} {'acc end':>8} {'consensus':>10} {'epsilon':>8} "
        f"{'MB sent':>9} {'dropped':>8} {'virtual s':>10} {'wall s':>7}"
    )
    lines = [head, "-" * len(head)]
    for res in results:
        first, last = res.records[0], res.records[-1]
        dropped = sum(r.dropped for r in res.records)
        lines.append(
            f"{res.scenario.name[:22]:<22} {first.accuracy:>9.3f} {last.accuracy:>8.3f} "
            f"{last.consensus_distance:>10.4f} {last.epsilon:>8.2f} "
            f"{last.bytes_sent / 1e6:>9.1f} {dropped:>8d} {last.virtual_time_s:>10.1f} "
            f"{res.wall_time_s:>7.1f}"
        )
    return "\n".join(lines)
