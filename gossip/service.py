"""The round loop that glues a ``Learner``, an ``Averager`` and a ``Network``: one peer training.

Used by the daemon (``p2p.daemon``) and by the Python API. Each round of
:class:`TrainingSession`:

1. local update in an executor (:meth:`Learner.local_update_async`): the budget is checked
   first, then E local steps, privatization and the round's privacy spend. The daemon's event
   loop keeps answering the network meanwhile;
2. averaging with the peer's ``Averager`` (secure group all-reduce by default), bounded by
   ``round_timeout_s`` on the loop's clock;
3. the group result becomes the learner's ``theta`` **only if the round succeeded**. A failed
   round (no group formed, group aborted, timeout, network failure, diverged training) keeps
   the model, is counted in :meth:`TrainingSession.status` and logged as a warning. When no
   group formed (``GroupFormationFailed``: raised before any data is sent), the round's
   contribution never left the peer, so the next round offers the same one again instead of
   training and spending privacy budget anew (``theta`` did not change, so it is still the
   contribution for that model). After an abort, the masked contribution did leave: the next
   round trains afresh;
4. evaluation (optional ``evaluate(model) -> (loss, accuracy)``), in the executor too.

A peer whose privacy budget cannot pay for another contribution reports one ``budget_spent``
round, logs it, and stops: it neither trains nor joins groups any more (joining a group without
a contribution would only make the group smaller and its sum easier to read). Whoever runs the
session (the daemon) keeps serving the network, so membership stays right for the others.

Only the loop's clock is used (``loop.time()``), so the session runs on the simulator's
virtual-clock loop unchanged; there, pass :class:`InlineExecutor` (an executor thread would let
virtual time jump while a peer trains).

Models are saved with :func:`save_model` as a ``torch.save`` of the ``state_dict`` (tensors
only) plus a JSON side file, and read back with :func:`load_state` (``weights_only=True``:
no pickled code is ever run).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import json
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor, nn

from floor.errors import (
    BudgetExhausted,
    CheckpointError,
    ConfigError,
    GroupFormationFailed,
    MurmurError,
)
from floor.files import replace_atomically
from gossip.checkpoint import read_checkpoint, write_checkpoint
from gossip.driver import Averager
from gossip.learner import Contribution, Learner
from gossip.machine import AverageResult
from gossip.network import Network

__all__ = [
    "ANY_ROUND",
    "Evaluate",
    "InlineExecutor",
    "RoundReport",
    "RoundStatus",
    "TrainingSession",
    "load_state",
    "save_model",
]

log = logging.getLogger("murmur.gossip.service")

ANY_ROUND = 0
"""The round number given to the averager when rounds are not in lockstep (every peer's
session rounds count from 1, so 0 never collides with a lockstep round)."""

RoundStatus = Literal["ok", "aborted", "no_group", "budget_spent"]
"""How a round ended for this peer."""

Evaluate = Callable[[nn.Module], tuple[float, float]]
"""``evaluate(model) -> (loss, accuracy)`` on the peer's held-out split."""

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class RoundReport:
    """One round for one peer.

    ``loss``/``accuracy`` evaluate the model after the round (None without ``evaluate``; after
    a failed round, the unchanged model's last values). ``epsilon`` is spent so far.
    ``bytes_sent``/``bytes_received`` are what the peer's transport moved during the round
    (envelope bytes, including membership traffic; 0 where the network cannot count).
    """

    round: int
    status: RoundStatus
    loss: float | None
    accuracy: float | None
    epsilon: float
    group_size: int
    bytes_sent: int
    bytes_received: int
    error: str | None
    duration_s: float = 0.0
    """Loop-clock seconds from the round's start to its end (virtual under the simulator)."""


