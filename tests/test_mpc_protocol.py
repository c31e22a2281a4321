"""The secure-aggregation protocol end to end: exact ring sums under dropouts, SecAgg+, aborts."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import nacl.signing
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mpc
from mpc.driver import run_group
from mpc.messages import MESSAGE_TYPES
from mpc.survivors import ReceiptView, chunk_bounds, chunk_reducers, counted_set, fallback_reducer

STAGES = ("input", "unmasking", "view", "reveal", "aggregate")


def ring_vectors(k: int, d: int, bits: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dtype = torch.int32 if bits == 32 else torch.int64
    info = torch.iinfo(dtype)
    return [torch.randint(info.min, info.max, (d,), generator=g, dtype=dtype) for _ in range(k)]


def ring_sum(vectors: list[torch.Tensor], idx: Iterable[int]) -> torch.Tensor:
    total = torch.zeros_like(vectors[0])
    for i in idx:
        total += vectors[i]  # torch integer addition wraps: the ring sum
    return total


def positions(run: mpc.GroupRun) -> list[int]:
    """Each driver index's position in the sorted member list (the chunk it reduces)."""
    return [m.members.index(m.id) for m in run.members]


def expected_outcome(
    k: int, t: int, dropped: dict[int, str], position: list[int]
) -> tuple[int, ...] | None:
    """The counted members per the documented rules (complete graph), or None for an abort.

    Chunk j is reduced by positions j and j + 1 (both hold every member's slice of it); a
    member gone after its input is counted iff every chunk keeps a live reducer and every other
    member is counted (it cannot reveal pair seeds); a member gone after its receipt (no view),
    its view (no reveal) or before its chunk sums is recovered from while at least t views came
    and the others can do without what it withheld.
    """
    sent_input = {i for i in range(k) if dropped.get(i) != "input"}
    live = {i for i in range(k) if dropped.get(i) not in ("input", "unmasking")}
    live_pos = {position[i] for i in live}
    covered = all(j in live_pos or (j + 1) % k in live_pos for j in range(k))
    counted = set(range(k)) if covered and len(sent_input) == k else set(live)
    if len(counted) < t or len(live) < t:
        return None
    if len([i for i in live if dropped.get(i) != "view"]) < t:
        return None  # fewer than t views: nothing is revealed
    no_reveal = {i for i in live if dropped.get(i) in ("view", "reveal")}
    if len(live - no_reveal) < t:
        return None  # too few shares to rebuild the self masks
    if counted != set(range(k)) and no_reveal & counted:
        return None  # its pair seeds with a dropped member (and its reassigned slices) are missing
    active = {position[i] for i in live if dropped.get(i) not in ("view", "reveal", "aggregate")}
    for j in range(k):
        own = [p for p in (j, (j + 1) % k) if p in live_pos]
        reducers = own or [next(p % k for p in range(j, j + k) if p % k in live_pos)]
        if not active & set(reducers):
            return None  # no reducer of chunk j sends its sum
    return tuple(sorted(counted))


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[int, int, int, int, dict[int, str]]:
    k = draw(st.integers(2, 16))
    t = draw(st.integers(k // 2 + 1, k))
    d = draw(st.sampled_from([0, 1, 3, k - 1, k, 2 * k + 1, 37]))
    bits = draw(st.sampled_from([32, 64]))
    dropped = draw(st.dictionaries(st.integers(0, k - 1), st.sampled_from(STAGES), max_size=k))
    return k, t, d, bits, dropped


@settings(max_examples=60, deadline=None)
@given(scenarios(), st.integers(0, 2**16))
def test_ring_sum_is_exact_under_dropouts(
    scenario: tuple[int, int, int, int, dict[int, str]], seed: int
) -> None:
    k, t, d, bits, dropped = scenario
    vectors = ring_vectors(k, d, bits, seed)
    ids = seed.to_bytes(4, "big")
    run = run_group(vectors, threshold=t, dropped=dropped, seed=ids)
    expected = expected_outcome(k, t, dropped, positions(run))
    if expected is None:
        assert run.ring_sum is None and run.aborted
        with pytest.raises(mpc.AggregationAborted):
            mpc.secure_sum_ring(vectors, threshold=t, dropped=dropped, seed=ids)
        return
    assert run.counted == expected
    assert run.ring_sum is not None
    assert torch.equal(run.ring_sum, ring_sum(vectors, expected))


@settings(max_examples=30, deadline=None)
@given(
    st.integers(2, 12),
    st.integers(1, 40),
    st.dictionaries(st.integers(0, 11), st.sampled_from(STAGES), max_size=3),
    st.integers(0, 2**16),
)
def test_float_sum_within_the_scale(k: int, d: int, dropped: dict[int, str], seed: int) -> None:
    dropped = {i: s for i, s in dropped.items() if i < k}
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(d, generator=g, dtype=torch.float64) * 100 for _ in range(k)]
    t = k // 2 + 1
    scale = 2.0**16
    ids = seed.to_bytes(4, "big")
    layout = run_group([torch.zeros(0, dtype=torch.int64)] * k, threshold=t, seed=ids)
    expected = expected_outcome(k, t, dropped, positions(layout))
    if expected is None:
        with pytest.raises(mpc.AggregationAborted):
            mpc.secure_sum(xs, threshold=t, dropped=dropped, scale=scale, seed=ids)
        return
    got = mpc.secure_sum(xs, threshold=t, dropped=dropped, scale=scale, seed=ids)
    true = sum((xs[i] for i in expected), torch.zeros(d, dtype=torch.float64))
    assert float((got - true).abs().max()) <= len(expected) * 0.5 / scale


def test_k8_d1e6_decodes_to_the_true_mean() -> None:
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(1_000_000, generator=g) for _ in range(8)]
    scale = 2.0**20
    total = mpc.secure_sum(xs, threshold=6, scale=scale)
    true_mean = torch.stack([x.double() for x in xs]).mean(0)
    assert float((total / 8 - true_mean).abs().max()) <= 0.5 / scale


