"""Checked sums: a malicious group member tries to make honest members accept a wrong sum.

The three attacks of issue 21, each played by one member of a real ``mpc.Member`` group (every
other member honest), with the same checks ``gossip.allreduce.SecureGroup`` runs before it
accepts a result (``check_total``):

1. Shamir shares crafted to shift the reconstructed self-mask seed by +1 (they pass the
   length and field checks): refused against the dealer's commitment, the liar is named, and
   the honest shares still give the exact sum;
2. a masked input with 2^62 added (wraps in the ring): the total lies outside what the counted
   inputs can reach: ``SumRejected``;
3. a reducer's wrong chunk sum, by any amount: every chunk has two reducers and a member
   accepts a chunk only when both sums agree, so every honest member aborts (``SumRejected``)
   and the liar's partner reducer names it; a lie told to some members only is refused by
   them while the others accept the true sum. What remains: a chunk whose second reducer is
   gone is unconfirmed (the last test), and a small lie there passes the range checks.

A lying weight slot is caught exactly when weights are public (under DP every weight is 1).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import deque
from collections.abc import Callable

import nacl.signing
import pytest
import torch

import mpc
from floor.errors import ProtocolError, SumRejected
from gossip.allreduce import AllReduceConfig, check_total, encode_contribution
from mpc.messages import ChunkSum, Input, Message, Reveal
from mpc.shamir import PRIME, SHARE_BYTES, _lagrange_at_zero

K = 5
D = 40
CONFIG = AllReduceConfig(bound=10.0, weight=1.0)

Tamper = Callable[[bytes, bytes, Message], Message | None]
"""(sender, recipient, message) -> the message the network delivers (None: nothing)."""


def ident(seed: bytes) -> bytes:
    return bytes(nacl.signing.SigningKey(seed).verify_key)


def keys(k: int = K) -> list[bytes]:
    return [hashlib.sha256(b"integrity%d" % i).digest() for i in range(k)]


def inputs(k: int = K) -> tuple[list[torch.Tensor], float, torch.Tensor]:
    """k contributions in [-1, 1] with weight 1, encoded; the scale; the plain ring sum."""
    gen = torch.Generator().manual_seed(3)
    xs = [torch.rand(D, generator=gen, dtype=torch.float64) * 2 - 1 for _ in range(k)]
    rings, scale = [], 0.0
    for x in xs:
        ring, scale = encode_contribution(x, 1.0, k, CONFIG)
        rings.append(ring)
    total = torch.stack(rings).sum(dim=0)
    return rings, scale, total


def run_group(rings: list[torch.Tensor], tamper: Tamper | None = None) -> list[mpc.Member]:
    seeds = keys(len(rings))
    members = []
    ids = [ident(s) for s in seeds]
    for seed, ring in zip(seeds, rings, strict=True):
        members.append(mpc.Member(seed, ids, group=b"g" * 16, round=7, vector=ring))
    by_id = {m.id: m for m in members}
    queue: deque[tuple[bytes, bytes, Message]] = deque()

    def post(sender: bytes, out: list[tuple[bytes, Message]]) -> None:
        for recipient, msg in out:
            got = msg if tamper is None else tamper(sender, recipient, msg)
            if got is not None:
                queue.append((sender, recipient, got))

    for m in members:
        post(m.id, m.start())
    for _ in range(20):
        while queue:
            sender, recipient, msg = queue.popleft()
            target = by_id[recipient]
            with contextlib.suppress(ProtocolError):  # refused: a driver answers a refusal
                post(recipient, target.receive(sender, msg))
        if all(m.finished for m in members):
            break
        for m in members:  # deadlines pass
            post(m.id, m.advance())
    return members


def accepted(member: mpc.Member, scale: float) -> torch.Tensor | None:
    """What the member's SecureGroup would accept: its output if it passes the checks."""
    if member.stage is not mpc.Stage.DONE:
        return None
    out = member.output()
    check_total(out, scale, len(member.counted or ()), CONFIG, noised=False)
    return out


def test_an_honest_group_passes_every_check() -> None:
    rings, scale, total = inputs()
    for m in run_group(rings):
        got = accepted(m, scale)
        assert got is not None and torch.equal(got, total)


