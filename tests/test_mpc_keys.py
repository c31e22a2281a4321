"""mpc.keys and mpc.kdf: round keys, signed advertisements, sealed shares, pairwise seeds."""

from __future__ import annotations

import json
from pathlib import Path

import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpc import kdf, keys
from murmur.errors import BadSeal, BadSignature, ConfigError, MalformedMessage

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


# --- round keys and agreement ----------------------------------------------------------------


def test_round_keys_are_fresh_and_distinct_pairs() -> None:
    k1, k2 = keys.new_round_keys(), keys.new_round_keys()
    assert k1 != k2
    assert len({k1.agreement_public, k1.box_public, k2.agreement_public, k2.box_public}) == 4
    for k in (k1, k2):
        assert len(k.agreement_private) == len(k.box_private) == keys.KEY_BYTES
        assert k.agreement_private.hex() not in repr(k)
        assert k.box_private.hex() not in repr(k)


def test_agreement_is_symmetric_and_feeds_a_symmetric_pair_seed() -> None:
    u, v = keys.new_round_keys(), keys.new_round_keys()
    s_uv = keys.agree(u.agreement_private, v.agreement_public)
    s_vu = keys.agree(v.agreement_private, u.agreement_public)
    assert s_uv == s_vu
    assert s_uv != keys.agree(u.agreement_private, keys.new_round_keys().agreement_public)
    seed_u = kdf.pair_seed(s_uv, round=3, group=GROUP, a=_id(1), b=_id(2))
    seed_v = kdf.pair_seed(s_vu, round=3, group=GROUP, a=_id(2), b=_id(1))
    assert seed_u == seed_v


def test_low_order_and_malformed_peer_keys_are_refused() -> None:
    me = keys.new_round_keys()
    with pytest.raises(MalformedMessage):
        keys.agree(me.agreement_private, bytes(32))
    with pytest.raises(MalformedMessage):
        keys.agree(me.agreement_private, bytes(31))
    with pytest.raises(ConfigError):
        keys.agree(bytes(5), me.agreement_public)


# --- advertisements --------------------------------------------------------------------------


def _advert(i: int, k: keys.RoundKeys, rnd: int = 5) -> bytes:
    return keys.sign_advertisement(
        _identity(i),
        round=rnd,
        group=GROUP,
        agreement_public=k.agreement_public,
        box_public=k.box_public,
    )


def test_advertisement_verifies_and_binds_every_field() -> None:
    k, other = keys.new_round_keys(), keys.new_round_keys()
    sig = _advert(1, k)
    good = {
        "round": 5,
        "group": GROUP,
        "agreement_public": k.agreement_public,
        "box_public": k.box_public,
    }
    keys.verify_advertisement(_id(1), signature=sig, **good)  # type: ignore[arg-type]
    # signing with the raw seed gives the same (deterministic Ed25519) signature
    assert sig == keys.sign_advertisement(bytes([1]) * 32, **good)  # type: ignore[arg-type]
    changes: list[tuple[bytes, dict[str, object]]] = [
        (_id(2), {}),
        (_id(1), {"round": 6}),
        (_id(1), {"group": b"group-8"}),
        (_id(1), {"agreement_public": other.agreement_public}),
        (_id(1), {"box_public": other.box_public}),
        (_id(1), {"agreement_public": k.box_public, "box_public": k.agreement_public}),
    ]
    for member, change in changes:
        with pytest.raises(BadSignature):
            keys.verify_advertisement(member, signature=sig, **{**good, **change})  # type: ignore[arg-type]
    forged = bytes([sig[0] ^ 1]) + sig[1:]
    with pytest.raises(BadSignature):
        keys.verify_advertisement(_id(1), signature=forged, **good)  # type: ignore[arg-type]
    with pytest.raises(BadSignature):
        keys.verify_advertisement(_id(1), signature=sig[:63], **good)  # type: ignore[arg-type]


def test_advertisement_with_malformed_keys_is_refused() -> None:
    k = keys.new_round_keys()
    with pytest.raises(MalformedMessage):
        keys.verify_advertisement(
            _id(1),
            round=1,
            group=GROUP,
            agreement_public=k.agreement_public[:31],
            box_public=k.box_public,
            signature=bytes(64),
        )


# --- sealed shares ---------------------------------------------------------------------------


def test_seal_and_open_round_trip_with_context_binding() -> None:
    a, b, c = keys.new_round_keys(), keys.new_round_keys(), keys.new_round_keys()
    ctx = {"round": 2, "group": GROUP, "sender": _id(1), "recipient": _id(2)}
    sealed = keys.seal_to(a.box_private, b.box_public, b"share bytes", **ctx)  # type: ignore[arg-type]
    assert b"share bytes" not in sealed
    assert keys.open_from(b.box_private, a.box_public, sealed, **ctx) == b"share bytes"  # type: ignore[arg-type]
    # fresh nonce: sealing twice gives different ciphertexts
    assert sealed != keys.seal_to(a.box_private, b.box_public, b"share bytes", **ctx)  # type: ignore[arg-type]
    replays: list[dict[str, object]] = [
        {"round": 3},
        {"group": b"other"},
        {"sender": _id(3)},
        {"recipient": _id(3)},
        {"sender": _id(2), "recipient": _id(1)},
    ]
    for change in replays:
        with pytest.raises(BadSeal):
            keys.open_from(b.box_private, a.box_public, sealed, **{**ctx, **change})  # type: ignore[arg-type]
    with pytest.raises(BadSeal):  # a third party cannot open it
        keys.open_from(c.box_private, a.box_public, sealed, **ctx)  # type: ignore[arg-type]
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(BadSeal):
        keys.open_from(b.box_private, a.box_public, tampered, **ctx)  # type: ignore[arg-type]
    with pytest.raises(BadSeal):
        keys.open_from(b.box_private, a.box_public, sealed[:10], **ctx)  # type: ignore[arg-type]


def test_seal_refuses_a_low_order_recipient_key() -> None:
    a = keys.new_round_keys()
    with pytest.raises(MalformedMessage):
        keys.seal_to(
            a.box_private, bytes(32), b"x", round=1, group=GROUP, sender=_id(1), recipient=_id(2)
        )
