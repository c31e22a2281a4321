"""A round's groups on several cores: group workers, one in this process and the rest spawned.

Groups of one round never exchange a message, and since each group draws its loss and
latency from its own stream (``NetModel.group_stream``), starts with idle uplinks and keeps its
deadlines in the network's tick buckets, what happens inside a group depends only on the group
(its members, their inputs, start times and leave times) and the clock. So the round's groups
can be split among workers, each with its own ``VirtualClockLoop``, ``SimNetwork`` and
``simulator.ticks.PeerRounds`` (the daemon's machines), and the results are the same whatever
the split: one worker or four give byte-identical metrics (tested).

A round takes two steps:

1. ``run``: every worker advances its clock to the round's start ``t0``, runs its groups to
   their end and reports each member's result, the counted peers and the time its last group
   ended;
2. ``settle``: the round ends when the last group of all ended (``t_end``); every worker
   advances to ``t_end``, so that messages still in flight by then are delivered (or found
   lost) there as they would be on one loop, and reports its network counters.

Leaves: the engine passes every pending departure ``(peer, time)`` to every worker each round
(a worker ignores the ones it scheduled in earlier rounds), so each worker's view of who is
online matches the engine's.

The other workers are child interpreters (``python -m simulator._worker``; forking a process
that holds torch is unsafe, and ``multiprocessing``'s spawn would re-import the caller's main
module), started when the pool is made: they build their network while the engine trains the
first round. Jobs and reports are pickled over a socketpair with tensors as numpy arrays
(a torch tensor through ``multiprocessing`` would get its own shared-memory segment).
"""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import torch

from floor.errors import MurmurError
from gossip.deadlines import StageDeadlines
from simulator.clock import VirtualClockLoop
from simulator.config import Scenario
from simulator.network import SimNetwork
from simulator.ticks import PeerRounds

__all__ = ["GroupJob", "GroupOutcome", "GroupPool", "GroupWorker", "Tally", "WorkerFailed"]


class WorkerFailed(MurmurError, RuntimeError):
    """A group worker process failed or went away; the message carries its traceback."""


@dataclass
class GroupJob:
    """One round's work for one worker: its groups and what their members bring."""

    rnd: int
    t0: float
    limit: float  # the round is ended by force at t0 + limit
    groups: list[list[int]]
    # One row per member, in the order of ``groups`` flattened; None for this process's own
    # worker, which is handed the engine's tensors as they are (``GroupWorker.run``).
    vectors: np.ndarray | None
    weights: list[float]
    ready: list[float]  # when each member is ready (same order)
    online: list[bool]  # every peer, at t0
    view: list[int]  # the round's membership snapshot (every worker's peers see the same)
    leaves: list[tuple[int, float]]  # every pending departure (peer, virtual time)
    # Each member's adaptive deadlines (``gossip.deadlines`` state, same order), or None: the
    # members' machines already hold them (one worker), or deadlines do not adapt.
    deadlines: list[bytes] | None = None


@dataclass
class GroupOutcome:
    """What one or all workers report after running a round's groups."""

    finish: float
    forced: bool = False
    # (peers, result row): the peers that end the round with that row (a secure group's
    # members share one result).
    results: list[tuple[list[int], np.ndarray]] = field(default_factory=list)
    counted: set[int] = field(default_factory=set)
    sizes: dict[int, int] = field(default_factory=dict)  # peer -> members its group counted
    aborted: int = 0  # peers whose averaging failed (aborted group)
    busy_s: float = 0.0  # wall seconds the worker spent on the job (for balancing only)
    recovered: int = 0  # peers whose secure group finished by recovering from late drops
    groups: tuple[int, int, int] = (0, 0, 0)  # groups formed, completed, recovered
    quorate: int = 0  # peers whose group aborted although t of its members stayed
    deadlines: dict[int, bytes] = field(default_factory=dict)  # member -> deadline state

    def merge(self, other: GroupOutcome) -> None:
        """Add another worker's outcome of the same round."""
        self.finish = max(self.finish, other.finish)
        self.forced = self.forced or other.forced
        self.results += other.results
        self.counted |= other.counted
        self.sizes.update(other.sizes)
        self.aborted += other.aborted
        self.recovered += other.recovered
        # a group runs in one worker, so the workers' counts add up
        self.quorate += other.quorate
        self.deadlines.update(other.deadlines)
        (f, c, r), (of, oc, orr) = self.groups, other.groups
        self.groups = (f + of, c + oc, r + orr)


