"""Learning quality with ideal averaging: no DP, record-level and peer-level DP, centralized.

Digits, 16 peers, Dirichlet(0.5), 30 rounds, seeded; logistic regression and the MLP; peer-level
privacy also with more peers (the trade-off local DP at the peer level makes). Writes a markdown
table to stdout (and to bench/results/learning.md with --write).

    python -m bench.bench_learning [--write] [--rounds 30] [--seed 0] [--part all|quality|speed]

The speed part times one round of local training for many peers, one learner after another
against one stacked torch.func step (gossip.batched), in the same run.
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gossip.batched import _train_stacked
from gossip.ideal import build_learners, run_ideal, train_centralized
from gossip.learner import TrainConfig
from gossip.privacy import PrivacyConfig, PrivacyUnit
from gossip.tasks import Task, digits_task

TRAIN = TrainConfig(local_steps=5, lr=0.3, sample_rate=0.2)
DELTA = 1e-5


@dataclass
class Row:
    model: str
    setting: str
    peers: int
    accuracy: float
    at_10: float
    at_20: float
    epsilon: float
    z: float
    seconds: float


def _ideal(
    task: Task, model: str, setting: str, privacy: PrivacyConfig, peers: int, rounds: int, seed: int
) -> Row:
    t0 = time.perf_counter()
    learners = build_learners(
        task, peers, scheme="dirichlet", alpha=0.5, train=TRAIN, privacy=privacy, seed=seed
    )
    res = run_ideal(task, learners, rounds)
    by_round = {r.round: r.metric for r in res.rounds}
    return Row(
        model,
        setting,
        peers,
        res.final.metric,
        by_round.get(10, float("nan")),
        by_round.get(20, float("nan")),
        res.final.epsilon_spent,
        res.noise_multiplier,
        time.perf_counter() - t0,
    )


def _private(unit: PrivacyUnit, eps: float, rounds: int) -> PrivacyConfig:
    return PrivacyConfig(unit=unit, epsilon=eps, delta=DELTA, clip=1.0, rounds=rounds)


def run(rounds: int, seed: int) -> list[Row]:
    rows: list[Row] = []
    for model in ("logreg", "mlp"):
        task = digits_task(model=model)  # type: ignore[arg-type]
        t0 = time.perf_counter()
        central = train_centralized(task, steps=rounds * 20, lr=0.3, batch_size=64, seed=seed)
        rows.append(
            Row(
                model,
                "centralized, no DP",
                1,
                central.metric,
                *[float("nan")] * 2,
                0.0,
                0.0,
                time.perf_counter() - t0,
            )
        )
        rows.append(_ideal(task, model, "ideal, no DP", PrivacyConfig.none(), 16, rounds, seed))
        for eps in (8.0, 4.0, 2.0):
            priv = _private(PrivacyUnit.RECORD, eps, rounds)
            rows.append(_ideal(task, model, f"ideal, record eps={eps:g}", priv, 16, rounds, seed))
        for eps in (8.0, 64.0):
            priv = _private(PrivacyUnit.PEER, eps, rounds)
            rows.append(_ideal(task, model, f"ideal, peer eps={eps:g}", priv, 16, rounds, seed))
    task = digits_task(model="logreg")
    for peers in (64, 256):
        for eps in (8.0, 64.0):
            priv = _private(PrivacyUnit.PEER, eps, rounds)
            rows.append(
                _ideal(task, "logreg", f"ideal, peer eps={eps:g}", priv, peers, rounds, seed)
            )
    return rows


def speed(peers: int, seed: int) -> str:
    """Training time of one round for many peers: one by one against one stacked step."""
    lines = [
        "| model | privacy | peers | one by one, s/round | stacked, s/round | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for model in ("logreg", "mlp"):
        task = digits_task(model=model)  # type: ignore[arg-type]
        for unit in (PrivacyUnit.NONE, PrivacyUnit.PEER, PrivacyUnit.RECORD):
            privacy = (
                PrivacyConfig.none()
                if unit is PrivacyUnit.NONE
                else PrivacyConfig(unit=unit, epsilon=None, noise_multiplier=1.0)
            )
            learners = build_learners(
                task, peers, scheme="dirichlet", train=TRAIN, privacy=privacy, seed=seed
            )
            # Warm up both paths (imports, torch.func tracing). Only training is timed: the
            # budget check, privatization and accounting are the same calls in both paths.
            for learner in learners[:4]:
                learner._train()
            _train_stacked(learners[:4])
            t0 = time.perf_counter()
            for learner in learners:
                learner._train()
            t1 = time.perf_counter()
            _train_stacked(learners)
            t2 = time.perf_counter()
            one, many = t1 - t0, t2 - t1
            lines.append(
                f"| {model} | {unit} | {peers} | {one:.3f} | {many:.3f} | {one / many:.1f}x |"
            )
    return "\n".join(lines)


def _fmt(x: float, pct: bool = True) -> str:
    if x != x:  # NaN
        return "-"
    return f"{100 * x:.1f}%" if pct else f"{x:.2f}"


def table(rows: list[Row]) -> str:
    ref = {r.model: r.accuracy for r in rows if r.setting.startswith("centralized")}
    lines = [
        "| model | setting | peers | acc. round 10 | round 20 | final | vs centralized "
        "| eps spent | z | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.setting} | {r.peers} | {_fmt(r.at_10)} | {_fmt(r.at_20)} "
            f"| **{_fmt(r.accuracy)}** | {r.accuracy / ref[r.model]:.2f}x "
            f"| {_fmt(r.epsilon, False)} | {_fmt(r.z, False)} | {r.seconds:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", action="store_true", help="write bench/results/learning.md")
    parser.add_argument("--part", choices=("all", "quality", "speed"), default="all")
    parser.add_argument("--speed-peers", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    tables = {}
    if args.part in ("all", "quality"):
        tables["table"] = table(run(args.rounds, args.seed))
        print(tables["table"])
    if args.part in ("all", "speed"):
        tables["speed"] = speed(args.speed_peers, args.seed)
        print(tables["speed"])
    total = time.perf_counter() - t0
    print(f"total {total:.0f} s on {platform.machine()}, torch {torch.__version__}, 1 thread")
    if args.write:
        _write(tables)


def _write(tables: dict[str, str]) -> None:
    path = Path(__file__).parent / "results" / "learning.md"
    path.parent.mkdir(exist_ok=True)
    text = path.read_text() if path.exists() else ""
    for name, body in tables.items():
        marker, end = f"<!-- {name} -->", f"<!-- /{name} -->"
        if marker in text:
            head, _, rest = text.partition(marker)
            tail = rest.partition(end)[2]
            text = f"{head}{marker}\n{body}\n{end}{tail}"
        else:
            text += f"\n{marker}\n{body}\n{end}\n"
    path.write_text(text)


if __name__ == "__main__":
    main()
