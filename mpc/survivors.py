"""Pure rules of the protocol's agreement step: chunk layout, counted set, fallback reducers.

Every live member evaluates these functions on the same broadcast receipts, so they agree on
which inputs are counted and which secrets to reveal without any coordinator. See
``mpc.protocol`` for the protocol these rules serve.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

__all__ = ["ReceiptView", "chunk_bounds", "counted_set", "dropped_set", "fallback_reducer"]


@dataclass(frozen=True, slots=True)
class ReceiptView:
    """What one live reducer reported: the senders of its own chunk, and its backup flag."""

    received: frozenset[bytes]
    backup: bool


def chunk_bounds(length: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ``[lo, hi)`` slices covering ``range(length)``, sizes differing by <= 1.

    The first ``length % parts`` chunks are one element longer (as ``torch.tensor_split``).
    Chunks are empty when ``length < parts``.
    """
    base, extra = divmod(length, parts)
    bounds = []
    lo = 0
    for j in range(parts):
        hi = lo + base + (1 if j < extra else 0)
        bounds.append((lo, hi))
        lo = hi
    return bounds


def fallback_reducer(
    chunk: int, members: Sequence[bytes], live: AbstractSet[bytes]
) -> bytes | None:
    """Who reduces ``chunk``: its owner ``members[chunk]`` if live, else the next live member.

    Returns ``None`` when no member is live.
    """
    k = len(members)
    for step in range(k):
        candidate = members[(chunk + step) % k]
        if candidate in live:
            return candidate
    return None


def counted_set(
    members: Sequence[bytes],
    receipts: Mapping[bytes, ReceiptView],
    graph: Mapping[bytes, AbstractSet[bytes]],
) -> frozenset[bytes]:
    """The members whose masked input is counted, from the receipts of the live reducers.

    ``receipts`` maps each live reducer to its receipt; ``graph`` maps each member to its
    mask-graph neighbours (everyone else, unless SecAgg+). A member ``u`` is counted iff

    1. every live reducer received its chunk (``u`` is in every ``received``);
    2. every chunk of its input reaches a live reducer: ``u`` is live itself (it resends its
       slices of dead reducers' chunks to their fallbacks), or ``u`` is the only member that is
       not live and its successor holds the backup of ``u``'s own chunk (a dead ``u`` cannot
       resend, so its slice of any other dead reducer's chunk would be lost);
    3. its pair masks can be removed: a ``u`` that is not live cannot reveal its pair seeds,
       so it is counted only if all its neighbours are counted too (then every mask it shares
       cancels in the sum).
    """
    if not receipts:
        return frozenset()
    live = frozenset(receipts)
    counted = set(frozenset.intersection(*(r.received for r in receipts.values())))
    k = len(members)
    position = {m: i for i, m in enumerate(members)}
    for u in sorted(counted):
        if u in live:
            continue
        successor = members[(position[u] + 1) % k]
        alone = len(live) == k - 1
        if not alone or successor not in live or not receipts[successor].backup:
            counted.discard(u)
    # rule 3: at most one counted member is not live (rule 2), and removing it changes no other
    for u in sorted(counted - live):
        if not graph[u] <= counted:
            counted.discard(u)
    return frozenset(counted)


def dropped_set(
    counted: AbstractSet[bytes], graph: Mapping[bytes, AbstractSet[bytes]]
) -> frozenset[bytes]:
    """Members outside ``counted`` that are a counted member's neighbours: their pair masks
    with counted members must be removed (their counted neighbours reveal the pair seeds)."""
    needed: set[bytes] = set()
    for u in counted:
        needed.update(graph[u])
    return frozenset(needed - set(counted))
