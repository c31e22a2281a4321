"""L2 clipping of a model update over all its tensors together, and adaptive clipping.

``clip_update`` bounds the sensitivity of one release: the whole update (every parameter
tensor, flattened and concatenated) is scaled to L2 norm at most ``max_norm``.
``AdaptiveClipper`` moves the clip norm towards a target quantile of update norms (Andrew et
al. 2021, "Differentially Private Learning with Adaptive Clipping"), with its own Gaussian
noise on the clipped-fraction estimate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import overload

import torch

from dp._checks import check_positive, check_probability
from dp.noise import gaussian_noise
from floor.errors import AccountingError

__all__ = [
    "AdaptiveClipper",
    "clip_update",
    "split_noise_multiplier",
    "update_norm",
]

Update = Mapping[str, torch.Tensor] | Sequence[torch.Tensor]


def _tensors(update: Update) -> list[torch.Tensor]:
    values = list(update.values()) if isinstance(update, Mapping) else list(update)
    for i, t in enumerate(values):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise AccountingError(f"update tensor {i} must be a floating-point torch.Tensor")
    return values


def update_norm(update: Update) -> float:
    """The L2 norm of all tensors of ``update`` taken together (accumulated in float64)."""
    total = 0.0
    for t in _tensors(update):
        total += float(torch.sum(t.detach().to(torch.float64) ** 2))
    return math.sqrt(total)


@overload
def clip_update(
    update: Mapping[str, torch.Tensor], max_norm: float
) -> tuple[dict[str, torch.Tensor], float]: ...


@overload
def clip_update(
    update: Sequence[torch.Tensor], max_norm: float
) -> tuple[list[torch.Tensor], float]: ...


def clip_update(
    update: Update, max_norm: float
) -> tuple[dict[str, torch.Tensor] | list[torch.Tensor], float]:
    """Scale ``update`` to global L2 norm at most ``max_norm``; return (clipped, norm before).

    The inputs are not modified. A list gives a list and a mapping (state dict) gives a dict.
    An update already within the bound is returned unscaled (as detached copies).
    """
    max_norm = check_positive("max_norm", max_norm)
    norm = update_norm(update)
    scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
    if isinstance(update, Mapping):
        return {name: t.detach() * scale for name, t in update.items()}, norm
    return [t.detach() * scale for t in update], norm


def split_noise_multiplier(noise_multiplier: float, count_noise_std: float) -> float:
    """Noise multiplier left for the update when the clipped-count estimate also spends privacy.

    Andrew et al. 2021: releasing the update with noise multiplier z_u and the centred clipped
    indicator (sensitivity 1/2) with noise std ``count_noise_std`` composes to exactly one
    Gaussian mechanism with ``noise_multiplier`` z when z_u = (z**-2 - (2 std)**-2) ** -0.5.
    Account each round as one ``PrivacyEvent(noise_multiplier)``.
    """
    z = check_positive("noise_multiplier", noise_multiplier)
    std = check_positive("count_noise_std", count_noise_std)
    remaining = z**-2 - (2 * std) ** -2
    if remaining <= 0:
        raise AccountingError(
            f"count_noise_std={std} is too small for noise_multiplier={z}: it must exceed "
            f"z / 2 = {z / 2} (the count alone would spend the whole budget)"
        )
    return float(remaining**-0.5)


class AdaptiveClipper:
    """A clip norm that tracks the ``target_quantile`` of update norms (Andrew et al. 2021).

    Each round, a contributor reports the indicator ``norm <= clip``; the (noisy) mean ``b``
    of the indicators over the contributors moves the clip geometrically:
    ``clip *= exp(-learning_rate * (b - target_quantile))``. A peer that estimates alone
    uses ``observe``, which adds N(0, count_noise_std**2) to its own indicator; a group that
    sums indicators under secure aggregation calls ``update`` with its noisy mean. Either way,
    pay for the count with ``split_noise_multiplier``.
    """

    def __init__(
        self,
        initial_clip: float,
        *,
        target_quantile: float = 0.5,
        learning_rate: float = 0.2,
        count_noise_std: float = 0.0,
        min_clip: float = 1e-6,
    ) -> None:
        self._clip = check_positive("initial_clip", initial_clip)
        self.target_quantile = check_probability("target_quantile", target_quantile)
        self.learning_rate = check_positive("learning_rate", learning_rate)
        self.count_noise_std = check_positive("count_noise_std", count_noise_std, allow_zero=True)
        self.min_clip = check_positive("min_clip", min_clip)

    @property
    def clip(self) -> float:
        """The current clip norm."""
        return self._clip

    def indicator(self, norm: float) -> float:
        """1.0 if an update of this norm is not clipped at the current clip norm, else 0.0."""
        norm = check_positive("norm", norm, allow_zero=True)
        return 1.0 if norm <= self._clip else 0.0

    def update(self, unclipped_fraction: float) -> float:
        """Move the clip norm given the (noisy) fraction of unclipped updates; return it."""
        if isinstance(unclipped_fraction, bool) or not math.isfinite(unclipped_fraction):
            raise AccountingError(f"unclipped_fraction must be finite, got {unclipped_fraction}")
        step = -self.learning_rate * (float(unclipped_fraction) - self.target_quantile)
        self._clip = max(self.min_clip, self._clip * math.exp(step))
        return self._clip

    def observe(self, norm: float, *, generator: torch.Generator) -> float:
        """Local estimate from one norm: noisy indicator, then ``update``; return the new clip."""
        noisy = self.indicator(norm) + float(
            gaussian_noise((1,), self.count_noise_std, generator=generator, dtype=torch.float64)
        )
        return self.update(noisy)
