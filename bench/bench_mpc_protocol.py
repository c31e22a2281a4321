"""Benchmark: the whole in-memory secure-aggregation protocol beside a plaintext sum.

Run from the repository root: ``python -m bench.bench_mpc_protocol`` (``--quick`` for a smoke
run). One torch thread; times are process CPU time. Each row is the median of ``--repeat``
runs of ``mpc.driver.run_group`` on ring-encoded inputs (all k members' work, sequentially, on
one core: key agreement, Shamir, masking, reduce, unmask, all-gather) and of
``mpc.secure_sum`` (plus encode/decode), beside the plaintext float64 sum of the same vectors
(accumulated in place).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from mpc import encode, secure_sum
from mpc.driver import run_group
from mpc.prg import keystream_into


def _median_seconds(fn: Callable[[], object], repeat: int) -> float:
    # CPU time of this process, not wall time: the shared 2-core machine is loaded by others,
    # and with one torch thread the protocol's CPU time is what it costs.
    times = []
    for _ in range(repeat):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


def _row(
    k: int, d: int, degree: int | None, dropped: dict[int, str], repeat: int
) -> dict[str, object]:
    g = torch.Generator().manual_seed(k * d)
    xs = [torch.randn(d, generator=g) for _ in range(k)]
    ring = [encode(x, scale=2.0**20, bits=64) for x in xs]
    t = k // 2 + 1 if degree is None else -(-2 * k // 3)

    def plaintext() -> torch.Tensor:
        acc = torch.zeros(d, dtype=torch.float64)
        for x in xs:
            acc += x
        return acc

    plain = _median_seconds(plaintext, repeat)
    proto = _median_seconds(
        lambda: run_group(ring, threshold=t, degree=degree, dropped=dropped), repeat
    )
    full = _median_seconds(
        lambda: secure_sum(xs, threshold=t, degree=degree, dropped=dropped), repeat
    )
    run = run_group(ring, threshold=t, degree=degree, dropped=dropped)
    # PRG bytes the protocol must produce: each member's self mask and pair masks, and the
    # reducers' removal of the counted self masks (one d-vector each, over all chunks).
    masks = sum(len(m._graph[m.id]) + 1 for m in run.members) + len(run.counted)
    buf = bytearray(d * 8)
    seed = bytes(32)
    prg = _median_seconds(lambda: [keystream_into(seed, buf) for _ in range(masks)], repeat)
    check = secure_sum(xs, threshold=t, degree=degree, dropped=dropped)
    expected = sum((xs[i].double() for i in run.counted), torch.zeros(d, dtype=torch.float64))
    err = float((check - expected).abs().max())
    return {
        "k": k,
        "d": d,
        "mode": "SecAgg" if degree is None else f"SecAgg+ deg {degree}",
        "dropouts": ",".join(f"{i}:{s}" for i, s in dropped.items()) or "none",
        "messages": run.messages,
        "plain_ms": plain * 1e3,
        "proto_ms": proto * 1e3,
        "full_ms": full * 1e3,
        "ratio": proto / plain,
        "prg_ms": prg * 1e3,
        "prg_ratio": proto / prg,
        "per_member_ms": proto * 1e3 / k,
        "max_err": err,
    }


def main() -> None:
    """Run the benchmark and print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cases: list[tuple[int, int, int | None, dict[int, str]]] = [
        (8, 100_000, None, {}),
        (8, 1_000_000, None, {}),
        (8, 1_000_000, None, {3: "unmasking"}),
        (8, 1_000_000, None, {1: "input", 5: "unmasking"}),
        (32, 100_000, 10, {}),
        (32, 1_000_000, 10, {}),
        (32, 1_000_000, None, {}),
    ]
    repeat = args.repeat
    if args.quick:
        cases = [(4, 1000, None, {}), (8, 1000, 4, {})]
        repeat = 1
    head = (
        "| k | d | mode | dropouts | msgs | plaintext sum ms | protocol ms (all k members) "
        "| + encode/decode ms | protocol / plaintext | raw AES-CTR for its masks ms "
        "| protocol / raw PRG | ms per member | max abs err |"
    )
    print(head)
    print("|---" * 13 + "|")
    for k, d, degree, dropped in cases:
        r = _row(k, d, degree, dropped, repeat)
        print(
            f"| {r['k']} | {r['d']:,} | {r['mode']} | {r['dropouts']} | {r['messages']} "
            f"| {r['plain_ms']:.1f} | {r['proto_ms']:.0f} | {r['full_ms']:.0f} "
            f"| {r['ratio']:.0f}x | {r['prg_ms']:.0f} | {r['prg_ratio']:.1f}x "
            f"| {r['per_member_ms']:.1f} | {r['max_err']:.1e} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
