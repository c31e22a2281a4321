"""Compare averaging algorithms and privacy levels in the simulator, and write one plot.

The same ``murmur.Training`` description a peer runs on the network (model code, data, loss,
privacy, averaging) runs here over simulated peers on a virtual clock, with a network model
(latency, loss, churn). Each variant changes one or two fields of the description. Run:

    python examples/compare_in_simulator.py                       # 32 peers, 15 rounds
    python examples/compare_in_simulator.py --peers 8 --rounds 3 --out /tmp/cmp   # quick

Writes ``OUT/sweep.png`` (accuracy, consensus distance and epsilon per round, one line per
variant) and prints a summary table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

import murmur
from gossip.tasks import digits_task
from simulator import records_table


def make_model() -> nn.Module:
    """The model code, exactly as a peer on the network would use it."""
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


VARIANTS: dict[str, dict[str, object]] = {
    "secure k=4, eps=8": {},
    "secure k=4, eps=2": {"privacy": murmur.Privacy(epsilon=2.0)},
    "secure k=4, no DP": {"privacy": murmur.Privacy.off()},
    "plain groups, no DP": {
        "averaging": murmur.Baseline("plain", group_size=4),
        "privacy": murmur.Privacy.off(),
    },
    "push-sum, no DP": {"averaging": murmur.Baseline("push_sum"), "privacy": murmur.Privacy.off()},
}


def main(args: argparse.Namespace) -> int:
    task = digits_task(model="mlp", seed=args.seed)
    training = murmur.Training(
        model=make_model,
        data=(task.x_train, task.y_train),  # everyone's data: split among the peers
        eval_data=(task.x_test, task.y_test),
        lr=0.3,
        averaging=murmur.SecureGroups(size=4),
        privacy=murmur.Privacy(epsilon=8.0, delta=1e-5, clip=1.0, unit="record"),
        rounds=args.rounds,
        seed=args.seed,
    )
    started = time.perf_counter()
    runs = murmur.compare(
        training,
        VARIANTS,
        peers=args.peers,
        partition="dirichlet",  # non-IID: each peer sees mostly a few digits
        latency_ms=args.latency_ms,
        churn=args.churn,
    )
    png = murmur.plot(runs, Path(args.out))
    print(records_table(list(runs.values())))
    print(f"{len(runs)} runs in {time.perf_counter() - started:.1f} s wall; plot: {png}")
    return 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--latency-ms", type=float, default=40.0, help="mean one-way latency")
    parser.add_argument("--churn", type=float, default=0.0, help="P(a peer leaves in a round)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="murmur-compare", help="directory for sweep.png")
    return parser.parse_args(argv)


if __name__ == "__main__":
    torch.set_num_threads(1)
    raise SystemExit(main(parse()))
