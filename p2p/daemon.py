"""The peer daemon: identity, envelope codec, aiohttp transport, membership, admin endpoints,
and (with ``[training] task`` set) the training loop.

``Daemon`` is reusable: other services (the gossip learner) use its ``transport`` and
``membership`` and run their loops in the daemon's task group through ``spawn()``.

Training (``gossip.service.TrainingSession``): the daemon builds the task, takes its shard
(``training.shard``), waits until ``peers_to_wait_for`` peers are live (at most
``start_timeout_s``), trains ``rounds`` rounds with the peers of its membership view, saves the
final model as ``model.pt`` (a ``state_dict``, read with ``gossip.service.load_state``) and
``model.json`` in the data dir, then keeps serving so that the others can finish. The privacy
budget lives in ``privacy_budget.json`` in the data dir: a restarted daemon keeps its spent
epsilon, and one whose budget cannot pay for a contribution says so and stops contributing.
After every round the session checkpoints its learning to ``checkpoint.pt`` (model, counters,
an unsent contribution; ``gossip.checkpoint``), so a daemon restarted on the same data dir
(after ``kill -9`` too) resumes from its last completed round; a corrupt checkpoint stops
``start()`` with an error naming the file.
Training and evaluation run in one worker thread (torch at one thread), off the event loop.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import time
from collections.abc import Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any, Self, cast

import torch

from dp.budget import Budget
from floor import __version__
from floor.envelope import EnvelopeCodec
from floor.errors import ConfigError, KeyFileError, TransportClosed
from floor.identity import Identity, PeerId
from gossip.checkpoint import CHECKPOINT_FILE
from gossip.data import Scheme, partition
from gossip.learner import Learner
from gossip.matchmaking import Invitations
from gossip.network import TransportNetwork
from gossip.run import build_learner, build_session
from gossip.service import TrainingSession, save_model
from gossip.tasks import Task, make_task
from p2p.admin import admin_routes
from p2p.config import DaemonConfig, TrainingConfig, parse_shard
from p2p.membership import Membership
from p2p.messages import MESSAGE_TYPES
from p2p.reach import Reachability
from p2p.transport.http import HttpTransport

__all__ = ["Daemon", "load_network_key", "tune_malloc"]

log = logging.getLogger("murmur.daemon")

NETWORK_KEY_SIZE = 32
BUDGET_FILE = "privacy_budget.json"
MODEL_FILE = "model.pt"
# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_malloc(threshold: int = 1 << 30) -> bool:
    """Keep large buffers on the heap and freed memory mapped (glibc only; else a no-op).

    By default glibc serves each large allocation with a fresh mmap, so every 40 MB body is
    page-faulted in again: raw aiohttp moved 40 MB at ~0.5 GB/s that way and ~1.7 GB/s with
    this (bench/results/transport.md). Returns whether it applied.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok_trim = mallopt(_M_TRIM_THRESHOLD, threshold)
    ok_mmap = mallopt(_M_MMAP_THRESHOLD, threshold)
    return bool(ok_trim and ok_mmap)


