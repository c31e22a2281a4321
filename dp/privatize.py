"""Peer-level DP for one contribution: clip the whole update to C, add N(0, sigma^2 C^2).

One call is one Gaussian mechanism with sensitivity C and noise multiplier sigma; the result
carries the matching ``PrivacyEvent`` for the peer's ``Budget``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar, overload

import torch

from dp._checks import check_positive
from dp.accounting import PrivacyEvent
from dp.clip import clip_update
from dp.noise import add_gaussian_noise

__all__ = ["PrivatizedUpdate", "privatize_update"]

U = TypeVar("U", dict[str, torch.Tensor], list[torch.Tensor])


@dataclass(frozen=True, slots=True)
class PrivatizedUpdate(Generic[U]):
    """A clipped and noised update, the norm it had before clipping, and its privacy event.

    ``norm_before_clip`` is private information (it depends on the data): use it locally (e.g.
    for ``AdaptiveClipper``), never send it.
    """

    update: U
    norm_before_clip: float
    event: PrivacyEvent


@overload
def privatize_update(
    update: Mapping[str, torch.Tensor],
    *,
    clip_norm: float,
    noise_multiplier: float,
    generator: torch.Generator,
) -> PrivatizedUpdate[dict[str, torch.Tensor]]: ...


@overload
def privatize_update(
    update: Sequence[torch.Tensor],
    *,
    clip_norm: float,
    noise_multiplier: float,
    generator: torch.Generator,
) -> PrivatizedUpdate[list[torch.Tensor]]: ...


def privatize_update(
    update: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
    *,
    clip_norm: float,
    noise_multiplier: float,
    generator: torch.Generator,
) -> PrivatizedUpdate[dict[str, torch.Tensor]] | PrivatizedUpdate[list[torch.Tensor]]:
    """Clip ``update`` to global L2 norm ``clip_norm`` and add N(0, (noise_multiplier *
    clip_norm)**2) to every coordinate, with noise from ``generator``.

    Returns the noised update (same container kind as the input), the pre-clip norm, and
    ``PrivacyEvent(noise_multiplier, 1.0, 1)`` to spend from the peer's budget before sending.
    """
    clip_norm = check_positive("clip_norm", clip_norm)
    event = PrivacyEvent(noise_multiplier)
    std = event.noise_multiplier * clip_norm
    if isinstance(update, Mapping):
        clipped_map, norm = clip_update(update, clip_norm)
        return PrivatizedUpdate(
            add_gaussian_noise(clipped_map, std, generator=generator), norm, event
        )
    clipped_list, norm = clip_update(update, clip_norm)
    return PrivatizedUpdate(add_gaussian_noise(clipped_list, std, generator=generator), norm, event)
