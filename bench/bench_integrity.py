"""The cost of issue 21's checks and checkpoints, before and after, side by side in one run.

1. A secure round of 8 members at d = 1e6 in Z_2^64 (``mpc.driver.run_group``: every member's
   CPU in one process, the protocol's work only), plus what a ``SecureGroup`` does with the
   result, once per member: its check (``check_total`` after; the old positivity check
   before) and its decode to float64 (``decode_total``; after, from the member's chunk sums,
   ``Member.output_parts``, with no int64 copy of the whole total). After the
   change the round also deals and checks share commitments and hashes them into the view.
   The confirmed chunk sums add a second reducer for every chunk (each input carries a replica
   of the chunk before; both reducers send the sum; members compare). Before, the middle point
   ``--middle`` (checks without the second reducer) and after run in child processes,
   alternating, from git worktrees and from this tree: ratio of medians and the median of
   per-pair ratios.
2. The per-round checkpoint of a 1e6-parameter model (``gossip.checkpoint.write_checkpoint``:
   torch.save, sha256, write, fsync, rename, fsync of the directory) beside one secure round.

    python -m bench.bench_integrity [--before 1fed576] [--middle 3c6ea90] [--pairs 6] [--reps 5]
        [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.bench_hardening import worktree

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time, torch
from mpc.driver import run_group
from gossip.allreduce import AllReduceConfig
d, k, reps = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
config = AllReduceConfig(bound=10.0)
scale = config.scale(k)
vectors = [(torch.rand(d, dtype=torch.float64) * scale).to(torch.int64) for _ in range(k)]
from gossip.allreduce import decode_total
try:
    from gossip.allreduce import check_total
except ImportError:
    check_total = None
times = []
for rep in range(reps + 1):
    t = time.perf_counter()
    run = run_group(vectors, threshold=6, round=rep)
    assert run.ring_sum is not None
    for member in run.members:  # every member checks and decodes, as SecureGroup.result does
        parts = getattr(member, "output_parts", None)
        ring = member.output() if parts is None else parts()
        if check_total is not None:
            check_total(ring, scale, k, config, noised=False)
        else:
            assert float(ring[-1]) > 0
        decode_total(ring, scale)
    if rep:
        times.append(time.perf_counter() - t)
print(json.dumps(times))
"""


def child(tree: Path, d: int, k: int, reps: int) -> list[float]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(d), str(k), str(reps)],
        cwd=tree,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    times: list[float] = json.loads(out.stdout.strip().splitlines()[-1])
    return times


def checkpoint_cost(d: int, reps: int) -> list[float]:
    import torch

    from gossip.checkpoint import write_checkpoint

    state = {"learner": {"theta": torch.rand(d)}, "session": {"round": 1}}
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(reps):
            t = time.perf_counter()
            write_checkpoint(Path(tmp) / "checkpoint.pt", state)
            times.append(time.perf_counter() - t)
    return times