def load_network_key(path: Path) -> bytes:
    """Read a pre-shared network key: 64 hex characters (whitespace ignored) or 32 raw bytes."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read network key file {path}: {exc.strerror or exc}") from None
    text = data.strip()
    if len(text) == 2 * NETWORK_KEY_SIZE:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    if len(data) == NETWORK_KEY_SIZE:
        return data
    raise KeyFileError(f"network key file {path} must hold 64 hex characters or 32 raw bytes")


class Daemon:
    """One peer: ``await start()`` (or ``async with``), then ``aclose()``.

    ``start()`` loads or creates the identity, listens, joins through the bootstrap addresses
    and starts membership. Errors a person can fix (port in use, bad key file, unreachable
    bootstrap) are ``MurmurError`` s with a one-line message.
    """

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self._identity: Identity | None = None
        self._transport: HttpTransport | None = None
        self._membership: Membership | None = None
        self._reach: Reachability | None = None
        self._group: asyncio.TaskGroup | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._started_at = 0.0
        self._session: TrainingSession | None = None
        self._prepared: tuple[Task, Learner, TrainingSession] | None = None
        self._training_state = "off" if not config.training.task else "starting"
        self._closed = False

    # -- what other services use -----------------------------------------------------------
    @property
    def identity(self) -> Identity:
        """This peer's identity (after ``start()``)."""
        if self._identity is None:
            raise TransportClosed("the daemon is not started")
        return self._identity

    @property
    def transport(self) -> HttpTransport:
        """The transport (after ``start()``); services register their handlers on it."""
        if self._transport is None:
            raise TransportClosed("the daemon is not started")
        return self._transport

    @property
    def membership(self) -> Membership:
        """The membership view (after ``start()``)."""
        if self._membership is None:
            raise TransportClosed("the daemon is not started")
        return self._membership

    @property
    def uptime_s(self) -> float:
        """Seconds since ``start()`` completed."""
        return time.monotonic() - self._started_at if self._started_at else 0.0

    def spawn(self, coro: Coroutine[Any, Any, None], *, name: str | None = None) -> None:
        """Run ``coro`` in the daemon's task group: cancelled and awaited by ``aclose()``.

        If it raises, the daemon stops (``wait()`` returns and re-raises).
        """
        if self._group is None or self._closed:
            coro.close()
            raise TransportClosed("the daemon is not running")
        self._group.create_task(coro, name=name)

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Load identity, listen, join, start membership. Cleans up if any step fails."""
        cfg = self.config
        try:
            await self._start(cfg)
        except BaseException:
            await self.aclose()
            raise

    async def _start(self, cfg: DaemonConfig) -> None:
        if cfg.tune_malloc:
            tune_malloc()
        try:
            cfg.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise ConfigError(f"cannot create data dir {cfg.data_dir}: {exc.strerror}") from None
        identity, created = Identity.load_or_create(cfg.data_dir)
        self._identity = identity
        network_key = (
            load_network_key(cfg.network_key_file) if cfg.network_key_file is not None else None
        )
        allowed = frozenset(PeerId.parse(text) for text in cfg.allow)
        admit = (lambda peer: peer in allowed) if allowed else None
        codec = EnvelopeCodec(
            identity,
            network_key=network_key,
            max_message_size=cfg.transport.max_message_size,
            window_s=cfg.replay_window_s,
            max_future_s=cfg.replay_max_future_s,
            replay_capacity=cfg.replay_capacity,
            message_types=MESSAGE_TYPES,
        )
        self._transport = HttpTransport(
            codec,
            listen=cfg.listen,
            config=cfg.transport,
            admit=admit,
            routes=admin_routes(self),
            advertise=cfg.advertise,
            route_hint=cfg.bootstrap[0] if cfg.bootstrap else None,
            serve_peers=not cfg.no_listen,
        )
        self._membership = Membership(
            identity, self._transport, cfg.membership, data_dir=cfg.data_dir, admit=admit
        )
        self._reach = Reachability(self._transport, self._membership, cfg.transport)
        self._reach.on_change = self._reachability_changed
        await self._transport.start()
        log.info(
            "event=listening peer_id=%s listen=%s peers=%s new_identity=%s private=%s allowlist=%d",
            identity.peer_id,
            ",".join(self._transport.direct_addresses) or cfg.listen,
            "no (outbound only: reached through relays)" if cfg.no_listen else "yes",
            created,
            network_key is not None,
            len(allowed),
        )
        if cfg.training.task:
            # Build before joining (task data, noise calibration: seconds of CPU): once others
            # see this peer it is nearly ready to train, so first rounds find their groups.
            torch.set_num_threads(1)  # two threads made small steps 5-25x slower on 2 cores
            self._prepared = await self._prepare()
        await self._membership.join(cfg.bootstrap)
        self._supervisor = asyncio.create_task(self._supervise(), name="murmur-daemon")
        await self._ready.wait()
        self._started_at = time.monotonic()

    async def _supervise(self) -> None:
        async with asyncio.TaskGroup() as group:
            self._group = group
            group.create_task(self.membership.run(), name="membership")
            if self._reach is not None:
                group.create_task(self._reach.run(), name="reachability")
            if self.config.training.task:
                group.create_task(self._train(), name="training")
            self._ready.set()
        self._group = None

    # -- training ----------------------------------------------------------------------------
    @property
    def session(self) -> TrainingSession | None:
        """The training session (None before it is built, or without a task)."""
        return self._session

    def _reachability_changed(self, reachable: bool) -> None:
        log.info(
            "event=reachability reachable=%s relay_for=%d",
            reachable,
            self.transport.relay_capacity,
        )
        self._defer_inviting()

    def _defer_inviting(self) -> None:
        """A peer reached through relays lets reachable peers invite first."""
        session = self._session
        if session is None and self._prepared is not None:
            session = self._prepared[2]
        if session is None:
            return
        former = getattr(getattr(session.averager, "machine", None), "former", None)
        if isinstance(former, Invitations):
            former.defer = self.transport.reachable is False

    def _live_peers(self) -> list[PeerId]:
        return [e.record.peer_id for e in self.membership.view.live()]

    async def _prepare(self) -> tuple[Task, Learner, TrainingSession]:
        """The task, learner and session, resumed from the checkpoint if there is one (a
        corrupt one raises ``CheckpointError`` here, before the peer joins anyone)."""
        cfg = self.config.training
        loop = asyncio.get_running_loop()
        task, learner = await loop.run_in_executor(None, self._build_learner)
        net = TransportNetwork(self.transport, self._live_peers)

        def evaluate(model: torch.nn.Module) -> tuple[float, float]:
            ev = task.evaluate(model)
            return ev.loss, ev.metric

        session = build_session(  # on the loop: its driver registers handlers on the network
            cfg.spec(),
            net,
            self.identity,
            learner,
            evaluate=evaluate,
            round_timeout_s=cfg.round_timeout_s,
            checkpoint=self.config.data_dir / CHECKPOINT_FILE,
            checkpoint_meta={"task": task.name},
        )
        return task, learner, session

    async def _train(self) -> None:
        cfg = self.config.training
        loop = asyncio.get_running_loop()
        prepared, self._prepared = self._prepared, None
        if prepared is None:
            prepared = await self._prepare()
        task, learner, session = prepared
        self._session = session
        self._defer_inviting()
        try:
            await self._wait_for_peers(cfg)
            self._training_state = "training"
            log.info(
                "event=training_started task=%s rounds=%d algorithm=%s privacy_unit=%s "
                "dp_noise=%s epsilon=%g delta=%g noise_multiplier=%.4f peers=%d",
                task.name,
                cfg.rounds,
                cfg.algorithm,
                learner.privacy.unit,
                learner.privacy.noise if learner.privacy.unit == "peer" else "-",
                cfg.epsilon,
                cfg.delta,
                learner.plan.noise_multiplier,
                len(self._live_peers()),
            )
            await session.run()
            status = session.status()
            await loop.run_in_executor(None, self._save_model, session, task.name)
            self._training_state = str(status["training"])
            log.info(
                "event=training_done rounds=%d ok=%s recovered=%s aborted=%s no_group=%s "
                "accuracy=%s initial_accuracy=%s epsilon=%.4f model=%s action=keep_serving",
                session.round,
                status["ok_rounds"],
                status["recovered_rounds"],
                status["aborted_rounds"],
                status["no_group_rounds"],
                status["accuracy"],
                status["initial_accuracy"],
                learner.epsilon_spent,
                self.config.data_dir / MODEL_FILE,
            )
        finally:
            session.close()

    def _build_learner(self) -> tuple[Task, Learner]:
        """The task, this peer's shard and its learner (blocking: sklearn, noise calibration)."""
        cfg: TrainingConfig = self.config.training
        options: dict[str, Any] = {"seed": cfg.seed}
        if cfg.model:
            options["model"] = cfg.model
        task = make_task(cfg.task, **options)
        index, count = parse_shard(cfg.shard)
        scheme = cast(Scheme, cfg.partition)
        parts = partition(task.y_train, count, scheme=scheme, alpha=cfg.alpha, seed=cfg.seed)
        rows = torch.as_tensor(parts[index])
        spec = cfg.spec()
        budget = None
        if spec.private:
            budget = Budget.persistent(cfg.epsilon, cfg.delta, self.config.data_dir / BUDGET_FILE)
            if budget.spent_epsilon > 0:
                log.info(
                    "event=budget_loaded spent_epsilon=%.4f epsilon_budget=%g",
                    budget.spent_epsilon,
                    cfg.epsilon,
                )
        learner = build_learner(
            spec,
            task.build_model(cfg.seed),
            task.x_train[rows],
            task.y_train[rows],
            loss_fn=task.loss_fn,
            budget=budget,
        )
        return task, learner

    async def _wait_for_peers(self, cfg: TrainingConfig) -> None:
        self._training_state = "waiting_for_peers"
        need = cfg.peers_to_wait_for
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cfg.start_timeout_s
        while len(self._live_peers()) < need:
            if loop.time() >= deadline:
                log.warning(
                    "event=start_without_peers live=%d wanted=%d waited_s=%g",
                    len(self._live_peers()),
                    need,
                    cfg.start_timeout_s,
                )
                return
            await asyncio.sleep(0.1)

    def _save_model(self, session: TrainingSession, task_name: str) -> None:
        model = session.learner.current_model()
        status = session.status()
        save_model(
            model,
            self.config.data_dir / MODEL_FILE,
            {"task": task_name, "peer_id": str(self.identity.peer_id), **status},
        )

    async def wait(self) -> None:
        """Return when the daemon's services stopped; re-raise a service's failure."""
        if self._supervisor is not None:
            await asyncio.shield(self._supervisor)

    async def aclose(self) -> None:
        """Stop services, save the view, close the transport. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            try:
                await self._supervisor
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception("event=service_failed")
        if self._membership is not None:
            try:
                self._membership.save()
            except OSError as exc:
                log.warning("event=save_failed error=%s", exc.strerror)
        if self._transport is not None:
            await self._transport.aclose()
        log.info("event=stopped")

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

    # -- admin views -------------------------------------------------------------------------
    def status(self) -> dict[str, object]:
        """The ``GET /v1/status`` document."""
        transport = self.transport
        view = self.membership.view
        return {
            "peer_id": str(self.identity.peer_id),
            "version": __version__,
            "listen": (
                transport.direct_addresses[0] if transport.direct_addresses else self.config.listen
            ),
            "addresses": list(transport.addresses),
            "peers": len(view.live()),
            "view": len(view.active),
            "reserve": len(view.passive),
            "uptime_s": round(self.uptime_s, 3),
            "private": self.config.network_key_file is not None,
            "accepted": transport.accepted,
            "refused": transport.refused,
            "bytes_sent": transport.bytes_sent,
            "bytes_received": transport.bytes_received,
            "inflight_bytes": transport.inflight.held,
            "inflight_peak": transport.inflight.peak,
            "busy_refusals": transport.inflight.refused,
            "address_probes": transport.probes,
            "reachable": (
                "unknown" if transport.reachable is None else "yes" if transport.reachable else "no"
            ),
            "relays": sorted(transport.relays.values()),
            "relaying_for": len(transport.relaying_for),
            "relay_forwarded": transport.relay_forwarded,
            "relay_refused": transport.relay_refused,
            **self._training_status(),
        }

    def _training_status(self) -> dict[str, object]:
        if self._session is None:
            return {"training": self._training_state}
        out = self._session.status()
        said = out["training"]
        if said == "idle" or (
            said in ("done", "budget_spent") and self._training_state == "training"
        ):
            # not started yet: say why; or the rounds are over but the model is not saved yet
            out["training"] = self._training_state
        return out

    def peers(self) -> list[dict[str, object]]:
        """The ``GET /v1/peers`` document: the active view, with wall-clock ``last_seen``."""
        now = asyncio.get_running_loop().time()
        wall = time.time()
        out: list[dict[str, object]] = []
        for entry in self.membership.view.active.values():
            state = "suspect" if entry.suspect else "alive" if entry.confirmed else "unconfirmed"
            out.append(
                {
                    "peer_id": str(entry.record.peer_id),
                    "addresses": list(entry.record.addresses),
                    "last_seen": round(wall - (now - entry.last_seen), 3),
                    "state": state,
                }
            )
        return out
