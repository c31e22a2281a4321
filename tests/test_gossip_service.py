"""The training round loop (gossip.service) over p2p's in-memory transport, on a virtual clock.

Covers: peers train digits with secure group averaging and every round completes; failed rounds
(no group, abort, timeout, diverged training) are counted and never applied; a spent budget
stops contributing; training in the default executor leaves the event loop free; byte counters;
model files round-trip without pickle.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from dp.accounting import compute_epsilon
from floor.envelope import EnvelopeCodec
from floor.errors import (
    AggregationAborted,
    BudgetExhausted,
    ConfigError,
    GroupFormationFailed,
    PeerUnreachable,
)
from floor.identity import Identity, PeerId
from floor.transport.memory import MemoryNetwork, MemoryTransport
from gossip.driver import Driver
from gossip.ideal import build_learners
from gossip.learner import Learner, TrainConfig
from gossip.machine import AverageResult
from gossip.messages import MESSAGE_TYPES
from gossip.network import GossipHandler, StaticView, TransportNetwork
from gossip.privacy import PrivacyConfig, PrivacyUnit
from gossip.run import build_machine
from gossip.service import (
    ANY_ROUND,
    InlineExecutor,
    RoundReport,
    TrainingSession,
    load_state,
    save_model,
)
from gossip.spec import RunSpec
from gossip.tasks import Task, make_task
from simulator.clock import new_virtual_loop


def run(coro_fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run on the virtual clock: deadlines cost no wall time."""
    with asyncio.Runner(loop_factory=new_virtual_loop) as runner:
        return runner.run(coro_fn())


@pytest.fixture(scope="module")
def digits() -> Task:
    return make_task("digits", model="logreg")


def evaluator(task: Task) -> Callable[[nn.Module], tuple[float, float]]:
    def evaluate(model: nn.Module) -> tuple[float, float]:
        ev = task.evaluate(model)
        return ev.loss, ev.metric

    return evaluate


class Scripted:
    """An Averager whose outcome per round is scripted: a vector to return, or an error."""

    name = "scripted"

    def __init__(self, outcomes: dict[int, Tensor | Exception | float]) -> None:
        self.outcomes = outcomes
        self.calls: list[int] = []
        self.vectors: list[Tensor] = []

    async def average(self, vector: Tensor, weight: float, round: int) -> AverageResult:
        self.calls.append(round)
        self.vectors.append(vector.clone())
        outcome = self.outcomes.get(round, vector)
        if isinstance(outcome, Exception):
            raise outcome
        if isinstance(outcome, float):  # hang this long (loop clock)
            await asyncio.sleep(outcome)
            outcome = vector
        return AverageResult(outcome.clone(), weight, 3, round)


class NoNet:
    """A Network stub for sessions whose averager never uses the network."""

    @property
    def local_id(self) -> PeerId:
        return Identity.from_seed(b"n" * 32).peer_id

    async def send(self, peer: PeerId, message: Any, *, timeout: float | None = None) -> None:
        raise PeerUnreachable("no network")

    async def request(self, peer: PeerId, message: Any, *, timeout: float | None = None) -> Any:
        raise PeerUnreachable("no network")

    def register(self, message_type: type, handler: GossipHandler) -> None:
        pass

    def unregister(self, message_type: type) -> None:
        pass

    def view(self) -> list[PeerId]:
        return []

    def time(self) -> float:
        return asyncio.get_running_loop().time()


def one_learner(task: Task, **privacy: Any) -> Learner:
    cfg = PrivacyConfig(**privacy) if privacy else PrivacyConfig.none()
    return build_learners(task, 4, privacy=cfg, train=TrainConfig(lr=0.3), seed=3)[0]


