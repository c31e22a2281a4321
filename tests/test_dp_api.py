"""The dp package's public surface: everything in __all__ exists, and nothing else leaks."""

from __future__ import annotations

import dp

EXPECTED = {
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
}


def test_public_api() -> None:
    assert set(dp.__all__) == EXPECTED
    for name in dp.__all__:
        assert getattr(dp, name) is not None
    public = {n for n in dir(dp) if not n.startswith("_")}
    submodules = {
        "accounting",
        "budget",
        "clip",
        "discrete_gaussian",
        "distributed",
        "dpsgd",
        "noise",
        "privatize",
    }
    assert public - submodules == EXPECTED
