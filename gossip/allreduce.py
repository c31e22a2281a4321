"""Group averaging as sans-IO machines: form a group, then all-reduce inside it (secure or plain).

Both all-reduces compute the weighted mean ``sum(w x) / sum(w)`` of a formed group
(``gossip.matchmaking``): each member contributes the vector ``[w * x, w]`` encoded in fixed
point in Z_2^bits at a scale every member derives from public parameters (``bound`` and the group
size, via ``mpc.fixedpoint.max_scale`` and ``check_capacity``), so sums are exact integers and the
secure variant reveals no single weight.

* :class:`SecureGroup` runs ``mpc.Member`` (pairwise masks, Shamir shares, butterfly reduce,
  dropout recovery). Its messages travel sealed when their class says ``SECRET`` (revealed
  shares), MACed otherwise (masked data);
* :class:`PlainGroup` is the same butterfly reduce-scatter + all-gather in the clear (a
  baseline). Each chunk sum names its contributors; a member accepts the result only if every
  chunk sum arrived and all name the same contributors.

A stage ends when everything it waits for arrived, or at its deadline: the stage's timeout
after the later of the previous deadline and the moment the stage began (a member that finished
a stage early still waits for one that waited the whole stage). Timeouts adapt per stage to the
arrival delays the peer observed (``gossip.deadlines``), between ``min_stage_timeout_s`` and
``stage_timeout_s``; a group formed by invitation runs on its inviter's. Either every member that
finishes holds the exact group result, or the round fails loudly for it
(``AggregationAborted``): a chunk that is lost or late is never replaced by local values
(Hivemind does that and reports success).

:class:`GroupAveraging` is the long-lived machine of one peer (``gossip.machine.Machine``): its
group former (``Invitations`` or ``HashGrouping``) and, once a group formed, that round's
``SecureGroup`` or ``PlainGroup``. It routes group messages by group id, keeps messages of a
group that has not started here yet (bounded) and refuses those of a group that is over.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from floor.errors import (
    AggregationAborted,
    AggregationError,
    ConfigError,
    GroupFormationFailed,
    InconsistentMessage,
    MalformedMessage,
    OutOfStage,
    ProtocolError,
    RingOverflow,
    SumRejected,
)
from floor.identity import PeerId
from gossip.deadlines import StageDeadlines
from gossip.machine import AverageResult, Out, RoundJob, check_contribution
from gossip.matchmaking import Group, GroupFormer
from gossip.messages import PlainChunk, PlainChunkSum
from mpc.fixedpoint import Bits, check_capacity, decode, encode_, max_scale
from mpc.messages import MESSAGE_TYPES as MPC_TYPES
from mpc.messages import Input, View
from mpc.protocol import Member, Stage, default_threshold
from mpc.state import STAGE_OF
from mpc.survivors import chunk_bounds

__all__ = [
    "AllReduceConfig",
    "AllReduceStats",
    "GroupAveraging",
    "NoisedRing",
    "PlainGroup",
    "SecureGroup",
    "decode_total",
    "encode_contribution",
]

log = logging.getLogger("murmur.gossip.allreduce")

_FLOAT = torch.empty(0, dtype=torch.float32)  # the result's dtype for ring inputs
_EARLY_GROUPS = 32
_EARLY_PER_GROUP = 256
_FINISHED_MEMORY = 1024
_LATE_GROUPS = 4
STAGES = Stage.AGGREGATE - Stage.INPUT + 1
"""A secure group's stages with a deadline (INPUT, CONSISTENCY, VIEW, UNMASKING, AGGREGATE)."""
PLAIN_STAGES = 2
"""A plain group's: reduce and gather."""
_STAGE_INDEX: dict[type, int] = {
    **{cls: stage - Stage.INPUT for cls, stage in STAGE_OF.items()},
    PlainChunk: 0,
    PlainChunkSum: 1,
}


@dataclass(frozen=True)
class NoisedRing:
    """Public parameters of distributed noise (``gossip.privacy``): the members' ring inputs
    arrive encoded and noised at ``scale`` (int64, a weight slot last), and a group outputs a
    sum only over at least ``min_counted`` members, so that it carries the target noise."""

    scale: float
    min_counted: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale >= 1):
            raise ConfigError(f"the noised ring's scale must be >= 1, got {self.scale!r}")
        if self.min_counted < 2:
            raise ConfigError(f"min_counted must be at least 2, got {self.min_counted!r}")


