"""A per-peer privacy budget (eps_max, delta), enforced before each contribution and persisted.

The budget records the privacy events spent so far (grouped by kind, with counts) and
recomputes epsilon with the accountant, so the spent epsilon is always the tight composition,
not a sum of per-round epsilons. With a ``state_path``, every spend is written to disk
atomically (temporary file, fsync, rename, fsync of the directory) *before* ``spend``
returns: a peer that restarts cannot get its budget back. Spend first, then send.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dp._checks import check_delta, check_positive
from dp.accounting import EventLike, PrivacyEvent, compose_epsilon, group_events
from floor.errors import AccountingError, BudgetExhausted, BudgetStateError

__all__ = ["Budget"]

_FORMAT = "murmur-dp-budget"
_VERSION = 1


Events = PrivacyEvent | Iterable[EventLike]


def _events_of(
    events: Events | None, noise_multiplier: float | None, sample_rate: float, count: int
) -> list[EventLike]:
    """The events given either positionally or as one event's keywords (not both)."""
    if events is None and noise_multiplier is not None:
        return [PrivacyEvent(noise_multiplier, sample_rate, count)]
    if events is not None and noise_multiplier is None:
        return [events] if isinstance(events, PrivacyEvent) else list(events)
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
        self._counts: dict[tuple[float, float], int] = {}
        self._spent = 0.0
        if self._path is not None:
            if self._path.exists():
                self._counts = self._load(self._path)
                self._spent = compose_epsilon(self._grouped(), delta=self._delta)
            elif must_exist:
                raise BudgetStateError(
                    f"privacy budget state {self._path} is missing but was expected to exist; "
                    "refusing to start from a fresh budget"
                )
            else:
                self._save(self._counts)

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
    def events(self) -> tuple[PrivacyEvent, ...]:
        """The spent events, grouped: one ``PrivacyEvent`` per (noise, rate) with its count."""
        return tuple(PrivacyEvent(z, q, n) for z, q, n in self._grouped())

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
            counts = dict(self._counts)
            for z, q, n in group_events(extra):
                counts[(z, q)] = counts.get((z, q), 0) + n
            if self._path is not None:
                self._save(counts)
            self._counts = counts
            self._spent = after
            return after

    def _after(self, extra: list[EventLike]) -> float:
        return compose_epsilon([*self.events, *extra], delta=self._delta)

    def _checked(self, extra: list[EventLike]) -> float:
        after = self._after(extra)
        if after > self._eps_max:
            raise BudgetExhausted(
                f"contributing would raise epsilon from {self._spent:.6g} to {after:.6g}, "
                f"above eps_max={self._eps_max:g} at delta={self._delta:g}; not contributing"
            )
        return after

    def _grouped(self) -> tuple[tuple[float, float, int], ...]:
        return tuple(sorted((z, q, n) for (z, q), n in self._counts.items()))

    # -- persistence ---------------------------------------------------------------------

    def _payload(self, counts: dict[tuple[float, float], int]) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "eps_max": self._eps_max,
            "delta": self._delta,
            "events": [[z, q, n] for (z, q), n in sorted(counts.items())],
        }

    @staticmethod
    def _checksum(payload: dict[str, Any]) -> str:
        canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def _save(self, counts: dict[tuple[float, float], int]) -> None:
        if self._path is None:
            return
        payload = self._payload(counts)
        document = {**payload, "sha256": self._checksum(payload)}
        data = json.dumps(document, sort_keys=True, indent=1).encode()
        directory = self._path.parent
        try:
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{self._path.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, self._path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise BudgetStateError(
                f"cannot write privacy budget state {self._path}: {exc}"
            ) from exc

    def _load(self, path: Path) -> dict[tuple[float, float], int]:
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
        if document.get("format") != _FORMAT or document.get("version") != _VERSION:
            raise corrupt("unknown format or version")
        if not isinstance(checksum, str) or checksum != self._checksum(document):
            raise corrupt("checksum mismatch")
        if document.get("eps_max") != self._eps_max or document.get("delta") != self._delta:
            raise BudgetStateError(
                f"privacy budget state {path} was written for eps_max={document.get('eps_max')},"
                f" delta={document.get('delta')}, not eps_max={self._eps_max}, "
                f"delta={self._delta}; refusing to mix them"
            )
        counts: dict[tuple[float, float], int] = {}
        events = document.get("events")
        if not isinstance(events, list):
            raise corrupt("events is not a list")
        for item in events:
            try:
                z, q, n = item
                event = PrivacyEvent(z, q, n)
            except (TypeError, ValueError) as exc:
                raise corrupt(f"bad event {item!r}") from exc
            key = (event.noise_multiplier, event.sample_rate)
            counts[key] = counts.get(key, 0) + event.count
        return counts
