"""dp accounting: epsilon against dp_accounting's PLD and the exact Gaussian formula,
calibration, heterogeneous composition, argument validation."""

from __future__ import annotations

import math

import dp_accounting
import pytest
from dp_accounting.pld import pld_privacy_accountant
from scipy import optimize, stats

import dp
from floor.errors import AccountingError, PrivacyError


def pld_epsilon(events: list[tuple[float, float, int]], delta: float) -> float:
    """dp_accounting's PLD accountant, used directly (no shortcut)."""
    parts = []
    for z, q, n in events:
        event: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(z)
        if q < 1.0:
            event = dp_accounting.PoissonSampledDpEvent(q, event)
        parts.append(dp_accounting.SelfComposedDpEvent(event, n))
    accountant = pld_privacy_accountant.PLDAccountant()
    accountant.compose(dp_accounting.ComposedDpEvent(parts))
    return float(accountant.get_epsilon(delta))


def balle_wang_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon of a Gaussian mechanism with sensitivity/std = mu (Balle & Wang 2018):
    delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2), solved for eps."""

    def excess(eps: float) -> float:
        first = stats.norm.cdf(-eps / mu + mu / 2)
        second = math.exp(eps + stats.norm.logcdf(-eps / mu - mu / 2))
        return float(first - second - delta)

    hi = 1.0
    while excess(hi) > 0:
        hi *= 2
    return float(optimize.brentq(excess, 0.0, hi, xtol=1e-13, rtol=1e-13))


PLD_CASES = [
    # (noise_multiplier, rounds, sample_rate, delta)
    (1.0, 1, 1.0, 1e-5),
    (2.0, 10, 1.0, 1e-5),
    (5.0, 100, 1.0, 1e-6),
    (3.0, 20, 1.0, 1e-5),
    (1.0, 100, 0.01, 1e-5),
    (1.1, 1000, 0.01, 1e-5),
    (4.0, 100, 0.1, 1e-5),
    (0.8, 20, 0.05, 1e-6),
    (2.0, 1, 0.5, 1e-5),
]


@pytest.mark.parametrize(("z", "rounds", "q", "delta"), PLD_CASES)
def test_epsilon_matches_pld(z: float, rounds: int, q: float, delta: float) -> None:
    ours = dp.compute_epsilon(noise_multiplier=z, rounds=rounds, delta=delta, sample_rate=q)
    reference = pld_epsilon([(z, q, rounds)], delta)
    assert ours == pytest.approx(reference, rel=1e-3)


@pytest.mark.parametrize(
    ("z", "rounds", "delta"),
    [(1.0, 1, 1e-5), (2.0, 10, 1e-5), (5.0, 100, 1e-6), (1.0, 100, 1e-5), (0.5, 1000, 1e-8)],
)
def test_full_participation_matches_exact_gaussian(z: float, rounds: int, delta: float) -> None:
    # T Gaussian releases with multiplier z are one Gaussian with mu = sqrt(T) / z.
    expected = balle_wang_epsilon(math.sqrt(rounds) / z, delta)
    ours = dp.compute_epsilon(noise_multiplier=z, rounds=rounds, delta=delta)
    assert ours == pytest.approx(expected, rel=1e-3)
    assert ours >= expected * (1 - 1e-9)  # never optimistic


def test_heterogeneous_full_participation_is_one_gaussian() -> None:
    events = [(1.0, 1.0, 50), dp.PrivacyEvent(2.0, 1.0, 100), (4.0, 1.0, 3)]
    mu = math.sqrt(50 / 1.0 + 100 / 4.0 + 3 / 16.0)
    assert dp.compose_epsilon(events, delta=1e-5) == pytest.approx(
        balle_wang_epsilon(mu, 1e-5), rel=1e-6
    )


def test_heterogeneous_mixed_events_match_pld() -> None:
    events = [(1.0, 0.02, 200), (3.0, 1.0, 5), (2.0, 0.1, 30)]
    assert dp.compose_epsilon(events, delta=1e-5) == pytest.approx(
        pld_epsilon(events, 1e-5), rel=1e-3
    )


def test_grouping_is_order_and_split_invariant() -> None:
    split = [(1.5, 0.05, 40), (1.0, 1.0, 2), (1.5, 0.05, 60), (1.0, 1.0, 3)]
    assert dp.group_events(split) == ((1.0, 1.0, 5), (1.5, 0.05, 100))
    assert dp.compose_epsilon(split, delta=1e-5) == dp.compose_epsilon(
        list(reversed(split)), delta=1e-5
    )


def test_local_dpsgd_steps_over_rounds() -> None:
    # E local steps per round at rate q, over T rounds, is E*T subsampled releases.
    per_round = dp.PrivacyEvent(1.2, 0.05, 4)
    by_round = dp.compose_epsilon([per_round] * 25, delta=1e-5)
    total = dp.compute_epsilon(noise_multiplier=1.2, rounds=100, delta=1e-5, sample_rate=0.05)
    assert by_round == pytest.approx(total, rel=1e-9)


def test_no_events_is_zero_and_more_rounds_cost_more() -> None:
    assert dp.compose_epsilon([], delta=1e-5) == 0.0
    eps = [dp.compute_epsilon(noise_multiplier=1.0, rounds=t, delta=1e-5) for t in (1, 2, 8)]
    assert eps[0] < eps[1] < eps[2]


@pytest.mark.parametrize(
    ("epsilon", "delta", "rounds", "q"),
    [(8.0, 1e-5, 30, 1.0), (1.0, 1e-5, 1, 1.0), (2.0, 1e-6, 1000, 0.05), (0.5, 1e-5, 100, 0.01)],
)
def test_calibration_is_smallest_sufficient_noise(
    epsilon: float, delta: float, rounds: int, q: float
) -> None:
    z = dp.calibrate_noise(epsilon=epsilon, delta=delta, rounds=rounds, sample_rate=q)
    assert dp.compute_epsilon(noise_multiplier=z, rounds=rounds, delta=delta, sample_rate=q) <= (
        epsilon
    )
    assert (
        dp.compute_epsilon(noise_multiplier=0.99 * z, rounds=rounds, delta=delta, sample_rate=q)
        > epsilon
    )


def test_calibration_unreachable_target() -> None:
    with pytest.raises(AccountingError, match="noise multiplier above"):
        dp.calibrate_noise(epsilon=1e-9, delta=1e-12, rounds=10_000)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"noise_multiplier": 0.0, "rounds": 1, "delta": 1e-5},
        {"noise_multiplier": -1.0, "rounds": 1, "delta": 1e-5},
        {"noise_multiplier": math.nan, "rounds": 1, "delta": 1e-5},
        {"noise_multiplier": math.inf, "rounds": 1, "delta": 1e-5},
        {"noise_multiplier": 1.0, "rounds": 0, "delta": 1e-5},
        {"noise_multiplier": 1.0, "rounds": -3, "delta": 1e-5},
        {"noise_multiplier": 1.0, "rounds": 2.0, "delta": 1e-5},
        {"noise_multiplier": 1.0, "rounds": True, "delta": 1e-5},
        {"noise_multiplier": 1.0, "rounds": 1, "delta": 0.0},
        {"noise_multiplier": 1.0, "rounds": 1, "delta": 1.0},
        {"noise_multiplier": 1.0, "rounds": 1, "delta": -1e-5},
        {"noise_multiplier": 1.0, "rounds": 1, "delta": 1e-5, "sample_rate": 0.0},
        {"noise_multiplier": 1.0, "rounds": 1, "delta": 1e-5, "sample_rate": 1.5},
        {"noise_multiplier": "1", "rounds": 1, "delta": 1e-5},
    ],
)
def test_compute_epsilon_rejects_bad_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(AccountingError) as info:
        dp.compute_epsilon(**kwargs)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError) and isinstance(info.value, PrivacyError)
    assert str(info.value)  # a message that names the problem


@pytest.mark.parametrize(
    "kwargs",
    [
        {"epsilon": 0.0, "delta": 1e-5, "rounds": 1},
        {"epsilon": -1.0, "delta": 1e-5, "rounds": 1},
        {"epsilon": 1.0, "delta": 2.0, "rounds": 1},
        {"epsilon": 1.0, "delta": 1e-5, "rounds": 0},
        {"epsilon": 1.0, "delta": 1e-5, "rounds": 1, "sample_rate": -0.1},
    ],
)
def test_calibrate_rejects_bad_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(AccountingError):
        dp.calibrate_noise(**kwargs)  # type: ignore[arg-type]


def test_event_validation() -> None:
    with pytest.raises(AccountingError, match="count"):
        dp.PrivacyEvent(1.0, 1.0, 0)
    with pytest.raises(AccountingError, match="event must be"):
        dp.compose_epsilon([(1.0, 1.0)], delta=1e-5)  # type: ignore[list-item]
    with pytest.raises(AccountingError, match="not a single event"):
        dp.compose_epsilon(dp.PrivacyEvent(1.0), delta=1e-5)  # type: ignore[arg-type]
