"""Example-level DP-SGD for a local training step, with per-sample gradients from Opacus.

Each step Poisson-samples the local examples at rate q, clips every example's gradient (all
parameters together) to L2 norm C, sums, adds N(0, sigma^2 C^2) per coordinate, divides by the
expected batch size q n and takes a plain SGD step. The sampling masks and the noise come from
the injected generator, never from a global one. The privacy cost is one
``PrivacyEvent(sigma, q, steps)``; it bounds what the trained model (and so the update)
reveals about any one example.

Opacus is imported on first use: it takes seconds to import and most peers never need it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from dp._checks import check_int, check_positive, check_probability
from dp.accounting import PrivacyEvent
from dp.noise import gaussian_noise
from floor.errors import TrainingError

# Opacus's hooks on the first layer fire with no input gradients and torch warns, harmlessly.
# A filter installed once, not ``warnings.catch_warnings()`` around each backward pass: that
# swaps the process-wide filter list and is not thread-safe, so peers training in threads of
# one process (the Python API, in-process daemons) let the warning escape.
warnings.filterwarnings("ignore", "Full backward hook is firing", UserWarning)

__all__ = ["DPSGDResult", "dp_sgd_train"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True, slots=True)
class DPSGDResult:
    """What one local DP-SGD run produced.

    ``update`` is theta_after - theta_before for each trainable parameter, in
    ``model.parameters()`` order; ``events`` is what to spend from the budget;
    ``batch_sizes`` are the realised Poisson batch sizes (private: keep them local).
    """

    update: list[torch.Tensor]
    events: tuple[PrivacyEvent, ...]
    steps: int
    batch_sizes: tuple[int, ...]


def dp_sgd_train(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    loss_fn: LossFn,
    lr: float,
    steps: int,
    sample_rate: float,
    clip_norm: float,
    noise_multiplier: float,
    generator: torch.Generator,
    grad_sample_mode: Literal["hooks", "functorch"] = "hooks",
) -> DPSGDResult:
    """Train ``model`` in place for ``steps`` DP-SGD steps on (``inputs``, ``targets``).

    ``loss_fn(outputs, targets)`` must return the MEAN loss over the batch (PyTorch's default
    reduction). Raises ``TrainingError`` for models Opacus cannot handle (e.g. BatchNorm) or
    mismatched data, and ``AccountingError`` for invalid privacy parameters.
    """
    from opacus import GradSampleModule
    from opacus.validators import ModuleValidator

    q = check_probability("sample_rate", sample_rate)
    clip = check_positive("clip_norm", clip_norm)
    event = PrivacyEvent(noise_multiplier, q, check_int("steps", steps))
    if not isinstance(lr, float | int) or isinstance(lr, bool) or not lr > 0:
        raise TrainingError(f"lr must be a positive number, got {lr!r}")
    n = _check_data(inputs, targets)
    problems = ModuleValidator.validate(model, strict=False)
    if problems:
        raise TrainingError(f"model is not compatible with per-sample gradients: {problems}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("model has no trainable parameters")
    start = [p.detach().clone() for p in params]
    std = event.noise_multiplier * clip
    expected_batch = q * n
    batch_sizes: list[int] = []

    gsm = GradSampleModule(
        model,
        batch_first=True,
        loss_reduction="sum",
        strict=True,
        force_functorch=grad_sample_mode == "functorch",
    )
    try:
        gsm.train()
        for _ in range(event.count):
            chosen = torch.nonzero(torch.rand(n, generator=generator) < q).squeeze(1)
            batch_sizes.append(int(chosen.numel()))
            summed = _clipped_sum(gsm, params, inputs[chosen], targets[chosen], loss_fn, clip)
            with torch.no_grad():
                for p, s in zip(params, summed, strict=True):
                    noise = gaussian_noise(s.shape, std, generator=generator, dtype=s.dtype)
                    p.add_(s + noise.to(s.device), alpha=-lr / expected_batch)
    finally:
        gsm.zero_grad(set_to_none=True)
        gsm._close()
    update = [p.detach() - s for p, s in zip(params, start, strict=True)]
    return DPSGDResult(update, (event,), event.count, tuple(batch_sizes))


def _check_data(inputs: torch.Tensor, targets: torch.Tensor) -> int:
    if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TrainingError("inputs and targets must be tensors")
    n = int(inputs.shape[0]) if inputs.dim() else 0
    if n == 0:
        raise TrainingError("inputs must hold at least one example (first dimension)")
    if targets.dim() == 0 or int(targets.shape[0]) != n:
        raise TrainingError(f"targets must have {n} rows to match inputs")
    return n


def _clipped_sum(
    gsm: nn.Module,
    params: Sequence[torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: LossFn,
    clip: float,
) -> list[torch.Tensor]:
    """Sum over the batch of per-example gradients, each clipped to L2 norm ``clip``."""
    batch = int(inputs.shape[0])
    if batch == 0:  # an empty Poisson batch still gets its noise: that is what is accounted
        return [torch.zeros_like(p) for p in params]
    gsm.zero_grad(set_to_none=True)
    outputs = gsm(inputs)
    loss = loss_fn(outputs, targets) * batch  # mean -> sum: per-sample grads are unscaled
    loss.backward()  # type: ignore[no-untyped-call]
    per_sample = []
    for p in params:
        grad_sample = getattr(p, "grad_sample", None)
        if grad_sample is None:
            raise TrainingError("Opacus produced no per-sample gradient for a parameter")
        per_sample.append(grad_sample.detach())
    sq_norms = torch.stack([g.reshape(batch, -1).pow(2).sum(dim=1) for g in per_sample])
    factor = (clip / (sq_norms.sum(dim=0).sqrt() + 1e-12)).clamp(max=1.0)
    return [torch.einsum("b,b...->...", factor, g) for g in per_sample]
