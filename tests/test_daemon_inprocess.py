"""The Daemon class in-process: lifecycle, admin endpoints, the service hook, helpers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from floor.errors import KeyFileError, TransportClosed
from p2p.config import DaemonConfig, MembershipConfig
from p2p.daemon import Daemon, load_network_key
from p2p.transport.http import is_loopback, local_ip_toward

FAST = MembershipConfig(exchange_interval_s=0.1, ping_interval_s=0.1, join_attempts=1)


def config(tmp_path: Path, name: str, **kw: object) -> DaemonConfig:
    return DaemonConfig(
        listen="127.0.0.1:0",
        data_dir=tmp_path / name,
        membership=FAST,
        tune_malloc=False,
        **kw,  # type: ignore[arg-type]
    )


async def test_two_daemons_join_serve_status_and_run_services(tmp_path: Path) -> None:
    async with Daemon(config(tmp_path, "a")) as a:
        listen = a.transport.addresses[0]
        async with Daemon(config(tmp_path, "b", bootstrap=(listen,))) as b:
            ran = asyncio.Event()
            stopped = asyncio.Event()

            async def service() -> None:
                ran.set()
                try:
                    await asyncio.sleep(3600)
                finally:
                    stopped.set()

            b.spawn(service(), name="test-service")
            await ran.wait()
            async with aiohttp.ClientSession() as session:
                # b wrote to a (its join), but a lists it as live only once a's probe and
                # ping to b's advertised address were answered by b.
                async with asyncio.timeout(5.0):
                    while True:
                        async with session.get(f"http://{listen}/v1/status") as resp:
                            status = await resp.json()
                        if status["peers"] == 1:
                            break
                        await asyncio.sleep(0.05)
                async with session.get(f"http://{listen}/v1/peers") as resp:
                    peers = await resp.json()
            assert status["peer_id"] == str(a.identity.peer_id)
            assert status["listen"] == listen
            assert status["peers"] == 1
            assert status["uptime_s"] > 0
            assert [p["peer_id"] for p in peers] == [str(b.identity.peer_id)]
        assert stopped.is_set()  # aclose cancelled and awaited the service
        with pytest.raises(TransportClosed):
            b.spawn(service())
    assert (tmp_path / "b" / "peers.json").exists()
    assert (tmp_path / "a" / "identity.key").exists()


async def test_restart_keeps_the_identity(tmp_path: Path) -> None:
    async with Daemon(config(tmp_path, "a")) as a:
        first = a.identity.peer_id
    async with Daemon(config(tmp_path, "a")) as again:
        assert again.identity.peer_id == first


def test_network_key_file_formats(tmp_path: Path) -> None:
    key = bytes(range(32))
    hex_file = tmp_path / "hex"
    hex_file.write_text(key.hex() + "\n")
    raw_file = tmp_path / "raw"
    raw_file.write_bytes(key)
    assert load_network_key(hex_file) == key
    assert load_network_key(raw_file) == key
    bad = tmp_path / "bad"
    bad.write_text("short")
    for path in (bad, tmp_path / "missing"):
        with pytest.raises(KeyFileError):
            load_network_key(path)


def test_admin_is_loopback_only() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1")
    assert not is_loopback("10.0.0.1") and not is_loopback(None) and not is_loopback("x")


def test_wildcard_listen_advertises_the_route_to_the_bootstrap() -> None:
    assert local_ip_toward("127.0.0.1:9") == "127.0.0.1"
    assert local_ip_toward("[::1]:9", ipv6=True) == "::1"
