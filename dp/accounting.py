"""Privacy accounting: compose (Poisson-subsampled) Gaussian mechanisms into (eps, delta).

Backed by Google's ``dp-accounting`` privacy loss distributions (PLD), built exactly as its
``PLDAccountant`` builds them, with the add-or-remove-one neighbouring relation and the default
1e-4 discretization (pessimistic: never under-reports). What keeps it fast and tight:

- Gaussian mechanisms without subsampling compose exactly into one Gaussian mechanism whose
  noise multiplier is ``(sum_i count_i / z_i**2) ** -0.5``; when every event is of that kind the
  epsilon comes from the exact hockey-stick divergence of that one Gaussian (Balle & Wang
  2018), as computed by ``dp_accounting``'s ``GaussianPrivacyLoss``, solved for epsilon;
- identical events are grouped and composed once with their count (``self_compose``), the
  single-release PLD of each (noise, rate) is built once and cached, and results are cached on
  the grouped event multiset, so peers with the same history share the work.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import dp_accounting
from dp_accounting.pld import privacy_loss_distribution, privacy_loss_mechanism
from dp_accounting.pld.privacy_loss_distribution import PrivacyLossDistribution
from scipy import optimize

from dp._checks import check_delta, check_int, check_positive, check_probability
from floor.errors import AccountingError

__all__ = [
    "EventLike",
    "PrivacyEvent",
    "calibrate_noise",
    "compose_epsilon",
    "compute_epsilon",
    "group_events",
]

# Calibration searches noise multipliers in this range; outside it the PLD becomes either
# meaninglessly private or huge (slow) and the target is almost surely a mistake.
_Z_MIN = 1e-3
_Z_MAX = 1e6
# Calibration stops when the bracket [lo, hi] satisfies hi / lo <= 1 + _CAL_RTOL.
_CAL_RTOL = 1e-3
# PLD discretization of the privacy loss: dp_accounting's default (fine), and a 10x coarser one
# used only to locate the answer during calibration.
_FINE_INTERVAL = 1e-4
_COARSE_INTERVAL = 1e-3


@dataclass(frozen=True, slots=True)
class PrivacyEvent:
    """``count`` releases of a Gaussian mechanism with noise multiplier ``noise_multiplier``.

    Each release is Poisson-subsampled at ``sample_rate`` (1.0: no subsampling). The noise
    multiplier is the noise standard deviation divided by the L2 sensitivity (the clip norm).
    """

    noise_multiplier: float
    sample_rate: float = 1.0
    count: int = 1

    def __post_init__(self) -> None:
        z = check_positive("noise_multiplier", self.noise_multiplier)
        q = check_probability("sample_rate", self.sample_rate)
        n = check_int("count", self.count)
        object.__setattr__(self, "noise_multiplier", z)
        object.__setattr__(self, "sample_rate", q)
        object.__setattr__(self, "count", n)


EventLike = PrivacyEvent | tuple[float, float, int]
"""A ``PrivacyEvent`` or a ``(noise_multiplier, sample_rate, count)`` tuple."""

GroupedEvents = tuple[tuple[float, float, int], ...]


def _as_event(event: object) -> PrivacyEvent:
    if isinstance(event, PrivacyEvent):
        return event
    if isinstance(event, tuple) and len(event) == 3:
        return PrivacyEvent(event[0], event[1], event[2])
    raise AccountingError(
        "an event must be a PrivacyEvent or a (noise_multiplier, sample_rate, count) tuple, "
        f"got {event!r}"
    )


def group_events(events: Iterable[EventLike]) -> GroupedEvents:
    """Merge events with the same (noise_multiplier, sample_rate) into one, summing counts.

    Returns a sorted tuple of ``(noise_multiplier, sample_rate, count)``: a canonical, hashable
    form of the event multiset (composition does not depend on order).
    """
    if isinstance(events, PrivacyEvent):
        raise AccountingError("events must be an iterable of events, not a single event")
    counts: dict[tuple[float, float], int] = {}
    for raw in events:
        event = _as_event(raw)
        key = (event.noise_multiplier, event.sample_rate)
        counts[key] = counts.get(key, 0) + event.count
    return tuple(sorted((z, q, n) for (z, q), n in counts.items()))


def compose_epsilon(events: Iterable[EventLike], *, delta: float) -> float:
    """Epsilon at ``delta`` of the composition of ``events`` (0.0 for no events)."""
    delta = check_delta(delta)
    return _grouped_epsilon(group_events(events), delta)


def compute_epsilon(
    *, noise_multiplier: float, rounds: int, delta: float, sample_rate: float = 1.0
) -> float:
    """Epsilon after ``rounds`` Gaussian releases with ``noise_multiplier``, each Poisson-
    subsampled at ``sample_rate``, at the given ``delta``."""
    event = PrivacyEvent(noise_multiplier, sample_rate, check_int("rounds", rounds))
    return compose_epsilon([event], delta=delta)


def calibrate_noise(
    *, epsilon: float, delta: float, rounds: int, sample_rate: float = 1.0
) -> float:
    """Smallest noise multiplier z (to 0.1 %) with ``compute_epsilon(z, ...) <= epsilon``.

    The result ``z`` satisfies ``eps(z) <= epsilon`` and ``eps(z / 1.001) > epsilon``
    (hence also ``eps(0.99 * z) > epsilon``).
    Raises ``AccountingError`` if the target needs z outside [1e-3, 1e6].
    """
    target = check_positive("epsilon", epsilon)
    delta = check_delta(delta)
    rounds = check_int("rounds", rounds)
    q = check_probability("sample_rate", sample_rate)

    def fine(z: float) -> float:
        return _grouped_epsilon(((z, q, rounds),), delta, _FINE_INTERVAL)

    def coarse(z: float) -> float:
        return _grouped_epsilon(((z, q, rounds),), delta, _COARSE_INTERVAL)

    # A coarse PLD (10x cheaper, slightly pessimistic) finds the neighbourhood; the fine one,
    # the same that compute_epsilon uses, decides the answer.
    lo, hi = _bracket(coarse, target, start=1.0, factor=2.0, grow=False)
    lo, hi = _solve(coarse, target, lo, hi, rtol=_CAL_RTOL)
    # Usually two fine evaluations settle it: the coarse bracket is also the fine one.
    lo, hi = _bracket(fine, target, start=hi, factor=hi / lo, grow=True)
    if hi / lo <= 1 + _CAL_RTOL:
        return hi
    return _solve(fine, target, lo, hi, rtol=_CAL_RTOL)[1]


def _solve(
    eps_of: Callable[[float], float], target: float, lo: float, hi: float, *, rtol: float
) -> tuple[float, float]:
    """Shrink a bracket eps(lo) > target >= eps(hi) until hi / lo <= 1 + rtol."""
    # Brent's method on log z finds the crossing quickly; the bracket keeps it honest.
    ulo, uhi = math.log(lo), math.log(hi)

    def excess(u: float) -> float:
        # Map the end points back exactly: exp(log(x)) != x would miss the cache.
        return eps_of(lo if u == ulo else hi if u == uhi else math.exp(u)) - target

    root = math.exp(optimize.brentq(excess, ulo, uhi, xtol=rtol / 8))
    above, below = root * (1 + rtol / 2), root * (1 - rtol / 4)
    if lo < below < above < hi and eps_of(above) <= target:
        hi = above
        if eps_of(below) > target:
            lo = below
    while hi / lo > 1 + rtol:  # plain bisection in log space if Brent did not close it
        mid = math.sqrt(lo * hi)
        if eps_of(mid) <= target:
            hi = mid
        else:
            lo = mid
    return lo, hi


def _bracket(
    eps_of: Callable[[float], float],
    target: float,
    *,
    start: float,
    factor: float,
    grow: bool,
) -> tuple[float, float]:
    """Find lo < hi with eps(lo) > target >= eps(hi), moving geometrically from ``start``.

    With ``grow`` the step squares after every miss, so a good start costs two evaluations
    and a poor one only logarithmically more. (Small z are expensive to account: the coarse
    search steps down by a constant factor so as not to overshoot into them.)
    """
    if eps_of(start) <= target:
        hi = start
        while True:
            lo = hi / factor
            if lo < _Z_MIN:
                raise AccountingError(
                    f"epsilon={target} is reachable with noise multipliers below {_Z_MIN}; "
                    "such a target is almost surely a mistake"
                )
            if eps_of(lo) > target:
                return lo, hi
            hi = lo
            factor = factor * factor if grow else factor
    lo = start
    while True:
        hi = lo * factor
        if hi > _Z_MAX:
            raise AccountingError(
                f"epsilon={target} needs a noise multiplier above {_Z_MAX}; target too small"
            )
        if eps_of(hi) <= target:
            return lo, hi
        lo = hi
        factor = factor * factor if grow else factor


@functools.lru_cache(maxsize=4096)
def _grouped_epsilon(
    grouped: GroupedEvents, delta: float, interval: float = _FINE_INTERVAL
) -> float:
    if not grouped:
        return 0.0
    # Unsubsampled Gaussians compose exactly into one: 1/z_eff^2 = sum(count / z^2).
    full_precision = sum(n / (z * z) for z, q, n in grouped if q == 1.0)
    subsampled = [(z, q, n) for z, q, n in grouped if q < 1.0]
    if not subsampled:
        return _exact_gaussian_epsilon(1.0 / math.sqrt(full_precision), delta)
    parts: list[PrivacyLossDistribution] = []
    if full_precision > 0:
        parts.append(_gaussian_pld(1.0 / math.sqrt(full_precision), 1.0, interval))
    for z, q, n in subsampled:
        parts.append(_gaussian_pld(z, q, interval).self_compose(n))
    total = functools.reduce(lambda a, b: a.compose(b), parts)
    return max(0.0, float(total.get_epsilon_for_delta(delta)))


@functools.lru_cache(maxsize=32)
def _gaussian_pld(z: float, q: float, interval: float) -> PrivacyLossDistribution:
    """PLD of one (Poisson-subsampled) Gaussian release, exactly as dp_accounting's
    ``PLDAccountant`` builds it; cached because building it dominates the cost (PLDs are
    immutable: compose and self_compose return new ones)."""
    return privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=z,
        value_discretization_interval=interval,
        sampling_prob=q,
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    )


def _exact_gaussian_epsilon(z: float, delta: float) -> float:
    """Smallest eps with delta(eps) <= delta for one Gaussian mechanism (Balle & Wang 2018)."""
    loss = privacy_loss_mechanism.GaussianPrivacyLoss(standard_deviation=z, sensitivity=1.0)

    def excess(eps: float) -> float:
        return float(loss.get_delta_for_epsilon(eps)) - delta

    if excess(0.0) <= 0:
        return 0.0
    mu = 1.0 / z
    hi = mu * mu / 2 + mu * math.sqrt(2 * math.log(1 / delta)) + 1.0
    while excess(hi) > 0:
        hi *= 2
    eps = float(optimize.brentq(excess, 0.0, hi, xtol=1e-12, rtol=1e-12))
    # Report the conservative side of the root.
    while excess(eps) > 0:
        eps = eps * (1 + 1e-12) + 1e-12
    return eps
