"""Fast paths of mpc.keys: precomputed Box keys, process-wide pair and verification caches."""

from __future__ import annotations

import nacl.public
import nacl.signing
import pytest

from mpc import keys
from murmur.errors import BadSeal, BadSignature, MalformedMessage

GROUP = b"group-9"
CTX = {"round": 4, "group": GROUP, "sender": bytes([1]) * 32, "recipient": bytes([2]) * 32}


def test_cached_agreement_equals_both_sides_and_is_forgotten() -> None:
    a, b = keys.new_round_keys(), keys.new_round_keys()
    ab = keys.agree_cached(a.agreement_private, a.agreement_public, b.agreement_public)
    ba = keys.agree_cached(b.agreement_private, b.agreement_public, a.agreement_public)
    assert ab == ba == keys.agree(a.agreement_private, b.agreement_public)
    kab = keys.box_key_cached(a.box_private, a.box_public, b.box_public)
    assert kab == keys.box_key(b.box_private, a.box_public)
    assert kab != ab
    keys.forget_pairs(a, [(b.agreement_public, b.box_public)])
    assert not any(a.agreement_public in k or a.box_public in k for k in keys._PAIRS)
    with pytest.raises(MalformedMessage):
        keys.agree_cached(a.agreement_private, a.agreement_public, bytes(32))


def test_precomputed_box_interoperates_with_nacl_box() -> None:
    a, b = keys.new_round_keys(), keys.new_round_keys()
    sealed = keys.seal_with(keys.box_key(a.box_private, b.box_public), b"share", **CTX)  # type: ignore[arg-type]
    assert keys.open_from(b.box_private, a.box_public, sealed, **CTX) == b"share"  # type: ignore[arg-type]
    # the wire format is NaCl Box's nonce || ciphertext
    box = nacl.public.Box(
        nacl.public.PrivateKey(b.box_private), nacl.public.PublicKey(a.box_public)
    )
    assert box.decrypt(sealed).endswith(b"share")
    other = nacl.public.Box(
        nacl.public.PrivateKey(a.box_private), nacl.public.PublicKey(b.box_public)
    )
    key = keys.box_key(b.box_private, a.box_public)
    opened = keys.open_with(key, bytes(other.encrypt(keys._context(**CTX) + b"x")), **CTX)  # type: ignore[arg-type]
    assert opened == b"x"
    with pytest.raises(BadSeal):
        keys.open_with(key, sealed[:20], **CTX)  # type: ignore[arg-type]
    with pytest.raises(BadSeal):
        keys.open_with(key, sealed[:-1] + bytes([sealed[-1] ^ 1]), **CTX)  # type: ignore[arg-type]


def test_verification_cache_never_accepts_a_changed_signature() -> None:
    ident = nacl.signing.SigningKey.generate()
    mine = keys.new_round_keys()
    fields = {
        "round": 3,
        "group": GROUP,
        "agreement_public": mine.agreement_public,
        "box_public": mine.box_public,
    }
    sig = keys.sign_advertisement(ident, **fields)  # type: ignore[arg-type]
    member = bytes(ident.verify_key)
    keys.verify_advertisement(member, signature=sig, **fields)  # type: ignore[arg-type]
    keys.verify_advertisement(member, signature=sig, **fields)  # type: ignore[arg-type]  # cached
    bad = sig[:-1] + bytes([sig[-1] ^ 1])
    with pytest.raises(BadSignature):
        keys.verify_advertisement(member, signature=bad, **fields)  # type: ignore[arg-type]
    with pytest.raises(BadSignature):  # the cached (id, bytes, signature) is for round 3 only
        keys.verify_advertisement(member, signature=sig, **{**fields, "round": 4})  # type: ignore[arg-type]
