"""Split a training set across peers: IID, Dirichlet(alpha) non-IID, or a few labels per peer.

Every scheme is a pure function of (labels, number of peers, options, seed), and every peer gets
at least ``min_samples`` rows. Rows are never shared: the parts are disjoint and, together,
cover every row.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from floor.errors import ConfigError

__all__ = ["Scheme", "partition", "peer_shards"]

Scheme = Literal["iid", "dirichlet", "label"]
IntArray = np.ndarray[Any, np.dtype[np.int64]]


def partition(
    labels: Tensor | np.ndarray[Any, Any],
    num_peers: int,
    *,
    scheme: Scheme = "iid",
    alpha: float = 0.5,
    labels_per_peer: int = 2,
    min_samples: int = 2,
    seed: int = 0,
) -> list[IntArray]:
    """Row indices for each of ``num_peers`` peers, each sorted ascending.

    - ``iid``: a seeded shuffle cut into near-equal parts.
    - ``dirichlet``: for each class, the proportions going to each peer are drawn from
      Dirichlet(``alpha``) (small alpha: very skewed; large alpha: close to IID).
    - ``label``: peer i holds classes ``(i * labels_per_peer + j) mod C`` for j <
      ``labels_per_peer``; each class is cut evenly among the peers that hold it.

    A peer left with fewer than ``min_samples`` rows (possible with Dirichlet) takes rows from
    the largest peers, one at a time, preferring rows of classes it already holds, so the skew
    is kept as far as possible.
    """
    y = np.asarray(labels.numpy() if isinstance(labels, Tensor) else labels).reshape(-1)
    n = int(y.shape[0])
    if num_peers < 1:
        raise ConfigError(f"num_peers must be at least 1, got {num_peers}")
    if min_samples < 0:
        raise ConfigError(f"min_samples must be >= 0, got {min_samples}")
    if n < num_peers * max(min_samples, 1):
        raise ConfigError(
            f"{n} rows cannot give {num_peers} peers at least {max(min_samples, 1)} rows each; "
            "use fewer peers or a smaller min_samples"
        )
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = [p.astype(np.int64) for p in np.array_split(rng.permutation(n), num_peers)]
    elif scheme == "dirichlet":
        if not alpha > 0.0:
            raise ConfigError(f"dirichlet alpha must be > 0, got {alpha}")
        parts = _dirichlet(y, num_peers, alpha, rng)
    elif scheme == "label":
        parts = _by_label(y, num_peers, labels_per_peer, rng)
    else:
        raise ConfigError(f"unknown partition scheme {scheme!r}; use iid, dirichlet or label")
    _top_up(parts, y, min_samples)
    return [np.sort(p) for p in parts]


def _dirichlet(
    y: np.ndarray[Any, Any], k: int, alpha: float, rng: np.random.Generator
) -> list[IntArray]:
    buckets: list[list[IntArray]] = [[] for _ in range(k)]
    for c in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == c))
        shares = rng.dirichlet(np.full(k, alpha))
        cuts = (np.cumsum(shares)[:-1] * rows.shape[0]).round().astype(np.int64)
        for i, piece in enumerate(np.split(rows, cuts)):
            buckets[i].append(piece.astype(np.int64))
    return [np.concatenate(b) if b else np.empty(0, np.int64) for b in buckets]


def _by_label(
    y: np.ndarray[Any, Any], k: int, per_peer: int, rng: np.random.Generator
) -> list[IntArray]:
    classes = np.unique(y)
    c = int(classes.shape[0])
    if not 1 <= per_peer <= c:
        raise ConfigError(f"labels_per_peer must be in [1, {c}], got {per_peer}")
    holders: dict[int, list[int]] = {j: [] for j in range(c)}
    for i in range(k):
        for j in range(per_peer):
            cls = (i * per_peer + j) % c
            if i not in holders[cls]:
                holders[cls].append(i)
    buckets: list[list[IntArray]] = [[] for _ in range(k)]
    orphans: list[IntArray] = []
    for j, cls in enumerate(classes):
        rows = rng.permutation(np.flatnonzero(y == cls)).astype(np.int64)
        if not holders[j]:
            orphans.append(rows)  # fewer peers x labels than classes: spread what is left
            continue
        for peer, piece in zip(holders[j], np.array_split(rows, len(holders[j])), strict=True):
            buckets[peer].append(piece)
    for rows in orphans:
        for peer, piece in enumerate(np.array_split(rows, k)):
            buckets[peer].append(piece)
    return [np.concatenate(b) if b else np.empty(0, np.int64) for b in buckets]


def _top_up(parts: list[IntArray], y: np.ndarray[Any, Any], min_samples: int) -> None:
    """Move rows from the largest parts to parts below ``min_samples`` (deterministic)."""
    for i in range(len(parts)):
        while parts[i].shape[0] < min_samples:
            donor = max(range(len(parts)), key=lambda j: (parts[j].shape[0], -j))
            mine = set(y[parts[i]].tolist())
            rows = parts[donor]
            pick = next((r for r in range(rows.shape[0]) if y[rows[r]] in mine), 0)
            parts[i] = np.append(parts[i], rows[pick])
            parts[donor] = np.delete(rows, pick)


def peer_shards(x: Tensor, y: Tensor, parts: list[IntArray]) -> list[tuple[Tensor, Tensor]]:
    """The ``(x_i, y_i)`` tensors of each peer, given the indices from :func:`partition`."""
    out = []
    for p in parts:
        idx = torch.as_tensor(p, dtype=torch.int64)
        out.append((x[idx], y[idx]))
    return out
