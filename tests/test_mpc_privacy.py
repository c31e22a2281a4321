"""Privacy and refusals of the secure-aggregation protocol.

Masked inputs look uniform; a member never reveals both shares of one peer; forged, duplicate,
out-of-stage and inconsistent messages are refused with typed errors.
"""

from __future__ import annotations

from collections.abc import Callable

import nacl.signing
import pytest
import torch
from scipy.stats import chisquare

import mpc
from floor.errors import (
    BadSeal,
    DuplicateMessage,
    InconsistentMessage,
    MalformedMessage,
    OutOfStage,
    UnknownMessageType,
)
from mpc.driver import run_group

Held = list[tuple[bytes, bytes, mpc.Message]]


def make_group(
    k: int, *, d: int = 12, bits: int = 64, threshold: int | None = None, seed: int = 0
) -> tuple[list[mpc.Member], list[nacl.signing.SigningKey], list[torch.Tensor]]:
    keys = [nacl.signing.SigningKey(bytes([seed, i + 1]) * 16) for i in range(k)]
    ids = [bytes(s.verify_key) for s in keys]
    dtype = torch.int32 if bits == 32 else torch.int64
    vectors = [torch.full((d,), 1000 * (i + 1), dtype=dtype) for i in range(k)]
    members = [
        mpc.Member(keys[i], ids, group=b"group", round=5, vector=vectors[i], threshold=threshold)
        for i in range(k)
    ]
    return sorted_by_id(members, keys, vectors)


def sorted_by_id(
    members: list[mpc.Member], keys: list[nacl.signing.SigningKey], vectors: list[torch.Tensor]
) -> tuple[list[mpc.Member], list[nacl.signing.SigningKey], list[torch.Tensor]]:
    order = sorted(range(len(members)), key=lambda i: members[i].id)
    return [members[i] for i in order], [keys[i] for i in order], [vectors[i] for i in order]


def pump(
    members: list[mpc.Member],
    *,
    hold: Callable[[bytes, bytes, mpc.Message], bool] = lambda s, r, m: False,
    start: bool = True,
    queue: Held | None = None,
) -> Held:
    """Deliver messages FIFO; messages for which ``hold`` is true are returned instead."""
    by_id = {m.id: m for m in members}
    queue = list(queue or [])
    if start:
        queue += [(m.id, r, msg) for m in members for r, msg in m.start()]
    held: Held = []
    while queue:
        sender, recipient, msg = queue.pop(0)
        if hold(sender, recipient, msg):
            held.append((sender, recipient, msg))
            continue
        out = by_id[recipient].receive(sender, msg)
        queue += [(recipient, r, o) for r, o in out]
    return held


# ---------------------------------------------------------------- masked inputs look uniform


def masked_chunks_of_member0(runs: int, *, d: int, k: int = 3) -> torch.Tensor:
    """What reducer 1 sees of member 0's input (a constant vector), over ``runs`` fresh rounds."""
    seen = []
    for r in range(runs):
        members, _, _ = make_group(k, d=d, bits=32, seed=r % 250)
        zero, one = members[0].id, members[1].id
        log: Held = []

        def spy(s: bytes, rcp: bytes, m: mpc.Message, log: Held = log) -> bool:
            if isinstance(m, mpc.Input) and s == zero and rcp == one and m.chunk == 1:
                log.append((s, rcp, m))
            return False

        pump(members, hold=spy)
        (_, _, msg) = log[0]
        assert isinstance(msg, mpc.Input)
        seen.append(msg.data)
    return torch.cat(seen)


def uniformity_pvalues(values: torch.Tensor) -> tuple[float, float]:
    """Chi-square p-values of the top 4 bits (16 bins) and the low byte (256 bins) of int32s."""
    v = values.to(torch.int64) & 0xFFFFFFFF
    top = torch.bincount(v >> 28, minlength=16).double().numpy()
    low = torch.bincount(v & 0xFF, minlength=256).double().numpy()
    return float(chisquare(top).pvalue), float(chisquare(low).pvalue)


def test_a_masked_input_is_indistinguishable_from_uniform() -> None:
    values = masked_chunks_of_member0(64, d=96)  # 64 rounds x 32 elements
    assert values.numel() == 64 * 32
    p_top, p_low = uniformity_pvalues(values)
    assert p_top > 1e-6 and p_low > 1e-6
    # the same test rejects the unmasked input (a constant), so it can fail
    p_top, p_low = uniformity_pvalues(torch.full((2048,), 1000, dtype=torch.int32))
    assert p_top < 1e-6 and p_low < 1e-6


