"""Distributed DP: accuracy at peer-level epsilon 8, and the cost of the noise shares.

    python -m bench.bench_distributed_dp [--write] [--seeds 0 1 2] [--part all|accuracy|cost]

Accuracy: the simulator's digits default (100 peers, logreg, iid, 25 rounds, secure groups,
hash matchmaking), peer-level epsilon 8 at delta 1e-5, same seeds for every row:

- ``local``: each peer adds float N(0, (z C)^2) calibrated alone for epsilon 8 (today's mode);
- ``distributed k``: integer noise shares in the ring (``--dp-noise auto``), groups of k;
- ``float, same noise k``: the same groups with float noise of exactly the shares' variance
  (``dp_noise = local`` with the share's noise multiplier and no cap): what the integer
  mechanism costs over float noise of the same size;
- ``central ideal``: every round the exact global mean of all 100 clipped updates plus one
  Gaussian draw calibrated for epsilon 8 (``gossip.ideal``; N local draws of variance
  (z C)^2 / N sum to that one draw exactly).

Cost: one secure group round of 8 members at d = 1e6 (``mpc.driver.run_group``: the whole
protocol, all members on one core, process CPU time) on float inputs encoded the usual way and
on inputs with distributed noise, and the preparation of one member's input (encoding vs
clipping, conditional rounding and the noise share), with the exact sampler's throughput.
"""

from __future__ import annotations

import argparse
import math
import platform
import random
import statistics
import time
from pathlib import Path

import torch

from bench.bench_mpc_protocol import _median_seconds
from dp.accounting import calibrate_noise
from dp.discrete_gaussian import sample_discrete_gaussian, system_random
from gossip.allreduce import AllReduceConfig, encode_contribution
from gossip.ideal import build_learners, run_ideal
from gossip.learner import TrainConfig
from gossip.privacy import (
    NoiseMode,
    PrivacyConfig,
    PrivacyUnit,
    distributed_contribution,
    plan_distributed,
)
from gossip.tasks import digits_task
from mpc.driver import run_group
from simulator.config import Scenario
from simulator.engine import Simulation

EPSILON, DELTA, ROUNDS, PEERS = 8.0, 1e-5, 25, 100
RESULTS = Path(__file__).parent / "results" / "distributed_dp.md"


def _sim(seed: int, **kw: object) -> tuple[float, float, float, float]:
    fields: dict[str, object] = {"peers": PEERS, "rounds": ROUNDS, "privacy": "peer"}
    fields.update(epsilon=EPSILON, seed=seed)
    fields.update(kw)
    s = Scenario(**fields)  # type: ignore[arg-type]
    res = Simulation(s).run()
    last = res.records[-1]
    return last.accuracy, last.epsilon, last.epsilon_central, last.epsilon_local


