"""The one place that assembles a peer from a run description (``gossip.spec.RunSpec``).

:func:`privacy_config` and :func:`train_config` (what the learner is told), :func:`build_learner`
(budget -> learner), :func:`build_machine` (the averaging protocol, a ``gossip.machine.Machine``)
and :func:`build_session` (the daemon's and the API's round loop: the machine run by
``gossip.driver.Driver`` inside ``gossip.service.TrainingSession``). The simulator builds its
peers with the same functions and runs the same machines with its tick driver.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import networkx as nx
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dp.budget import Budget
from floor.errors import ConfigError
from floor.identity import Identity
from gossip.allreduce import AllReduceConfig, GroupAveraging, NoisedRing
from gossip.baselines import Dpsgd, Pairwise, PushSum, metropolis_weights
from gossip.driver import Driver
from gossip.learner import BudgetLike, Learner, TrainConfig
from gossip.machine import Machine
from gossip.matchmaking import GroupFormer, HashGrouping, Invitations, MatchConfig
from gossip.network import Network
from gossip.privacy import (
    NoiseMode,
    PrivacyConfig,
    PrivacyPlan,
    PrivacyUnit,
    check_ring_fits,
    ring_scale,
)
from gossip.service import Evaluate, TrainingSession
from gossip.spec import MATCHMAKING, RunSpec

__all__ = [
    "allreduce_config",
    "build_learner",
    "build_machine",
    "build_session",
    "check_noise_fits",
    "match_config",
    "privacy_config",
    "train_config",
]


def allreduce_config(spec: RunSpec) -> AllReduceConfig:
    """The group all-reduce's public parameters."""
    return AllReduceConfig(
        bits=64 if spec.distributed else spec.ring_bits,
        bound=spec.value_bound,
        stage_timeout_s=spec.stage_timeout_s,
        min_stage_timeout_s=spec.min_stage_timeout_s,
        adaptive_deadlines=spec.adaptive_deadlines,
        threshold=spec.threshold or None,
        degree=spec.degree or None,
        noised=NoisedRing(ring_scale(spec.clip), spec.group_threshold)
        if spec.distributed
        else None,
        weight=1.0 if spec.private else None,  # under DP every weight is 1 (TrainConfig)
    )


def match_config(spec: RunSpec) -> MatchConfig:
    """The matchmaker's parameters."""
    return MatchConfig(
        target_size=spec.group_size,
        min_size=spec.smallest_group,
        form_timeout_s=spec.form_timeout_s,
        round_timeout_s=spec.match_timeout_s,
    )


def privacy_config(spec: RunSpec) -> PrivacyConfig:
    """What the learner's privatization is told."""
    if not spec.private:
        return PrivacyConfig.none()
    return PrivacyConfig(
        unit=PrivacyUnit(spec.privacy),
        epsilon=spec.epsilon if math.isfinite(spec.epsilon) else None,
        delta=spec.delta,
        clip=spec.clip,
        noise_multiplier=spec.noise_multiplier or None,
        rounds=spec.rounds,
        noise=NoiseMode.DISTRIBUTED if spec.distributed else NoiseMode.LOCAL,
        shares=spec.noise_shares if spec.distributed else 1,
        colluders=spec.colluders,
    )


def train_config(spec: RunSpec, *, momentum: float = 0.0) -> TrainConfig:
    """Local training settings."""
    return TrainConfig(
        local_steps=spec.local_steps, lr=spec.lr, sample_rate=spec.sample_rate, momentum=momentum
    )


def build_learner(
    spec: RunSpec,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    budget: BudgetLike | None = None,
    generator: torch.Generator | None = None,
    momentum: float = 0.0,
) -> Learner:
    """One peer's learner: its model and rows, privatization and budget (default: an
    in-memory ``dp.Budget`` capped at ``(epsilon, delta)``; a daemon passes a persistent one)."""
    privacy = privacy_config(spec)
    if budget is None and privacy.unit is not PrivacyUnit.NONE and privacy.epsilon is not None:
        budget = Budget(privacy.epsilon, spec.delta)
    learner = Learner(
        model,
        x,
        y,
        train=train_config(spec, momentum=momentum),
        privacy=privacy,
        loss_fn=loss_fn,
        generator=generator,
        budget=budget,
    )
    check_noise_fits(spec, learner.plan)
    return learner


def check_noise_fits(spec: RunSpec, plan: PrivacyPlan) -> None:
    """``ConfigError`` naming the fields if distributed noise could wrap a group's sum."""
    if plan.distributed is not None:
        check_ring_fits(
            plan.distributed,
            value_bound=spec.value_bound,
            clip=spec.clip,
            group_size=spec.group_size,
            bits=64,
            guard_bits=AllReduceConfig.guard_bits,
        )


def build_machine(
    spec: RunSpec,
    *,
    seed: bytes,
    me: bytes,
    rng: random.Random | None = None,
    matchmaking: str = "invite",
    graph: nx.Graph | None = None,
    peers: Sequence[bytes] | None = None,
) -> Machine:
    """The averaging machine of the peer with identity ``seed`` (raw id ``me``).

    ``matchmaking`` (``MATCHMAKING``) chooses how groups form; ``dpsgd`` needs the fixed
    ``graph`` and ``peers`` (node i is ``peers[i]``). ``rng`` makes back-offs, partners and ids
    repeatable (simulation); without it they come from the OS.
    """
    name = spec.algorithm
    if name in ("secure", "plain"):
        former: GroupFormer
        if matchmaking == "hash":
            former = HashGrouping(me, size=spec.group_size, min_size=spec.smallest_group)
        elif matchmaking == "invite":
            former = Invitations(me, match_config(spec), rng=rng)
        else:
            raise ConfigError(f"matchmaking must be one of {MATCHMAKING}; got {matchmaking!r}")
        return GroupAveraging(
            seed, me, former, secure=name == "secure", config=allreduce_config(spec)
        )
    if name == "pairwise":
        return Pairwise(period_s=spec.period_s, rng=rng, me=me)
    if name == "push-sum":
        return PushSum(period_s=spec.period_s, rng=rng, me=me)
    if graph is None or peers is None:
        raise ConfigError(
            "dpsgd needs a fixed topology of known peers: run it in the simulator, or use "
            "secure or plain groups, pairwise or push-sum on a network"
        )
    return Dpsgd(metropolis_weights(graph, peers, me), timeout_s=spec.period_s / 2)


def build_session(
    spec: RunSpec,
    net: Network,
    identity: Identity,
    learner: Learner,
    *,
    evaluate: Evaluate | None = None,
    round_timeout_s: float = 60.0,
    checkpoint: Path | None = None,
    checkpoint_meta: dict[str, str] | None = None,
) -> TrainingSession:
    """A network peer's round loop: ``learner`` averaging by ``spec``'s machine through a
    ``Driver`` on ``net``. Rounds are not in lockstep (peers start seconds apart: any ready
    peers group). ``session.close()`` also closes the driver. With ``checkpoint`` the session
    resumes from that file if it exists and rewrites it after every round
    (``gossip.checkpoint``; ``checkpoint_meta`` must match the file's, e.g. the task)."""
    machine = build_machine(spec, seed=identity.seed(), me=identity.peer_id.raw)
    driver = Driver(net, machine, send_timeout_s=max(spec.stage_timeout_s, 1.0))
    return TrainingSession(
        net,
        learner,
        driver,
        rounds=spec.rounds,
        evaluate=evaluate,
        round_timeout_s=round_timeout_s,
        lockstep=False,
        checkpoint=checkpoint,
        checkpoint_meta=checkpoint_meta,
    )
