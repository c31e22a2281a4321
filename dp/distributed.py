"""Distributed discrete Gaussian: integer noise shares whose sum, inside secure aggregation,
is the noise of the released group sum (Kairouz, Liu, Steinke 2021, "DDG").

Each of the members of a group clips its update to L2 norm ``C``, scales it by ``scale`` to
integers with *conditional* randomized rounding (the rounded vector is redrawn until its norm
is at most the bound below, so the integer query has an exact L2 sensitivity), and adds
``N_Z(0, sigma^2)`` to every coordinate, drawn by the exact sampler of
:mod:`dp.discrete_gaussian`. Only the sum of the members' vectors is revealed; what protects
one peer is the noise of the members who do not collude against it.

Accounting (a proven upper bound; ``dp-accounting`` has no such mechanism):

- sensitivity after rounding (KLS21 Theorem 1 with Proposition 22), in ring units with
  ``c = C * scale`` and dimension ``d``:
  ``Delta^2 = min((c + sqrt d)^2, c^2 + d/4 + sqrt(2 ln(1/beta)) (c + sqrt(d)/2))``;
- the sum of ``n`` independent ``N_Z(0, sigma^2)`` noise vectors on a query of sensitivity
  ``Delta`` satisfies, at every Renyi order ``alpha >= 1`` (KLS21 Theorem 1 / Proposition 14),
  ``RDP(alpha) <= min(alpha Delta^2 / (2 n sigma^2) + tau d,
  alpha / 2 (Delta / sqrt(n sigma^2) + tau sqrt d)^2)`` with
  ``tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k / (k + 1))``; for ``n = 1`` (``tau = 0``)
  this is the discrete Gaussian's own bound (Canonne, Kamath, Steinke 2020), the same as the
  continuous Gaussian's;
- RDP adds over rounds; the composed curve is turned into (epsilon, delta) with
  ``dp_accounting``'s conversion (Canonne-Kamath-Steinke, Proposition 12).

The rule that keeps a group's noise at the target whatever happens: a member adds
``sigma_total^2 / shares`` and a group only outputs a sum over at least
``shares + colluders`` counted members, so the members outside any coalition of ``colluders``
contribute at least ``sigma_total^2`` (:func:`shares_noise`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from dp_accounting.rdp import rdp_privacy_accountant
from torch import Tensor

from dp._checks import check_delta, check_int, check_positive
from dp.discrete_gaussian import RandomBits, discrete_gaussian_tensor, random_words
from floor.errors import AccountingError

__all__ = [
    "DEFAULT_BETA",
    "ORDERS",
    "DistributedEvent",
    "calibrate_distributed",
    "conditional_round",
    "distributed_epsilon",
    "distributed_rdp",
    "noise_tau",
    "noise_vector",
    "rounded_sensitivity",
    "shares_noise",
    "uniform_floats",
    "wrap_probability",
]

ORDERS: tuple[float, ...] = tuple(float(a) for a in rdp_privacy_accountant.DEFAULT_RDP_ORDERS)
"""Renyi orders of the accounting (``dp_accounting``'s default set)."""
DEFAULT_BETA = math.exp(-0.5)
"""Conditional rounding's failure probability per draw (the papers' choice): a draw is
rejected with probability at most beta, so the expected number of draws is below 2.6."""
_MAX_ROUNDING_DRAWS = 10_000
_SIGMA_MIN, _SIGMA_MAX = 1e-3, 2.0**30  # per-member standard deviation searched, ring units


@dataclass(frozen=True, slots=True)
class DistributedEvent:
    """``count`` releases of an integer query of L2 ``sensitivity`` in ``dimension``
    coordinates plus the sum of ``members`` independent ``N_Z(0, sigma_squared)`` vectors.

    ``members`` counts only the noise that the observer does not know: for a group sum,
    the counted members outside the assumed coalition; for the local guarantee, 1.
    """

    sigma_squared: float
    members: int
    sensitivity: float
    dimension: int
    count: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "sigma_squared", check_positive("sigma_squared", self.sigma_squared)
        )
        object.__setattr__(self, "members", check_int("members", self.members))
        object.__setattr__(self, "sensitivity", check_positive("sensitivity", self.sensitivity))
        object.__setattr__(self, "dimension", check_int("dimension", self.dimension))
        object.__setattr__(self, "count", check_int("count", self.count))

    def key(self) -> tuple[float, int, float, int]:
        """The event without its count (events with one key compose by adding counts)."""
        return (self.sigma_squared, self.members, self.sensitivity, self.dimension)

    def rdp(self, orders: Sequence[float] = ORDERS) -> npt.NDArray[np.float64]:
        """This event's RDP at each order (all ``count`` releases)."""
        return self.count * distributed_rdp(
            orders,
            sigma_squared=self.sigma_squared,
            members=self.members,
            sensitivity=self.sensitivity,
            dimension=self.dimension,
        )


