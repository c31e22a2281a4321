"""Differential privacy: clipping, noise, accounting, per-peer budgets. Pure computation."""

from dp.accounting import (
    EventLike,
    PrivacyEvent,
    calibrate_noise,
    compose_epsilon,
    compute_epsilon,
    group_events,
)
from dp.budget import Budget
from dp.clip import AdaptiveClipper, clip_update, split_noise_multiplier, update_norm
from dp.discrete_gaussian import (
    RandomBits,
    discrete_gaussian_tensor,
    sample_discrete_gaussian,
    system_random,
)
from dp.distributed import (
    DistributedEvent,
    calibrate_distributed,
    conditional_round,
    distributed_epsilon,
    rounded_sensitivity,
)
from dp.dpsgd import DPSGDResult, dp_sgd_train
from dp.noise import add_gaussian_noise, gaussian_noise, secure_generator, seeded_generator
from dp.privatize import PrivatizedUpdate, privatize_update

__all__ = [
    "AdaptiveClipper",
    "Budget",
    "DPSGDResult",
    "DistributedEvent",
    "EventLike",
    "PrivacyEvent",
    "PrivatizedUpdate",
    "RandomBits",
    "add_gaussian_noise",
    "calibrate_distributed",
    "calibrate_noise",
    "clip_update",
    "compose_epsilon",
    "compute_epsilon",
    "conditional_round",
    "discrete_gaussian_tensor",
    "distributed_epsilon",
    "dp_sgd_train",
    "gaussian_noise",
    "group_events",
    "privatize_update",
    "rounded_sensitivity",
    "sample_discrete_gaussian",
    "secure_generator",
    "seeded_generator",
    "split_noise_multiplier",
    "system_random",
    "update_norm",
]
