"""An in-memory driver that runs the whole secure-aggregation protocol among k ``Member`` objects.

For tests, benchmarks and research. Messages are delivered in FIFO order; when nothing is in
flight, the members at the earliest unfinished stage have their deadline pass (``advance()``),
which is how the dropouts of ``dropped`` are detected. A dropped member stops sending at its
stage and receives nothing afterwards. Drop stages, in protocol order:

* ``"input"``: gone from the start (never sends its input, so it is not counted);
* ``"unmasking"``: sent its input, then gone (no receipt, reveal or chunk sum); it is still
  counted when every chunk keeps one of its two reducers live and no neighbour of it is
  dropped, else treated as dropped;
* ``"view"``: also sent its receipt, then gone (no view; the others go on if at least t views
  came, else they abort with nothing revealed); ``"reveal"``: also sent its view, then gone (no
  reveal); ``"aggregate"``: also revealed its shares, then gone before sending its chunk sums.
  These three are recovered from
  (the other reducer of each of its chunks sends the sums) unless it withheld something only
  it held (see ``mpc.protocol``).
"""

from __future__ import annotations

import hashlib
import secrets
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import nacl.signing
import torch
from torch import Tensor

from floor.errors import AggregationAborted, AggregationError, ConfigError
from mpc.fixedpoint import Bits, check_capacity, decode, encode, ring_dtype
from mpc.messages import (
    ChunkSum,
    Input,
    Message,
    ReassignedChunk,
    Receipt,
    Reveal,
    View,
)
from mpc.protocol import Member, Stage

__all__ = ["DROP_STAGES", "GroupRun", "run_group", "secure_sum", "secure_sum_ring"]

DROP_STAGES: dict[str, int] = {
    "input": 0,
    "unmasking": 1,
    "view": 2,
    "reveal": 3,
    "aggregate": 4,
}
"""Stage names accepted in ``dropped``, mapped to the first message kind the member withholds."""

_KIND: dict[type, int] = {
    Input: 0,
    Receipt: 1,
    View: 2,
    Reveal: 3,
    ReassignedChunk: 3,
    ChunkSum: 4,
}


@dataclass(frozen=True)
class GroupRun:
    """The outcome of one in-memory run: ring sum, who was counted, and traffic."""

    ring_sum: Tensor | None
    """The ring sum over the counted members (shape of the inputs); None if the round aborted."""
    counted: tuple[int, ...]
    """Indices of the members whose inputs are in the sum (empty if aborted)."""
    aborted: str | None
    """Why the live members aborted, or None."""
    members: tuple[Member, ...]
    """The member objects (sorted like the inputs), for inspection."""
    messages: int
    """Messages delivered."""
    self_aborted: tuple[int, ...] = ()
    """Live members that aborted on their own while others finished (SecAgg+: a neighbourhood
    too small to share in); their inputs are not counted."""


def _signing_keys(k: int, seed: bytes | None) -> list[nacl.signing.SigningKey]:
    if seed is None:
        return [nacl.signing.SigningKey(secrets.token_bytes(32)) for _ in range(k)]
    return [
        nacl.signing.SigningKey(
            hashlib.blake2b(
                b"murmur.secagg.driver" + i.to_bytes(4, "big") + seed, digest_size=32
            ).digest()
        )
        for i in range(k)
    ]


