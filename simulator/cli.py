"""The ``murmur-sim`` console script (argument parsing and wiring only).

    murmur-sim [SCENARIO.toml] [--peers N] [--rounds R] [--algorithm A] [--seed S] [--out DIR]
               [--sweep FIELD=V1,V2,...] [--<any scenario field> VALUE] [--no-plots] [--quiet]

Every scenario field is a flag (``--field-name``); flags override the file. Bad files and
flags print one line naming the field and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from floor.cli import BriefParser
from floor.errors import MurmurError
from simulator.config import Scenario, load_scenario, load_sweep, parse_value

DEFAULT_OUT = "murmur-sim-out"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: a flag per scenario field, plus the run options."""
    parser = BriefParser(
        prog="murmur-sim",
        description="Simulate Murmur peers training together on one machine, in virtual time.",
    )
    parser.add_argument("scenario", nargs="?", help="a scenario TOML file (default: built-in)")
    parser.add_argument("--out", default=None, help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--sweep", default=None, help="several runs: FIELD=V1,V2,...")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    group = parser.add_argument_group("scenario fields (override the file)")
    for f in fields(Scenario):
        flag = "--" + f.name.replace("_", "-")
        group.add_argument(
            flag,
            dest="f_" + f.name,
            default=None,
            metavar=str(f.type).upper(),
            help=f"{f.metadata['help']} (default {f.default})",
        )
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(Scenario):
        text = getattr(args, "f_" + f.name)
        if text is not None:
            out[f.name] = parse_value(f.name, text)
    return out


def _run(args: argparse.Namespace) -> int:
    base = load_scenario(args.scenario, _overrides(args))
    sweep = load_sweep(args.scenario, args.sweep)
    scenarios = sweep.scenarios(base) if sweep is not None else [base]

    from tqdm import tqdm

    from simulator.engine import Simulation
    from simulator.output import (
        LEGEND,
        fresh_outdir,
        plot_sweep,
        records_table,
        round_header,
        round_row,
        write_run,
    )

    chosen: Path | None = None if args.out is None else Path(args.out)

    def outdir() -> Path:  # chosen once the first run is done: a failed run names no folder
        nonlocal chosen
        if chosen is None:
            chosen, moved = fresh_outdir(DEFAULT_OUT)
            if moved:
                print(f"{DEFAULT_OUT}/ holds an earlier run: writing to {chosen}/ (or give --out)")
        return chosen

    results = []
    for scenario in scenarios:
        sim = Simulation(scenario)
        rows = sim.task.n_train / scenario.peers
        if sim.task.owners is None and rows < 10:
            print(
                f"note: {sim.task.name} has {sim.task.n_train} training rows, {rows:.1f} per "
                f"peer with {scenario.peers} peers: too few to learn much; --task synthetic "
                "gives every peer its own device of ~65 rows",
                file=sys.stderr,
            )
        if sweep is None:  # one run: the per-round table, row by row as the rounds end
            if not args.quiet:
                print(round_header(sim.task.metric_name), flush=True)

            def step(rec: Any) -> None:
                if not args.quiet:
                    print(round_row(rec), flush=True)

            result = sim.run(step)
            print()
        else:  # a sweep: one progress bar per run, the table at the end
            bar = tqdm(
                total=scenario.rounds,
                desc=scenario.name,
                unit="round",
                disable=args.quiet,
                file=sys.stderr,
                dynamic_ncols=True,
            )

            def tick(rec: Any, bar: Any = bar) -> None:
                if rec.round > 0:
                    bar.update(1)
                    bar.set_postfix(acc=f"{rec.accuracy:.3f}", eps=f"{rec.epsilon:.2f}")

            result = sim.run(tick)
            bar.close()
        out = outdir()
        target = out / scenario.name if sweep is not None else out
        write_run(result, target, plots=not args.no_plots)
        results.append(result)
    if sweep is not None and not args.no_plots:
        runs = {r.scenario.name: r.records for r in results}
        plot_sweep(runs, out, metric=results[0].metric_name)
    print(records_table(results))
    print(textwrap.fill(LEGEND, width=100))
    where = out.resolve()
    print(
        f"\nmetrics, summary and plots in {where}"
        + (" (one folder per run, sweep.png)" if sweep is not None else "")
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``murmur-sim``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except MurmurError as exc:
        print(f"murmur-sim: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
