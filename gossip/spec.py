"""One description of a training run: every shared setting, with one name and one default.

:class:`RunSpec` holds every setting a run shares across peers and front ends: the daemon's
``[training]`` table and ``murmur start`` flags (``p2p.config.TrainingConfig``), the
simulator's scenario fields and ``murmur-sim`` flags (``simulator.config.Scenario``) and the
Python API's ``murmur.Training`` all take their names and defaults from it
(``tests/test_run_spec.py`` holds them to it), and each turns itself into a ``RunSpec`` to run.
``gossip.run`` assembles a peer from one.

This module imports nothing heavy (no torch), so that configuration errors answer at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

from floor.errors import ConfigError

__all__ = [
    "ALGORITHMS",
    "ALIASES",
    "MATCHMAKING",
    "MAX_GROUP_SIZE",
    "NOISE_MODES",
    "PRIVACY_UNITS",
    "RINGS",
    "SPEC",
    "SPEC_FIELDS",
    "TOPOLOGIES",
    "RunSpec",
    "algorithm_name",
]

MAX_GROUP_SIZE = 256
"""The largest group (Shamir shares are evaluated at x = 1..256)."""
TOPOLOGIES = ("ring", "regular", "complete", "erdos_renyi")
"""Fixed topologies for D-PSGD."""
ALGORITHMS = ("secure", "plain", "pairwise", "push-sum", "dpsgd")
"""Averaging algorithms: secure groups, plaintext groups, and the three neighbour baselines."""
ALIASES = {"secure-group": "secure", "group": "plain", "push_sum": "push-sum"}
"""Older spellings still read from files and flags (``algorithm_name`` maps them)."""
RINGS = ("64", "32", "auto")
"""Ring widths of group averaging: Z_2^64, Z_2^32, or ``auto`` (32 bits when ``value_bound``
and the group size still leave a fixed-point step of at most 2^-20, else 64)."""
PRIVACY_UNITS = ("record", "peer", "none")
"""Whose data epsilon protects: one row (DP-SGD), a whole peer (its noised update), nobody."""
NOISE_MODES = ("auto", "local", "distributed")
"""Where peer-level noise is added: ``distributed`` integer shares in the ring of a secure group
(``auto`` picks it for peer-level privacy in secure groups), or ``local`` float noise."""
MATCHMAKING = ("invite", "hash")
"""How groups form: by invitation (serverless, any view) or by hashing a shared view."""


def algorithm_name(name: str) -> str:
    """The canonical name of an algorithm (older spellings accepted); ``ConfigError`` if none."""
    canonical = ALIASES.get(name, name)
    if canonical not in ALGORITHMS:
        raise ConfigError(f"algorithm must be one of {', '.join(ALGORITHMS)}; got {name!r}")
    return canonical


@dataclass(frozen=True)
class RunSpec:
    """Every shared setting of a training run (the same on every peer of the run)."""

    # training
    rounds: int = 25
    """Rounds each peer trains (its planned contributions: the privacy budget covers them)."""
    local_steps: int = 5
    """Local SGD steps per round."""
    lr: float = 0.3
    """Learning rate of local SGD."""
    sample_rate: float = 0.2
    """Fraction of the local rows per step (the Poisson rate of record-level DP-SGD)."""
    seed: int = 0
    """Data split and initial model (never the DP noise or the masks)."""
    # privacy
    privacy: str = "record"
    """Privacy unit: record, peer or none (``PRIVACY_UNITS``)."""
    epsilon: float = 8.0
    """Privacy budget over all rounds, at ``delta`` (``inf``: no cap, with a fixed
    ``noise_multiplier``)."""
    delta: float = 1e-5
    """The delta of the budget."""
    clip: float = 1.0
    """L2 clip norm C (per example for record, of the round's update for peer)."""
    noise_multiplier: float = 0.0
    """A fixed noise multiplier (0: calibrated so that ``rounds`` contributions spend
    exactly ``epsilon``)."""
    dp_noise: str = "auto"
    """Where peer-level noise goes (``NOISE_MODES``): auto (distributed in secure groups,
    local otherwise), local or distributed."""
    colluders: int = 0
    """Distributed noise: group members assumed to collude against a peer (their noise
    shares do not count for it; each member adds more)."""
    # averaging
    algorithm: str = "secure"
    """Averaging: secure, plain, pairwise, push-sum or dpsgd (``ALGORITHMS``)."""
    group_size: int = 8
    """Target group size k (group averaging)."""
    min_group_size: int = 3
    """Smaller groups dissolve (in a group of two, the sum reveals the other's update)."""
    threshold: int = 0
    """Least number of counted inputs in a group (0: ceil(2k/3))."""
    degree: int = 0
    """SecAgg+ mask-graph degree (0: every member masks with every other)."""
    ring: str = "64"
    """Ring of group averaging: 64, 32 or auto (``RINGS``)."""
    value_bound: float = 1e6
    """Public bound on every |w x| and w a peer contributes (w: its row count, or 1 under
    DP); a larger value fails that peer's round with ``RingOverflow``."""
    stage_timeout_s: float = 2.0
    """Deadline of one group protocol stage, seconds: the longest an adaptive one waits."""
    min_stage_timeout_s: float = 0.5
    """The shortest an adaptive stage deadline gets, seconds."""
    adaptive_deadlines: bool = False
    """Learn each group stage's deadline from the arrival delays a peer observed (between
    min_stage_timeout_s and stage_timeout_s; ``gossip.deadlines``); false: always
    stage_timeout_s. Off by default: under churn.toml it halves a run's virtual time but
    more than doubles the member-rounds without an average (bench/results/churn.md)."""
    match_timeout_s: float = 5.0
    """How long a peer tries to form a round's group, seconds."""
    form_timeout_s: float = 0.5
    """An inviter closes (or dissolves) its group this long after it starts inviting."""
    period_s: float = 1.0
    """Round period of the pairwise and push-sum baselines, seconds."""
    topology: str = "regular"
    """D-PSGD topology: ring, regular, complete or erdos_renyi."""
    topology_degree: int = 4
    """D-PSGD neighbours per peer (regular)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "algorithm", algorithm_name(self.algorithm))

        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ConfigError(f"{name} {what}; got {getattr(self, name)!r}")

        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "float" and (isinstance(value, bool) or not isinstance(value, float)):
                if isinstance(value, int) and not isinstance(value, bool):
                    object.__setattr__(self, f.name, float(value))
                    value = float(value)
                else:
                    raise ConfigError(f"{f.name} must be a number; got {value!r}")
            if f.type == "float" and f.name != "epsilon":
                need(math.isfinite(value), f.name, "must be finite")
            if f.type == "int":
                need(isinstance(value, int) and not isinstance(value, bool), f.name, "must be int")
        need(self.rounds >= 1, "rounds", "must be at least 1")
        need(self.local_steps >= 1, "local_steps", "must be at least 1")
        need(self.lr > 0, "lr", "must be > 0")
        need(0 < self.sample_rate <= 1, "sample_rate", "must be in (0, 1]")
        need(self.seed >= 0, "seed", "must be >= 0")
        need(self.privacy in PRIVACY_UNITS, "privacy", f"must be one of {PRIVACY_UNITS}")
        need(self.epsilon > 0, "epsilon", "must be > 0")
        need(
            math.isfinite(self.epsilon) or self.noise_multiplier > 0 or not self.private,
            "epsilon",
            "must be finite (it may be infinite, no cap, only with a noise_multiplier)",
        )
        need(0 < self.delta < 1, "delta", "must be in (0, 1)")
        need(self.clip > 0, "clip", "must be > 0")
        need(self.noise_multiplier >= 0, "noise_multiplier", "must be >= 0 (0: calibrate)")
        need(self.dp_noise in NOISE_MODES, "dp_noise", f"must be one of {NOISE_MODES}")
        need(self.colluders >= 0, "colluders", "must be >= 0")
        need(
            self.dp_noise != "distributed"
            or (self.privacy == "peer" and self.algorithm == "secure"),
            "dp_noise",
            "distributed needs privacy = peer and algorithm = secure",
        )
        if self.algorithm in ("secure", "plain"):
            need(self.min_group_size >= 3, "min_group_size", _SMALL_GROUP)
            need(self.group_size >= 3, "group_size", _SMALL_GROUP)
            need(
                self.min_group_size <= self.group_size <= MAX_GROUP_SIZE,
                "group_size",
                f"must be in [min_group_size, {MAX_GROUP_SIZE}] (min_group_size is "
                f"{self.min_group_size})",
            )
        need(self.threshold >= 0, "threshold", "must be >= 0 (0: ceil(2k/3))")
        need(self.degree >= 0, "degree", "must be >= 0 (0: complete mask graph)")
        need(self.ring in RINGS, "ring", f"must be one of {RINGS}")
        need(self.value_bound > 0, "value_bound", "must be > 0")
        need(isinstance(self.adaptive_deadlines, bool), "adaptive_deadlines", "must be a bool")
        names = ("stage_timeout_s", "min_stage_timeout_s", "match_timeout_s", "form_timeout_s")
        for name in (*names, "period_s"):
            need(getattr(self, name) > 0, name, "must be > 0")
        need(self.topology in TOPOLOGIES, "topology", f"must be one of {TOPOLOGIES}")
        need(self.topology_degree >= 1, "topology_degree", "must be at least 1")

        if self.distributed:
            need(self.ring != "32", "ring", "must be 64 or auto under distributed noise (Z_2^64)")
            need(
                self.noise_shares >= 1,
                "colluders",
                f"must be below the group threshold {self.group_threshold} (group_size "
                f"{self.group_size}): some counted member's noise must be honest",
            )

    @property
    def distributed(self) -> bool:
        """Whether peer-level noise is added as distributed shares in secure groups."""
        return (
            self.privacy == "peer"
            and self.algorithm == "secure"
            and self.dp_noise in ("auto", "distributed")
        )

    @property
    def group_threshold(self) -> int:
        """The threshold of a full group: ``threshold`` if it fits, else ceil(2k/3)."""
        k = self.group_size
        return self.threshold if k / 2 < self.threshold <= k else -(-2 * k // 3)

    @property
    def noise_shares(self) -> int:
        """Distributed noise: the honest counted shares a group sum must carry (the full
        group's threshold minus the colluders)."""
        return self.group_threshold - self.colluders

    @property
    def smallest_group(self) -> int:
        """The smallest group that may form: ``min_group_size``, or under distributed noise
        at least the full group's threshold (a smaller sum would carry too little noise)."""
        if self.distributed:
            return max(self.min_group_size, self.group_threshold)
        return self.min_group_size

    def replace(self, **changes: Any) -> RunSpec:
        """A copy with ``changes``."""
        return replace(self, **changes)

    @property
    def ring_bits(self) -> Literal[32, 64] | None:
        """``ring`` as ``AllReduceConfig.bits`` (None: auto)."""
        return None if self.ring == "auto" else (32 if self.ring == "32" else 64)

    @property
    def private(self) -> bool:
        """Whether differential privacy is on."""
        return self.privacy != "none"


_SMALL_GROUP = "must be at least 3 (in a group of two, the sum reveals the other member's update)"

SPEC = RunSpec()
"""The defaults, for front ends that declare the same fields."""
SPEC_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(RunSpec))
"""The names of the shared settings."""