# ---------------------------------------------------------------- never both shares of a peer


def test_a_receipt_asking_for_the_other_share_kind_is_refused_and_never_answered() -> None:
    vectors = [torch.arange(10, dtype=torch.int64) * (i + 1) for i in range(5)]
    run = run_group(vectors, threshold=3, dropped={4: "unmasking"}, seed=b"both")
    assert run.counted == (0, 1, 2, 3, 4)  # member 4 was counted through its backup
    member, late = run.members[0], run.members[4]
    ids = [m.id for m in run.members]
    assert member.revealed[ids[2]] == "b"
    # A late receipt from member 4 that lacks member 2 would make member 2 "dropped" (pair seed)
    forged = mpc.Receipt(member.group, member.round, tuple(sorted(set(ids) - {ids[2]})))
    with pytest.raises(InconsistentMessage, match="both"):
        member.receive(late.id, forged)
    assert member.revealed[ids[2]] == "b"
    # a late receipt that asks for nothing new is merely too late
    harmless = mpc.Receipt(member.group, member.round, tuple(sorted(ids)))
    with pytest.raises(OutOfStage):
        member.receive(late.id, harmless)


def test_a_reveal_with_both_kinds_for_one_peer_is_refused() -> None:
    members, _, vectors = make_group(4, threshold=3)
    a, b = members[0], members[1]
    # hold b's reveal to a, so that a waits in UNMASKING
    held = pump(members, hold=lambda s, r, m: isinstance(m, mpc.Reveal) and s == b.id and r == a.id)
    assert a.stage is mpc.Stage.UNMASKING and len(held) == 1
    real = held[0][2]
    assert isinstance(real, mpc.Reveal)
    peer, share = next(iter(real.self_mask_shares.items()))
    both = mpc.Reveal(a.group, a.round, {peer: share}, {peer: share})
    with pytest.raises(InconsistentMessage):
        a.receive(b.id, both)
    pump(members, start=False, queue=held)  # the real reveal is still accepted
    expected = sum(vectors, torch.zeros_like(vectors[0]))
    assert a.stage is mpc.Stage.DONE and torch.equal(a.output(), expected)
    # and every member revealed exactly one kind per peer
    assert all(set(m.revealed.values()) == {"b"} for m in members)


# ---------------------------------------------------------------- refusals


def test_forged_and_misdirected_shares_are_refused() -> None:
    members, keys, _ = make_group(3)
    a, b = members[0], members[1]
    a.start()
    real = next(m for r, m in b.start() if r == a.id)
    assert isinstance(real, mpc.Input) and real.sealed
    g, rd = real.group, real.round

    def resealed(sealed: bytes) -> mpc.Input:
        return mpc.Input(g, rd, real.chunk, real.data, sealed, real.commitments, real.replica)

    tampered = bytearray(real.sealed)
    tampered[-1] ^= 1
    with pytest.raises(BadSeal):  # a flipped bit
        a.receive(b.id, resealed(bytes(tampered)))
    with pytest.raises(BadSeal):  # no share from a neighbour
        a.receive(b.id, resealed(b""))
    root = mpc.pair_root(keys[1], a.id)
    share = b"\x01" * mpc.SHARE_BYTES
    for rnd, sender, recipient in ((6, b.id, a.id), (rd, a.id, b.id)):
        # sealed for another round, or in the other direction of the pair
        key = mpc.pair_keys(root, round=rnd, group=g, a=sender, b=recipient)[1]
        sealed = mpc.seal_with(key, share, round=rnd, group=g, sender=sender, recipient=recipient)
        with pytest.raises(BadSeal):
            a.receive(b.id, resealed(sealed))
    stranger = nacl.signing.SigningKey(b"\x07" * 32)  # sealed by someone else to a
    key = mpc.pair_keys(mpc.pair_root(stranger, a.id), round=rd, group=g, a=b.id, b=a.id)[1]
    with pytest.raises(BadSeal):
        a.receive(
            b.id,
            resealed(mpc.seal_with(key, share, round=rd, group=g, sender=b.id, recipient=a.id)),
        )
    with pytest.raises(InconsistentMessage):  # for another round
        a.receive(
            b.id,
            mpc.Input(g, 6, real.chunk, real.data, real.sealed, real.commitments, real.replica),
        )
    # refusals change nothing: the real one is still accepted, a second copy is a duplicate
    assert a.receive(b.id, real) == []
    with pytest.raises(DuplicateMessage):
        a.receive(b.id, real)


