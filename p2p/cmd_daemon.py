"""``murmur start``, ``murmur status`` and ``murmur peers``: argument parsing and wiring only."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from floor.errors import ConfigError, NetworkError, PeerUnreachable, Timeout
from gossip.spec import NOISE_MODES
from p2p.config import (
    DAEMON_ALGORITHMS,
    PARTITIONS,
    PRIVACY_UNITS,
    RINGS,
    TASKS,
    DaemonConfig,
    load_config,
    parse_address,
)

# The same paths as p2p.admin; not imported from there so that `murmur status` and config
# errors answer without importing torch (p2p.admin -> transport -> codec -> torch).
STATUS_PATH = "/v1/status"
PEERS_PATH = "/v1/peers"

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add the ``start``, ``status`` and ``peers`` commands."""
    start = subparsers.add_parser("start", help="run a peer daemon in the foreground")
    start.add_argument("--listen", metavar="HOST:PORT", help="address to listen on")
    start.add_argument("--data-dir", metavar="DIR", type=Path, help="identity and peer state")
    start.add_argument(
        "--bootstrap", metavar="HOST:PORT", action="append", help="join through (repeatable)"
    )
    start.add_argument("--advertise", metavar="HOST:PORT", action="append", help="our address")
    start.add_argument(
        "--no-listen",
        action="store_true",
        default=None,
        help="outbound only: accept no peer connections, be reached through relays",
    )
    start.add_argument("--network-key-file", metavar="F", type=Path, help="pre-shared key")
    start.add_argument("--allow", metavar="PEER_ID", action="append", help="allowlist (repeat)")
    start.add_argument("--config", metavar="FILE", type=Path, help="TOML configuration file")
    start.add_argument("--log-format", choices=("kv", "json"), help="log line format")
    start.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    train = start.add_argument_group(
        "training", "what to train ([training] in the config file, MURMUR_TRAINING_* variables)"
    )
    train.add_argument("--task", choices=TASKS, help="built-in task to train (default: none)")
    train.add_argument("--rounds", type=int, metavar="N", help="rounds to train")
    train.add_argument("--group-size", type=int, metavar="K", help="target group size")
    train.add_argument("--epsilon", type=float, metavar="E", help="privacy budget epsilon")
    train.add_argument("--delta", type=float, metavar="D", help="privacy budget delta")
    train.add_argument(
        "--privacy",
        "--privacy-unit",
        dest="privacy",
        choices=PRIVACY_UNITS,
        help="whose data epsilon protects (record, peer or none)",
    )
    train.add_argument(
        "--dp-noise",
        choices=NOISE_MODES,
        help="peer-level noise: auto (distributed shares in secure groups), local, distributed",
    )
    train.add_argument(
        "--colluders", type=int, metavar="C", help="distributed noise: colluders assumed per group"
    )
    train.add_argument("--algorithm", choices=DAEMON_ALGORITHMS, help="averaging algorithm")
    train.add_argument("--seed", type=int, metavar="S", help="data split and initial model")
    train.add_argument("--shard", metavar="I/N", help="this peer's part of the data (e.g. 0/5)")
    train.add_argument("--partition", choices=PARTITIONS, help="how the data is cut")
    train.add_argument("--ring", choices=RINGS, help="ring of group averaging (default 64)")
    train.add_argument(
        "--value-bound", type=float, metavar="B", help="public bound on |w x| (default 1e6)"
    )
    start.set_defaults(func=cmd_start)
    for name, func, text in (
        ("status", cmd_status, "show a running daemon's status"),
        ("peers", cmd_peers, "list a running daemon's peers"),
    ):
        p = subparsers.add_parser(name, help=text)
        p.add_argument("--peer", metavar="HOST:PORT", default="127.0.0.1:7070", help="daemon")
        p.add_argument("--json", action="store_true", help="print JSON for programs")
        p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait")
        p.set_defaults(func=func)


class _Formatter(logging.Formatter):
    """One structured line per record: ``key=value`` pairs or a JSON object."""

    def __init__(self, fmt: str) -> None:
        super().__init__()
        self._json = fmt == "json"

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        ts += f".{int(record.msecs):03d}Z"
        message = record.getMessage()
        if record.exc_info:
            message += " error=" + repr(str(record.exc_info[1]))
        if self._json:
            fields: dict[str, object] = {"ts": ts, "level": record.levelname.lower()}
            fields["logger"] = record.name
            for part in message.split(" "):
                key, sep, value = part.partition("=")
                if sep:
                    fields[key] = value
            return json.dumps(fields)
        return f"ts={ts} level={record.levelname.lower()} logger={record.name} {message}"