@dataclass
class Tally:
    """A network's counters since the start of the run (summed over workers)."""

    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    messages_delivered: int = 0
    messages_lost: int = 0
    refused: int = 0
    timers: int = 0
    retransmissions: int = 0
    peak_rss_mib: float = 0.0

    @classmethod
    def of(cls, net: SimNetwork) -> Tally:
        """``net``'s counters, with this process's peak memory."""
        return cls(
            net.bytes_sent,
            net.bytes_received,
            net.messages_sent,
            net.messages_delivered,
            net.messages_lost,
            net.refused,
            net.timers,
            net.retransmissions,
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        )

    def add(self, other: Tally) -> None:
        """Add another worker's counters (and its peak memory: the processes coexist)."""
        self.bytes_sent += other.bytes_sent
        self.bytes_received += other.bytes_received
        self.messages_sent += other.messages_sent
        self.messages_delivered += other.messages_delivered
        self.messages_lost += other.messages_lost
        self.refused += other.refused
        self.timers += other.timers
        self.retransmissions += other.retransmissions
        self.peak_rss_mib += other.peak_rss_mib


class GroupWorker:
    """Runs the groups it is given on its own virtual clock and simulated network."""

    def __init__(self, scenario: Scenario, *, warm_threads: int = 2) -> None:
        s = scenario
        self.loop = VirtualClockLoop()
        self.online = [True] * s.peers
        self.net = SimNetwork(self.loop, s, s.peers, self.online)
        self.round = PeerRounds(self.net, s, None, warm_threads=warm_threads)
        self._number = 0  # this round's number: callbacks of older rounds are ignored
        self._carried: list[int] = []  # members whose deadline state goes back to the pool
        self._finish = 0.0
        self._forced = False

    def close(self) -> None:
        """Close the loop."""
        self.loop.close()

    def run(self, job: GroupJob, vectors: dict[int, torch.Tensor] | None = None) -> GroupOutcome:
        """Run ``job``'s groups from ``job.t0`` until they all ended (or the round's limit).

        ``vectors`` (peer -> contribution) replaces ``job.vectors`` in the engine's process.
        """
        start = time.perf_counter()
        outcome = self.loop.run_until_complete(self._run(job, vectors))
        outcome.busy_s = time.perf_counter() - start
        return outcome

    def settle(self, t_end: float) -> Tally:
        """Advance to the round's end ``t_end`` (delivering what arrives by then); counters."""
        self.loop.run_until_complete(self._until(t_end))
        return Tally.of(self.net)

    async def _until(self, when: float) -> None:
        loop = self.loop
        if loop.time() < when:
            reached = loop.create_future()
            loop.call_at(when, reached.set_result, None)
            await reached

    async def _run(self, job: GroupJob, vectors: dict[int, torch.Tensor] | None) -> GroupOutcome:
        loop, net, rnd = self.loop, self.net, self.round
        await self._until(job.t0)
        self.online[:] = job.online
        self._number += 1
        number = self._number
        self._finish, self._forced = job.t0, False
        ended = loop.create_future()

        def done() -> None:
            self._finish = loop.time()
            if not ended.done():
                ended.set_result(None)

        order = [p for peers in job.groups for p in peers]
        rows: Sequence[torch.Tensor]
        if vectors is not None:
            rows = [vectors[p] for p in order]
        elif job.vectors is not None and order:
            rows = torch.from_numpy(job.vectors).unbind(0)
        else:
            rows = ()
        contributions = {p: (row, w) for p, row, w in zip(order, rows, job.weights, strict=True)}
        ready = dict(zip(order, job.ready, strict=True))
        self._carried = order if job.deadlines is not None else []
        if job.deadlines is not None:  # each member goes on from what it learned elsewhere
            for p, state in zip(order, job.deadlines, strict=True):
                _deadlines(rnd.machines[p]).restore(state)
        rnd.begin(job.rnd, order, contributions, ready, done, view=job.view, mine=set(order))
        for p, when in job.leaves:
            net.call_at(when, self._leave, p, number)
        net.call_at(job.t0 + job.limit, self._cap, number)
        await ended
        return self._outcome()

    def _leave(self, p: int, number: int) -> None:
        if number == self._number and self.online[p]:
            self.online[p] = False
            self.round.peer_left(p)

    def _cap(self, number: int) -> None:
        if number == self._number and not self.round.all_done:
            self._forced = True
            self.round.force_finish()

    def _outcome(self) -> GroupOutcome:
        rnd = self.round
        shared: dict[int, tuple[list[int], np.ndarray]] = {}
        for p, theta in rnd.results.items():
            entry = shared.get(id(theta))
            if entry is None:
                shared[id(theta)] = ([p], theta.numpy())
            else:
                entry[0].append(p)
        return GroupOutcome(
            self._finish,
            self._forced,
            list(shared.values()),
            set(rnd.counted),
            dict(rnd.sizes),
            rnd.failed,
            recovered=rnd.recovered,
            groups=rnd.group_counts,
            quorate=rnd.failed_with_quorum,
            deadlines={p: _deadlines(rnd.machines[p]).state() for p in self._carried},
        )


