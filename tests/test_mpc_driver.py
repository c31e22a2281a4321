"""The in-memory driver (mpc.secure_sum, secure_sum_ring, run_group) and the Member API edges."""

from __future__ import annotations

import nacl.signing
import pytest
import torch

import mpc
from floor.errors import ConfigError, OutOfStage, RingOverflow
from mpc.driver import run_group


def test_float_sum_keeps_shape_and_dtype() -> None:
    xs = [torch.linspace(-1, 1, 12).reshape(3, 4) * (i + 1) for i in range(4)]
    got = mpc.secure_sum(xs, threshold=3)
    assert got.shape == (3, 4) and got.dtype == torch.float64
    assert torch.allclose(got, sum(x.double() for x in xs), atol=4 / 2**20)


def test_bits32_and_overflow() -> None:
    xs = [torch.full((5,), 0.25 * (i + 1)) for i in range(3)]
    got = mpc.secure_sum(xs, threshold=2, bits=32, scale=2.0**10)
    assert torch.equal(got, torch.full((5,), 1.5, dtype=torch.float64))
    with pytest.raises(RingOverflow):  # one value does not fit
        mpc.secure_sum([torch.full((2,), 1e9)] * 3, threshold=2, bits=32, scale=2.0**10)
    with pytest.raises(RingOverflow):  # each fits, the sum of three could not
        mpc.secure_sum([torch.full((2,), 1e6)] * 3, threshold=2, bits=32, scale=2.0**10)


def test_bad_arguments_are_config_errors() -> None:
    v = [torch.zeros(3, dtype=torch.int64)] * 4
    with pytest.raises(ConfigError):
        mpc.secure_sum_ring(v[:1], threshold=1)
    with pytest.raises(ConfigError):
        mpc.secure_sum_ring([*v[:3], torch.zeros(4, dtype=torch.int64)], threshold=3)
    with pytest.raises(ConfigError):
        mpc.secure_sum_ring(v, threshold=3, dropped={0: "lunch"})
    with pytest.raises(ConfigError):
        mpc.secure_sum_ring(v, threshold=3, dropped={4: "input"})
    with pytest.raises(ConfigError):  # t <= k/2 would let two disjoint groups reveal both kinds
        mpc.secure_sum_ring(v, threshold=2)
    with pytest.raises(ConfigError):
        mpc.secure_sum_ring(v, threshold=5)


def test_seed_fixes_identities_and_graph() -> None:
    v = [torch.arange(6, dtype=torch.int64)] * 5
    a = run_group(v, threshold=3, seed=b"s", degree=2)
    b = run_group(v, threshold=3, seed=b"s", degree=2)
    c = run_group(v, threshold=3, seed=b"t", degree=2)
    assert [m.id for m in a.members] == [m.id for m in b.members]
    assert [m.id for m in a.members] != [m.id for m in c.members]
    assert torch.equal(a.ring_sum, torch.arange(6) * 5) and torch.equal(a.ring_sum, b.ring_sum)


@pytest.mark.parametrize("k", [2, 4, 7])
def test_message_count_without_dropouts(k: int) -> None:
    run = run_group([torch.zeros(5, dtype=torch.int64)] * k, threshold=k // 2 + 1)
    # inputs, receipts, views, reveals: all to all; chunk sums: both chunks a member reduces
    assert run.messages == 4 * k * (k - 1) + 2 * k * (k - 1)
    assert run.counted == tuple(range(k)) and run.aborted is None


def test_unmasking_dropouts_are_counted_unless_two_neighbours_are_gone() -> None:
    v = [torch.full((9,), i + 1, dtype=torch.int64) for i in range(6)]
    one = run_group(v, threshold=4, dropped={2: "unmasking"}, seed=b"u")
    assert one.counted == tuple(range(6))
    assert torch.equal(one.ring_sum, torch.full((9,), 21))
    position = [m.members.index(m.id) for m in one.members]
    at = {p: i for i, p in enumerate(position)}
    # two gone after their inputs, not next to each other in the member order: both counted
    apart = run_group(v, threshold=4, dropped={at[1]: "unmasking", at[3]: "unmasking"}, seed=b"u")
    assert apart.counted == tuple(range(6))
    assert torch.equal(apart.ring_sum, torch.full((9,), 21))
    # next to each other: chunk 1 lost both reducers, so neither can be counted
    gone = {at[1], at[2]}
    near = run_group(v, threshold=4, dropped=dict.fromkeys(gone, "unmasking"), seed=b"u")
    assert near.counted == tuple(i for i in range(6) if i not in gone)
    assert torch.equal(near.ring_sum, torch.full((9,), 21 - sum(i + 1 for i in gone)))


def test_member_api_edges() -> None:
    run = run_group([torch.zeros(3, dtype=torch.int64)] * 3, threshold=2, seed=b"e")
    done = run.members[0]
    assert done.finished and done.stage is mpc.Stage.DONE
    assert done.counted == frozenset(m.id for m in run.members)
    assert done.advance() == []
    with pytest.raises(OutOfStage):
        done.start()
    ids = [m.id for m in run.members]
    new = mpc.Member(
        b"\x02" * 32,
        [ids[0], _id(b"\x02" * 32)],
        group=b"g",
        round=1,
        vector=torch.zeros(2, dtype=torch.int32),
    )
    assert new.advance() == [] and new.stage is mpc.Stage.INPUT
    with pytest.raises(OutOfStage):
        new.output()
    with pytest.raises(ConfigError):  # not in the member list
        mpc.Member(b"\x03" * 32, ids, group=b"g", round=1, vector=torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ConfigError):  # not a 1-D ring tensor
        mpc.Member(
            b"\x02" * 32, [ids[0], _id(b"\x02" * 32)], group=b"g", round=1, vector=torch.zeros(2)
        )


def _id(seed: bytes) -> bytes:
    return bytes(nacl.signing.SigningKey(seed).verify_key)
