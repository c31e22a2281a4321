"""Turn any ``nn.Module`` into one flat float vector of what peers share, and back.

What is shared: every parameter, in ``named_parameters()`` order. Buffers are **kept local** by
default: batch-norm running means and variances are statistics of a peer's own data, so
releasing them un-noised would leak outside the privacy accounting. ``include_buffers=True``
also shares floating-point buffers (averaged like parameters, e.g. batch-norm running stats);
the learner allows it only without differential privacy. Integer buffers
(``num_batches_tracked``) always stay local.

A :class:`Layout` records names, shapes and dtypes once; a model whose shapes change between
rounds is refused with a :class:`~floor.errors.TrainingError` that says what to change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from floor.errors import TrainingError

__all__ = ["Layout", "LayoutEntry", "flatten", "restore"]


@dataclass(frozen=True, slots=True)
class LayoutEntry:
    """One shared tensor: its qualified name, shape, dtype and whether it is a buffer."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    is_buffer: bool

    @property
    def numel(self) -> int:
        """Number of scalars in the tensor."""
        n = 1
        for s in self.shape:
            n *= s
        return n


def _shared(model: nn.Module, include_buffers: bool) -> list[tuple[str, Tensor, bool]]:
    items: list[tuple[str, Tensor, bool]] = [(n, p, False) for n, p in model.named_parameters()]
    if include_buffers:
        items += [
            (name, b, True) for name, b in model.named_buffers() if torch.is_floating_point(b)
        ]
    return items


@dataclass(frozen=True, slots=True)
class Layout:
    """The fixed order, shapes and dtypes of a model's shared tensors, and the vector dtype."""

    entries: tuple[LayoutEntry, ...]
    dtype: torch.dtype
    include_buffers: bool

    @classmethod
    def of(cls, model: nn.Module, *, include_buffers: bool = False) -> Layout:
        """Record the layout of ``model``. Every parameter must be floating point."""
        entries = []
        for name, t, is_buffer in _shared(model, include_buffers):
            if not torch.is_floating_point(t):
                raise TrainingError(
                    f"parameter {name!r} has dtype {t.dtype}; only floating-point parameters "
                    "can be averaged: make it a buffer or a float parameter"
                )
            entries.append(LayoutEntry(name, tuple(t.shape), t.dtype, is_buffer))
        if not entries:
            raise TrainingError("the model has no parameters to train and share")
        dtype = entries[0].dtype
        for e in entries[1:]:
            dtype = torch.promote_types(dtype, e.dtype)
        return cls(tuple(entries), dtype, include_buffers)

    @property
    def size(self) -> int:
        """Length of the flat vector."""
        return sum(e.numel for e in self.entries)

    @property
    def num_params(self) -> int:
        """Number of scalars that are parameters (not buffers)."""
        return sum(e.numel for e in self.entries if not e.is_buffer)

    def check(self, model: nn.Module) -> list[Tensor]:
        """The model's shared tensors in layout order; :class:`TrainingError` if they changed."""
        items = _shared(model, self.include_buffers)
        names = [name for name, _, _ in items]
        expected = [e.name for e in self.entries]
        if names != expected:
            missing = sorted(set(expected) - set(names))
            extra = sorted(set(names) - set(expected))
            raise TrainingError(
                "the model's parameters changed between rounds "
                f"(missing {missing or 'none'}, new {extra or 'none'}); every round must use the "
                "same architecture: build it with the same model factory, or start a new run"
            )
        tensors = []
        for e, (name, t, _) in zip(self.entries, items, strict=True):
            if tuple(t.shape) != e.shape:
                raise TrainingError(
                    f"parameter {name!r} changed shape from {list(e.shape)} to "
                    f"{list(t.shape)} between rounds; peers average one fixed architecture: "
                    "keep the model's layer sizes fixed (same factory and options), or start a "
                    "new run with a new model"
                )
            tensors.append(t)
        return tensors


def flatten(model: nn.Module, layout: Layout) -> Tensor:
    """A new flat vector (dtype ``layout.dtype``) of the model's shared tensors, detached."""
    tensors = layout.check(model)
    return torch.cat([t.detach().reshape(-1).to(layout.dtype) for t in tensors])


@torch.no_grad()
def restore(model: nn.Module, vector: Tensor, layout: Layout) -> None:
    """Copy ``vector`` into the model's shared tensors in place (buffers kept local stay)."""
    tensors = layout.check(model)
    if vector.dim() != 1 or vector.numel() != layout.size:
        raise TrainingError(
            f"vector of shape {list(vector.shape)} does not fit a model of {layout.size} shared "
            "values; it was made for another model or layout"
        )
    if not torch.isfinite(vector).all():
        raise TrainingError("refusing to load a vector with NaN or infinite values")
    offset = 0
    for e, t in zip(layout.entries, tensors, strict=True):
        t.copy_(vector[offset : offset + e.numel].view(e.shape).to(t.dtype))
        offset += e.numel