def _serve(conn: Connection) -> None:
    """A worker process's main loop: a scenario first, then ``("run", job)`` /
    ``("settle", t_end)`` until ``("stop", None)`` or the pipe closes."""
    # Ctrl-C reaches the whole process group: the engine handles it and stops this worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    scenario = _load(conn.recv_bytes())
    worker = GroupWorker(Scenario(**scenario), warm_threads=1)
    gc.collect()
    gc.freeze()  # as the engine does: the keys and peers built so far live for the whole run
    gc.set_threshold(20_000, 20, 20)
    while True:
        try:
            kind, arg = _load(conn.recv_bytes())
        except (EOFError, OSError):
            return
        if kind == "stop":
            return
        try:
            reply: Any = ("ok", worker.run(arg) if kind == "run" else worker.settle(arg))
        except Exception:  # reported to the engine, which raises it as WorkerFailed
            reply = ("error", traceback.format_exc())
        try:
            conn.send_bytes(pickle.dumps(reply, protocol=5))
        except OSError:  # the engine is gone (it stopped, or failed elsewhere)
            return


def _load(data: bytes) -> Any:
    # Only ever the other end of our own socketpair (parent <-> the worker it started).
    return pickle.loads(data)  # noqa: S301


class _Remote:
    """A ``GroupWorker`` in a child process (``python -m simulator._worker FD``), behind a
    socketpair: a fresh interpreter, so it neither forks a process that holds torch's threads
    nor re-imports the caller's main module as ``multiprocessing``'s spawn would."""

    def __init__(self, scenario: Scenario, index: int) -> None:
        ours, theirs = socket.socketpair()
        root = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        self.name = f"group worker {index}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "simulator._worker", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            env=env,
        )
        theirs.close()
        self.conn = Connection(ours.detach())
        self._writer: threading.Thread | None = None
        self._write_error: OSError | None = None
        self.conn.send_bytes(pickle.dumps(scenario.to_dict(), protocol=5))

    def send(self, kind: str, arg: Any) -> None:
        """Send one request. The write happens on a thread (it releases the GIL), so that this
        process starts its own share of the round while a large job is still being read."""
        self._wait_sent()
        data = pickle.dumps((kind, arg), protocol=5)
        self._writer = threading.Thread(target=self._write, args=(data,), daemon=True)
        self._writer.start()

    def _write(self, data: bytes) -> None:
        try:
            self.conn.send_bytes(data)
        except OSError as exc:
            self._write_error = exc

    def _wait_sent(self) -> None:
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._write_error is not None:
            exc, self._write_error = self._write_error, None
            raise WorkerFailed(f"{self.name} went away ({exc})") from exc

    def receive(self) -> Any:
        self._wait_sent()
        try:
            status, value = _load(self.conn.recv_bytes())
        except (EOFError, OSError) as exc:
            code = self.process.poll()
            raise WorkerFailed(f"{self.name} went away (exit status {code})") from exc
        if status != "ok":
            raise WorkerFailed(f"{self.name} failed:\n{value}")
        return value

    def close(self) -> None:
        with contextlib.suppress(OSError, WorkerFailed):
            self._wait_sent()
            self.conn.send_bytes(pickle.dumps(("stop", None), protocol=5))
        self.conn.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class GroupPool:
    """Runs each round's groups on ``workers`` workers: this process and ``workers - 1``
    spawned ones. Use as a context manager (the spawned workers are stopped at exit)."""

    def __init__(self, scenario: Scenario, workers: int) -> None:
        self.workers = max(1, workers)
        self._carry = self.workers > 1 and scenario.adaptive_deadlines
        self._deadlines: dict[int, bytes] = {}  # peer -> its adaptive deadline state
        # Balancing: wall seconds per member of group work, and this process's own work
        # between two rounds (training, metrics), which the other workers do not share.
        self._per_member = 0.0
        self._serial = 0.0
        self._returned: float | None = None
        self._remotes: list[_Remote] = []
        try:
            for i in range(1, self.workers):
                self._remotes.append(_Remote(scenario, i))
            self.local = GroupWorker(scenario, warm_threads=2 if self.workers == 1 else 1)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> GroupPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the spawned workers."""
        for remote in self._remotes:
            remote.close()
        self._remotes = []
        if hasattr(self, "local"):
            self.local.close()

    def run(
        self,
        rnd: int,
        t0: float,
        limit: float,
        groups: Sequence[list[int]],
        contributions: dict[int, tuple[torch.Tensor, float]],
        ready: dict[int, float],
        online: list[bool],
        view: list[int],
        leaves: list[tuple[int, float]],
    ) -> GroupOutcome:
        """Run one round's groups, split among the workers; the merged outcome."""
        if self._returned is not None:
            self._serial = _smooth(self._serial, time.perf_counter() - self._returned)
        parts = self._split(groups)
        jobs = [
            self._job(rnd, t0, limit, part, contributions, ready, online, view, leaves, i > 0)
            for i, part in enumerate(parts)
        ]
        if self._carry:  # a peer's groups move between workers: its deadlines go along
            known = self._deadlines
            for job in jobs:
                job.deadlines = [known.get(p, b"") for g in job.groups for p in g]
        for remote, job in zip(self._remotes, jobs[1:], strict=True):
            remote.send("run", job)
        mine = {p: contributions[p][0] for g in parts[0] for p in g}
        outcome = self.local.run(jobs[0], mine)
        members = sum(len(g) for g in parts[0])
        busy = outcome.busy_s
        for remote, part in zip(self._remotes, parts[1:], strict=True):
            other = remote.receive()
            busy += other.busy_s
            members += sum(len(g) for g in part)
            outcome.merge(other)
        self._deadlines.update(outcome.deadlines)
        if members:
            self._per_member = _smooth(self._per_member, busy / members)
        self._returned = time.perf_counter()
        return outcome

    def _split(self, groups: Sequence[list[int]]) -> list[list[list[int]]]:
        """Deal the groups out so that every worker finishes at about the same time: this
        process also does the work between rounds, so it takes fewer members. (Which worker
        runs a group never changes the results.)"""
        w = self.workers
        if w == 1:
            return [list(groups)]
        total = sum(len(g) for g in groups)
        work = self._per_member * total
        share = 1.0 / w
        if work > 0.0:
            # local * work + serial = remote * work, local + (w - 1) * remote = 1
            remote = min(1.0 / (w - 1), (1.0 + self._serial / work) / w)
            share = max(0.0, 1.0 - (w - 1) * remote)
        parts: list[list[list[int]]] = [[] for _ in range(w)]
        target, taken, turn = share * total, 0, 0
        for group in groups:
            if taken + len(group) / 2 <= target:
                parts[0].append(group)
                taken += len(group)
            else:
                parts[1 + turn % (w - 1)].append(group)
                turn += 1
        return parts

    def settle(self, t_end: float) -> Tally:
        """End the round at ``t_end`` in every worker; the summed counters."""
        for remote in self._remotes:
            remote.send("settle", t_end)
        tally = self.local.settle(t_end)
        for remote in self._remotes:
            tally.add(remote.receive())
        return tally

    @staticmethod
    def _job(
        rnd: int,
        t0: float,
        limit: float,
        groups: list[list[int]],
        contributions: dict[int, tuple[torch.Tensor, float]],
        ready: dict[int, float],
        online: list[bool],
        view: list[int],
        leaves: list[tuple[int, float]],
        remote: bool,
    ) -> GroupJob:
        order = [p for peers in groups for p in peers]
        vectors = None
        if remote:
            vectors = (
                torch.stack([contributions[p][0] for p in order]).numpy()
                if order
                else np.zeros((0, 0), dtype=np.float32)
            )
        return GroupJob(
            rnd,
            t0,
            limit,
            groups,
            vectors,
            [contributions[p][1] for p in order],
            [ready[p] for p in order],
            list(online),
            view,
            leaves,
        )


def _deadlines(machine: object) -> StageDeadlines:
    found = getattr(machine, "deadlines", None)
    if not isinstance(found, StageDeadlines):  # pragma: no cover - hash groups only
        raise WorkerFailed("a group worker's machine has no stage deadlines")
    return found


def serve_fd(fd: int) -> None:
    """Serve the engine on the socket ``fd`` (the worker process's entry point)."""
    _serve(Connection(fd))


def _smooth(old: float, new: float) -> float:
    """An exponential moving average (the first value taken as is)."""
    return new if old == 0.0 else 0.7 * old + 0.3 * new
