"""Assemble bench/RESULTS.md from the per-area result files in bench/results/.

Each benchmark writes its own section (``bench/results/<area>.md``) with its command and
numbers; this script puts the headline table in front and the sections after it, so the one
page stays in step with what the benchmarks last measured. Run: ``python -m bench.collect``.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = [
    "wire",
    "transport",
    "dp",
    "mpc_primitives",
    "mpc_protocol",
    "group_round",
    "learning",
    "daemon_training",
    "simulator",
    "distributed_dp",
    "hardening",
    "integrity",
    "recovery",
    "churn",
]


def main() -> None:
    head = (HERE / "HEADLINES.md").read_text(encoding="utf-8")
    files = {p.stem: p for p in sorted((HERE / "results").glob("*.md"))}
    names = [n for n in ORDER if n in files] + sorted(set(files) - set(ORDER))
    parts = [head.rstrip() + "\n"]
    for name in names:
        parts.append(f"\n---\n\n<!-- from bench/results/{name}.md -->\n")
        parts.append(files[name].read_text(encoding="utf-8").rstrip() + "\n")
    (HERE / "RESULTS.md").write_text("".join(parts), encoding="utf-8")


if __name__ == "__main__":
    main()
