"""mpc.keys and mpc.kdf: static pair roots, sealed shares, pairwise seeds."""

from __future__ import annotations

import json
from pathlib import Path

import nacl.bindings
import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from floor.errors import BadSeal, ConfigError, MalformedMessage
from mpc import kdf, keys

KAT = json.loads((Path(__file__).parent / "data" / "mpc_kdf_kat.json").read_text())
GROUP = b"group-7"


def _identity(i: int) -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey(bytes([i]) * 32)


def _id(i: int) -> bytes:
    return bytes(_identity(i).verify_key)


# --- KDF ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", KAT["derive"])
def test_derive_known_answers(case: dict[str, object]) -> None:
    parts = [bytes.fromhex(p) for p in case["parts"]]  # type: ignore[attr-defined]
    out = kdf.derive(bytes.fromhex(str(case["key"])), bytes.fromhex(str(case["label"])), *parts)
    assert out.hex() == case["out"]


@pytest.mark.parametrize("case", KAT["pair_seed"])
def test_pair_seed_known_answers(case: dict[str, object]) -> None:
    out = kdf.pair_seed(
        bytes.fromhex(str(case["shared_secret"])),
        round=int(str(case["round"])),
        group=bytes.fromhex(str(case["group"])),
        a=bytes.fromhex(str(case["a"])),
        b=bytes.fromhex(str(case["b"])),
    )
    assert out.hex() == case["seed"]


def test_length_prefixes_keep_contexts_apart() -> None:
    key = bytes(32)
    assert kdf.derive(key, b"ab", b"c") != kdf.derive(key, b"a", b"bc")
    assert kdf.derive(key, b"a", b"", b"b") != kdf.derive(key, b"a", b"b", b"")
    assert kdf.derive(key, b"a") != kdf.derive(key, b"a", b"")


@settings(max_examples=50, deadline=None)
@given(
    secret=st.binary(min_size=32, max_size=32),
    rnd=st.integers(0, 2**64 - 1),
    a=st.binary(min_size=32, max_size=32),
    b=st.binary(min_size=32, max_size=32),
)
def test_pair_seed_is_symmetric_and_bound_to_its_context(
    secret: bytes, rnd: int, a: bytes, b: bytes
) -> None:
    if a == b:
        with pytest.raises(ConfigError):
            kdf.pair_seed(secret, round=rnd, group=GROUP, a=a, b=b)
        return
    seed = kdf.pair_seed(secret, round=rnd, group=GROUP, a=a, b=b)
    assert len(seed) == 32
    assert seed == kdf.pair_seed(secret, round=rnd, group=GROUP, a=b, b=a)
    others = {
        kdf.pair_seed(secret, round=(rnd + 1) % 2**64, group=GROUP, a=a, b=b),
        kdf.pair_seed(secret, round=rnd, group=GROUP + b"x", a=a, b=b),
        kdf.pair_seed(
            secret, round=rnd, group=GROUP, a=a, b=bytes(32) if a != bytes(32) else b"\1" * 32
        ),
        kdf.pair_seed(bytes(x ^ 1 for x in secret), round=rnd, group=GROUP, a=a, b=b),
    }
    assert seed not in others


@pytest.mark.parametrize(
    "call",
    [
        lambda: kdf.derive(bytes(15), b"l"),
        lambda: kdf.derive(bytes(65), b"l"),
        lambda: kdf.derive(bytes(32), b"l", "str"),
        lambda: kdf.pair_seed(bytes(32), round=-1, group=b"g", a=b"a", b=b"b"),
        lambda: kdf.pair_seed(bytes(32), round=2**64, group=b"g", a=b"a", b=b"b"),
        lambda: kdf.u64(True),
    ],
)
def test_bad_kdf_arguments(call: object) -> None:
    with pytest.raises(ConfigError):
        call()  # type: ignore[operator]


# --- static pair roots -----------------------------------------------------------------------


def test_pair_root_is_symmetric_per_pair_and_matches_libsodium() -> None:
    r12 = keys.pair_root(_identity(1), _id(2))
    assert r12 == keys.pair_root(_identity(2), _id(1))  # both members of the pair agree
    assert len(r12) == keys.KEY_BYTES
    assert (
        len({r12, keys.pair_root(_identity(1), _id(3)), keys.pair_root(_identity(2), _id(3))}) == 3
    )
    # the same X25519 secret libsodium's Box uses for the pair, run through the KDF
    raw = nacl.bindings.crypto_scalarmult(
        bytes(_identity(1).to_curve25519_private_key()),
        bytes(_identity(2).verify_key.to_curve25519_public_key()),
    )
    lo, hi = sorted((_id(1), _id(2)))
    assert r12 == kdf.derive(raw, keys.PAIR_ROOT_LABEL, lo, hi)
    # and it feeds symmetric per-round seeds that differ per round
    seed = kdf.pair_seed(r12, round=3, group=GROUP, a=_id(1), b=_id(2))
    assert seed == kdf.pair_seed(r12, round=3, group=GROUP, a=_id(2), b=_id(1))
    assert seed != kdf.pair_seed(r12, round=4, group=GROUP, a=_id(1), b=_id(2))


def test_pair_root_cache_is_per_pair_and_recomputes_after_eviction() -> None:
    first = keys.pair_root(_identity(4), _id(5))
    keys._ROOTS.clear()
    assert keys.pair_root(_identity(5), _id(4)) == first  # recomputed from the other side
    # a cached pair is only found by its own two ids: a third identity gets its own root
    assert keys.pair_root(_identity(6), _id(5)) != first


