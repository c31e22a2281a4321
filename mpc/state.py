"""State and message handling of one secure-aggregation member (the machine is ``mpc.protocol``).

``MemberState`` holds a member's configuration, its per-round secrets and what it received, and
validates and stores incoming messages; ``mpc.protocol.Member`` adds the stage transitions.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from typing import Any

import nacl.signing
import torch
from torch import Tensor

from floor.errors import (
    AggregationAborted,
    ConfigError,
    InconsistentMessage,
    MalformedMessage,
    OutOfStage,
    ProtocolError,
    SumRejected,
)
from mpc import keys as mkeys
from mpc.graph import mask_graph
from mpc.kdf import pair_keys
from mpc.messages import (
    ChunkSum,
    Input,
    Message,
    ReassignedChunk,
    Receipt,
    Reveal,
    View,
)
from mpc.prg import SEED_BYTES
from mpc.shamir import SHARE_BYTES, Share, combine
from mpc.survivors import ReceiptView, chunk_bounds, counted_set, dropped_set

__all__ = [
    "STAGE_OF",
    "MemberState",
    "Outgoing",
    "Stage",
    "default_threshold",
    "warm_pair_roots",
]

Outgoing = list[tuple[bytes, Message]]
"""Messages to send: ``(recipient member id, message)`` pairs."""


class Stage(enum.IntEnum):
    """Protocol stages in order; DONE and ABORTED are terminal."""

    INPUT = 1
    CONSISTENCY = 2
    VIEW = 3
    UNMASKING = 4
    AGGREGATE = 5
    DONE = 6
    ABORTED = 7


STAGE_OF: dict[type, Stage] = {
    Input: Stage.INPUT,
    Receipt: Stage.CONSISTENCY,
    View: Stage.VIEW,
    Reveal: Stage.UNMASKING,
    ReassignedChunk: Stage.UNMASKING,
    ChunkSum: Stage.AGGREGATE,
}

_BITS: dict[torch.dtype, int] = {torch.int32: 32, torch.int64: 64}

_COMBINED_GROUPS = 1 << 10
_COMBINED: dict[tuple[bytes, int], dict[tuple[int, tuple[tuple[int, bytes], ...]], bytes]] = {}
"""(group, round) -> (threshold, shares) -> reconstructed secret; see ``MemberState._combine``."""

_REVEALS: dict[tuple[bytes, int], dict[int, Reveal]] = {}
"""(group, round) -> id -> a Reveal whose shares all opened their commitments."""

_VIEW_DOMAIN = b"murmur.secagg.view.v4"
_COMMIT_DOMAIN = b"murmur.secagg.share-commitment.v1"
COMMITMENT_BYTES = 32


def share_commitment(*, group: bytes, round: int, dealer: bytes, x: int, y: bytes) -> bytes:
    """BLAKE2b-256 over the domain, round, group, dealer id, x and the share value ``y``: the
    dealer's binding commitment to its share at ``x``. Hiding too: ``y`` is a field element
    with at least the secret's 256 bits of entropy left to anyone holding fewer than the
    threshold of shares, so the digest cannot be inverted or tested against guesses."""
    data = b"".join(
        (
            _COMMIT_DOMAIN,
            round.to_bytes(8, "big"),
            len(group).to_bytes(2, "big"),
            group,
            dealer,
            x.to_bytes(4, "big"),
            y,
        )
    )
    return hashlib.blake2b(data, digest_size=COMMITMENT_BYTES).digest()


_SIGNERS: dict[bytes, nacl.signing.SigningKey] = {}
_SIGNERS_MAX = 1 << 14


def _signing_key(seed: bytes) -> nacl.signing.SigningKey:
    """``SigningKey(seed)``, kept per process (deriving the key pair costs ~20 us a round)."""
    key = _SIGNERS.get(seed)
    if key is None:
        if len(_SIGNERS) >= _SIGNERS_MAX:
            del _SIGNERS[next(iter(_SIGNERS))]
        key = _SIGNERS[seed] = nacl.signing.SigningKey(seed)
    return key


@lru_cache(maxsize=64)
def _graph(
    members: tuple[bytes, ...], degree: int | None, seed: bytes
) -> dict[bytes, frozenset[bytes]]:
    """``mask_graph``, computed once per group in a process (the members of an in-memory run)."""
    return mask_graph(members, degree=degree, seed=seed)


def warm_pair_roots(members: Iterable[MemberState], *, threads: int = 2) -> int:
    """Compute the pair roots the given members will need, ``threads`` at a time (a simulator
    calls this when it forms a round's groups); returns how many were computed."""
    return mkeys.warm_pair_roots(
        ((m._signing_key, m.id, v) for m in members for v in m._graph[m.id]), threads=threads
    )


def default_threshold(k: int) -> int:
    """The default threshold for ``k`` members: ceil(2k/3), always more than k/2."""
    return -(-2 * k // 3)


def _check_threshold(name: str, t: int, n: int) -> None:
    if isinstance(t, bool) or not isinstance(t, int) or not n / 2 < t <= n:
        raise ConfigError(f"{name} must be an integer in (n/2, n] = ({n / 2}, {n}], got {t!r}")


class MemberState:
    """One member's configuration, secrets and received messages (see ``mpc.protocol.Member``).

    ``signing_key`` is the member's Ed25519 identity (32-byte seed or ``SigningKey``); its verify
    key is the member id and must be in ``members``. Its pair keys with the other members come
    from it (``mpc.keys.pair_root``). ``vector`` is the member's input, a 1-D int32 (Z_2^32) or
    int64 (Z_2^64) ring tensor of the same length for every member. ``threshold`` is the least
    number of counted inputs (default ceil(2k/3), must exceed k/2). ``degree`` selects SecAgg+
    (masks and shares only among mask-graph neighbours drawn from ``graph_seed``, default derived
    from group and round); ``neighbourhood_threshold`` is then the Shamir threshold within each
    neighbourhood of size degree + 1 (default ceil(2(degree+1)/3)).
    """

    def __init__(
        self,
        signing_key: bytes | nacl.signing.SigningKey,
        members: Sequence[bytes],
        *,
        group: bytes,
        round: int,
        vector: Tensor,
        threshold: int | None = None,
        degree: int | None = None,
        graph_seed: bytes | None = None,
        neighbourhood_threshold: int | None = None,
    ) -> None:
        if not isinstance(signing_key, nacl.signing.SigningKey):
            if not isinstance(signing_key, bytes) or len(signing_key) != 32:
                raise ConfigError("signing_key must be a 32-byte Ed25519 seed or a SigningKey")
            signing_key = _signing_key(signing_key)
        self._signing_key = signing_key
        self.id: bytes = bytes(signing_key.verify_key)
        self.members: tuple[bytes, ...] = tuple(sorted(bytes(m) for m in members))
        k = len(self.members)
        if len(set(self.members)) != k or any(len(m) != 32 for m in self.members):
            raise ConfigError("members must be distinct 32-byte ids")
        if k < 2 or self.id not in self.members:
            raise ConfigError("a group needs at least 2 members, including this one")
        if isinstance(round, bool) or not isinstance(round, int) or not 0 <= round < 1 << 64:
            raise ConfigError(f"round must be an integer in [0, 2^64), got {round!r}")
        if vector.dtype not in _BITS or vector.dim() != 1:
            raise ConfigError("vector must be a 1-D int32 or int64 ring tensor")
        self.group, self.round, self.k = bytes(group), round, k
        self.threshold = default_threshold(k) if threshold is None else threshold
        _check_threshold("threshold", self.threshold, k)
        self._x = vector.detach().contiguous()
        self._dtype = vector.dtype
        self._index = {m: i for i, m in enumerate(self.members)}
        self._me = self._index[self.id]
        self._bounds = chunk_bounds(vector.numel(), k)
        if graph_seed is None:
            graph_seed = hashlib.blake2b(
                b"murmur.secagg.graph-seed" + round.to_bytes(8, "big") + self.group,
                digest_size=32,
            ).digest()
        self._graph_seed = graph_seed
        self._graph = _graph(self.members, degree, graph_seed)
        size = len(self._graph[self.id]) + 1
        if size == k:
            self.local_threshold = self.threshold
        else:
            self.local_threshold = (
                default_threshold(size)
                if neighbourhood_threshold is None
                else neighbourhood_threshold
            )
            _check_threshold("neighbourhood_threshold", self.local_threshold, size)
        self._stage = Stage.INPUT
        self._started = False
        self._seen: set[tuple[str, bytes, int]] = set()
        self._pending: dict[Stage, list[tuple[bytes, Message]]] = {}
        self.refused: list[tuple[bytes, ProtocolError]] = []
        """Refusals of buffered messages, found when their stage began: (sender, error)."""
        self._held: dict[bytes, bytes] = {}  # owner -> my share of its self-mask seed
        self._commitments: dict[bytes, bytes] = {}  # dealer -> its k share commitments
        self.blamed: dict[bytes, str] = {}
        """Members caught in a lie this round (raw id -> what they did): a revealed share that
        fails its dealer's commitment, a dealt share that fails its own."""
        self._pairs: dict[bytes, tuple[bytes, bytes]] = {}  # peer -> (mask seed, share key)
        self._self_seed = b""
        self._masked_input: Tensor | None = None
        self._chunks: dict[bytes, Tensor] = {}  # sender -> its slice of my own chunk
        self._replicas: dict[bytes, Tensor] = {}  # sender -> its slice of my predecessor's chunk
        self._reducers: list[tuple[bytes, ...]] = []  # chunk -> who sends its sum (from VIEW)
        self._fallback: set[int] = set()  # uncovered chunks this member reduces as fallback
        self._receipts: dict[bytes, ReceiptView] = {}
        self._live: frozenset[bytes] = frozenset()
        self._quiet: frozenset[bytes] = frozenset()  # live members whose view never came
        self._counted: frozenset[bytes] | None = None
        self._counted_digest = b""  # BLAKE2b of the counted set, once decided (VIEW)
        self._dropped: frozenset[bytes] = frozenset()
        self._revealed: dict[bytes, str] = {}  # peer -> "b" or "s": the ledger
        self._views: dict[bytes, bytes] = {}  # member -> digest of its view (mine included)
        self._view_digest: bytes = b""
        self._reveals: dict[bytes, Reveal] = {}
        self._assigned: dict[int, dict[bytes, Tensor]] = {}  # chunk I reduce -> sender -> slice
        self._sums: dict[int, dict[bytes, Tensor]] = {}  # chunk -> reducer -> its sum (mine too)
        self._result: Tensor | None = None
        self._parts: list[Tensor] | None = None  # the agreed chunk sums, in order, once DONE
        self._abort_reason: str | None = None
        self._rejected = False  # the abort is a result refused by a check (SumRejected)

    # ------------------------------------------------------------------ queries

    @property
    def stage(self) -> Stage:
        """The current stage."""
        return self._stage

    @property
    def finished(self) -> bool:
        """True once DONE or ABORTED."""
        return self._stage >= Stage.DONE

    @property
    def result(self) -> Tensor | None:
        """The ring sum over the counted members (1-D), once DONE; else None."""
        if self._result is None and self._parts is not None:
            self._result = torch.cat(self._parts)  # on demand: gossip decodes from the parts
        return self._result

    @property
    def abort_reason(self) -> str | None:
        """Why the member aborted, if it did."""
        return self._abort_reason

    @property
    def counted(self) -> frozenset[bytes] | None:
        """The members whose inputs are counted, once the agreement step is over."""
        return self._counted

    @property
    def revealed(self) -> dict[bytes, str]:
        """The ledger: for each peer, what this member revealed about it.

        ``"b"``: its share of the peer's self-mask seed; ``"s"``: the pairwise seed of the two.
        """
        return dict(self._revealed)

    @property
    def recovered(self) -> bool:
        """True if the round finished although members dropped after their input: a counted
        member that sent no receipt, a live one whose view or reveal never came, or a live
        reducer whose chunk sum never came (the other reducer's served)."""
        if self._stage is not Stage.DONE:
            return False
        if (
            self._quiet
            or not (self._counted or frozenset()) <= self._live
            or not self._live <= self._reveals.keys()
        ):
            return True
        return any(len(self._sums.get(j, ())) < len(r) for j, r in enumerate(self._reducers))

    @property
    def sum_rejected(self) -> bool:
        """True if the round aborted because a result failed a check (two reducers of a chunk
        sent different sums); ``blamed`` names the liar where this member can tell."""
        return self._rejected

    def output(self) -> Tensor:
        """The ring sum; ``AggregationAborted`` (``SumRejected`` if a check refused the result)
        if the round aborted, ``OutOfStage`` if running."""
        if self._stage is Stage.ABORTED:
            error = SumRejected if self._rejected else AggregationAborted
            raise error(self._abort_reason or "aborted")
        result = self.result
        if result is None:
            raise OutOfStage(f"the round is not finished (stage {self._stage.name})")
        return result

    def output_parts(self) -> list[Tensor]:
        """The ring sum as its k chunk sums in order (``output()`` is their concatenation), with
        the same errors as ``output()``. A caller that decodes chunk by chunk saves the copy
        into one int64 vector."""
        parts = self._parts
        if parts is None:
            self.output()  # raises: the round aborted, or is not finished
            raise OutOfStage("the round is not finished")
        return list(parts)

    # ------------------------------------------------------------------ helpers

    def _pair(self, peer: bytes) -> tuple[bytes, bytes]:
        """This round's (mask seed, share key) of the pair (me, peer), derived once per round."""
        keys = self._pairs.get(peer)
        if keys is None:
            root = mkeys.pair_root(self._signing_key, peer, me=self.id)
            keys = pair_keys(root, round=self.round, group=self.group, a=self.id, b=peer)
            self._pairs[peer] = keys
        return keys

    def _combine(self, owner: bytes) -> bytes:
        """Reconstruct ``owner``'s self-mask seed from the revealed shares.

        The result is cached process-wide by the exact shares and threshold (every member of a
        group in one process reconstructs the same secrets from the same broadcast reveals; the
        secret is one that all of them learn anyway). Failures are not cached.
        """
        points = []
        for holder, reveal in self._reveals.items():
            got = reveal.self_mask_shares.get(owner)
            if got is not None:
                points.append((self._index[holder] + 1, got))
        points.sort()
        key = (self.local_threshold, tuple(points))
        cache = _COMBINED.get((self.group, self.round))
        secret = None if cache is None else cache.get(key)
        if secret is None:
            shares = [Share(x, y) for x, y in points]
            secret = combine(shares, threshold=self.local_threshold)
            if cache is None:
                if len(_COMBINED) >= _COMBINED_GROUPS:
                    del _COMBINED[next(iter(_COMBINED))]
                cache = _COMBINED[(self.group, self.round)] = {}
            cache[key] = secret
        return secret

    def _share_opens(self, dealer: bytes, position: int, y: bytes, commitments: bytes) -> bool:
        """Whether ``y`` is the share ``dealer`` committed to at x = ``position`` + 1."""
        lo = position * COMMITMENT_BYTES
        got = share_commitment(
            group=self.group, round=self.round, dealer=dealer, x=position + 1, y=y
        )
        return hmac.compare_digest(got, commitments[lo : lo + COMMITMENT_BYTES])

    def _forget_combined(self) -> None:
        """Drop this group round's cached reconstructions (this member finished or aborted)."""
        _COMBINED.pop((self.group, self.round), None)
        _REVEALS.pop((self.group, self.round), None)

    def _view_digest_of(self, counted: frozenset[bytes], dropped: frozenset[bytes]) -> bytes:
        """BLAKE2b-256 over round, group, the sorted counted and dropped ids, and the counted
        dealers' commitments: exactly what fixes what a member reveals about each peer."""
        h = hashlib.blake2b(_VIEW_DOMAIN, digest_size=32)
        h.update(self.round.to_bytes(8, "big") + len(self.group).to_bytes(2, "big") + self.group)
        for part in (counted, dropped):
            h.update(len(part).to_bytes(4, "big"))
            for m in sorted(part):
                h.update(m)
        for m in sorted(counted):  # the dealers' commitments everyone will check shares by
            h.update(self._commitments.get(m, bytes(COMMITMENT_BYTES * self.k)))
        return h.digest()

    def _kinds(self, counted: frozenset[bytes], dropped: frozenset[bytes]) -> dict[bytes, str]:
        """What this member would reveal about each peer for the view (counted, dropped)."""
        kinds = {u: "b" for u in counted if u in self._held}
        if self.id in counted:
            kinds.update({v: "s" for v in self._graph[self.id] & dropped})
        return kinds

    def _check_ledger(self, kinds: dict[bytes, str]) -> None:
        for peer, kind in kinds.items():
            before = self._revealed.get(peer)
            if before is not None and before != kind:
                raise InconsistentMessage(
                    "refused: this would reveal both a self-mask share and a pair seed of a peer"
                )

    def _check_late_receipt(self, sender: bytes, msg: Receipt) -> None:
        """A receipt after the agreement step: refuse it outright if it asks for the other kind."""
        if self._counted is None:
            return
        receipts = dict(self._receipts)
        receipts[sender] = ReceiptView(frozenset(msg.received))
        counted = counted_set(self.members, receipts, self._graph)
        self._check_ledger(self._kinds(counted, dropped_set(counted, self._graph)))

    @staticmethod
    def _counted_digest_of(counted: frozenset[bytes]) -> bytes:
        """BLAKE2b-256 of the sorted counted ids (what a ``ChunkSum`` is a sum over)."""
        h = hashlib.blake2b(b"murmur.secagg.counted.v1", digest_size=32)
        for m in sorted(counted):
            h.update(m)
        return h.digest()

    def _handle_pending(self, stage: Stage) -> None:
        """Handle the messages buffered for ``stage`` (now current); keep their refusals."""
        for sender, msg in self._pending.pop(stage, []):
            try:
                self._handle(sender, msg)
            except ProtocolError as exc:
                self.refused.append((sender, exc))

    def _check_slice(self, chunk: int, data: Tensor) -> None:
        """Refuse a slice of the wrong ring, rank or length (checked before buffering)."""
        if not isinstance(data, Tensor) or data.dtype != self._dtype or data.dim() != 1:
            raise MalformedMessage(f"masked data must be a 1-D {self._dtype} tensor")
        lo, hi = self._bounds[chunk]
        if data.numel() != hi - lo:
            raise InconsistentMessage(f"chunk {chunk} must hold {hi - lo} elements")

    # ------------------------------------------------------------------ message handlers

    def _handle(self, sender: bytes, msg: Message) -> None:
        _HANDLERS[type(msg)](self, sender, msg)

    def _on_input(self, sender: bytes, msg: Input) -> None:
        if msg.chunk != self._me:
            raise InconsistentMessage(f"chunk {msg.chunk} is not reduced by this member")
        commitments = msg.commitments
        if commitments.__class__ is not bytes or len(commitments) != COMMITMENT_BYTES * self.k:
            raise MalformedMessage(f"commitments must be {COMMITMENT_BYTES} bytes per member")
        sealed = msg.sealed
        if sender in self._graph[self.id]:
            share = mkeys.open_with(
                self._pair(sender)[1],
                sealed,
                round=self.round,
                group=self.group,
                sender=sender,
                recipient=self.id,
            )
            if len(share) != SHARE_BYTES:
                raise InconsistentMessage(f"a sealed share must hold {SHARE_BYTES} bytes")
            if not self._share_opens(sender, self._me, share, commitments):
                self.blamed[sender] = "dealt a share that fails its own commitment"
                raise InconsistentMessage("the dealt share fails the dealer's commitment")
            self._held[sender] = share
        elif sealed:
            raise InconsistentMessage("a share from a member that is not a mask-graph neighbour")
        self._commitments[sender] = commitments
        self._chunks[sender] = msg.data
        self._replicas[sender] = msg.replica

    def _on_receipt(self, sender: bytes, msg: Receipt) -> None:
        received = frozenset(msg.received)
        if len(received) != len(msg.received) or not received <= self._index.keys():
            raise InconsistentMessage("a receipt must list distinct group members")
        self._receipts[sender] = ReceiptView(received)

    def _on_view(self, sender: bytes, msg: View) -> None:
        digest = msg.digest
        if not isinstance(digest, bytes) or len(digest) != 32:
            raise MalformedMessage("a view digest must be 32 bytes")
        self._views[sender] = digest

    def _on_reveal(self, sender: bytes, msg: Reveal) -> None:
        if sender not in self._live:
            raise InconsistentMessage("a reveal from a member that sent no receipt")
        shares, seeds = msg.self_mask_shares, msg.pair_seeds
        if shares.keys() & seeds.keys():
            raise InconsistentMessage("the sender revealed both a share and a seed of one peer")
        counted = self._counted or frozenset()
        neighbours = self._graph[sender]  # the mask graph is undirected
        owners = shares.keys()
        if not owners <= counted or not owners - {sender} <= neighbours:
            raise InconsistentMessage("a revealed share of a peer not counted or not held")
        if not all(y.__class__ is bytes and len(y) == SHARE_BYTES for y in shares.values()):
            raise MalformedMessage(f"a share value must be {SHARE_BYTES} bytes")
        # Every member that reveals agreed on the view, which covers the counted dealers'
        # commitments, so a reveal that opens for one member of this process opens for all:
        # the simulator's members share one Reveal object and check it once.
        verified = _REVEALS.get((self.group, self.round))
        if verified is None:
            if len(_REVEALS) >= _COMBINED_GROUPS:
                del _REVEALS[next(iter(_REVEALS))]
            verified = _REVEALS[(self.group, self.round)] = {}
        if verified.get(id(msg)) is not msg:
            position = self._index[sender]
            for owner, y in shares.items():
                commitments = self._commitments.get(owner)
                if commitments is None or not self._share_opens(owner, position, y, commitments):
                    self.blamed[sender] = "revealed a share that fails its dealer's commitment"
                    raise InconsistentMessage("a revealed share fails its dealer's commitment")
            verified[id(msg)] = msg  # kept alive here, so its id is not reused meanwhile
        if seeds:
            if sender not in counted:
                raise InconsistentMessage("pair seeds revealed by a member that is not counted")
            if not seeds.keys() <= self._dropped & neighbours:
                raise InconsistentMessage("a revealed seed with a peer not dropped or not paired")
            if not all(s.__class__ is bytes and len(s) == SEED_BYTES for s in seeds.values()):
                raise MalformedMessage(f"a pair seed must be {SEED_BYTES} bytes")
        self._reveals[sender] = msg

    def _on_reassigned(self, sender: bytes, msg: ReassignedChunk) -> None:
        got = self._assigned.get(msg.chunk)
        if got is None or msg.chunk not in self._fallback:
            raise InconsistentMessage(f"chunk {msg.chunk} was not reassigned to this member")
        if sender not in (self._counted or ()):
            raise InconsistentMessage("a reassigned slice from a member that is not counted")
        got[sender] = msg.data

    def _on_chunk_sum(self, sender: bytes, msg: ChunkSum) -> None:
        if sender not in self._reducers[msg.chunk]:
            raise InconsistentMessage(f"chunk {msg.chunk} is not reduced by this sender")
        if not hmac.compare_digest(bytes(msg.counted), self._counted_digest):
            raise InconsistentMessage("the chunk sum covers another set of members than ours")
        self._sums.setdefault(msg.chunk, {})[sender] = msg.data


_HANDLERS: dict[type, Callable[[MemberState, bytes, Any], None]] = {
    Input: MemberState._on_input,
    Receipt: MemberState._on_receipt,
    View: MemberState._on_view,
    Reveal: MemberState._on_reveal,
    ReassignedChunk: MemberState._on_reassigned,
    ChunkSum: MemberState._on_chunk_sum,
}
"""Message type -> handler (one dict lookup instead of a chain of isinstance checks)."""
