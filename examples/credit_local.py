"""Train your own model on the credit-scoring task across local Murmur daemons.

Each peer is a real daemon (identity key, authenticated envelopes over HTTP on 127.0.0.1,
membership) holding one bank's share of the loans. They train the model below together with
secure aggregation in groups and record-level differential privacy; nobody sees another
bank's rows or updates. Run:

    python examples/credit_local.py                     # 4 peers, 10 rounds
    python examples/credit_local.py --peers 3 --rounds 2 --samples 900   # small and quick

The daemons run in this one process for convenience (``murmur demo`` starts separate
processes); on real machines each bank runs ``murmur.Peer(bootstrap=...)`` on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import warnings
from collections.abc import Callable

import torch
from torch import nn

import murmur
from gossip.tasks import CREDIT_FEATURES, credit_task, roc_auc


class CreditScorer(nn.Module):
    """The user's own model: a small MLP over the 12 credit features, two classes out."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(len(CREDIT_FEATURES), hidden), nn.Tanh(), nn.Linear(hidden, 2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def describe(
    x: torch.Tensor,
    y: torch.Tensor,
    test: tuple[torch.Tensor, torch.Tensor],
    args: argparse.Namespace,
) -> murmur.Training:
    """One bank's training run: its rows, the shared model code and the shared settings."""
    return murmur.Training(
        model=CreditScorer,
        data=(x, y),
        lr=0.3,
        eval_data=test,
        metric=roc_auc,
        averaging=murmur.SecureGroups(size=args.group_size),
        privacy=murmur.Privacy(epsilon=args.epsilon, delta=1e-5, clip=1.0, unit="record"),
        rounds=args.rounds,
        local_steps=5,
    )


async def main(args: argparse.Namespace) -> int:
    task = credit_task(n_samples=args.samples, seed=args.seed)
    test = (task.x_test, task.y_test)
    shards = [torch.arange(i, task.n_train, args.peers) for i in range(args.peers)]
    first = murmur.Peer()
    await first.start()
    peers = [first]
    try:
        for _ in range(args.peers - 1):
            peer = murmur.Peer(bootstrap=first.address)
            await peer.start()
            peers.append(peer)
        print(f"{args.peers} daemons on loopback; bootstrap {first.address}")
        print(f"{'peer':<6} {'round':>5} {'status':<12} {'group':>5} {'roc_auc':>8} {'epsilon':>8}")

        def show(i: int) -> Callable[[murmur.RoundReport], None]:
            def on_round(r: murmur.RoundReport) -> None:
                auc = "-" if r.accuracy is None else f"{r.accuracy:.3f}"
                print(
                    f"{i:<6} {r.round:>5} {r.status:<12} {r.group_size:>5} {auc:>8} "
                    f"{r.epsilon:>8.3f}",
                    flush=True,
                )

            return on_round

        results = await asyncio.gather(
            *(
                p.run(describe(task.x_train[idx], task.y_train[idx], test, args), on_round=show(i))
                for i, (p, idx) in enumerate(zip(peers, shards, strict=True))
            )
        )
    finally:
        for p in reversed(peers):
            await p.aclose()
    ok = sum(r.status == "ok" for reports in results for r in reports)
    print(f"done: {ok} of {sum(map(len, results))} peer-rounds averaged in a group")
    return 0 if ok else 1


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=4, help="number of local daemons")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--group-size", type=int, default=4, help="secure group size k (>= 3)")
    parser.add_argument("--epsilon", type=float, default=8.0, help="each bank's budget")
    parser.add_argument("--samples", type=int, default=6000, help="loans in the synthetic table")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


if __name__ == "__main__":
    # Daemons sharing one process train in threads at once; torch's harmless "Full backward
    # hook" notice can then escape dp's local filter. Separate processes never see it.
    warnings.filterwarnings("ignore", "Full backward hook is firing", UserWarning)
    torch.set_num_threads(1)
    raise SystemExit(asyncio.run(main(parse())))
