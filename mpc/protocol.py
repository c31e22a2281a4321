"""Decentralized secure aggregation (Bonawitz et al. 2017, SecAgg+ option): the ``Member`` machine.

There is no server: every member is also the reducer of one chunk of the vector (butterfly
reduce-scatter, then all-gather). ``Member`` is sans-IO: ``start()``, ``receive(sender, msg)`` and
``advance()`` return the messages to send as ``[(recipient_id, message), ...]``; the network
layer calls ``advance()`` when its deadline for the current stage passes (that is how dropouts
are detected). A stage also ends by itself as soon as everything it waits for has arrived.

Stages (``Stage``), each named after what the member collects in it:

1. ADVERTISE_KEYS: send fresh X25519 agreement and box public keys, signed by the Ed25519
   identity key over (round, group, id, keys), to everyone. U1 = members advertised.
2. SHARE_KEYS: Shamir-share the self-mask seed b_u and the agreement private key s_u
   (t-of-n; SecAgg+: only to mask-graph neighbours, neighbourhood threshold), each share sealed
   to its holder (NaCl Box bound to round, group, sender and recipient).
3. MASKED_INPUT: y_u = x_u + PRG(b_u) + sum_v +-PRG(s_uv) over the neighbours v whose shares u
   received (+ if u sorts before v). Chunk j of y_u goes to member j; u's own chunk also goes to
   member u+1 as a backup.
4. CONSISTENCY (receipts): each reducer broadcasts a ``Receipt``: whose chunk it got
   and whether it holds its predecessor's backup. Live reducers R = senders of receipts.
5. VIEW (the view check, after Bonawitz et al.'s consistency round): every member evaluates
   ``mpc.survivors.counted_set`` on the receipts it got: u is counted iff every live reducer
   received u's chunk, every chunk of u reaches a live reducer (u is live, or u is the only
   member not live and its successor holds the backup), and u's pairwise masks are matched.
   D = non-counted members that a counted member masked with. If |C| < t, or fewer than the
   threshold of live holders exist for any secret needed, the member aborts. Otherwise it
   broadcasts a ``View``: the digest of (C, D, live set), signed by its Ed25519 identity key over
   (round, group, id, digest), so a member that sends two views is provably equivocating. The
   stage ends when every live member's view arrived, or at the deadline.
6. UNMASKING: the member reveals only if every live member sent a view, every view it received
   carries exactly its own digest, and at least ``threshold`` members (itself included) did;
   otherwise it aborts *before revealing anything*. Then it sends one ``Reveal`` (b-shares for
   C, s-shares for D) to every live reducer, and its masked slices of dropped reducers' chunks
   to their fallback (the next live member). Views arriving after it revealed are refused
   (``OutOfStage``, or ``DuplicateMessage`` for a second view).
7. AGGREGATE: each reducer reconstructs b_u (u in C) and s_v (v in D), sums chunk j over C and
   removes chunk j's masks with the seekable PRG at the chunk offset, then sends the unmasked
   chunk sum to every live member. A member is DONE when it holds every chunk sum.

Never both shares of one peer. Receipts can reach members unevenly (a reducer that crashes
mid-broadcast, or one that sends different receipts to different members), so two honest
members may compute different counted sets; if one revealed b_u and the other s_u, a reducer
holding its own share of each would get t shares of both and unmask u. The view check stops
this: every member that reveals has seen at least t views equal to its own digest, and since
the group threshold t > k/2, two digests cannot both gather t views from members that send one
view each; and because a revealing member also needs the view of every member it considers live
to match, an honest member with another view that is live to it makes it abort. So all
revealing members reveal for one counted set: each peer gets b-shares or s-shares, never both.
SecAgg+ uses the same check with the group threshold (stronger than the neighbourhood one:
agreement of more than half the group implies agreement within every neighbourhood's revealers).
The argument assumes an equivocating member cannot also suppress messages between honest
members (they travel over pairwise-authenticated envelopes); a member that sends two different
signed views leaves proof of it. As a second line, each member keeps a ledger of the kind it
revealed for each peer and refuses (``InconsistentMessage``, no answer) any later receipt that
would make it reveal the other kind.

Dropouts: a member that stops after sending its masked input is counted if it is the only
member not live and its successor holds the backup of its own chunk (otherwise it is treated
as dropped: its key is reconstructed, its self mask never). A member that drops after sending
its receipt is live to the others: they abort at the VIEW deadline if its view is missing
(nothing revealed), else at the AGGREGATE deadline when the chunks it was to reduce never come
(only shares of the right kinds and partial sums were revealed; no single input is).
Refusals also cover views: one whose signature does not verify raises ``BadSignature``.

Refusals: messages for a stage already closed raise ``OutOfStage``; a second message of a kind
``DuplicateMessage``; a bad advertisement signature ``BadSignature``; messages that contradict
the group, the round or earlier messages ``InconsistentMessage``. Messages for a later stage are
buffered and handled on entering it; refusals found then are kept in ``Member.refused``.
"""

