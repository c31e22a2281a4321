"""Runs one scenario: N learners, the simulated network, rounds on the virtual clock, metrics.

Each round, on one ``simulator.clock.VirtualClockLoop``:

1. churn: offline peers may rejoin, online peers may be picked to leave at a time within the
   round (``simulator.netmodel.Population``);
2. every online peer trains locally and privatizes its update (``simulator.training``: the
   daemon's ``gossip.learner.Learner`` per peer, or all peers of a linear model in one stacked
   step) and becomes ready after its virtual compute time (stragglers are slower);
3. every peer's averaging machine (the daemon's, from ``gossip.run.build_machine``) runs over
   ``simulator.network.SimNetwork`` until every peer has its result or gave up at a deadline
   (``simulator.ticks``). ``engine = "gossip"`` (default) drives the machines with the
   daemon's asyncio driver; ``engine = "direct"`` drives the same machines straight from the
   network's tick callbacks, with no future or task at all, and runs hash-grouped rounds on
   ``simulator.parallel``'s group workers (several cores; the same results for any number of
   workers). Both engines give the same metrics for the same seed;
4. peers apply their results; a metrics row is recorded.

A round that has not ended ``round_limit`` virtual seconds after it began is ended by force
(no round can hang). Nothing in a metrics row depends on wall-clock time.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import os
import random
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import networkx as nx
import numpy as np
import torch

from floor.errors import ConfigError
from gossip.baselines import topology
from gossip.data import partition, peer_shards
from gossip.learner import Learner
from gossip.model import Layout, restore
from gossip.privacy import PrivacyUnit, plan_privacy
from gossip.run import check_noise_fits, privacy_config, train_config
from gossip.tasks import Task, make_task
from simulator.budget import SharedAccountant, SimBudget
from simulator.clock import new_virtual_loop
from simulator.config import Scenario
from simulator.netmodel import Population
from simulator.network import SimNetwork
from simulator.parallel import GroupPool, Tally
from simulator.ticks import PeerRounds, round_groups
from simulator.training import PerPeerTrainer, StackedTrainer, Trainer, stackable

__all__ = [
    "COLUMNS",
    "RoundRecord",
    "RunResult",
    "Simulation",
    "build_task",
    "group_workers",
    "run_scenario",
]


@dataclass(frozen=True)
class RoundRecord:
    """One metrics row. Row 0 is the initial model, before any training.

    ``accuracy`` and ``loss`` are the mean over the evaluated peers' own models on the held-out
    split (``accuracy`` holds the task's metric, e.g. ROC AUC for ``credit``);
    ``consensus_distance`` is the RMS L2 distance of the online peers' models to their mean;
    ``epsilon`` the largest epsilon any peer spent (the budgeted one; under distributed noise
    the worst case of every round), ``epsilon_central`` that peer's epsilon for what happened
    (the members its groups counted) and ``epsilon_local`` its epsilon against everyone else
    in its groups (its own noise only; the same as ``epsilon`` with local noise); ``bytes_*``
    and ``messages_*`` are totals since the start; ``active_peers`` were online when the round
    began, ``dropped`` of them did not have their contribution counted (left, straggled, lost
    messages, aborted group); ``failed_averages`` peers of the round got no average (their
    group aborted or never formed) and ``recovered_averages`` got one from a secure group that
    finished although members dropped after their input (this round's counts).
    ``groups_formed`` counts the round's groups in which any member ended its round,
    ``groups_completed`` those in which any member got the result (``groups_recovered`` of
    them by recovering from late dropouts), ``groups_aborted`` the rest;
    ``failed_with_quorum`` counts the failed peers whose group aborted although at least t of
    its members had not left (the aborts recovery did not prevent; the rest of
    ``failed_averages`` is explained by peers that left, or by no group forming).
    """

    round: int
    virtual_time_s: float
    accuracy: float
    loss: float
    consensus_distance: float
    epsilon: float
    epsilon_central: float
    epsilon_local: float
    bytes_sent: int
    bytes_received: int
    active_peers: int
    dropped: int
    messages_sent: int
    messages_lost: int
    failed_averages: int = 0
    recovered_averages: int = 0
    groups_formed: int = 0
    groups_completed: int = 0
    groups_recovered: int = 0
    groups_aborted: int = 0
    failed_with_quorum: int = 0


COLUMNS: tuple[str, ...] = tuple(RoundRecord.__dataclass_fields__)
"""Column names of the metrics files, in order."""


@dataclass
class RunResult:
    """The records of one run and what it cost (wall time and memory are not in the records)."""

    scenario: Scenario
    records: list[RoundRecord]
    wall_time_s: float
    peak_rss_mib: float
    metric_name: str
    stats: dict[str, Any] = field(default_factory=dict)

    def rows(self) -> list[dict[str, Any]]:
        """The records as dicts (e.g. ``pandas.DataFrame(result.rows())``)."""
        return [asdict(r) for r in self.records]

    def final(self) -> RoundRecord:
        """The last round's record."""
        return self.records[-1]

    def summary(self) -> dict[str, Any]:
        """Everything about the run that is not a per-round metric (JSON-friendly)."""
        last = self.final()
        return {
            "scenario": self.scenario.to_dict(),
            "metric_name": self.metric_name,
            "wall_time_s": round(self.wall_time_s, 3),
            "peak_rss_mib": round(self.peak_rss_mib, 1),
            "virtual_time_s": last.virtual_time_s,
            "final": asdict(last),
            "stats": self.stats,
        }


def build_task(s: Scenario) -> Task:
    """The scenario's learning task."""
    options: dict[str, Any] = {"seed": s.seed}
    if s.task == "synthetic":  # one device per peer: the data grows with the network
        options.update(
            devices=s.peers,
            iid=s.synthetic == "iid",
            alpha=s.synthetic_alpha,
            beta=s.synthetic_beta,
            model=s.model,
        )
    elif s.task in ("digits", "credit", "mnist"):
        options["model"] = s.model
    elif s.model != "logreg":
        raise ConfigError(f"model must be logreg for task {s.task}; got {s.model!r}")
    return make_task(s.task, **options)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Simulation:
    """One scenario's peers, network and learners; ``run()`` plays the rounds."""

    def __init__(self, scenario: Scenario, task: Task | None = None) -> None:
        self.scenario = scenario
        self.task = task if task is not None else build_task(scenario)
        self.trainer = self._trainer()
        n = scenario.peers
        self.population = Population(scenario, n, scenario.seed)
        perm = np.random.default_rng([scenario.seed, 0x4556]).permutation(n)
        self._eval_order: list[int] = perm.tolist()
        self._eval_model = self.task.build_model(scenario.seed)
        self._layout = Layout.of(self._eval_model)

    def _trainer(self) -> Trainer:
        s, task = self.scenario, self.task
        n = s.peers
        scheme = s.partition
        if scheme == "auto":
            scheme = "natural" if task.owners is not None else "iid"
        if scheme == "natural":
            if task.owners is None:
                raise ConfigError(
                    f"partition natural needs a task whose rows come in devices (synthetic); "
                    f"{task.name} has none: use iid, dirichlet or label"
                )
            owners = task.owners.numpy()
            devices = int(owners.max()) + 1
            parts = [np.flatnonzero(owners == k) for k in range(devices)]
        else:
            # More peers than rows/2: peers share shards (a systems experiment, not privacy).
            parts_n = min(n, max(1, task.n_train // 2))
            parts = partition(
                task.y_train,
                parts_n,
                scheme=scheme,  # type: ignore[arg-type]
                alpha=s.alpha,
                labels_per_peer=s.labels_per_peer,
                min_samples=2 if parts_n * 2 <= task.n_train else 1,
                seed=s.seed,
            )
        shards = peer_shards(task.x_train, task.y_train, parts)
        spec = s.spec()
        train = train_config(spec)
        privacy = privacy_config(spec)
        unit = privacy.unit
        accountant = None
        model = task.build_model(s.seed)
        plan = plan_privacy(
            privacy,
            local_steps=s.local_steps,
            sample_rate=s.sample_rate,
            dimension=Layout.of(model).size,
        )
        check_noise_fits(spec, plan)
        if unit is not PrivacyUnit.NONE:
            accountant = SharedAccountant(
                plan,
                delta=s.delta,
                epsilon=s.epsilon,
                max_count=None if s.noise_multiplier else s.rounds,
            )
        use_stacked = s.training == "stacked" or (s.training == "auto" and stackable(model))
        if use_stacked:
            if not isinstance(model, torch.nn.Linear) or not stackable(model):
                raise ConfigError("training = stacked needs a linear model (model = logreg)")
            return StackedTrainer(
                model,
                shards,
                n,
                plan=plan,
                accountant=accountant,
                local_steps=s.local_steps,
                lr=s.lr,
                sample_rate=s.sample_rate,
                weighting_by_samples=train.by_samples(privacy.unit is not PrivacyUnit.NONE),
                seed=s.seed,
            )
        learners = []
        for i in range(n):
            x, y = shards[i % parts_n]
            gen = torch.Generator().manual_seed(s.seed * 1_000_003 + i)
            learners.append(
                Learner(
                    task.build_model(s.seed) if i == 0 else _clone(model),
                    x,
                    y,
                    train=train,
                    privacy=privacy,
                    loss_fn=task.loss_fn,
                    generator=gen,
                    budget=None if accountant is None else SimBudget(accountant),
                    noise_rng=random.Random(s.seed * 1_000_003 + i + 7),
                )
            )
        return PerPeerTrainer(learners)

    # ------------------------------------------------------------------ running

    def run(self, on_round: Callable[[RoundRecord], None] | None = None) -> RunResult:
        """Play every round on a virtual-clock loop; ``on_round`` sees each record as it lands."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # DESIGN.md: two threads made small steps 5-25x slower
        # The peers, tasks and keys built so far live for the whole run: keep the cyclic
        # collector from walking them again and again (11% of a 1,000-peer round). A run
        # allocates millions of short-lived messages: collect the young generation every
        # 20,000 allocations instead of 700, and the older ones rarely (GC time per 1,000-peer
        # round 69 -> 28 ms).
        # The simulated peers run the daemon's code, which logs a warning per aborted group
        # round and peer: thousands of lines at scale, all counted in the metrics and stats
        # already (dropped, failed_averages). Keep them off the console while the run lasts.
        quiet = [logging.getLogger(name) for name in ("murmur.gossip", "murmur.mpc")]
        levels = [logger.level for logger in quiet]
        for logger in quiet:
            logger.setLevel(max(logger.getEffectiveLevel(), logging.ERROR))
        thresholds = gc.get_threshold()
        gc.freeze()
        gc.set_threshold(20_000, 20, 20)
        start = time.perf_counter()
        peak = 0.0
        try:
            if _grouped(self.scenario):
                records, stats, peak = self._run_groups(on_round)
            else:
                with asyncio.Runner(loop_factory=new_virtual_loop) as runner:
                    records, stats = runner.run(self._main(on_round))
        finally:
            for logger, level in zip(quiet, levels, strict=True):
                logger.setLevel(level)
            gc.set_threshold(*thresholds)
            gc.unfreeze()
            torch.set_num_threads(threads)
        wall = time.perf_counter() - start
        return RunResult(
            self.scenario, records, wall, max(peak, _peak_rss_mib()), self.task.metric_name, stats
        )

    def _run_groups(
        self, on_round: Callable[[RoundRecord], None] | None
    ) -> tuple[list[RoundRecord], dict[str, Any], float]:
        """The direct engine's group rounds, on ``simulator.parallel``'s group workers.

        The engine keeps the clock between rounds: a round starts at ``t0`` (the previous
        round's end), runs every group to its end in the workers, and ends at the latest
        group's end; departures due by then are applied here too.
        """
        s = self.scenario
        n = s.peers
        online = self.population.online
        limit = self._round_limit()
        pending: dict[int, float] = {}  # peer -> when it leaves (not yet due)
        aborted = forced = 0
        workers = group_workers(s)
        with GroupPool(s, workers) as pool:
            raw_ids = pool.local.net.raw_ids
            tally = Tally()
            records = [self._record(0, 0.0, tally, n, 0)]
            if on_round is not None:
                on_round(records[0])
            t = 0.0
            index = pool.local.net.index
            for rnd in range(1, s.rounds + 1):
                t0 = t
                for p, when in self.population.round_start(t0):
                    pending[p] = min(when, pending.get(p, math.inf))
                active = [p for p in range(n) if online[p]]
                contributions = self.trainer.contribute(active)
                ready = {p: t0 + self.population.compute_time(p) for p in active}
                view = [p for p in active if contributions[p][1] > 0]
                found = round_groups(s, rnd, tuple(raw_ids[p] for p in view))
                groups = [[index[m] for m in g] for g in found or ()]
                leaves = sorted(pending.items(), key=lambda item: (item[1], item[0]))
                outcome = pool.run(
                    rnd, t0, limit, groups, contributions, ready, online, view, leaves
                )
                t = outcome.finish
                tally = pool.settle(t)
                for p, when in leaves:
                    if when <= t:
                        online[p] = False
                        del pending[p]
                forced += outcome.forced
                aborted += outcome.aborted
                for peers, row in outcome.results:
                    theta = torch.from_numpy(row)
                    for p in peers:
                        self.trainer.apply(p, theta, outcome.sizes.get(p))
                self._close_round(
                    rnd,
                    t,
                    tally,
                    active,
                    outcome.counted,
                    records,
                    on_round,
                    (outcome.aborted, outcome.recovered, *outcome.groups, outcome.quorate),
                )
        stats = {**_stats(tally, aborted, forced), "group_workers": workers}
        return records, stats, tally.peak_rss_mib

    async def _main(
        self, on_round: Callable[[RoundRecord], None] | None
    ) -> tuple[list[RoundRecord], dict[str, Any]]:
        s = self.scenario
        loop = asyncio.get_running_loop()
        n = s.peers
        online = self.population.online
        net = SimNetwork(loop, s, n, online)
        graph: nx.Graph | None = None
        if s.algorithm == "dpsgd":
            graph = topology(s.topology, n, degree=s.topology_degree, seed=s.seed)
        protocol = PeerRounds(net, s, graph)
        records = [self._record(0, 0.0, net, n, 0)]
        if on_round is not None:
            on_round(records[0])
        aborted = forced = 0
        limit = self._round_limit()

        def leave(p: int) -> None:
            if online[p]:
                online[p] = False
                protocol.peer_left(p)

        for rnd in range(1, s.rounds + 1):
            t0 = loop.time()
            leaving = self.population.round_start(t0)
            active = [p for p in range(n) if online[p]]
            contributions = self.trainer.contribute(active)
            ready = {p: t0 + self.population.compute_time(p) for p in active}
            finished = loop.create_future()

            def done(fut: asyncio.Future[None] = finished) -> None:
                if not fut.done():
                    fut.set_result(None)

            protocol.begin(rnd, active, contributions, ready, done)
            for p, when in leaving:
                net.call_at(when, leave, p)
            cap = loop.call_at(t0 + limit, protocol.force_finish)
            await finished
            if not cap.cancelled() and loop.time() >= t0 + limit:
                forced += 1
            cap.cancel()
            for p, theta in protocol.results.items():
                self.trainer.apply(p, theta, protocol.sizes.get(p))
            aborted += protocol.failed
            self._close_round(
                rnd,
                loop.time(),
                net,
                active,
                protocol.counted,
                records,
                on_round,
                (
                    protocol.failed,
                    protocol.recovered,
                    *protocol.group_counts,
                    protocol.failed_with_quorum,
                ),
            )
        return records, _stats(net, aborted, forced)

    def _round_limit(self) -> float:
        """Virtual seconds after which a round is ended by force (no round can hang)."""
        s = self.scenario
        return s.compute_s * s.straggler_slowdown + 12 * s.stage_timeout_s + 60.0

    # ------------------------------------------------------------------ metrics

    def _close_round(
        self,
        rnd: int,
        now: float,
        net: SimNetwork | Tally,
        active: list[int],
        counted: set[int],
        records: list[RoundRecord],
        on_round: Callable[[RoundRecord], None] | None,
        averages: tuple[int, int, int, int, int, int],
    ) -> None:
        """Record round ``rnd`` (``active`` peers, of which ``counted`` were averaged;
        ``averages``: how many peers' averaging failed, how many recovered, the groups
        formed, completed and recovered, and the failed peers whose group kept a quorum)."""
        dropped = len(active) - len(counted & set(active))
        record = self._record(rnd, now, net, len(active), dropped, *averages)
        records.append(record)
        if on_round is not None:
            on_round(record)

    def _record(
        self,
        rnd: int,
        now: float,
        net: SimNetwork | Tally,
        active: int,
        dropped: int,
        failed: int = 0,
        recovered: int = 0,
        formed: int = 0,
        completed: int = 0,
        groups_recovered: int = 0,
        failed_with_quorum: int = 0,
    ) -> RoundRecord:
        s = self.scenario
        online = [p for p in range(s.peers) if self.population.online[p]]
        if not online:
            online = list(range(s.peers))
        up = set(online)
        chosen = [p for p in self._eval_order if p in up]
        if s.eval_peers:
            chosen = chosen[: s.eval_peers]
        losses, metrics = [], []
        for theta in self.trainer.thetas(chosen):
            restore(self._eval_model, theta, self._layout)
            ev = self.task.evaluate(self._eval_model)
            losses.append(ev.loss)
            metrics.append(ev.metric)
        thetas = self.trainer.thetas(online).double()
        spread = thetas - thetas.mean(dim=0, keepdim=True)
        consensus = float(spread.pow(2).sum(dim=1).mean().sqrt())
        eps = self.trainer.epsilon(online)
        central, local = self.trainer.epsilons(online)
        return RoundRecord(
            round=rnd,
            virtual_time_s=round(now, 6),
            accuracy=_r(float(np.mean(metrics))),
            loss=_r(float(np.mean(losses))),
            consensus_distance=_r(consensus),
            epsilon=_r(eps),
            epsilon_central=_r(central),
            epsilon_local=_r(local),
            bytes_sent=net.bytes_sent,
            bytes_received=net.bytes_received,
            active_peers=active if rnd else len(online),
            dropped=dropped,
            messages_sent=net.messages_sent,
            messages_lost=net.messages_lost,
            failed_averages=failed,
            recovered_averages=recovered,
            groups_formed=formed,
            groups_completed=completed,
            groups_recovered=groups_recovered,
            groups_aborted=formed - completed,
            failed_with_quorum=failed_with_quorum,
        )


def _stats(net: SimNetwork | Tally, aborted: int, forced: int) -> dict[str, Any]:
    """A run's counters for ``RunResult.stats``."""
    return {
        "timers": net.timers,
        "refused": net.refused,
        "messages_delivered": net.messages_delivered,
        "retransmissions": net.retransmissions,
        "failed_averages": aborted,
        "forced_rounds": forced,
    }


def _grouped(s: Scenario) -> bool:
    """Whether the run's rounds are the direct engine's group rounds (``simulator.parallel``)."""
    return s.engine == "direct" and s.grouped and s.matchmaking == "hash"


def group_workers(s: Scenario) -> int:
    """How many processes run a round's groups: ``workers``, or with 0 one per core (at most
    8, and at most one per 250 peers: a spawned worker costs ~1 s of start-up)."""
    if not _grouped(s):
        return 1
    if s.workers:
        return s.workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cores or 1, 8, s.peers // 250))


def _r(x: float) -> float:
    return x if not math.isfinite(x) else round(x, 6)


def _clone(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model)


def run_scenario(
    scenario: Scenario, *, on_round: Callable[[RoundRecord], None] | None = None
) -> RunResult:
    """Build and run ``scenario``; the one-call API."""
    return Simulation(scenario).run(on_round)
