"""Peer ids, identities, signatures, pair keys and the key file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from floor.errors import BadSignature, ConfigError, KeyFileError, MalformedMessage
from floor.identity import PEER_ID_TEXT_LENGTH, Identity, PeerId, verify_signature
from floor.keyfile import key_path


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=32, max_size=32))
def test_peer_id_text_round_trip(raw: bytes) -> None:
    peer = PeerId(raw)
    text = str(peer)
    assert len(text) == PEER_ID_TEXT_LENGTH
    assert PeerId.parse(text) == peer
    assert PeerId.parse(text).raw == raw
    assert text.startswith(peer.short())


@pytest.mark.parametrize("raw", [b"", b"x" * 31, b"x" * 33, bytearray(32), "x" * 32])
def test_peer_id_rejects_wrong_length_or_type(raw: object) -> None:
    with pytest.raises(MalformedMessage):
        PeerId(raw)  # type: ignore[arg-type]


def test_peer_id_parse_rejects_bad_text() -> None:
    good = str(Identity.from_seed(b"s" * 32).peer_id)
    bad = [
        "",
        good[:-1],
        good + "a",
        good.upper(),
        good[:-1] + "1",  # not base32
        good[:-1] + chr(ord(good[-1]) ^ 1),  # non-canonical trailing bits (or another id)
        "é" * PEER_ID_TEXT_LENGTH,
    ]
    for text in bad:
        try:
            parsed = PeerId.parse(text)
        except ConfigError:
            continue
        # Only a different canonical id may parse; it must print back exactly.
        assert str(parsed) == text and parsed != PeerId.parse(good)


def test_peer_id_equality_and_hash() -> None:
    a = Identity.from_seed(b"a" * 32).peer_id
    a2 = PeerId(bytes(a.raw))
    b = Identity.from_seed(b"b" * 32).peer_id
    assert a == a2 and hash(a) == hash(a2)
    assert a != b
    assert len({a, a2, b}) == 2
    assert a != a.raw
    with pytest.raises(AttributeError):
        a.raw = b.raw  # type: ignore[misc]


def test_identity_repr_hides_secrets() -> None:
    ident = Identity.from_seed(b"k" * 32)
    text = repr(ident) + str(ident)
    assert ident.seed().hex() not in text
    assert ident.peer_id.short() in text


def test_from_seed_is_deterministic_and_checked() -> None:
    assert Identity.from_seed(b"q" * 32).peer_id == Identity.from_seed(b"q" * 32).peer_id
    assert Identity.generate().peer_id != Identity.generate().peer_id
    with pytest.raises(ConfigError):
        Identity.from_seed(b"short")


def test_sign_and_verify() -> None:
    ident = Identity.generate()
    other = Identity.generate()
    sig = ident.sign(b"hello")
    assert len(sig) == 64
    verify_signature(ident.peer_id, b"hello", sig)
    with pytest.raises(BadSignature):
        verify_signature(ident.peer_id, b"hellO", sig)
    with pytest.raises(BadSignature):
        verify_signature(other.peer_id, b"hello", sig)
    with pytest.raises(BadSignature):
        verify_signature(ident.peer_id, b"hello", sig[:-1])


def test_pair_key_is_symmetric_and_distinct() -> None:
    a, b, c = (Identity.from_seed(bytes([i]) * 32) for i in (1, 2, 3))
    ab = a.pair_key(b.peer_id)
    assert len(ab) == 32
    assert ab == b.pair_key(a.peer_id)
    assert ab != a.pair_key(c.peer_id)
    assert a.pair_key(b.peer_id) is ab  # cached
    assert len(a.x25519_private()) == 32


def test_pair_key_with_invalid_point_is_refused() -> None:
    ident = Identity.generate()
    with pytest.raises(MalformedMessage):
        ident.pair_key(PeerId(bytes(32)))  # low-order point


# ---------------------------------------------------------------- key file


def test_key_file_created_with_mode_0600(tmp_path: Path) -> None:
    data_dir = tmp_path / "new" / "dir"
    ident, created = Identity.load_or_create(data_dir)
    assert created
    mode = stat.S_IMODE(os.stat(key_path(data_dir)).st_mode)
    assert mode == 0o600
    again, created_again = Identity.load_or_create(data_dir)
    assert not created_again
    assert again.peer_id == ident.peer_id
    assert Identity.load(data_dir).peer_id == ident.peer_id
    assert [p.name for p in data_dir.iterdir()] == ["identity.key"]  # no temp files left


def test_key_file_mode_despite_umask(tmp_path: Path) -> None:
    old = os.umask(0o277)
    try:
        Identity.load_or_create(tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(key_path(tmp_path)).st_mode) == 0o600
    Identity.load(tmp_path)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o620])
def test_key_file_readable_by_others_refused(tmp_path: Path, mode: int) -> None:
    Identity.load_or_create(tmp_path)
    os.chmod(key_path(tmp_path), mode)
    with pytest.raises(KeyFileError, match="group or others"):
        Identity.load(tmp_path)
    with pytest.raises(KeyFileError):
        Identity.load_or_create(tmp_path)  # never replaced either
    assert stat.S_IMODE(os.stat(key_path(tmp_path)).st_mode) == mode


def test_key_file_missing_refused(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="no key file"):
        Identity.load(tmp_path)


def _rewrite(path: Path, content: bytes) -> None:
    os.chmod(path, 0o600)
    path.write_bytes(content)


def test_key_file_truncated_refused(tmp_path: Path) -> None:
    Identity.load_or_create(tmp_path)
    path = key_path(tmp_path)
    content = path.read_bytes()
    for cut in (0, 1, 8, 40, len(content) - 1):
        _rewrite(path, content[:cut])
        with pytest.raises(KeyFileError, match="truncated"):
            Identity.load(tmp_path)


def test_key_file_corrupt_refused(tmp_path: Path) -> None:
    ident, _ = Identity.load_or_create(tmp_path)
    path = key_path(tmp_path)
    content = path.read_bytes()
    for i in (0, 9, 40, len(content) - 1):
        flipped = bytearray(content)
        flipped[i] ^= 0x04
        _rewrite(path, bytes(flipped))
        with pytest.raises(KeyFileError, match="corrupt"):
            Identity.load(tmp_path)
    _rewrite(path, content + b"\n")
    with pytest.raises(KeyFileError, match="corrupt"):
        Identity.load(tmp_path)
    _rewrite(path, content)
    assert Identity.load(tmp_path).peer_id == ident.peer_id


def test_key_file_errors_never_show_the_key(tmp_path: Path) -> None:
    ident, _ = Identity.load_or_create(tmp_path)
    path = key_path(tmp_path)
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError) as info:
        Identity.load(tmp_path)
    assert ident.seed().hex() not in str(info.value)
    assert "\n" not in str(info.value)


def test_key_file_not_regular_or_dir_not_dir(tmp_path: Path) -> None:
    (tmp_path / "identity.key").mkdir(mode=0o700)
    with pytest.raises(KeyFileError):
        Identity.load(tmp_path)
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(KeyFileError, match="not a directory"):
        Identity.load_or_create(afile)
