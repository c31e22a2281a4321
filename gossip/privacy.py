"""The learner's privacy settings, noise calibration and the local privatization steps.

Two privacy units (DESIGN.md, round step 1), plus a no-DP mode for baselines:

- ``record`` (default): local training is DP-SGD. Each step Poisson-samples the peer's rows at
  rate ``q``, clips every example's gradient to L2 norm ``C``, sums, adds ``N(0, sigma^2 C^2)``
  and divides by the expected batch ``q n``. A round of ``E`` steps is ``E`` subsampled
  Gaussian mechanisms for the accountant.
- ``peer``: the round's update ``delta`` is clipped to ``C`` and noised, one mechanism per round
  (sample rate 1), in one of two ways (:class:`NoiseMode`):

  - ``local``: ``N(0, sigma^2 C^2)`` in floating point, as if the peer published its update
    alone (any averaging);
  - ``distributed`` (secure groups): the clipped update is scaled to the integers of the ring
    with conditional randomized rounding and gets a *share* of integer discrete Gaussian
    noise from a cryptographic source (:mod:`dp.distributed`), before masking. The group sum,
    the only thing revealed, carries the shares of all counted members: a member adds
    ``sigma_total^2 / shares`` and a group outputs a sum over at least
    ``shares + colluders`` counted members, so what any coalition of ``colluders`` does not
    know is at least the target noise. Three epsilons follow (``DistributedPlan``): the
    budgeted one (that worst case), the central one of what happened (the members actually
    counted, minus the colluders) and the local one (only the peer's own share, everyone
    else colluding).

Accounting, calibration, budgets, DP-SGD and the Gaussian mechanism are the dp package's; this
module only says which events a round spends and calibrates the noise for the planned rounds.
"""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dp.accounting import PrivacyEvent, calibrate_noise
from dp.clip import clip_update
from dp.discrete_gaussian import RandomBits
from dp.distributed import (
    DistributedEvent,
    calibrate_distributed,
    conditional_round,
    distributed_epsilon,
    noise_vector,
    rounded_sensitivity,
    wrap_probability,
)
from dp.noise import secure_generator
from dp.privatize import privatize_update
from floor.errors import AccountingError, ConfigError

__all__ = [
    "RING_CLIP",
    "DistributedPlan",
    "NoiseMode",
    "PrivacyConfig",
    "PrivacyPlan",
    "PrivacyUnit",
    "check_ring_fits",
    "distributed_contribution",
    "os_seeded_generator",
    "plan_privacy",
    "privatize_delta",
    "ring_scale",
]

RING_CLIP = 2**12
"""The clip norm C in ring units under distributed noise (about: the scale is the power of two
nearest ``RING_CLIP / C``). Large enough that rounding adds little to the sensitivity (the
``d / 4`` term is 1.5 % of ``c^2`` at d = 1e6, 0.001 % at the digits model's d = 650), small
enough that the noise shares (a few thousand ring units) keep the exact sampler in its int64
fast path."""
_WRAP_SIGMAS = 12.0  # noise margin of the ring capacity check, in standard deviations of a sum


class PrivacyUnit(enum.StrEnum):
    """Whose data one (epsilon, delta) guarantee protects."""

    RECORD = "record"
    """One data record of a peer (one customer of a bank): DP-SGD in local training."""
    PEER = "peer"
    """All of one peer's data (one person's phone): clip and noise the round's update."""
    NONE = "none"
    """No differential privacy (baselines and non-private runs)."""


class NoiseMode(enum.StrEnum):
    """Where the peer unit's noise is added."""

    LOCAL = "local"
    """Float Gaussian noise on each peer's update (any averaging)."""
    DISTRIBUTED = "distributed"
    """Integer noise shares in the ring of a secure group, summed by the group."""


