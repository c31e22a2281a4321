"""A per-peer privacy budget (eps_max, delta), enforced before each contribution and persisted.

The budget records the privacy events spent so far (grouped by kind, with counts) and
recomputes epsilon with the accountant, so the spent epsilon is always the tight composition,
not a sum of per-round epsilons. A budget holds Gaussian events (``dp.PrivacyEvent``, composed
by privacy loss distributions) or distributed discrete Gaussian events
(``dp.DistributedEvent``, composed by their Renyi bound), not a mix of the two. With a
``state_path``, every spend is written to disk atomically (temporary file, fsync, rename, fsync
of the directory) *before* ``spend`` returns: a peer that restarts cannot get its budget back.
Spend first, then send.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dp._checks import check_delta, check_positive
from dp.accounting import EventLike, PrivacyEvent, compose_epsilon, group_events
from dp.distributed import DistributedEvent, distributed_epsilon
from floor.errors import AccountingError, BudgetExhausted, BudgetStateError
from floor.files import replace_atomically

__all__ = ["Budget"]

_FORMAT = "murmur-dp-budget"
_VERSION = 3
_READABLE = (1, 2, 3)  # 1: Gaussian events only, as [z, q, n]; 3 adds "spends"

AnyEvent = EventLike | DistributedEvent
Events = PrivacyEvent | DistributedEvent | Iterable[AnyEvent]
GaussianKey = tuple[float, float]
DistributedKey = tuple[float, int, float, int]
Key = GaussianKey | DistributedKey


def _events_of(
    events: Events | None, noise_multiplier: float | None, sample_rate: float, count: int
) -> list[AnyEvent]:
    """The events given either positionally or as one event's keywords (not both)."""
    if events is None and noise_multiplier is not None:
        return [PrivacyEvent(noise_multiplier, sample_rate, count)]
    if events is not None and noise_multiplier is None:
        if isinstance(events, PrivacyEvent | DistributedEvent):
            return [events]
        return list(events)
    raise AccountingError(
        "give either events or noise_multiplier= (with sample_rate= and count=), not both"
    )


