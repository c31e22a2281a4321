"""dp noise: the Gaussian mechanism's generator discipline and statistics, and the exact
discrete Gaussian sampler against its exact pmf."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import numpy as np
import pytest
import torch
from scipy import stats

import dp
from dp import discrete_gaussian as dg
from floor.errors import AccountingError

N = 100_000


def test_gaussian_noise_statistics() -> None:
    std = 2.5
    x = dp.gaussian_noise((N,), std, generator=dp.seeded_generator(1234), dtype=torch.float64)
    values = x.numpy()
    assert abs(values.mean()) < 4 * std / math.sqrt(N)
    assert abs(values.var() / std**2 - 1) < 4 * math.sqrt(2 / N)
    assert stats.kstest(values, stats.norm(scale=std).cdf).pvalue > 1e-3


def test_gaussian_noise_is_reproducible_only_with_the_same_seed() -> None:
    a = dp.gaussian_noise((64,), 1.0, generator=dp.seeded_generator(7))
    b = dp.gaussian_noise((64,), 1.0, generator=dp.seeded_generator(7))
    c = dp.gaussian_noise((64,), 1.0, generator=dp.seeded_generator(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    s1 = dp.gaussian_noise((64,), 1.0, generator=dp.secure_generator())
    s2 = dp.gaussian_noise((64,), 1.0, generator=dp.secure_generator())
    assert not torch.equal(s1, s2)


def test_noise_does_not_touch_the_global_generator() -> None:
    torch.manual_seed(99)
    expected = torch.rand(4)
    torch.manual_seed(99)
    dp.gaussian_noise((1000,), 1.0, generator=dp.secure_generator())
    dp.add_gaussian_noise([torch.zeros(10)], 1.0, generator=dp.seeded_generator(1))
    assert torch.equal(torch.rand(4), expected)


def test_add_gaussian_noise_containers() -> None:
    update = {"w": torch.ones(3, 2), "b": torch.zeros(2)}
    noisy = dp.add_gaussian_noise(update, 0.5, generator=dp.seeded_generator(3))
    assert set(noisy) == {"w", "b"} and noisy["w"].shape == (3, 2)
    assert torch.equal(update["w"], torch.ones(3, 2))  # input untouched
    assert not torch.equal(noisy["w"], update["w"])
    listed = dp.add_gaussian_noise(list(update.values()), 0.5, generator=dp.seeded_generator(3))
    assert torch.equal(listed[0], noisy["w"]) and torch.equal(listed[1], noisy["b"])
    zero = dp.add_gaussian_noise([torch.ones(3)], 0.0, generator=dp.seeded_generator(3))
    assert torch.equal(zero[0], torch.ones(3))


def test_generator_is_required_and_checked() -> None:
    with pytest.raises(AccountingError, match="generator"):
        dp.gaussian_noise((3,), 1.0, generator=None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        dp.gaussian_noise((3,), 1.0)  # type: ignore[call-arg]
    with pytest.raises(AccountingError, match="std"):
        dp.gaussian_noise((3,), -1.0, generator=dp.seeded_generator(0))
    with pytest.raises(AccountingError, match="floating-point"):
        dp.add_gaussian_noise(
            [torch.ones(3, dtype=torch.int64)], 1.0, generator=dp.seeded_generator(0)
        )


def exact_pmf(sigma2: float) -> tuple[np.ndarray, np.ndarray]:
    """Support and probabilities of N_Z(0, sigma2), truncated far in the tails."""
    half = int(40 * math.sqrt(sigma2)) + 10
    support = np.arange(-half, half + 1)
    weights = np.exp(-(support.astype(np.float64) ** 2) / (2 * sigma2))
    return support, weights / weights.sum()


def chi_square_pvalue(samples: np.ndarray, support: np.ndarray, pmf: np.ndarray) -> float:
    """Chi-square over bins of consecutive integers holding >= ~1% of the mass each."""
    n = samples.size
    cdf = np.cumsum(pmf)
    cuts = np.unique(np.searchsorted(cdf, np.linspace(0.01, 0.99, 99)))
    edges = np.concatenate(([0], cuts + 1, [support.size]))
    edges = np.unique(edges)
    expected = np.add.reduceat(pmf, edges[:-1]) * n
    index = np.clip(samples - support[0], 0, support.size - 1)
    observed = np.bincount(np.searchsorted(edges, index, side="right") - 1, minlength=expected.size)
    return float(stats.chisquare(observed[: expected.size], expected).pvalue)


@pytest.mark.parametrize(
    ("sigma2", "seed"),
    [(0.3, 1), (1, 2), (3.7, 3), (Fraction(50, 3), 4), (12345.678, 5), (10**8, 6)],
)
def test_discrete_gaussian_matches_exact_pmf(sigma2: float | Fraction, seed: int) -> None:
    samples = dp.sample_discrete_gaussian(sigma2, N, rng=random.Random(seed))
    assert samples.dtype == np.int64 and samples.shape == (N,)
    support, pmf = exact_pmf(float(sigma2))
    variance = float((pmf * support.astype(np.float64) ** 2).sum())
    fourth = float((pmf * support.astype(np.float64) ** 4).sum())
    assert abs(samples.mean()) < 4 * math.sqrt(variance / N)
    second = float((samples.astype(np.float64) ** 2).mean())
    assert abs(second - variance) < 4 * math.sqrt((fourth - variance**2) / N)
    assert chi_square_pvalue(samples, support, pmf) > 1e-3


def test_discrete_gaussian_large_denominators_use_exact_big_integers() -> None:
    sigma2 = Fraction(10**12 + 1, 10**6 + 3)  # 2 a b t^2 ~ 2e24: beyond int64
    n = 20_000
    samples = dp.sample_discrete_gaussian(sigma2, n, rng=random.Random(11))
    support, pmf = exact_pmf(float(sigma2))
    assert abs(samples.var() / float(sigma2) - 1) < 4 * math.sqrt(2 / n)
    assert chi_square_pvalue(samples, support, pmf) > 1e-3


@pytest.mark.parametrize("gamma", [Fraction(0), Fraction(1, 3), Fraction(1), Fraction(7, 2)])
def test_bernoulli_exp_frequency(gamma: Fraction) -> None:
    n = 50_000
    num = np.full(n, gamma.numerator, dtype=np.int64)
    den = np.full(n, gamma.denominator, dtype=np.int64)
    hits = dg._bernoulli_exp(num, den, random.Random(5)).sum()
    p = math.exp(-gamma)
    assert abs(hits / n - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-12


def test_discrete_gaussian_is_reproducible_and_shaped() -> None:
    a = dp.sample_discrete_gaussian(4, 1000, rng=random.Random(9))
    b = dp.sample_discrete_gaussian(4, 1000, rng=random.Random(9))
    assert np.array_equal(a, b)
    t = dp.discrete_gaussian_tensor((3, 5), 4, rng=dp.system_random())
    assert t.dtype == torch.int64 and t.shape == (3, 5)
    assert dp.sample_discrete_gaussian(4, 0, rng=random.Random(0)).size == 0


@pytest.mark.parametrize("sigma2", [0, -1.0, math.inf, math.nan, 2**61, True, "4"])
def test_discrete_gaussian_rejects_bad_sigma(sigma2: object) -> None:
    with pytest.raises(AccountingError, match="sigma_squared"):
        dp.sample_discrete_gaussian(sigma2, 10, rng=random.Random(0))  # type: ignore[arg-type]


def test_discrete_gaussian_rejects_bad_source_and_size() -> None:
    with pytest.raises(AccountingError, match="getrandbits"):
        dp.sample_discrete_gaussian(1, 10, rng=object())  # type: ignore[arg-type]
    with pytest.raises(AccountingError, match="size"):
        dp.sample_discrete_gaussian(1, -1, rng=random.Random(0))


@pytest.mark.parametrize(("num", "den"), [(1, 3), (2, 7), (5, 5), (0, 9), (10**15 + 7, 3 * 10**15)])
def test_bernoulli_exact_path_matches_its_probability(
    num: int, den: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a huge margin every comparison takes the exact integer path: same law."""
    monkeypatch.setattr(dg, "_MARGIN", 2.0)
    n = 40_000
    hits = dg._bernoulli(
        np.full(n, num, dtype=np.int64), np.full(n, den, dtype=np.int64), random.Random(3)
    ).sum()
    p = num / den
    assert abs(hits / n - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-12