def noise_tau(members: int, sigma_squared: float) -> float:
    """KLS21's ``tau``: how far the sum of ``members`` discrete Gaussians of variance
    parameter ``sigma_squared`` is from one discrete Gaussian (0 for one member)."""
    n = check_int("members", members)
    s2 = check_positive("sigma_squared", sigma_squared)
    if n == 1:
        return 0.0
    k = np.arange(1, n, dtype=np.float64)
    return float(10.0 * np.exp(-2.0 * math.pi**2 * s2 * k / (k + 1.0)).sum())


def distributed_rdp(
    orders: Sequence[float],
    *,
    sigma_squared: float,
    members: int,
    sensitivity: float,
    dimension: int,
) -> npt.NDArray[np.float64]:
    """One release's RDP bound at each order (see the module docstring)."""
    a = np.asarray(orders, dtype=np.float64)
    if a.size == 0 or not np.all(a >= 1.0):
        raise AccountingError("Renyi orders must be >= 1")
    s2 = check_positive("sigma_squared", sigma_squared)
    n = check_int("members", members)
    delta2 = check_positive("sensitivity", sensitivity)
    d = check_int("dimension", dimension)
    tau = noise_tau(n, s2)
    scale = delta2 / math.sqrt(n * s2)  # sensitivity over the noise's standard deviation
    first = a * scale**2 / 2.0 + tau * d
    second = a / 2.0 * (scale + math.sqrt(d) * tau) ** 2
    return np.minimum(first, second)


def _events(events: Iterable[DistributedEvent]) -> list[DistributedEvent]:
    out = list(events)
    for e in out:
        if not isinstance(e, DistributedEvent):
            raise AccountingError(f"expected DistributedEvent, got {type(e).__name__}")
    return out


def distributed_epsilon(events: Iterable[DistributedEvent], *, delta: float) -> float:
    """Epsilon at ``delta`` of the composition of ``events`` (0.0 for none)."""
    delta = check_delta(delta)
    todo = _events(events)
    if not todo:
        return 0.0
    rdp = np.zeros(len(ORDERS), dtype=np.float64)
    for e in todo:
        rdp += e.rdp(ORDERS)
    eps, _ = rdp_privacy_accountant.compute_epsilon(ORDERS, rdp.tolist(), delta)
    return max(0.0, float(eps))


def rounded_sensitivity(clip: float, dimension: int, *, beta: float = DEFAULT_BETA) -> float:
    """L2 norm bound of a conditionally rounded vector whose norm was at most ``clip`` (ring
    units) before rounding; ``beta = 0`` is plain randomized rounding (``clip + sqrt d``)."""
    c = check_positive("clip", clip)
    d = check_int("dimension", dimension)
    if not 0.0 <= beta < 1.0:
        raise AccountingError(f"beta must be in [0, 1), got {beta}")
    plain = (c + math.sqrt(d)) ** 2
    if beta == 0.0:
        return math.sqrt(plain)
    conditional = c * c + d / 4.0 + math.sqrt(2.0 * math.log(1.0 / beta)) * (c + math.sqrt(d) / 2)
    return math.sqrt(min(plain, conditional))