@settings(max_examples=25, deadline=None)
@given(
    st.integers(6, 20),
    st.integers(2, 6),
    st.dictionaries(st.integers(0, 19), st.sampled_from(STAGES), max_size=3),
    st.integers(0, 2**16),
)
def test_secagg_plus_sum_is_exact(k: int, degree: int, dropped: dict[int, str], seed: int) -> None:
    dropped = {i: s for i, s in dropped.items() if i < k}
    t = k // 2 + 1
    vectors = ring_vectors(k, 23, 64, seed)
    run = run_group(vectors, threshold=t, dropped=dropped, degree=degree)
    live = [i for i in range(k) if i not in dropped]
    if not dropped:
        assert run.counted == tuple(range(k))
    if len(live) < t:
        assert run.ring_sum is None
    if run.ring_sum is None:
        assert run.aborted
        return
    assert set(live) - set(run.self_aborted) <= set(run.counted)
    assert torch.equal(run.ring_sum, ring_sum(vectors, run.counted))


def pump(members: list[mpc.Member]) -> list[tuple[bytes, bytes, mpc.Message]]:
    """Deliver every message in FIFO order (no dropouts); return what was delivered."""
    by_id = {m.id: m for m in members}
    queue = [(m.id, r, msg) for m in members for r, msg in m.start()]
    log = []
    while queue:
        sender, recipient, msg = queue.pop(0)
        log.append((sender, recipient, msg))
        queue += [(recipient, r, out) for r, out in by_id[recipient].receive(sender, msg)]
    return log