def components(d: int, k: int, reps: int = 30) -> tuple[float, float]:
    """Median seconds per member of the two new pieces: ``check_total`` on a d + 1 total, and
    dealing k share commitments plus checking k revealed shares from each of k members."""
    import torch

    from gossip.allreduce import AllReduceConfig, check_total
    from mpc.state import share_commitment

    config = AllReduceConfig(bound=10.0)
    scale = config.scale(k)
    total = (torch.rand(d + 1, dtype=torch.float64) * scale).to(torch.int64)
    check, commit = [], []
    for _ in range(reps):
        t = time.perf_counter()
        check_total(total, scale, k, config, noised=False)
        check.append(time.perf_counter() - t)
        t = time.perf_counter()
        for _ in range(k + k * k):
            share_commitment(group=b"g" * 16, round=1, dealer=b"d" * 32, x=3, y=b"y" * 66)
        commit.append(time.perf_counter() - t)
    return statistics.median(check), statistics.median(commit)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="1fed576")
    parser.add_argument("--middle", default="3c6ea90")
    parser.add_argument("--d", type=int, default=1_000_000)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    started = time.time()
    before: list[float] = []
    middle: list[float] = []
    after: list[float] = []
    ratios: list[float] = []
    with worktree(args.before) as tree, worktree(args.middle) as mid:
        assert tree is not None and mid is not None
        for _ in range(args.pairs):
            b = statistics.median(child(tree, args.d, args.k, args.reps))
            m = statistics.median(child(mid, args.d, args.k, args.reps))
            a = statistics.median(child(ROOT, args.d, args.k, args.reps))
            before.append(b)
            middle.append(m)
            after.append(a)
            ratios.append(a / b)
    ckpt = statistics.median(checkpoint_cost(args.d, 10))
    check, commit = components(args.d, args.k)
    mb, mm, ma = statistics.median(before), statistics.median(middle), statistics.median(after)
    k, d = args.k, args.d
    bytes_before = ((k - 1) + 1 + (k - 1)) * 8 * d / k  # inputs, backup, chunk sums
    bytes_after = (2 * (k - 1) + 2 * (k - 1)) * 8 * d / k  # inputs with replicas, two sums
    load = os.getloadavg()[0]
    lines = [
        "## Integrity: the cost of checked sums and checkpoints (issue 21)",
        "",
        f"Command: `python -m bench.bench_integrity --before {args.before} --pairs {args.pairs} "
        f"--reps {args.reps}` ({time.time() - started:.0f} s wall, load average {load:.1f} at "
        "the end). *before* is a git worktree of the commit before the checked sums, *middle* "
        f"({args.middle}) the checks without the second reducer; each row is the median over "
        f"{args.pairs} alternating child-process triples of the median of {args.reps} rounds.",
        "",
        f"Secure round, {args.k} members, d = {args.d:,}, Z_2^64, all members' CPU in one "
        "process (`mpc.driver.run_group` + the accept check):",
        "",
        "| code | round ms (median) | per pair |",
        "|---|---:|---|",
        f"| before (no commitments, positivity check) | {mb * 1e3:.0f} | "
        + ", ".join(f"{v * 1e3:.0f}" for v in before)
        + " |",
        f"| middle (share commitments, view over them, check_total) | {mm * 1e3:.0f} | "
        + ", ".join(f"{v * 1e3:.0f}" for v in middle)
        + " |",
        f"| after (+ two reducers per chunk, sums compared) | {ma * 1e3:.0f} | "
        + ", ".join(f"{v * 1e3:.0f}" for v in after)
        + " |",
        "",
        f"- after / before: **{ma / mb:.3f}x** (ratio of medians); per pair: median "
        f"{statistics.median(ratios):.3f}x, range {min(ratios):.3f}x-{max(ratios):.3f}x "
        f"(goal <= 1.1x); the second reducer alone: {ma / mm:.3f}x of the middle point. The "
        "end-to-end ratio is as noisy as this shared machine; the new",
        f"  work itself, timed alone: `check_total` {check * 1e3:.2f} ms per member, share",
        f"  commitments (deal {args.k}, check {args.k} x {args.k} revealed) {commit * 1e3:.2f} ms"
        f" per member: {args.k * (check + commit) * 1e3:.1f} ms for the group, "
        f"**{args.k * (check + commit) / mb * 100:.1f}%** of the round before.",
        f"- checkpoint of a {args.d:,}-parameter model after a round: **{ckpt * 1e3:.1f} ms** "
        f"median (torch.save + sha256 + write + 2 fsyncs), {ckpt / ma * 100:.0f}% of one "
        "secure round's CPU above; it runs in the training executor, off the event loop.",
        f"- bytes each member sends in a round (tensors only, k = {k}, d = {d:,}, Z_2^64): "
        f"{bytes_before / 1e6:.1f} MB before, {bytes_after / 1e6:.1f} MB after "
        f"(**{bytes_after / bytes_before:.2f}x**: the replica of one chunk in every input, and "
        "the second sum of every chunk); messages per member "
        f"{4 * (k - 1) + k} before, {6 * (k - 1)} after (the replica rides in the input; each "
        "member sends the sums of its two chunks).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        (ROOT / "bench" / "results" / "integrity.md").write_text(text)


if __name__ == "__main__":
    main()
