"""Distributed DP: the accounting against independent computations, conditional rounding, the
sampler's tails at the production noise, and the noise of real secure group rounds (with
dropouts) against what the members drew."""

from __future__ import annotations

import asyncio
import math
import random

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import special
from test_gossip_allreduce import STAGE, Peers, run

import dp
from dp.distributed import (
    ORDERS,
    DistributedEvent,
    calibrate_distributed,
    conditional_round,
    distributed_epsilon,
    distributed_rdp,
    noise_tau,
    noise_vector,
    rounded_sensitivity,
    wrap_probability,
)
from floor.errors import AccountingError, AggregationAborted, BudgetExhausted, ConfigError
from gossip.allreduce import AllReduceConfig, NoisedRing
from gossip.machine import AverageResult
from gossip.privacy import (
    DistributedPlan,
    NoiseMode,
    PrivacyConfig,
    PrivacyUnit,
    check_ring_fits,
    distributed_contribution,
    plan_distributed,
    ring_scale,
)
from gossip.spec import RunSpec
from simulator.config import Scenario
from simulator.engine import run_scenario

# -- accounting ------------------------------------------------------------------------------


@pytest.mark.parametrize(("z", "rounds"), [(0.8, 1), (1.5, 25), (4.0, 100)])
def test_one_share_is_the_gaussian_of_dp_accounting(z: float, rounds: int) -> None:
    """n = 1: tau = 0 and the bound is the Gaussian's RDP, as dp_accounting's own RDP
    accountant computes it for a Gaussian of the same noise multiplier."""
    sensitivity = 1000.0
    event = DistributedEvent((z * sensitivity) ** 2, 1, sensitivity, 650, rounds)
    ours = distributed_epsilon([event], delta=1e-5)
    accountant = rdp_privacy_accountant.RdpAccountant(list(ORDERS))
    accountant.compose(dp_accounting.GaussianDpEvent(z), rounds)
    assert ours == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)


def _dg_pmf(sigma2: float, half: int) -> np.ndarray:
    x = np.arange(-half, half + 1, dtype=np.float64)
    p = np.exp(-(x**2) / (2 * sigma2))
    return p / p.sum()


def _exact_rdp(total: np.ndarray, shift: int, alpha: float) -> float:
    """D_alpha(S + shift || S) for the pmf ``total`` of S, in log space."""
    p, q = total[:-shift], total[shift:]
    keep = (p > 1e-300) & (q > 1e-300)
    terms = alpha * np.log(p[keep]) + (1 - alpha) * np.log(q[keep])
    return float(special.logsumexp(terms)) / (alpha - 1)


@pytest.mark.parametrize("sigma2", [0.1, 0.25, 0.5, 1.0, 3.0])
@pytest.mark.parametrize("members", [2, 3, 5])
def test_the_bound_holds_against_the_exact_renyi_divergence_of_the_sum(
    sigma2: float, members: int
) -> None:
    """Independently: the pmf of the sum of ``members`` discrete Gaussians by convolution, the
    exact Renyi divergence between it and its shift by the sensitivity, at several orders. The
    bound (with its tau term for small noise) must never be below it."""
    half = 60
    one = _dg_pmf(sigma2, half)
    total = one
    for _ in range(members - 1):
        total = np.convolve(total, one)
    for shift in (1, 2):
        for alpha in (2.0, 4.0, 8.0, 16.0):
            exact = _exact_rdp(total, shift, alpha)
            bound = distributed_rdp(
                [alpha], sigma_squared=sigma2, members=members, sensitivity=shift, dimension=1
            )[0]
            assert exact <= bound * (1 + 1e-9) + 1e-12, (sigma2, members, shift, alpha)


def test_tau_vanishes_for_large_noise_and_counts_for_small() -> None:
    assert noise_tau(1, 0.5) == 0.0
    assert noise_tau(8, 1e6) == 0.0
    assert noise_tau(3, 0.1) > 1.0
    # and the tau term is what keeps small noise honest: without it the bound would be the
    # Gaussian's, which the exact divergence of a sum of two small discrete Gaussians exceeds
    one = _dg_pmf(0.25, 40)
    exact = _exact_rdp(np.convolve(one, one), 1, 4.0)
    gaussian = 4.0 * 1 / (2 * 2 * 0.25)
    assert exact > gaussian * 1.02


