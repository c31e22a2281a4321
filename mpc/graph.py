"""SecAgg+ mask graphs: a random k-regular graph over the group drawn from shared randomness.

Members mask pairwise only with their neighbours (Bell et al. 2020). Every member computes the
same graph from the same ``seed`` (shared randomness, e.g. derived from the round and group
context or a commit-reveal beacon): members are sorted, and ``networkx.random_regular_graph``
runs with an integer seed derived from ``seed``, ``n`` and the degree. The graph depends on the
networkx version's algorithm, so every member of a group must run the same networkx.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import networkx as nx

from floor.errors import ConfigError
from mpc.kdf import derive, u64

__all__ = ["GRAPH_LABEL", "default_degree", "mask_graph"]

GRAPH_LABEL = b"murmur.secagg.graph.v1"
"""KDF label of the graph seed."""


def default_degree(n: int) -> int:
    """The default SecAgg+ degree for ``n`` members: ``2 * ceil(log2 n)``, capped at ``n - 1``.

    The value is even, so ``n * k`` is always even and a k-regular graph exists; ``n - 1`` (the
    complete graph) is returned whenever ``2 * ceil(log2 n) >= n - 1``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"group size must be a positive integer, got {n!r}")
    if n == 1:
        return 0
    return min(n - 1, 2 * math.ceil(math.log2(n)))


def mask_graph(
    members: Sequence[bytes], *, degree: int | None, seed: bytes
) -> dict[bytes, frozenset[bytes]]:
    """Each member's neighbours in the mask graph.

    ``degree=None`` or ``degree >= n - 1`` gives the complete graph (classic SecAgg). Otherwise
    the graph is a random ``degree``-regular graph; if ``n * degree`` is odd (no such graph
    exists) the degree is raised by one. The result does not depend on the order of ``members``.
    ``seed`` is 16 to 64 bytes of randomness shared by the group (it keys ``mpc.kdf.derive``).
    """
    ids = sorted(bytes(m) for m in members)
    n = len(ids)
    if len(set(ids)) != n:
        raise ConfigError("mask graph members must be distinct")
    if n == 0:
        return {}
    if degree is not None:
        if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
            raise ConfigError(
                f"mask graph degree must be a positive integer or None, got {degree!r}"
            )
        if (n * degree) % 2:
            degree += 1
    if degree is None or degree >= n - 1:
        everyone = frozenset(ids)
        return {m: everyone - {m} for m in ids}
    graph_seed = int.from_bytes(derive(seed, GRAPH_LABEL, u64(n), u64(degree), *ids)[:16], "big")
    # networkx's pairing method stalls on dense graphs (d > n/2 took minutes at n = 60):
    # draw the sparse complement instead; the complement of a random (n-1-d)-regular graph
    # is a random d-regular graph. n * (n-1-d) is even whenever n * d is.
    dense = 2 * degree > n - 1
    graph = nx.random_regular_graph(n - 1 - degree if dense else degree, n, seed=graph_seed)
    indices = frozenset(range(n))
    result: dict[bytes, frozenset[bytes]] = {}
    for i in range(n):
        near = frozenset(graph.neighbors(i))
        if dense:
            near = indices - near - {i}
        result[ids[i]] = frozenset(ids[j] for j in near)
    return result