def test_a_share_from_a_non_neighbour_is_refused() -> None:
    k = 8
    keys = [nacl.signing.SigningKey(bytes([9, i + 1]) * 16) for i in range(k)]
    ids = [bytes(s.verify_key) for s in keys]
    vec = torch.zeros(16, dtype=torch.int64)
    members = [
        mpc.Member(keys[i], ids, group=b"g", round=1, vector=vec, threshold=5, degree=3)
        for i in range(k)
    ]
    a = members[0]
    stranger = next(m for m in members[1:] if m.id not in a._graph[a.id])
    real = next(m for r, m in stranger.start() if r == a.id)
    assert isinstance(real, mpc.Input) and real.sealed == b""
    a.start()
    with pytest.raises(InconsistentMessage, match="neighbour"):
        a.receive(
            stranger.id,
            mpc.Input(
                real.group, 1, real.chunk, real.data, b"x" * 80, real.commitments, real.replica
            ),
        )
    assert a.receive(stranger.id, real) == []


def test_out_of_stage_duplicate_and_inconsistent_messages_are_refused() -> None:
    members, _, _ = make_group(4, threshold=3)
    a, late = members[0], members[3]
    # a never hears late's input in time: its deadline passes
    held = pump(members, hold=lambda s, r, m: s == late.id and r == a.id)
    assert a.stage is mpc.Stage.INPUT
    a.advance()
    assert a.stage > mpc.Stage.INPUT
    given = next(m for s, r, m in held if isinstance(m, mpc.Input))
    with pytest.raises(OutOfStage):
        a.receive(late.id, given)
    # not a member; a member posing as itself; a foreign object
    outsider = bytes(nacl.signing.SigningKey(b"\x05" * 32).verify_key)
    with pytest.raises(InconsistentMessage):
        a.receive(outsider, given)
    with pytest.raises(InconsistentMessage):
        a.receive(a.id, given)
    with pytest.raises(UnknownMessageType):
        a.receive(late.id, object())  # type: ignore[arg-type]


def test_bad_chunks_are_refused() -> None:
    members, _, _ = make_group(3, d=9)
    a, b = members[0], members[1]
    # stop b's input to a, so that a waits in INPUT
    held = pump(members, hold=lambda s, r, m: isinstance(m, mpc.Input) and s == b.id and r == a.id)
    assert a.stage is mpc.Stage.INPUT
    real = next(m for s, r, m in held if isinstance(m, mpc.Input) and m.chunk == 0)
    assert isinstance(real, mpc.Input)
    g, rd = a.group, a.round
    with pytest.raises(InconsistentMessage):  # too short
        a.receive(
            b.id, mpc.Input(g, rd, 0, real.data[:-1], real.sealed, real.commitments, real.replica)
        )
    with pytest.raises(MalformedMessage):  # wrong ring
        a.receive(
            b.id,
            mpc.Input(
                g, rd, 0, real.data.to(torch.int32), real.sealed, real.commitments, real.replica
            ),
        )
    with pytest.raises(InconsistentMessage):  # a chunk a does not reduce
        a.receive(b.id, mpc.Input(g, rd, 2, real.data, real.sealed, real.commitments, real.replica))
    with pytest.raises(InconsistentMessage):  # no such chunk
        a.receive(
            b.id, mpc.Input(g, rd, 99, real.data, real.sealed, real.commitments, real.replica)
        )
    with pytest.raises(InconsistentMessage):  # a replica of the wrong length
        short = real.data[:-1]
        a.receive(b.id, mpc.Input(g, rd, 0, real.data, real.sealed, real.commitments, short))
    with pytest.raises(InconsistentMessage):  # a future-stage message is checked before buffering
        a.receive(b.id, mpc.ChunkSum(g, rd, 3, real.data, bytes(32)))
    with pytest.raises(InconsistentMessage):
        a.receive(b.id, mpc.ChunkSum(g, rd, 1, torch.zeros(50, dtype=real.data.dtype), bytes(32)))
    queue = [(a.id, r, m) for r, m in a.receive(b.id, real)]  # accepted
    with pytest.raises(DuplicateMessage):
        a.receive(b.id, real)
    pump(members, start=False, queue=queue + [h for h in held if h[2] is not real])
    assert all(m.stage is mpc.Stage.DONE for m in members)


