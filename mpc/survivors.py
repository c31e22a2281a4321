"""Pure rules of the protocol's agreement step: chunk layout, counted set, reducers of chunks.

Every live member evaluates these functions on the same broadcast receipts, so they agree on
which inputs are counted and which secrets to reveal without any coordinator. See
``mpc.protocol`` for the protocol these rules serve.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

__all__ = [
    "ReceiptView",
    "chunk_bounds",
    "chunk_reducers",
    "counted_set",
    "covered",
    "dropped_set",
    "fallback_reducer",
]


@dataclass(frozen=True, slots=True)
class ReceiptView:
    """What one live reducer reported: the senders whose input (its two chunks) it received."""

    received: frozenset[bytes]


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
    """The first live member from ``members[chunk]`` on, in order; ``None`` when none is live."""
    k = len(members)
    for step in range(k):
        candidate = members[(chunk + step) % k]
        if candidate in live:
            return candidate
    return None


def covered(chunk: int, members: Sequence[bytes], live: AbstractSet[bytes]) -> bool:
    """Whether one of the chunk's own two reducers (``members[chunk]`` and the next) is live."""
    k = len(members)
    return members[chunk] in live or members[(chunk + 1) % k] in live


def chunk_reducers(
    chunk: int, members: Sequence[bytes], live: AbstractSet[bytes]
) -> tuple[bytes, ...]:
    """Who reduces ``chunk`` and sends its sum: the live ones of its own two reducers
    (``members[chunk]``, which holds every member's slice, and ``members[chunk + 1]``, which
    holds every member's replica of it); if neither is live, the fallback reducer alone (the
    next live member, which gets the live counted members' slices as ``ReassignedChunk``)."""
    k = len(members)
    own = (members[chunk], members[(chunk + 1) % k])
    live_own = tuple(m for m in own if m in live)
    if live_own:
        return live_own
    fallback = fallback_reducer(chunk, members, live)
    return () if fallback is None else (fallback,)


def counted_set(
    members: Sequence[bytes],
    receipts: Mapping[bytes, ReceiptView],
    graph: Mapping[bytes, AbstractSet[bytes]],
) -> frozenset[bytes]:
    """The members whose masked input is counted, from the receipts of the live reducers.

    ``receipts`` maps each live reducer to its receipt; ``graph`` maps each member to its
    mask-graph neighbours (everyone else, unless SecAgg+). A member ``u`` is counted iff

    1. every live reducer received its input (``u`` is in every ``received``): each live
       reducer then holds ``u``'s slices of both chunks it reduces;
    2. every chunk of its input reaches a live reducer: ``u`` is live itself (it resends its
       slices of uncovered chunks to their fallback), or every chunk is covered (one of its two
       own reducers is live, so it holds ``u``'s slice; a dead ``u`` cannot resend);
    3. its pair masks can be removed: a ``u`` that is not live cannot reveal its pair seeds,
       so it is counted only if all its neighbours are counted too (then every mask it shares
       cancels in the sum). Removing one such ``u`` can break the rule for another, so it is
       applied until nothing changes (the largest set that keeps it; the same for everyone).
    """
    if not receipts:
        return frozenset()
    live = frozenset(receipts)
    counted = set(frozenset.intersection(*(r.received for r in receipts.values())))
    if not all(covered(j, members, live) for j in range(len(members))):
        counted &= live
    changed = True
    while changed:
        changed = False
        for u in sorted(counted - live):
            if not graph[u] <= counted:
                counted.discard(u)
                changed = True
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
