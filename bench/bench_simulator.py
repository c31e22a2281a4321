"""Simulator scale: wall time and peak memory against peers, and where the time goes.

Secure group averaging (groups of 8) + record-level DP (epsilon 8), digits with logistic
regression, ``object`` fidelity, stacked training. Each size runs in its own process so that
peak RSS is that run's own. Writes bench/results/simulator_scaling.png and prints a markdown
table; ``--profile`` adds the cProfile top entries of one run.

    python -m bench.bench_simulator [--peers 100,300,1000] [--rounds 5] [--big 10000]
                                    [--big-rounds 1] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import itertools
import json
import platform
import pstats
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def one(
    peers: int,
    rounds: int,
    algorithm: str,
    profile: bool,
    engine: str = "direct",
    workers: int = 0,
) -> dict[str, object]:
    """Run one size in this process; return its measurements."""
    t0 = time.perf_counter()
    from simulator import Scenario, Simulation

    scenario = Scenario(
        name=f"{peers}",
        peers=peers,
        rounds=rounds,
        algorithm=algorithm,
        model="logreg",
        privacy="record",
        epsilon=8.0,
        fidelity="object",
        eval_peers=32,
        engine=engine,
        workers=workers,
    )
    t1 = time.perf_counter()
    sim = Simulation(scenario)
    t2 = time.perf_counter()
    prof = cProfile.Profile() if profile else None
    if prof is not None:
        prof.enable()
    stamps: list[float] = []
    result = sim.run(on_round=lambda _record: stamps.append(time.perf_counter()))
    # Round 1 also waits for the group workers to start (~1-2 s): the steady per-round cost is
    # the median of the later rounds.
    later = [b - a for a, b in itertools.pairwise(stamps[1:])]
    steady = statistics.median(later) if later else result.wall_time_s / rounds
    if prof is not None:
        prof.disable()
    out: dict[str, object] = {
        "peers": peers,
        "rounds": rounds,
        "algorithm": algorithm,
        "engine": engine,
        "workers": result.stats.get("group_workers", 1),
        "import_s": round(t1 - t0, 2),
        "build_s": round(t2 - t1, 2),
        "run_s": round(result.wall_time_s, 2),
        "per_round_s": round(result.wall_time_s / rounds, 3),
        "steady_round_s": round(steady, 3),
        "peak_rss_mib": round(result.peak_rss_mib, 1),
        "messages": result.records[-1].messages_sent,
        "virtual_s": result.records[-1].virtual_time_s,
        "accuracy": result.records[-1].accuracy,
        "epsilon": result.records[-1].epsilon,
    }
    if prof is not None:
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(18)
        out["profile"] = text.getvalue()
    return out


def spawn(
    peers: int,
    rounds: int,
    algorithm: str,
    profile: bool = False,
    engine: str = "direct",
    workers: int = 0,
) -> dict[str, object]:
    """Run one size in a fresh process (its own peak RSS)."""
    cmd = [
        sys.executable,
        "-m",
        "bench.bench_simulator",
        "--one",
        str(peers),
        str(rounds),
        algorithm,
        engine,
        "--workers",
        str(workers),
    ]
    if profile:
        cmd.append("--profile")
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--peers", default="100,300,1000")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--algorithm", default="secure")
    parser.add_argument("--big", type=int, default=10000)
    parser.add_argument("--big-rounds", type=int, default=1)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--engines", default="direct,gossip")
    parser.add_argument("--full", action="store_true", help="also 1000 peers x 100 rounds")
    parser.add_argument("--one", nargs=4, default=None)
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="processes for a round's groups (direct engine); 0 = the simulator's default",
    )
    args = parser.parse_args()
    if args.one is not None:
        peers, rounds, algorithm = int(args.one[0]), int(args.one[1]), args.one[2]
        print(json.dumps(one(peers, rounds, algorithm, args.profile, args.one[3], args.workers)))
        return
    rows = []
    engines = args.engines.split(",")
    for n in [int(p) for p in args.peers.split(",")]:
        for engine in engines:
            rows.append(spawn(n, args.rounds, args.algorithm, engine=engine))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        rows.append(spawn(n, args.rounds, "group", engine="direct"))  # without secure aggregation
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if args.full:
        rows.append(spawn(1000, 100, args.algorithm, engine="direct"))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if args.big:
        rows.append(spawn(args.big, args.big_rounds, args.algorithm))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"machine: {platform.machine()}, {platform.python_version()}, torch 1 thread\n")
    print(
        "| peers | rounds | algorithm | engine | workers | run s | s/round | s/round after "
        "round 1 | build s | peak RSS MiB | messages | virtual s | accuracy |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['peers']} | {r['rounds']} | {r['algorithm']} | {r['engine']} | "
            f"{r['workers']} | {r['run_s']} | {r['per_round_s']} | {r['steady_round_s']} | "
            f"{r['build_s']} | {r['peak_rss_mib']} | {r['messages']} | {r['virtual_s']} | "
            f"{r['accuracy']} |"
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    scaling = [r for r in rows if r["rounds"] != 100]  # the full run is a point of its own
    for key in sorted({(str(r["algorithm"]), str(r["engine"])) for r in scaling}):
        sel = [r for r in scaling if (r["algorithm"], r["engine"]) == key]
        sel.sort(key=lambda r: int(str(r["peers"])))
        ax.plot(
            [int(str(r["peers"])) for r in sel],
            [float(str(r["steady_round_s"])) for r in sel],
            marker="o",
            label=f"{key[0]}, {key[1]} engine",
        )
    ax.legend(fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("peers")
    ax.set_ylabel("wall seconds per round (after round 1)")
    ax.set_title("record DP, digits logreg, object fidelity", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    RESULTS.mkdir(exist_ok=True)
    fig.savefig(RESULTS / "simulator_scaling.png")
    if args.profile:
        prof = spawn(1000, 2, args.algorithm, profile=True, engine="direct")
        print("\n```\n" + str(prof["profile"]) + "```")


if __name__ == "__main__":
    main()
