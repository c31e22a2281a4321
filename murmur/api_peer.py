"""Run a :class:`murmur.Training` on the real network: the operator's path of the Python API.

A :class:`Peer` is a full Murmur daemon (``p2p.daemon.Daemon``: identity, authenticated
envelopes over HTTP, membership) inside the caller's process. It starts a new network or joins
one through ``bootstrap`` addresses, then trains rounds with the daemon's own round loop
(``gossip.service.TrainingSession``)::

    async with murmur.Peer(listen="0.0.0.0:7070", bootstrap=["10.0.0.2:7070"]) as peer:
        async for report in peer.train(training):
            print(report.round, report.status, report.accuracy, report.epsilon)

:class:`SyncPeer` and :func:`train` are the same for scripts without ``async``. A round that
fails for this peer (no group formed in time, a group aborted) keeps the model and is reported
with its ``status``; only mistakes in the description raise.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import torch
from torch import Tensor, nn

from dp.budget import Budget
from floor.errors import ConfigError, Timeout, TransportClosed
from floor.identity import PeerId
from gossip.network import TransportNetwork
from gossip.run import build_learner, build_session, privacy_config
from gossip.service import Evaluate, RoundReport, TrainingSession
from murmur.api import Training, as_tensors
from p2p.config import DaemonConfig, MembershipConfig
from p2p.daemon import Daemon

__all__ = ["Peer", "RoundReport", "SyncPeer", "train"]

OnRound = Callable[[RoundReport], None]

BUDGET_FILE = "privacy_budget.json"
"""The privacy spend, kept in a user-given data dir (the daemon's file name)."""
QUICK_MEMBERSHIP = MembershipConfig(exchange_interval_s=1.0, ping_interval_s=1.0)
"""A peer's default membership: peer lists exchanged every second (the daemon's default is 5 s)
so that a small network assembles, and its peers start training together, within seconds."""


class Peer:
    """One Murmur peer in this process: ``async with Peer(...)``, or ``start()``/``aclose()``.

    ``listen`` is ``HOST:PORT`` (port 0 picks a free one; see :attr:`address`). ``bootstrap``
    lists addresses of peers already in the network (none: start a new network). ``data_dir``
    keeps the identity key, known peers and the privacy spend (``privacy_budget.json``) across
    runs; None uses a temporary directory (a fresh identity each run) removed by ``aclose()``.
    ``membership`` defaults to :data:`QUICK_MEMBERSHIP`. ``config`` replaces all of these with a
    full ``p2p.config.DaemonConfig``.
    """

    def __init__(
        self,
        *,
        listen: str = "127.0.0.1:0",
        bootstrap: Sequence[str] | str = (),
        data_dir: str | Path | None = None,
        network_key_file: str | Path | None = None,
        membership: MembershipConfig | None = None,
        config: DaemonConfig | None = None,
    ) -> None:
        self._tmp: str | None = None
        if config is None:
            if data_dir is None:
                self._tmp = tempfile.mkdtemp(prefix="murmur-peer-")
                data_dir = self._tmp
            config = DaemonConfig(
                listen=listen,
                data_dir=Path(data_dir),
                bootstrap=(bootstrap,) if isinstance(bootstrap, str) else tuple(bootstrap),
                network_key_file=None if network_key_file is None else Path(network_key_file),
                tune_malloc=False,
                membership=membership or QUICK_MEMBERSHIP,
            )
        self.config = config
        self._daemon: Daemon | None = None
        self._training = False

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Load or create the identity, listen, and join through the bootstrap addresses."""
        if self._daemon is not None:
            raise ConfigError("this peer is already started")
        daemon = Daemon(self.config)
        await daemon.start()
        self._daemon = daemon

    async def aclose(self) -> None:
        """Leave: stop the daemon and remove a temporary data directory. Idempotent."""
        daemon, self._daemon = self._daemon, None
        if daemon is not None:
            await daemon.aclose()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- what a user looks at ---------------------------------------------------------------

    @property
    def daemon(self) -> Daemon:
        """The running daemon (its transport, membership and status)."""
        if self._daemon is None:
            raise TransportClosed("the peer is not started: use 'async with Peer(...)'")
        return self._daemon

    @property
    def peer_id(self) -> PeerId:
        """This peer's public id (from its identity key)."""
        return self.daemon.identity.peer_id

    @property
    def address(self) -> str:
        """The ``HOST:PORT`` other peers can bootstrap from."""
        addresses = self.daemon.transport.addresses
        return addresses[0] if addresses else self.config.listen

    def peers(self) -> list[PeerId]:
        """The other peers this peer currently knows to be alive."""
        return [e.record.peer_id for e in self.daemon.membership.view.live()]

    def status(self) -> dict[str, object]:
        """The daemon's status document (what ``GET /v1/status`` answers)."""
        return self.daemon.status()

    async def wait_for_peers(self, count: int, *, timeout: float = 60.0) -> int:
        """Wait until at least ``count`` other peers are alive in the view; returns how many.

        Raises :class:`~floor.errors.Timeout` saying how many were found.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.peers()) < count:
            if loop.time() >= deadline:
                raise Timeout(
                    f"only {len(self.peers())} of {count} other peers joined within "
                    f"{timeout:g} s: start more peers, check the bootstrap address, or use a "
                    "smaller group size"
                )
            await asyncio.sleep(0.1)
        return len(self.peers())

    async def serve(self, seconds: float | None = None) -> None:
        """Keep answering the network (membership, others' groups) for ``seconds``, or until
        cancelled. Useful after training, so that slower peers can finish their last round."""
        if seconds is None:
            await self.daemon.wait()
        else:
            await asyncio.sleep(seconds)

    # -- training ---------------------------------------------------------------------------

    async def train(
        self,
        training: Training,
        *,
        wait_for_peers: int | None = None,
        join_timeout_s: float = 60.0,
        round_timeout_s: float = 60.0,
    ) -> AsyncIterator[RoundReport]:
        """Train ``training`` on this peer's data; yields one :class:`RoundReport` per round.

        First waits for ``wait_for_peers`` other peers (default: enough for the smallest
        group). Stops after ``training.rounds`` rounds, or earlier once the privacy budget is
        spent (that round's status is ``budget_spent``).
        """
        if self._training:
            raise ConfigError("this peer is already training; one training at a time")
        daemon = self.daemon
        session = self._session(training, daemon, round_timeout_s)
        self._training = True
        try:
            need = wait_for_peers
            if need is None:
                need = training.averaging.min_group_size - 1
            await self.wait_for_peers(need, timeout=join_timeout_s)
            while not session.finished:
                yield await session.run_round()
        finally:
            self._training = False
            session.close()

    async def run(
        self,
        training: Training,
        *,
        on_round: OnRound | None = None,
        wait_for_peers: int | None = None,
        join_timeout_s: float = 60.0,
    ) -> list[RoundReport]:
        """:meth:`train` to the end; ``on_round`` sees each report as it lands."""
        reports: list[RoundReport] = []
        rounds = self.train(training, wait_for_peers=wait_for_peers, join_timeout_s=join_timeout_s)
        async for report in rounds:
            reports.append(report)
            if on_round is not None:
                on_round(report)
        return reports

    def _session(
        self, training: Training, daemon: Daemon, round_timeout_s: float
    ) -> TrainingSession:
        x, y = training.check()
        spec = training.spec()
        if spec.algorithm == "dpsgd":
            raise ConfigError(
                "dpsgd needs a fixed topology of known peers: run it in the simulator "
                "(murmur.simulate), or use SecureGroups / Baseline('push-sum') on a network"
            )
        privacy = privacy_config(spec)
        budget = None
        if self._tmp is None and privacy.epsilon is not None and spec.private:
            # A kept data dir keeps the spend: a restarted peer cannot spend its budget twice.
            path = self.config.data_dir / BUDGET_FILE
            budget = Budget.persistent(privacy.epsilon, privacy.delta, path)
        learner = build_learner(
            spec,
            training.build_model(),
            x,
            y,
            loss_fn=training.loss,
            budget=budget,
            momentum=training.train_config().momentum,
        )
        net = TransportNetwork(daemon.transport, self.peers)
        evaluate = _evaluator(training) if training.eval_data is not None else None
        return build_session(
            spec,
            net,
            daemon.identity,
            learner,
            evaluate=evaluate,
            round_timeout_s=round_timeout_s,
        )


def _evaluator(training: Training) -> Evaluate:
    x, y = as_tensors(training.eval_data, "eval_data")
    loss_fn, metric = training.loss, training.metric

    @torch.no_grad()
    def evaluate(model: nn.Module) -> tuple[float, float]:
        was_training = model.training
        model.eval()
        try:
            out: Tensor = model(x)
        finally:
            model.train(was_training)
        return float(loss_fn(out, y)), float(metric(out, y))

    return evaluate


class SyncPeer:
    """:class:`Peer` for scripts without ``async``: ``with SyncPeer(...) as peer:``.

    The peer answers the network only while one of its methods runs (there is no event loop
    in between), so keep the gaps between calls short.
    """

    def __init__(self, **options: Any) -> None:
        self._peer = Peer(**options)
        self._runner: asyncio.Runner | None = None

    def __enter__(self) -> Self:
        self._runner = asyncio.Runner()
        try:
            self._runner.run(self._peer.start())
        except BaseException:
            self._runner.close()
            self._runner = None
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            with contextlib.ExitStack() as stack:
                stack.callback(runner.close)
                runner.run(self._peer.aclose())

    def _run(self, coro: Any) -> Any:
        if self._runner is None:
            coro.close()
            raise TransportClosed("the peer is not started: use 'with SyncPeer(...) as peer'")
        return self._runner.run(coro)

    @property
    def peer(self) -> Peer:
        """The underlying :class:`Peer`."""
        return self._peer

    @property
    def address(self) -> str:
        """The ``HOST:PORT`` other peers can bootstrap from."""
        return self._peer.address

    def wait_for_peers(self, count: int, *, timeout: float = 60.0) -> int:
        """See :meth:`Peer.wait_for_peers`."""
        result: int = self._run(self._peer.wait_for_peers(count, timeout=timeout))
        return result

    def serve(self, seconds: float) -> None:
        """See :meth:`Peer.serve` (a sync caller must give a duration)."""
        self._run(self._peer.serve(seconds))

    def train(
        self,
        training: Training,
        *,
        on_round: OnRound | None = None,
        wait_for_peers: int | None = None,
        join_timeout_s: float = 60.0,
    ) -> list[RoundReport]:
        """Run ``training`` to the end; returns every round's report (see :meth:`Peer.train`)."""
        reports: list[RoundReport] = self._run(
            self._peer.run(
                training,
                on_round=on_round,
                wait_for_peers=wait_for_peers,
                join_timeout_s=join_timeout_s,
            )
        )
        return reports


def train(
    training: Training,
    *,
    listen: str = "127.0.0.1:0",
    bootstrap: Sequence[str] | str = (),
    data_dir: str | Path | None = None,
    on_round: OnRound | None = None,
    wait_for_peers: int | None = None,
    join_timeout_s: float = 60.0,
) -> list[RoundReport]:
    """Start a peer, join the network through ``bootstrap``, train, leave; one call."""
    with SyncPeer(listen=listen, bootstrap=bootstrap, data_dir=data_dir) as peer:
        return peer.train(
            training,
            on_round=on_round,
            wait_for_peers=wait_for_peers,
            join_timeout_s=join_timeout_s,
        )