def calibrate_distributed(
    *,
    epsilon: float,
    delta: float,
    rounds: int,
    members: int,
    sensitivity: float,
    dimension: int,
) -> float:
    """The per-member ``sigma_squared`` (ring units) with which ``rounds`` releases, each
    noised by ``members`` shares, spend at most ``epsilon`` at ``delta`` (0.1 % above the
    least such value). ``AccountingError`` if no noise in range reaches the target."""
    target = check_positive("epsilon", epsilon)
    delta = check_delta(delta)
    rounds = check_int("rounds", rounds)
    members = check_int("members", members)

    def eps(sigma: float) -> float:
        event = DistributedEvent(sigma * sigma, members, sensitivity, dimension, rounds)
        return distributed_epsilon([event], delta=delta)

    lo, hi = _SIGMA_MIN, _SIGMA_MAX
    if eps(hi) > target:
        raise AccountingError(
            f"epsilon {target:g} at delta {delta:g} over {rounds} rounds cannot be reached with "
            f"noise below 2^30 per member (sensitivity {sensitivity:.6g}, dimension {dimension})"
        )
    if eps(lo) <= target:
        return lo * lo
    while hi / lo > 1.001:
        mid = math.sqrt(lo * hi)
        if eps(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi * hi


def shares_noise(sigma_squared_total: float, shares: int) -> float:
    """Each member's share of a group's target noise: ``sigma_total^2 / shares``, so that any
    ``shares`` honest counted members carry the whole target."""
    return check_positive("sigma_squared_total", sigma_squared_total) / check_int("shares", shares)


def wrap_probability(*, dimension: int, members: int, sigma_squared: float, margin: float) -> float:
    """An upper bound on the probability that some coordinate of the sum of ``members``
    ``N_Z(0, sigma_squared)`` noise vectors exceeds ``margin`` in magnitude.

    A discrete Gaussian is sub-Gaussian with its parameter (CKS20, Proposition 25), and sums of
    independent ones are sub-Gaussian with the summed parameter: per coordinate
    ``P[|S| > m] <= 2 exp(-m^2 / (2 n sigma^2))``, and a union bound over the coordinates.
    """
    d = check_int("dimension", dimension)
    n = check_int("members", members)
    s2 = check_positive("sigma_squared", sigma_squared)
    m = check_positive("margin", margin)
    return min(1.0, 2.0 * d * math.exp(-(m * m) / (2.0 * n * s2)))


def uniform_floats(rng: RandomBits, n: int) -> Tensor:
    """``n`` uniform float64 values in [0, 1) with 53 random bits each, from ``rng``."""
    words = random_words(rng, n) >> np.uint64(11)
    return torch.from_numpy(words.astype(np.float64) * 2.0**-53)


def conditional_round(y: Tensor, bound: float, *, rng: RandomBits) -> Tensor:
    """Randomized rounding of ``y`` (float64) to int64, redrawn until the rounded vector's L2
    norm is at most ``bound``: each coordinate is ``floor(y) + 1`` with probability
    ``y - floor(y)``. ``AccountingError`` if ``y`` itself is too long to round under ``bound``.
    """
    if y.dtype != torch.float64 or y.dim() != 1:
        raise AccountingError(f"conditional_round expects a 1-D float64 tensor, got {y.dtype}")
    bound_sq = check_positive("bound", bound) ** 2
    low = torch.floor(y)
    frac = y - low
    for _ in range(_MAX_ROUNDING_DRAWS):
        r = low + (uniform_floats(rng, y.numel()) < frac).to(torch.float64)
        if float(torch.dot(r, r)) <= bound_sq:
            return r.to(torch.int64)
    raise AccountingError(
        f"no rounding of a vector of norm {float(y.norm()):.6g} fits the bound {bound:.6g} "
        f"in {_MAX_ROUNDING_DRAWS} draws: it was not clipped to the norm the bound assumes"
    )


def noise_vector(size: int, sigma_squared: float, *, rng: RandomBits) -> Tensor:
    """``size`` exact ``N_Z(0, sigma_squared)`` samples as an int64 tensor."""
    return discrete_gaussian_tensor((size,), sigma_squared, rng=rng)