@dataclass(frozen=True)
class AllReduceConfig:
    """Group all-reduce parameters (public: every member must use the same)."""

    bits: Bits | None = 64
    """Ring width (32 or 64); ``None`` picks the narrower ring that still gives ``resolution``."""
    bound: float = 1e6
    """Public bound on every |w * x| and on w; a larger value is refused (``RingOverflow``)."""
    resolution: float = 2.0**-20
    """With ``bits=None``: the coarsest fixed-point step accepted (1 / scale). Z_2^32 is used
    when its scale for ``bound`` and the group size is at least ``1 / resolution``: half the
    bytes and half the mask work of Z_2^64."""
    stage_timeout_s: float = 2.0
    """Deadline of each protocol stage: the longest an adaptive stage waits."""
    min_stage_timeout_s: float = 0.5
    """The shortest an adaptive stage waits (``gossip.deadlines``)."""
    adaptive_deadlines: bool = False
    """Learn each stage's timeout from observed arrival delays (``gossip.deadlines``); False:
    always ``stage_timeout_s``."""
    threshold: int | None = None
    """Least number of counted inputs (default ceil(2k/3))."""
    degree: int | None = None
    """SecAgg+ mask-graph degree (None: complete graph)."""
    noised: NoisedRing | None = None
    """Distributed noise: inputs come as noised int64 ring vectors (secure groups only)."""
    guard_bits: int = 4
    """Headroom: the ring is sized for ``2^guard_bits`` times the group's largest honest sum,
    so that a result outside the honest range (a corrupted input, secret share or chunk sum:
    a shift of a quarter ring, or any random-looking garbage) is caught (``SumRejected``)
    instead of accepted. It costs ``guard_bits`` bits of fixed-point resolution."""
    weight: float | None = None
    """The public weight of every member's input (1 under DP, where weights are uniform): a
    group's total weight must then be exactly ``weight`` times the members it counted. None:
    weights are private (only ``0 < total <= counted x bound`` is checked)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.bound) and self.bound > 0):
            raise ConfigError(f"value_bound must be positive and finite, got {self.bound!r}")
        if not (math.isfinite(self.stage_timeout_s) and self.stage_timeout_s > 0):
            raise ConfigError(f"stage_timeout_s must be > 0, got {self.stage_timeout_s!r}")
        if not (math.isfinite(self.min_stage_timeout_s) and self.min_stage_timeout_s > 0):
            raise ConfigError(f"min_stage_timeout_s must be > 0, got {self.min_stage_timeout_s!r}")
        if not isinstance(self.adaptive_deadlines, bool):
            raise ConfigError(f"adaptive_deadlines must be a bool, got {self.adaptive_deadlines!r}")
        if self.bits not in (32, 64, None):
            raise ConfigError(f"ring bits must be 32, 64 or None, got {self.bits!r}")
        if not (math.isfinite(self.resolution) and 0 < self.resolution < 1):
            raise ConfigError(f"resolution must be in (0, 1), got {self.resolution!r}")
        if self.threshold is not None and self.threshold < 2:
            raise ConfigError(f"threshold must be at least 2, got {self.threshold!r}")
        if self.degree is not None and self.degree < 1:
            raise ConfigError(f"degree must be at least 1, got {self.degree!r}")
        if self.guard_bits.__class__ is not int or not 0 <= self.guard_bits <= 16:
            raise ConfigError(f"guard_bits must be an integer in [0, 16], got {self.guard_bits!r}")
        if self.weight is not None and not (math.isfinite(self.weight) and self.weight > 0):
            raise ConfigError(f"the public weight must be > 0, got {self.weight!r}")

    def ring_bits(self, k: int) -> Bits:
        """The ring width a group of ``k`` uses (every member derives the same)."""
        if self.bits is not None:
            return self.bits
        narrow = max_scale(bound=self.bound, members=k << self.guard_bits, bits=32)
        return 32 if narrow * self.resolution >= 1 else 64

    def scale(self, k: int) -> float:
        """The fixed-point scale of a group of ``k``: the largest the ring allows for ``bound``
        with ``guard_bits`` of headroom."""
        bits = self.ring_bits(k)
        members = k << self.guard_bits
        scale = max_scale(bound=self.bound, members=members, bits=bits)
        check_capacity(bound=self.bound, members=members, scale=scale, bits=bits)
        return scale

    def threshold_for(self, k: int) -> int:
        """The threshold of a group of ``k``: ``threshold`` if it fits (more than k/2), else
        ceil(2k/3)."""
        t = self.threshold
        if t is not None and k / 2 < t <= k:
            return t
        return default_threshold(k)

    def deadlines_for(self, secure: bool) -> StageDeadlines:
        """A fresh estimator of one peer's stage timeouts for secure or plain groups."""
        return StageDeadlines(
            STAGES if secure else PLAIN_STAGES,
            ceiling=self.stage_timeout_s,
            floor=self.min_stage_timeout_s,
            adaptive=self.adaptive_deadlines,
        )

    def degree_for(self, k: int) -> int | None:
        """The SecAgg+ degree of a group of ``k`` (None: everyone masks with everyone)."""
        d = self.degree
        return d if d is not None and 0 < d < k - 1 else None


@dataclass
class AllReduceStats:
    """Counters (for status and metrics)."""

    completed: int = 0
    aborted: int = 0
    refused: int = 0
    """Inbound protocol messages refused (late, duplicate, inconsistent)."""
    no_group: int = 0
    """Rounds in which no group formed."""
    last_abort: str | None = None
    recovered: int = 0
    """Completed group rounds that finished despite members dropping after their input."""


def check_bound(vector: Tensor, weight: float, bound: float) -> None:
    """``RingOverflow`` if ``|w x|`` or ``w`` exceeds the public bound (or ``x`` holds NaN)."""
    check_contribution(vector, weight)
    lo, hi = (float(v) for v in torch.aminmax(vector.detach()))
    if math.isnan(lo) or math.isnan(hi):
        raise ConfigError("vector holds NaN")
    worst = max(-lo, hi) * weight
    if not (worst <= bound and weight <= bound):
        raise RingOverflow(f"|w x| or w = {max(worst, weight):.6g} exceeds the public bound")


def encode_contribution(
    vector: Tensor, weight: float, k: int, config: AllReduceConfig
) -> tuple[Tensor, float]:
    """``[w x, w]`` in the ring of a group of ``k``, and the scale; ``RingOverflow`` past the
    public bound."""
    check_bound(vector, weight, config.bound)
    contribution = torch.empty(vector.numel() + 1, dtype=torch.float64)
    torch.mul(vector.detach(), weight, out=contribution[:-1])
    contribution[-1] = weight
    scale, bits = config.scale(k), config.ring_bits(k)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("event=encode k=%d ring_bits=%d scale=2^%d", k, bits, round(math.log2(scale)))
    return encode_(contribution, scale=scale, bits=bits), scale


