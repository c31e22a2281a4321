"""Run a :class:`murmur.Training` in the simulator: the researcher's path of the Python API.

The simulator (``simulator/``) plays many peers on a virtual clock with the daemon's own
learner and averaging code; here the same :class:`~murmur.api.Training` a network peer runs
becomes a ``simulator.Scenario`` plus a ``gossip.tasks.Task`` built from the user's model
factory and tensors. ``training.data`` is everyone's data, split among the simulated peers::

    result = murmur.simulate(training, peers=20, latency_ms=30, churn=0.05)
    for record in result.records:           # row 0 is the initial model
        print(record.round, record.accuracy, record.epsilon)
    murmur.plot(result, "plots/")            # or several: plot({"a": r1, "b": r2}, ...)

Network and population settings are ``Scenario`` fields passed as keywords (``latency_ms``,
``loss``, ``churn``, ``stragglers``...; see ``simulator.config.Scenario``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from floor.errors import ConfigError
from gossip.spec import SPEC_FIELDS
from murmur.api import Training
from simulator.config import FIELD_NAMES, Scenario
from simulator.engine import RoundRecord, RunResult, Simulation
from simulator.output import plot_sweep

__all__ = ["compare", "plot", "scenario_for", "simulate"]

# A cap the simulator's accountant never reaches: privacy given as a noise multiplier only.
_NO_CAP = 1e9


def scenario_for(training: Training, *, peers: int, **settings: Any) -> Scenario:
    """The ``Scenario`` that runs ``training`` with ``peers`` simulated peers.

    ``settings`` are further scenario fields (network, churn, engine...). Fields that the
    training already describes (rounds, privacy, averaging, learning rate) cannot be given
    again: change the ``Training`` instead.
    """
    train = training.train_config()
    if train.momentum:
        raise ConfigError(
            "the simulator trains with plain SGD steps: give lr (or an SGD optimizer without "
            "momentum) to simulate this training"
        )
    spec = training.spec()
    described: dict[str, Any] = {
        name: getattr(spec, name) for name in SPEC_FIELDS if name in FIELD_NAMES
    }
    if not math.isfinite(spec.epsilon):
        described["epsilon"] = _NO_CAP
    described.update(name=training.name, peers=peers)
    unknown = sorted(set(settings) - FIELD_NAMES)
    if unknown:
        raise ConfigError(f"unknown simulator setting {unknown[0]!r} (see simulator.Scenario)")
    again = sorted((set(settings) & set(described)) - {"name"})
    if again:
        raise ConfigError(
            f"{again[0]!r} is part of the Training; change it there "
            f"(dataclasses.replace(training, ...)) rather than in simulate()"
        )
    return Scenario(**{**described, **settings})


def simulate(
    training: Training,
    *,
    peers: int = 20,
    on_round: Callable[[RoundRecord], None] | None = None,
    **settings: Any,
) -> RunResult:
    """Run ``training`` over ``peers`` simulated peers; returns the per-round records.

    The model factory, data, loss and metric are the ones a network peer uses; the data is
    split among the peers (``partition="dirichlet"`` in ``settings`` for non-IID shards). An
    evaluation split is held out of ``data`` if ``eval_data`` is not given.
    """
    _not_in_a_loop("simulate")
    training.check()
    scenario = scenario_for(training, peers=peers, **settings)
    return Simulation(scenario, task=training.task()).run(on_round)


def _not_in_a_loop(what: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise ConfigError(
        f"{what}() runs its own virtual-clock event loop: call it from synchronous code, or "
        f"from async code as 'await asyncio.to_thread(murmur.{what}, ...)'"
    )


def compare(
    training: Training,
    variants: Mapping[str, Mapping[str, Any]],
    *,
    peers: int = 20,
    **settings: Any,
) -> dict[str, RunResult]:
    """Run ``training`` once per variant, each a dict of ``Training`` fields to change.

    ``compare(t, {"secure": {}, "push-sum": {"averaging": Baseline("push_sum")},
    "eps=1": {"privacy": Privacy(epsilon=1.0)}})``: results by variant label.
    """
    fields = {f.name for f in dataclasses.fields(Training)}
    results: dict[str, RunResult] = {}
    for label, changes in variants.items():
        bad = sorted(set(changes) - fields)
        if bad:
            raise ConfigError(f"variant {label!r}: {bad[0]!r} is not a Training field")
        variant = dataclasses.replace(training, name=label, **changes)
        results[label] = simulate(variant, peers=peers, **settings)
    return results


def plot(
    runs: Mapping[str, RunResult | Sequence[RoundRecord]] | RunResult | Sequence[RoundRecord],
    out: str | Path,
    *,
    metric: str | None = None,
) -> Path:
    """One figure of ``runs`` (accuracy, consensus and epsilon against rounds), written to the
    directory ``out``; returns the PNG's path.

    ``runs`` is one result (``murmur.plot(result, "plots/")``), or several by label to compare
    (``murmur.plot({"secure": a, "plain": b}, "plots/")``, e.g. what ``compare`` returns).
    """
    if isinstance(runs, RunResult):
        runs = {runs.scenario.name or "run": runs}
    elif not isinstance(runs, Mapping):
        runs = {"run": list(runs)}
    if not runs:
        raise ConfigError("plot: give at least one run")
    records: dict[str, Sequence[RoundRecord]] = {}
    names = set()
    for label, run in runs.items():
        if isinstance(run, RunResult):
            records[label] = run.records
            names.add(run.metric_name)
        else:
            records[label] = run
    if metric is None:
        metric = names.pop() if len(names) == 1 else "accuracy"
    return plot_sweep(records, out, metric=metric)
