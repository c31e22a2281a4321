"""The learner's privacy settings, noise calibration and the local privatization steps.

Two privacy units (DESIGN.md, round step 1), plus a no-DP mode for baselines:

- ``record`` (default): local training is DP-SGD. Each step Poisson-samples the peer's rows at
  rate ``q``, clips every example's gradient to L2 norm ``C``, sums, adds ``N(0, sigma^2 C^2)``
  and divides by the expected batch ``q n``. A round of ``E`` steps is ``E`` subsampled
  Gaussian mechanisms for the accountant.
- ``peer``: the round's update ``delta`` is clipped to ``C`` and ``N(0, sigma^2 C^2)`` is added:
  one Gaussian mechanism per round (sample rate 1).

Accounting, calibration, budgets, DP-SGD and the Gaussian mechanism are the dp package's; this
module only says which events a round spends and calibrates the noise for the planned rounds.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from dp.accounting import PrivacyEvent, calibrate_noise
from dp.noise import secure_generator
from dp.privatize import privatize_update
from floor.errors import ConfigError

__all__ = [
    "PrivacyConfig",
    "PrivacyPlan",
    "PrivacyUnit",
    "os_seeded_generator",
    "plan_privacy",
    "privatize_delta",
]


class PrivacyUnit(enum.StrEnum):
    """Whose data one (epsilon, delta) guarantee protects."""

    RECORD = "record"
    """One data record of a peer (one customer of a bank): DP-SGD in local training."""
    PEER = "peer"
    """All of one peer's data (one person's phone): clip and noise the round's update."""
    NONE = "none"
    """No differential privacy (baselines and non-private runs)."""


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

    def __post_init__(self) -> None:
        try:
            unit = PrivacyUnit(self.unit)
        except ValueError:
            raise ConfigError(
                f"privacy unit must be one of record, peer, none; got {self.unit!r}"
            ) from None
        object.__setattr__(self, "unit", unit)
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


@dataclass(frozen=True)
class PrivacyPlan:
    """What one contribution spends: ``count`` mechanisms with ``noise_multiplier`` at
    ``sample_rate``. ``noise_multiplier`` is 0 for the no-DP mode."""

    unit: PrivacyUnit
    noise_multiplier: float
    sample_rate: float
    count: int
    clip: float

    @property
    def event(self) -> PrivacyEvent | None:
        """The privacy event of one contribution (None without DP)."""
        if self.unit is PrivacyUnit.NONE:
            return None
        return PrivacyEvent(self.noise_multiplier, self.sample_rate, self.count)


@functools.lru_cache(maxsize=256)
def _calibrated(epsilon: float, delta: float, steps: int, sample_rate: float) -> float:
    # Cached: peers with the same settings share one calibration (it can take seconds).
    return float(
        calibrate_noise(epsilon=epsilon, delta=delta, rounds=steps, sample_rate=sample_rate)
    )


def plan_privacy(config: PrivacyConfig, *, local_steps: int, sample_rate: float) -> PrivacyPlan:
    """The per-contribution privacy events, calibrating the noise multiplier if needed.

    For ``record``, one contribution is ``local_steps`` steps at ``sample_rate`` and the
    calibration covers ``rounds * local_steps`` of them; for ``peer``, one Gaussian mechanism
    at rate 1 per round.
    """
    if config.unit is PrivacyUnit.NONE:
        return PrivacyPlan(config.unit, 0.0, 1.0, 0, 0.0)
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


def privatize_delta(delta: Tensor, plan: PrivacyPlan, generator: torch.Generator) -> Tensor:
    """Peer unit: ``clip(delta, C) + N(0, sigma^2 C^2)``. Other units: ``delta`` unchanged
    (record-level DP-SGD already noised the training)."""
    if plan.unit is not PrivacyUnit.PEER:
        return delta
    released = privatize_update(
        [delta], clip_norm=plan.clip, noise_multiplier=plan.noise_multiplier, generator=generator
    )
    return released.update[0]