def test_secagg_plus_masks_and_shares_only_with_neighbours() -> None:
    k = 16
    keys = [bytes([i + 1]) * 32 for i in range(k)]
    ids = [bytes(nacl.signing.SigningKey(s).verify_key) for s in keys]
    vectors = ring_vectors(k, 10, 64, 1)
    members = [
        mpc.Member(keys[i], ids, group=b"g", round=3, vector=vectors[i], threshold=9, degree=4)
        for i in range(k)
    ]
    log = pump(members)
    graph = mpc.mask_graph(ids, degree=4, seed=members[0]._graph_seed)
    assert all(len(n) == 4 for n in graph.values())
    inputs = [(s, r, msg) for s, r, msg in log if isinstance(msg, mpc.Input)]
    assert len(inputs) == k * (k - 1)  # every reducer gets every chunk of its own
    for sender, recipient, msg in inputs:
        assert bool(msg.sealed) == (recipient in graph[sender])  # shares only to neighbours
    assert all(m.local_threshold == math.ceil(2 * 5 / 3) for m in members)
    assert all(torch.equal(m.output(), ring_sum(vectors, range(k))) for m in members)


def test_too_few_views_abort_with_nothing_revealed() -> None:
    vectors = ring_vectors(6, 12, 64, 3)
    with pytest.raises(mpc.AggregationAborted):
        mpc.secure_sum_ring(vectors, threshold=5, dropped={2: "view", 4: "view"})
    run = run_group(vectors, threshold=5, dropped={2: "view", 4: "view"}, seed=b"v")
    assert run.aborted and "share this view" in run.aborted
    assert all(m.revealed == {} for m in run.members)


@pytest.mark.parametrize("stage", ["view", "reveal", "aggregate"])
@pytest.mark.parametrize("k", [3, 5, 8, 16])
def test_a_drop_after_the_view_is_recovered_from(stage: str, k: int) -> None:
    """Gone after its receipt (no view), after its view (no reveal), or before its chunk sums:
    the other reducer of each of its two chunks sends the sums, and its input still counts (its
    self mask is rebuilt from shares)."""
    vectors = ring_vectors(k, 3 * k + 1, 64, k)
    t = k // 2 + 1
    for gone in range(k):
        run = run_group(vectors, threshold=t, dropped={gone: stage}, seed=bytes([k, gone]))
        assert run.aborted is None, run.aborted
        assert run.counted == tuple(range(k))
        assert run.ring_sum is not None
        assert torch.equal(run.ring_sum, ring_sum(vectors, range(k)))
        assert all(m.finished for i, m in enumerate(run.members) if i != gone)
        assert all(m.recovered for i, m in enumerate(run.members) if i != gone)
    healthy = run_group(vectors, threshold=t, seed=bytes([k]))
    assert not any(m.recovered for m in healthy.members)


def test_two_neighbours_gone_after_the_view_lose_a_chunk() -> None:
    vectors = ring_vectors(6, 12, 64, 5)
    run = run_group(vectors, threshold=4, dropped={0: "aggregate", 1: "aggregate"}, seed=b"x")
    by_position = sorted(range(6), key=lambda i: positions(run)[i])
    run = run_group(
        vectors,
        threshold=4,
        dropped={by_position[2]: "aggregate", by_position[3]: "aggregate"},
        seed=b"x",
    )
    assert run.ring_sum is None and run.aborted and "never arrived" in run.aborted


def test_below_threshold_aborts_with_nothing_revealed() -> None:
    vectors = ring_vectors(7, 12, 64, 4)
    run = run_group(vectors, threshold=5, dropped={0: "unmasking", 3: "input", 4: "unmasking"})
    assert run.ring_sum is None and run.aborted and "threshold" in run.aborted
    for m in run.members:
        assert m.revealed == {}
        assert not m._reveals
    with pytest.raises(mpc.AggregationAborted):
        run.members[1].output()


