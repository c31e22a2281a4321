"""Decentralized secure aggregation (Bonawitz et al. 2017, SecAgg+ option): the ``Member`` machine.

There is no server: every member is also the reducer of one chunk of the vector (butterfly
reduce-scatter, then all-gather). ``Member`` is sans-IO: ``start()``, ``receive(sender, msg)`` and
``advance()`` return the messages to send as ``[(recipient_id, message), ...]``; the network
layer calls ``advance()`` when its deadline for the current stage passes (that is how dropouts
are detected). A stage also ends by itself as soon as everything it waits for has arrived.

Keys. Members know each other's long-term ids (Ed25519 public keys). Each pair derives its
one-round mask seed and its share-sealing keys from one static X25519 secret (``mpc.keys``), so
no per-round keys are advertised. A member masks with every mask-graph neighbour (everyone, or
SecAgg+'s ``degree`` neighbours).

Stages (``Stage``), each named after what the member collects in it:

1. INPUT: pick a fresh self-mask seed b_u and Shamir-share it (t-of-n; SecAgg+: among the
   neighbourhood, neighbourhood threshold); compute y_u = x_u + PRG(b_u) + sum_v +-PRG(s_uv)
   over the neighbours v (+ if u sorts before v), s_uv the pair's seed for this round. Send
   member j one ``Input``: chunk j of y_u and, as ``replica``, chunk j - 1 of it (every chunk
   has two reducers: member j and member j + 1), together with j's share of b_u sealed to j
   (so a reducer that holds u's chunk also holds u's share) and u's hash commitments to all
   its shares (``mpc.state.share_commitment``; the view digest covers them, and a dealt or
   revealed share that does not open its commitment is refused and its sender put in
   ``Member.blamed``).
2. CONSISTENCY (receipts): each reducer broadcasts a ``Receipt``: whose inputs it got. Live
   reducers R = senders of receipts.
3. VIEW (the view check, after Bonawitz et al.'s consistency round): every member evaluates
   ``mpc.survivors.counted_set`` on the receipts it got: u is counted iff every live reducer
   received u's input and every chunk of u reaches a live reducer (u is live, or every chunk
   keeps one of its two reducers live, and all of u's neighbours are counted).
   D = non-counted neighbours of counted members. If |C| < t, or too few live holders exist
   for a counted member's self-mask seed, the member aborts. Otherwise it broadcasts a ``View``:
   the digest of (round, group, C, D, the counted dealers' share commitments): exactly what
   fixes what it will reveal about each peer (the live set is not in it: members that saw a
   straggler's receipt and members that did not can still agree). The stage ends when every
   live member's view arrived, or at the deadline.
4. UNMASKING: the member reveals only if every view it received carries exactly its own digest
   and at least ``threshold`` members (itself included) sent one; otherwise it aborts *before
   revealing anything*. A live member whose view never came is *quiet*: gone after its receipt
   (or late); it is recovered from like a member gone after its view, and nobody waits for its
   reveal or its chunk sums. Then the member sends one ``Reveal`` to every live
   reducer: its shares of b_u for u in C, and (if it is counted) its pair seeds with its
   neighbours in D; and its masked slices of chunks whose two reducers are both gone to their
   fallback (the next live member). Views arriving after it revealed are refused
   (``OutOfStage``, or ``DuplicateMessage`` for a second view).
5. AGGREGATE: each live reducer of a chunk reconstructs b_u (u in C), sums the chunk over C,
   removes its self masks and the pair masks between C and D with the seekable PRG at the
   chunk offset, then sends the unmasked chunk sum to every live member. A member is DONE when
   it holds, for every chunk, the sum of each of its live reducers (or, at the deadline, of at
   least one) and the two sums of a chunk are equal. Two different sums abort the round
   (``SumRejected``): a member that reduced the chunk itself names the other reducer in
   ``Member.blamed``; a third member cannot tell which of the two lied. So a reducer's lie, of
   any size, is caught whenever its partner reducer is live; a chunk whose partner dropped
   after the view is unconfirmed (only ``gossip.allreduce.check_total``'s ranges remain).

Why revealing a pair seed is enough (and safe). Bonawitz et al. Shamir-share each member's
per-round *agreement key* so that t survivors can recompute a dropped member's masks. Here the
dropped member's counted neighbours reveal the one-round seeds they share with it: each seed is
a KDF output bound to the round and group, so nothing about other rounds leaks, and a member
reveals only what it knows itself. The one case this cannot cover, a counted member that is not
live and has a dropped neighbour, is excluded from C by the counting rule (its input is then
simply not counted). A wrong seed from a malicious member corrupts the sum, as a malicious
input could; it reveals nothing.

Never both of one peer. Receipts can reach members unevenly (a reducer that crashes
mid-broadcast, or one that sends different receipts to different members), so two honest
members may compute different counted sets; if one revealed its share of b_u and the other its
pair seed with u, a coalition could remove both kinds of mask from u's input. The view check
stops this: every member that reveals has seen at least t views equal to its own digest and no
other digest. Two members revealing for different digests A and B saw t senders of A and t of
B; an honest member sends one view to everyone, so only an equivocating (malicious) member can
be among both, and 2t - m <= k is needed: with m < 2t - k equivocators (t = ceil(2k/3), the
default: fewer than about k/3), two digests cannot both gather their quorum, even when
messages are late or lost. An honest member with another view whose view does arrive makes a
member abort as well. So all revealing members reveal for one counted set: for each peer,
b-shares or pair seeds, never both. SecAgg+ uses the same check with the group threshold.
Equivocation is detected (honest members abort) where a differing view arrives, not proven to
third parties (views are not signed: they ride in authenticated envelopes). As a second
line, each member keeps a ledger of what it revealed about each peer and refuses
(``InconsistentMessage``, no answer) any later receipt that would make it reveal the other kind.

Dropouts: a member that stops before or while sending its input is not counted (its pair masks
are removed through its neighbours' seeds, its self mask never). One that stops after sending
its input is counted if every chunk keeps a live reducer (no two neighbours in the member order
are both gone) and none of its neighbours is dropped. One that drops after its receipt (no
view: at least t views must still come, else everyone aborts with nothing revealed), after its
view (before its reveal), or before its chunk sums is
recovered from: the other reducer of each of its two chunks sends their sums, and its self mask
is rebuilt from the others' shares, as long as at least t shares arrive and nothing only it
held is needed (its pair seeds with dropped members, its slices of a chunk that lost both
reducers); otherwise the group aborts at the AGGREGATE deadline (only shares and seeds of the
right kinds and partial sums were revealed; no single input is).

Refusals: messages for a stage already closed raise ``OutOfStage``; a second message of a kind
``DuplicateMessage``; a share that does not open ``BadSeal``; messages that contradict the group,
the round or earlier messages ``InconsistentMessage``. Messages for a later stage are buffered
and handled on entering it; refusals found then are kept in ``Member.refused``.
"""