def test_a_chunk_sum_over_another_counted_set_is_refused() -> None:
    members, _, _ = make_group(3, d=9)
    a, b = members[0], members[1]
    held = pump(
        members, hold=lambda s, r, m: isinstance(m, mpc.ChunkSum) and s == b.id and r == a.id
    )
    assert a.stage is mpc.Stage.AGGREGATE and len(held) == 2  # b reduces two chunks
    real = held[0][2]
    assert isinstance(real, mpc.ChunkSum)
    other = mpc.ChunkSum(real.group, real.round, real.chunk, real.data, bytes(32))
    with pytest.raises(InconsistentMessage, match="another set"):
        a.receive(b.id, other)
    assert a.stage is mpc.Stage.AGGREGATE
    pump(members, start=False, queue=held)
    assert a.stage is mpc.Stage.DONE


# ---------------------------------------------------------------- the view check


def run_round(
    members: list[mpc.Member],
    *,
    route: Callable[[bytes, bytes, mpc.Message], mpc.Message | None] = lambda s, r, m: m,
    silent: frozenset[bytes] = frozenset(),
) -> Held:
    """Deliver FIFO; ``route`` may change a message or drop it (None); ``silent`` members get
    nothing. When nothing is in flight, the running members at the earliest stage have their
    deadline pass (``advance()``), as in the in-memory driver. Returns what was delivered."""
    by_id = {m.id: m for m in members}
    queue: Held = [(m.id, r, msg) for m in members for r, msg in m.start()]
    delivered: Held = []
    for _ in range(20):
        while queue:
            sender, recipient, original = queue.pop(0)
            msg = route(sender, recipient, original)
            if msg is None or recipient in silent or by_id[recipient].finished:
                continue
            delivered.append((sender, recipient, msg))
            queue += [(recipient, r, o) for r, o in by_id[recipient].receive(sender, msg)]
        waiting = [m for m in members if m.id not in silent and not m.finished]
        if not waiting:
            break
        earliest = min(m.stage for m in waiting)
        for m in waiting:
            if m.stage == earliest:
                queue += [(m.id, r, o) for r, o in m.advance()]
    return delivered


def run_with_equivocation(members: list[mpc.Member], liar: int, victim: int, fooled: int) -> Held:
    """Run the round while ``liar`` tells ``fooled`` that ``victim``'s chunk never came."""
    ids = [m.id for m in members]

    def route(sender: bytes, recipient: bytes, msg: mpc.Message) -> mpc.Message:
        if sender == ids[liar] and recipient == ids[fooled] and isinstance(msg, mpc.Receipt):
            received = tuple(x for x in msg.received if x != ids[victim])
            return mpc.Receipt(msg.group, msg.round, received)
        return msg

    return run_round(members, route=route)


def test_members_with_different_receipts_reveal_nothing() -> None:
    members, _, _ = make_group(3, threshold=2)
    victim, fooled, liar = 0, 1, 2
    delivered = run_with_equivocation(members, liar, victim, fooled)
    # the attack's precondition: the two honest members computed different counted sets
    assert members[victim].counted != members[fooled].counted
    b_of: set[bytes] = set()
    s_of: set[bytes] = set()
    for _, _, msg in delivered:
        if isinstance(msg, mpc.Reveal):
            b_of |= set(msg.self_mask_shares)
            s_of |= set(msg.pair_seeds)
    for m in members:
        b_of |= {u for u, kind in m.revealed.items() if kind == "b"}
        s_of |= {u for u, kind in m.revealed.items() if kind == "s"}
    assert not b_of & s_of  # no peer has both a share and a seed revealed by anyone
    for honest in (members[victim], members[fooled]):
        assert honest.stage is mpc.Stage.ABORTED
        assert "disagree" in (honest.abort_reason or "")
        assert honest.revealed == {} and not honest._held
    assert (b"group", 5) not in mpc.state._COMBINED