def test_survivor_rules() -> None:
    ids = [bytes([i]) * 32 for i in range(5)]
    everyone = frozenset(ids)
    nbrs = {m: everyone - {m} for m in ids}
    # ids[1] dropped after its masked input: ids[2] holds the replica of its chunk, counted
    receipts = {m: ReceiptView(everyone) for m in ids if m != ids[1]}
    assert counted_set(ids, receipts, nbrs) == everyone
    # two members gone after their inputs, not next to each other: both still counted
    receipts = {m: ReceiptView(everyone) for m in ids if m not in (ids[1], ids[3])}
    assert counted_set(ids, receipts, nbrs) == everyone
    # next to each other: chunk 1 lost both reducers, so neither dead member can be counted
    receipts = {m: ReceiptView(everyone) for m in ids if m not in (ids[1], ids[2])}
    assert counted_set(ids, receipts, nbrs) == everyone - {ids[1], ids[2]}
    # one live reducer missed ids[3]'s input: ids[3] is not counted
    receipts = {m: ReceiptView(everyone - ({ids[3]} if m == ids[0] else set())) for m in ids}
    assert counted_set(ids, receipts, nbrs) == everyone - {ids[3]}
    # ids[1] is gone but replicated, and ids[3] is dropped: ids[1] could not reveal its seed
    # with ids[3], so it is not counted either
    receipts = {
        m: ReceiptView(everyone - ({ids[3]} if m == ids[0] else set())) for m in ids if m != ids[1]
    }
    assert counted_set(ids, receipts, nbrs) == everyone - {ids[1], ids[3]}
    # ... unless ids[3] is not its neighbour (SecAgg+)
    sparse = dict(nbrs)
    sparse[ids[1]] = frozenset({ids[0], ids[2]})
    assert counted_set(ids, receipts, sparse) == everyone - {ids[3]}
    # removing a dead member can break the rule for another dead one (applied to a fixed point)
    chain = {m: frozenset() for m in ids}
    for a, b in ((ids[0], ids[2]), (ids[2], ids[4])):
        chain[a] = chain[a] | {b}
        chain[b] = chain[b] | {a}
    # (ids[0] and ids[2] are gone; ids[1] missed ids[4]'s input: ids[2] falls, then ids[0])
    receipts = {
        m: ReceiptView(everyone - ({ids[4]} if m == ids[1] else set()))
        for m in ids
        if m not in (ids[0], ids[2])
    }
    assert counted_set(ids, receipts, chain) == everyone - {ids[0], ids[2], ids[4]}
    assert fallback_reducer(1, ids, {ids[0], ids[3]}) == ids[3]
    assert fallback_reducer(4, ids, {ids[0], ids[3]}) == ids[0]
    assert chunk_reducers(1, ids, {ids[0], ids[3]}) == (ids[3],)
    assert chunk_reducers(2, ids, {ids[0], ids[3]}) == (ids[3],)
    assert chunk_reducers(3, ids, {ids[0], ids[3]}) == (ids[3],)
    assert chunk_reducers(4, ids, {ids[0], ids[3], ids[4]}) == (ids[4], ids[0])
    assert chunk_bounds(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert chunk_bounds(2, 3) == [(0, 1), (1, 2), (2, 2)]


def test_messages_are_tagged_frozen_and_marked() -> None:
    assert all(tag.startswith("secagg.") for tag in MESSAGE_TYPES)
    secret = {tag for tag, cls in MESSAGE_TYPES.items() if cls.SECRET}
    assert secret == {"secagg.reveal"}
    msg = mpc.Receipt(b"g", 1, ())
    with pytest.raises(AttributeError):
        msg.round = 2  # type: ignore[misc]


def test_messages_cross_the_p2p_codec() -> None:
    codec = pytest.importorskip("floor.codec")
    for cls in MESSAGE_TYPES.values():
        codec.schema_check(cls)
    replica = torch.arange(3, dtype=torch.int64)
    msg = mpc.Input(b"g", 1, 2, torch.arange(5, dtype=torch.int64), b"sealed", b"c" * 32, replica)
    back = codec.decode_body_as(mpc.Input, codec.encode_body(msg))
    assert back.sealed == msg.sealed and torch.equal(back.data, msg.data)
    assert torch.equal(back.replica, replica)
    reveal = mpc.Reveal(b"g", 1, {b"a" * 32: b"y" * 66}, {b"b" * 32: b"s" * 32})
    assert codec.decode_body_as(mpc.Reveal, codec.encode_body(reveal)) == reveal


def test_exported_members() -> None:
    for name in mpc.__all__:
        assert hasattr(mpc, name), name
    assert {"Member", "Stage", "secure_sum", "secure_sum_ring", "AggregationAborted"} <= set(
        mpc.__all__
    )
    from floor.errors import AggregationAborted

    assert mpc.AggregationAborted is AggregationAborted


class _Net:
    """Members exchanging messages in FIFO order; ``hold`` keeps some back, ``gone`` members
    neither send nor receive."""

    def __init__(self, members: list[mpc.Member], hold: Callable[..., bool], gone=()) -> None:
        self.by_id = {m.id: m for m in members}
        self.hold, self.gone = hold, set(gone)
        self.held: list[tuple[bytes, bytes, mpc.Message]] = []
        self.queue: list[tuple[bytes, bytes, mpc.Message]] = []
        for m in members:
            self.send(m.id, m.start() if m.id not in self.gone else [])

    def send(self, sender: bytes, out: list[tuple[bytes, mpc.Message]]) -> None:
        self.queue += [(sender, r, msg) for r, msg in out]
        while self.queue:
            s, r, msg = self.queue.pop(0)
            if s in self.gone or r in self.gone:
                continue
            if self.hold(s, r, msg):
                self.held.append((s, r, msg))
                continue
            self.queue += [(r, to, m) for to, m in self.by_id[r].receive(s, msg)]

    def deadline(self) -> None:
        """Every live member's current stage ends (its deadline passed)."""
        for m in self.by_id.values():
            if m.id not in self.gone and not m.finished:
                self.send(m.id, m.advance())


def _members(k: int, threshold: int) -> list[mpc.Member]:
    keys = [bytes([i + 1]) * 32 for i in range(k)]
    by_id = {bytes(nacl.signing.SigningKey(s).verify_key): s for s in keys}
    ids = sorted(by_id)
    vectors = ring_vectors(k, 12, 64, 5)
    return [
        mpc.Member(by_id[m], ids, group=b"g", round=1, vector=vectors[i], threshold=threshold)
        for i, m in enumerate(ids)
    ]


def test_can_advance_says_whether_closing_a_stage_early_would_go_on() -> None:
    """A soft deadline (``gossip.allreduce``) closes a stage early only when the member could go
    on: enough equal views, and every share and pair seed it needs to unmask."""
    members = _members(4, 3)
    a, b, c, _ = members
    # VIEW: a holds its own view and one other; the threshold is 3
    net = _Net(members, lambda s, r, m: r == a.id and s in (b.id, c.id) and type(m) is mpc.View)
    assert a.stage is mpc.Stage.VIEW and not a.can_advance()
    s, _, view = net.held[0]
    a.receive(s, view)
    assert a.stage is mpc.Stage.VIEW and a.can_advance()  # 3 equal views: it may close now
    # UNMASKING: the last member never sends its input (it left: a neighbour of every counted
    # member, so each counted member must reveal its pair seed with it); a lacks b's reveal
    members = _members(4, 3)
    a, b, _, gone = members
    net = _Net(
        members,
        lambda s, r, m: r == a.id and s == b.id and type(m) is mpc.Reveal,
        gone=[gone.id],
    )
    while a.stage < mpc.Stage.UNMASKING:  # the drop shows at each deadline
        net.deadline()
    assert a.stage is mpc.Stage.UNMASKING
    # b's reveal carries a share of every counted seed and b's pair seed with the gone member
    assert gone.id in a._dropped and not a.can_advance()
    a.advance()  # closing now does abort, as can_advance said
    assert a.stage is mpc.Stage.ABORTED
    # with b's reveal it could go on
    members = _members(4, 3)
    a, b, _, gone = members
    net = _Net(members, lambda s, r, m: False, gone=[gone.id])
    while not a.finished:
        if a.stage is mpc.Stage.UNMASKING:
            assert a.can_advance()
        net.deadline()
    assert a.stage is mpc.Stage.DONE