def noised_input(vector: Tensor, k: int, config: AllReduceConfig) -> tuple[Tensor, float, int]:
    """A pre-noised ring input for a group of ``k``: the input, its scale and the group's
    threshold (at least the noise's ``min_counted``). Refuses (``ConfigError``) what the
    settings do not allow and (``RingOverflow``) an input that ``k`` copies could wrap."""
    noised = config.noised
    if noised is None:
        raise ConfigError("an int64 ring input needs distributed-noise settings (noised)")
    if config.ring_bits(k) != 64:
        raise ConfigError("distributed noise runs in Z_2^64: set ring = 64")
    if k < noised.min_counted:
        raise ConfigError(
            f"a group of {k} cannot carry the distributed noise: a sum needs at least "
            f"{noised.min_counted} counted members"
        )
    if vector.dim() != 1 or vector.numel() < 2:
        raise ConfigError("a ring input is a 1-D int64 vector with a weight slot")
    lo, hi = (int(v) for v in torch.aminmax(vector))
    if max(-lo, hi) > (2**63 - 1) // k:
        raise RingOverflow(f"a ring input of magnitude {max(-lo, hi)} could wrap a sum of {k}")
    return vector, noised.scale, max(config.threshold_for(k), noised.min_counted)


Ring = Tensor | Sequence[Tensor]
"""A group's ring total: one vector, or its chunk sums in order (``mpc.Member.output_parts``)."""


def _parts(ring: Ring) -> list[Tensor]:
    parts = [ring] if isinstance(ring, Tensor) else list(ring)
    if not parts or parts[-1].numel() == 0:
        raise ConfigError("a ring total ends with its weight slot")
    return parts


def decode_total(ring: Ring, scale: float) -> Tensor:
    """The decoded group totals ``[sum w x, sum w]`` (float64). Given the chunk sums, each is
    converted straight into its slice of the result (no int64 copy of the whole total)."""
    if isinstance(ring, Tensor):
        return decode(ring, scale=scale, bits=32 if ring.dtype == torch.int32 else 64)
    parts = _parts(ring)
    out = torch.empty(sum(p.numel() for p in parts), dtype=torch.float64)
    lo = 0
    for part in parts:
        hi = lo + part.numel()
        out[lo:hi].copy_(part)  # exact for |v| <= 2^53, as decode's conversion
        lo = hi
    return out.div_(scale)


def check_total(
    ring: Ring, scale: float, counted: int, config: AllReduceConfig, *, noised: bool
) -> None:
    """``SumRejected`` unless the group's ring total can be the sum of ``counted`` honest
    inputs: its weight slot is what their weights must sum to, and every coordinate lies in
    the range ``counted`` inputs within the public bound can reach.

    Plain inputs: each ``|w x|`` and ``w`` is at most ``bound``, so each encoded coordinate at
    most ``ceil(bound scale)``; with a public weight the slot is exactly ``counted`` times its
    encoding. Noised inputs (``gossip.privacy``): the weight slot of each is the ring scale
    exactly, and the plan keeps an honest sum within ``2^(63 - guard_bits)`` (``check_ring_fits``
    with the same guard). The ring leaves ``guard_bits`` of headroom above that range, so a
    result shifted by a quarter ring or more, or random-looking garbage (a share that
    reconstructs a wrong seed), falls outside it. A shift smaller than the honest range is
    indistinguishable from an honest input and is not caught here.
    """
    parts = _parts(ring)
    slot = int(parts[-1][-1])
    bodies = [*parts[:-1], parts[-1][:-1]]
    if noised:
        limit = ((1 << 63) - 1) >> config.guard_bits
        want: int | None = counted * int(scale)
        slack = 0
    else:
        limit = counted * math.ceil(config.bound * scale)
        weight = config.weight
        want = None if weight is None else counted * round(weight * scale)
        slack = counted  # each member's weight may round either way
    if want is not None and abs(slot - want) > slack:
        raise SumRejected(
            f"the group's total weight is {slot / scale:.6g}, but {counted} counted members' "
            f"must sum to {want / scale:.6g}: a member's input or a chunk sum is wrong"
        )
    if not 0 < slot <= limit:
        raise SumRejected("the group's total weight is not positive or exceeds the public bound")
    if config.guard_bits:
        worst = max(
            (max(-int(lo), int(hi)) for lo, hi in (torch.aminmax(b) for b in bodies if b.numel())),
            default=0,
        )
        if worst > limit:
            raise SumRejected(
                f"a coordinate of the group's sum lies outside what {counted} inputs within the "
                "public bound can reach: a member's input, secret share or chunk sum is wrong"
            )


def _result(
    group: Group,
    ring: Ring,
    scale: float,
    contributors: tuple[bytes, ...],
    like: Tensor,
    config: AllReduceConfig,
    *,
    noised: bool = False,
) -> AverageResult:
    check_total(ring, scale, len(contributors), config, noised=noised)
    total = decode_total(ring, scale)
    weight = float(total[-1])
    if not weight > 0:
        raise AggregationAborted("the group's total weight is not positive")
    return AverageResult(
        (total[:-1] / weight).to(like.dtype),
        weight / len(contributors),
        len(contributors),
        group.round,
        group.id,
        contributors,
        total,
        scale,
    )