def test_calibration_is_tight_and_monotone() -> None:
    kw = {"delta": 1e-5, "rounds": 25, "sensitivity": 4096.5, "dimension": 650}
    s2 = calibrate_distributed(epsilon=8.0, members=6, **kw)  # type: ignore[arg-type]
    assert distributed_epsilon([DistributedEvent(s2, 6, 4096.5, 650, 25)], delta=1e-5) <= 8.0
    smaller = (math.sqrt(s2) / 1.01) ** 2
    assert distributed_epsilon([DistributedEvent(smaller, 6, 4096.5, 650, 25)], delta=1e-5) > 8.0
    # twice the shares: each share needs half the variance for the same guarantee
    half = calibrate_distributed(epsilon=8.0, members=12, **kw)  # type: ignore[arg-type]
    assert half == pytest.approx(s2 / 2, rel=3e-3)
    with pytest.raises(AccountingError, match="cannot be reached"):
        calibrate_distributed(epsilon=1e-9, members=1, **kw)  # type: ignore[arg-type]


def test_central_and_local_epsilon_of_one_plan() -> None:
    config = PrivacyConfig(
        unit=PrivacyUnit.PEER, epsilon=8.0, rounds=25, noise=NoiseMode.DISTRIBUTED, shares=6
    )
    plan = plan_distributed(config, 650)
    worst = distributed_epsilon([plan.event(6, 25)], delta=1e-5)
    full = distributed_epsilon([plan.central_event(8, 25)], delta=1e-5)
    local = distributed_epsilon([plan.event(1, 25)], delta=1e-5)
    assert plan.local_event == plan.event(1)
    assert worst <= 8.0 and full < worst < local
    # colluders take their shares away, never below the plan's shares (a group enforces it)
    colluding = plan_distributed(
        PrivacyConfig(
            unit="peer", epsilon=8.0, rounds=25, noise="distributed", shares=4, colluders=2
        ),
        650,
    )
    assert colluding.min_counted == 6
    assert colluding.central_event(8).members == 6 and colluding.central_event(6).members == 4


def test_rounded_sensitivity_formula() -> None:
    assert rounded_sensitivity(100.0, 400, beta=0.0) == pytest.approx(120.0)
    c, d, beta = 4096.0, 10**6, math.exp(-0.5)
    want = math.sqrt(c * c + d / 4 + math.sqrt(2 * math.log(1 / beta)) * (c + math.sqrt(d) / 2))
    assert rounded_sensitivity(c, d) == pytest.approx(want)
    assert rounded_sensitivity(c, d) < c + math.sqrt(d)