class InlineExecutor(concurrent.futures.Executor):
    """Runs submitted work at once in the caller's thread (virtual-clock loops and tests).

    It does stall the loop while the work runs: use a thread executor in a daemon.
    """

    def submit(
        self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[_T]:
        """Run ``fn(*args, **kwargs)`` now; return a finished future."""
        future: concurrent.futures.Future[_T] = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # handed to the awaiting coroutine, like a real executor
            future.set_exception(exc)
        return future


def _traffic_source(net: Network) -> Callable[[], tuple[int, int]]:
    """Where to read (bytes_sent, bytes_received): the network's transport, or the network."""
    for source in (getattr(net, "transport", None), net):
        if (
            source is not None
            and hasattr(source, "bytes_sent")
            and hasattr(source, "bytes_received")
        ):
            counted = source
            return lambda: (int(counted.bytes_sent), int(counted.bytes_received))
    return lambda: (0, 0)


class TrainingSession:
    """One peer's training rounds: ``await run()`` (or ``run_round()`` one at a time).

    ``executor`` runs training and evaluation; None makes a one-thread executor owned (and
    shut down by :meth:`close`) by the session. ``round_timeout_s`` bounds each averaging
    step on the loop's clock (the averagers have their own, shorter deadlines; this is the
    backstop). ``traffic`` returns the (bytes sent, bytes received) counters to report per
    round; by default they are read from ``net.transport`` or ``net`` when those count bytes.

    ``lockstep`` (default) passes the session's round number to the averager, so a peer only
    groups with peers at the same round: right when all peers start together (simulations,
    tests). ``lockstep=False`` passes the constant :data:`ANY_ROUND`: any ready peers group,
    whatever their own round count (asynchronous rounds, as in Moshpit SGD). Daemons use it:
    they start seconds apart, and a peer that missed one group (or restarted) would otherwise
    stay out of step with the others for good. Every group still gets a fresh random id, which
    is what keys the secure protocol's messages and masks.
    """

    def __init__(
        self,
        net: Network,
        learner: Learner,
        averager: Averager,
        *,
        rounds: int,
        evaluate: Evaluate | None = None,
        executor: concurrent.futures.Executor | None = None,
        round_timeout_s: float = 60.0,
        traffic: Callable[[], tuple[int, int]] | None = None,
        lockstep: bool = True,
        checkpoint: Path | None = None,
        checkpoint_meta: dict[str, str] | None = None,
    ) -> None:
        if rounds < 1:
            raise ConfigError(f"rounds must be at least 1, got {rounds}")
        if not (math.isfinite(round_timeout_s) and round_timeout_s > 0):
            raise ConfigError(f"round_timeout_s must be > 0, got {round_timeout_s!r}")
        self.net = net
        self.learner = learner
        self.averager = averager
        self.rounds = rounds
        self.round_timeout_s = round_timeout_s
        self._evaluate = evaluate
        self._own_executor = executor is None
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="murmur-train"
        )
        self._traffic = traffic or _traffic_source(net)
        self.lockstep = lockstep
        self.reports: list[RoundReport] = []
        """Every round's report, in order."""
        self._round = 0
        self._running = False
        self._closed = False
        self._loss: float | None = None
        self._accuracy: float | None = None
        self._initial: tuple[float, float] | None = None
        self._last_group = 0
        self._counts = {"ok": 0, "aborted": 0, "no_group": 0, "budget_spent": 0, "recovered": 0}
        self._last_error: str | None = None
        self._unsent: Contribution | None = None  # from a round whose group never formed
        self._lock = threading.Lock()  # training and evaluation share the learner's model
        self.checkpoint_path = None if checkpoint is None else Path(checkpoint)
        self._meta = dict(checkpoint_meta or {})
        self._unsent_on_disk = False
        self.resumed_round: int | None = None
        """The round the checkpoint resumed from (None: a fresh start)."""
        self.resumed_unpaid = 0
        """Contributions the budget paid for after the checkpoint was written (a crash
        mid-round): counted as made, their results lost."""
        self._checkpoint_error: str | None = None
        if self.checkpoint_path is not None:
            state = read_checkpoint(self.checkpoint_path)
            if state is not None:
                self._restore(state)

    # -- state ----------------------------------------------------------------------------------

    @property
    def round(self) -> int:
        """Rounds finished so far (whatever their outcome)."""
        return self._round

    @property
    def finished(self) -> bool:
        """All planned rounds ran, or the budget is spent."""
        return self._round >= self.rounds or self.learner.budget_spent

    @property
    def accuracy(self) -> float | None:
        """Held-out accuracy of the current model (None before any evaluation)."""
        return self._accuracy

    @property
    def initial_accuracy(self) -> float | None:
        """Held-out accuracy of the starting model (evaluated by ``run()`` before round 1)."""
        return None if self._initial is None else self._initial[1]

    def status(self) -> dict[str, object]:
        """A flat summary for ``GET /v1/status`` and the API (no secret, no private count)."""
        learner = self.learner
        budget = learner.budget
        # from the recorded rounds, not the learner: the learner learns it mid-round (in the
        # executor), and a status read then must not say "budget spent" before the round counts
        spent = self._counts["budget_spent"] > 0
        if spent:
            state = "budget_spent"
        elif self._round >= self.rounds:
            state = "done"
        elif self._running:
            state = "training"
        else:
            state = "idle"
        cap = getattr(budget, "eps_max", None)
        return {
            "training": state,
            "round": self._round,
            "rounds": self.rounds,
            "algorithm": getattr(self.averager, "name", type(self.averager).__name__),
            "privacy_unit": str(learner.privacy.unit),
            "epsilon_spent": learner.epsilon_spent,
            "epsilon_budget": None if cap is None else float(cap),
            "delta": learner.status()["delta"],
            "dp_noise": "distributed" if learner.plan.distributed is not None else "local",
            "epsilon_central": learner.epsilon_central,
            "epsilon_local": learner.epsilon_local,
            "budget_spent": spent,
            "contributions": learner.rounds_contributed,
            "accuracy": self._accuracy,
            "loss": self._loss,
            "initial_accuracy": self.initial_accuracy,
            "last_group_size": self._last_group,
            "ok_rounds": self._counts["ok"],
            "aborted_rounds": self._counts["aborted"],
            "no_group_rounds": self._counts["no_group"],
            "recovered_rounds": self._counts["recovered"],
            "stage_timeouts_s": self._stage_timeouts(),
            "last_error": self._last_error,
            "resumed_round": self.resumed_round,
            "checkpoint_error": self._checkpoint_error,
        }

    def _stage_timeouts(self) -> list[float] | None:
        """The group stages' current timeouts (``gossip.deadlines``), or None: not grouped."""
        deadlines = getattr(getattr(self.averager, "machine", None), "deadlines", None)
        return None if deadlines is None else list(deadlines.timeouts())

    # -- running --------------------------------------------------------------------------------

    async def run(self, on_round: Callable[[RoundReport], None] | None = None) -> list[RoundReport]:
        """Run the remaining rounds; stop early once the budget is spent.

        Evaluates the starting model first (``initial_accuracy``). Returns this call's reports.
        """
        if self._initial is None and self._evaluate is not None:
            self._initial = await self._in_executor(self._evaluate_model)
            self._loss, self._accuracy = self._initial
        out: list[RoundReport] = []
        while not self.finished:
            report = await self.run_round()
            out.append(report)
            if on_round is not None:
                on_round(report)
        return out

    async def run_round(self) -> RoundReport:
        """Run one round (train, average, apply on success, evaluate) and report it."""
        if self._closed:
            raise ConfigError("the training session is closed")
        if self._running:
            raise ConfigError("a round is already running in this session")
        if self.finished:
            raise ConfigError("the training session has no rounds left")
        self._running = True
        try:
            return await self._round_once(self._round + 1)
        finally:
            self._running = False

    async def _round_once(self, r: int) -> RoundReport:
        loop = asyncio.get_running_loop()
        started = loop.time()
        sent0, received0 = self._traffic()
        status: RoundStatus = "ok"
        error: str | None = None
        group_size = 0
        contribution, self._unsent = self._unsent, None
        try:
            if contribution is not None and self._unsent_on_disk:
                # write-ahead: once it may leave, no restart may offer it again
                try:
                    await self._in_executor(self._write_checkpoint)
                except CheckpointError:
                    self._unsent = contribution  # still unsent: offered when the disk works
                    raise
            if contribution is None:
                contribution = await self._in_executor(self._local_update)
            result = await self._average(contribution, r)
        except BudgetExhausted as exc:
            status, error = "budget_spent", str(exc)
        except GroupFormationFailed as exc:
            status, error = "no_group", str(exc)
            self._unsent = contribution  # nothing of it left the peer: offer it again
        except MurmurError as exc:  # AggregationError, TrainingError, network failures
            status, error = "aborted", f"{type(exc).__name__}: {exc}"
        except TimeoutError:  # our own backstop (a transport Timeout is a MurmurError above)
            status, error = "aborted", f"round timed out after {self.round_timeout_s:g} s"
        else:
            self.learner.apply_result(result.vector, result.group_size)
            group_size = result.group_size
            self._counts["recovered"] += result.recovered  # finished despite late dropouts
            if self._evaluate is not None:
                self._loss, self._accuracy = await self._in_executor(self._evaluate_model)
        self._round = r
        self._counts[status] += 1
        self._last_group = group_size
        if error is not None:
            self._last_error = error
        if self.checkpoint_path is not None:
            await self._save_checkpoint()
        sent1, received1 = self._traffic()
        report = RoundReport(
            r,
            status,
            self._loss,
            self._accuracy,
            self.learner.epsilon_spent,
            group_size,
            sent1 - sent0,
            received1 - received0,
            error,
            loop.time() - started,
        )
        self.reports.append(report)
        self._log(report)
        return report

    # -- durable state --------------------------------------------------------------------------

    def checkpoint_state(self) -> dict[str, Any]:
        """What :mod:`gossip.checkpoint` keeps of this session (and of its learner)."""
        unsent = self._unsent
        return {
            "meta": dict(self._meta),
            "session": {
                "round": self._round,
                "counts": dict(self._counts),
                "loss": self._loss,
                "accuracy": self._accuracy,
                "initial": None if self._initial is None else list(self._initial),
                "last_group": self._last_group,
                "last_error": self._last_error,
            },
            "learner": self.learner.state_dict(),
            "unsent": None
            if unsent is None
            else {
                "vector": unsent.vector.clone(),
                "weight": unsent.weight,
                "round": unsent.round,
                "epsilon": unsent.epsilon_spent,
            },
        }

    def _write_checkpoint(self) -> None:
        assert self.checkpoint_path is not None
        with self._lock:
            state = self.checkpoint_state()
        write_checkpoint(self.checkpoint_path, state)
        self._unsent_on_disk = state["unsent"] is not None

    async def _save_checkpoint(self) -> None:
        try:
            await self._in_executor(self._write_checkpoint)
        except CheckpointError as exc:  # e.g. a full disk: keep training, say so everywhere
            self._checkpoint_error = str(exc)
            log.error("event=checkpoint_failed round=%d error=%r", self._round, str(exc))
        else:
            self._checkpoint_error = None

    def _restore(self, state: dict[str, Any]) -> None:
        path = self.checkpoint_path
        try:
            meta, session, learner = state["meta"], state["session"], state["learner"]
            unsent = state["unsent"]
            for key, want in self._meta.items():
                if meta.get(key) != want:
                    raise CheckpointError(
                        f"training checkpoint {path} was written for {key} "
                        f"{meta.get(key)!r}, not {want!r}; move it away to start afresh"
                    )
            self.resumed_unpaid = self.learner.load_state_dict(learner)
            counts = session["counts"]
            self._round = int(session["round"])
            self._counts = {k: int(counts.get(k, 0)) for k in self._counts}
            self._loss = _optional_float(session["loss"])
            self._accuracy = _optional_float(session["accuracy"])
            initial = session["initial"]
            self._initial = None if initial is None else (float(initial[0]), float(initial[1]))
            self._last_group = int(session["last_group"])
            self._last_error = session["last_error"]
            if unsent is not None and self.resumed_unpaid == 0:
                # paid for and never sent; if the budget paid for more since, the round that
                # took it may have sent it: it is not offered again
                vector = unsent["vector"]
                if not isinstance(vector, Tensor):
                    raise TypeError("the unsent contribution is not a tensor")
                self._unsent = Contribution(
                    vector, float(unsent["weight"]), int(unsent["round"]), float(unsent["epsilon"])
                )
                self._unsent_on_disk = True
        except CheckpointError as exc:
            raise CheckpointError(f"training checkpoint {path}: {exc}") from None
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise CheckpointError(
                f"training checkpoint {path} does not hold a session's state ({exc!r})"
            ) from None
        self.resumed_round = self._round
        log.info(
            "event=resumed checkpoint=%s round=%d contributions=%d unpaid_rounds_lost=%d "
            "unsent=%s accuracy=%s",
            path,
            self._round,
            self.learner.rounds_contributed,
            self.resumed_unpaid,
            self._unsent is not None,
            "none" if self._accuracy is None else f"{self._accuracy:.4f}",
        )

    async def _average(self, contribution: Contribution, r: int) -> AverageResult:
        key = r if self.lockstep else ANY_ROUND
        async with asyncio.timeout(self.round_timeout_s):
            return await self.averager.average(contribution.vector, contribution.weight, key)

    def _local_update(self) -> Contribution:
        with self._lock:
            return self.learner.local_update()

    def _evaluate_model(self) -> tuple[float, float]:
        assert self._evaluate is not None
        with self._lock:
            loss, acc = self._evaluate(self.learner.current_model())
        return float(loss), float(acc)

    async def _in_executor(self, fn: Callable[[], _T]) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def _log(self, report: RoundReport) -> None:
        acc = "none" if report.accuracy is None else f"{report.accuracy:.4f}"
        if report.status == "ok":
            log.info(
                "event=round_done round=%d/%d group=%d accuracy=%s epsilon=%.3f "
                "sent=%d received=%d seconds=%.2f",
                report.round,
                self.rounds,
                report.group_size,
                acc,
                report.epsilon,
                report.bytes_sent,
                report.bytes_received,
                report.duration_s,
            )
        elif report.status == "budget_spent":
            log.warning(
                "event=budget_spent round=%d epsilon=%.3f privacy_unit=%s "
                "action=stop_contributing reason=%r",
                report.round,
                report.epsilon,
                self.learner.privacy.unit,
                report.error,
            )
        else:
            log.warning(
                "event=round_failed round=%d/%d status=%s model=kept failed_so_far=%d error=%r",
                report.round,
                self.rounds,
                report.status,
                self._counts["aborted"] + self._counts["no_group"],
                report.error,
            )

    def close(self) -> None:
        """Close the averager (a ``Driver`` unregisters its machine) and shut down the
        executor if the session made it (idempotent; a running training step finishes in its
        thread)."""
        if self._closed:
            return
        self._closed = True
        close = getattr(self.averager, "close", None)
        if callable(close):
            close()
        if self._own_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)


def _optional_float(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]


def save_model(model: nn.Module, path: Path, metadata: dict[str, object] | None = None) -> None:
    """Write ``model.state_dict()`` to ``path`` (``torch.save`` of tensors only) and
    ``metadata`` as JSON to ``path`` with suffix ``.json``; each file atomically."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    path = Path(path)
    _atomic(path, lambda fh: torch.save(state, fh))
    if metadata is not None:
        text = json.dumps(metadata, indent=2, sort_keys=True, default=str).encode()
        _atomic(path.with_suffix(".json"), lambda fh: fh.write(text))


def load_state(path: Path) -> dict[str, Tensor]:
    """Read a state dict written by :func:`save_model` (``weights_only``: no code runs)."""
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"cannot read model file {path}: {exc}") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(f"model file {path} does not hold a state dict of tensors")
    return state


def _atomic(path: Path, write: Callable[[Any], object]) -> None:
    buffer = io.BytesIO()
    write(buffer)
    replace_atomically(path, buffer.getvalue())
