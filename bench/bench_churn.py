"""Aborted and recovered rounds under churn, before and after, side by side in one run (issue 17).

Runs the shipped ``examples/scenarios/churn.toml`` (100 peers, 40 rounds, secure groups of 8,
20% of the online peers leave in every round, 10% stragglers; same seed) with the code of
``--before`` (a git worktree) and of this tree, in child processes, with secure groups and
with plain ones (``--algorithm plain``), and sums the per-round
counters of ``metrics.jsonl``: member-rounds (peers online when a round began), peers that got
no average (``failed_averages``), of those the ones whose group kept at least t members
(``failed_with_quorum``: the aborts recovery did not prevent; the rest is explained by peers
that left or by no group forming), contributions not counted (``dropped``), recovered averages,
the groups, and the final accuracy. The simulator is deterministic, so one run per tree is the
measurement (no timing is compared).

    python -m bench.bench_churn [--before 55d4048] [--write]
    python -m bench.bench_churn --deadlines   # this tree, fixed against adaptive deadlines
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.bench_hardening import worktree

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = ROOT / "examples" / "scenarios" / "churn.toml"
FIELDS = (
    "failed_averages",
    "failed_with_quorum",
    "dropped",
    "recovered_averages",
    "groups_formed",
    "groups_completed",
    "groups_recovered",
    "groups_aborted",
)


def run(tree: Path, out: Path, algorithm: str, scenario: Path = SCENARIO) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    code = "import sys; from simulator.cli import main; sys.exit(main(sys.argv[1:]))"
    args = [str(scenario), "--algorithm", algorithm, "--no-plots", "--quiet", "--out", str(out)]
    subprocess.run(
        [sys.executable, "-c", code, *args], cwd=tree, env=env, check=True, capture_output=True
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rounds = rows[1:]
    totals: dict[str, Any] = {f: sum(r.get(f, 0) for r in rounds) for f in FIELDS}
    totals["member_rounds"] = sum(r["active_peers"] for r in rounds)
    totals["accuracy"] = rows[-1]["accuracy"]
    totals["virtual_time_s"] = rows[-1]["virtual_time_s"]
    totals["has"] = set(rounds[0])
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="55d4048")
    parser.add_argument("--write", action="store_true")
    parser.add_argument(
        "--deadlines",
        action="store_true",
        help="instead: this tree with fixed against adaptive deadlines (printed, not written)",
    )
    args = parser.parse_args()
    if args.deadlines:
        compare_deadlines()
        return
    with worktree(args.before) as tree, tempfile.TemporaryDirectory() as tmp:
        assert tree is not None
        runs = {
            algorithm: (
                run(tree, Path(tmp) / f"before-{algorithm}", algorithm),
                run(ROOT, Path(tmp) / f"after-{algorithm}", algorithm),
            )
            for algorithm in ("secure", "plain")
        }
        before, after = runs["secure"]

    def cell(t: dict[str, Any], field: str) -> str:
        if field not in t["has"]:
            return "-"
        v = t[field]
        if field.startswith("groups_"):
            return f"{v:,}"
        return f"{v:,} ({100 * v / t['member_rounds']:.1f}%)"

    names = {
        "failed_averages": "peers with no average (aborted group or none formed)",
        "failed_with_quorum": "... of them in a group that kept t members",
        "dropped": "contributions not counted (left, straggled, aborted)",
        "recovered_averages": "averages from a group that recovered",
        "groups_formed": "groups formed",
        "groups_completed": "groups completed",
        "groups_recovered": "groups completed by recovering",
        "groups_aborted": "groups aborted",
    }
    lines = [
        "## Churn: aborted and recovered rounds (issue 17)",
        "",
        f"Command: `python -m bench.bench_churn --before {args.before}`: "
        "`examples/scenarios/churn.toml` (100 peers, 40 rounds, groups of 8, t = 6, "
        "20% of online peers leave per round, 10% stragglers, record-level epsilon 8), same "
        f"seed, with the code of {args.before} (*before*) and of this tree (*after*). "
        f"Member-rounds: {before['member_rounds']:,} before, {after['member_rounds']:,} after; "
        "percentages are of member-rounds (*before* has no group counters).",
        "",
        "| per run | secure before | secure after | plain before | plain after |",
        "|---|---:|---:|---:|---:|",
    ]
    pb, pa = runs["plain"]
    for field in FIELDS:
        cells = " | ".join(cell(t, field) for t in (before, after, pb, pa))
        lines.append(f"| {names[field]} | {cells} |")
    accs = " | ".join(f"{t['accuracy']:.3f}" for t in (before, after, pb, pa))
    lines.append(f"| final accuracy | {accs} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        path = ROOT / "bench" / "results" / "churn.md"
        old = path.read_text() if path.exists() else ""
        notes = old.split("\n<!-- notes -->\n", 1)[1] if "<!-- notes -->" in old else ""
        path.write_text(text + ("\n<!-- notes -->\n" + notes if notes else ""))


def compare_deadlines() -> None:
    """churn.toml on this tree with ``adaptive_deadlines`` off and on, both algorithms."""
    with tempfile.TemporaryDirectory() as tmp:
        adaptive = Path(tmp) / "churn-adaptive.toml"
        text = SCENARIO.read_text()
        adaptive.write_text(text.replace("[group]\n", "[group]\nadaptive_deadlines = true\n", 1))
        print(
            "| algorithm | deadlines | member-rounds | no average | of those with t members "
            "left | not counted | accuracy | virtual time |"
        )
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for algorithm in ("secure", "plain"):
            for name, path in (("fixed", SCENARIO), ("adaptive", adaptive)):
                t = run(ROOT, Path(tmp) / f"{algorithm}-{name}", algorithm, path)
                n = t["member_rounds"]

                def pct(field: str, t: dict[str, Any] = t, n: int = n) -> str:
                    return f"{100 * t[field] / n:.1f}%"

                print(
                    f"| {algorithm} | {name} | {n:,} | {pct('failed_averages')} | "
                    f"{pct('failed_with_quorum')} | {pct('dropped')} | {t['accuracy']:.3f} | "
                    f"{t['virtual_time_s']:.1f} s |"
                )


if __name__ == "__main__":
    main()
