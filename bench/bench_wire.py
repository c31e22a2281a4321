"""Wire benchmark: envelope encode+auth and decode+verify against raw msgpack of the same bytes.

For tensor messages of 100 B, 4 MB and 40 MB (float32), in one run: raw ``msgpack.packb`` /
``unpackb`` of the tensor's bytes, a BLAKE2b-256 digest of them, and the envelope codec in each
auth mode (signed, sealed, MAC). Decoding is measured from ``bytes`` (tensors copied once) and
from ``bytearray`` (tensors alias the buffer). The goal: within 1.5x of raw + one digest.

    python -m bench.bench_wire [--quick] [--out bench/results/wire.md]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import msgpack
import torch

from floor.envelope import Auth, EnvelopeCodec
from floor.identity import Identity
from floor.messages import build_registry
from floor.replay import ReplayCache
from p2p.messages import MESSAGE_TYPES


@dataclass(frozen=True, slots=True)
class TensorMessage:
    """A message carrying one tensor, like a masked model vector."""

    TYPE: ClassVar[str] = "bench_tensor"
    round: int
    data: torch.Tensor


TYPES = build_registry([*MESSAGE_TYPES.values(), TensorMessage])
SIZES = {"100 B": 100, "4 MB": 4 * 2**20, "40 MB": 40 * 2**20}


@dataclass
class _Op:
    """One timed operation: ``run`` does ``batch`` calls; ``setup`` runs untimed before it."""

    run: Callable[[], object]
    batch: int
    setup: Callable[[], None] | None = None


def _interleaved(ops: dict[str, _Op], reps: int) -> dict[str, float]:
    """Median seconds per call. Ops take turns within each repetition, so that the load of
    this shared machine hits the raw baseline and the envelope codec alike."""
    times: dict[str, list[float]] = {name: [] for name in ops}
    for _ in range(reps):
        for name, op in ops.items():
            if op.setup is not None:
                op.setup()
            start = time.perf_counter()
            op.run()
            times[name].append((time.perf_counter() - start) / op.batch)
    return {name: statistics.median(t) for name, t in times.items()}


def _repeat(fn: Callable[[], object], batch: int) -> _Op:
    return _Op(lambda: [fn() for _ in range(batch)], batch)


def _decode_op(
    receiver: EnvelopeCodec, envelopes: list[bytes], convert: Callable[[bytes], bytes | bytearray]
) -> _Op:
    """Decode a batch of distinct envelopes; the replay cache is reset (untimed) before."""
    inputs: list[bytes | bytearray] = []

    def setup() -> None:
        receiver._replay = ReplayCache(receiver.window_s, 10_000_000)
        inputs[:] = [convert(e) for e in envelopes]

    def run() -> None:
        for data in inputs:
            receiver.decode(data)
        inputs.clear()

    return _Op(run, len(envelopes), setup)


def bench_size(nbytes: int, reps: int) -> dict[str, float]:
    """Seconds per operation for one message size."""
    alice, bob = Identity.from_seed(b"a" * 32), Identity.from_seed(b"b" * 32)
    sender = EnvelopeCodec(alice, message_types=TYPES)
    receiver = EnvelopeCodec(bob, message_types=TYPES, replay_capacity=10_000_000)
    tensor = torch.randn(nbytes // 4, dtype=torch.float32)
    message: Any = TensorMessage(1, tensor)  # outside the closed union's static type
    raw = bytes(tensor.numpy())
    packed = msgpack.packb(raw, use_bin_type=True)
    batch = max(1, min(1000, int(4e6 // nbytes)))
    ops = {
        "raw pack": _repeat(lambda: msgpack.packb(raw, use_bin_type=True), batch),
        "raw unpack": _repeat(lambda: msgpack.unpackb(packed), batch),
        "digest": _repeat(lambda: hashlib.blake2b(raw, digest_size=32).digest(), batch),
    }
    for auth in Auth:
        name = auth.name.lower()

        def encode(auth: Auth = auth) -> bytes:
            return sender.encode(message, recipient=bob.peer_id, auth=auth)

        ops[f"encode {name}"] = _repeat(encode, batch)
        # Decoding needs fresh nonces: a batch of distinct envelopes, replay cache reset.
        envelopes = [encode() for _ in range(batch)]
        receiver.decode(envelopes[0])  # warm the pair-key cache
        for kind, convert in (("bytes", bytes), ("bytearray", bytearray)):
            ops[f"decode {name} ({kind})"] = _decode_op(receiver, envelopes, convert)
    return _interleaved(ops, reps)


def bench_primitives(reps: int) -> dict[str, float]:
    """Seconds per call of the crypto primitives on a 100-byte message, for context."""
    import nacl.bindings
    import nacl.signing
    from cryptography.hazmat.primitives.poly1305 import Poly1305

    ident = Identity.from_seed(b"p" * 32)
    other = Identity.from_seed(b"q" * 32).peer_id
    msg = os.urandom(100)
    sig = ident.sign(msg)
    verify_key = nacl.signing.VerifyKey(ident.peer_id.raw)
    key, nonce = ident.pair_key(other), os.urandom(24)
    ops = {
        "Ed25519 sign": _repeat(lambda: ident.sign(msg), 1000),
        "Ed25519 verify": _repeat(lambda: verify_key.verify(msg, sig), 1000),
        "SecretBox seal": _repeat(
            lambda: nacl.bindings.crypto_secretbox_easy(msg, nonce, key), 1000
        ),
        "Poly1305 tag": _repeat(lambda: Poly1305.generate_tag(key, msg), 1000),
    }
    return _interleaved(ops, reps)


def _fmt(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    return f"{seconds * 1e3:.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--reps", type=int, default=11, help="repetitions (median reported)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/wire.md"))
    parser.add_argument(
        "--tune-malloc",
        action="store_true",
        help="raise glibc mmap/trim thresholds like the daemon",
    )
    parser.add_argument("--append", action="store_true", help="append to --out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.tune_malloc:
        from p2p.daemon import tune_malloc

        tune_malloc()
    reps = 3 if args.quick else args.reps
    results = {label: bench_size(n, reps) for label, n in SIZES.items()}
    primitives = bench_primitives(reps)
    malloc = (
        "glibc mmap/trim thresholds raised (as `murmur start` does)"
        if args.tune_malloc
        else "default glibc malloc"
    )

    flags = (" --quick" if args.quick else "") + (" --tune-malloc" if args.tune_malloc else "")
    flags += " --append" if args.append else ""
    lines = [
        f"### Run: {malloc}",
        "",
        f"Command: `python -m bench.bench_wire{flags}` "
        f"(median of {reps} repetitions, operations interleaved, 100 B timed in batches "
        f"of 1000). Machine: {platform.machine()}, "
        f"{os.cpu_count()} cores shared with other jobs, Python {platform.python_version()}, "
        f"torch {torch.__version__}, one torch thread.",
        "",
        "A float32 tensor message of each size. *raw* = `msgpack.packb`/`unpackb` of the same "
        "bytes; *goal* = raw + one BLAKE2b-256 digest of the bytes; ratio = time / goal "
        "(target <= 1.5). Decoding from `bytes` copies each tensor once; from `bytearray` the "
        "tensor aliases the received buffer (zero copy).",
        "",
        "| operation | " + " | ".join(f"{k} time | {k} / goal" for k in SIZES) + " |",
        "|---|" + "---|---|" * len(SIZES),
    ]
    names = [n for n in results["100 B"] if n not in ("raw pack", "raw unpack", "digest")]
    for base in ("raw pack", "raw unpack", "digest"):
        cells = [f"{_fmt(results[k][base])} | " for k in SIZES]
        lines.append(f"| {base} | " + " | ".join(c + "" for c in cells) + " |")
    for name in names:
        goal_key = "raw pack" if name.startswith("encode") else "raw unpack"
        cells = []
        for k in SIZES:
            goal = results[k][goal_key] + results[k]["digest"]
            cells.append(f"{_fmt(results[k][name])} | {results[k][name] / goal:.2f}x")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Primitives on 100 B in the same run (the floor for a small envelope):", ""]
    lines += [f"- {name}: {_fmt(t)}" for name, t in primitives.items()]
    text = "\n".join(lines) + "\n\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a" if args.append else "w") as out:
        out.write(text)


if __name__ == "__main__":
    main()