def test_peers_train_with_secure_group_averaging(digits: Task) -> None:
    n, rounds = 5, 4
    learners = build_learners(
        digits,
        n,
        privacy=PrivacyConfig.none(),
        train=TrainConfig(lr=0.3),
        scheme="dirichlet",
        seed=1,
    )

    async def main() -> tuple[list[list[RoundReport]], list[TrainingSession], list[int], list[int]]:
        memory = MemoryNetwork()
        ids = [Identity.from_seed(hashlib.sha256(b"svc%d" % i).digest()) for i in range(n)]
        transports = [
            MemoryTransport(EnvelopeCodec(i, message_types=MESSAGE_TYPES), memory) for i in ids
        ]
        for t in transports:
            for u in transports:
                t.set_addresses(u.local_id, u.addresses, verified=True)
        view = StaticView([i.peer_id for i in ids])
        sessions = []
        for ident, transport, learner in zip(ids, transports, learners, strict=True):
            net = TransportNetwork(transport, view)
            spec = RunSpec(group_size=n, stage_timeout_s=1.0, privacy="none")
            machine = build_machine(spec, seed=ident.seed(), me=ident.peer_id.raw)
            averager = Driver(net, machine)
            sessions.append(
                TrainingSession(
                    net,
                    learner,
                    averager,
                    rounds=rounds,
                    evaluate=evaluator(digits),
                    executor=InlineExecutor(),
                )
            )
        reports = await asyncio.gather(*(s.run() for s in sessions))
        sent = [t.bytes_sent for t in transports]
        received = [t.bytes_received for t in transports]
        for t in transports:
            await t.aclose()
        return list(reports), sessions, sent, received

    reports, sessions, sent, received = run(main)
    for session, peer_reports in zip(sessions, reports, strict=True):
        assert [r.round for r in peer_reports] == list(range(1, rounds + 1))
        assert all(r.status == "ok" for r in peer_reports), peer_reports
        assert all(r.group_size >= 3 for r in peer_reports)
        assert all(r.bytes_sent > 0 and r.bytes_received > 0 for r in peer_reports)
        status = session.status()
        assert status["round"] == rounds and status["training"] == "done"
        assert status["aborted_rounds"] == 0 and status["privacy_unit"] == "none"
        assert status["algorithm"] == "secure"
        assert status["stage_timeouts_s"] == [1.0] * 5  # fixed: every stage's is stage_timeout_s
        initial = session.initial_accuracy
        assert initial is not None and session.accuracy is not None
        assert session.accuracy > initial + 0.3
    # one group of all 5 every round: everyone ends with the same model
    thetas = [s.learner.theta for s in sessions]
    assert all(torch.equal(t, thetas[0]) for t in thetas)
    # in memory every envelope sent is received, replies included
    assert sum(sent) == sum(received) > 0


@pytest.mark.parametrize(
    ("failure", "status"),
    [
        (GroupFormationFailed("nobody around"), "no_group"),
        (AggregationAborted("2 of 5 left"), "aborted"),
        (PeerUnreachable("gone"), "aborted"),
        (1e6, "aborted"),  # hangs past round_timeout_s
    ],
)
def test_failed_round_is_counted_and_not_applied(
    digits: Task, failure: Exception | float, status: str, caplog: pytest.LogCaptureFixture
) -> None:
    learner = one_learner(digits)
    averager = Scripted({2: failure})

    async def main() -> tuple[Tensor, Tensor, list[RoundReport], TrainingSession]:
        session = TrainingSession(
            NoNet(),
            learner,
            averager,
            rounds=3,
            evaluate=evaluator(digits),
            executor=InlineExecutor(),
            round_timeout_s=30.0,
        )
        first = await session.run_round()
        before = learner.theta
        second = await session.run_round()
        after = learner.theta
        third = await session.run_round()
        return before, after, [first, second, third], session

    before, after, reports, session = run(main)
    assert [r.status for r in reports] == ["ok", status, "ok"]
    assert torch.equal(before, after)  # the failed round kept the model
    failed = reports[1]
    assert failed.error and failed.group_size == 0
    assert failed.accuracy == reports[0].accuracy  # the unchanged model's values
    st = session.status()
    key = "no_group_rounds" if status == "no_group" else "aborted_rounds"
    assert st[key] == 1 and st["ok_rounds"] == 2 and st["last_error"] == failed.error
    assert "event=round_failed round=2/3" in caplog.text
    assert learner.status()["results_applied"] == 2
    if status == "no_group":  # nothing left the peer: the same contribution is offered again
        assert learner.rounds_contributed == 2
        assert torch.equal(averager.vectors[2], averager.vectors[1])
    else:  # the contribution may have left: train and spend afresh
        assert learner.rounds_contributed == 3
        assert not torch.equal(averager.vectors[2], averager.vectors[1])