from __future__ import annotations

import numpy as np
import torch

from floor.errors import (
    AggregationAborted,
    DuplicateMessage,
    InconsistentMessage,
    OutOfStage,
    ProtocolError,
    SumRejected,
    UnknownMessageType,
)
from mpc import keys as mkeys
from mpc.messages import (
    ChunkSum,
    Input,
    Message,
    ReassignedChunk,
    Receipt,
    Reveal,
    View,
)
from mpc.prg import add_masks_, masked, new_seed
from mpc.shamir import split
from mpc.state import (
    STAGE_OF,
    MemberState,
    Outgoing,
    Stage,
    default_threshold,
    share_commitment,
)
from mpc.survivors import ReceiptView, chunk_reducers, counted_set, covered, dropped_set

__all__ = ["Member", "Outgoing", "Stage", "default_threshold"]

_CHUNKED = frozenset({Input, ReassignedChunk, ChunkSum})
_NEXT = {stage: Stage(stage + 1) for stage in Stage if stage < Stage.DONE}
"""Each running stage's successor (an enum lookup by value costs ~5 us)."""


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
        """Begin the round: mask the input and send every member its chunk and its share."""
        if self._started:
            raise OutOfStage("start() was already called")
        self._started = True
        try:
            out = self._send_input()
        except (ProtocolError, AggregationAborted) as exc:  # e.g. a member id that is no key
            self._abort(str(exc))
            return []
        self._handle_pending(Stage.INPUT)
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
            if cls is Input:
                self._check_slice((chunk - 1) % self.k, msg.replica)  # type: ignore[union-attr]
        key = (cls.TYPE, sender, chunk)
        if key in self._seen:
            raise DuplicateMessage(f"second {cls.TYPE} from this sender")
        current = self._stage
        if cls is Receipt and stage < current:
            self._check_late_receipt(sender, msg)  # type: ignore[arg-type]
        if stage < current or current >= Stage.DONE:
            raise OutOfStage(f"{cls.TYPE} arrived in stage {current.name}")
        if stage > current or not self._started:
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
            Stage.INPUT: self._enter_consistency,
            Stage.CONSISTENCY: self._enter_view,
            Stage.VIEW: self._enter_unmasking,
            Stage.UNMASKING: self._enter_aggregate,
            Stage.AGGREGATE: self._finish,
        }[stage]
        try:
            out = enter()
        except (AggregationAborted, InconsistentMessage) as exc:
            self._abort(str(exc), rejected=isinstance(exc, SumRejected))  # nothing of it sent
            return []
        if self._stage is stage:  # the entry function did not abort or finish
            self._stage = _NEXT[stage]
            self._handle_pending(self._stage)
        return out

    def _abort(self, reason: str, *, rejected: bool = False) -> None:
        self._stage = Stage.ABORTED
        self._abort_reason = reason
        self._rejected = rejected
        self._held.clear()
        self._pairs.clear()
        self._self_seed = b""
        self._masked_input = None
        self._pending.clear()
        self._forget_combined()

    def cancel(self, reason: str = "cancelled") -> None:
        """Abort the round now (its driver stopped) and forget its secrets; no-op once finished."""
        if not self.finished:
            self._abort(reason)

    def can_advance(self) -> bool:
        """Whether closing the current stage now would go on, not abort for want of a message
        (a driver with a soft deadline closes early only then; ``gossip.allreduce``).

        INPUT and CONSISTENCY: always (what is missing then shrinks the counted set or the live
        set, it does not end the round by itself). VIEW: at least ``threshold`` views, all
        equal to this member's. UNMASKING: every assigned chunk holds every counted member's
        slice, every counted member's self-mask seed has enough revealed shares, and every
        pair seed with a dropped member has been revealed. AGGREGATE: every chunk has a sum.
        """
        s = self._stage
        if s is Stage.VIEW:
            views, mine = self._views, self._view_digest
            return len(views) >= self.threshold and all(v == mine for v in views.values())
        if s is Stage.UNMASKING:
            counted = self._counted or frozenset()
            if any(not counted <= got.keys() for got in self._assigned.values()):
                return False
            reveals = self._reveals
            for u in counted:
                shares = sum(1 for r in reveals.values() if u in r.self_mask_shares)
                if shares < self.local_threshold:
                    return False
                pairs = self._graph[u] & self._dropped
                if pairs:
                    reveal = reveals.get(u)
                    if reveal is None or not pairs <= reveal.pair_seeds.keys():
                        return False
            return True
        if s is Stage.AGGREGATE:
            return all(self._sums.get(j) for j in range(self.k))
        return s in (Stage.INPUT, Stage.CONSISTENCY)

    def _stage_complete(self) -> bool:
        s = self._stage
        if s is Stage.INPUT:
            return len(self._chunks) == self.k
        if s is Stage.CONSISTENCY:
            return self._chunks.keys() <= self._receipts.keys()
        if s is Stage.VIEW:
            return self._live <= self._views.keys()
        if s is Stage.UNMASKING:
            if not self._live - self._quiet <= self._reveals.keys():
                return False
            needed = self._counted or frozenset()
            return all(needed <= got.keys() for got in self._assigned.values())
        if s is Stage.AGGREGATE:
            sums, quiet = self._sums, self._quiet
            for j, reducers in enumerate(self._reducers):
                awaited = [r for r in reducers if r not in quiet]
                got = sums.get(j, {})
                if not awaited or not all(r in got for r in awaited):
                    return False  # a chunk whose every reducer went quiet waits for the deadline
            return True
        return False

    # ------------------------------------------------------------------ stage entries

    def _send_input(self) -> Outgoing:
        self._self_seed = new_seed()
        neighbours = self._graph[self.id]
        # shares for every x-coordinate (x = position + 1); only neighbours get theirs
        shares = split(self._self_seed, threshold=self.local_threshold, n=self.k)
        self._held[self.id] = shares[self._me].y
        commitments = self._commitments[self.id] = b"".join(
            share_commitment(group=self.group, round=self.round, dealer=self.id, x=s.x, y=s.y)
            for s in shares
        )
        plan = [(self._self_seed, 1)]
        for v in sorted(neighbours):
            plan.append((self._pair(v)[0], 1 if self._me < self._index[v] else -1))
        y = self._masked_input = masked(self._x, plan)
        out: Outgoing = []
        k = self.k
        for j, m in enumerate(self.members):
            lo, hi = self._bounds[j]
            plo, phi = self._bounds[(j - 1) % k]
            if m == self.id:
                self._chunks[self.id] = y[lo:hi]
                self._replicas[self.id] = y[plo:phi]
                continue
            sealed = b""
            if m in neighbours:
                sealed = mkeys.seal_with(
                    self._pair(m)[1],
                    shares[j].y,
                    round=self.round,
                    group=self.group,
                    sender=self.id,
                    recipient=m,
                )
            out.append(
                (m, Input(self.group, self.round, j, y[lo:hi], sealed, commitments, y[plo:phi]))
            )
        return out

    def _enter_consistency(self) -> Outgoing:
        received = tuple(sorted(self._chunks))
        self._receipts[self.id] = ReceiptView(frozenset(received))
        receipt = Receipt(self.group, self.round, received)
        return [(m, receipt) for m in self.members if m != self.id]

    def _enter_view(self) -> Outgoing:
        live = self._live = frozenset(self._receipts)
        self._reducers = [chunk_reducers(j, self.members, live) for j in range(self.k)]
        counted = counted_set(self.members, self._receipts, self._graph)
        dropped = dropped_set(counted, self._graph)
        self._counted, self._dropped = counted, dropped
        self._counted_digest = self._counted_digest_of(counted)
        if len(counted) < self.threshold:
            raise AggregationAborted(f"{len(counted)} inputs counted, threshold {self.threshold}")
        for u in sorted(counted):
            holders = (self._graph[u] | {u}) & self._live
            if len(holders) < self.local_threshold:
                raise AggregationAborted(
                    f"too few live holders of a counted member's share ({len(holders)})"
                )
        digest = self._view_digest = self._view_digest_of(counted, dropped)
        self._views[self.id] = digest
        view = View(self.group, self.round, digest)
        return [(m, view) for m in self.members if m != self.id]

    def _enter_unmasking(self) -> Outgoing:
        mine = self._view_digest
        if any(digest != mine for digest in self._views.values()):
            raise AggregationAborted("members disagree on the counted set (a view differs)")
        if len(self._views) < self.threshold:
            raise AggregationAborted(
                f"{len(self._views)} members share this view, threshold {self.threshold}"
            )
        # live members whose view never came: gone after their receipt (or late). They are
        # recovered from like a member gone after its view; nobody waits for their reveal or sums
        self._quiet = self._live - self._views.keys()
        counted, dropped = self._counted or frozenset(), self._dropped
        kinds = self._kinds(counted, dropped)
        self._check_ledger(kinds)
        self._revealed.update(kinds)
        reveal = Reveal(
            self.group,
            self.round,
            {u: self._held[u] for u in sorted(counted) if u in self._held},
            {v: self._pair(v)[0] for v in sorted(kinds) if kinds[v] == "s"},
        )
        self._reveals[self.id] = reveal
        out: Outgoing = [(m, reveal) for m in sorted(self._live) if m != self.id]
        y = self._masked_input
        k, me = self.k, self._me
        for j in range(k):
            reducers = self._reducers[j]
            if j == me:
                self._assigned[j] = {u: self._chunks[u] for u in counted}
            elif j == (me - 1) % k:
                self._assigned[j] = {u: self._replicas[u] for u in counted}
            elif covered(j, self.members, self._live):
                continue
            elif self.id in reducers:  # the fallback of a chunk whose two reducers are gone
                self._fallback.add(j)
                got = self._assigned[j] = {}
                if self.id in counted and y is not None:
                    lo, hi = self._bounds[j]
                    got[self.id] = y[lo:hi]
            elif reducers and self.id in counted and y is not None:
                lo, hi = self._bounds[j]
                out.append((reducers[0], ReassignedChunk(self.group, self.round, j, y[lo:hi])))
        return out

    def _enter_aggregate(self) -> Outgoing:
        counted = self._counted or frozenset()
        for j, got in self._assigned.items():
            if not counted <= got.keys():
                raise AggregationAborted(f"masked slices of chunk {j} are missing")
        try:
            b_seeds = {u: self._combine(u) for u in sorted(counted)}
        except (AggregationAborted, InconsistentMessage) as exc:
            raise AggregationAborted(f"cannot reconstruct a secret: {exc}") from exc
        plan: list[tuple[bytes, int]] = [(b_seeds[u], -1) for u in sorted(counted)]
        for u in sorted(counted):
            pairs = self._graph[u] & self._dropped
            if not pairs:
                continue
            reveal = self._reveals.get(u)
            seeds = {} if reveal is None else reveal.pair_seeds
            for v in sorted(pairs):
                seed = seeds.get(v)
                if seed is None:
                    raise AggregationAborted("a pair seed needed to unmask never arrived")
                plan.append((seed, -1 if self._index[u] < self._index[v] else 1))
        out: Outgoing = []
        for j, got in sorted(self._assigned.items()):
            lo, hi = self._bounds[j]
            total = torch.zeros(hi - lo, dtype=self._dtype)
            acc = total.numpy()  # numpy's int64 add is ~4x torch's here (see mpc.prg)
            for u in sorted(counted):
                np.add(acc, got[u].numpy(), out=acc)
            add_masks_(total, plan, offset=lo)
            self._sums.setdefault(j, {})[self.id] = total
            msg = ChunkSum(self.group, self.round, j, total, self._counted_digest)
            out += [(m, msg) for m in sorted(self._live) if m != self.id]
        self._self_seed = b""
        return out

    def _finish(self) -> Outgoing:
        missing = [j for j in range(self.k) if not self._sums.get(j)]
        if missing:
            raise AggregationAborted(f"chunk sums {missing} never arrived")
        parts = []
        for j in range(self.k):
            got = self._sums[j]
            mine = got.get(self.id)
            agreed = next(iter(got.values())) if mine is None else mine
            ref = agreed.numpy()  # numpy's compare is ~2x torch.equal's here
            differ = sorted(
                r
                for r, total in got.items()
                if total is not agreed and not np.array_equal(total.numpy(), ref)
            )
            if differ:
                if mine is not None:  # this member computed the chunk itself: the other lied
                    for r in differ:
                        self.blamed[r] = f"sent a sum of chunk {j} that differs from our own"
                raise SumRejected(f"the two reducers of chunk {j} sent different sums")
            parts.append(agreed)
        self._parts = parts  # ``result`` concatenates on demand; gossip decodes chunk by chunk
        self._stage = Stage.DONE
        self._held.clear()
        self._pairs.clear()
        self._masked_input = None
        self._forget_combined()
        return []