class _Stages:
    """The deadline rule shared by both all-reduces (see the module docstring), and what the
    member observed for ``gossip.deadlines``: each awaited message's delay after the member
    entered its stage (0 if it came before), late ones included, and the stages that ended on
    their deadline.

    With adaptive deadlines (``ceiling`` set) a stage's timeout is *soft*: at its deadline the
    stage closes only if at least ``need`` other members were heard in it (enough to go on);
    otherwise it waits on, up to ``ceiling`` after the stage began, since closing would end the
    round. With ``agree`` (a group without an inviter's timeouts) every member proposes its
    timeouts in its first-stage messages, and from the second stage on each member uses the
    largest proposal of every stage among those it heard: the members' deadlines agree, up to
    whose first messages arrived, which is what closes the first stage anyway.
    """

    def __init__(
        self,
        now: float,
        timeouts: tuple[float, ...],
        *,
        ceiling: float | None = None,
        floor: float = 0.0,
        need: int = 0,
        agree: bool = False,
    ) -> None:
        self.timeouts = timeouts
        self.ceiling, self.floor, self.need = ceiling, floor, need
        self.stage = 0
        self.deadline = now + timeouts[0]
        self.hard = now + max(timeouts[0], ceiling or 0.0)
        n = len(timeouts)
        self.entered: list[float | None] = [None] * n
        self.entered[0] = now
        self.count = [0] * n
        self.delays: list[tuple[int, float]] = []
        self.timed_out: set[int] = set()
        self._heard: set[tuple[bytes, int]] = set()
        self.proposals: list[tuple[float, ...]] | None = [timeouts] if agree else None

    @classmethod
    def of_run(
        cls,
        now: float,
        timeouts: tuple[float, ...],
        config: AllReduceConfig,
        *,
        need: int,
        agree: bool,
    ) -> _Stages:
        """A group run's stages from its config: soft deadlines up to ``stage_timeout_s`` when
        deadlines adapt, fixed ones otherwise."""
        return cls(
            now,
            timeouts,
            ceiling=config.stage_timeout_s if config.adaptive_deadlines else None,
            floor=config.min_stage_timeout_s,
            need=need,
            agree=agree,
        )

    def proposal_ms(self) -> tuple[int, ...]:
        """This member's timeouts to propose (empty when the group does not agree on them)."""
        if self.proposals is None:
            return ()
        return tuple(max(1, math.ceil(t * 1000)) for t in self.timeouts)

    def propose(self, deadlines_ms: Sequence[int]) -> None:
        """A member's proposal, from its first-stage message (ignored unless it fits)."""
        found = self.proposals
        if found is None or self.stage != 0 or len(deadlines_ms) != len(self.timeouts):
            return
        if all(v.__class__ is int and 0 < v <= 10**7 for v in deadlines_ms):
            proposal = tuple(v / 1000 for v in deadlines_ms)
            found.append(proposal)
            ceiling, start = self.ceiling, self.entered[0]
            if ceiling is not None and start is not None:  # the first stage's too, as it goes
                first = min(ceiling, proposal[0])
                self.deadline = max(self.deadline, start + first)

    def enough(self) -> bool:
        """At least ``need`` other members were heard in the current stage."""
        return self.stage < len(self.count) and self.count[self.stage] >= self.need

    def due(self, now: float, ready: Callable[[], bool]) -> bool:
        """Whether the current stage closes now: its (soft) deadline passed and ``ready()``
        (enough arrived to go on), or its hard deadline passed."""
        return now >= self.deadline and (now >= self.hard or ready())

    def wake_at(self, now: float, ready: Callable[[], bool]) -> float:
        """When the current stage may close (``ready`` as in :meth:`due`)."""
        if now < self.deadline or now >= self.hard or ready():
            return self.deadline
        return self.hard

    def moved(self, now: float, old: int, new: int, *, by_deadline: bool) -> None:
        """The member left stage index ``old`` for ``new`` (``new`` past the last: finished)."""
        if by_deadline:
            self.timed_out.add(old)
        entered = self.entered
        for i in range(old + 1, min(new, len(entered) - 1) + 1):
            entered[i] = now
        if old == 0 and self.proposals is not None and self.ceiling is not None:
            agreed = [max(p[i] for p in self.proposals) for i in range(len(self.timeouts))]
            clamp = min(self.floor, self.ceiling)
            self.timeouts = (
                self.timeouts[0],
                *(min(self.ceiling, max(clamp, t)) for t in agreed[1:]),
            )
            self.proposals = None
        self.stage = new
        if new < len(self.timeouts):
            base = max(now, self.deadline)
            self.deadline = base + self.timeouts[new]
            self.hard = base + max(self.timeouts[new], self.ceiling or 0.0)

    def heard(self, now: float, sender: bytes, stage: int) -> None:
        """An awaited message of stage index ``stage`` arrived (the first one per sender)."""
        key = (sender, stage)
        if key in self._heard or not 0 <= stage < len(self.entered):
            return
        self._heard.add(key)
        self.count[stage] += 1
        entered = self.entered[stage]
        self.delays.append((stage, 0.0 if entered is None else max(0.0, now - entered)))


def _timeouts(
    config: AllReduceConfig, stages: int, timeouts: Sequence[float] | None
) -> tuple[float, ...]:
    """The stage timeouts a group run uses: ``timeouts`` or the fixed ``stage_timeout_s``."""
    if timeouts is None:
        return (config.stage_timeout_s,) * stages
    if len(timeouts) != stages or not all(math.isfinite(t) and t > 0 for t in timeouts):
        raise ConfigError(f"need {stages} positive stage timeouts, got {tuple(timeouts)!r}")
    return tuple(float(t) for t in timeouts)