def test_a_share_shifted_to_move_the_secret_by_one_is_refused_and_the_liar_named() -> None:
    rings, scale, total = inputs()
    liar_seed = keys()[1]
    ids = sorted(ident(s) for s in keys())
    liar = ident(liar_seed)
    x_liar = ids.index(liar) + 1
    # the reducers combine the t lowest x: the liar's Lagrange weight among them
    t = mpc.default_threshold(K)
    xs = tuple(range(1, t + 1))
    inverse = pow(_lagrange_at_zero(xs)[xs.index(x_liar)], -1, PRIME) if x_liar in xs else 1
    shifted: list[bytes] = []

    def tamper(sender: bytes, recipient: bytes, msg: Message) -> Message:
        if sender != liar or not isinstance(msg, Reveal):
            return msg
        forged = {}
        for owner, y in msg.self_mask_shares.items():
            value = (int.from_bytes(y, "big") + inverse) % PRIME  # the secret moves by +1
            forged[owner] = value.to_bytes(SHARE_BYTES, "big")
            shifted.append(owner)
        return Reveal(msg.group, msg.round, forged, dict(msg.pair_seeds))

    members = run_group(rings, tamper)
    assert shifted  # the attack ran
    honest = [m for m in members if m.id != liar]
    for m in honest:
        assert m.blamed.get(liar, "").startswith("revealed a share that fails")
        got = accepted(m, scale)
        assert got is not None and torch.equal(got, total)  # exact: the lie was not used


def test_a_masked_input_with_2_to_the_62_added_is_rejected() -> None:
    rings, scale, _ = inputs()
    ids = sorted(ident(s) for s in keys())
    liar = ids[3]  # neither reducer of chunk 0 (positions 0 and 1): it lies to both alike

    def tamper(sender: bytes, recipient: bytes, msg: Message) -> Message:
        if sender == liar and isinstance(msg, Input) and msg.chunk in (0, 1):
            data, replica = msg.data.clone(), msg.replica.clone()
            if msg.chunk == 0:
                data[0] += 2**62  # its slice of chunk 0 ...
            else:
                replica[0] += 2**62  # ... and the replica of it, for chunk 0's second reducer
            return Input(
                msg.group, msg.round, msg.chunk, data, msg.sealed, msg.commitments, replica
            )
        return msg

    members = run_group(rings, tamper)
    done = [m for m in members if m.stage is mpc.Stage.DONE]
    assert len(done) == K  # mpc alone cannot see it: the masked slices look random
    for m in done:
        with pytest.raises(SumRejected, match="outside what"):
            accepted(m, scale)


def test_a_masked_input_told_differently_to_the_two_reducers_aborts() -> None:
    rings, _, _ = inputs()
    ids = sorted(ident(s) for s in keys())
    liar = ids[3]

    def tamper(sender: bytes, recipient: bytes, msg: Message) -> Message:
        if sender == liar and isinstance(msg, Input) and msg.chunk == 0:
            data = msg.data.clone()
            data[0] += 1  # only chunk 0's first reducer sees it
            return Input(
                msg.group, msg.round, msg.chunk, data, msg.sealed, msg.commitments, msg.replica
            )
        return msg

    members = run_group(rings, tamper)
    assert all(m.stage is mpc.Stage.ABORTED and m.sum_rejected for m in members)
    for m in members:
        with pytest.raises(SumRejected):
            m.output()


def lying_reducer(
    liar: bytes, chunk: int, change: Callable[[torch.Tensor], None], to: set[bytes] | None = None
) -> Tamper:
    """The reducer ``liar`` changes its sum of ``chunk`` (for the members in ``to``, or all)."""

    def tamper(sender: bytes, recipient: bytes, msg: Message) -> Message:
        mine = sender == liar and isinstance(msg, ChunkSum) and msg.chunk == chunk
        if mine and (to is None or recipient in to):
            assert isinstance(msg, ChunkSum)
            data = msg.data.clone()
            change(data)
            return ChunkSum(msg.group, msg.round, msg.chunk, data, msg.counted)
        return msg

    return tamper


def assert_caught(members: list[mpc.Member], liar: bytes, partner: bytes) -> None:
    """Every honest member refused the result; the liar's partner reducer named it."""
    for m in members:
        if m.id == liar:
            continue
        assert m.stage is mpc.Stage.ABORTED and m.sum_rejected, m.abort_reason
        assert accepted(m, 1.0) is None
        with pytest.raises(SumRejected, match="different sums"):
            m.output()
        if m.id == partner:
            assert set(m.blamed) == {liar}
        else:
            assert not m.blamed  # a third member cannot tell which of the two lied


@pytest.mark.parametrize("where", ["weight", "coordinate"])
def test_a_reducer_grossly_lying_about_its_chunk_sum_is_rejected(where: str) -> None:
    rings, scale, _ = inputs()
    ids = sorted(ident(s) for s in keys())
    last = ids[-1]  # reduces the last chunk, which holds the weight slot (and the one before)

    def change(data: torch.Tensor) -> None:
        if where == "weight":
            data[-1] += int(scale)  # one more member's weight
        else:
            data[0] += 2**62

    members = run_group(rings, lying_reducer(last, K - 1, change))
    assert_caught(members, last, partner=ids[0])  # chunk K-1's second reducer: position 0