class Budget:
    """Privacy budget of one peer: refuses any contribution that would push epsilon past
    ``eps_max`` at ``delta``.

    ``state_path`` (optional) persists the spent events. If the file exists it is loaded and
    must match ``eps_max`` and ``delta``; if it does not exist it is created, unless
    ``must_exist`` is true (a restarted peer whose state vanished), which raises
    ``BudgetStateError``. A corrupt file always raises ``BudgetStateError``; there is no
    silent reset. One process should own a state file at a time.
    """

    def __init__(
        self,
        eps_max: float,
        delta: float,
        state_path: str | os.PathLike[str] | None = None,
        *,
        must_exist: bool = False,
    ) -> None:
        self._eps_max = check_positive("eps_max", eps_max)
        self._delta = check_delta(delta)
        self._path = Path(state_path) if state_path is not None else None
        self._lock = threading.Lock()
        self._counts: dict[Key, int] = {}
        self._spent = 0.0
        self._spends = 0
        if self._path is not None:
            if self._path.exists():
                self._counts, self._spends = self._load(self._path)
                self._spent = self._compose(self._counts, [])
            elif must_exist:
                raise BudgetStateError(
                    f"privacy budget state {self._path} is missing but was expected to exist; "
                    "refusing to start from a fresh budget"
                )
            else:
                self._save(self._counts, 0)

    @classmethod
    def persistent(cls, eps_max: float, delta: float, state_path: str | os.PathLike[str]) -> Budget:
        """A budget kept in ``state_path`` that deleting that file cannot reset.

        The first call writes a marker beside the state (``<state_path>.expected``). While the
        marker exists, a missing state file raises ``BudgetStateError`` instead of starting a
        fresh budget; a peer that really wants a new budget must remove both (and should take
        a new identity).
        """
        path = Path(state_path)
        marker = path.with_name(path.name + ".expected")
        budget = cls(eps_max, delta, path, must_exist=marker.exists())
        try:
            marker.touch(mode=0o600, exist_ok=True)
        except OSError as exc:
            raise BudgetStateError(f"cannot write budget marker {marker}: {exc}") from exc
        return budget

    @property
    def eps_max(self) -> float:
        """The largest epsilon this peer may reach."""
        return self._eps_max

    @property
    def delta(self) -> float:
        """The delta at which epsilon is computed."""
        return self._delta

    @property
    def state_path(self) -> Path | None:
        """Where the spent events are persisted (None: in memory only)."""
        return self._path

    @property
    def spent_epsilon(self) -> float:
        """Epsilon of everything spent so far (0.0 before the first contribution)."""
        return self._spent

    @property
    def epsilon_spent(self) -> float:
        """Alias of ``spent_epsilon``."""
        return self._spent

    @property
    def remaining_epsilon(self) -> float:
        """``eps_max - spent_epsilon`` (not additive: use ``check`` to test a contribution)."""
        return max(0.0, self._eps_max - self._spent)

    @property
    def events(self) -> tuple[PrivacyEvent | DistributedEvent, ...]:
        """The spent events, grouped: one event per kind (a ``PrivacyEvent`` per (noise,
        rate), a ``DistributedEvent`` per mechanism) with its count."""
        return tuple(_event(key, n) for key, n in sorted(self._counts.items(), key=_order))

    @property
    def spends(self) -> int:
        """How many times ``spend`` recorded events (persisted with them): a peer spends once
        per contribution, so after a restart this counts the contributions it paid for,
        whatever its other files say. State files of version 1 or 2 start it at 0."""
        return self._spends

    def epsilon_after(
        self,
        next_events: Events | None = None,
        *,
        noise_multiplier: float | None = None,
        sample_rate: float = 1.0,
        count: int = 1,
    ) -> float:
        """Epsilon if the given events were spent now (nothing is spent).

        Events are given positionally (a ``PrivacyEvent`` or an iterable of events) or as the
        keywords of one event: ``noise_multiplier=``, ``sample_rate=``, ``count=``.
        """
        extra = _events_of(next_events, noise_multiplier, sample_rate, count)
        return self._after(extra)

    def can_spend(
        self,
        next_events: Events | None = None,
        *,
        noise_multiplier: float | None = None,
        sample_rate: float = 1.0,
        count: int = 1,
    ) -> bool:
        """Whether spending the given events keeps epsilon <= eps_max."""
        extra = _events_of(next_events, noise_multiplier, sample_rate, count)
        return self._after(extra) <= self._eps_max

    def check(
        self,
        next_events: Events | None = None,
        *,
        noise_multiplier: float | None = None,
        sample_rate: float = 1.0,
        count: int = 1,
    ) -> float:
        """Return the epsilon after the given events; raise ``BudgetExhausted`` if > eps_max."""
        extra = _events_of(next_events, noise_multiplier, sample_rate, count)
        return self._checked(extra)

    def spend(
        self,
        events: Events | None = None,
        *,
        noise_multiplier: float | None = None,
        sample_rate: float = 1.0,
        count: int = 1,
    ) -> float:
        """Check, record and persist the given events; return the new spent epsilon.

        Raises ``BudgetExhausted`` (nothing recorded) if the budget would be exceeded, and
        ``BudgetStateError`` (nothing recorded) if the state cannot be written.
        """
        extra = _events_of(events, noise_multiplier, sample_rate, count)
        with self._lock:
            after = self._checked(extra)
            counts = _added(self._counts, extra)
            if self._path is not None:
                self._save(counts, self._spends + 1)
            self._counts = counts
            self._spent = after
            self._spends += 1
            return after

    def _after(self, extra: list[AnyEvent]) -> float:
        return self._compose(self._counts, extra)

    def _compose(self, counts: dict[Key, int], extra: list[AnyEvent]) -> float:
        merged = _added(counts, extra)
        if not merged:
            return 0.0
        kinds = {len(key) for key in merged}
        if kinds == {2}:
            grouped = tuple(sorted((k[0], k[1], n) for k, n in merged.items() if len(k) == 2))
            return compose_epsilon(grouped, delta=self._delta)
        if kinds == {4}:
            return distributed_epsilon(
                [_event(k, n) for k, n in merged.items()],  # type: ignore[misc]
                delta=self._delta,
            )
        raise AccountingError(
            "a budget holds either Gaussian events or distributed discrete Gaussian events; "
            "this peer's privacy mode changed: keep one mode per budget state"
        )

    def _checked(self, extra: list[AnyEvent]) -> float:
        after = self._after(extra)
        if after > self._eps_max:
            raise BudgetExhausted(
                f"contributing would raise epsilon from {self._spent:.6g} to {after:.6g}, "
                f"above eps_max={self._eps_max:g} at delta={self._delta:g}; not contributing"
            )
        return after

    # -- persistence ---------------------------------------------------------------------

    def _payload(self, counts: dict[Key, int], spends: int) -> dict[str, Any]:
        events: list[list[Any]] = []
        for key, n in sorted(counts.items(), key=_order):
            if len(key) == 2:
                events.append([key[0], key[1], n])
            else:
                events.append(["ddg", *key, n])
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "eps_max": self._eps_max,
            "delta": self._delta,
            "events": events,
            "spends": spends,
        }

    @staticmethod
    def _checksum(payload: dict[str, Any]) -> str:
        canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def _save(self, counts: dict[Key, int], spends: int) -> None:
        if self._path is None:
            return
        payload = self._payload(counts, spends)
        document = {**payload, "sha256": self._checksum(payload)}
        data = json.dumps(document, sort_keys=True, indent=1).encode()
        try:
            replace_atomically(self._path, data)
        except OSError as exc:
            raise BudgetStateError(
                f"cannot write privacy budget state {self._path}: {exc}"
            ) from exc

    def _load(self, path: Path) -> tuple[dict[Key, int], int]:
        def corrupt(why: str) -> BudgetStateError:
            return BudgetStateError(
                f"privacy budget state {path} is corrupt ({why}); refusing to reset it. "
                "Restore it from a backup, or delete it only if this peer never contributed."
            )

        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise BudgetStateError(f"cannot read privacy budget state {path}: {exc}") from exc
        try:
            document = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise corrupt("not valid JSON") from exc
        if not isinstance(document, dict):
            raise corrupt("not a JSON object")
        checksum = document.pop("sha256", None)
        if document.get("format") != _FORMAT or document.get("version") not in _READABLE:
            raise corrupt("unknown format or version")
        if not isinstance(checksum, str) or checksum != self._checksum(document):
            raise corrupt("checksum mismatch")
        if document.get("eps_max") != self._eps_max or document.get("delta") != self._delta:
            raise BudgetStateError(
                f"privacy budget state {path} was written for eps_max={document.get('eps_max')},"
                f" delta={document.get('delta')}, not eps_max={self._eps_max}, "
                f"delta={self._delta}; refusing to mix them"
            )
        events = document.get("events")
        if not isinstance(events, list):
            raise corrupt("events is not a list")
        parsed: list[AnyEvent] = []
        for item in events:
            try:
                if isinstance(item, list) and item and item[0] == "ddg":
                    _, s2, members, sensitivity, dimension, n = item
                    parsed.append(DistributedEvent(s2, members, sensitivity, dimension, n))
                else:
                    z, q, n = item
                    parsed.append(PrivacyEvent(z, q, n))
            except (TypeError, ValueError, AccountingError) as exc:
                raise corrupt(f"bad event {item!r}") from exc
        spends = document.get("spends", 0)
        if spends.__class__ is not int or spends < 0:
            raise corrupt("spends is not a count")
        return _added({}, parsed), spends


def _added(counts: dict[Key, int], extra: list[AnyEvent]) -> dict[Key, int]:
    """``counts`` with ``extra`` added (a new dict)."""
    out = dict(counts)
    gaussian: list[EventLike] = []
    for event in extra:
        if isinstance(event, DistributedEvent):
            key: Key = event.key()
            out[key] = out.get(key, 0) + event.count
        else:
            gaussian.append(event)
    for z, q, n in group_events(gaussian):
        out[(z, q)] = out.get((z, q), 0) + n
    return out


def _event(key: Key, count: int) -> PrivacyEvent | DistributedEvent:
    if len(key) == 2:
        return PrivacyEvent(key[0], key[1], count)
    s2, members, sensitivity, dimension = key
    return DistributedEvent(s2, members, sensitivity, dimension, count)


def _order(item: tuple[Key, int]) -> tuple[int, Key]:
    return (len(item[0]), item[0])