class SecureGroup:
    """One member's secure all-reduce for one formed group (``mpc.Member`` with deadlines)."""

    message_types: tuple[type, ...] = tuple(MPC_TYPES.values())

    def __init__(
        self,
        seed: bytes,
        group: Group,
        vector: Tensor,
        weight: float,
        config: AllReduceConfig,
        timeouts: Sequence[float] | None = None,
        *,
        agreed: bool = False,
    ) -> None:
        """``timeouts``: one per stage (INPUT to AGGREGATE); None: ``stage_timeout_s``.
        ``agreed``: they are the group's (its inviter's); else, with adaptive deadlines, the
        members agree on them in the INPUT stage (``_Stages``)."""
        self.group = group
        self._config = config
        k = group.size
        self._noised = vector.dtype == torch.int64
        if self._noised:
            self._like = _FLOAT
            self.ring, self.scale, threshold = noised_input(vector, k, config)
        else:
            self._like = vector
            self.ring, self.scale = encode_contribution(vector, weight, k, config)
            threshold = config.threshold_for(k)
        self.member = Member(
            seed,
            group.members,
            group=group.id,
            round=group.round,
            vector=self.ring,
            threshold=threshold,
            degree=config.degree_for(k),
        )
        self._timeouts = _timeouts(config, STAGES, timeouts)
        self._adaptive = config.adaptive_deadlines
        self._agree = self._adaptive and not agreed
        self._stages: _Stages | None = None
        self._stage = Stage.INPUT
        self.wake_at: float | None = None
        """The current stage's deadline (None before the start and once finished); a plain
        attribute, kept by every step, since drivers read it after every message."""
        self.finished = False
        """DONE or ABORTED (kept like ``wake_at``)."""

    @property
    def stages(self) -> _Stages | None:
        """Deadlines and observed delays (None before the start)."""
        return self._stages

    def start(self, now: float) -> Out:
        """Mask the input and send every member its chunk and share."""
        stages = self._stages = _Stages.of_run(
            now, self._timeouts, self._config, need=self.member.threshold - 1, agree=self._agree
        )
        out = self.member.start()
        proposal = stages.proposal_ms()
        if proposal:
            out = [
                (m, replace(msg, deadlines_ms=proposal) if type(msg) is Input else msg)
                for m, msg in out
            ]
        self._moved(now, by_deadline=False)
        return out

    def receive(self, now: float, sender: bytes, message: Any) -> Out:
        """One protocol message (a ``ProtocolError`` refuses it)."""
        member = self.member
        if not self._adaptive:  # fixed deadlines: nothing to observe (the simulator's hot path)
            out = member.receive(sender, message)
            if member.stage is not self._stage:
                self._moved(now, by_deadline=False)
            return out
        try:
            out = member.receive(sender, message)
        except OutOfStage:
            self._heard(now, sender, message)  # a late one: the deadline may be too short
            raise
        self._heard(now, sender, message)
        if member.stage is not self._stage:  # the common case (no move) stays cheap
            self._moved(now, by_deadline=False)
        elif self._stages is not None and not self.finished:
            self.wake_at = self._stages.wake_at(now, self._ready)
        return out

    def _ready(self) -> bool:
        stages = self._stages
        return stages is not None and stages.enough() and self.member.can_advance()

    def _heard(self, now: float, sender: bytes, message: Any) -> None:
        stages, stage = self._stages, STAGE_OF.get(type(message))
        if stages is not None and stage is not None:
            stages.heard(now, sender, stage - Stage.INPUT)
            if stages.proposals is not None and type(message) is Input:
                stages.propose(message.deadlines_ms)

    def wake(self, now: float) -> Out:
        """Close the current stage with what arrived, if its deadline passed."""
        stages = self._stages
        if stages is None or self.member.finished:
            return []
        if not stages.due(now, self._ready):
            self.wake_at = stages.wake_at(now, self._ready)
            return []
        out = self.member.advance()
        self._moved(now, by_deadline=True)
        return out

    def _moved(self, now: float, *, by_deadline: bool) -> None:
        member = self.member
        stage = member.stage
        if stage is not self._stage:
            old, self._stage = self._stage, stage
            if self._stages is not None and stage is not Stage.ABORTED:
                self._stages.moved(
                    now, old - Stage.INPUT, stage - Stage.INPUT, by_deadline=by_deadline
                )
            elif self._stages is not None and by_deadline:
                self._stages.timed_out.add(old - Stage.INPUT)
        stages = self._stages
        self.finished = member.finished
        self.wake_at = None if stages is None or self.finished else stages.wake_at(now, self._ready)

    def cancel(self) -> None:
        """Abort now and forget the pair secrets."""
        self.member.cancel("the round's driver stopped")
        self.wake_at, self.finished = None, True

    def result(self) -> AverageResult:
        """The group mean, or ``AggregationAborted`` with the member's reason."""
        member = self.member
        if member.stage is not Stage.DONE:
            reason = member.abort_reason or "did not finish"
            if member.blamed:  # a lie was caught and refused: say whose
                who, what = next(iter(member.blamed.items()))
                raise SumRejected(f"{reason} (member {who.hex()[:16]} {what})", blamed=who)
            if member.sum_rejected:  # two reducers of a chunk disagree; we cannot tell who lied
                raise SumRejected(reason)
            raise AggregationAborted(reason)
        counted = member.counted or frozenset()
        contributors = tuple(m for m in self.group.members if m in counted)
        result = _result(
            self.group,
            member.output_parts(),
            self.scale,
            contributors,
            self._like,
            self._config,
            noised=self._noised,
        )
        return replace(result, recovered=True) if member.recovered else result