def _setup_logging(config: DaemonConfig) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(config.log_format))
    root = logging.getLogger("murmur")
    root.handlers[:] = [handler]
    root.setLevel(config.log_level.upper())
    root.propagate = False


def cmd_start(args: argparse.Namespace) -> int:
    """Run the daemon until SIGINT or SIGTERM; exit 0 after a clean stop."""
    config = load_config(
        args.config,
        os.environ,
        {
            "listen": args.listen,
            "no_listen": args.no_listen,
            "data_dir": args.data_dir,
            "bootstrap": tuple(args.bootstrap) if args.bootstrap else None,
            "advertise": tuple(args.advertise) if args.advertise else None,
            "network_key_file": args.network_key_file,
            "allow": tuple(args.allow) if args.allow else None,
            "log_format": args.log_format,
            "log_level": args.log_level,
            "training": _training_flags(args),
        },
    )
    flags = _training_flags(args)
    if flags and not config.training.task:
        given = ", ".join("--" + name.replace("_", "-") for name in flags)
        raise ConfigError(
            f"{given} set what to train, but no task is given: add --task "
            f"({' | '.join(TASKS)}) or [training] task in the config (without a task the "
            "daemon only serves)"
        )
    _setup_logging(config)
    return asyncio.run(_run(config))


def _training_flags(args: argparse.Namespace) -> dict[str, Any] | None:
    names: tuple[str, ...] = ("task", "rounds", "group_size", "epsilon", "delta")
    names += ("privacy", "algorithm", "seed", "shard", "partition", "ring", "value_bound")
    names += ("dp_noise", "colluders")
    given = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    return given or None


async def _run(config: DaemonConfig) -> int:
    from p2p.daemon import Daemon  # heavy (torch): only when a daemon really starts

    # Move the import graph (torch's is large) out of the collector's reach: shorter GC pauses
    # while running, and interpreter exit drops from ~1 s to ~0.1 s (SIGTERM -> exit 0 fast).
    gc.freeze()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with Daemon(config) as daemon:
            stopped = asyncio.ensure_future(stop.wait())
            finished = asyncio.ensure_future(daemon.wait())
            try:
                await asyncio.wait({stopped, finished}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopped.cancel()
                finished.cancel()
            if finished.done() and not finished.cancelled() and finished.exception() is not None:
                logging.getLogger("murmur.daemon").error("event=service_failed")
                return 1
    except NetworkError as exc:
        raise PeerUnreachable(f"cannot start: {exc}") from None
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return 0


async def _get_json(peer: str, path: str, timeout: float) -> Any:
    parse_address(peer)
    url = f"http://{peer}{path}"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
            session.get(url) as resp,
        ):
            if resp.status != 200:
                raise PeerUnreachable(f"{peer} answered HTTP {resp.status} for {path}")
            return await resp.json()
    except TimeoutError:
        raise Timeout(f"no answer from {peer} within {timeout:g} s") from None
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        raise PeerUnreachable(f"cannot reach daemon at {peer}: {exc}") from None


def cmd_status(args: argparse.Namespace) -> int:
    """Print a daemon's status."""
    data = asyncio.run(_get_json(args.peer, STATUS_PATH, args.timeout))
    if not isinstance(data, dict):
        raise ConfigError(f"{args.peer} sent an unexpected status document")
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
        return 0
    width = max(len(k) for k in data) if data else 0
    for key, value in data.items():
        text = f"{value:.4g}" if isinstance(value, float) else "-" if value is None else value
        print(f"{key:<{width}}  {text}")
    return 0


def cmd_peers(args: argparse.Namespace) -> int:
    """Print a daemon's peers."""
    data = asyncio.run(_get_json(args.peer, PEERS_PATH, args.timeout))
    if not isinstance(data, list):
        raise ConfigError(f"{args.peer} sent an unexpected peers document")
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
        return 0
    now = time.time()
    print(f"{'PEER ID':<56} {'STATE':<11} {'LAST SEEN':>9}  ADDRESSES")
    for item in data:
        ago = now - float(item.get("last_seen", now))
        addresses = ",".join(item.get("addresses", []))
        state = item.get("state", "")
        print(f"{item.get('peer_id', '?'):<56} {state:<11} {ago:>8.1f}s  {addresses}")
    print(f"{len(data)} peer(s)")
    return 0
