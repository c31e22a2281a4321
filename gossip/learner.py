"""A peer's learner: train locally from the public model, privatize, contribute, take the result.

The learner holds ``theta``, the public reference model (the last group result it received, or
the common initial model). Each round:

1. :meth:`Learner.local_update` checks the privacy budget **before** doing anything, trains
   ``E`` local steps from ``theta`` on the peer's own rows, computes ``delta = theta' - theta``,
   privatizes it (DP-SGD for ``record``, clip and noise for ``peer``), spends the round's
   privacy events and returns the :class:`Contribution` ``theta + private delta`` with a weight;
2. the group averages contributions (secure all-reduce, or :mod:`gossip.ideal` for reference);
3. :meth:`Learner.apply_result` sets ``theta`` to the group result. If the round aborted,
   nothing is applied and ``theta`` stays as it was.

Only released values (contributions and group results) ever feed ``theta``, so the accounting
covers everything the peer's data influences. A contribution is accounted when it is made,
even if its group later aborts (the masked vector did leave the peer). Training is synchronous
CPU work: a daemon awaits :meth:`Learner.local_update_async`, which runs it in an executor so
that it does not stall the event loop; the simulator calls :meth:`Learner.local_update`.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dp.accounting import PrivacyEvent, compute_epsilon
from dp.budget import Budget
from dp.discrete_gaussian import RandomBits, system_random
from dp.distributed import DistributedEvent, distributed_epsilon
from dp.dpsgd import dp_sgd_train
from floor.errors import BudgetExhausted, CheckpointError, ConfigError, TrainingError
from gossip.model import Layout, flatten, restore
from gossip.privacy import (
    PrivacyConfig,
    PrivacyPlan,
    PrivacyUnit,
    distributed_contribution,
    os_seeded_generator,
    plan_privacy,
    privatize_delta,
)

__all__ = ["BudgetLike", "Contribution", "Learner", "TrainConfig"]


@dataclass(frozen=True)
class TrainConfig:
    """Local training: ``local_steps`` (E) SGD steps per round.

    ``sample_rate`` (q) is the fraction of the peer's rows per step: the Poisson rate for
    ``record`` DP-SGD, a fixed batch of ``ceil(q n)`` rows otherwise. ``weighting`` is the
    contribution's weight: the number of local rows (``samples``) or 1 (``uniform``);
    ``auto`` (the default) means ``samples`` without DP and ``uniform`` with it. With DP on,
    the row count must not be a weight: the group result reveals the total weight exactly
    (and the plaintext all-reduce each weight), and adding or removing one record changes it,
    a release no accountant covers. ``samples`` with DP is refused by the learner.
    """

    local_steps: int = 5
    lr: float = 0.1
    sample_rate: float = 0.2
    momentum: float = 0.0
    weighting: Literal["auto", "samples", "uniform"] = "auto"

    def __post_init__(self) -> None:
        if self.local_steps < 1:
            raise ConfigError(f"local_steps must be at least 1, got {self.local_steps}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0.0 < self.sample_rate <= 1.0:
            raise ConfigError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weighting not in ("auto", "samples", "uniform"):
            raise ConfigError(
                f"weighting must be 'auto', 'samples' or 'uniform', got {self.weighting!r}"
            )

    def by_samples(self, private: bool) -> bool:
        """Whether contributions are weighted by row count (``private``: DP is on)."""
        return self.weighting == "samples" or (self.weighting == "auto" and not private)


@dataclass(frozen=True)
class Contribution:
    """What a peer puts into the group average: ``vector = theta + private delta``, ``weight``.

    ``round`` counts this peer's contributions from 1; ``epsilon_spent`` includes this one.
    Under distributed noise ``vector`` is the peer's ring input (int64, the model's
    parameters and a weight slot, already noised; see ``gossip.privacy``), which only a
    secure group takes.
    """

    vector: Tensor
    weight: float
    round: int
    epsilon_spent: float


class BudgetLike(Protocol):
    """The part of ``dp.Budget`` the learner uses (a test or simulator may pass its own)."""

    @property
    def spent_epsilon(self) -> float:
        """Epsilon spent so far at the budget's delta."""
        ...

    def check(self, next_events: PrivacyEvent | DistributedEvent) -> float:
        """Epsilon after these events; raises BudgetExhausted if it would exceed the cap."""
        ...

    def spend(self, events: PrivacyEvent | DistributedEvent) -> float:
        """Record the events and return the epsilon spent; raises BudgetExhausted first."""
        ...


@dataclass
class _Counters:
    rounds: int = 0
    results: int = 0
    budget_spent: bool = False


