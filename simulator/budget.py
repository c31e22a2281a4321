"""A privacy budget shared by simulated peers with one privacy plan: one accounting per count.

Every simulated peer spends the same events per contribution, so the epsilon after ``c``
contributions is one number for all of them: it is computed once per ``c`` and cached here
instead of once per peer. Poisson-subsampled plans (record-level DP-SGD) use ``dp_accounting``'s
privacy loss distributions (PLD, pessimistic) with a discretization of 1e-3 (10x coarser than
``dp``'s default, pessimistic by well under 1%, ~10x faster), the count-``c`` PLD being the
count-``c - 1`` one composed with one contribution's; unsubsampled plans use
``dp.compute_epsilon`` (exact).

The cap: when the noise multiplier was calibrated for ``rounds`` contributions (the scenario
did not fix one), exactly ``rounds`` contributions fit, as ``dp.calibrate_noise`` guarantees
with the fine accountant; with a fixed noise multiplier, a contribution is refused when the
epsilon after it would exceed the target.
"""

from __future__ import annotations

from dp_accounting.pld import privacy_loss_distribution as pld_lib
from dp_accounting.pld.privacy_loss_distribution import PrivacyLossDistribution

import dp
from floor.errors import BudgetExhausted
from gossip.privacy import PrivacyPlan

__all__ = ["SharedAccountant", "SimBudget"]

_INTERVAL = 1e-3


class SharedAccountant:
    """Epsilon after ``count`` contributions of ``plan`` at ``delta``, cached per count."""

    def __init__(
        self, plan: PrivacyPlan, *, delta: float, epsilon: float, max_count: int | None
    ) -> None:
        self.plan, self.delta, self.target, self.max_count = plan, delta, epsilon, max_count
        self._cache: dict[int, float] = {0: 0.0}
        self._one: PrivacyLossDistribution | None = None  # one contribution's PLD
        self._chain: tuple[int, PrivacyLossDistribution] | None = None  # (count, its PLD)

    def epsilon(self, count: int) -> float:
        """Epsilon after ``count`` contributions."""
        eps = self._cache.get(count)
        if eps is None:
            p = self.plan
            if p.distributed is not None:
                dist = p.distributed
                eps = dp.distributed_epsilon([dist.event(dist.shares, count)], delta=self.delta)
            elif p.sample_rate >= 1.0:
                eps = dp.compute_epsilon(
                    noise_multiplier=p.noise_multiplier, rounds=count * p.count, delta=self.delta
                )
            else:
                eps = max(0.0, float(self._pld(count).get_epsilon_for_delta(self.delta)))
            self._cache[count] = eps
        return eps

    def _pld(self, count: int) -> PrivacyLossDistribution:
        """The PLD of ``count`` contributions: one contribution's PLD composed ``count`` times,
        one at a time, so the next round's count costs one convolution (a fresh
        self-composition per count took ~60 ms per round at 100 rounds).

        Always the same sequence of compositions for a given count (restarted from one
        contribution when an earlier count is asked for), so the value does not depend on
        which counts were asked for before.
        """
        one = self._one
        if one is None:
            p = self.plan
            one = self._one = pld_lib.from_gaussian_mechanism(
                standard_deviation=p.noise_multiplier,
                value_discretization_interval=_INTERVAL,
                sampling_prob=p.sample_rate,
            ).self_compose(p.count)
        chain = self._chain
        if chain is None or chain[0] > count:
            chain = (1, one)
        done, pld = chain
        while done < count:
            pld = pld.compose(one)
            done += 1
        self._chain = (done, pld)
        return pld

    def allows(self, count: int) -> bool:
        """Whether ``count`` contributions fit in the budget."""
        if self.max_count is not None:
            return count <= self.max_count
        return self.epsilon(count) <= self.target


class SimBudget:
    """One peer's budget (``gossip.learner.BudgetLike``) over a ``SharedAccountant``.

    The events passed to ``check`` and ``spend`` are always the plan's one contribution.
    """

    def __init__(self, accountant: SharedAccountant) -> None:
        self._acc = accountant
        self.count = 0

    @property
    def spent_epsilon(self) -> float:
        """Epsilon spent so far."""
        return self._acc.epsilon(self.count)

    def check(self, next_events: object = None) -> float:
        """Epsilon after one more contribution; ``BudgetExhausted`` if it does not fit."""
        if not self._acc.allows(self.count + 1):
            raise BudgetExhausted(
                f"contribution {self.count + 1} would exceed epsilon {self._acc.target}"
            )
        return self._acc.epsilon(self.count + 1)

    def spend(self, events: object = None) -> float:
        """Record one contribution and return the epsilon spent."""
        self.check(events)
        self.count += 1
        return self._acc.epsilon(self.count)
