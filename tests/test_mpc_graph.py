"""mpc.graph: SecAgg+ mask graphs are regular, symmetric, shared and O(log n)."""

from __future__ import annotations

import hashlib
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from floor.errors import ConfigError
from mpc import graph

SEED = hashlib.sha256(b"round-1/group-a").digest()


def _members(n: int) -> list[bytes]:
    return [hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(n)]


@pytest.mark.parametrize(
    ("n", "k"),
    [(1, 0), (2, 1), (3, 2), (5, 4), (8, 6), (9, 8), (16, 8), (17, 10), (64, 12), (1000, 20)],
)
def test_default_degree(n: int, k: int) -> None:
    assert graph.default_degree(n) == k


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 5000))
def test_default_degree_is_logarithmic_and_realizable(n: int) -> None:
    k = graph.default_degree(n)
    assert k <= max(0, n - 1)
    assert k == n - 1 or (k % 2 == 0 and k >= 2 * math.log2(n))
    assert (n * k) % 2 == 0


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 60), data=st.data())
def test_mask_graph_is_regular_symmetric_and_loop_free(n: int, data: st.DataObject) -> None:
    degree = data.draw(st.one_of(st.none(), st.integers(1, n + 2)), label="degree")
    members = _members(n)
    g = graph.mask_graph(members, degree=degree, seed=SEED)
    assert set(g) == set(members)
    if degree is None or degree >= n - 1 or (degree + 1 >= n - 1 and (n * degree) % 2):
        want = n - 1
    else:
        want = degree + (n * degree) % 2
    for m, neighbours in g.items():
        assert m not in neighbours
        assert len(neighbours) == want
        for v in neighbours:
            assert m in g[v]


def test_graph_is_shared_randomness_and_order_independent() -> None:
    members = _members(40)
    g1 = graph.mask_graph(members, degree=6, seed=SEED)
    g2 = graph.mask_graph(list(reversed(members)), degree=6, seed=SEED)
    assert g1 == g2
    g3 = graph.mask_graph(members, degree=6, seed=hashlib.sha256(b"other").digest())
    assert g1 != g3


def test_graph_depends_on_membership() -> None:
    members = _members(41)
    g_all = graph.mask_graph(members[:40], degree=6, seed=SEED)
    g_other = graph.mask_graph(members[1:], degree=6, seed=SEED)
    common = set(members[1:40])
    assert any(g_all[m] & common != g_other[m] & common for m in common)


def test_odd_n_times_degree_raises_the_degree() -> None:
    g = graph.mask_graph(_members(11), degree=3, seed=SEED)
    assert {len(v) for v in g.values()} == {4}


@pytest.mark.parametrize(("n", "degree"), [(60, 57), (60, 50), (61, 40), (120, 100)])
def test_dense_graphs_are_drawn_quickly_and_regular(n: int, degree: int) -> None:
    """networkx's pairing method stalls on dense graphs; mask_graph draws the complement."""
    g = graph.mask_graph(_members(n), degree=degree, seed=SEED)
    assert {len(v) for v in g.values()} == {degree}
    assert all(m in g[v] for m, vs in g.items() for v in vs)


def test_complete_graph_cases() -> None:
    members = _members(6)
    everyone = set(members)
    for degree in (None, 5, 9):
        g = graph.mask_graph(members, degree=degree, seed=SEED)
        assert all(v == everyone - {m} for m, v in g.items())
    assert graph.mask_graph([], degree=None, seed=SEED) == {}
    assert graph.mask_graph(members[:1], degree=None, seed=SEED) == {members[0]: frozenset()}


def test_default_degree_graph_is_connected() -> None:
    members = _members(200)
    g = graph.mask_graph(members, degree=graph.default_degree(200), seed=SEED)
    seen, todo = {members[0]}, [members[0]]
    while todo:
        for v in g[todo.pop()]:
            if v not in seen:
                seen.add(v)
                todo.append(v)
    assert seen == set(members)


@pytest.mark.parametrize(
    "call",
    [
        lambda: graph.mask_graph(_members(3) + _members(1), degree=None, seed=SEED),
        lambda: graph.mask_graph(_members(5), degree=0, seed=SEED),
        lambda: graph.mask_graph(_members(5), degree=-2, seed=SEED),
        lambda: graph.mask_graph(_members(5), degree=True, seed=SEED),
        lambda: graph.mask_graph(_members(9), degree=2, seed=b"short"),
        lambda: graph.default_degree(0),
    ],
)
def test_bad_arguments(call: object) -> None:
    with pytest.raises(ConfigError):
        call()  # type: ignore[operator]
