"""The messages of the secure-aggregation protocol (``mpc.protocol``), one frozen dataclass each.

Every message names its ``group`` and ``round`` so that the network layer can route it to the
right ``Member`` and the member can refuse one meant for another round. Field types are limited
to what p2p's codec carries: int, bool, bytes, torch.Tensor, tuple[bytes, ...] and
dict[bytes, bytes].

``SECRET`` says how the transport must carry a message:

* ``SECRET = True``: the message holds secret material in the clear (revealed Shamir shares);
  it must be sent sealed (encrypted and authenticated to its recipient).
* ``SECRET = False``: the message holds public keys, masked data, aggregate sums or data that
  mpc already encrypted end-to-end (``ShareKeys.sealed`` is a NaCl Box to its recipient);
  authenticating the sender (a MAC) is enough.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import Tensor

__all__ = [
    "MESSAGE_TYPES",
    "AdvertiseKeys",
    "ChunkSum",
    "MaskedChunk",
    "Message",
    "ReassignedChunk",
    "Receipt",
    "Reveal",
    "ShareKeys",
    "View",
]


@dataclass(frozen=True, slots=True)
class AdvertiseKeys:
    """Stage 1, to every member: this round's X25519 public keys, signed by the identity key.

    The signature (``mpc.keys.sign_advertisement``) covers round, group, the sender's id and
    both public keys, so a forged or replayed advertisement is refused with ``BadSignature``.
    """

    TYPE: ClassVar[str] = "secagg.advertise"
    SECRET: ClassVar[bool] = False

    group: bytes
    round: int
    agreement_public: bytes
    box_public: bytes
    signature: bytes


@dataclass(frozen=True, slots=True)
class ShareKeys:
    """Stage 2, to each neighbour: the sender's Shamir shares for this recipient, sealed.

    ``sealed`` is ``mpc.keys.seal_to`` of the recipient's share of the sender's self-mask seed
    followed by its share of the sender's agreement private key (66 + 66 bytes); the x-coordinate
    is the recipient's position in the sorted member list plus one.
    """

    TYPE: ClassVar[str] = "secagg.shares"
    SECRET: ClassVar[bool] = False  # already end-to-end encrypted by mpc

    group: bytes
    round: int
    sealed: bytes


@dataclass(frozen=True, slots=True)
class MaskedChunk:
    """Stage 3, to the reducer of ``chunk``: that slice of the sender's masked input.

    Also sent once more to the member after the sender, carrying the sender's *own* chunk, as a
    backup in case the sender drops before reducing it. ``neighbours`` are the members the
    sender masked with (its mask-graph neighbours whose shares it received).
    """

    TYPE: ClassVar[str] = "secagg.masked"
    SECRET: ClassVar[bool] = False

    group: bytes
    round: int
    chunk: int
    data: Tensor
    neighbours: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Receipt:
    """Consistency step, to every member: whose masked chunk this reducer received.

    ``received`` lists (sorted) the senders of the reducer's own chunk; ``backup`` says whether
    it holds the backup of its predecessor's own chunk. Receipts fix which inputs are counted.
    """

    TYPE: ClassVar[str] = "secagg.receipt"
    SECRET: ClassVar[bool] = False

    group: bytes
    round: int
    received: tuple[bytes, ...]
    backup: bool


@dataclass(frozen=True, slots=True)
class View:
    """View check, to every member: the digest of the counted set the sender would reveal for.

    ``digest`` is BLAKE2b-256 over the sender's counted, dropped and live sets (see
    ``mpc.state.MemberState._view_digest``); ``signature`` is the sender's Ed25519 identity
    signature over (round, group, sender id, digest), so a member that sends two different views
    can be proven to have equivocated. A member reveals nothing unless every live member's view
    carries its own digest (and at least ``threshold`` do).
    """

    TYPE: ClassVar[str] = "secagg.view"
    SECRET: ClassVar[bool] = False

    group: bytes
    round: int
    digest: bytes
    signature: bytes


@dataclass(frozen=True, slots=True)
class Reveal:
    """Stage 4, to every live reducer: the sender's Shamir shares, in the clear (seal it!).

    ``self_mask_shares`` maps a counted member to the sender's share of its self-mask seed;
    ``key_shares`` maps a dropped member to the sender's share of its agreement private key.
    A member never appears in both, in this or any other reveal by the same sender.
    """

    TYPE: ClassVar[str] = "secagg.reveal"
    SECRET: ClassVar[bool] = True

    group: bytes
    round: int
    self_mask_shares: dict[bytes, bytes] = field(repr=False)
    key_shares: dict[bytes, bytes] = field(repr=False)


@dataclass(frozen=True, slots=True)
class ReassignedChunk:
    """Stage 4, to the fallback reducer of a dropped reducer's chunk: the sender's masked slice."""

    TYPE: ClassVar[str] = "secagg.reassigned"
    SECRET: ClassVar[bool] = False

    group: bytes
    round: int
    chunk: int
    data: Tensor


@dataclass(frozen=True, slots=True)
class ChunkSum:
    """Stage 5 (all-gather), to every live member: the unmasked ring sum of one chunk.

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


Message = (
    AdvertiseKeys | ShareKeys | MaskedChunk | Receipt | View | Reveal | ReassignedChunk | ChunkSum
)
"""The closed union of secure-aggregation messages."""

MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        AdvertiseKeys,
        ShareKeys,
        MaskedChunk,
        Receipt,
        View,
        Reveal,
        ReassignedChunk,
        ChunkSum,
    )
}
"""Type tag -> message class, for codecs."""