def split_brain(m: int) -> tuple[list[mpc.Member], dict[bytes, str]]:
    """k = 8, t = 6: ``m`` equivocating members tell half of the honest members (B) that the
    victim's input never came, and show each half a view equal to its own; the network drops
    every view between the halves. Returns the members and, per peer, the kinds of secret
    honest members revealed about it ("b", "s" or "bs")."""
    k = 8
    members, _, _ = make_group(k, threshold=6, seed=9)
    ids = [x.id for x in members]
    liars = set(ids[k - m :])
    honest = ids[: k - m]
    victim = honest[0]
    half_a = set(honest[: (len(honest) + 1) // 2])
    half_b = set(honest) - half_a
    by_id = {x.id: x for x in members}
    everyone = frozenset(ids)

    def route(sender: bytes, recipient: bytes, msg: mpc.Message) -> mpc.Message | None:
        if sender in liars and recipient in half_b:
            if isinstance(msg, mpc.Receipt):
                received = tuple(x for x in msg.received if x != victim)
                return mpc.Receipt(msg.group, msg.round, received)
            if isinstance(msg, mpc.View):  # the view B computes: the victim dropped
                fooled = by_id[recipient]
                digest = fooled._view_digest_of(everyone - {victim}, frozenset({victim}))
                return mpc.View(msg.group, msg.round, digest)
        late = isinstance(msg, mpc.View | mpc.Reveal | mpc.ChunkSum)
        if late and {sender, recipient} & half_a and {sender, recipient} & half_b:
            return None  # the network keeps the halves apart from the views on
        return msg

    run_round(members, route=route)
    kinds: dict[bytes, str] = {}
    for x in members:
        if x.id in liars:
            continue
        for peer, kind in x.revealed.items():
            kinds[peer] = "".join(sorted(set(kinds.get(peer, "")) | {kind}))
    return members, kinds


def test_fewer_than_2t_minus_k_equivocators_never_get_both_kinds_for_a_peer() -> None:
    """3 equivocators in a group of 8 with t = 6 (2t - k = 4), views between the honest halves
    lost: one half gathers its quorum and reveals, the other cannot and reveals nothing."""
    members, kinds = split_brain(3)
    assert kinds, "the half with a quorum revealed"
    assert all(len(kind) == 1 for kind in kinds.values())
    fooled = members[3:5]
    assert all(x.stage is mpc.Stage.ABORTED and x.revealed == {} for x in fooled)
    assert all("share this view" in (x.abort_reason or "") for x in fooled)


def test_the_equivocation_bound_is_tight() -> None:
    """With 2t - k = 4 equivocators both halves gather t views and act on different counted
    sets: the victim gets both its self-mask shares and its pair seeds revealed (the bound
    in docs/THREAT_MODEL.md is exactly this)."""
    members, kinds = split_brain(4)
    victim = members[0].id
    assert kinds[victim] == "bs"


def test_bad_and_late_views_are_refused() -> None:
    members, _, _ = make_group(3)
    a, b = members[0], members[1]
    held = pump(members, hold=lambda s, r, m: isinstance(m, mpc.View) and s == b.id and r == a.id)
    assert a.stage is mpc.Stage.VIEW and len(held) == 1
    real = held[0][2]
    assert isinstance(real, mpc.View)
    with pytest.raises(MalformedMessage):
        a.receive(b.id, mpc.View(real.group, real.round, b"\x01"))
    with pytest.raises(InconsistentMessage):  # another round's view
        a.receive(b.id, mpc.View(real.group, 6, real.digest))
    assert a.stage is mpc.Stage.VIEW and a.revealed == {}
    pump(members, start=False, queue=held)
    assert all(m.stage is mpc.Stage.DONE for m in members)
    # a view with another digest after the member revealed: refused, nothing changes
    before = a.revealed
    with pytest.raises((OutOfStage, DuplicateMessage)):
        a.receive(b.id, mpc.View(real.group, real.round, bytes(32)))
    assert a.revealed == before and a.stage is mpc.Stage.DONE


def test_the_view_digest_binds_sets_round_and_group() -> None:
    members, keys, _ = make_group(3)
    m, ids = members[0], [x.id for x in members]
    c = frozenset(ids)
    digest = m._view_digest_of(c, frozenset())
    assert digest != m._view_digest_of(c - {m.id}, frozenset({m.id}))
    for group, rnd in ((b"group", 6), (b"other", 5)):
        twin = mpc.Member(keys[0], ids, group=group, round=rnd, vector=m._x)
        assert twin._view_digest_of(c, frozenset()) != digest


def test_a_conflicting_view_aborts_before_revealing() -> None:
    members, _, _ = make_group(3)
    a, b = members[0], members[1]
    held = pump(members, hold=lambda s, r, m: isinstance(m, mpc.View) and s == b.id and r == a.id)
    assert a.stage is mpc.Stage.VIEW
    a.receive(b.id, mpc.View(b"group", 5, bytes(32)))  # another view
    assert a.stage is mpc.Stage.ABORTED and "disagree" in (a.abort_reason or "")
    assert a.revealed == {} and len(held) == 1


def test_a_missing_view_below_the_threshold_aborts_at_the_deadline() -> None:
    members, _, _ = make_group(3, threshold=3)
    a, b = members[0], members[1]
    pump(members, hold=lambda s, r, m: isinstance(m, mpc.View) and s == b.id and r == a.id)
    assert a.stage is mpc.Stage.VIEW
    assert a.advance() == []
    assert a.stage is mpc.Stage.ABORTED and a.revealed == {}
    assert "share this view" in (a.abort_reason or "")


def test_a_missing_view_is_tolerated_when_t_views_agree() -> None:
    """t matching views are the quorum: a live member whose view never came (gone after its
    receipt, or late) is then treated as gone after its view, and not waited for."""
    members, _, _ = make_group(3)  # t = 2
    a, b = members[0], members[1]
    pump(members, hold=lambda s, r, m: isinstance(m, mpc.View) and s == b.id and r == a.id)
    assert a.stage is mpc.Stage.VIEW
    out = a.advance()
    assert a.stage is not mpc.Stage.ABORTED and a.revealed
    # c's reveal was waiting; b's is not awaited, so a goes on to send its chunk sums at once
    assert {type(msg) for _, msg in out} == {mpc.Reveal, mpc.ChunkSum}
    assert a._quiet == frozenset({b.id})


def test_reveal_repr_hides_shares_and_cancel_forgets() -> None:
    share = b"\xab" * mpc.SHARE_BYTES
    reveal = mpc.Reveal(b"g", 1, {b"\x01" * 32: share}, {b"\x02" * 32: share})
    assert share.hex() not in repr(reveal) and repr(share) not in repr(reveal)
    members, _, _ = make_group(3)
    pump(members, hold=lambda s, r, m: isinstance(m, mpc.Input))
    a = members[0]
    assert a._held and not a.finished
    a.cancel()
    assert a.stage is mpc.Stage.ABORTED and not a._held and a._masked_input is None
    a.cancel()  # no-op once finished
    assert a.abort_reason == "cancelled"


# ---------------------------------------------------------------- what a dropout reveals


def test_a_dropped_members_revealed_pair_seeds_leave_its_self_mask() -> None:
    """A reducer holding a dropped member's chunk learns every pair seed of that member, and
    still holds only ``x + PRG(b)``: the self-mask share of a dropped member is never revealed."""
    members, _, vectors = make_group(5, d=20, threshold=3)
    gone, reducer, missed = members[4], members[0], members[1]

    def route(sender: bytes, recipient: bytes, msg: mpc.Message) -> mpc.Message | None:
        if sender == gone.id and (not isinstance(msg, mpc.Input) or recipient == missed.id):
            return None  # gone's chunk never reaches `missed`, and gone sends nothing else
        return msg

    delivered = run_round(members, route=route, silent=frozenset({gone.id}))
    others = frozenset(m.id for m in members if m is not gone)
    assert all(m.stage is mpc.Stage.DONE and m.counted == others for m in members if m is not gone)
    reveals = [msg for _, _, msg in delivered if isinstance(msg, mpc.Reveal)]
    assert reveals and not any(gone.id in r.self_mask_shares for r in reveals)
    seeds = {s: r.pair_seeds[gone.id] for s, _, r in delivered if isinstance(r, mpc.Reveal)}
    assert set(seeds) == others  # every counted neighbour revealed its seed with `gone`
    # what the reducer of chunk 0 can compute from gone's chunk and every revealed seed
    chunk = reducer._chunks[gone.id].clone()
    lo, hi = reducer._bounds[0]
    me = reducer._index[gone.id]
    plan = [(seed, -1 if me < reducer._index[u] else 1) for u, seed in seeds.items()]
    mpc.add_masks_(chunk, plan, offset=lo)
    x = vectors[members.index(gone)][lo:hi]
    assert not torch.equal(chunk, x)  # still masked...
    mpc.add_masks_(chunk, [(gone._self_seed, -1)], offset=lo)
    assert torch.equal(chunk, x)  # ...by exactly the self mask that nobody revealed
