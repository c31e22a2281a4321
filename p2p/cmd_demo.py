"""``murmur demo``: a local network in one command.

Starts N real daemons on 127.0.0.1 as separate ``murmur start`` processes (the first one, then
the others bootstrapped from it), each training its own shard of a built-in task with secure
group aggregation and differential privacy; polls their ``GET /v1/status`` and shows a live
table (round, group size, accuracy, epsilon per peer); stops them all (SIGTERM, then SIGKILL
after a grace period) when every peer has finished, on Ctrl-C, or at ``--timeout``.

Daemons run in their own process sessions so that a Ctrl-C reaches the demo only, and the demo
stops them in order and waits for each: no process is left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from floor.errors import ConfigError, PeerUnreachable, Timeout
from p2p.config import DAEMON_ALGORITHMS, PRIVACY_UNITS, TASKS

__all__ = ["register"]

STATUS_PATH = "/v1/status"
FINISHED = ("done", "budget_spent")
STOP_GRACE_S = 10.0

# Quick settings for a handful of daemons on one machine (the defaults suit a real network).
_CONFIG = """\
log_level = "info"
[membership]
exchange_interval_s = 0.5
ping_interval_s = 0.5
join_attempts = 20
join_retry_delay_s = 0.5
[transport]
shutdown_timeout_s = 0.5
"""


def register(subparsers: Any) -> None:
    """Add the ``demo`` command."""
    p = subparsers.add_parser(
        "demo",
        help="run a local network of daemons that train together",
        description=(__doc__ or "").split("\n\n")[1].replace("\n", " "),
    )
    p.add_argument("--peers", type=int, default=4, metavar="N", help="daemons to start (>= 3)")
    p.add_argument("--task", choices=TASKS, default="digits", help="built-in task")
    p.add_argument("--rounds", type=int, default=10, metavar="R", help="rounds per peer")
    p.add_argument("--group-size", type=int, metavar="K", help="default: min(N, 4)")
    p.add_argument("--epsilon", type=float, default=8.0, help="each peer's budget")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--privacy-unit", choices=PRIVACY_UNITS, default="record")
    p.add_argument("--algorithm", choices=DAEMON_ALGORITHMS, default="secure")
    p.add_argument("--seed", type=int, default=0, help="data split and initial model")
    p.add_argument("--interval", type=float, default=0.5, help="status poll period, seconds")
    p.add_argument("--timeout", type=float, default=900.0, help="stop after this many seconds")
    p.add_argument("--workdir", type=Path, help="data dirs and logs (kept); default: temporary")
    p.add_argument("--no-live", action="store_true", help="print changes as lines, no redraw")
    p.set_defaults(func=cmd_demo)


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _status(port: int, timeout: float = 1.0) -> dict[str, Any] | None:
    url = f"http://127.0.0.1:{port}{STATUS_PATH}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            data = json.loads(resp.read())
    except (OSError, ValueError, urllib.error.URLError):
        return None
    return data if isinstance(data, dict) else None


class _Stop(Exception):
    """SIGTERM to the demo: stop the daemons like Ctrl-C does."""


class _Daemon:
    """One ``murmur start`` child process."""

    def __init__(self, index: int, port: int, workdir: Path, argv: list[str]) -> None:
        self.index, self.port = index, port
        self.address = f"127.0.0.1:{port}"
        self.log_path = workdir / f"peer{index}.log"
        self.argv = argv
        self.proc: subprocess.Popen[bytes] | None = None
        self.last: dict[str, Any] = {}

    def start(self, env: dict[str, str]) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # Ctrl-C reaches the demo, which stops us in order
            )

    @property
    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()

    def reap(self, grace: float) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        try:
            return proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()


def _row(d: _Daemon, rounds: int) -> str:
    st = d.last
    code = d.exit_code
    state = f"exited({code})" if code is not None else str(st.get("training", "starting"))
    rnd = st.get("round")
    acc = st.get("accuracy")
    eps = st.get("epsilon_spent")
    ok, aborted, none = (st.get(k, 0) for k in ("ok_rounds", "aborted_rounds", "no_group_rounds"))
    return (
        f"{d.index:>4}  {d.address:<16} {state:<18} "
        f"{(f'{rnd}/{rounds}' if rnd is not None else '-'):>7} "
        f"{st.get('last_group_size', '-') or '-':>5} "
        f"{(f'{acc:.3f}' if isinstance(acc, int | float) else '-'):>8} "
        f"{(f'{eps:.3f}' if isinstance(eps, int | float) else '-'):>8} "
        f"{ok:>3}/{(aborted or 0) + (none or 0):<3} {st.get('peers', '-'):>5}"
    )


HEADER = (
    f"{'PEER':>4}  {'ADDRESS':<16} {'STATE':<18} {'ROUND':>7} {'GROUP':>5} {'ACCURACY':>8} "
    f"{'EPSILON':>8} {'OK/FAIL':<7} {'PEERS':>5}"
)


class _Table:
    """Redraws the table in place on a terminal; otherwise prints each change once."""

    def __init__(self, out: TextIO, live: bool) -> None:
        self.out, self.live = out, live
        self._drawn = 0
        self._seen: dict[int, tuple[Any, ...]] = {}

    def draw(self, daemons: list[_Daemon], rounds: int) -> None:
        if self.live:
            lines = [HEADER, *(_row(d, rounds) for d in daemons)]
            if self._drawn:
                self.out.write(f"\x1b[{self._drawn}F\x1b[J")
            self.out.write("\n".join(lines) + "\n")
            self._drawn = len(lines)
        else:
            for d in daemons:
                key = (d.last.get("training"), d.last.get("round"), d.exit_code)
                if self._seen.get(d.index) != key:
                    self._seen[d.index] = key
                    self.out.write(_row(d, rounds) + "\n")
        self.out.flush()

    def final(self, daemons: list[_Daemon], rounds: int) -> None:
        if not self.live:
            self.out.write("\n" + "\n".join([HEADER, *(_row(d, rounds) for d in daemons)]) + "\n")
        else:
            self.draw(daemons, rounds)


@contextlib.contextmanager
def _sigterm_stops() -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise _Stop

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: no handler, Ctrl-C still works
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _argv(
    args: argparse.Namespace, index: int, port: int, workdir: Path, boot: str | None
) -> list[str]:
    argv = [sys.executable, "-m", "p2p.cli", "start", "--listen", f"127.0.0.1:{port}"]
    argv += ["--data-dir", str(workdir / f"peer{index}"), "--config", str(workdir / "demo.toml")]
    argv += ["--task", args.task, "--rounds", str(args.rounds)]
    argv += ["--group-size", str(args.group_size), "--epsilon", str(args.epsilon)]
    argv += ["--delta", str(args.delta), "--privacy", args.privacy_unit]
    argv += ["--algorithm", args.algorithm, "--seed", str(args.seed)]
    argv += ["--shard", f"{index}/{args.peers}"]
    if boot is not None:
        argv += ["--bootstrap", boot]
    return argv


def _check(args: argparse.Namespace) -> None:
    if args.peers < 3:
        raise ConfigError("--peers must be at least 3 (the smallest secure group)")
    if args.group_size is None:
        args.group_size = min(args.peers, 4)
    if not 3 <= args.group_size <= args.peers:
        raise ConfigError(f"--group-size must be between 3 and --peers ({args.peers})")
    if args.rounds < 1:
        raise ConfigError("--rounds must be at least 1")
    if not args.interval > 0 or not args.timeout > 0:
        raise ConfigError("--interval and --timeout must be > 0")


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo; 0 when every peer finished its rounds, 1 if one failed, 130 on Ctrl-C."""
    _check(args)
    out = sys.stdout
    keep = args.workdir is not None
    workdir = Path(args.workdir) if keep else Path(tempfile.mkdtemp(prefix="murmur-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "demo.toml").write_text(_CONFIG)
    root = str(Path(__file__).resolve().parent.parent)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
    }
    ports = _free_ports(args.peers)
    boot = f"127.0.0.1:{ports[0]}"
    daemons = [
        _Daemon(i, port, workdir, _argv(args, i, port, workdir, None if i == 0 else boot))
        for i, port in enumerate(ports)
    ]
    unit = (
        "no DP"
        if args.privacy_unit == "none"
        else (f"{args.privacy_unit}-level DP epsilon={args.epsilon:g} delta={args.delta:g}")
    )
    print(
        f"murmur demo: {args.peers} daemons on 127.0.0.1 train {args.task} for {args.rounds} "
        f"rounds, {args.algorithm} groups of {args.group_size}, {unit}\n"
        f"bootstrap {boot}; data and logs in {workdir}",
        file=out,
        flush=True,
    )
    table = _Table(out, live=out.isatty() and not args.no_live)
    if not table.live:
        print(HEADER, file=out, flush=True)
    code = 1
    try:
        with _sigterm_stops():
            try:
                code = _run(args, daemons, env, table)
            except (KeyboardInterrupt, _Stop):
                print("\ninterrupted: stopping the daemons", file=out, flush=True)
                code = 130
            finally:
                _stop_all(daemons, out)
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return code


def _run(
    args: argparse.Namespace, daemons: list[_Daemon], env: dict[str, str], table: _Table
) -> int:
    first, rest = daemons[0], daemons[1:]
    started = time.monotonic()
    first.start(env)
    print(f"started peer 0 (pid {first.proc.pid if first.proc else '?'})", flush=True)
    _wait_up(first, started + 120.0)
    for d in rest:
        d.start(env)
        print(f"started peer {d.index} (pid {d.proc.pid if d.proc else '?'})", flush=True)
    deadline = started + args.timeout
    while True:
        for d in daemons:
            if d.exit_code is None:
                st = _status(d.port)
                if st is not None:
                    d.last = st
        table.draw(daemons, args.rounds)
        failed = [d for d in daemons if d.exit_code is not None]
        if failed:
            d = failed[0]
            print(f"peer {d.index} exited with status {d.exit_code}:\n{d.log_tail()}", flush=True)
            return 1
        if all(d.last.get("training") in FINISHED for d in daemons):
            table.final(daemons, args.rounds)
            _summary(daemons, time.monotonic() - started)
            return 0
        if time.monotonic() > deadline:
            raise Timeout(f"the peers did not finish within --timeout {args.timeout:g} s")
        time.sleep(args.interval)


def _wait_up(d: _Daemon, deadline: float) -> None:
    while _status(d.port, timeout=0.5) is None:
        if d.exit_code is not None:
            raise PeerUnreachable(
                f"peer {d.index} exited with status {d.exit_code}:\n{d.log_tail()}"
            )
        if time.monotonic() > deadline:
            raise Timeout(f"peer {d.index} did not answer on {d.address}")
        time.sleep(0.1)


def _summary(daemons: list[_Daemon], elapsed: float) -> None:
    acc = [d.last.get("accuracy") for d in daemons]
    init = [d.last.get("initial_accuracy") for d in daemons]
    eps = [d.last.get("epsilon_spent") for d in daemons]
    good = [a for a in acc if isinstance(a, int | float)]
    start = [a for a in init if isinstance(a, int | float)]
    spent = [e for e in eps if isinstance(e, int | float)]
    line = f"all peers finished in {elapsed:.1f} s"
    if good and start:
        line += f"; accuracy {sum(start) / len(start):.3f} -> {sum(good) / len(good):.3f} (mean)"
    if spent:
        line += f"; epsilon spent <= {max(spent):.3f}"
    print(line, flush=True)


def _stop_all(daemons: list[_Daemon], out: TextIO) -> None:
    for d in daemons:
        d.stop()
    codes = [d.reap(STOP_GRACE_S) for d in daemons]
    started = [c for c in codes if c is not None]
    print(f"stopped {len(started)} daemon(s); exit codes {started}", file=out, flush=True)