def test_rounds_not_in_lockstep_ask_for_any_group(digits: Task) -> None:
    averagers = [Scripted({}), Scripted({})]

    async def main() -> None:
        for averager, lockstep in zip(averagers, (True, False), strict=True):
            session = TrainingSession(
                NoNet(),
                one_learner(digits),
                averager,
                rounds=3,
                executor=InlineExecutor(),
                lockstep=lockstep,
            )
            await session.run()

    run(main)
    assert averagers[0].calls == [1, 2, 3]
    assert averagers[1].calls == [ANY_ROUND] * 3


def test_round_timeout_uses_the_loop_clock(digits: Task) -> None:
    learner = one_learner(digits)
    averager = Scripted({1: 100.0})

    async def main() -> RoundReport:
        session = TrainingSession(
            NoNet(),
            learner,
            averager,
            rounds=1,
            executor=InlineExecutor(),
            round_timeout_s=5.0,
        )
        return await session.run_round()

    report = run(main)  # 100 virtual seconds of hanging cost no wall time
    assert report.status == "aborted" and "timed out after 5 s" in (report.error or "")
    assert report.duration_s == pytest.approx(5.0)


def test_spent_budget_stops_contributing(digits: Task, caplog: pytest.LogCaptureFixture) -> None:
    z, delta = 2.0, 1e-5
    two = compute_epsilon(noise_multiplier=z, rounds=2, delta=delta, sample_rate=1.0)
    three = compute_epsilon(noise_multiplier=z, rounds=3, delta=delta, sample_rate=1.0)
    cap = (two + three) / 2  # exactly two contributions fit
    learner = one_learner(
        digits, unit=PrivacyUnit.PEER, epsilon=cap, noise_multiplier=z, delta=delta
    )
    averager = Scripted({})

    async def main() -> tuple[list[RoundReport], TrainingSession]:
        session = TrainingSession(
            NoNet(),
            learner,
            averager,
            rounds=6,
            executor=InlineExecutor(),
        )
        return await session.run(), session

    reports, session = run(main)
    assert [r.status for r in reports] == ["ok", "ok", "budget_spent"]
    assert averager.calls == [1, 2]  # no group joined without a contribution
    assert learner.rounds_contributed == 2
    assert reports[-1].epsilon == pytest.approx(two) and two <= cap
    st = session.status()
    assert st["budget_spent"] is True and st["training"] == "budget_spent"
    assert st["epsilon_spent"] == pytest.approx(two) and st["epsilon_budget"] == cap
    assert session.finished and "event=budget_spent" in caplog.text
    with pytest.raises(ConfigError):
        run(session.run_round)


def test_status_says_budget_spent_only_once_that_round_is_counted(digits: Task) -> None:
    """The learner finds the budget spent mid-round (in the executor); a status read at that
    moment must still say the round is running, not "budget spent" with the round uncounted."""
    z, delta = 2.0, 1e-5
    one = compute_epsilon(noise_multiplier=z, rounds=1, delta=delta, sample_rate=1.0)
    two = compute_epsilon(noise_multiplier=z, rounds=2, delta=delta, sample_rate=1.0)
    learner = one_learner(
        digits, unit=PrivacyUnit.PEER, epsilon=(one + two) / 2, noise_multiplier=z, delta=delta
    )
    seen: list[dict[str, object]] = []
    session = TrainingSession(NoNet(), learner, Scripted({}), rounds=4, executor=InlineExecutor())
    update = learner.local_update

    def watched() -> Any:
        try:
            return update()
        except BudgetExhausted:
            seen.append(session.status())  # the learner knows; the round is not counted yet
            raise

    learner.local_update = watched  # type: ignore[method-assign]
    reports = run(session.run)
    assert [r.status for r in reports] == ["ok", "budget_spent"]
    assert seen and seen[0]["training"] == "training" and seen[0]["budget_spent"] is False
    assert seen[0]["round"] == 1
    st = session.status()
    assert st["training"] == "budget_spent" and st["budget_spent"] is True and st["round"] == 2


