"""In-process, virtual-time network simulator running the daemon's own protocol code.

The Python API for researchers::

    from simulator import Scenario, run_scenario, plot_metrics

    result = run_scenario(Scenario(peers=100, rounds=25, algorithm="secure-group", churn=0.1))
    for rec in result.records:          # one RoundRecord per round, row 0 = initial model
        print(rec.round, rec.accuracy, rec.epsilon)
    plot_metrics({"churn": result.records}, "plots/")

``Simulation(scenario, task=...)`` accepts a custom ``gossip.tasks.Task``; ``load_scenario``
reads TOML files; ``write_run`` writes the metrics files, summary and plots; ``sweep`` runs one
scenario over several values of a field.

Two engines run the daemon's own averaging machines (``gossip.run.build_machine``) on the same
network model: ``gossip`` (default) with the daemon's asyncio driver over
``simulator.gossipnet.SimPeerNetwork``; ``direct`` from the network's tick callbacks
(``simulator.ticks``), with group workers, for thousands of peers. One seed gives the same
metrics under either.
"""

from simulator.config import ALGORITHMS, Scenario, Sweep, load_scenario, load_sweep
from simulator.engine import COLUMNS, RoundRecord, RunResult, Simulation, run_scenario
from simulator.output import plot_metrics, plot_sweep, records_table, write_run

__all__ = [
    "ALGORITHMS",
    "COLUMNS",
    "RoundRecord",
    "RunResult",
    "Scenario",
    "Simulation",
    "Sweep",
    "load_scenario",
    "load_sweep",
    "plot_metrics",
    "plot_sweep",
    "records_table",
    "run_scenario",
    "sweep",
    "write_run",
]


def sweep(base: Scenario, field: str, values: list[object]) -> dict[str, RunResult]:
    """Run ``base`` once per value of ``field``; results keyed by ``"<field>=<value>"``."""
    runs = Sweep(field, tuple(values)).scenarios(base)
    return {s.name: run_scenario(s) for s in runs}
