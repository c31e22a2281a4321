"""Relaying for peers that cannot be dialled, in process on loopback (``p2p.transport.relay``,
``p2p.reach``). The same with real separate network stacks is ``test_netns.py``."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from floor.envelope import Auth
from floor.errors import PeerUnreachable, ProtocolError, RefusalCode, RemoteRefused
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


def live_at(d: Daemon, other: Daemon) -> bool:
    return other.identity.peer_id in {e.record.peer_id for e in d.membership.view.live()}


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


async def test_a_relay_forwards_only_sealed_envelopes_it_cannot_open_within_budgets(
    tmp_path: Path,
) -> None:
    # One relay for c (so its record names only that one), budgets of 5 envelopes/s.
    tight = HttpTransportConfig(relay_messages_per_s=5, relays=1)  # burst: 20 envelopes
    async with Daemon(config(tmp_path, "a", transport=tight)) as a0:
        boot0 = (a0.transport.addresses[0],)
        async with (
            Daemon(config(tmp_path, "b", bootstrap=boot0, transport=tight)) as b0,
            Daemon(config(tmp_path, "c", bootstrap=boot0, no_listen=True, transport=tight)) as c,
        ):
            await until(lambda: len(c.transport.relays) == 1, 10, "c to hold a relay")
            a, b = (a0, b0) if a0.identity.peer_id in c.transport.relays else (b0, a0)
            boot = (a.transport.addresses[0],)  # a relays for c; b sends
            relay = a.transport
            seen: list[bytes] = []
            forward = relay._forward

            def tap(data: bytes | bytearray | memoryview) -> object:
                seen.append(bytes(data))
                return forward(data)

            relay._forward = tap  # type: ignore[assignment,method-assign]
            c_id = c.identity.peer_id
            b.transport.set_addresses(c_id, [f"relay:{boot[0]}"], verified=True)
            marker = 0x5EC12E7
            reply = await b.transport.request(c_id, Ping(seq=marker), auth=Auth.MAC)
            assert reply.message == Pong(seq=marker)
            assert seen
            for data in seen:
                auth, recipient = relay._codec.route(data)
                assert auth is Auth.SEALED and recipient == c_id
                assert marker.to_bytes(4, "big") not in data  # the body is ciphertext
                with pytest.raises(ProtocolError):  # addressed to c, sealed under b-c's key
                    relay._codec.decode(data)
            # A MAC envelope is refused by the relay itself, not forwarded.
            mac = b.transport._codec.encode(Ping(seq=1), recipient=c_id, auth=Auth.MAC)
            with pytest.raises(RemoteRefused) as refused:
                await b.transport._post(f"relay:{boot[0]}", mac, 2.0)
            assert refused.value.code is RefusalCode.MALFORMED
            # For a peer it does not relay for: NO_ROUTE.
            stranger = b.transport._codec.encode(
                Ping(seq=1), recipient=b.identity.peer_id, auth=Auth.SEALED
            )
            with pytest.raises(RemoteRefused) as refused:
                await b.transport._post(f"relay:{boot[0]}", stranger, 2.0)
            assert refused.value.code is RefusalCode.NO_ROUTE
            # Over the relayed peer's message budget: BUSY, and the relay keeps serving.
            codes = []
            for seq in range(40):
                try:
                    await b.transport.request(c_id, Ping(seq=seq), timeout=2.0)
                except RemoteRefused as exc:
                    codes.append(exc.code)
            assert RefusalCode.BUSY in codes
            assert relay.relay_refused >= 2 + len(codes)
            # The bucket refills (membership's pings share it): the relay serves again.
            for _ in range(40):
                await asyncio.sleep(0.25)
                try:
                    reply = await b.transport.request(c_id, Ping(seq=99), timeout=2.0)
                except RemoteRefused as exc:
                    assert exc.code is RefusalCode.BUSY
                    continue
                assert reply.message == Pong(seq=99)
                break
            else:
                raise AssertionError("the relay never served c again")


async def test_a_relay_that_goes_away_is_replaced(tmp_path: Path) -> None:
    one = HttpTransportConfig(relays=1)
    async with Daemon(config(tmp_path, "a")) as a:
        boot = (a.transport.addresses[0],)
        async with (
            Daemon(config(tmp_path, "b", bootstrap=boot)) as b,
            Daemon(config(tmp_path, "d", bootstrap=boot)) as d,
            Daemon(config(tmp_path, "c", bootstrap=boot, no_listen=True, transport=one)) as c,
        ):
            await until(lambda: len(c.transport.relays) == 1, 10, "c to hold a relay")
            first = next(iter(c.transport.relays))
            gone = next(x for x in (a, b, d) if x.identity.peer_id == first)
            stay = [x for x in (a, b, d) if x is not gone]
            await gone.aclose()
            await until(
                lambda: len(c.transport.relays) == 1 and first not in c.transport.relays,
                15,
                "c to find another relay",
            )
            await until(lambda: all(live_at(x, c) for x in stay), 15, "c live again at the others")
            reply = await stay[0].transport.request(c.identity.peer_id, Ping(seq=3))
            assert reply.message == Pong(seq=3)


async def test_a_reachable_peer_never_names_relays_and_relays_nobody_until_checked(
    tmp_path: Path,
) -> None:
    async with Daemon(config(tmp_path, "a")) as a:
        assert a.transport.reachable is None and a.transport.relay_capacity == 0
        with pytest.raises(PeerUnreachable):  # nobody to relay through
            await a.transport.open_relay(a.identity.peer_id, "127.0.0.1:9", timeout=1.0)
        assert a.status()["reachable"] == "unknown"
        assert a.transport.addresses == a.transport.direct_addresses


def test_a_peer_behind_relays_lets_reachable_peers_invite_first() -> None:
    import random

    from gossip.matchmaking import Invitations, MatchConfig

    cfg = MatchConfig(backoff_s=0.1)
    waits = {False: [], True: []}  # type: dict[bool, list[float]]
    for defer in (False, True):
        for seed in range(50):
            inv = Invitations(b"x" * 32, cfg, rng=random.Random(seed))
            inv.defer = defer
            inv.start(0.0, 1, [b"y" * 32])
            assert inv.wake_at is not None
            waits[defer].append(inv.wake_at)
    assert max(waits[False]) <= 0.1 <= min(waits[True]) and max(waits[True]) <= 0.3


async def test_a_bootstrap_peer_relays_for_its_only_joiner_which_does_not_listen(
    tmp_path: Path,
) -> None:
    """Two peers: nobody can dial the joiner back for the bootstrap, yet the joiner's join came
    over a connection it opened to the bootstrap, which is then reachable and relays for it."""
    async with Daemon(config(tmp_path, "a")) as a:
        boot = (a.transport.addresses[0],)
        async with Daemon(config(tmp_path, "c", bootstrap=boot, no_listen=True)) as c:
            await until(lambda: len(c.transport.relays) == 1, 10, "a to relay for c")
            assert a.transport.reachable is True
            await until(lambda: live_at(a, c), 10, "c to be live at a")
            reply = await a.transport.request(c.identity.peer_id, Ping(seq=5))
            assert reply.message == Pong(seq=5)


async def test_a_peer_that_becomes_reachable_drops_its_relays_and_one_that_stops_takes_them(
    tmp_path: Path,
) -> None:
    """The dial-back check runs again every ``reachability_recheck_s``: a peer that nobody
    could dial (here the only peer it can ask fails every dial to it, as behind a firewall)
    takes a relay and names only relay addresses; once dials reach it, it lets the relay go and
    its own address is back in its record at the other peer; blocked again, it relays again."""
    from floor.errors import PeerUnreachable as Unreachable

    async with Daemon(config(tmp_path, "a")) as a:
        blocked = True
        real_dial = a.transport.dial_once

        async def firewall(address: str, *args: object, **kw: object) -> None:
            if blocked:
                raise Unreachable(f"cannot reach {address}: firewalled")
            await real_dial(address, *args, **kw)  # type: ignore[arg-type]

        a.transport.dial_once = firewall  # type: ignore[method-assign]
        recheck = HttpTransportConfig(reachability_recheck_s=1.0)
        boot = (a.transport.addresses[0],)
        async with Daemon(config(tmp_path, "b", bootstrap=boot, transport=recheck)) as b:
            me = b.identity.peer_id
            direct = b.transport.direct_addresses

            def relayed() -> bool:
                at_a = a.transport.addresses_of(me)
                return (
                    b.transport.reachable is False
                    and list(b.transport.relays) == [a.identity.peer_id]
                    and bool(at_a)
                    and all(is_relay_address(x) for x in at_a)
                )

            await until(relayed, 20.0, "b unreachable, relayed by a, a knowing only that")
            assert a.transport.relaying_for == [me]
            blocked = False
            # The next re-check may fall within a's 10 s dial-back limit (BUSY: no verdict).
            await until(
                lambda: (
                    b.transport.reachable is True
                    and not b.transport.relays
                    and a.transport.addresses_of(me) == direct
                ),
                30.0,
                "b reachable again, without relays, its own address at a",
            )
            await until(lambda: not a.transport.relaying_for, 5.0, "a to let b's stream go")
            assert (await b.transport.request(a.identity.peer_id, Ping(seq=1))).message == Pong(
                seq=1
            )
            blocked = True
            await until(relayed, 30.0, "b relayed again once dials fail again")
