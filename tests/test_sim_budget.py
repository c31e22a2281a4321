"""The simulator's shared privacy accountant: the same epsilons as dp_accounting's, any order."""

from __future__ import annotations

import itertools

import dp_accounting
import pytest
from dp_accounting.pld import pld_privacy_accountant

from floor.errors import BudgetExhausted
from gossip.privacy import PrivacyPlan, PrivacyUnit
from simulator.budget import SharedAccountant, SimBudget

PLAN = PrivacyPlan(PrivacyUnit.RECORD, noise_multiplier=1.1, sample_rate=0.3, count=2, clip=1.0)


def _reference(plan: PrivacyPlan, contributions: int, delta: float) -> float:
    """dp_accounting's PLD accountant on the whole composition at once (the 1e-3 grid)."""
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            plan.sample_rate, dp_accounting.GaussianDpEvent(plan.noise_multiplier)
        ),
        contributions * plan.count,
    )
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
    acc.compose(event)
    return float(acc.get_epsilon(delta))


def test_incremental_composition_matches_the_accountant() -> None:
    shared = SharedAccountant(PLAN, delta=1e-5, epsilon=8.0, max_count=None)
    got = [shared.epsilon(c) for c in range(1, 9)]
    want = [_reference(PLAN, c, 1e-5) for c in range(1, 9)]
    assert got == pytest.approx(want, rel=1e-6)
    assert all(a < b for a, b in itertools.pairwise(got))
    assert shared.epsilon(0) == 0.0


def test_epsilon_does_not_depend_on_the_order_counts_are_asked_in() -> None:
    forward = SharedAccountant(PLAN, delta=1e-5, epsilon=8.0, max_count=None)
    backward = SharedAccountant(PLAN, delta=1e-5, epsilon=8.0, max_count=None)
    jumping = SharedAccountant(PLAN, delta=1e-5, epsilon=8.0, max_count=None)
    a = [forward.epsilon(c) for c in range(1, 7)]
    b = [backward.epsilon(c) for c in range(6, 0, -1)][::-1]
    c = {k: jumping.epsilon(k) for k in (4, 2, 6, 1, 5, 3)}
    assert a == b == [c[k] for k in range(1, 7)]


def test_budget_refuses_the_contribution_past_the_target() -> None:
    target = SharedAccountant(PLAN, delta=1e-5, epsilon=8.0, max_count=None).epsilon(3)
    shared = SharedAccountant(PLAN, delta=1e-5, epsilon=target, max_count=None)
    budget = SimBudget(shared)
    spent = [budget.spend() for _ in range(3)]
    assert spent[-1] == budget.spent_epsilon == target
    with pytest.raises(BudgetExhausted):
        budget.check()
    capped = SimBudget(SharedAccountant(PLAN, delta=1e-5, epsilon=0.1, max_count=2))
    capped.spend()
    capped.spend()  # a calibrated plan: exactly max_count contributions fit
    with pytest.raises(BudgetExhausted):
        capped.spend()


def test_unsubsampled_plans_use_the_exact_gaussian_composition() -> None:
    import dp

    plan = PrivacyPlan(PrivacyUnit.PEER, noise_multiplier=2.0, sample_rate=1.0, count=1, clip=1.0)
    shared = SharedAccountant(plan, delta=1e-5, epsilon=8.0, max_count=None)
    assert shared.epsilon(5) == dp.compute_epsilon(noise_multiplier=2.0, rounds=5, delta=1e-5)
