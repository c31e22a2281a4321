"""Acceptance tests with real daemons in subprocesses on 127.0.0.1 (free ports, always stopped)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from test_daemon_support import DEAD_AFTER_S, DaemonProc, spawn, wait_until

from floor.envelope import Auth, EnvelopeCodec
from floor.identity import Identity, PeerId
from p2p.messages import MESSAGE_TYPES, Join, PeerRecord, Ping

__all__ = ["spawn"]  # the fixture, imported for pytest

Spawn = Callable[..., DaemonProc]


@pytest.mark.slow
def test_five_daemons_see_each_other_drop_the_dead_and_see_a_restart(spawn: Spawn) -> None:
    first = spawn("d0").start()
    first.wait_ready()
    others = [spawn(f"d{i}", "--bootstrap", first.address).start() for i in range(1, 5)]
    daemons = [first, *others]
    ids = {d.address: d.wait_ready()["peer_id"] for d in daemons}
    everyone = set(ids.values())

    def all_see_all() -> bool:
        return all(d.peer_ids("alive") == everyone - {ids[d.address]} for d in daemons)

    wait_until(all_see_all, 10.0, "every daemon sees the other four")
    assert all(d.status()["peers"] == 4 for d in daemons)

    victim = others[-1]
    assert victim.proc is not None
    victim.proc.kill()  # kill -9: no goodbye
    victim.wait(5)
    survivors = daemons[:-1]
    wait_until(
        lambda: all(ids[victim.address] not in d.peer_ids() for d in survivors),
        DEAD_AFTER_S + 3.0,
        "the survivors drop the killed daemon",
    )

    victim.start()  # same data dir, same port
    assert victim.wait_ready()["peer_id"] == ids[victim.address]
    wait_until(all_see_all, 10.0, "the restarted daemon is seen again")

    # SIGINT and SIGTERM both stop a daemon cleanly: exit 0 within 5 s.
    for i, daemon in enumerate(daemons):
        daemon.signal(signal.SIGINT if i % 2 else signal.SIGTERM)
    for daemon in daemons:
        assert daemon.wait(5) == 0, daemon.log()
        assert "event=stopped" in daemon.log()
        assert "Traceback" not in daemon.log()


def _forge(valid: bytes, rng: random.Random) -> bytes:
    """A corrupted copy of a valid envelope: one flipped bit or a changed byte range."""
    data = bytearray(valid)
    kind = rng.randrange(3)
    if kind == 0:
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
    elif kind == 1:
        i = rng.randrange(len(data))
        data[i : i + 8] = os.urandom(len(data[i : i + 8]))
    else:
        data[-16:] = bytes(16)
    return bytes(data)


async def test_daemon_survives_garbage_and_accepts_none_of_it(spawn: Spawn) -> None:
    daemon = spawn("fuzz").start()
    status = await asyncio.to_thread(daemon.wait_ready)
    target = PeerId.parse(status["peer_id"])
    me = Identity.from_seed(b"f" * 32)
    stranger = Identity.from_seed(b"s" * 32)
    codec = EnvelopeCodec(me, message_types=MESSAGE_TYPES)
    url = f"http://{daemon.address}/v1/envelope"
    rng = random.Random(7)

    genuine = codec.encode(Ping(seq=1), recipient=target, auth=Auth.SEALED)
    record = PeerRecord.create(stranger, ("127.0.0.1:9",), 1.0)  # signed by someone else
    impostor = codec.encode(Join(record=record), recipient=None, auth=Auth.SIGNED)
    valid = [codec.encode(Ping(seq=i), recipient=target, auth=Auth(1 + i % 3)) for i in range(50)]

    bodies: list[bytes] = []
    for i in range(10_000):
        kind = i % 5
        if kind == 0:
            bodies.append(os.urandom(rng.randrange(0, 400)))
        elif kind == 1:
            v = rng.choice(valid)
            bodies.append(v[: rng.randrange(len(v))])  # truncated
        elif kind == 2:
            bodies.append(_forge(rng.choice(valid), rng))
        elif kind == 3:
            bodies.append(genuine)  # replayed
        else:
            bodies.append(impostor if i % 10 == 4 else b"MRM\x01" + os.urandom(60))

    statuses: list[int] = []
    limit = asyncio.Semaphore(32)
    connector = aiohttp.TCPConnector(limit=32)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.post(url, data=genuine) as resp:
            assert resp.status == 200  # the one genuine message is answered
        accepted_before = (await asyncio.to_thread(daemon.status))["accepted"]

        async def post(body: bytes) -> None:
            async with limit, session.post(url, data=body) as resp:
                await resp.read()
                statuses.append(resp.status)

        await asyncio.gather(*(post(b) for b in bodies))
        async with session.get(f"http://{daemon.address}/v1/status") as resp:
            assert resp.status == 200
            after = await resp.json()
    assert len(statuses) == 10_000
    assert all(s >= 400 for s in statuses), sorted(set(statuses))
    assert after["accepted"] == accepted_before  # none of the 10,000 was accepted
    assert after["refused"] >= 10_000
    assert after["peers"] == 0  # the impostor's Join put nobody in the view


@pytest.mark.slow
def test_network_key_keeps_strangers_out(spawn: Spawn, tmp_path: Path) -> None:
    key = tmp_path / "network.key"
    key.write_text(os.urandom(32).hex() + "\n")
    key.chmod(0o600)
    first = spawn("k0", "--network-key-file", str(key)).start()
    first.wait_ready()
    member = spawn("k1", "--network-key-file", str(key), "--bootstrap", first.address).start()
    stranger = spawn("s1", "--bootstrap", first.address).start()
    member_id = member.wait_ready()["peer_id"]

    assert stranger.wait(20) != 0  # refused at the door: cannot join
    assert "UNAUTHORIZED" in stranger.log()
    assert "Traceback" not in stranger.log()
    stranger_id = Identity.load(stranger.data_dir).peer_id

    first_id = first.status()["peer_id"]
    wait_until(lambda: first.peer_ids("alive") == {member_id}, 10.0, "the member is listed")
    wait_until(lambda: member.peer_ids("alive") == {first_id}, 10.0, "the bootstrap is listed")
    assert str(stranger_id) not in first.peer_ids() | member.peer_ids()
    assert first.status()["refused"] >= 1
