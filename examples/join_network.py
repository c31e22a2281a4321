"""Join an existing Murmur network from a bootstrap address and train with it.

Every peer of one training run must use the same task, seed, rounds and group size; each
trains on its own part of the data (``--shard I/N``). Start the first peer without
``--bootstrap`` (it prints the address to give the others), or point every peer at any peer
already in the network. Three peers, one per terminal (the tests run exactly these):

    python examples/join_network.py --listen 127.0.0.1:7070 --shard 0/3
    python examples/join_network.py --bootstrap 127.0.0.1:7070 --shard 1/3
    python examples/join_network.py --bootstrap 127.0.0.1:7070 --shard 2/3

Each waits until the whole group is in view (``--group-size``, 3 by default: the smallest
secure group; with more peers, raise it on every peer), trains ``--rounds`` rounds (10) and
prints one line per round. This script uses the synchronous API (``murmur.SyncPeer``); no
``async`` needed.
"""

from __future__ import annotations

import argparse

import torch

import murmur
from gossip.tasks import TASK_NAMES, make_task
from p2p.config import MembershipConfig, parse_shard


def main(args: argparse.Namespace) -> int:
    task = make_task(args.task, seed=args.seed)
    index, count = parse_shard(args.shard)
    rows = torch.arange(index, task.n_train, count)  # this peer's part of the rows
    training = murmur.Training(
        model=task.model_factory,
        data=(task.x_train[rows], task.y_train[rows]),
        eval_data=(task.x_test, task.y_test),
        loss=task.loss_fn,
        metric=task.metric,
        metric_name=task.metric_name,
        lr=0.3,
        averaging=murmur.SecureGroups(size=args.group_size),
        privacy=murmur.Privacy(epsilon=args.epsilon, delta=1e-5, unit=args.privacy_unit),
        rounds=args.rounds,
        seed=args.seed,
    )
    # Quick peer exchange for a small network; keep trying the bootstrap address for a while
    # (it may still be starting).
    membership = MembershipConfig(
        exchange_interval_s=1.0, ping_interval_s=1.0, join_attempts=20, join_retry_delay_s=1.0
    )
    with murmur.SyncPeer(
        listen=args.listen,
        bootstrap=args.bootstrap or (),
        data_dir=args.data_dir,
        membership=membership,
    ) as peer:
        role = f"joined through {args.bootstrap}" if args.bootstrap else "started a new network"
        print(f"peer {peer.peer.peer_id} at {peer.address}: {role}", flush=True)

        def show(r: murmur.RoundReport) -> None:
            metric = "-" if r.accuracy is None else f"{r.accuracy:.3f}"
            print(
                f"round {r.round}: {r.status} group={r.group_size} {task.metric_name}={metric} "
                f"epsilon={r.epsilon:.3f} sent={r.bytes_sent}B",
                flush=True,
            )

        # Start together: wait until the whole network is in view (round numbers must match).
        reports = peer.train(
            training,
            on_round=show,
            wait_for_peers=(args.peers or args.group_size) - 1,
            join_timeout_s=args.join_timeout,
        )
        # Keep answering for a moment: the others may still be finishing their last round.
        peer.serve(args.linger)
    ok = sum(r.status == "ok" for r in reports)
    print(f"done: {ok} of {len(reports)} rounds averaged in a group", flush=True)
    return 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", metavar="HOST:PORT", help="a peer already in the network")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: any)")
    parser.add_argument("--data-dir", help="keep the identity and privacy spend here")
    parser.add_argument("--task", choices=TASK_NAMES, default="digits")
    parser.add_argument("--shard", default="0/1", metavar="I/N", help="this peer's part")
    parser.add_argument("--peers", type=int, help="peers to wait for, me included (default: k)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--group-size", type=int, default=3, help="secure group size (>= 3)")
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--privacy-unit", choices=("record", "peer", "none"), default="record")
    parser.add_argument("--seed", type=int, default=0, help="the same on every peer")
    parser.add_argument("--join-timeout", type=float, default=60.0, help="wait for peers (s)")
    parser.add_argument("--linger", type=float, default=2.0, help="serve after the last round")
    return parser.parse_args(argv)


if __name__ == "__main__":
    torch.set_num_threads(1)
    raise SystemExit(main(parse()))