def test_a_budget_of_distributed_events_persists_and_refuses_past_the_cap(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "budget.json"
    event = DistributedEvent(2.8e7, 6, 4096.5, 650)
    budget = dp.Budget(3.0, 1e-5, path)
    spent = [budget.spend(event) for _ in range(3)]
    assert spent == sorted(spent) and spent[-1] <= 3.0
    again = dp.Budget(3.0, 1e-5, path)
    assert again.spent_epsilon == pytest.approx(spent[-1])
    assert again.events == (DistributedEvent(2.8e7, 6, 4096.5, 650, 3),)
    with pytest.raises(AccountingError, match="either Gaussian"):
        again.check(dp.PrivacyEvent(1.0))
    with pytest.raises(BudgetExhausted):
        for _ in range(100):
            again.spend(event)


# -- rounding, sampling, the ring ------------------------------------------------------------


def test_conditional_rounding_keeps_the_bound_and_is_unbiased() -> None:
    gen = torch.Generator().manual_seed(1)
    y = torch.randn(500, generator=gen, dtype=torch.float64)
    y = y / y.norm() * 64.0  # c = 64 in ring units
    bound = rounded_sensitivity(64.0, 500)
    rng = random.Random(2)
    draws = torch.stack([conditional_round(y, bound, rng=rng) for _ in range(400)])
    norms = draws.double().norm(dim=1)
    assert float(norms.max()) <= bound
    assert torch.all((draws - y.floor()).abs() <= 1)
    mean = draws.double().mean(dim=0)
    assert float((mean - y).abs().max()) < 0.2  # each coordinate: 400 Bernoulli draws
    with pytest.raises(AccountingError, match="not clipped"):
        conditional_round(y * 3, bound, rng=rng)


def test_the_sampler_tails_at_the_production_noise_match_the_exact_distribution() -> None:
    """At the size of a real noise share (about 2.8e7), from the OS's CSPRNG."""
    sigma2 = 28_443_858.0
    n = 400_000
    x = noise_vector(n, sigma2, rng=dp.system_random()).double()
    sigma = math.sqrt(sigma2)
    assert abs(float(x.mean())) < 4 * sigma / math.sqrt(n)
    assert abs(float(x.var()) / sigma2 - 1) < 4 * math.sqrt(2 / n)
    for k in (2.0, 3.0, 4.0):
        # the discrete Gaussian at this sigma is the normal to far below sampling error
        p = math.erfc(k / math.sqrt(2))
        hits = float((x.abs() > k * sigma).double().mean())
        assert abs(hits - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-6, k


def test_a_ring_the_noise_could_wrap_is_a_config_error_naming_the_fields() -> None:
    config = PrivacyConfig(unit="peer", epsilon=8.0, rounds=25, noise="distributed", shares=6)
    plan = plan_distributed(config, 650)
    p = check_ring_fits(plan, value_bound=1e6, clip=1.0, group_size=256, bits=64)
    assert p < 1e-25
    with pytest.raises(ConfigError, match=r"ring=32.*group_size=8.*value_bound=1e\+06.*clip=1"):
        check_ring_fits(plan, value_bound=1e6, clip=1.0, group_size=8, bits=32)
    assert wrap_probability(dimension=10, members=1, sigma_squared=1.0, margin=0.1) == 1.0
    # and a run refuses it before any peer starts, naming the fields
    with pytest.raises(ConfigError, match="value_bound=1e\\+15"):
        run_scenario(Scenario(peers=12, rounds=1, privacy="peer", value_bound=1e15))


def test_distributed_needs_peer_privacy_and_secure_groups() -> None:
    assert RunSpec(privacy="peer").distributed
    assert not RunSpec(privacy="peer", dp_noise="local").distributed
    assert not RunSpec(privacy="peer", algorithm="plain").distributed
    assert not RunSpec(privacy="record").distributed
    with pytest.raises(ConfigError, match="dp_noise"):
        RunSpec(privacy="record", dp_noise="distributed")
    with pytest.raises(ConfigError, match="dp_noise"):
        RunSpec(privacy="peer", algorithm="pairwise", dp_noise="distributed")
    with pytest.raises(ConfigError, match="colluders"):
        RunSpec(privacy="peer", colluders=6)  # group of 8: threshold 6
    with pytest.raises(ConfigError, match="ring"):
        RunSpec(privacy="peer", ring="32")
    spec = RunSpec(privacy="peer", colluders=2)
    assert spec.noise_shares == 4 and spec.smallest_group == 6
    with pytest.raises(ConfigError, match="peer"):
        PrivacyConfig(unit="record", noise="distributed")


# -- real secure group rounds ----------------------------------------------------------------

D = 20_000


def _members(k: int, plan: DistributedPlan) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each member's ring input, and (drawn again from the same seeded source) its noise."""
    gen = torch.Generator().manual_seed(3)
    inputs, noises = [], []
    for i in range(k):
        theta = torch.randn(D, generator=gen, dtype=torch.float64)
        delta = torch.randn(D, generator=gen, dtype=torch.float64) * 0.01
        inputs.append(distributed_contribution(theta, delta, plan, 1.0, random.Random(100 + i)))
        again = random.Random(100 + i)
        clipped = dp.clip_update([delta], 1.0)[0][0]
        conditional_round(clipped * plan.scale, plan.sensitivity, rng=again)
        noises.append(noise_vector(D, plan.sigma_squared, rng=again))
    return inputs, noises


def _round(
    k: int, shares: int, down: set[int]
) -> tuple[list[AverageResult | BaseException], list[torch.Tensor], list[torch.Tensor], Peers]:
    config = PrivacyConfig(
        unit="peer", noise_multiplier=1.0, epsilon=None, noise="distributed", shares=shares
    )
    plan = plan_distributed(config, D)
    inputs, noises = _members(k, plan)
    holder: list[Peers] = []

    async def main() -> list[AverageResult | BaseException]:
        ring = NoisedRing(ring_scale(1.0), shares)
        peers = Peers(k, seed=4, config=AllReduceConfig(stage_timeout_s=STAGE, noised=ring))
        holder.append(peers)
        for i in down:
            peers.nets[i].down = True
        group = peers.group(range(k))
        async with asyncio.timeout(12 * STAGE):
            out = await asyncio.gather(
                *(r.secure(group, x, 1.0) for r, x in zip(peers.reducers, inputs, strict=True)),
                return_exceptions=True,
            )
        await peers.aclose()
        return list(out)

    return run(main), inputs, noises, holder[0]


def test_a_group_sum_carries_exactly_the_counted_members_noise_with_a_dropout() -> None:
    k, shares = 8, 5
    results, inputs, noises, _ = _round(k, shares, down={2})
    alive = [i for i in range(k) if i != 2]
    sums = {id(r) for r in results}
    assert len(sums) == k  # each member its own result object
    plan_scale = ring_scale(1.0)
    expected = sum(inputs[i] for i in alive)
    for i in alive:
        r = results[i]
        assert isinstance(r, AverageResult) and r.total is not None, r
        assert r.group_size == len(alive)
        ring = torch.round(r.total * plan_scale).to(torch.int64)
        assert torch.equal(ring, expected)  # the exact sum of the counted members' inputs
    # the noise in the released sum is the counted members' noise, nothing less
    released = expected[:D] - sum(inputs[i][:D] - noises[i] for i in alive)
    assert torch.equal(released, sum(noises[i] for i in alive))
    s2 = plan_distributed(
        PrivacyConfig(
            unit="peer", noise_multiplier=1.0, epsilon=None, noise="distributed", shares=shares
        ),
        D,
    ).sigma_squared
    var = float(released.double().var())
    assert abs(var / (len(alive) * s2) - 1) < 5 * math.sqrt(2 / D)
    assert var >= shares * s2 * (1 - 5 * math.sqrt(2 / D))
    assert abs(float(released.double().mean())) < 5 * math.sqrt(len(alive) * s2 / D)


def test_a_group_that_would_count_too_few_noise_shares_aborts() -> None:
    """Shares 7 of 8: the threshold rises from 6 to 7, so two dropouts abort the round
    (Shamir alone would let 6 finish with too little noise); one dropout still finishes."""
    results, *_ = _round(8, 7, down={0, 5})
    for i in (1, 2, 3, 4, 6, 7):
        assert isinstance(results[i], AggregationAborted), results[i]
    results, *_ = _round(8, 7, down={5})
    assert all(isinstance(results[i], AverageResult) for i in range(8) if i != 5)


def test_a_group_smaller_than_the_noise_needs_never_starts() -> None:
    results, *_ = _round(4, 5, down=set())
    assert all(isinstance(r, AggregationAborted) and "cannot carry" in str(r) for r in results)


def test_plain_groups_and_baselines_refuse_a_noised_ring_input() -> None:
    ring_input = torch.zeros(11, dtype=torch.int64)

    async def main() -> None:
        peers = Peers(3, config=AllReduceConfig(noised=NoisedRing(4096.0, 2)))
        try:
            with pytest.raises(ConfigError, match="secure"):
                await peers.reducers[0].plain(peers.group(range(3)), ring_input, 1.0)
        finally:
            peers.close_reducers()
            await peers.aclose()

    run(main)
