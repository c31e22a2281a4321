"""Daemon configuration: frozen dataclasses filled from a TOML file, the environment, then flags.

Later sources win: file < environment (``MURMUR_*``) < flags. Top-level fields are set as
``listen = "..."`` in the file and ``MURMUR_LISTEN`` in the environment; section fields as
``[membership] ping_interval_s = 1.0`` and ``MURMUR_MEMBERSHIP_PING_INTERVAL_S``. List values in
the environment are comma-separated. Unknown keys and bad values raise ``ConfigError``. What the
daemon trains is the ``[training]`` section (``MURMUR_TRAINING_ROUNDS``, ``--rounds``, ...).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from floor.errors import ConfigError
from floor.identity import PeerId
from gossip.spec import ALGORITHMS, PRIVACY_UNITS, RINGS, SPEC, SPEC_FIELDS, RunSpec

__all__ = [
    "DAEMON_ALGORITHMS",
    "PARTITIONS",
    "PRIVACY_UNITS",
    "RINGS",
    "TASKS",
    "DaemonConfig",
    "HttpTransportConfig",
    "MembershipConfig",
    "TrainingConfig",
    "format_address",
    "load_config",
    "parse_address",
]


def parse_address(text: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` for IPv6) into host and port; ConfigError if bad."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit() or len(text) > 262:
        raise ConfigError(f"not a HOST:PORT address: {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"not a HOST:PORT address: {text!r}") from None
    elif not all(c.isalnum() or c in "-." for c in host):
        raise ConfigError(f"not a HOST:PORT address: {text!r}")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ConfigError(f"port out of range in {text!r}")
    return host, port


def format_address(host: str, port: int) -> str:
    """The ``HOST:PORT`` text for a host and port (brackets around IPv6 hosts)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class HttpTransportConfig:
    """Sizes and timeouts of the aiohttp transport. Every wait is bounded by one of these."""

    request_timeout_s: float = 10.0
    """Default deadline for a whole send or request (connect, upload, handler, reply)."""
    connect_timeout_s: float = 3.0
    """Deadline for opening a TCP connection."""
    shutdown_timeout_s: float = 2.0
    """How long ``aclose()`` lets in-flight inbound requests finish."""
    max_message_size: int = 64 * 2**20
    """Largest envelope accepted (bytes), inbound and as a reply."""
    max_connections: int = 100
    """Client connection pool size (all peers)."""
    max_connections_per_peer: int = 4
    """Client connections kept per peer address."""
    stream: bool = True
    """Send envelopes up to ``stream_max_body`` bytes over one persistent WebSocket per peer
    address (``GET /v1/stream``) instead of one POST each; POST stays the fallback."""
    stream_max_body: int = 256 * 2**10
    """Largest envelope sent over the stream; larger ones go by POST (no masking cost)."""
    stream_max_inflight: int = 256
    """Inbound requests handled concurrently per stream; reading pauses above this."""
    stream_heartbeat_s: float = 15.0
    """Ping interval on an idle stream (the server side allows twice this before closing)."""
    stream_retry_s: float = 60.0
    """After a peer refused a stream (no endpoint, 429: it holds all the streams it takes),
    its envelopes go by POST for this long, then the next one tries a stream again."""
    max_inflight_bytes: int = 256 * 2**20
    """Bytes of inbound envelopes received but not yet handled, over all connections (never
    less than one ``max_message_size``); a body or stream frame that would go above it is
    refused BUSY (HTTP 503). Buffers grow only as bytes arrive: a Content-Length is never
    allocated ahead."""
    max_connection_inflight: int = 16 * 2**20
    """The same budget for one stream's unanswered frames (a POST body is one envelope, held
    to ``max_message_size``)."""
    body_timeout_s: float = 30.0
    """Deadline to receive a whole POST body once its headers arrived; then the connection is
    closed (a trickling sender holds nothing for longer)."""
    idle_timeout_s: float = 30.0
    """An inbound connection that sends no request (or nothing more) for this long is closed."""
    verify_addresses: bool = True
    """Send to an address learnt from a record only after a SIGNED Probe there was answered
    by that record's peer (one POST; refused addresses back off from 2 s to 300 s)."""
    allow_loopback_peers: bool | None = None
    """Whether records may name loopback addresses; None: when this peer listens on one (a
    local test network). Unspecified, link-local and multicast addresses are always refused."""
    dial_back: bool = True
    """After joining, ask the peers joined through to dial this peer back on a new connection
    (``p2p.reach``); one that is not reached says so by naming relays instead of its address."""
    reachability_recheck_s: float = 600.0
    """How often a peer asks again to be dialled back (a NAT, port forward or firewall that
    changed): reached now, it drops its relays and names its own address; no longer reached,
    it takes relays (0: check once, at start). A peer dials the same asker back at most every
    10 s, so shorter intervals only get BUSY answers in between."""
    relays: int = 2
    """Relays an unreachable peer keeps (streams to reachable peers that forward to it)."""
    relay_for: int = 16
    """Unreachable peers this peer relays for at most, once it knows it is reachable itself
    (0: relay for nobody)."""
    relay_bytes_per_s: int = 32 * 2**20
    """Bytes per second a relay forwards to one relayed peer (burst: 4 s of it); beyond it,
    envelopes are refused BUSY."""
    relay_messages_per_s: int = 2000
    """Envelopes per second a relay forwards to one relayed peer (burst: 4 s of it)."""
    relay_max_pending: int = 256
    """Forwarded requests awaiting one relayed peer's answer at most; more are refused BUSY."""

    def __post_init__(self) -> None:
        for name in (
            "request_timeout_s",
            "connect_timeout_s",
            "shutdown_timeout_s",
            "stream_heartbeat_s",
            "stream_retry_s",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"transport.{name} must be > 0")
        if not 256 <= self.max_message_size < 2**32:
            raise ConfigError("transport.max_message_size must be in [256, 2**32)")
        if self.max_connections < 1 or self.max_connections_per_peer < 1:
            raise ConfigError("transport connection limits must be >= 1")
        if self.stream_max_body < 0 or self.stream_max_inflight < 1:
            raise ConfigError("transport.stream_max_body must be >= 0, stream_max_inflight >= 1")
        for name in ("body_timeout_s", "idle_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"transport.{name} must be > 0")
        if self.max_connection_inflight < 1 or self.max_inflight_bytes < 1:
            raise ConfigError("transport in-flight byte budgets must be >= 1")
        if not 0 <= self.reachability_recheck_s < float("inf"):
            raise ConfigError("transport.reachability_recheck_s must be >= 0 (0: never)")
        for name in ("relays", "relay_for"):
            if not 0 <= getattr(self, name) <= 64:
                raise ConfigError(f"transport.{name} must be in [0, 64]")
        for name in ("relay_bytes_per_s", "relay_messages_per_s", "relay_max_pending"):
            if getattr(self, name) < 1:
                raise ConfigError(f"transport.{name} must be >= 1")


@dataclass(frozen=True, slots=True)
class MembershipConfig:
    """Sizes, intervals and timeouts of membership. Every wait is named here."""

    max_view: int = 64
    """Active view cap: peers pinged and offered to protocols."""
    max_passive: int = 256
    """Reserve of known records used to refill the active view."""
    exchange_interval_s: float = 5.0
    """Time between peer exchanges."""
    exchange_fanout: int = 2
    """Peers contacted per exchange round."""
    exchange_size: int = 8
    """Records sent per exchange (plus our own)."""
    ping_interval_s: float = 2.0
    """A peer not heard from for this long is pinged."""
    ping_timeout_s: float = 2.0
    """Deadline for one ping."""
    suspect_after_s: float = 6.0
    """Silence after which a peer is suspected (not listed as live)."""
    dead_after_s: float = 15.0
    """Silence after which a peer is removed from the view."""
    join_timeout_s: float = 5.0
    """Deadline for one join request to a bootstrap address."""
    join_attempts: int = 3
    """Rounds over the bootstrap addresses before giving up."""
    join_retry_delay_s: float = 1.0
    """Pause between join rounds."""
    max_clock_skew_s: float = 300.0
    """Records stamped further in the future than this are dropped."""
    tombstone_s: float = 120.0
    """How long a removed peer's last record stays refused (stops zombie records)."""

    def __post_init__(self) -> None:
        for name in (
            "max_view",
            "max_passive",
            "exchange_fanout",
            "exchange_size",
            "join_attempts",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"membership.{name} must be >= 1")
        if not 0 < self.suspect_after_s <= self.dead_after_s:
            raise ConfigError("membership: need 0 < suspect_after_s <= dead_after_s")
        for name in ("exchange_interval_s", "ping_interval_s", "ping_timeout_s", "join_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"membership.{name} must be > 0")


TASKS = ("breast_cancer", "credit", "digits", "mnist", "synthetic")
"""Built-in tasks (``gossip.tasks.TASK_NAMES``; named here so that config errors answer
without importing torch)."""
DAEMON_ALGORITHMS = tuple(a for a in ALGORITHMS if a != "dpsgd")
"""What a daemon averages with (D-PSGD needs a fixed topology: simulator only)."""
PARTITIONS = ("iid", "dirichlet", "label")


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N): this peer holds part I (from 0) of the task's data cut in N."""
    index, sep, count = text.partition("/")
    if not sep or not index.strip().isdigit() or not count.strip().isdigit():
        raise ConfigError(f"training.shard must look like I/N (e.g. 0/5), got {text!r}")
    i, n = int(index), int(count)
    if not 0 <= i < n:
        raise ConfigError(f"training.shard {text!r}: need 0 <= I < N")
    return i, n


@dataclass(frozen=True, slots=True)
class TrainingConfig:
    """What the daemon trains (``[training]`` in the file, ``MURMUR_TRAINING_*``, flags).

    With ``task`` empty the daemon only serves. The shared settings of the run (rounds, privacy,
    averaging...) are ``gossip.spec.RunSpec``'s, with its names and defaults (:meth:`spec`);
    every peer of one run must use the same. ``seed`` fixes the data split and the initial
    model (never the DP noise, always drawn from the OS). ``shard`` ``I/N`` gives this peer part
    I of the task's training rows cut in N by ``partition`` (the built-in tasks ship the same
    data to every peer; a local demo gives each daemon its own part). The privacy budget
    (``epsilon``, ``delta``) is enforced and persisted in the data dir.
    """

    # -- this daemon
    task: str = ""
    """Built-in task to train: digits, breast_cancer or credit ("" = do not train)."""
    model: str = ""
    """Task model option (digits: mlp or logreg; "" = the task's default)."""
    shard: str = "0/1"
    """I/N: this peer's part of the training rows."""
    partition: str = "iid"
    """How the rows are cut: iid, dirichlet or label."""
    alpha: float = 0.5
    """Dirichlet concentration (partition = dirichlet)."""
    wait_peers: int | None = None
    """Live peers to wait for before round 1 (default: group_size - 1)."""
    start_timeout_s: float = 60.0
    """Longest wait for ``wait_peers``; then training starts with whoever is there."""
    round_timeout_s: float = 60.0
    """Backstop deadline of a whole averaging step."""
    # -- the run (gossip.spec.RunSpec: same names, same defaults)
    rounds: int = SPEC.rounds
    local_steps: int = SPEC.local_steps
    lr: float = SPEC.lr
    sample_rate: float = SPEC.sample_rate
    seed: int = SPEC.seed
    privacy: str = SPEC.privacy
    epsilon: float = SPEC.epsilon
    delta: float = SPEC.delta
    clip: float = SPEC.clip
    noise_multiplier: float = SPEC.noise_multiplier
    dp_noise: str = SPEC.dp_noise
    colluders: int = SPEC.colluders
    algorithm: str = SPEC.algorithm
    group_size: int = SPEC.group_size
    min_group_size: int = SPEC.min_group_size
    threshold: int = SPEC.threshold
    degree: int = SPEC.degree
    ring: str = SPEC.ring
    value_bound: float = SPEC.value_bound
    stage_timeout_s: float = SPEC.stage_timeout_s
    min_stage_timeout_s: float = SPEC.min_stage_timeout_s
    adaptive_deadlines: bool = SPEC.adaptive_deadlines
    match_timeout_s: float = SPEC.match_timeout_s
    form_timeout_s: float = SPEC.form_timeout_s
    period_s: float = SPEC.period_s
    topology: str = SPEC.topology
    topology_degree: int = SPEC.topology_degree

    def __post_init__(self) -> None:
        if self.task and self.task not in TASKS:
            raise ConfigError(f"training.task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.partition not in PARTITIONS:
            raise ConfigError(
                f"training.partition must be one of {', '.join(PARTITIONS)}, got {self.partition!r}"
            )
        parse_shard(self.shard)
        if not self.alpha > 0:
            raise ConfigError(f"training.alpha must be > 0, got {self.alpha!r}")
        if self.wait_peers is not None and self.wait_peers < 0:
            raise ConfigError("training.wait_peers must be >= 0")
        for name in ("start_timeout_s", "round_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"training.{name} must be > 0")
        spec = self.spec()  # checks every shared setting, naming it
        if spec.algorithm not in DAEMON_ALGORITHMS:
            raise ConfigError(
                f"training.algorithm must be one of {', '.join(DAEMON_ALGORITHMS)} on a daemon "
                f"(dpsgd needs a fixed topology: use the simulator), got {self.algorithm!r}"
            )
        object.__setattr__(self, "algorithm", spec.algorithm)

    def spec(self) -> RunSpec:
        """The run description (``ConfigError`` naming the ``training.`` field if it is bad)."""
        try:
            return RunSpec(**{name: getattr(self, name) for name in SPEC_FIELDS})
        except ConfigError as exc:
            raise ConfigError(f"training.{exc}") from None

    @property
    def peers_to_wait_for(self) -> int:
        """``wait_peers``, or ``group_size - 1`` when unset."""
        return self.group_size - 1 if self.wait_peers is None else self.wait_peers


ENV_PREFIX = "MURMUR_"
_SECTIONS = {
    "transport": HttpTransportConfig,
    "membership": MembershipConfig,
    "training": TrainingConfig,
}


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """Everything ``murmur start`` needs. Timeouts live in ``transport`` and ``membership``."""

    listen: str = "127.0.0.1:7070"
    """HOST:PORT to listen on (port 0 picks a free port)."""
    no_listen: bool = False
    """Outbound only: accept no connection from peers (``listen`` then serves only the admin
    endpoints, to loopback clients); others reach this peer through the relays it keeps."""
    data_dir: Path = Path("murmur-data")
    """Holds identity.key (mode 0600), peers.json and, when training, privacy_budget.json
    (the spent privacy budget, kept across restarts) and model.pt/model.json (the final model)."""
    bootstrap: tuple[str, ...] = ()
    """HOST:PORT addresses to join through."""
    advertise: tuple[str, ...] = ()
    """Addresses put in our peer record. Default: the bound address; when listening on all
    interfaces (0.0.0.0), the local address that routes to the first bootstrap peer."""
    network_key_file: Path | None = None
    """Pre-shared network key (64 hex characters, or 32 raw bytes); strangers are refused."""
    allow: tuple[str, ...] = ()
    """If non-empty, only these peer ids may talk to us or enter our view."""
    replay_window_s: float = 120.0
    """How old an envelope's timestamp may be; nonces are remembered this long."""
    replay_max_future_s: float = 10.0
    """How far ahead of this peer's clock an envelope's timestamp may be (clock skew)."""
    replay_capacity: int = 1_000_000
    """Nonces remembered at most (all senders); one sender holds at most 1/16 of them."""
    log_format: str = "kv"
    """``kv`` (key=value lines) or ``json``."""
    log_level: str = "info"
    """``debug``, ``info``, ``warning`` or ``error``."""
    tune_malloc: bool = True
    """Raise glibc's mmap/trim thresholds to 1 GiB so large bodies reuse heap pages (~3x faster
    for 40 MB). Cost: freed memory stays in the process (up to ~1 GiB) instead of going back."""
    transport: HttpTransportConfig = field(default_factory=HttpTransportConfig)
    membership: MembershipConfig = field(default_factory=MembershipConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def __post_init__(self) -> None:
        parse_address(self.listen)
        for address in (*self.bootstrap, *self.advertise):
            parse_address(address)
        for text in self.allow:
            PeerId.parse(text)  # ConfigError on a bad id
        if self.log_format not in ("kv", "json"):
            raise ConfigError(f"log_format must be 'kv' or 'json', got {self.log_format!r}")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ConfigError(f"log_level must be debug/info/warning/error, got {self.log_level!r}")
        if self.replay_window_s <= 0:
            raise ConfigError("replay_window_s must be > 0")
        if not 0 <= self.replay_max_future_s <= self.replay_window_s:
            raise ConfigError("replay_max_future_s must be between 0 and replay_window_s")
        if self.replay_capacity < 16:
            raise ConfigError("replay_capacity must be >= 16")


def _convert(value: object, type_text: str, name: str) -> object:
    """Turn a TOML/env/flag value into the field's type (types are annotation strings)."""
    try:
        if type_text == "Path | None":
            return None if value in (None, "") else Path(str(value))
        if type_text == "Path":
            return Path(str(value))
        if type_text == "tuple[str, ...]":
            if isinstance(value, str):
                return tuple(v.strip() for v in value.split(",") if v.strip())
            if isinstance(value, (list, tuple)):
                return tuple(str(v) for v in value)
            raise TypeError("expected a list")
        if type_text == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"not a boolean: {value!r}")
        if type_text.endswith(" | None"):
            if value is None or (isinstance(value, str) and not value.strip()):
                return None
            type_text = type_text.removesuffix(" | None")
        if type_text == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(f"not an integer: {value!r}")
            return int(str(value)) if isinstance(value, str) else int(value)  # type: ignore[call-overload]
        if type_text == "float":
            if isinstance(value, bool):
                raise ValueError(f"not a number: {value!r}")
            return float(value)  # type: ignore[arg-type]
        if type_text == "str":
            if not isinstance(value, str):
                raise TypeError("expected a string")
            return value
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: {exc}") from None
    raise ConfigError(f"{name}: unsupported field type {type_text}")  # pragma: no cover


def _build(cls: type[Any], values: Mapping[str, object], prefix: str) -> Any:
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, object] = {}
    for key, value in values.items():
        f = known.get(key)
        if f is None:
            raise ConfigError(f"unknown configuration key: {prefix}{key}")
        section = _SECTIONS.get(key) if not prefix else None
        if section is not None:
            if not isinstance(value, Mapping):
                raise ConfigError(f"[{key}] must be a table")
            kwargs[key] = _build(section, value, f"{key}.")
        else:
            kwargs[key] = _convert(value, str(f.type), prefix + key)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - keys are checked above
        raise ConfigError(str(exc)) from None


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = dict(value) if isinstance(value, Mapping) else value


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    top = {f.name for f in dataclasses.fields(DaemonConfig)} - set(_SECTIONS)
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key in top:
            out[key] = value
            continue
        for section, cls in _SECTIONS.items():
            if key.startswith(section + "_"):
                sub = key[len(section) + 1 :]
                if sub in {f.name for f in dataclasses.fields(cls)}:
                    out.setdefault(section, {})[sub] = value
                    break
        # Other MURMUR_* variables (e.g. for other tools) are not ours: ignore them.
    return out


def load_config(
    file: Path | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> DaemonConfig:
    """Build the config from ``file`` (TOML), then ``env``, then ``flags`` (None values skipped).

    ``flags`` may hold top-level keys and section tables (``{"membership": {...}}``).
    """
    values: dict[str, Any] = {}
    if file is not None:
        try:
            with open(file, "rb") as fh:
                _merge(values, tomllib.load(fh))
        except OSError as exc:
            raise ConfigError(f"cannot read config file {file}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {file} is not valid TOML: {exc}") from None
    if env is not None:
        _merge(values, _from_env(env))
    if flags:
        _merge(values, {k: v for k, v in flags.items() if v is not None})
    config: DaemonConfig = _build(DaemonConfig, values, "")
    return config
