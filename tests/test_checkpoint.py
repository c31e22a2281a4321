"""Durable training state (gossip.checkpoint): a restarted peer resumes its learning, and the
privacy budget and the checkpoint agree after a crash at any point of a round.

A "crash" is simulated at every write step of a round (each ``os.fsync`` and ``os.replace``
of the budget's and the checkpoint's atomic replacements): a ``BaseException`` leaves the files
exactly as a kill at that instant would (the writes are synchronous), then a new learner,
budget and session are built on the same directory, as ``murmur start`` would. A corrupt
checkpoint is a ``CheckpointError`` naming the file, never a fresh start.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from test_gossip_service import NoNet, Scripted, evaluator

from dp.budget import Budget
from floor.errors import BudgetStateError, CheckpointError, GroupFormationFailed
from gossip.checkpoint import CHECKPOINT_FILE, MAGIC, read_checkpoint, write_checkpoint
from gossip.ideal import build_learners
from gossip.learner import Learner, TrainConfig
from gossip.privacy import NoiseMode, PrivacyConfig, PrivacyUnit
from gossip.service import InlineExecutor, TrainingSession
from gossip.tasks import Task, make_task
from simulator.clock import new_virtual_loop

EPS = 8.0
DELTA = 1e-5


@pytest.fixture(scope="module")
def digits() -> Task:
    return make_task("digits", model="logreg")


def privacy(distributed: bool = False) -> PrivacyConfig:
    return PrivacyConfig(
        unit=PrivacyUnit.PEER,
        epsilon=EPS,
        delta=DELTA,
        rounds=6,
        noise=NoiseMode.DISTRIBUTED if distributed else NoiseMode.LOCAL,
        shares=3 if distributed else 1,
    )


def peer(
    task: Task,
    folder: Path,
    averager: Any,
    *,
    rounds: int = 6,
    distributed: bool = False,
    meta: dict[str, str] | None = None,
) -> TrainingSession:
    """One peer as a daemon builds it on ``folder``: a persistent budget, then the session
    with its checkpoint (resumed if the file is there)."""
    base = build_learners(task, 3, privacy=privacy(distributed), train=TrainConfig(lr=0.3), seed=4)[
        0
    ]
    budget = Budget.persistent(EPS, DELTA, folder / "privacy_budget.json")
    learner = Learner(
        base.model,
        base.x,
        base.y,
        train=base.train_config,
        privacy=base.privacy,
        generator=torch.Generator().manual_seed(9),
        budget=budget,
    )
    return TrainingSession(
        NoNet(),  # type: ignore[arg-type]
        learner,
        averager,
        rounds=rounds,
        evaluate=evaluator(task),
        executor=InlineExecutor(),
        checkpoint=folder / CHECKPOINT_FILE,
        checkpoint_meta=meta if meta is not None else {"task": "digits"},
    )


def run(coro: Any) -> Any:
    with asyncio.Runner(loop_factory=new_virtual_loop) as runner:
        return runner.run(coro)


def shifted(shift: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda v: v + shift


class Averaging(Scripted):
    """Scripted outcomes; a round without a script returns the contribution itself."""


class Crash(BaseException):
    """A kill at this instant (not an Exception: nothing in the session catches it)."""


@contextmanager
def crash_at(step: int | None) -> Iterator[list[str]]:
    """Count every fsync and replace; raise Crash on the ``step``-th (1-based)."""
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def counted(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            calls.append(name)
            if step is not None and len(calls) == step:
                raise Crash(f"{name} #{step}")
            return real(*args)

        return call

    os.fsync = counted("fsync", real_fsync)  # type: ignore[assignment]
    os.replace = counted("replace", real_replace)  # type: ignore[assignment]
    try:
        yield calls
    finally:
        os.fsync, os.replace = real_fsync, real_replace  # type: ignore[assignment]


def spends(folder: Path) -> int:
    return Budget(EPS, DELTA, folder / "privacy_budget.json").spends


def test_a_restarted_peer_resumes_model_counters_and_metrics(digits: Task, tmp_path: Path) -> None:
    session = peer(digits, tmp_path, Averaging({}))
    run(session.run_round())
    run(session.run_round())
    before = session.status()
    theta = session.learner.theta
    assert (tmp_path / CHECKPOINT_FILE).exists()

    again = peer(digits, tmp_path, Averaging({}))
    st = again.status()
    assert again.resumed_round == 2 and again.resumed_unpaid == 0
    assert torch.equal(again.learner.theta, theta)
    for key in ("round", "contributions", "epsilon_spent", "accuracy", "loss", "ok_rounds"):
        assert st[key] == before[key], key
    assert again.learner.rounds_contributed == spends(tmp_path) == 2
    # it goes on from there: round 3, one more spend
    report = run(again.run_round())
    assert report.round == 3 and again.learner.rounds_contributed == 3 == spends(tmp_path)


def test_every_crash_point_of_a_round_leaves_budget_and_checkpoint_agreeing(
    digits: Task, tmp_path: Path
) -> None:
    base = tmp_path / "base"
    base.mkdir()
    first = peer(digits, base, Averaging({}))
    run(first.run_round())
    theta1 = first.learner.theta
    with crash_at(None) as calls:  # how many write steps one round takes
        run(peer(digits, copy(base, tmp_path / "count"), Averaging({})).run_round())
    steps = len(calls)
    assert steps == 6, calls  # budget: fsync, replace, fsync of the dir; checkpoint: the same

    outcomes: set[tuple[int, int]] = set()
    for step in range(1, steps + 1):
        folder = copy(base, tmp_path / f"crash{step}")
        crashed = peer(digits, folder, Averaging({}))
        with crash_at(step), pytest.raises(Crash):
            run(crashed.run_round())
        back = peer(digits, folder, Averaging({}))  # the restart
        paid = spends(folder)
        assert paid in (1, 2), step
        assert back.learner.rounds_contributed == paid, step  # the budget is the truth
        assert back.learner.epsilon_spent <= EPS
        if back.round == 2:  # the round's checkpoint landed: its result is kept
            assert paid == 2 and back.resumed_unpaid == 0
            assert not torch.equal(back.learner.theta, theta1)
        else:  # it did not: the model of round 1, and a paid contribution counted as made
            assert back.round == 1 and torch.equal(back.learner.theta, theta1), step
            assert back.resumed_unpaid == paid - 1
        outcomes.add((back.round, paid))
        # and it keeps going without a double spend
        run(back.run_round())
        assert spends(folder) == paid + 1 == back.learner.rounds_contributed
    assert outcomes == {(1, 1), (1, 2), (2, 2)}, outcomes  # every window was hit


def test_an_unsent_contribution_is_offered_again_after_a_restart_but_never_twice(
    digits: Task, tmp_path: Path
) -> None:
    base = tmp_path / "base"
    base.mkdir()
    nobody = Averaging({1: GroupFormationFailed("nobody came")})
    first = peer(digits, base, nobody)
    assert run(first.run_round()).status == "no_group"
    unsent = nobody.vectors[0]
    assert spends(base) == 1

    resumed = Averaging({})
    back = peer(digits, copy(base, tmp_path / "plain"), resumed)
    run(back.run_round())
    assert torch.equal(resumed.vectors[0], unsent)  # the same contribution, not paid again
    assert spends(tmp_path / "plain") == 1 and back.learner.rounds_contributed == 1

    with crash_at(None) as calls:
        run(peer(digits, copy(base, tmp_path / "count"), Averaging({})).run_round())
    for step in range(1, len(calls) + 1):
        folder = copy(base, tmp_path / f"crash{step}")
        crashed_avg, restarted_avg = Averaging({}), Averaging({})
        with crash_at(step), pytest.raises(Crash):
            run(peer(digits, folder, crashed_avg).run_round())
        restarted = peer(digits, folder, restarted_avg)
        if not restarted.finished:
            run(restarted.run_round())
        offered = [v for v in crashed_avg.vectors + restarted_avg.vectors if torch.equal(v, unsent)]
        assert len(offered) <= 1, f"the unsent contribution left twice (crash at step {step})"
        assert spends(folder) == restarted.learner.rounds_contributed


def test_distributed_noise_shares_of_lost_rounds_count_as_the_worst_case(
    digits: Task, tmp_path: Path
) -> None:
    session = peer(digits, tmp_path, Averaging({}), distributed=True)
    checkpointed = session.checkpoint_state()["learner"]
    # a contribution paid for after the checkpoint: its round never reported what it counted
    session.learner.budget.spend(session.learner.plan.event)  # type: ignore[union-attr]
    learner = session.learner
    extra = learner.load_state_dict(checkpointed)
    assert extra == 1 and learner.rounds_contributed == 1
    dist = learner.plan.distributed
    assert dist is not None and learner.state_dict()["shares"] == [dist.shares]


@pytest.mark.parametrize("damage", ["flip", "truncate", "magic", "empty", "not-a-state"])
def test_a_corrupt_checkpoint_is_an_error_naming_the_file(
    digits: Task, tmp_path: Path, damage: str
) -> None:
    session = peer(digits, tmp_path, Averaging({}))
    run(session.run_round())
    path = tmp_path / CHECKPOINT_FILE
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0x01
    elif damage == "truncate":
        raw = raw[: len(raw) - 100]
    elif damage == "magic":
        raw[:4] = b"JUNK"
    elif damage == "empty":
        raw = bytearray()
    path.write_bytes(bytes(raw))
    if damage == "not-a-state":
        write_checkpoint(path, {"meta": {"task": "digits"}, "session": 3})
    with pytest.raises(CheckpointError, match=str(path)):
        peer(digits, tmp_path, Averaging({}))


def test_a_checkpoint_of_another_task_or_model_is_refused(digits: Task, tmp_path: Path) -> None:
    run(peer(digits, tmp_path, Averaging({})).run_round())
    with pytest.raises(CheckpointError, match="task 'digits', not 'credit'"):
        peer(digits, tmp_path, Averaging({}), meta={"task": "credit"})
    state = read_checkpoint(tmp_path / CHECKPOINT_FILE)
    assert state is not None
    state["learner"]["parameters"] = 7
    state["learner"]["theta"] = torch.zeros(7)
    write_checkpoint(tmp_path / CHECKPOINT_FILE, state)
    with pytest.raises(CheckpointError, match="another model"):
        peer(digits, tmp_path, Averaging({}))


def test_a_budget_older_than_the_checkpoint_is_refused(digits: Task, tmp_path: Path) -> None:
    session = peer(digits, tmp_path, Averaging({}))
    run(session.run_round())
    old = (tmp_path / "privacy_budget.json").read_bytes()
    run(session.run_round())
    (tmp_path / "privacy_budget.json").write_bytes(old)  # restored from a stale backup
    with pytest.raises(CheckpointError, match="budget file is older"):
        peer(digits, tmp_path, Averaging({}))


def test_a_missing_budget_beside_a_checkpoint_is_refused(digits: Task, tmp_path: Path) -> None:
    run(peer(digits, tmp_path, Averaging({})).run_round())
    (tmp_path / "privacy_budget.json").unlink()
    with pytest.raises(BudgetStateError):  # the marker says a budget was there
        peer(digits, tmp_path, Averaging({}))


def test_the_file_starts_with_its_magic_and_a_missing_file_is_a_fresh_start(
    tmp_path: Path,
) -> None:
    assert read_checkpoint(tmp_path / "none.pt") is None
    write_checkpoint(tmp_path / "c.pt", {"x": torch.arange(3)})
    assert (tmp_path / "c.pt").read_bytes()[: len(MAGIC)] == MAGIC
    got = read_checkpoint(tmp_path / "c.pt")
    assert got is not None and torch.equal(got["x"], torch.arange(3))
    assert oct((tmp_path / "c.pt").stat().st_mode & 0o777) == oct(0o600)


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
