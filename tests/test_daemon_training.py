"""Acceptance: 5 daemons on 127.0.0.1 train digits with secure aggregation and record-level DP;
one is killed (SIGKILL) mid-training; the other 4 finish their rounds, accuracy rises, epsilon
is reported and within budget, and each saves its model. Always stops the processes.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from test_daemon_support import DaemonProc, spawn, wait_until

from floor.errors import CheckpointError, ConfigError
from gossip.service import load_state
from gossip.tasks import make_task
from p2p.config import DaemonConfig, MembershipConfig, TrainingConfig, load_config, parse_shard
from p2p.daemon import Daemon

__all__ = ["spawn"]  # the fixture, imported for pytest

Spawn = Callable[..., DaemonProc]

ROUNDS = 8
PEERS = 5
EPSILON = 8.0


def training_flags(index: int, rounds: int = ROUNDS, peers: int = PEERS) -> list[str]:
    return [
        "--task",
        "digits",
        "--rounds",
        str(rounds),
        "--group-size",
        str(peers),
        "--epsilon",
        str(EPSILON),
        "--delta",
        "1e-5",
        "--privacy",
        "record",
        "--algorithm",
        "secure",
        "--seed",
        "0",
        "--shard",
        f"{index}/{peers}",
        # Under DP every weight is 1 and the MLP's parameters stay below 10, so the group
        # averages in Z_2^32 with the default 4 guard bits (the in-process tests keep Z_2^64).
        "--ring",
        "auto",
        "--value-bound",
        "10",
    ]


def safe_status(d: DaemonProc) -> dict[str, Any]:
    try:
        return d.status()
    except (OSError, ValueError):
        return {}


def status_of(d: DaemonProc) -> dict[str, Any]:
    """The status, asked again if a busy machine made one request time out."""
    for _ in range(10):
        st = safe_status(d)
        if st:
            return st
        time.sleep(0.5)
    raise AssertionError(f"{d.address} does not answer /v1/status: {d.log()}")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_five_daemons_train_digits_one_killed_mid_training(spawn: Spawn) -> None:
    first = spawn("t0", *training_flags(0)).start()
    first.wait_ready()
    others = [
        spawn(f"t{i}", *training_flags(i), "--bootstrap", first.address).start()
        for i in range(1, PEERS)
    ]
    daemons = [first, *others]
    for d in others:
        d.wait_ready()
    started = time.monotonic()
    victim, survivors = others[-1], daemons[:-1]

    # mid-training: the victim has finished at least two rounds and not all of them
    wait_until(lambda: 2 <= safe_status(victim).get("round", 0) < ROUNDS, 120.0, "victim round 2")
    killed_at = status_of(victim)["round"]
    victim.signal(signal.SIGKILL)
    victim.wait(10.0)

    def all_done() -> bool:
        for d in survivors:
            if d.proc is not None and d.proc.poll() is not None:
                raise AssertionError(f"{d.address} exited: {d.log()}")
        return all(safe_status(d).get("training") == "done" for d in survivors)

    wait_until(all_done, 150.0, "the 4 survivors finish their rounds")
    elapsed = time.monotonic() - started

    for d in survivors:
        st = status_of(d)  # still serving after its rounds
        where = f"{d.address}: {st}\n{d.log()}"
        assert st["round"] == ROUNDS, where
        assert st["privacy_unit"] == "record" and st["algorithm"] == "secure", where
        assert st["budget_spent"] is False and st["epsilon_budget"] == EPSILON, where
        assert 0 < st["epsilon_spent"] <= EPSILON, where
        assert st["ok_rounds"] >= ROUNDS // 2, where  # most rounds averaged in a group
        assert st["accuracy"] > st["initial_accuracy"] + 0.3, where
        assert st["bytes_sent"] > 0 and st["bytes_received"] > 0, where
        assert (d.data_dir / "privacy_budget.json").exists(), where
        state = load_state(d.data_dir / "model.pt")
        assert state and all(t.isfinite().all() for t in state.values()), where
        log_text = d.log_path.read_text()
        assert "event=training_done" in log_text, where
        assert "ring_bits=32" in log_text and "ring_bits=64" not in log_text, where
    # rounds after the kill ran in groups of at most the 4 survivors
    late = [int(status_of(d)["last_group_size"]) for d in survivors]
    assert all(size <= PEERS - 1 for size in late), late
    print(f"\n5 daemons x {ROUNDS} rounds: {elapsed:.1f} s (victim killed after round {killed_at})")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_daemon_killed_and_restarted_resumes_its_learning(spawn: Spawn) -> None:
    """kill -9 mid-run, restart on the same data dir: the peer resumes from its checkpoint
    (its model, not a fresh one), its accuracy keeps rising from there, and its epsilon never
    passes the budget."""
    peers, rounds = 4, 10
    # the others train longer, so that the victim finds groups after its restart
    first = spawn("r0", *training_flags(0, 4 * rounds, peers)).start()
    first.wait_ready()
    others = [
        spawn(f"r{i}", *training_flags(i, 4 * rounds, peers), "--bootstrap", first.address)
        for i in range(1, peers - 1)
    ]
    victim = spawn(
        "victim", *training_flags(peers - 1, rounds, peers), "--bootstrap", first.address
    )
    for d in [*others, victim]:
        d.start()
    for d in [*others, victim]:
        d.wait_ready()
    wait_until(lambda: 3 <= safe_status(victim).get("round", 0) < rounds, 120.0, "round 3")
    before = status_of(victim)
    victim.signal(signal.SIGKILL)
    victim.wait(10.0)
    victim.start()
    resumed = victim.wait_ready()
    where = f"{resumed}\n{victim.log()}"
    # the checkpoint of the last completed round (the status may already count a round whose
    # checkpoint was being written at the kill)
    assert before["round"] - 1 <= resumed["resumed_round"] <= before["round"], where
    assert resumed["contributions"] >= before["contributions"], where
    assert resumed["epsilon_spent"] >= before["epsilon_spent"] - 1e-9, where  # never given back
    assert resumed["initial_accuracy"] == before["initial_accuracy"], where
    assert resumed["accuracy"] > before["initial_accuracy"] + 0.2, where  # not a fresh model
    seen: list[dict[str, Any]] = []

    def victim_done() -> bool:
        st = safe_status(victim)
        if st:
            seen.append(st)
        return st.get("training") in ("done", "budget_spent")

    wait_until(victim_done, 200.0, "the restarted victim finishes its rounds")
    final = status_of(victim)
    where = f"{final}\n{victim.log()}"
    assert final["round"] == rounds and final["resumed_round"] == resumed["resumed_round"], where
    assert all(0 <= st["epsilon_spent"] <= EPSILON for st in seen), where
    assert final["ok_rounds"] > resumed["ok_rounds"], where  # it trained with the others again
    assert final["accuracy"] >= resumed["accuracy"] - 0.02, where
    assert final["accuracy"] > before["initial_accuracy"] + 0.3, where
    assert "event=resumed" in victim.log_path.read_text(), where


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_eight_daemons_lose_one_member_at_a_random_moment_twenty_times_and_never_abort(
    spawn: Spawn, tmp_path: Path
) -> None:
    """8 daemons in secure groups of 6 to 8; 20 times a random one (not the bootstrap) is
    killed with SIGKILL at a random moment of a group round it is in (0-0.4 s after its log
    says the group formed) and restarted on its data directory. With one member gone at a time
    every group keeps at least t members, and no group round aborts: a member lost at any stage
    is recovered from (issue 17)."""
    peers, kills = 8, 20
    rng = random.Random(17)
    with (tmp_path / "fast.toml").open("a") as f:  # the fixture's config: groups of 6+
        f.write("[training]\nmin_group_size = 6\n")
    # thousands of noised rounds drift some parameters past the other tests' bound of 10, and a
    # contribution past the public bound is refused locally (RingOverflow, counted as an
    # aborted round): give this long run room, so that only group aborts could count here
    flags = [training_flags(i, 3000, peers) for i in range(peers)]
    for f in flags:
        f[f.index("--value-bound") + 1] = "1000"
    first = spawn("k0", *flags[0]).start()
    first.wait_ready()
    others = [
        spawn(f"k{i}", *flags[i], "--bootstrap", first.address).start() for i in range(1, peers)
    ]
    daemons = [first, *others]
    for d in others:
        d.wait_ready()
    started = time.monotonic()

    def groups_formed(d: DaemonProc) -> int:
        return d.log_path.read_text().count("event=group_formed")

    for _ in range(kills):
        victim = rng.choice(others)
        seen = groups_formed(victim)
        wait_until(lambda v=victim, n=seen: groups_formed(v) > n, 120.0, "the victim in a group")
        time.sleep(rng.uniform(0.0, 0.4))
        victim.signal(signal.SIGKILL)
        victim.wait(10.0)
        victim.start()
        victim.wait_ready()
        for d in daemons:
            if d.proc is not None and d.proc.poll() is not None:
                raise AssertionError(f"{d.address} exited: {d.log()}")
    elapsed = time.monotonic() - started
    statuses = [status_of(d) for d in daemons]
    aborted = {d.address: st["aborted_rounds"] for d, st in zip(daemons, statuses, strict=True)}
    ok = sum(st["ok_rounds"] for st in statuses)
    recovered = sum(st["recovered_rounds"] for st in statuses)
    logs = "".join(d.log_path.read_text() for d in daemons)
    where = f"aborted {aborted}; {[st.get('last_error') for st in statuses]}"
    assert sum(aborted.values()) == 0, where
    assert "event=group_round_aborted" not in logs, where
    # how many kills land after a victim's input (recovered rounds) depends on timing: 7 and 0
    # in two runs here; a kill before the input leaves the victim uncounted, also no abort
    print(
        f"\n8 daemons, {kills} kills in {elapsed:.0f} s: {ok} group rounds ok "
        f"({recovered} recovered), 0 aborted"
    )


# -- in-process: config, status, saved model, budget kept across a restart ----------------------

FAST = MembershipConfig(exchange_interval_s=0.1, ping_interval_s=0.1, join_attempts=1)


def training_config(
    tmp_path: Path, name: str, index: int, privacy: str = "record", rounds: int = 2, **kw: Any
) -> DaemonConfig:
    return DaemonConfig(
        listen="127.0.0.1:0",
        data_dir=tmp_path / name,
        membership=FAST,
        tune_malloc=False,
        training=TrainingConfig(
            task="digits",
            model="logreg",
            rounds=rounds,
            group_size=3,
            shard=f"{index}/3",
            start_timeout_s=20.0,
            privacy=privacy,
        ),
        **kw,
    )


async def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.05)
    assert condition(), what


def state(daemon: Daemon) -> object:
    return daemon.status()["training"]


async def test_daemons_train_report_save_and_keep_the_budget_across_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a slow disk: the status must not say "done" before model.pt is written
    slow_save = Daemon._save_model

    def save_slowly(self: Daemon, *args: Any) -> None:
        time.sleep(0.5)
        slow_save(self, *args)

    monkeypatch.setattr(Daemon, "_save_model", save_slowly)
    first = Daemon(training_config(tmp_path, "a", 0))
    await first.start()
    boot = (first.transport.addresses[0],)
    others = [
        Daemon(training_config(tmp_path, n, i, bootstrap=boot)) for i, n in ((1, "b"), (2, "c"))
    ]
    try:
        for d in others:
            await d.start()
        daemons = [first, *others]
        await wait_for(lambda: all(state(d) == "done" for d in daemons), 60.0, "all done")
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://{boot[0]}/v1/status") as resp,
        ):
            status = await resp.json()
        assert status["round"] == 2 and status["training"] == "done"
        assert status["privacy_unit"] == "record" and status["epsilon_budget"] == 8.0
        spent = status["epsilon_spent"]
        assert 0 < spent <= 8.0
        assert status["accuracy"] > status["initial_accuracy"]
        assert status["bytes_sent"] > 0 and status["last_group_size"] == 3
        model = tmp_path / "a" / "model.pt"
        fresh = make_task("digits", model="logreg").build_model()
        fresh.load_state_dict(load_state(model))
        assert json.loads(model.with_suffix(".json").read_text())["round"] == 2
        first_contributions = status["contributions"]
        await first.aclose()

        # restarted with the same data dir and one more round: it resumes from its checkpoint
        # (round 2, the same model and contributions); the spent epsilon is still spent, and
        # since 2 rounds' noise already used the budget, round 3 says so and stops contributing
        again = Daemon(
            training_config(
                tmp_path, "a", 0, rounds=3, bootstrap=(others[0].transport.addresses[0],)
            )
        )
        await again.start()
        try:
            resumed = again.status()
            assert resumed["resumed_round"] == 2 and resumed["round"] >= 2
            assert resumed["initial_accuracy"] == status["initial_accuracy"]
            await wait_for(
                lambda: state(again) in ("budget_spent", "done"), 30.0, "restart finished"
            )
            st = again.status()
            assert st["epsilon_spent"] >= spent - 1e-9  # never given back
            assert st["contributions"] >= first_contributions
            if first_contributions == 2:
                assert st["training"] == "budget_spent" and st["budget_spent"] is True
                assert st["round"] == 3 and st["contributions"] == 2
                assert st["epsilon_spent"] == pytest.approx(spent)
                assert st["accuracy"] == pytest.approx(status["accuracy"])  # the same model
        finally:
            await again.aclose()
    finally:
        for d in [first, *others]:
            await d.aclose()


async def test_daemons_with_peer_privacy_add_distributed_noise_in_secure_groups(
    tmp_path: Path,
) -> None:
    """``privacy = peer`` in secure groups is distributed noise by default: the status says so
    and reports the three epsilons, and the persisted budget holds distributed events."""
    first = Daemon(training_config(tmp_path, "a", 0, privacy="peer"))
    await first.start()
    boot = (first.transport.addresses[0],)
    others = [
        Daemon(training_config(tmp_path, n, i, privacy="peer", bootstrap=boot))
        for i, n in ((1, "b"), (2, "c"))
    ]
    try:
        for d in others:
            await d.start()
        daemons = [first, *others]
        await wait_for(lambda: all(state(d) == "done" for d in daemons), 60.0, "all done")
        for d in daemons:
            st = d.status()
            assert st["privacy_unit"] == "peer" and st["dp_noise"] == "distributed", st
            assert st["ok_rounds"] == 2 and st["last_group_size"] == 3, st
            assert 0 < st["epsilon_central"] <= st["epsilon_spent"] <= 8.0, st
            assert st["epsilon_local"] > st["epsilon_spent"], st
            budget = json.loads((d.config.data_dir / "privacy_budget.json").read_text())
            assert budget["version"] == 3 and budget["events"][0][0] == "ddg", budget
        assert budget["spends"] == st["contributions"] == 2, budget
    finally:
        for d in [first, *others]:
            await d.aclose()


def test_training_config_from_file_env_and_flags(tmp_path: Path) -> None:
    path = tmp_path / "murmur.toml"
    path.write_text('[training]\ntask = "digits"\nrounds = 4\nepsilon = 2.0\n')
    cfg = load_config(
        path,
        {"MURMUR_TRAINING_ROUNDS": "6", "MURMUR_TRAINING_WAIT_PEERS": "2"},
        {"training": {"group_size": 4, "shard": "1/4"}},
    )
    t = cfg.training
    assert (t.task, t.rounds, t.epsilon, t.group_size, t.shard) == ("digits", 6, 2.0, 4, "1/4")
    assert t.wait_peers == 2 and t.peers_to_wait_for == 2
    assert TrainingConfig(group_size=5).peers_to_wait_for == 4
    assert DaemonConfig().training.task == ""  # no training unless asked


@pytest.mark.parametrize(
    "training",
    [
        {"task": "imagenet"},
        {"algorithm": "dpsgd"},
        {"privacy": "group"},
        {"shard": "5/5"},
        {"shard": "a/b"},
        {"group_size": 2, "min_group_size": 3},
        {"epsilon": 0.0},
        {"wait_peers": -1},
        {"round_timeout_s": 0.0},
        {"rounds": "many"},
    ],
)
def test_bad_training_config_is_a_config_error(training: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        load_config(None, None, {"training": training})
    assert parse_shard("2/5") == (2, 5)


async def test_a_corrupt_checkpoint_stops_the_daemon_with_an_error_naming_it(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "a"
    folder.mkdir(mode=0o700)
    (folder / "checkpoint.pt").write_bytes(b"MMCKPT01" + b"\0" * 32 + b"not a torch archive")
    daemon = Daemon(training_config(tmp_path, "a", 0))
    try:
        with pytest.raises(CheckpointError, match=str(folder / "checkpoint.pt")):
            await daemon.start()
    finally:
        await daemon.aclose()
    assert (folder / "checkpoint.pt").exists()  # left as it was, for the operator
