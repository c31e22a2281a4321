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

__all__ = ["plot_metrics", "plot_sweep", "records_table", "write_run"]


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
        plot_metrics({s.name: result.records}, path, metric=result.metric_name, title=title)
    return path


def plot_metrics(
    runs: Mapping[str, Sequence[RoundRecord]],
    out: str | Path,
    *,
    metric: str = "accuracy",
    title: str | None = None,
) -> list[Path]:
    """Plot accuracy and consensus distance against rounds and bytes, epsilon against rounds.

    ``runs`` maps a label to its records; several runs share each figure (a sweep). Returns
    the PNG files written to ``out``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = _outdir(out)
    figures = [
        ("accuracy_vs_rounds.png", "round", "accuracy", "round", metric),
        ("accuracy_vs_bytes.png", "bytes_sent", "accuracy", "bytes sent (all peers, MB)", metric),
        ("consensus_vs_rounds.png", "round", "consensus_distance", "round", "consensus distance"),
        (
            "consensus_vs_bytes.png",
            "bytes_sent",
            "consensus_distance",
            "bytes sent (all peers, MB)",
            "consensus distance",
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
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if y == "consensus_distance":
            ax.set_yscale("symlog", linthresh=1e-3)
        ax.grid(alpha=0.3)
        if title:
            ax.set_title(title, fontsize=10)
        if len(runs) > 1:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path / name)
        plt.close(fig)
        written.append(path / name)
    return written


def plot_sweep(runs: Mapping[str, Sequence[RoundRecord]], out: str | Path, *, metric: str) -> Path:
    """One combined figure of a sweep: accuracy, consensus and epsilon against rounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = _outdir(out)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), dpi=100)
    for label, records in runs.items():
        rounds = [r.round for r in records]
        axes[0].plot(rounds, [r.accuracy for r in records], marker=".", label=label)
        axes[1].plot(rounds, [r.consensus_distance for r in records], marker=".", label=label)
        axes[2].plot(rounds, [r.epsilon for r in records], marker=".", label=label)
    for ax, ylabel in zip(axes, (metric, "consensus distance", "epsilon"), strict=True):
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("symlog", linthresh=1e-3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    target = path / "sweep.png"
    fig.savefig(target)
    plt.close(fig)
    return target


def records_table(results: Sequence[RunResult]) -> str:
    """A short text table: per run, first and last accuracy, consensus, epsilon, traffic, times."""
    head = (
        f"{'run':<22} {'acc r0':>7} {'acc end':>8} {'consensus':>10} {'epsilon':>8} "
        f"{'MB sent':>9} {'dropped':>8} {'virtual s':>10} {'wall s':>7}"
    )
    lines = [head, "-" * len(head)]
    for res in results:
        first, last = res.records[0], res.records[-1]
        dropped = sum(r.dropped for r in res.records)
        lines.append(
            f"{res.scenario.name[:22]:<22} {first.accuracy:>7.3f} {last.accuracy:>8.3f} "
            f"{last.consensus_distance:>10.4f} {last.epsilon:>8.2f} "
            f"{last.bytes_sent / 1e6:>9.1f} {dropped:>8d} {last.virtual_time_s:>10.1f} "
            f"{res.wall_time_s:>7.1f}"
        )
    return "\n".join(lines)