@pytest.mark.parametrize("position", range(K))
def test_a_reducer_lying_by_one_unit_is_caught(position: int) -> None:
    rings, _, _ = inputs()
    ids = sorted(ident(s) for s in keys())
    liar = ids[position]

    def change(data: torch.Tensor) -> None:
        data[0] += 1

    # its own chunk (second reducer: the next member) and the replicated one (first: the one before)
    for chunk, partner in (
        (position, ids[(position + 1) % K]),
        ((position - 1) % K, ids[position - 1]),
    ):
        members = run_group(rings, lying_reducer(liar, chunk, change))
        assert_caught(members, liar, partner)


def test_a_reducer_lying_to_some_members_only_never_gets_a_wrong_sum_accepted() -> None:
    rings, scale, total = inputs()
    ids = sorted(ident(s) for s in keys())
    liar, fooled = ids[2], {ids[4]}

    def change(data: torch.Tensor) -> None:
        data[1] -= 3

    members = run_group(rings, lying_reducer(liar, 2, change, to=fooled))
    for m in members:
        if m.id == liar:
            continue
        got = accepted(m, scale)
        if m.id in fooled:
            assert got is None and m.sum_rejected
        else:
            assert got is not None and torch.equal(got, total)  # the truth, confirmed twice


def test_a_lone_reducer_is_not_confirmed_when_its_partner_is_gone() -> None:
    """What remains: chunk j's second reducer gone after the view leaves the first unconfirmed
    (the round completes with the survivors); a small lie there passes the range checks."""
    rings, scale, total = inputs()
    ids = sorted(ident(s) for s in keys())
    liar, gone = ids[1], ids[2]  # chunk 1's two reducers
    lie = lying_reducer(liar, 1, lambda d: d.__setitem__(0, d[0] + 1))

    def tamper(sender: bytes, recipient: bytes, msg: Message) -> Message | None:
        if sender == gone and isinstance(msg, ChunkSum):
            return None  # gone before its chunk sums
        return lie(sender, recipient, msg)

    members = run_group(rings, tamper)
    for m in members:
        if m.id in (liar, gone):
            continue
        got = accepted(m, scale)
        assert got is not None and int((got - total).abs().sum()) == 1


def test_a_dealer_whose_dealt_share_fails_its_commitment_is_not_counted() -> None:
    rings, scale, _ = inputs()
    liar = ident(keys()[3])

    def tamper(sender: bytes, recipient: bytes, msg: Message) -> Message:
        if sender == liar and isinstance(msg, Input):
            junk = bytes(32) + msg.commitments[32:]  # commitment 1 no longer matches
            return Input(msg.group, msg.round, msg.chunk, msg.data, msg.sealed, junk, msg.replica)
        return msg

    members = run_group(rings, tamper)
    for m in members:
        if m.id == liar:
            continue
        # the dealer equivocated (its commitments differ between members) or lied to one of
        # them: either its input is not counted or the group aborts; no wrong sum is accepted
        if m.stage is mpc.Stage.DONE:
            got = accepted(m, scale)
            assert got is not None
            counted = sorted(m.counted or ())
            want = sum(rings[i] for i, s in enumerate(keys()) if ident(s) in counted)
            assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_the_checks_and_the_decode_read_the_chunk_sums_as_the_whole_total(
    dtype: torch.dtype,
) -> None:
    """``SecureGroup`` checks and decodes the member's chunk sums without concatenating them:
    the same verdicts and bit-identical totals as on the one vector."""
    from gossip.allreduce import decode_total

    k = 5
    config = AllReduceConfig(bound=10.0, weight=1.0)
    scale = 2.0**20 if dtype == torch.int32 else config.scale(k)
    gen = torch.Generator().manual_seed(3)
    body = (torch.rand(23, generator=gen, dtype=torch.float64) * 2 - 1) * 9 * k * scale
    total = torch.cat([body, torch.tensor([k * scale], dtype=torch.float64)]).to(dtype)
    bounds = [(0, 5), (5, 10), (10, 15), (15, 20), (20, 24)]
    parts = [total[lo:hi].clone() for lo, hi in bounds]
    assert torch.equal(decode_total(parts, scale), decode_total(total, scale))
    check_total(parts, scale, k, config, noised=False)
    for j, at in ((1, 2), (4, 0)):  # a coordinate far out of range in a middle / the last part
        bad = [p.clone() for p in parts]
        bad[j][at] = torch.iinfo(dtype).max // 2
        with pytest.raises(SumRejected):
            check_total(bad, scale, k, config, noised=False)
        with pytest.raises(SumRejected):
            check_total(torch.cat(bad), scale, k, config, noised=False)
    wrong = [p.clone() for p in parts]
    wrong[-1][-1] += int(scale)  # one member's weight too many
    with pytest.raises(SumRejected, match="weight"):
        check_total(wrong, scale, k, config, noised=False)