class PlainGroup:
    """One member's plaintext butterfly all-reduce for one formed group (a baseline).

    Every chunk has two reducers, as in a secure group: chunk j is reduced by member j and
    member j + 1, so member i gets every member's chunks i and i - 1 (two ``PlainChunk``).
    Stage 1 (reduce): at the deadline (or when all arrived) member i sends the sums of its two
    chunks, each naming its contributors, to everyone. Stage 2 (gather, by one more
    ``stage_timeout_s``): the member takes the largest contributor set C (ties: the smallest
    sorted ids) for which every chunk has a sum over exactly C, and needs |C| >= the threshold.
    So a reducer that left costs nothing while its partner lives (``AverageResult.recovered``);
    a chunk whose two reducers are both gone, or no common set, fails the round. The two sums of
    a chunk over the same C must be equal (else the round fails): no partial average is ever
    formed, the counted set is exact.
    """

    message_types: tuple[type, ...] = (PlainChunk, PlainChunkSum)

    def __init__(
        self,
        me: bytes,
        group: Group,
        vector: Tensor,
        weight: float,
        config: AllReduceConfig,
        timeouts: Sequence[float] | None = None,
        *,
        agreed: bool = False,
    ) -> None:
        """``timeouts``: of the reduce and the gather stage; None: ``stage_timeout_s``;
        ``agreed`` as in :class:`SecureGroup`."""
        self.me, self.group = me, group
        self._like = vector
        self._config = config
        self.ring, self.scale = encode_contribution(vector, weight, group.size, config)
        self._k = group.size
        self._index = {m: i for i, m in enumerate(group.members)}
        self._j = self._index[me]
        self._bounds = chunk_bounds(self.ring.numel(), self._k)
        self._threshold = config.threshold_for(self._k)
        self._timeouts = _timeouts(config, PLAIN_STAGES, timeouts)
        self._adaptive = config.adaptive_deadlines
        self._agree = self._adaptive and not agreed
        self._now = 0.0  # the latest time this run was given (for wake_at)
        self._stage = 0  # 0 not started, 1 reduce, 2 gather, 3 done
        self.stages: _Stages | None = None
        """Deadlines and observed delays (None before the start)."""
        # the two chunks this member reduces (its own and its predecessor's) -> sender -> slice
        self._own = (self._j, (self._j - 1) % self._k)
        self._mine: dict[int, dict[bytes, Tensor]] = {c: {} for c in self._own}
        # chunk -> reducer -> (sum, contributors)
        self._sums: dict[int, dict[bytes, tuple[Tensor, tuple[bytes, ...]]]] = {}
        self._failure: str | None = None
        self._result: AverageResult | None = None

    @property
    def finished(self) -> bool:
        """The result (or failure) is known."""
        return self._stage == 3

    @property
    def wake_at(self) -> float | None:
        """The current stage's deadline."""
        stages = self.stages
        if stages is None or self._stage not in (1, 2):
            return None
        return stages.wake_at(self._now, self._ready)

    def _ready(self) -> bool:
        stages = self.stages
        if stages is None or not stages.enough():
            return False
        return self._stage == 1 or all(self._sums.get(j) for j in range(self._k))

    def _reducers(self, chunk: int) -> tuple[bytes, bytes]:
        members = self.group.members
        return members[chunk], members[(chunk + 1) % self._k]

    def start(self, now: float) -> Out:
        """Send members i and i + 1 chunk i of the encoded input."""
        self._now = now
        self._stage = 1
        stages = self.stages = _Stages.of_run(
            now, self._timeouts, self._config, need=self._threshold - 1, agree=self._agree
        )
        proposal = stages.proposal_ms()
        g, ring = self.group, self.ring
        out: Out = []
        for j in range(self._k):
            lo, hi = self._bounds[j]
            for m in self._reducers(j):
                if m == self.me:
                    self._mine[j][m] = ring[lo:hi]
                else:
                    out.append((m, PlainChunk(g.id, g.round, j, ring[lo:hi], proposal)))
        return out + self._progress(now)

    def receive(self, now: float, sender: bytes, message: Any) -> Out:
        """A chunk (to reduce) or a chunk sum (to gather)."""
        self._now = now
        g = self.group
        j = message.chunk
        if sender not in self._index or message.round != g.round or j.__class__ is not int:
            raise InconsistentMessage("not a message of this group round")
        if not 0 <= j < self._k:
            raise InconsistentMessage(f"no chunk {j} in a group of {self._k}")
        data = message.data
        lo, hi = self._bounds[j]
        if not (
            isinstance(data, Tensor)
            and data.dtype == self.ring.dtype
            and data.dim() == 1
            and data.numel() == hi - lo
        ):
            raise MalformedMessage(f"chunk {j} must be {hi - lo} ring elements")
        stages = self.stages if self._adaptive else None
        if type(message) is PlainChunk:
            if stages is not None:
                stages.heard(now, sender, 0)
                stages.propose(message.deadlines_ms)
            if self._stage != 1:
                raise OutOfStage("a chunk after this member closed its reduce stage")
            got = self._mine.get(j)
            if got is None or sender in got:
                raise InconsistentMessage("a chunk this member does not reduce, or a second one")
            got[sender] = data
        else:
            if stages is not None:
                stages.heard(now, sender, 1)
            if self._stage >= 3:
                raise OutOfStage("a chunk sum after the round ended")
            sums = self._sums.setdefault(j, {})
            if sender not in self._reducers(j) or sender in sums:
                raise InconsistentMessage("a chunk sum from another reducer, or a second one")
            names = message.contributors
            if not all(isinstance(p, PeerId) for p in names):
                raise MalformedMessage("contributors must be peer ids")
            contributors = tuple(p.raw for p in names)
            if not set(contributors) <= self._index.keys():
                raise InconsistentMessage("contributors outside the group")
            sums[sender] = (data, contributors)
        return self._progress(now)

    def wake(self, now: float) -> Out:
        """Close the current stage if its deadline passed."""
        self._now = now
        stages = self.stages
        if stages is None or self._stage not in (1, 2) or not stages.due(now, self._ready):
            return []
        if self._stage == 1:
            return self._close_reduce(now, by_deadline=True)
        stages.timed_out.add(1)
        self._finish()
        return []

    def _progress(self, now: float) -> Out:
        k = self._k
        if self._stage == 1 and all(len(got) == k for got in self._mine.values()):
            return self._close_reduce(now)
        if self._stage == 2 and all(len(self._sums.get(j, ())) == 2 for j in range(k)):
            self._finish()
        return []

    def _close_reduce(self, now: float, *, by_deadline: bool = False) -> Out:
        g = self.group
        if self.stages is not None:
            self.stages.moved(now, 0, 1, by_deadline=by_deadline)
        out: Out = []
        for j in self._own:
            got = self._mine[j]
            contributors = tuple(sorted(got))
            total = torch.stack([got[p] for p in contributors]).sum(dim=0, dtype=self.ring.dtype)
            self._sums.setdefault(j, {})[self.me] = (total, contributors)
            names = tuple(PeerId(p) for p in contributors)
            msg = PlainChunkSum(g.id, g.round, j, total, names)
            out += [(m, msg) for m in g.members if m != self.me]
        self._stage = 2  # its deadline: a slower reducer may send at the end of stage 1
        self._mine = {}
        return out + self._progress(now)

    def _finish(self) -> None:
        self._stage = 3
        k = self._k
        sums, self._sums = self._sums, {}
        missing = [j for j in range(k) if not sums.get(j)]
        if missing:
            self._failure = f"chunk sums {missing} never arrived"
            return
        # the contributor sets every chunk has a sum over; the largest wins
        common = set.intersection(*({c for _, c in sums[j].values()} for j in range(k)))
        if not common:
            self._failure = "reducers disagree on the contributors"
            return
        contributors = min(common, key=lambda c: (-len(c), c))
        if len(contributors) < self._threshold:
            self._failure = f"{len(contributors)} contributors, threshold {self._threshold}"
            return
        parts = []
        for j in range(k):
            over = [t for t, c in sums[j].values() if c == contributors]
            if any(not torch.equal(t, over[0]) for t in over[1:]):
                self._failure = f"the two reducers of chunk {j} sent different sums"
                return
            parts.append(over[0])
        recovered = any(len(sums[j]) < 2 for j in range(k)) or any(
            c != contributors for j in range(k) for _, c in sums[j].values()
        )
        try:
            result = _result(self.group, parts, self.scale, contributors, self._like, self._config)
        except AggregationAborted as exc:
            self._failure = str(exc)
            return
        self._result = replace(result, recovered=True) if recovered else result

    def cancel(self) -> None:
        """Stop now (the round fails for this member)."""
        if self._stage != 3:
            self._stage = 3
            self._failure = "cancelled"

    def result(self) -> AverageResult:
        """The group mean, or ``AggregationAborted`` with the reason."""
        if self._result is None:
            raise AggregationAborted(self._failure or "did not finish")
        return self._result


