"""Generate the known-answer vectors of mpc.prg and mpc.kdf (run once; the JSON is committed).

Written from the stream and KDF definitions in the module docstrings, independently of the
modules' code: the PRG reference encrypts counter blocks with AES-128-ECB one by one, the KDF
reference hashes the spelled-out encoding with hashlib.blake2b. Run from the repo root:
``python tests/data/make_mpc_kat.py``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

HERE = Path(__file__).parent


def _seed(label: str) -> bytes:
    return hashlib.sha256(label.encode()).digest()


def ref_keystream(seed: bytes, nbytes: int, offset_bytes: int) -> bytes:
    first, skip = divmod(offset_bytes, 16)
    blocks = (skip + nbytes + 15) // 16
    c0 = int.from_bytes(seed[16:], "big")
    ecb = Cipher(algorithms.AES(seed[:16]), modes.ECB()).encryptor()
    counters = b"".join(((c0 + first + i) % (1 << 128)).to_bytes(16, "big") for i in range(blocks))
    return ecb.update(counters)[skip : skip + nbytes]


def ref_mask(seed: bytes, length: int, bits: int, offset: int) -> list[int]:
    w = bits // 8
    raw = ref_keystream(seed, length * w, offset * w)
    return [int.from_bytes(raw[i * w : (i + 1) * w], "little", signed=True) for i in range(length)]


def _enc(b: bytes) -> bytes:
    return len(b).to_bytes(4, "big") + b


def ref_derive(key: bytes, label: bytes, *parts: bytes) -> bytes:
    data = b"murmur.kdf.v1" + _enc(label) + b"".join(_enc(p) for p in parts)
    return hashlib.blake2b(data, key=key, digest_size=32).digest()


def main() -> None:
    wrap = bytes(16) + b"\xff" * 15 + b"\xfe"  # counter wraps 2^128 after two blocks
    near32 = _seed("ctr32")[:16] + b"\x00" * 12 + b"\xff\xff\xff\xff"  # low 32 bits carry
    prg = []
    cases = [
        ("zero", bytes(32), 0, 64),
        ("sha256(a)", _seed("a"), 0, 100),
        ("sha256(a)", _seed("a"), 7, 41),
        ("sha256(b)", _seed("b"), 1000003, 77),
        ("wrap128", wrap, 5, 70),
        ("carry32", near32, 0, 80),
    ]
    for name, seed, off, n in cases:
        prg.append(
            {
                "name": name,
                "seed": seed.hex(),
                "offset_bytes": off,
                "keystream": ref_keystream(seed, n, off).hex(),
            }
        )
    masks = []
    for name, seed, bits, off, n in [
        ("sha256(a)", _seed("a"), 32, 0, 16),
        ("sha256(a)", _seed("a"), 32, 3, 9),
        ("sha256(a)", _seed("a"), 64, 0, 8),
        ("sha256(b)", _seed("b"), 64, 5, 7),
        ("wrap128", wrap, 32, 1, 12),
    ]:
        masks.append(
            {
                "name": name,
                "seed": seed.hex(),
                "bits": bits,
                "offset": off,
                "values": ref_mask(seed, n, bits, off),
            }
        )
    (HERE / "mpc_prg_kat.json").write_text(
        json.dumps({"cipher": "aes-128-ctr", "keystream": prg, "mask": masks}, indent=1) + "\n"
    )

    kdf = []
    for key, label, parts in [
        (bytes(32), b"label", []),
        (_seed("k"), b"murmur.secagg.pair-seed.v1", [bytes(8), b"g", b"a" * 32, b"b" * 32]),
        (_seed("k")[:16], b"", [b"", b"x"]),
        (_seed("k") * 2, b"ab", [b"c"]),
        (_seed("k") * 2, b"a", [b"bc"]),
    ]:
        kdf.append(
            {
                "key": key.hex(),
                "label": label.hex(),
                "parts": [p.hex() for p in parts],
                "out": ref_derive(key, label, *parts).hex(),
            }
        )
    pairs = []
    for secret, rnd, group, a, b in [
        (_seed("s1"), 0, b"group-0", b"\x01" * 32, b"\x02" * 32),
        (_seed("s1"), 1, b"group-0", b"\x02" * 32, b"\x01" * 32),
        (_seed("s2"), 2**64 - 1, b"", _seed("id-a"), _seed("id-b")),
    ]:
        lo, hi = sorted((a, b))
        out = ref_derive(
            secret, b"murmur.secagg.pair-seed.v1", rnd.to_bytes(8, "big"), group, lo, hi
        )
        pairs.append(
            {
                "shared_secret": secret.hex(),
                "round": rnd,
                "group": group.hex(),
                "a": a.hex(),
                "b": b.hex(),
                "seed": out.hex(),
            }
        )
    (HERE / "mpc_kdf_kat.json").write_text(
        json.dumps({"derive": kdf, "pair_seed": pairs}, indent=1) + "\n"
    )


if __name__ == "__main__":
    main()