def test_diverged_training_is_an_aborted_round(digits: Task) -> None:
    learner = one_learner(digits)
    learner.loss_fn = lambda out, y: out.sum() * float("nan")  # NaN gradients

    async def main() -> RoundReport:
        session = TrainingSession(
            NoNet(),
            learner,
            Scripted({}),
            rounds=1,
            executor=InlineExecutor(),
        )
        return await session.run_round()

    report = run(main)
    assert report.status == "aborted" and "TrainingError" in (report.error or "")


async def test_training_does_not_stall_the_event_loop(digits: Task) -> None:
    """Local training blocks until a coroutine on the loop has run: possible only if the
    training runs off the loop (the session's default executor)."""
    loop_ran = threading.Event()

    def loss_needing_the_loop(out: Tensor, y: Tensor) -> Tensor:
        if not loop_ran.wait(timeout=10.0):
            raise RuntimeError("the event loop was stalled by training")
        return torch.nn.functional.cross_entropy(out, y)

    learner = one_learner(digits)
    learner.loss_fn = loss_needing_the_loop

    async def set_from_loop() -> None:
        await asyncio.sleep(0.01)
        loop_ran.set()

    session = TrainingSession(NoNet(), learner, Scripted({}), rounds=1)
    try:
        report, _ = await asyncio.gather(session.run_round(), set_from_loop())
    finally:
        session.close()
    assert report.status == "ok"


def test_inline_executor_would_stall_it(digits: Task) -> None:
    """The control for the test above: run inline, the loop cannot set the event."""
    loop_ran = threading.Event()

    def loss_needing_the_loop(out: Tensor, y: Tensor) -> Tensor:
        if not loop_ran.wait(timeout=0.2):
            raise RuntimeError("the event loop was stalled by training")
        return torch.nn.functional.cross_entropy(out, y)

    learner = one_learner(digits)
    learner.loss_fn = loss_needing_the_loop

    async def main() -> None:
        async def set_from_loop() -> None:
            await asyncio.sleep(0.01)
            loop_ran.set()

        session = TrainingSession(
            NoNet(),
            learner,
            Scripted({}),
            rounds=1,
            executor=InlineExecutor(),
        )
        await asyncio.gather(session.run_round(), set_from_loop())

    with pytest.raises(RuntimeError, match="stalled"):
        asyncio.run(main())


def test_bad_arguments_are_refused(digits: Task) -> None:
    learner = one_learner(digits)
    with pytest.raises(ConfigError):
        TrainingSession(NoNet(), learner, Scripted({}), rounds=0)
    with pytest.raises(ConfigError):
        TrainingSession(NoNet(), learner, Scripted({}), rounds=1, round_timeout_s=0.0)


def test_model_file_round_trip(tmp_path: Path, digits: Task) -> None:
    model = digits.build_model(5)
    path = tmp_path / "model.pt"
    save_model(model, path, {"round": 3, "accuracy": 0.5})
    state = load_state(path)
    fresh = digits.build_model(6)
    fresh.load_state_dict(state)
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)
    assert '"round": 3' in path.with_suffix(".json").read_text()
    # anything but a state dict of tensors is refused (and never unpickled as code)
    torch.save({"weights": [1, 2]}, tmp_path / "bad.pt")
    with pytest.raises(ConfigError):
        load_state(tmp_path / "bad.pt")
    with pytest.raises(ConfigError):
        load_state(tmp_path / "missing.pt")