GroupRun = SecureGroup | PlainGroup


class GroupAveraging:
    """One peer's averaging by groups (``gossip.machine.Machine``): form, then all-reduce.

    ``secure=True`` (name ``"secure"``) runs :class:`SecureGroup`, else :class:`PlainGroup`.
    ``seed`` is the peer's 32-byte Ed25519 identity seed (its pair keys come from it), ``me``
    its raw id. A round whose group never formed ends with ``GroupFormationFailed`` (nothing
    was sent: the caller may offer the same contribution again).
    """

    def __init__(
        self,
        seed: bytes,
        me: bytes,
        former: GroupFormer,
        *,
        secure: bool = True,
        config: AllReduceConfig | None = None,
    ) -> None:
        self.name = "secure" if secure else "plain"
        self.config = config or AllReduceConfig()
        self.stats = AllReduceStats()
        self.former = former
        self._seed, self.me, self._secure = seed, me, secure
        kinds = SecureGroup.message_types if secure else PlainGroup.message_types
        self._group_types = frozenset(kinds)
        self.message_types: tuple[type, ...] = (*former.message_types, *kinds)
        self._job: RoundJob | None = None
        self._forming = False
        self._run: GroupRun | None = None
        self.done = False
        """The round is over (``outcome()`` is ready); a plain attribute: read per message."""
        self._outcome: AverageResult | AggregationError | None = None
        self._early: OrderedDict[bytes, list[tuple[bytes, Any]]] = OrderedDict()
        self._finished: OrderedDict[bytes, None] = OrderedDict()
        self._late: OrderedDict[bytes, _Stages] = OrderedDict()
        """The last finished groups' stage clocks: a message that comes late is a sample."""
        self.deadlines = self.config.deadlines_for(secure)
        """This peer's stage timeouts (``gossip.deadlines``): learned from its group rounds,
        proposed to the groups it invites."""

    # ------------------------------------------------------------------ the Machine interface

    @property
    def wake_at(self) -> float | None:
        """The former's or the group run's next deadline."""
        run = self._run
        if run is not None:
            return run.wake_at
        return self.former.wake_at

    @property
    def running(self) -> bool:
        """A round is in progress."""
        return self._job is not None

    def begin(self, now: float, job: RoundJob) -> Out:
        """Form this round's group (the contribution is checked against the bound first)."""
        if self._job is not None or self.done:
            raise ConfigError("a round is already running on this peer")
        if job.vector.dtype == torch.int64:
            if not self._secure or self.config.noised is None:
                raise ConfigError(
                    "a distributed-noise contribution (an int64 ring input) needs secure "
                    "groups with distributed noise; this averaging is " + self.name
                )
            if job.vector.dim() != 1 or not (math.isfinite(job.weight) and job.weight > 0):
                raise ConfigError("a ring input is a 1-D int64 vector with a positive weight")
        else:
            check_bound(job.vector, job.weight, self.config.bound)
        self._job = job
        self._forming = True
        self.former.proposed = self.deadlines.timeouts()
        out = self.former.start(now, job.round, job.view)
        return out + self._after_former(now)

    def receive(self, now: float, sender: bytes, message: Any) -> Out:
        """A matchmaking message, or a message of a group round (routed by group id)."""
        cls = type(message)
        if cls not in self._group_types:
            out = self.former.receive(now, sender, message)
            return out + self._after_former(now)
        gid = message.group
        run = self._run
        if run is not None and gid == run.group.id:
            out = run.receive(now, sender, message)
            if run.finished:
                self._check_run()
            return out
        if gid in self._finished:
            stages = self._late.get(gid)
            stage = _STAGE_INDEX.get(cls)
            if stages is not None and stage is not None:  # late: the deadline may be short
                stages.heard(now, sender, stage)
                self.deadlines.observe(stages.delays)
                stages.delays = []
            raise OutOfStage("that group's round is over on this peer")
        early = self._early.get(gid)
        if early is None:
            if len(self._early) >= _EARLY_GROUPS:
                self._early.popitem(last=False)
            early = self._early[gid] = []
        if len(early) >= _EARLY_PER_GROUP:
            raise OutOfStage("too many messages for a group round that has not started here")
        early.append((sender, message))
        return []

    def wake(self, now: float) -> Out:
        """Pass the deadline on to the group run, or to the former."""
        run = self._run
        if run is not None:
            out = run.wake(now)
            self._check_run()
            return out
        out = self.former.wake(now)
        return out + self._after_former(now)

    def outcome(self) -> AverageResult:
        """The finished round's mean, or raise why it failed; readies the next ``begin``."""
        if not self.done:
            raise OutOfStage("the round is not over")
        outcome, self._outcome, self.done = self._outcome, None, False
        if isinstance(outcome, AggregationError):
            raise outcome
        assert outcome is not None
        return outcome

    def cancel(self, now: float) -> Out:
        """End the running round now (the driver stopped, the peer left)."""
        if self._job is None:
            return []
        out: Out = []
        if self._forming:
            out = self.former.stop()
            self._forming = False
        run = self._run
        if run is not None:
            run.cancel()
            self._retire(run, observe=False)  # this peer stopped: nothing to learn
        self._job = None
        self.done, self._outcome = False, None
        return out

    # ------------------------------------------------------------------ transitions

    def _after_former(self, now: float) -> Out:
        if not self._forming:
            return []
        former = self.former
        if former.failure is not None:
            self._forming = False
            self.stats.no_group += 1
            reason, former.failure = former.failure, None
            self._end(GroupFormationFailed(reason))
            return []
        group = former.formed
        if group is None:
            return []
        former.formed = None
        self._forming = False
        return self._enter(now, group)

    def _enter(self, now: float, group: Group) -> Out:
        job = self._job
        assert job is not None
        if self.me not in group.members or group.id in self._finished:
            self._end(self._fail(group, "an invalid group for this peer"))
            return []
        run: GroupRun
        deadlines = self.deadlines
        agreed = bool(group.deadlines)  # the inviter's, else the members agree on theirs
        timeouts = deadlines.accept(group.deadlines) if agreed else deadlines.timeouts()
        try:
            if self._secure:
                run = SecureGroup(
                    self._seed, group, job.vector, job.weight, self.config, timeouts, agreed=agreed
                )
            else:
                run = PlainGroup(
                    self.me, group, job.vector, job.weight, self.config, timeouts, agreed=agreed
                )
        except (ConfigError, AggregationError, ProtocolError) as exc:
            self._end(self._fail(group, str(exc)))
            return []
        early = self._early.pop(group.id, [])
        if isinstance(run, SecureGroup):
            ahead = {sender for sender, message in early if type(message) is View}
            if len(ahead) >= run.member.threshold:
                # t members closed their receipts before this member began: none counts it
                # live or reveals to it, so it could never finish. A straggler ends at once
                # (sending nothing) instead of waiting out every deadline.
                self._retire(run, observe=False)
                self._end(self._fail(group, f"late: {len(ahead)} members were past their receipts"))
                return []
        self._run = run
        out = run.start(now)
        for sender, message in early:
            try:
                out += run.receive(now, sender, message)
            except ProtocolError:
                self.stats.refused += 1
            if run.finished:
                break
        self._check_run()
        return out

    def _check_run(self) -> None:
        run = self._run
        if run is None or not run.finished:
            return
        try:
            result = run.result()
        except AggregationAborted as exc:
            self._retire(run)
            self._end(self._fail(run.group, str(exc)))
            return
        self._retire(run)
        self.stats.completed += 1
        self.stats.recovered += result.recovered
        self._end(result)

    def _retire(self, run: GroupRun, *, observe: bool = True) -> None:
        stages = run.stages if observe and self.deadlines.adaptive else None
        if stages is not None:
            self.deadlines.observe(stages.delays)
            stages.delays = []
            self._late[run.group.id] = stages
            if len(self._late) > _LATE_GROUPS:
                self._late.popitem(last=False)
        self._run = None
        self._finished[run.group.id] = None
        if len(self._finished) > _FINISHED_MEMORY:
            self._finished.popitem(last=False)

    def _end(self, outcome: AverageResult | AggregationError) -> None:
        self._job = None
        self.done = True
        self._outcome = outcome

    def _fail(self, group: Group, reason: str) -> AggregationAborted:
        self.stats.aborted += 1
        self.stats.last_abort = reason
        log.warning(
            "event=group_round_aborted round=%d group=%s size=%d reason=%s",
            group.round,
            group.id.hex()[:8],
            group.size,
            reason,
        )
        return AggregationAborted(
            f"group round aborted: {reason}", group=group.id, members=group.members
        )


def group_members(members: Sequence[PeerId]) -> tuple[bytes, ...]:
    """Raw ids, sorted, of ``members`` (for building a ``Group`` by hand)."""
    return tuple(sorted(m.raw for m in members))