from __future__ import annotations

import nacl.bindings
import numpy as np
import torch

from mpc import keys as mkeys
from mpc.messages import (
    AdvertiseKeys,
    ChunkSum,
    MaskedChunk,
    Message,
    ReassignedChunk,
    Receipt,
    Reveal,
    ShareKeys,
    View,
)
from mpc.prg import add_masks_, masked, new_seed
from mpc.shamir import split
from mpc.state import STAGE_OF, MemberState, Outgoing, Stage, default_threshold
from mpc.survivors import ReceiptView, counted_set, dropped_set, fallback_reducer
from murmur.errors import (
    AggregationAborted,
    DuplicateMessage,
    InconsistentMessage,
    OutOfStage,
    ProtocolError,
    UnknownMessageType,
)

__all__ = ["Member", "Outgoing", "Stage", "default_threshold"]

_CHUNKED = frozenset({MaskedChunk, ReassignedChunk, ChunkSum})


class Member(MemberState):
    """One member's state machine for one round of secure aggregation in one group.

    Construct it with ``Member(signing_key, members, group=..., round=..., vector=...,
    threshold=None, degree=None, graph_seed=None, neighbourhood_threshold=None)`` (see
    ``mpc.state.MemberState``), then call ``start()`` once, ``receive()`` for every message and
    ``advance()`` whenever the current stage's deadline passes. Each returns the messages to send.
    A refused message raises a ``ProtocolError`` subclass (its ``code`` can cross the wire) and
    leaves the member's state unchanged. Query ``stage``, ``finished``, ``result`` / ``output()``,
    ``abort_reason``, ``counted`` and ``revealed`` at any time.
    """

    # ------------------------------------------------------------------ driving

    def start(self) -> Outgoing:
        """Begin the round: advertise this round's public keys to every other member."""
        if self._started:
            raise OutOfStage("start() was already called")
        self._started = True
        signature = mkeys.sign_advertisement(
            self._signing_key,
            round=self.round,
            group=self.group,
            agreement_public=self._keys.agreement_public,
            box_public=self._keys.box_public,
        )
        advert = AdvertiseKeys(
            self.group, self.round, self._keys.agreement_public, self._keys.box_public, signature
        )
        self._adverts[self.id] = advert
        out: Outgoing = [(m, advert) for m in self.members if m != self.id]
        return out + self._complete_stages()

    def advance(self) -> Outgoing:
        """The deadline of the current stage passed: close it with what arrived and move on."""
        if not self._started or self.finished:
            return []
        return self._next_stage() + self._complete_stages()

    def receive(self, sender: bytes, msg: Message) -> Outgoing:
        """Handle one message from ``sender``; raise a ``ProtocolError`` subclass to refuse it."""
        cls = type(msg)
        stage = STAGE_OF.get(cls)
        if stage is None:
            raise UnknownMessageType(f"not a secure-aggregation message: {cls.__name__}")
        if sender not in self._index or sender == self.id:
            raise InconsistentMessage("the sender is not another member of this group")
        if msg.group != self.group or msg.round != self.round:
            raise InconsistentMessage("the message is for another group or round")
        chunk = -1
        if cls in _CHUNKED:
            chunk = msg.chunk  # type: ignore[union-attr]
            if chunk.__class__ is not int or not 0 <= chunk < self.k:
                raise InconsistentMessage(f"no chunk {chunk!r} in a group of {self.k}")
            self._check_slice(chunk, msg.data)  # type: ignore[union-attr]  # bounded buffer
        key = (cls.TYPE, sender, chunk)
        if key in self._seen:
            raise DuplicateMessage(f"second {cls.TYPE} from this sender")
        current = self._stage
        if cls is Receipt and stage < current:
            self._check_late_receipt(sender, msg)  # type: ignore[arg-type]
        if stage < current or current >= Stage.DONE:
            raise OutOfStage(f"{cls.TYPE} arrived in stage {current.name}")
        if stage > current or (not self._started and stage > Stage.ADVERTISE_KEYS):
            self._seen.add(key)
            self._pending.setdefault(stage, []).append((sender, msg))
            return []
        self._handle(sender, msg)
        self._seen.add(key)
        return self._complete_stages()

    # ------------------------------------------------------------------ transitions

    def _complete_stages(self) -> Outgoing:
        out: Outgoing = []
        while self._started and self._stage < Stage.DONE and self._stage_complete():
            out += self._next_stage()
        return out

    def _next_stage(self) -> Outgoing:
        stage = self._stage
        enter = {
            Stage.ADVERTISE_KEYS: self._enter_share_keys,
            Stage.SHARE_KEYS: self._enter_masked_input,
            Stage.MASKED_INPUT: self._enter_consistency,
            Stage.CONSISTENCY: self._enter_view,
            Stage.VIEW: self._enter_unmasking,
            Stage.UNMASKING: self._enter_aggregate,
            Stage.AGGREGATE: self._finish,
        }[stage]
        try:
            out = enter()
        except (AggregationAborted, InconsistentMessage) as exc:
            self._abort(str(exc))  # before anything of this stage was sent
            return []
        if self._stage is stage:  # the entry function did not abort or finish
            self._stage = Stage(stage + 1)
            for sender, msg in self._pending.pop(self._stage, []):
                try:
                    self._handle(sender, msg)
                except ProtocolError as exc:
                    self.refused.append((sender, exc))
        return out

    def _abort(self, reason: str) -> None:
        self._stage = Stage.ABORTED
        self._abort_reason = reason
        self._held.clear()
        self._self_seed = b""
        self._masked_input = None
        self._pending.clear()
        self._forget_pairs()
        self._forget_combined()

    def cancel(self, reason: str = "cancelled") -> None:
        """Abort the round now (its driver stopped) and forget its secrets; no-op once finished."""
        if not self.finished:
            self._abort(reason)

    def _stage_complete(self) -> bool:
        s = self._stage
        if s is Stage.ADVERTISE_KEYS:
            return len(self._adverts) == self.k
        if s is Stage.SHARE_KEYS:
            return all(v in self._held for v in self._graph[self.id] if v in self._adverts)
        if s is Stage.MASKED_INPUT:
            expected = self._expected
            if expected is None:  # adverts and shares are final in this stage
                expected = self._expected = self._expected_inputs()
            pred = self.members[(self._me - 1) % self.k]
            return expected <= set(self._chunks) and (
                pred not in expected or self._backup is not None
            )
        if s is Stage.CONSISTENCY:
            return set(self._chunks) <= set(self._receipts)
        if s is Stage.VIEW:
            return self._live <= set(self._views)
        if s is Stage.UNMASKING:
            if not self._live <= set(self._reveals):
                return False
            needed = self._counted or frozenset()
            return all(needed <= set(got) for got in self._assigned.values())
        if s is Stage.AGGREGATE:
            return len(self._sums) == self.k
        return False

    def _expected_inputs(self) -> set[bytes]:
        """Senders whose masked input may still come (advertised, not known to have dropped)."""
        gone = {v for v in self._graph[self.id] if v not in self._held}
        return set(self._adverts) - gone

    # ------------------------------------------------------------------ stage entries

    def _enter_share_keys(self) -> Outgoing:
        if len(self._adverts) < self.threshold:
            raise AggregationAborted(f"{len(self._adverts)} members advertised keys")
        self._self_seed = new_seed()
        t, k = self.local_threshold, self.k
        b_shares = split(self._self_seed, threshold=t, n=k)
        s_shares = split(self._keys.agreement_private, threshold=t, n=k)
        self._held[self.id] = (b_shares[self._me].y, s_shares[self._me].y)
        out: Outgoing = []
        for v in sorted(self._graph[self.id]):
            advert = self._adverts.get(v)
            if advert is None:
                continue
            i = self._index[v]
            sealed = mkeys.seal_with(
                self._box_key(v),
                b_shares[i].y + s_shares[i].y,
                round=self.round,
                group=self.group,
                sender=self.id,
                recipient=v,
            )
            out.append((v, ShareKeys(self.group, self.round, sealed)))
        return out

    def _enter_masked_input(self) -> Outgoing:
        if len(self._held) < self.local_threshold:
            raise AggregationAborted(f"shares from {len(self._held)} neighbourhood members")
        self._mine = frozenset(v for v in self._graph[self.id] if v in self._held)
        plan = [(self._self_seed, 1)]
        for v in sorted(self._mine):
            sign = 1 if self._me < self._index[v] else -1
            plan.append((self._pair_seed(self._keys.agreement_private, v, self.id), sign))
        y = masked(self._x, plan)
        self._masked_input = y
        mine = tuple(sorted(self._mine))
        out: Outgoing = []
        for j, m in enumerate(self.members):
            lo, hi = self._bounds[j]
            if m == self.id:
                self._chunks[self.id] = y[lo:hi]
                self._neighbours_of[self.id] = self._mine
            elif m in self._adverts:
                out.append((m, MaskedChunk(self.group, self.round, j, y[lo:hi], mine)))
        successor = self.members[(self._me + 1) % self.k]
        if successor in self._adverts:
            lo, hi = self._bounds[self._me]
            out.append((successor, MaskedChunk(self.group, self.round, self._me, y[lo:hi], mine)))
        return out

    def _enter_consistency(self) -> Outgoing:
        received = tuple(sorted(self._chunks))
        backup = self._backup is not None
        self._receipts[self.id] = ReceiptView(frozenset(received), backup)
        receipt = Receipt(self.group, self.round, received, backup)
        return [(m, receipt) for m in sorted(self._adverts) if m != self.id]

    def _enter_view(self) -> Outgoing:
        self._live = frozenset(self._receipts)
        counted = counted_set(self.members, self._receipts, self._neighbours_of)
        dropped = dropped_set(counted, self._neighbours_of)
        self._counted, self._dropped = counted, dropped
        if len(counted) < self.threshold:
            raise AggregationAborted(f"{len(counted)} inputs counted, threshold {self.threshold}")
        for u in sorted(counted | dropped):
            holders = (self._graph[u] | {u}) & self._live
            if len(holders) < self.local_threshold:
                raise AggregationAborted(
                    f"too few live holders of a needed secret ({len(holders)})"
                )
        digest = self._view_digest = self._view_digest_of(counted, dropped, self._live)
        self._views[self.id] = digest
        view = View(self.group, self.round, digest, self._sign_view(digest))
        return [(m, view) for m in sorted(self._adverts) if m != self.id]

    def _enter_unmasking(self) -> Outgoing:
        mine = self._view_digest
        if any(digest != mine for digest in self._views.values()):
            raise AggregationAborted("members disagree on the counted set (a view differs)")
        missing = self._live - set(self._views)
        if missing:
            raise AggregationAborted(f"{len(missing)} live members sent no view")
        if len(self._views) < self.threshold:
            raise AggregationAborted(
                f"{len(self._views)} members share this view, threshold {self.threshold}"
            )
        counted, dropped = self._counted or frozenset(), self._dropped
        kinds = {u: "b" for u in counted} | {v: "s" for v in dropped}
        self._check_ledger(kinds)
        self._revealed.update({u: kind for u, kind in kinds.items() if u in self._held})
        reveal = Reveal(
            self.group,
            self.round,
            {u: self._held[u][0] for u in sorted(counted) if u in self._held},
            {v: self._held[v][1] for v in sorted(dropped) if v in self._held},
        )
        self._reveals[self.id] = reveal
        out: Outgoing = [(m, reveal) for m in sorted(self._live) if m != self.id]
        y = self._masked_input
        for j, owner in enumerate(self.members):
            reducer = fallback_reducer(j, self.members, self._live)
            lo, hi = self._bounds[j]
            if owner in self._live:
                if owner == self.id:
                    self._assigned[j] = {u: self._chunks[u] for u in counted}
                continue
            if reducer == self.id:
                got = self._assigned[j] = {}
                if self.id in counted and y is not None:
                    got[self.id] = y[lo:hi]
                if owner in counted and self._backup is not None:
                    got[owner] = self._backup
            elif reducer is not None and self.id in counted and y is not None:
                out.append((reducer, ReassignedChunk(self.group, self.round, j, y[lo:hi])))
        return out

    def _enter_aggregate(self) -> Outgoing:
        counted = self._counted or frozenset()
        for j, got in self._assigned.items():
            if not counted <= set(got):
                raise AggregationAborted(f"masked slices of chunk {j} are missing")
        try:
            b_seeds = {u: self._combine(u, 0) for u in sorted(counted)}
            s_keys = {v: self._combine(v, 1) for v in sorted(self._dropped)}
        except (AggregationAborted, InconsistentMessage) as exc:
            raise AggregationAborted(f"cannot reconstruct a secret: {exc}") from exc
        for v, key in s_keys.items():
            public = nacl.bindings.crypto_scalarmult_base(key)
            if public != self._adverts[v].agreement_public:
                raise AggregationAborted("a reconstructed key does not match its advertisement")
        plan: list[tuple[bytes, int]] = [(b_seeds[u], -1) for u in sorted(counted)]
        for u in sorted(counted):
            for v in sorted(self._neighbours_of[u] & self._dropped):
                sign = 1 if self._index[u] < self._index[v] else -1
                plan.append((self._pair_seed(s_keys[v], u, v), -sign))
        out: Outgoing = []
        for j, got in sorted(self._assigned.items()):
            lo, hi = self._bounds[j]
            total = torch.zeros(hi - lo, dtype=self._dtype)
            acc = total.numpy()  # numpy's int64 add is ~4x torch's here (see mpc.prg)
            for u in sorted(counted):
                np.add(acc, got[u].numpy(), out=acc)
            add_masks_(total, plan, offset=lo)
            self._sums[j] = total
            msg = ChunkSum(self.group, self.round, j, total, self._counted_digest())
            out += [(m, msg) for m in sorted(self._live) if m != self.id]
        self._self_seed = b""
        return out

    def _finish(self) -> Outgoing:
        if len(self._sums) < self.k:
            missing = sorted(set(range(self.k)) - set(self._sums))
            raise AggregationAborted(f"chunk sums {missing} never arrived")
        self._result = torch.cat([self._sums[j] for j in range(self.k)])
        self._stage = Stage.DONE
        self._held.clear()
        self._masked_input = None
        self._forget_pairs()
        self._forget_combined()
        return []