@dataclass(frozen=True)
class PrivacyConfig:
    """What to protect and how much.

    Give a target ``epsilon`` (with ``rounds``, the planned number of contributions) and the
    noise multiplier is calibrated so that exactly ``rounds`` contributions fit in
    ``(epsilon, delta)``; or give ``noise_multiplier`` directly (then ``epsilon`` is only the
    budget cap, or None for no cap).
    """

    unit: PrivacyUnit = PrivacyUnit.RECORD
    epsilon: float | None = 8.0
    delta: float = 1e-5
    clip: float = 1.0
    noise_multiplier: float | None = None
    rounds: int = 30
    noise: NoiseMode = NoiseMode.LOCAL
    """``distributed``: integer noise shares in secure groups (peer unit only)."""
    shares: int = 1
    """Distributed noise: how many counted members' shares must make up the target noise
    (a group must count at least ``shares + colluders`` members)."""
    colluders: int = 0
    """Distributed noise: members of a group assumed to collude against a peer (their noise
    shares do not count for it)."""

    def __post_init__(self) -> None:
        try:
            unit = PrivacyUnit(self.unit)
        except ValueError:
            raise ConfigError(
                f"privacy unit must be one of record, peer, none; got {self.unit!r}"
            ) from None
        object.__setattr__(self, "unit", unit)
        try:
            object.__setattr__(self, "noise", NoiseMode(self.noise))
        except ValueError:
            raise ConfigError(f"noise must be local or distributed; got {self.noise!r}") from None
        if self.noise is NoiseMode.DISTRIBUTED:
            if unit is not PrivacyUnit.PEER:
                raise ConfigError(
                    f"distributed noise protects whole peers: it needs privacy unit peer, "
                    f"got {unit}"
                )
            if self.shares < 1:
                raise ConfigError(f"shares must be at least 1, got {self.shares}")
            if self.colluders < 0:
                raise ConfigError(f"colluders must be >= 0, got {self.colluders}")
        if unit is PrivacyUnit.NONE:
            return
        if self.epsilon is None and self.noise_multiplier is None:
            raise ConfigError(f"privacy unit {unit}: give epsilon or noise_multiplier")
        if self.epsilon is not None and not self.epsilon > 0:
            raise ConfigError(f"epsilon must be > 0, got {self.epsilon}")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise ConfigError(f"noise_multiplier must be > 0, got {self.noise_multiplier}")
        if not 0.0 < self.delta < 1.0:
            raise ConfigError(f"delta must be in (0, 1), got {self.delta}")
        if not self.clip > 0:
            raise ConfigError(f"clip must be > 0, got {self.clip}")
        if self.rounds < 1:
            raise ConfigError(f"rounds must be at least 1, got {self.rounds}")

    @classmethod
    def none(cls) -> PrivacyConfig:
        """No differential privacy."""
        return cls(unit=PrivacyUnit.NONE)


def ring_scale(clip: float) -> float:
    """The fixed-point scale of distributed noise: the power of two nearest ``RING_CLIP / clip``
    (public: every member of a group derives the same from the shared clip)."""
    if not (math.isfinite(clip) and clip > 0):
        raise ConfigError(f"clip must be > 0, got {clip!r}")
    return 2.0 ** round(math.log2(RING_CLIP / clip))


@dataclass(frozen=True)
class DistributedPlan:
    """One peer's distributed noise: the ring scale, its noise share and the accounting."""

    scale: float
    """Ring units per model unit (the shared ``ring_scale(clip)``)."""
    sigma_squared: float
    """This member's noise share: the variance parameter of its N_Z, in ring units."""
    shares: int
    colluders: int
    sensitivity: float
    """L2 sensitivity of the rounded update in ring units (conditional rounding's bound)."""
    dimension: int

    @property
    def min_counted(self) -> int:
        """Fewest counted members a group may output a sum for."""
        return self.shares + self.colluders

    @property
    def noise_multiplier(self) -> float:
        """The target (budgeted) noise of a group sum over the sensitivity."""
        return math.sqrt(self.shares * self.sigma_squared) / self.sensitivity

    def event(self, members: int, count: int = 1) -> DistributedEvent:
        """The mechanism of a group sum whose unknown noise is ``members`` shares."""
        return DistributedEvent(
            self.sigma_squared, members, self.sensitivity, self.dimension, count
        )

    def unknown_shares(self, counted: int) -> int:
        """The shares an observer does not know in a sum of ``counted`` members, given the
        assumed colluders (never fewer than the plan's, which a group enforces)."""
        return max(self.shares, counted - self.colluders)

    def central_event(self, counted: int, count: int = 1) -> DistributedEvent:
        """The round's mechanism for an observer of the sum of ``counted`` members."""
        return self.event(self.unknown_shares(counted), count)

    def central_epsilon(self, shares: Sequence[int], delta: float) -> float:
        """Epsilon of contributions whose sums carried ``shares[i]`` unknown shares."""
        counts: dict[int, int] = {}
        for m in shares:
            counts[m] = counts.get(m, 0) + 1
        return distributed_epsilon([self.event(m, n) for m, n in counts.items()], delta=delta)

    def local_epsilon(self, contributions: int, delta: float) -> float:
        """Epsilon of ``contributions`` protected by this peer's own share only."""
        if contributions == 0:
            return 0.0
        return distributed_epsilon([self.event(1, contributions)], delta=delta)

    @property
    def worst_event(self) -> DistributedEvent:
        """What the budget spends per contribution: the fewest shares a sum can carry."""
        return self.event(self.shares)

    @property
    def local_event(self) -> DistributedEvent:
        """The guarantee against everyone else in the group: only this peer's own share."""
        return self.event(1)


