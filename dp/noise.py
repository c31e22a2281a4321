"""Gaussian noise for DP releases, drawn from an explicitly injected ``torch.Generator``.

There is no default: every function takes the generator as a required keyword, so noise can
never silently come from torch's global generator. Use ``secure_generator()`` in production
(seeded from the operating system's CSPRNG) and ``seeded_generator(seed)`` in simulation and
tests (reproducible).

Caveat, stated plainly: torch's CPU generator is a Mersenne Twister (fast, not cryptographic),
and floating-point Gaussian samples leak through their low-order bits (Mironov 2012). The OS
seed keeps the stream unpredictable to anyone without the process's memory; for noise that
must also be exact, add integer noise from ``dp.discrete_gaussian`` in the fixed-point domain.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from typing import overload

import torch

from dp._checks import check_int, check_positive
from floor.errors import AccountingError

__all__ = [
    "add_gaussian_noise",
    "gaussian_noise",
    "secure_generator",
    "seeded_generator",
]


def secure_generator(device: str | torch.device = "cpu") -> torch.Generator:
    """A new generator seeded with 64 bits from the OS CSPRNG (``secrets``): for production."""
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(64))
    return generator


def seeded_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A new generator with a fixed seed: reproducible noise for simulation and tests only."""
    seed = check_int("seed", seed, minimum=0)
    if seed >= 2**64:
        raise AccountingError(f"seed must be < 2**64, got {seed}")
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def _check_generator(generator: object) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise AccountingError(
            "generator must be a torch.Generator (use dp.secure_generator() in production, "
            f"dp.seeded_generator(seed) in simulation), got {type(generator).__name__}"
        )
    return generator


def gaussian_noise(
    shape: Sequence[int] | torch.Size,
    std: float,
    *,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A tensor of i.i.d. N(0, std**2) samples drawn from ``generator`` (std = 0: zeros)."""
    std = check_positive("std", std, allow_zero=True)
    generator = _check_generator(generator)
    noise = torch.empty(tuple(shape), dtype=dtype, device=generator.device)
    if std == 0.0:
        return noise.zero_()
    return noise.normal_(mean=0.0, std=std, generator=generator)


@overload
def add_gaussian_noise(
    tensors: Mapping[str, torch.Tensor], std: float, *, generator: torch.Generator
) -> dict[str, torch.Tensor]: ...


@overload
def add_gaussian_noise(
    tensors: Sequence[torch.Tensor], std: float, *, generator: torch.Generator
) -> list[torch.Tensor]: ...


def add_gaussian_noise(
    tensors: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
    std: float,
    *,
    generator: torch.Generator,
) -> dict[str, torch.Tensor] | list[torch.Tensor]:
    """New tensors equal to ``tensors`` plus i.i.d. N(0, std**2) noise (inputs are unchanged).

    Accepts a list of tensors or a name -> tensor mapping (a state dict) and returns the same
    shape of container. Noise is drawn in container order, so a seeded generator reproduces it.
    """
    if isinstance(tensors, Mapping):
        return {name: _noisy(t, std, generator, name=name) for name, t in tensors.items()}
    return [_noisy(t, std, generator, name=f"tensor {i}") for i, t in enumerate(tensors)]


def _noisy(
    tensor: torch.Tensor, std: float, generator: torch.Generator, *, name: str
) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        raise AccountingError(f"{name} must be a floating-point tensor to receive Gaussian noise")
    noise = gaussian_noise(tensor.shape, std, generator=generator, dtype=tensor.dtype)
    return tensor.detach() + noise.to(tensor.device)