def _share_multiplier(k: int, dimension: int) -> float:
    """The float noise multiplier (per member, over C) of a distributed share in groups of k."""
    t = -(-2 * k // 3)
    config = PrivacyConfig(
        unit=PrivacyUnit.PEER,
        epsilon=EPSILON,
        delta=DELTA,
        rounds=ROUNDS,
        noise=NoiseMode.DISTRIBUTED,
        shares=t,
    )
    plan = plan_distributed(config, dimension)
    return math.sqrt(plan.sigma_squared) / plan.scale


def _central(seed: int) -> float:
    task = digits_task(model="logreg", seed=seed)
    z = calibrate_noise(epsilon=EPSILON, delta=DELTA, rounds=ROUNDS)
    privacy = PrivacyConfig(
        unit=PrivacyUnit.PEER,
        epsilon=None,
        delta=DELTA,
        noise_multiplier=z / math.sqrt(PEERS),
        rounds=ROUNDS,
    )
    train = TrainConfig(local_steps=5, lr=0.3, sample_rate=0.2)
    learners = build_learners(task, PEERS, train=train, privacy=privacy, seed=seed)
    return run_ideal(task, learners, ROUNDS).final.metric


def accuracy(seeds: list[int]) -> str:
    dimension = 650  # digits logreg: 64 x 10 weights + 10 biases
    rows: list[tuple[str, list[float], str]] = []

    def add(name: str, runs: list[tuple[float, float, float, float]]) -> None:
        eps = runs[0]
        note = f"{eps[1]:.2f} / {eps[2]:.2f} / {eps[3]:.2f}"
        rows.append((name, [r[0] for r in runs], note))

    add("local DP, groups of 8", [_sim(s, dp_noise="local") for s in seeds])
    for k in (8, 16):
        add(f"distributed, groups of {k}", [_sim(s, group_size=k) for s in seeds])
        z = _share_multiplier(k, dimension)
        add(
            f"float, same noise, groups of {k} (z = {z:.3f} per member)",
            [
                _sim(s, group_size=k, dp_noise="local", noise_multiplier=z, epsilon=1e6)
                for s in seeds
            ],
        )
    central = [_central(s) for s in seeds]
    rows.append(("central ideal (one draw on the global mean)", central, "8.00 / 8.00 / -"))
    lines = [
        f"### Accuracy at peer-level epsilon {EPSILON:g} (delta {DELTA:g}), {PEERS} peers, "
        f"digits logreg, {ROUNDS} rounds, seeds {' '.join(map(str, seeds))}",
        "",
        "| setting | accuracy (mean) | per seed | epsilon spent / central / local |",
        "|---|---|---|---|",
    ]
    for name, accs, note in rows:
        per = " ".join(f"{a:.3f}" for a in accs)
        lines.append(f"| {name} | **{statistics.mean(accs):.3f}** | {per} | {note} |")
    return "\n".join(lines)


def cost(repeat: int) -> str:
    torch.set_num_threads(1)
    k, d = 8, 1_000_000
    gen = torch.Generator().manual_seed(5)
    thetas = [torch.randn(d, generator=gen) * 0.1 for _ in range(k)]
    deltas = [torch.randn(d, generator=gen) * 1e-3 for _ in range(k)]
    config = AllReduceConfig()
    plan = plan_distributed(
        PrivacyConfig(
            unit=PrivacyUnit.PEER,
            epsilon=EPSILON,
            rounds=ROUNDS,
            noise=NoiseMode.DISTRIBUTED,
            shares=6,
        ),
        d,
    )
    rng = system_random()
    plain_inputs = [
        encode_contribution(t + u, 1.0, k, config)[0] for t, u in zip(thetas, deltas, strict=True)
    ]
    noised = [
        distributed_contribution(t, u, plan, 1.0, rng) for t, u in zip(thetas, deltas, strict=True)
    ]
    t = 6
    round_plain = _median_seconds(lambda: run_group(plain_inputs, threshold=t), repeat)
    round_noised = _median_seconds(lambda: run_group(noised, threshold=t), repeat)
    enc = _median_seconds(
        lambda: encode_contribution(thetas[0] + deltas[0], 1.0, k, config), repeat
    )
    prep = _median_seconds(
        lambda: distributed_contribution(thetas[0], deltas[0], plan, 1.0, rng), repeat
    )
    n = 1_000_000
    sampler = _median_seconds(
        lambda: sample_discrete_gaussian(plan.sigma_squared, n, rng=rng), repeat
    )
    seeded = _median_seconds(
        lambda: sample_discrete_gaussian(plan.sigma_squared, n, rng=random.Random(1)), repeat
    )
    with_prep = round_noised + k * prep
    without_prep = round_plain + k * enc
    lines = [
        f"### Cost: one secure group round, k = {k}, d = {d:,} (CPU seconds, median of {repeat})",
        "",
        "| what | without noise | with distributed noise | ratio |",
        "|---|---|---|---|",
        f"| group round, inputs ready (all {k} members) | {round_plain:.3f} | "
        f"{round_noised:.3f} | **{round_noised / round_plain:.2f}x** |",
        f"| one member's input: encode vs clip + round + noise share | {enc:.3f} | {prep:.3f} "
        f"| {prep / enc:.0f}x |",
        f"| round + all {k} inputs | {without_prep:.3f} | {with_prep:.3f} | "
        f"{with_prep / without_prep:.1f}x |",
        "",
        f"Exact discrete Gaussian sampler at the share's variance ({plan.sigma_squared:.4g}, "
        f"sigma {math.sqrt(plan.sigma_squared):.0f} ring units): "
        f"**{n / sampler / 1e6:.2f} M samples/s** from the OS CSPRNG, "
        f"{n / seeded / 1e6:.2f} M samples/s from a seeded `random.Random` (simulation).",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help=f"write {RESULTS}")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--part", choices=("all", "accuracy", "cost"), default="all")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    started = time.strftime("%Y-%m-%d")
    parts = [
        "# Distributed DP (issue 15)",
        "",
        f"`python -m bench.bench_distributed_dp --write` on {started}, {platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, Python {platform.python_version()}.",
        "",
    ]
    if args.part in ("all", "accuracy"):
        parts += [accuracy(args.seeds), ""]
    if args.part in ("all", "cost"):
        parts += [cost(args.repeat), ""]
    text = "\n".join(parts)
    print(text)
    if args.write:
        RESULTS.write_text(text)


if __name__ == "__main__":
    main()