def run_group(
    vectors: Sequence[Tensor],
    *,
    threshold: int,
    dropped: Mapping[int, str] | None = None,
    degree: int | None = None,
    seed: bytes | None = None,
    round: int = 0,
) -> GroupRun:
    """Run the protocol among ``len(vectors)`` members on ring tensors of one shape and dtype.

    ``seed`` makes identities (and so the mask graph) reproducible; masks and shares always come
    from the OS CSPRNG. Raises ``ConfigError`` for bad arguments; an abort is reported in the
    result, not raised.
    """
    k = len(vectors)
    if k < 2:
        raise ConfigError("secure aggregation needs at least 2 members")
    shape, dtype = vectors[0].shape, vectors[0].dtype
    if any(v.shape != shape or v.dtype != dtype for v in vectors):
        raise ConfigError("all vectors must have one shape and one dtype")
    drops: dict[int, int] = {}
    for i, stage_name in (dropped or {}).items():
        if not 0 <= i < k or stage_name not in DROP_STAGES:
            raise ConfigError(f"bad dropout {i}: {stage_name!r}; stages: {sorted(DROP_STAGES)}")
        drops[i] = DROP_STAGES[stage_name]
    signers = _signing_keys(k, seed)
    ids = [bytes(s.verify_key) for s in signers]
    group = hashlib.blake2b(b"murmur.secagg.driver-group" + b"".join(ids), digest_size=16).digest()
    members = [
        Member(
            signers[i],
            ids,
            group=group,
            round=round,
            vector=vectors[i].reshape(-1),
            threshold=threshold,
            degree=degree,
        )
        for i in range(k)
    ]
    by_id = {m: i for i, m in enumerate(ids)}
    dead: set[int] = set()
    queue: deque[tuple[int, int, Message]] = deque()

    def post(i: int, out: list[tuple[bytes, Message]]) -> None:
        limit = drops.get(i)
        for recipient, msg in out:
            if limit is not None and _KIND[type(msg)] >= limit:
                dead.add(i)
                continue
            queue.append((i, by_id[recipient], msg))

    for i, member in enumerate(members):
        post(i, member.start())
    delivered = 0
    while True:
        while queue:
            sender, recipient, msg = queue.popleft()
            if recipient in dead or members[recipient].finished:
                continue  # a finished member refuses everything (OutOfStage); skip the work
            delivered += 1
            post(recipient, members[recipient].receive(ids[sender], msg))
        waiting = [i for i in range(k) if i not in dead and not members[i].finished]
        if not waiting:
            break
        earliest = min(members[i].stage for i in waiting)
        for i in waiting:
            if members[i].stage == earliest and i not in dead:
                post(i, members[i].advance())
    return _outcome(members, ids, dead, shape, delivered)


def _outcome(
    members: list[Member], ids: list[bytes], dead: set[int], shape: torch.Size, delivered: int
) -> GroupRun:
    live = [m for i, m in enumerate(members) if i not in dead]
    done = [m for m in live if m.stage is Stage.DONE]
    if not done:
        reasons = sorted({m.abort_reason or "" for m in live})
        return GroupRun(
            None, (), "; ".join(reasons) or "every member dropped", tuple(members), delivered
        )
    first = done[0]
    parts = first.output_parts()
    for other in done[1:]:
        theirs = other.output_parts()
        if first.counted != other.counted or not all(
            torch.equal(a, b) for a, b in zip(theirs, parts, strict=True)
        ):
            raise AggregationError("live members disagree on the sum")
    result = torch.cat(parts)
    counted = tuple(i for i, m in enumerate(ids) if m in (first.counted or ()))
    self_aborted = tuple(
        i for i, m in enumerate(members) if i not in dead and m.stage is Stage.ABORTED
    )
    return GroupRun(result.reshape(shape), counted, None, tuple(members), delivered, self_aborted)


def secure_sum_ring(
    vectors: Sequence[Tensor],
    *,
    threshold: int,
    dropped: Mapping[int, str] | None = None,
    degree: int | None = None,
    seed: bytes | None = None,
) -> Tensor:
    """The exact ring sum (int32/int64, wrapping) over the members whose input was counted.

    Raises ``AggregationAborted`` when the round aborts (fewer than ``threshold`` survive).
    """
    run = run_group(vectors, threshold=threshold, dropped=dropped, degree=degree, seed=seed)
    if run.ring_sum is None:
        raise AggregationAborted(run.aborted or "aborted")
    return run.ring_sum


def secure_sum(
    vectors: Sequence[Tensor],
    *,
    threshold: int,
    dropped: Mapping[int, str] | None = None,
    bits: Bits = 64,
    scale: float = 2.0**20,
    degree: int | None = None,
    seed: bytes | None = None,
) -> Tensor:
    """The float64 sum over the counted members of float ``vectors`` (one shape), securely.

    Each vector is encoded at ``scale`` in Z_2^bits (round to nearest), summed by the protocol and
    decoded, so the result equals the sum of the rounded inputs exactly (within k/(2 scale) of
    the true sum). Raises ``AggregationAborted`` below threshold, ``RingOverflow`` if the sum of
    k values as large as the largest input could overflow the ring (checked before any work).
    """
    ring_dtype(bits)
    if vectors:
        bound = max(float(v.detach().abs().max()) if v.numel() else 0.0 for v in vectors)
        check_capacity(bound=bound, members=len(vectors), scale=scale, bits=bits)
    encoded = [encode(v, scale=scale, bits=bits) for v in vectors]
    ring = secure_sum_ring(encoded, threshold=threshold, dropped=dropped, degree=degree, seed=seed)
    return decode(ring, scale=scale, bits=bits)
