"""Relaying for peers that cannot be dialled, in process on loopback (``p2p.transport.relay``,
``p2p.reach``). The same with real separate network stacks is ``test_netns.py``."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from floor.envelope import Auth
from p2p.config import DaemonConfig, HttpTransportConfig, MembershipConfig
from p2p.daemon import Daemon
from p2p.messages import Ping, Pong
from p2p.transport.relay import is_relay_address, relay_target

FAST = MembershipConfig(
    exchange_interval_s=0.2, ping_interval_s=0.2, join_attempts=2, join_retry_delay_s=0.2
)


def config(tmp_path: Path, name: str, **kw: object) -> DaemonConfig:
    transport = kw.pop("transport", HttpTransportConfig())
    return DaemonConfig(
        listen="127.0.0.1:0",
        data_dir=tmp_path / name,
        membership=FAST,
        tune_malloc=False,
        transport=transport,  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )


async def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not condition():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_an_outbound_only_peer_is_reached_through_its_relays(tmp_path: Path) -> None:
    async with Daemon(config(tmp_path, "a")) as a:
        boot = (a.transport.addresses[0],)
        async with (
            Daemon(config(tmp_path, "b", bootstrap=boot)) as b,
            Daemon(config(tmp_path, "c", bootstrap=boot, no_listen=True)) as c,
        ):
            await until(
                lambda: a.transport.reachable is True and b.transport.reachable is True,
                10,
                "the listening peers to learn they are reachable",
            )
            await until(lambda: len(c.transport.relays) == 2, 10, "c to hold two relays")
            assert c.transport.reachable is False
            assert c.transport.direct_addresses == ()
            assert all(is_relay_address(x) for x in c.transport.addresses)
            assert {relay_target(x) for x in c.transport.addresses} == {
                a.transport.addresses[0],
                b.transport.addresses[0],
            }
            # Every peer lists c as live: it was proven and pinged through a relay.
            for d in (a, b):
                await until(
                    lambda d=d: (
                        c.identity.peer_id in {e.record.peer_id for e in d.membership.view.live()}
                    ),  # type: ignore[misc]
                    10,
                    "c to be live at the others",
                )
            reply = await b.transport.request(c.identity.peer_id, Ping(seq=7), auth=Auth.MAC)
            assert reply.message == Pong(seq=7)
            assert reply.auth is Auth.SEALED  # upgraded: a relay forwards only sealed envelopes
            status = c.status()
            assert status["reachable"] == "no"
            assert len(status["relays"]) == 2  # type: ignore[arg-type]
            assert a.status()["relaying_for"] == 1 and b.status()["relaying_for"] == 1
            forwarded = a.transport.relay_forwarded + b.transport.relay_forwarded
            assert forwarded > 0
