"""Ideal averaging: N learners in one process, and every round all of them take the exact
weighted global mean of the contributions. No gossip can do better, so tests, benchmarks and the
simulator use it as the reference. Also centralized non-private training of the same model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from floor.errors import BudgetExhausted, ConfigError
from gossip.batched import local_update_many
from gossip.data import Scheme, partition, peer_shards
from gossip.learner import Contribution, Learner, TrainConfig
from gossip.model import restore
from gossip.privacy import PrivacyConfig
from gossip.tasks import Evaluation, Task

__all__ = [
    "IdealResult",
    "RoundMetrics",
    "build_learners",
    "run_ideal",
    "train_centralized",
    "weighted_mean",
]


@dataclass(frozen=True)
class RoundMetrics:
    """One round of ideal averaging: the global model's test loss and metric."""

    round: int
    loss: float
    metric: float
    contributors: int
    epsilon_spent: float
    """The largest epsilon spent by any peer after this round."""


@dataclass(frozen=True)
class IdealResult:
    """The per-round metrics, the final global model and the peers' last noise multiplier."""

    rounds: list[RoundMetrics]
    theta: Tensor
    noise_multiplier: float
    metric_name: str

    @property
    def final(self) -> RoundMetrics:
        """The last round's metrics."""
        return self.rounds[-1]


def weighted_mean(contributions: list[Contribution]) -> Tensor:
    """The exact weighted mean ``sum w x / sum w`` of the contributions (in float64)."""
    if not contributions:
        raise ConfigError("cannot average zero contributions")
    total = sum(c.weight for c in contributions)
    if not total > 0:
        raise ConfigError("contribution weights must sum to a positive number")
    acc = torch.zeros_like(contributions[0].vector, dtype=torch.float64)
    for c in contributions:
        acc += c.vector.double() * c.weight
    return (acc / total).to(contributions[0].vector.dtype)


def build_learners(
    task: Task,
    num_peers: int,
    *,
    scheme: Scheme = "iid",
    alpha: float = 0.5,
    labels_per_peer: int = 2,
    min_samples: int = 2,
    train: TrainConfig | None = None,
    privacy: PrivacyConfig | None = None,
    seed: int = 0,
) -> list[Learner]:
    """``num_peers`` learners on a partition of ``task``'s training split, seeded.

    All start from the same public model (``task.build_model(seed)``); peer i's generator is
    seeded with ``seed * 1_000_003 + i`` so that a run is reproducible.
    """
    parts = partition(
        task.y_train,
        num_peers,
        scheme=scheme,
        alpha=alpha,
        labels_per_peer=labels_per_peer,
        min_samples=min_samples,
        seed=seed,
    )
    learners = []
    for i, (x, y) in enumerate(peer_shards(task.x_train, task.y_train, parts)):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
        learners.append(
            Learner(
                task.build_model(seed),
                x,
                y,
                train=train,
                privacy=privacy,
                loss_fn=task.loss_fn,
                generator=gen,
            )
        )
    return learners


def run_ideal(
    task: Task,
    learners: list[Learner],
    rounds: int,
    *,
    eval_every: int = 1,
    stacked: bool = False,
) -> IdealResult:
    """Run ``rounds`` rounds of ideal averaging and evaluate the global model on the test split.

    A peer whose budget is spent stops contributing but still receives the global mean. If no
    peer can contribute, the round is skipped (recorded with 0 contributors). ``stacked``
    trains compatible peers in one vectorized step (:func:`gossip.batched.local_update_many`;
    same contributions up to float rounding).
    """
    if not learners:
        raise ConfigError("ideal averaging needs at least one learner")
    if rounds < 1 or eval_every < 1:
        raise ConfigError("rounds and eval_every must be at least 1")
    model = task.build_model()
    layout = learners[0].layout
    theta = learners[0].theta
    history: list[RoundMetrics] = []
    for r in range(1, rounds + 1):
        if stacked:
            contributions = [c for c in local_update_many(learners) if c is not None]
        else:
            contributions = []
            for learner in learners:
                try:
                    contributions.append(learner.local_update())
                except BudgetExhausted:
                    continue
        if contributions:
            theta = weighted_mean(contributions)
            for learner in learners:
                learner.apply_result(theta)
        if r % eval_every == 0 or r == rounds:
            restore(model, theta, layout)
            ev = task.evaluate(model)
            eps = max(learner.epsilon_spent for learner in learners)
            history.append(RoundMetrics(r, ev.loss, ev.metric, len(contributions), eps))
    z = learners[0].plan.noise_multiplier
    return IdealResult(history, theta, z, task.metric_name)


def train_centralized(
    task: Task,
    *,
    steps: int,
    lr: float = 0.1,
    batch_size: int = 64,
    momentum: float = 0.0,
    seed: int = 0,
) -> Evaluation:
    """Non-private SGD of the same model on the whole training split (the upper reference)."""
    if steps < 1 or batch_size < 1:
        raise ConfigError("steps and batch_size must be at least 1")
    model = task.build_model(seed)
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    velocity = [torch.zeros_like(p) for p in params]
    n = task.n_train
    per_epoch = max(1, math.ceil(n / batch_size))
    model.train()
    order = torch.randperm(n, generator=gen)
    for s in range(steps):
        if s % per_epoch == 0 and s > 0:
            order = torch.randperm(n, generator=gen)
        idx = order[(s % per_epoch) * batch_size : (s % per_epoch + 1) * batch_size]
        model.zero_grad(set_to_none=True)
        torch.autograd.backward(task.loss_fn(model(task.x_train[idx]), task.y_train[idx]))
        with torch.no_grad():  # plain SGD by hand: torch.optim's first step imports seconds of code
            for p, v in zip(params, velocity, strict=True):
                if p.grad is not None:
                    p.sub_(v.mul_(momentum).add_(p.grad), alpha=lr)
    return task.evaluate(model)
