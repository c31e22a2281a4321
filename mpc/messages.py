"""The messages of the secure-aggregation protocol (``mpc.protocol``), one frozen dataclass each.

Every message names its ``group`` and ``round`` so that the network layer can route it to the
right ``Member`` and the member can refuse one meant for another round. Field types are limited
to what p2p's codec carries: int, bool, bytes, torch.Tensor, tuple[bytes, ...] and
dict[bytes, bytes].

``SECRET`` says how the transport must carry a message:

* ``SECRET = True``: the message holds secret material in the clear (revealed shares and seeds);
  it must be sent sealed (encrypted and authenticated to its recipient).
* ``SECRET = False``: the message holds masked data, aggregate sums, digests or data that mpc
  already encrypted end to end (``Input.sealed``); authenticating the sender (a MAC) is enough.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import Tensor

__all__ = [
    "MESSAGE_TYPES",
    "ChunkSum",
    "Input",
    "Message",
    "ReassignedChunk",
    "Receipt",
    "Reveal",
    "View",
]


@dataclass(frozen=True, slots=True)
class Input:
    """Stage INPUT, to the reducer of ``chunk``: that slice of the sender's masked input.

    ``sealed`` is the recipient's Shamir share of the sender's self-mask seed, sealed to it
    (``mpc.keys.seal_with`` under the pair's share key from ``mpc.kdf.pair_keys``; the share's
    x-coordinate is the recipient's position in the sorted member list plus one), or empty when
    the recipient is not one of the sender's mask-graph neighbours (SecAgg+). A reducer that
    holds a member's chunk therefore also holds its share: the two travel together.

    ``commitments`` is the dealer's hash commitment to every share it made, 32 bytes per
    x-coordinate 1..k in order (``mpc.state.share_commitment``): the same bytes in every Input
    of the sender (the view digest covers them, so an equivocating dealer makes the group
    abort), and what a revealed share is checked against before it is used.

    ``replica`` is the sender's slice of the chunk before ``chunk`` (``chunk - 1 mod k``): every
    chunk has two reducers, its own member and the next one, so a chunk survives one of them
    dropping and each chunk sum is confirmed by a second member (``mpc.protocol``).
    """

    TYPE: ClassVar[str] = "secagg.input"
    SECRET: ClassVar[bool] = False  # masked data, and a share already sealed end to end by mpc

    group: bytes
    round: int
    chunk: int
    data: Tensor
    sealed: bytes
    commitments: bytes
    replica: Tensor
    deadlines_ms: tuple[int, ...] = ()
    """The sender's proposed stage timeouts, milliseconds (``gossip.deadlines``; empty: none).
    Not part of the protocol's arithmetic: ``gossip.allreduce`` fills and reads it."""


@dataclass(frozen=True, slots=True)
class Receipt:
    """Stage CONSISTENCY, to every member: whose masked chunk this reducer received.

    ``received`` lists (sorted) the senders whose ``Input`` (the reducer's two chunks) arrived.
    Receipts fix which inputs are counted.
    """

    TYPE: ClassVar[str] = "secagg.receipt"
    SECRET: ClassVar[bool] = False

    group: bytes
    round: int
    received: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class View:
    """Stage VIEW, to every member: the digest of the counted set the sender would reveal for.

    ``digest`` is BLAKE2b-256 over the sender's counted and dropped sets and the counted
    dealers' commitments (see ``mpc.state.MemberState._view_digest_of``). A member reveals
    nothing unless every view it received carries its own digest and at least ``threshold`` do
    (itself included). The view is not signed:
    it travels in an authenticated envelope, which is all the agreement argument needs (see
    ``mpc.protocol``); an equivocating member is detected (honest members abort) but not proven
    guilty to third parties.
    """

    TYPE: ClassVar[str] = "secagg.view"
    SECRET: ClassVar[bool] = False

    group: bytes
    round: int
    digest: bytes


@dataclass(frozen=True, slots=True)
class Reveal:
    """Stage UNMASKING, to every live reducer: what unmasks the sum, in the clear (seal it!).

    ``self_mask_shares`` maps a counted member to the sender's share of its self-mask seed;
    ``pair_seeds`` maps a dropped neighbour of the (counted) sender to the one-round pairwise
    mask seed the two share. A member never appears in both, in this or any other reveal by the
    same sender.
    """

    TYPE: ClassVar[str] = "secagg.reveal"
    SECRET: ClassVar[bool] = True

    group: bytes
    round: int
    self_mask_shares: dict[bytes, bytes] = field(repr=False)
    pair_seeds: dict[bytes, bytes] = field(repr=False)


@dataclass(frozen=True, slots=True)
class ReassignedChunk:
    """Stage UNMASKING, to the fallback reducer of a dropped reducer's chunk: the sender's slice."""

    TYPE: ClassVar[str] = "secagg.reassigned"
    SECRET: ClassVar[bool] = False

    group: bytes
    round: int
    chunk: int
    data: Tensor


@dataclass(frozen=True, slots=True)
class ChunkSum:
    """Stage AGGREGATE (all-gather), to every live member: the unmasked ring sum of one chunk.

    Every live reducer of the chunk sends one (both of its two reducers when both are live); a
    member accepts a chunk only when all the sums it gets for it are equal.
    ``counted`` is the BLAKE2b-256 digest of the sorted ids whose inputs the sum covers; a member
    refuses a sum over another set than its own, so a result never mixes two counted sets.
    """

    TYPE: ClassVar[str] = "secagg.chunk_sum"
    SECRET: ClassVar[bool] = False

    group: bytes
    round: int
    chunk: int
    data: Tensor
    counted: bytes


Message = Input | Receipt | View | Reveal | ReassignedChunk | ChunkSum
"""The closed union of secure-aggregation messages."""

MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Input,
        Receipt,
        View,
        Reveal,
        ReassignedChunk,
        ChunkSum,
    )
}
"""Type tag -> message class, for codecs."""
