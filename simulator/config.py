"""Scenarios: one frozen dataclass of every simulator setting, loaded from TOML or flags.

A scenario file groups fields in tables (``[network]``, ``[privacy]``, ...) for readability;
each field has exactly one table (see ``SECTIONS``), and the same field is the CLI flag
``--field-name``. Unknown tables or keys, wrong types and out-of-range values raise one
``ConfigError`` that names the field. A top-level ``[sweep]`` table (``field``, ``values``) asks
for several runs that differ in one field (see ``load_sweep``).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from floor.errors import ConfigError
from gossip.spec import ALGORITHMS, ALIASES, SPEC, SPEC_FIELDS, TOPOLOGIES, RunSpec, algorithm_name

__all__ = [
    "ALGORITHMS",
    "SECTIONS",
    "Scenario",
    "Sweep",
    "load_scenario",
    "load_sweep",
    "parse_value",
]

_CHOICES: dict[str, tuple[str, ...]] = {
    "algorithm": ALGORITHMS + tuple(ALIASES),
    "fidelity": ("object", "wire"),
    "task": ("digits", "breast_cancer", "credit", "mnist", "synthetic"),
    "model": ("logreg", "mlp"),
    "partition": ("auto", "iid", "dirichlet", "label", "natural"),
    "synthetic": ("iid", "niid"),
    "privacy": ("record", "peer", "none"),
    "latency_dist": ("constant", "uniform", "normal", "lognormal", "exponential"),
    "topology": TOPOLOGIES,
    "training": ("auto", "per-peer", "stacked"),
    "engine": ("gossip", "direct"),
    "matchmaking": ("hash", "invite"),
}


def _f(section: str, default: Any, help: str) -> Any:
    return field(default=default, metadata={"section": section, "help": help})


@dataclass(frozen=True)
class Scenario:
    """Every setting of one simulation run. Defaults serve a first run (about a minute).

    The fields a run shares with the daemon and the Python API (``gossip.spec.SPEC_FIELDS``)
    have the same names and defaults as ``gossip.spec.RunSpec``; :meth:`spec` gives them as one.
    """

    # [run]
    name: str = _f("run", "default", "a label for plots and summaries")
    peers: int = _f("run", 100, "number of peers")
    rounds: int = _f("run", SPEC.rounds, "number of rounds")
    algorithm: str = _f("run", SPEC.algorithm, "averaging algorithm: " + ", ".join(ALGORITHMS))
    seed: int = _f("run", SPEC.seed, "seed of data split, models, network and churn")
    fidelity: str = _f("run", "object", "object (message objects) or wire (encoded envelopes)")
    eval_peers: int = _f("run", 32, "peers whose models are evaluated each round (0 = all)")
    training: str = _f("run", "auto", "auto, per-peer (Learner) or stacked (one batched step)")
    engine: str = _f(
        "run",
        "gossip",
        "gossip (the machines on asyncio, as in the daemon) or direct (the same machines from "
        "the network's ticks, with group workers, for scale)",
    )
    workers: int = _f(
        "run",
        0,
        "processes for a round's groups (engine = direct, secure or plain, hash matchmaking); "
        "0 = one per core from 400 peers; results do not depend on it",
    )
    # [task]
    task: str = _f(
        "task",
        "digits",
        "digits, breast_cancer, credit, mnist (from a local cache: $MURMUR_DATASETS) or "
        "synthetic (FedProx Synthetic(alpha, beta): one device of ~80 rows per peer, so the "
        "data grows with --peers)",
    )
    model: str = _f("task", "logreg", "logreg or mlp")
    synthetic: str = _f(
        "task",
        "iid",
        "synthetic task: iid (FedProx Synthetic-IID, one shared model) or niid "
        "(Synthetic(alpha, beta), each device its own model)",
    )
    synthetic_alpha: float = _f("task", 0.0, "niid synthetic: how much the devices' models differ")
    synthetic_beta: float = _f("task", 0.0, "niid synthetic: how much the devices' inputs differ")
    partition: str = _f(
        "task",
        "auto",
        "auto (natural for synthetic, else iid), iid, dirichlet, label, or natural (peer k "
        "holds device k's rows)",
    )
    alpha: float = _f("task", 0.5, "Dirichlet concentration (partition = dirichlet)")
    labels_per_peer: int = _f("task", 2, "classes per peer (partition = label)")
    # [train]
    local_steps: int = _f("train", SPEC.local_steps, "local SGD steps per round")
    lr: float = _f("train", SPEC.lr, "learning rate")
    sample_rate: float = _f("train", SPEC.sample_rate, "fraction of local rows per step")
    # [privacy]
    privacy: str = _f("privacy", SPEC.privacy, "record, peer or none")
    epsilon: float = _f("privacy", SPEC.epsilon, "target epsilon over all rounds")
    delta: float = _f("privacy", SPEC.delta, "delta")
    clip: float = _f("privacy", SPEC.clip, "clipping norm C")
    noise_multiplier: float = _f(
        "privacy", SPEC.noise_multiplier, "fixed noise multiplier (0 = calibrate)"
    )
    dp_noise: str = _f(
        "privacy",
        SPEC.dp_noise,
        "peer-level noise: auto (distributed in secure groups), local or distributed",
    )
    colluders: int = _f(
        "privacy", SPEC.colluders, "distributed noise: group members assumed to collude"
    )
    # [group]
    group_size: int = _f("group", SPEC.group_size, "target group size (secure, plain)")
    min_group_size: int = _f("group", SPEC.min_group_size, "smaller groups dissolve (>= 3)")
    matchmaking: str = _f(
        "group", "hash", "hash (deterministic groups) or invite (serverless; gossip engine)"
    )
    threshold: int = _f("group", SPEC.threshold, "secure aggregation threshold (0 = ceil(2k/3))")
    degree: int = _f("group", SPEC.degree, "SecAgg+ mask-graph degree (0 = complete graph)")
    ring: str = _f("group", SPEC.ring, "ring of group averaging: 64, 32 or auto")
    value_bound: float = _f("group", SPEC.value_bound, "public bound on |w x| and w")
    stage_timeout_s: float = _f(
        "group", SPEC.stage_timeout_s, "deadline of one protocol stage (the longest), seconds"
    )
    min_stage_timeout_s: float = _f(
        "group", SPEC.min_stage_timeout_s, "the shortest an adaptive stage deadline gets, s"
    )
    adaptive_deadlines: bool = _f(
        "group", SPEC.adaptive_deadlines, "learn stage deadlines from observed delays"
    )
    match_timeout_s: float = _f(
        "group", SPEC.match_timeout_s, "how long a peer tries to form a group (invite), s"
    )
    form_timeout_s: float = _f(
        "group", SPEC.form_timeout_s, "an inviter closes its group this long after starting, s"
    )
    period_s: float = _f("group", SPEC.period_s, "round period of pairwise and push-sum, s")
    topology: str = _f("group", SPEC.topology, "dpsgd topology: " + ", ".join(TOPOLOGIES))
    topology_degree: int = _f("group", SPEC.topology_degree, "dpsgd neighbours per peer (regular)")
    # [network]
    latency_ms: float = _f("network", 50.0, "mean one-way latency per message, ms")
    latency_jitter_ms: float = _f("network", 10.0, "latency spread per message, ms")
    latency_dist: str = _f("network", "lognormal", "per-message latency distribution")
    link_spread: float = _f("network", 0.3, "per-peer access-latency spread (lognormal sigma)")
    bandwidth_mbps: float = _f("network", 100.0, "mean uplink bandwidth per peer, Mbit/s")
    bandwidth_spread: float = _f("network", 0.0, "per-peer bandwidth spread (lognormal sigma)")
    loss: float = _f("network", 0.0, "probability that a message is lost")
    retransmit_ms: float = _f(
        "network",
        0.0,
        "TCP-like recovery: a lost message is sent again this many ms later (each try lost "
        "with probability loss, at most 8 tries); 0 = a lost message stays lost",
    )
    partition_start_s: float = _f("network", 0.0, "start of a network partition, virtual s")
    partition_end_s: float = _f("network", 0.0, "end of the partition (<= start: none)")
    partition_fraction: float = _f("network", 0.5, "fraction of peers cut off by the partition")
    tick_ms: float = _f("network", 1.0, "delivery tick: arrivals are grouped per tick")
    # [population]
    churn: float = _f("population", 0.0, "probability that an online peer leaves in a round")
    rejoin: float = _f("population", 0.5, "probability that an offline peer rejoins a round")
    churn_window_s: float = _f("population", 1.0, "a leaving peer leaves within this window")
    compute_s: float = _f("population", 0.2, "local training time per round, virtual s")
    stragglers: float = _f("population", 0.0, "fraction of peers that compute slowly")
    straggler_slowdown: float = _f("population", 10.0, "compute-time factor of stragglers")

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "float" and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))
                value = float(value)
            _check_type(f.name, f.type, value)
            if f.name in _CHOICES and value not in _CHOICES[f.name]:
                raise ConfigError(
                    f"{f.name} must be one of {', '.join(_CHOICES[f.name])}; got {value!r}"
                )
        object.__setattr__(self, "algorithm", algorithm_name(self.algorithm))
        self._check_ranges()
        self.spec()  # the shared settings are checked where the daemon checks them

    def spec(self) -> RunSpec:
        """The run's shared settings (what every simulated peer is built from)."""
        return RunSpec(**{name: getattr(self, name) for name in SPEC_FIELDS})

    @property
    def grouped(self) -> bool:
        """Whether peers average in groups (secure or plain)."""
        return self.algorithm in ("secure", "plain")

    def _check_ranges(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ConfigError(f"{name} {what}; got {getattr(self, name)!r}")

        need(self.peers >= 2, "peers", "must be at least 2")
        need(self.rounds >= 1, "rounds", "must be at least 1")
        need(self.seed >= 0, "seed", "must be >= 0")
        need(self.eval_peers >= 0, "eval_peers", "must be >= 0")
        need(self.workers >= 0, "workers", "must be >= 0")
        need(
            self.workers <= 1
            or (self.engine == "direct" and self.grouped and self.matchmaking == "hash"),
            "workers",
            "above 1 needs engine = direct, algorithm secure or plain and matchmaking = hash",
        )
        need(self.alpha > 0, "alpha", "must be > 0")
        need(self.synthetic_alpha >= 0, "synthetic_alpha", "must be >= 0")
        need(self.synthetic_beta >= 0, "synthetic_beta", "must be >= 0")
        need(self.labels_per_peer >= 1, "labels_per_peer", "must be at least 1")
        need(self.local_steps >= 1, "local_steps", "must be at least 1")
        need(self.lr > 0, "lr", "must be > 0")
        need(0 < self.sample_rate <= 1, "sample_rate", "must be in (0, 1]")
        need(self.epsilon > 0, "epsilon", "must be > 0")
        need(0 < self.delta < 1, "delta", "must be in (0, 1)")
        need(self.clip > 0, "clip", "must be > 0")
        need(self.noise_multiplier >= 0, "noise_multiplier", "must be >= 0")
        need(self.threshold >= 0, "threshold", "must be >= 0")
        need(self.degree >= 0, "degree", "must be >= 0")
        need(self.stage_timeout_s > 0, "stage_timeout_s", "must be > 0")
        need(self.topology_degree >= 1, "topology_degree", "must be at least 1")
        need(self.latency_ms >= 0, "latency_ms", "must be >= 0")
        need(self.latency_jitter_ms >= 0, "latency_jitter_ms", "must be >= 0")
        need(self.link_spread >= 0, "link_spread", "must be >= 0")
        need(self.bandwidth_mbps > 0, "bandwidth_mbps", "must be > 0")
        need(self.bandwidth_spread >= 0, "bandwidth_spread", "must be >= 0")
        need(0 <= self.loss < 1, "loss", "must be in [0, 1)")
        need(self.retransmit_ms >= 0, "retransmit_ms", "must be >= 0")
        need(0 <= self.partition_fraction <= 1, "partition_fraction", "must be in [0, 1]")
        need(self.tick_ms > 0, "tick_ms", "must be > 0")
        need(0 <= self.churn < 1, "churn", "must be in [0, 1)")
        need(0 <= self.rejoin <= 1, "rejoin", "must be in [0, 1]")
        need(self.churn_window_s >= 0, "churn_window_s", "must be >= 0")
        need(self.compute_s >= 0, "compute_s", "must be >= 0")
        need(0 <= self.stragglers <= 1, "stragglers", "must be in [0, 1]")
        need(self.straggler_slowdown >= 1, "straggler_slowdown", "must be >= 1")

    def replace(self, **changes: Any) -> Scenario:
        """A copy with ``changes`` applied (checked like a new scenario)."""
        unknown = sorted(set(changes) - FIELD_NAMES)
        if unknown:
            raise ConfigError(f"unknown scenario field {unknown[0]!r}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Every field by name (JSON-friendly)."""
        return dataclasses.asdict(self)


FIELD_NAMES: frozenset[str] = frozenset(f.name for f in fields(Scenario))
SECTIONS: dict[str, tuple[str, ...]] = {}
"""Table name -> the fields it holds, in declaration order."""
for _f_ in fields(Scenario):
    SECTIONS.setdefault(_f_.metadata["section"], ())
    SECTIONS[_f_.metadata["section"]] += (_f_.name,)
_TYPES: dict[str, str] = {f.name: str(f.type) for f in fields(Scenario)}


def _check_type(name: str, type_name: object, value: object) -> None:
    kind = {"int": int, "float": float, "str": str, "bool": bool}[str(type_name)]
    ok = type(value) is kind
    if ok and kind is float and not math.isfinite(value):  # type: ignore[arg-type]
        ok = False
    if not ok:
        raise ConfigError(f"{name} must be a finite {kind.__name__}, got {value!r}")


def parse_value(name: str, text: str) -> Any:
    """Parse the flag text ``text`` for field ``name`` into the field's type."""
    if name not in FIELD_NAMES:
        raise ConfigError(f"unknown scenario field {name!r}")
    kind = _TYPES[name]
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
    except ValueError:
        raise ConfigError(
            f"{name} must be {'an integer' if kind == 'int' else 'a number'}, got {text!r}"
        ) from None
    return text


@dataclass(frozen=True)
class Sweep:
    """Several runs that differ in one field: ``field`` takes each of ``values`` in turn."""

    field: str
    values: tuple[Any, ...]

    def scenarios(self, base: Scenario) -> list[Scenario]:
        """The scenarios of the sweep, each named ``<field>=<value>``."""
        return [base.replace(**{self.field: v, "name": f"{self.field}={v}"}) for v in self.values]


def _read(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"scenario file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read scenario file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"scenario file {path} is not valid TOML: {exc}") from None


def _flatten(data: Mapping[str, Any], where: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key == "sweep":
            continue
        if isinstance(value, dict):
            if key not in SECTIONS:
                raise ConfigError(
                    f"{where}: unknown table [{key}]; tables: {', '.join(SECTIONS)}, sweep"
                )
            for sub, v in value.items():
                if sub not in SECTIONS[key]:
                    hint = next((s for s, names in SECTIONS.items() if sub in names), None)
                    extra = f" (it belongs in [{hint}])" if hint else ""
                    raise ConfigError(f"{where}: unknown field {key}.{sub}{extra}")
                flat[sub] = v
        elif key in FIELD_NAMES:
            flat[key] = value
        else:
            raise ConfigError(f"{where}: unknown field {key!r}")
    return flat


def load_scenario(
    path: str | Path | None = None, overrides: Mapping[str, Any] | None = None
) -> Scenario:
    """The scenario in the TOML file ``path`` (or the defaults), with ``overrides`` applied."""
    values: dict[str, Any] = {}
    if path is not None:
        values.update(_flatten(_read(Path(path)), str(path)))
    for key, value in (overrides or {}).items():
        if key not in FIELD_NAMES:
            raise ConfigError(f"unknown scenario field {key!r}")
        values[key] = value
    try:
        return Scenario(**values)
    except TypeError as exc:  # pragma: no cover - names are checked above
        raise ConfigError(str(exc)) from None


def load_sweep(path: str | Path | None, cli: str | None = None) -> Sweep | None:
    """The sweep asked for by ``--sweep FIELD=V1,V2`` or the file's ``[sweep]`` table, if any."""
    if cli is not None:
        name, sep, rest = cli.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not rest.strip():
            raise ConfigError(f"--sweep must look like FIELD=V1,V2,...; got {cli!r}")
        return _sweep(name, [parse_value(name, v.strip()) for v in rest.split(",")], "--sweep")
    if path is None:
        return None
    table = _read(Path(path)).get("sweep")
    if table is None:
        return None
    if not isinstance(table, dict) or set(table) != {"field", "values"}:
        raise ConfigError(f"{path}: [sweep] needs exactly 'field' and 'values'")
    values = table["values"]
    if not isinstance(values, list):
        raise ConfigError(f"{path}: sweep.values must be a list")
    return _sweep(str(table["field"]), values, f"{path}: sweep")


def _sweep(name: str, values: Sequence[Any], where: str) -> Sweep:
    if name not in FIELD_NAMES or name == "name":
        raise ConfigError(f"{where}: unknown scenario field {name!r}")
    if not 1 <= len(values) <= 32:
        raise ConfigError(f"{where}: give 1 to 32 values for {name}")
    checked = []
    for v in values:
        if _TYPES[name] == "float" and type(v) is int:
            v = float(v)
        _check_type(name, _TYPES[name], v)
        checked.append(v)
    return Sweep(name, tuple(checked))
