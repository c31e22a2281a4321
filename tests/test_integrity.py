"""Checked sums: a malicious group member tries to make honest members accept a wrong sum.

The three attacks of issue 21, each played by one member of a real ``mpc.Member`` group (every
other member honest), with the same checks ``gossip.allreduce.SecureGroup`` runs before it
accepts a result (``check_total``):

1. Shamir shares crafted to shift the reconstructed self-mask seed by +1 (they pass the
   length and field checks): refused against the dealer's commitment, the liar is named, and
   the honest shares still give the exact sum;
2. a masked input with 2^62 added (wraps in the ring): the total lies outside what the counted
   inputs can reach: ``SumRejected``;
3. a reducer's wrong chunk sum: a gross lie (a quarter ring) is caught by the range check; a
   small one is not (there is no second confirmation of chunk sums yet: the xfail below
   states the hole).

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

Tamper = Callable[[bytes, bytes, Message], Message]
"""(sender, recipient, message) -> the message the network delivers."""


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
            if tamper is not None:
                msg = tamper(sender, recipient, msg)
            queue.append((sender, recipient, msg))

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
    liar = keys()[2]
    liar_id = ident(liar)

    def tamper(sender: bytes, recipient: bytes, msg: Message) -> Message:
        if sender == liar_id and isinstance(msg, Input):
            data = msg.data.clone()
            data[0] += 2**62
            return Input(msg.group, msg.round, msg.chunk, data, msg.sealed, msg.commitments)
        return msg

    members = run_group(rings, tamper)
    done = [m for m in members if m.stage is mpc.Stage.DONE]
    assert done  # mpc alone cannot see it: the masked slices look random
    for m in done:
        with pytest.raises(SumRejected, match="outside what"):
            accepted(m, scale)


@pytest.mark.parametrize("where", ["weight", "coordinate"])
def test_a_reducer_grossly_lying_about_its_chunk_sum_is_rejected(where: str) -> None:
    rings, scale, _ = inputs()
    ids = sorted(ident(s) for s in keys())
    last = ids[-1]  # reduces the last chunk, which holds the weight slot

    def tamper(sender: bytes, recipient: bytes, msg: Message) -> Message:
        if sender == last and isinstance(msg, ChunkSum):
            data = msg.data.clone()
            if where == "weight":
                data[-1] += int(scale)  # one more member's weight
            else:
                data[0] += 2**62
            return ChunkSum(msg.group, msg.round, msg.chunk, data, msg.counted)
        return msg

    members = run_group(rings, tamper)
    for m in members:
        if m.id == last or m.stage is not mpc.Stage.DONE:
            continue
        with pytest.raises(SumRejected):
            accepted(m, scale)


@pytest.mark.xfail(strict=True, reason="chunk sums are not yet confirmed by a second member")
def test_a_reducer_lying_by_one_unit_is_caught() -> None:
    rings, scale, _ = inputs()
    ids = sorted(ident(s) for s in keys())

    def tamper(sender: bytes, recipient: bytes, msg: Message) -> Message:
        if sender == ids[0] and isinstance(msg, ChunkSum):
            data = msg.data.clone()
            data[0] += 1
            return ChunkSum(msg.group, msg.round, msg.chunk, data, msg.counted)
        return msg

    members = run_group(rings, tamper)
    for m in members[1:]:
        if m.stage is mpc.Stage.DONE:
            with pytest.raises(SumRejected):
                accepted(m, scale)


def test_a_dealer_whose_dealt_share_fails_its_commitment_is_not_counted() -> None:
    rings, scale, _ = inputs()
    liar = ident(keys()[3])

    def tamper(sender: bytes, recipient: bytes, msg: Message) -> Message:
        if sender == liar and isinstance(msg, Input):
            junk = bytes(32) + msg.commitments[32:]  # commitment 1 no longer matches
            return Input(msg.group, msg.round, msg.chunk, msg.data, msg.sealed, junk)
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