def test_bad_pair_members_are_refused() -> None:
    with pytest.raises(ConfigError):
        keys.pair_root(_identity(1), _id(1))
    with pytest.raises(ConfigError):
        keys.pair_root(_identity(1), bytes(31))
    with pytest.raises(MalformedMessage):  # not a point on the curve
        keys.pair_root(_identity(1), b"\xff" * 31 + b"\x7f")
    with pytest.raises(MalformedMessage):  # a low-order point: the shared secret would be zero
        keys.pair_root(_identity(1), bytes(32))


# --- sealed shares ---------------------------------------------------------------------------


def _share_key(i: int, peer: int, rnd: int = 2) -> bytes:
    root = keys.pair_root(_identity(i), _id(peer))
    return kdf.pair_keys(root, round=rnd, group=GROUP, a=_id(i), b=_id(peer))[1]


def test_pair_keys_split_one_output_and_bind_their_context() -> None:
    root = keys.pair_root(_identity(1), _id(2))
    seed, share = kdf.pair_keys(root, round=2, group=GROUP, a=_id(1), b=_id(2))
    assert (seed, share) == kdf.pair_keys(root, round=2, group=GROUP, a=_id(2), b=_id(1))
    assert seed != share and len(seed) == len(share) == 32
    out = kdf.derive(
        root, kdf.PAIR_KEYS_LABEL, kdf.u64(2), GROUP, *sorted((_id(1), _id(2))), size=64
    )
    assert out == seed + share
    for other in (
        kdf.pair_keys(root, round=3, group=GROUP, a=_id(1), b=_id(2)),
        kdf.pair_keys(root, round=2, group=b"other", a=_id(1), b=_id(2)),
        kdf.pair_keys(root, round=2, group=GROUP, a=_id(1), b=_id(3)),
    ):
        assert not {seed, share} & set(other)
    with pytest.raises(ConfigError):
        kdf.pair_keys(root, round=2, group=GROUP, a=_id(1), b=_id(1))


def test_seal_and_open_round_trip_with_context_binding() -> None:
    ctx = {"round": 2, "group": GROUP, "sender": _id(1), "recipient": _id(2)}
    key = _share_key(1, 2)
    assert key == _share_key(2, 1)  # the recipient derives the same key
    assert key != _share_key(1, 2, rnd=3)  # one per round
    sealed = keys.seal_with(key, b"share bytes", **ctx)  # type: ignore[arg-type]
    assert b"share bytes" not in sealed
    assert keys.open_with(key, sealed, **ctx) == b"share bytes"  # type: ignore[arg-type]
    # fresh nonce: sealing twice gives different ciphertexts
    assert sealed != keys.seal_with(key, b"share bytes", **ctx)  # type: ignore[arg-type]
    replays: list[dict[str, object]] = [
        {"round": 3},
        {"group": b"other"},
        {"sender": _id(3)},
        {"recipient": _id(3)},
        {"sender": _id(2), "recipient": _id(1)},
    ]
    for change in replays:
        with pytest.raises(BadSeal):
            keys.open_with(key, sealed, **{**ctx, **change})  # type: ignore[arg-type]
    with pytest.raises(BadSeal):  # a third party's key cannot open it
        keys.open_with(_share_key(3, 2), sealed, **ctx)  # type: ignore[arg-type]
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(BadSeal):
        keys.open_with(key, tampered, **ctx)  # type: ignore[arg-type]
    with pytest.raises(BadSeal):
        keys.open_with(key, sealed[:10], **ctx)  # type: ignore[arg-type]


def test_warm_pair_roots_fills_the_cache_with_the_same_roots_from_two_threads() -> None:
    signers = [_identity(40 + i) for i in range(12)]
    ids = [bytes(s.verify_key) for s in signers]
    pairs = [(s, me, peer) for s, me in zip(signers, ids, strict=True) for peer in ids]
    expected = {
        tuple(sorted((me, peer))): keys.pair_root(s, peer) for s, me, peer in pairs if me != peer
    }
    keys._ROOTS.clear()
    assert keys.warm_pair_roots(pairs, threads=2) == len(expected) == 66  # each pair once
    assert {k: v for k, v in keys._ROOTS.items() if k in expected} == expected
    assert keys.warm_pair_roots(pairs, threads=2) == 0  # nothing left to compute
    bad = [(signers[0], ids[0], bytes(32))]  # a low-order point: skipped, refused when used
    assert keys.warm_pair_roots(bad, threads=1) == 1
    with pytest.raises(MalformedMessage):
        keys.pair_root(signers[0], bytes(32))


def test_warm_pair_roots_of_members_covers_their_mask_graph() -> None:
    import torch

    import mpc

    signers = [_identity(60 + i) for i in range(8)]
    ids = [bytes(s.verify_key) for s in signers]
    vec = torch.zeros(4, dtype=torch.int64)
    full = [mpc.Member(s, ids, group=b"w", round=1, vector=vec) for s in signers]
    keys._ROOTS.clear()
    assert mpc.warm_pair_roots(full) == 28  # every pair of 8, once
    sparse = [mpc.Member(s, ids, group=b"w", round=2, vector=vec, degree=3) for s in signers]
    keys._ROOTS.clear()
    assert mpc.warm_pair_roots(sparse, threads=1) == 12  # a 3-regular graph on 8 has 12 edges