@dataclass(frozen=True)
class PrivacyPlan:
    """What one contribution spends: ``count`` mechanisms with ``noise_multiplier`` at
    ``sample_rate``. ``noise_multiplier`` is 0 for the no-DP mode. With ``distributed``, the
    event is the distributed discrete Gaussian's worst case."""

    unit: PrivacyUnit
    noise_multiplier: float
    sample_rate: float
    count: int
    clip: float
    distributed: DistributedPlan | None = None

    @property
    def event(self) -> PrivacyEvent | DistributedEvent | None:
        """The privacy event of one contribution (None without DP)."""
        if self.unit is PrivacyUnit.NONE:
            return None
        if self.distributed is not None:
            return self.distributed.worst_event
        return PrivacyEvent(self.noise_multiplier, self.sample_rate, self.count)


@functools.lru_cache(maxsize=256)
def _calibrated(epsilon: float, delta: float, steps: int, sample_rate: float) -> float:
    # Cached: peers with the same settings share one calibration (it can take seconds).
    return float(
        calibrate_noise(epsilon=epsilon, delta=delta, rounds=steps, sample_rate=sample_rate)
    )


@functools.lru_cache(maxsize=256)
def _calibrated_distributed(
    epsilon: float, delta: float, rounds: int, shares: int, sensitivity: float, dimension: int
) -> float:
    return calibrate_distributed(
        epsilon=epsilon,
        delta=delta,
        rounds=rounds,
        members=shares,
        sensitivity=sensitivity,
        dimension=dimension,
    )


def plan_distributed(config: PrivacyConfig, dimension: int) -> DistributedPlan:
    """The distributed noise of a model of ``dimension`` parameters: the share of each member
    is calibrated so that ``rounds`` sums carrying ``shares`` shares spend ``epsilon`` (or,
    with a fixed ``noise_multiplier`` z, so that such a sum's noise is z times the
    sensitivity)."""
    scale = ring_scale(config.clip)
    if scale < 1:
        raise ConfigError(f"distributed noise needs clip <= {RING_CLIP}, got clip={config.clip:g}")
    sensitivity = rounded_sensitivity(config.clip * scale, dimension)
    z = config.noise_multiplier
    try:
        if z is not None:
            s2 = (z * sensitivity) ** 2 / config.shares
        else:
            if config.epsilon is None:
                raise ConfigError("distributed noise: give epsilon or noise_multiplier")
            s2 = _calibrated_distributed(
                config.epsilon, config.delta, config.rounds, config.shares, sensitivity, dimension
            )
    except AccountingError as exc:
        raise ConfigError(f"distributed noise: {exc}") from exc
    s2 = float(math.ceil(s2))  # an integer variance: the exact sampler's arithmetic stays small
    if s2 > 2.0**60:
        raise ConfigError(
            f"distributed noise: a share of variance {s2:.3g} (ring units) is past the exact "
            "sampler's range 2^60; raise epsilon or lower the noise_multiplier"
        )
    return DistributedPlan(scale, s2, config.shares, config.colluders, sensitivity, dimension)