class Learner:
    """One peer's learner over its own rows ``(x, y)`` and its own instance of the model.

    ``generator`` drives sampling and DP noise: pass a seeded one in simulations and tests; the
    default is OS-seeded. ``budget`` defaults to a ``dp.Budget`` capped at the configured
    ``(epsilon, delta)`` (no cap if only a noise multiplier was given); pass one with a state
    file to keep the spend across restarts.
    ``theta`` defaults to the model's current parameters (peers must start from the same one).
    ``noise_rng`` is the source of distributed noise and rounding (default: the OS's CSPRNG;
    a seeded ``random.Random`` in simulation).
    """

    def __init__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        *,
        train: TrainConfig | None = None,
        privacy: PrivacyConfig | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
        generator: torch.Generator | None = None,
        budget: BudgetLike | None = None,
        theta: Tensor | None = None,
        include_buffers: bool = False,
        noise_rng: RandomBits | None = None,
    ) -> None:
        self.train_config = train or TrainConfig()
        self.privacy = privacy or PrivacyConfig()
        if x.shape[0] != y.shape[0] or x.shape[0] == 0:
            raise ConfigError(
                f"need a non-empty (x, y) with equal rows, got {x.shape[0]}, {y.shape[0]}"
            )
        if self.privacy.unit is PrivacyUnit.RECORD and self.train_config.momentum:
            raise ConfigError("record-level DP-SGD takes plain SGD steps: set momentum to 0")
        if self.train_config.weighting == "samples" and self.privacy.unit is not PrivacyUnit.NONE:
            raise ConfigError(
                "weighting='samples' with differential privacy would release this peer's exact "
                "row count (the group's total weight), which no accountant covers; use "
                "weighting='uniform' (or 'auto', the default)"
            )
        if include_buffers and self.privacy.unit is not PrivacyUnit.NONE:
            raise ConfigError(
                "include_buffers shares data statistics (e.g. batch-norm running stats) "
                "without noise; it is only allowed with privacy unit 'none'"
            )
        self.model = model
        self.x, self.y = x, y
        self.loss_fn = loss_fn
        self.layout = Layout.of(model, include_buffers=include_buffers)
        self.generator = generator if generator is not None else os_seeded_generator()
        self.noise_rng = noise_rng if noise_rng is not None else system_random()
        self.plan: PrivacyPlan = plan_privacy(
            self.privacy,
            local_steps=self.train_config.local_steps,
            sample_rate=self.train_config.sample_rate,
            dimension=self.layout.size,
        )
        self._shares: list[int] = []  # distributed noise: unknown shares per contribution
        unit = self.privacy.unit
        if budget is None and self.privacy.epsilon is not None and unit is not PrivacyUnit.NONE:
            budget = Budget(self.privacy.epsilon, self.privacy.delta)
        self.budget = budget
        self._theta = flatten(model, self.layout) if theta is None else self._checked(theta).clone()
        self._c = _Counters()
        self._catch_up(self._budget_times())  # a persistent budget that paid before a restart

    # -- public state -------------------------------------------------------------------------

    @property
    def theta(self) -> Tensor:
        """A copy of the public reference model as a flat vector."""
        return self._theta.clone()

    @property
    def theta_view(self) -> Tensor:
        """The public reference model itself, without a copy (for metrics over many peers).
        Do not modify it: :meth:`apply_result` replaces it rather than writing into it."""
        return self._theta

    @property
    def num_samples(self) -> int:
        """Number of local rows."""
        return int(self.x.shape[0])

    @property
    def weight(self) -> float:
        """This peer's weight in a group average."""
        private = self.privacy.unit is not PrivacyUnit.NONE
        return float(self.num_samples) if self.train_config.by_samples(private) else 1.0

    @property
    def epsilon_spent(self) -> float:
        """Epsilon spent at ``privacy.delta``: 0 without DP; from the accountant when a fixed
        noise multiplier was given without a cap (inf if it cannot say)."""
        if self.budget is not None:
            return float(self.budget.spent_epsilon)
        if self.privacy.unit is PrivacyUnit.NONE or self._c.rounds == 0:
            return 0.0
        dist = self.plan.distributed
        if dist is not None:
            return distributed_epsilon(
                [dist.event(dist.shares, self._c.rounds)], delta=self.privacy.delta
            )
        try:
            return float(
                compute_epsilon(
                    noise_multiplier=self.plan.noise_multiplier,
                    rounds=self._c.rounds * self.plan.count,
                    delta=self.privacy.delta,
                    sample_rate=self.plan.sample_rate,
                )
            )
        except (ArithmeticError, ValueError):
            return math.inf

    @property
    def budget_spent(self) -> bool:
        """True once a contribution was refused because it would exceed the budget."""
        return self._c.budget_spent

    @property
    def rounds_contributed(self) -> int:
        """Number of contributions released so far."""
        return self._c.rounds

    def status(self) -> dict[str, Any]:
        """A summary for the peer's own status page and reports (``local_samples`` is this
        peer's private count: show it locally, do not send it to others)."""
        return {
            "privacy_unit": str(self.privacy.unit),
            "rounds_contributed": self._c.rounds,
            "results_applied": self._c.results,
            "epsilon_spent": self.epsilon_spent,
            "delta": self.privacy.delta if self.privacy.unit is not PrivacyUnit.NONE else None,
            "budget_spent": self._c.budget_spent,
            "noise_multiplier": self.plan.noise_multiplier,
            "sample_rate": self.plan.sample_rate,
            "local_samples": self.num_samples,
            "noise": "distributed" if self.plan.distributed is not None else "local",
            "epsilon_central": self.epsilon_central,
            "epsilon_local": self.epsilon_local,
        }

    @property
    def epsilon_central(self) -> float:
        """Epsilon for an observer of the released values, for what happened: under
        distributed noise, each round's sum with the members it counted (minus the assumed
        colluders; the worst case for a round whose result this peer never saw). Otherwise
        the same as :attr:`epsilon_spent`."""
        dist = self.plan.distributed
        if dist is None:
            return self.epsilon_spent
        return dist.central_epsilon(self._shares, self.privacy.delta)

    @property
    def epsilon_local(self) -> float:
        """Epsilon if everyone else in every group colludes: under distributed noise only this
        peer's own noise share protects it. Otherwise the same as :attr:`epsilon_spent`."""
        dist = self.plan.distributed
        if dist is None:
            return self.epsilon_spent
        return dist.local_epsilon(len(self._shares), self.privacy.delta)

    def current_model(self) -> nn.Module:
        """The local model instance with ``theta`` loaded (for evaluation)."""
        restore(self.model, self._theta, self.layout)
        return self.model

    # -- a round ------------------------------------------------------------------------------

    def local_update(self) -> Contribution:
        """Train, privatize and return this round's contribution.

        Raises :class:`~floor.errors.BudgetExhausted` (and sets :attr:`budget_spent`) if the
        contribution would exceed the privacy budget; the check happens before any training.
        """
        self.check_budget()
        return self.release(self._train())

    def check_budget(self) -> None:
        """Raise :class:`~floor.errors.BudgetExhausted` (and set :attr:`budget_spent`) if the
        next contribution would exceed the budget. First half of :meth:`local_update`, public
        so that a trainer of many peers at once (:mod:`gossip.batched`) can split it."""
        event = self.plan.event
        if self.budget is not None and event is not None:
            try:
                self.budget.check(event)
            except BudgetExhausted:
                self._c.budget_spent = True
                raise

    def release(self, theta_prime: Tensor) -> Contribution:
        """Second half of :meth:`local_update`: privatize ``theta_prime - theta`` (peer unit),
        spend the round's privacy events and return the contribution. ``theta_prime`` must
        come from this round's training of this learner (DP-SGD for the record unit)."""
        theta_prime = self._checked(theta_prime)
        event = self.plan.event
        dist = self.plan.distributed
        if dist is not None:
            vector = distributed_contribution(
                self._theta, theta_prime - self._theta, dist, self.plan.clip, self.noise_rng
            )
        else:
            vector = self._theta + privatize_delta(
                theta_prime - self._theta, self.plan, self.generator
            )
        if self.budget is not None and event is not None:
            self.budget.spend(event)
        self._c.rounds += 1
        if dist is not None:
            self._shares.append(dist.shares)
        return Contribution(vector, self.weight, self._c.rounds, self.epsilon_spent)

    async def local_update_async(self, executor: Executor | None = None) -> Contribution:
        """:meth:`local_update` in an executor (the loop's default one if None), so that a
        daemon's event loop keeps answering the network while the peer trains."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(executor, self.local_update)

    def apply_result(self, new_theta: Tensor, counted: int | None = None) -> None:
        """Set ``theta`` to the group result (a released value); ``counted``, the members the
        group counted, refines the central epsilon of the last contribution."""
        self._theta = self._checked(new_theta).clone()
        self._c.results += 1
        dist = self.plan.distributed
        if dist is not None and counted is not None and self._shares:
            self._shares[-1] = dist.unknown_shares(counted)

    # -- durable state ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of this learner (``gossip.checkpoint``): ``theta``, the
        counters, the noise shares per contribution, the sampling generator's state, and how
        many contributions the budget had paid for (``budget_times``)."""
        return {
            "parameters": self.layout.size,
            "theta": self._theta.clone(),
            "rounds": self._c.rounds,
            "results": self._c.results,
            "shares": list(self._shares),
            "generator": self.generator.get_state(),
            "budget_times": self._budget_times(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> int:
        """Resume from :meth:`state_dict`, reconciled with the budget: contributions the
        budget paid for after that state was written count as made (worst-case noise shares).
        Returns how many those were. ``CheckpointError`` if the state does not fit this learner
        or claims more contributions than the budget paid for (an older budget file)."""
        try:
            parameters = int(state["parameters"])
            theta = state["theta"]
            rounds, results = int(state["rounds"]), int(state["results"])
            shares = [int(v) for v in state["shares"]]
            generator = state["generator"]
            paid_then = int(state["budget_times"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"the learner state lacks or mistypes {exc}") from None
        if parameters != self.layout.size or not isinstance(theta, Tensor):
            raise CheckpointError(
                f"the checkpoint holds a model of {parameters} parameters, this peer's has "
                f"{self.layout.size}: it was written for another model"
            )
        if (
            min(rounds, results, paid_then) < 0
            or paid_then > rounds
            or (shares and len(shares) != rounds)
        ):
            raise CheckpointError("the learner state's counters contradict each other")
        paid_now = self._budget_times()
        if self.budget is not None and paid_now < paid_then:
            raise CheckpointError(
                f"the privacy budget paid for {paid_now} contributions, the checkpoint says "
                f"{paid_then}: the budget file is older than the checkpoint; refusing to resume"
            )
        try:
            self._theta = self._checked(theta).clone()
        except TrainingError as exc:
            raise CheckpointError(f"the checkpoint's model is unusable: {exc}") from None
        if isinstance(generator, Tensor):
            self.generator.set_state(generator)
        self._c = _Counters(rounds=rounds, results=results)
        self._shares = shares
        extra = max(0, paid_now - paid_then) if self.budget is not None else 0
        self._catch_up(rounds + extra)
        return extra

    def _budget_times(self) -> int:
        """Contributions the budget paid for (0 for a budget that does not count them)."""
        spends = getattr(self.budget, "spends", None)
        return spends if isinstance(spends, int) else 0

    def _catch_up(self, contributions: int) -> None:
        """Count ``contributions`` made in all (never fewer than counted): the ones this
        learner did not see were paid for before a crash; their noise shares are unknown."""
        missing = contributions - self._c.rounds
        if missing <= 0:
            return
        self._c.rounds = contributions
        dist = self.plan.distributed
        if dist is not None:
            self._shares.extend([dist.shares] * missing)

    # -- internals ----------------------------------------------------------------------------

    def _checked(self, vector: Tensor) -> Tensor:
        if vector.dim() != 1 or vector.numel() != self.layout.size:
            raise TrainingError(
                f"a model vector must have {self.layout.size} values, got shape "
                f"{list(vector.shape)}: it was made for another model"
            )
        if not torch.isfinite(vector).all():
            raise TrainingError("refusing a model vector with NaN or infinite values")
        return vector.detach().to(self.layout.dtype)

    def _train(self) -> Tensor:
        cfg = self.train_config
        model = self.model
        restore(model, self._theta, self.layout)
        model.train()
        if self.plan.unit is PrivacyUnit.RECORD:
            dp_sgd_train(
                model,
                self.x,
                self.y,
                loss_fn=self.loss_fn,
                lr=cfg.lr,
                steps=cfg.local_steps,
                sample_rate=self.plan.sample_rate,
                clip_norm=self.plan.clip,
                noise_multiplier=self.plan.noise_multiplier,
                generator=self.generator,
            )
        else:
            self._sgd(model)
        theta_prime = flatten(model, self.layout)
        if not torch.isfinite(theta_prime).all():
            raise TrainingError(
                "local training diverged (NaN or infinite parameters); lower the learning rate"
            )
        return theta_prime

    def _sgd(self, model: nn.Module) -> None:
        cfg = self.train_config
        params = dict(model.named_parameters())
        velocity = {k: torch.zeros_like(p) for k, p in params.items()}
        n = self.num_samples
        batch = max(1, math.ceil(cfg.sample_rate * n))
        for _ in range(cfg.local_steps):
            idx = torch.randperm(n, generator=self.generator)[:batch]
            model.zero_grad(set_to_none=True)
            torch.autograd.backward(self.loss_fn(model(self.x[idx]), self.y[idx]))
            with torch.no_grad():
                for k, p in params.items():
                    if p.grad is None:
                        continue
                    v = velocity[k].mul_(cfg.momentum).add_(p.grad)
                    p.sub_(v, alpha=cfg.lr)
        model.zero_grad(set_to_none=True)