def check_ring_fits(
    plan: DistributedPlan,
    *,
    value_bound: float,
    clip: float,
    group_size: int,
    bits: int,
    guard_bits: int = 0,
) -> float:
    """Refuse (``ConfigError`` naming the fields) a ring that a group sum could wrap; return
    the stated wrap probability of one sum.

    A member's coordinate is ``round(scale x) + rounded update + noise`` with ``|x| <=
    value_bound`` and the update at most ``clip + 1/scale`` per coordinate; the sum of
    ``group_size`` noise shares exceeds 12 of its standard deviations with probability below
    ``wrap_probability`` (sub-Gaussian tails), which the returned value states. With
    ``guard_bits`` the sum must fit ``2^guard_bits`` times over (the headroom that lets a
    group catch a corrupted result: ``gossip.allreduce.check_total``).
    """
    k = group_size
    margin = _WRAP_SIGMAS * math.sqrt(k * plan.sigma_squared)
    worst = k * (math.ceil(plan.scale * (value_bound + clip)) + 2) + margin
    capacity = (2 ** (bits - 1) - 1) >> guard_bits
    if worst > capacity:
        raise ConfigError(
            f"distributed noise does not fit ring={bits}: group_size={k} members with "
            f"value_bound={value_bound:g}, clip={clip:g} (scale 2^{round(math.log2(plan.scale))})"
            f" and noise of {math.sqrt(plan.sigma_squared):.4g} per share can sum to "
            f"{worst:.4g}, past {capacity}; use ring=64, a smaller value_bound or group_size"
        )
    return wrap_probability(
        dimension=plan.dimension, members=k, sigma_squared=plan.sigma_squared, margin=margin
    )


def plan_privacy(
    config: PrivacyConfig, *, local_steps: int, sample_rate: float, dimension: int | None = None
) -> PrivacyPlan:
    """The per-contribution privacy events, calibrating the noise multiplier if needed.

    For ``record``, one contribution is ``local_steps`` steps at ``sample_rate`` and the
    calibration covers ``rounds * local_steps`` of them; for ``peer``, one Gaussian mechanism
    at rate 1 per round, or with distributed noise one distributed discrete Gaussian (which
    needs the model's ``dimension``).
    """
    if config.unit is PrivacyUnit.NONE:
        return PrivacyPlan(config.unit, 0.0, 1.0, 0, 0.0)
    if config.noise is NoiseMode.DISTRIBUTED:
        if dimension is None:
            raise ConfigError("distributed noise is planned for a model: give its dimension")
        dist = plan_distributed(config, dimension)
        return PrivacyPlan(config.unit, dist.noise_multiplier, 1.0, 1, config.clip, dist)
    if config.unit is PrivacyUnit.RECORD:
        q, count = sample_rate, local_steps
    else:
        q, count = 1.0, 1
    z = config.noise_multiplier
    if z is None:
        if config.epsilon is None:
            raise ConfigError(f"privacy unit {config.unit}: give epsilon or noise_multiplier")
        z = _calibrated(config.epsilon, config.delta, config.rounds * count, q)
    return PrivacyPlan(config.unit, z, q, count, config.clip)


def os_seeded_generator() -> torch.Generator:
    """A torch generator seeded from the OS's cryptographic source (production default)."""
    return secure_generator()


def distributed_contribution(
    theta: Tensor, delta: Tensor, plan: DistributedPlan, clip: float, rng: RandomBits
) -> Tensor:
    """The ring input of a peer under distributed noise: ``[round(s theta) + rround(s
    clip(delta)) + N_Z(0, sigma^2), s]`` (int64, one slot more than the model: the weight 1).

    ``theta`` (public: a released group result) is rounded to nearest; the clipped update by
    conditional randomized rounding to the plan's sensitivity; the noise share comes from
    ``rng`` (``dp.system_random()`` in production, a seeded ``random.Random`` in simulation).
    """
    scale = plan.scale
    d = plan.dimension
    if theta.numel() != d or delta.numel() != d:
        raise ConfigError(f"the plan is for {d} parameters, got {theta.numel()}")
    clipped = clip_update([delta.detach().to(torch.float64)], clip)[0][0].reshape(-1)
    rounded = conditional_round(clipped * scale, plan.sensitivity, rng=rng)
    out = torch.empty(d + 1, dtype=torch.int64)
    torch.round(theta.detach().to(torch.float64) * scale, out=clipped)
    out[:d] = clipped.to(torch.int64)
    out[:d] += rounded
    out[:d] += noise_vector(d, plan.sigma_squared, rng=rng)
    out[d] = int(scale)
    return out


def privatize_delta(delta: Tensor, plan: PrivacyPlan, generator: torch.Generator) -> Tensor:
    """Peer unit: ``clip(delta, C) + N(0, sigma^2 C^2)``. Other units: ``delta`` unchanged
    (record-level DP-SGD already noised the training)."""
    if plan.unit is not PrivacyUnit.PEER:
        return delta
    released = privatize_update(
        [delta], clip_norm=plan.clip, noise_multiplier=plan.noise_multiplier, generator=generator
    )
    return released.update[0]
