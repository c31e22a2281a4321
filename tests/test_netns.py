"""Peers behind firewalls on real separate network stacks: Linux network namespaces joined by
veth pairs to one bridge, no mock network.

Each host is its own namespace with its own address (10.77.0.N). A *firewalled* host accepts
no connection: the bridge drops every TCP SYN (without ACK) going to it (an htb class with a
zero-length queue, selected by a u32 match on the TCP flags), so its outbound connections work
and nobody can dial it, as behind a NAT. Its daemon listens and advertises its address like
any other; it learns from the dial-back check that nobody reached it, asks reachable peers to
relay for it and names them in its record. The tests skip, with the reason, where namespaces,
the bridge, htb/u32 or netem are unavailable (not root, a container without CAP_NET_ADMIN, a
kernel without sch_netem).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUBNET = "10.77.0"
PORT = 7070

FAST_CONFIG = """
log_level = "info"
[membership]
exchange_interval_s = 0.3
ping_interval_s = 0.25
ping_timeout_s = 1.0
suspect_after_s = 2.0
dead_after_s = 4.0
join_timeout_s = 2.0
join_attempts = 5
join_retry_delay_s = 0.5
[transport]
shutdown_timeout_s = 0.5
request_timeout_s = 3.0
connect_timeout_s = 1.5
"""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _tc(ns: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["tc", "-n", ns, *args], capture_output=True, text=True, check=False)


def _unavailable(netem: bool) -> str | None:
    """Why these tests cannot run here (None: they can)."""
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (ip, tc) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (CAP_NET_ADMIN)"
    name = f"mmprobe{os.getpid()}"
    made = _ip("netns", "add", name, check=False)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    try:
        steps = [
            ("a bridge", ["ip", "-n", name, "link", "add", "br0", "type", "bridge"]),
            ("veth pairs", ["ip", "-n", name, "link", "add", "v0", "type", "veth", "peer",
                            "name", "v1"]),
            ("the htb qdisc", ["tc", "-n", name, "qdisc", "add", "dev", "v0", "root", "handle",
                               "1:", "htb"]),
            ("the u32 classifier", ["tc", "-n", name, "filter", "add", "dev", "v0", "parent",
                                    "1:", "protocol", "ip", "u32", "match", "u8", "0x02",
                                    "0x12", "at", "33", "flowid", "1:2"]),
        ]  # fmt: skip
        if netem:
            steps.append(("the netem qdisc (kernel module sch_netem)",
                          ["tc", "-n", name, "qdisc", "add", "dev", "v1", "root", "netem",
                           "delay", "50ms", "loss", "1%"]))  # fmt: skip
        for what, step in steps:
            done = subprocess.run(step, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                return f"this machine has no {what}: {done.stderr.strip()}"
    finally:
        _ip("netns", "del", name, check=False)
    return None


class Lan:
    """A bridge namespace and host namespaces on it; ``close()`` removes them all."""

    def __init__(self, workdir: Path) -> None:
        self.prefix = f"mm{os.getpid() % 100000}"
        self.hub = f"{self.prefix}hub"
        self.workdir = workdir
        self.hosts: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        _ip("netns", "add", self.hub)
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.hub, "link", "set", "br0", "up")

    def address(self, index: int) -> str:
        return f"{SUBNET}.{index + 1}"

    def add_host(self, *, firewalled: bool = False, netem: str | None = None) -> int:
        index = len(self.hosts)
        ns = f"{self.prefix}h{index}"
        outer, inner = f"{self.prefix}o{index}", f"{self.prefix}i{index}"
        _ip("netns", "add", ns)
        self.hosts.append(ns)
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        _ip("link", "set", outer, "netns", self.hub)
        _ip("link", "set", inner, "netns", ns)
        _ip("-n", self.hub, "link", "set", outer, "master", "br0")
        _ip("-n", self.hub, "link", "set", outer, "up")
        _ip("-n", ns, "addr", "add", f"{self.address(index)}/24", "dev", inner)
        _ip("-n", ns, "link", "set", inner, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        if firewalled:
            # Packets toward the host leave the bridge through `outer`: SYNs go to a class
            # whose queue holds nothing (dropped), everything else to the default class.
            for args in (
                ["qdisc", "add", "dev", outer, "root", "handle", "1:", "htb", "default", "1",
                 "r2q", "100000"],
                ["class", "add", "dev", outer, "parent", "1:", "classid", "1:1", "htb", "rate",
                 "10gbit"],
                ["class", "add", "dev", outer, "parent", "1:", "classid", "1:2", "htb", "rate",
                 "10gbit"],
                ["qdisc", "add", "dev", outer, "parent", "1:2", "handle", "20:", "pfifo",
                 "limit", "0"],
                ["filter", "add", "dev", outer, "parent", "1:", "protocol", "ip", "prio", "1",
                 "u32", "match", "ip", "protocol", "6", "0xff", "match", "u8", "0x05", "0x0f",
                 "at", "0", "match", "u8", "0x02", "0x12", "at", "33", "flowid", "1:2"],
            ):  # fmt: skip
                done = _tc(self.hub, *args)
                assert done.returncode == 0, done.stderr
        if netem:
            # Delay and loss on what the host sends (both directions are covered: every host
            # has its own).
            done = _tc(ns, "qdisc", "add", "dev", inner, "root", "netem", *netem.split())
            assert done.returncode == 0, done.stderr
        return index

    def start(self, index: int, name: str, *args: str) -> subprocess.Popen[bytes]:
        config = self.workdir / "fast.toml"
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        try:
            proc = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.hosts[index],
                    sys.executable,
                    "-m",
                    "p2p.cli",
                    "start",
                    "--listen",
                    f"0.0.0.0:{PORT}",
                    "--advertise",
                    f"{self.address(index)}:{PORT}",
                    "--data-dir",
                    str(self.workdir / name),
                    "--config",
                    str(config),
                    *args,
                ],
                stdout=subprocess.DEVNULL,
                stderr=log,
                cwd=ROOT,
            )
        finally:
            log.close()
        self.procs.append(proc)
        return proc

    def status(self, index: int) -> dict[str, Any]:
        """The daemon's status, asked from inside its namespace (admin answers loopback)."""
        code = (
            "import json,urllib.request;"
            f"print(urllib.request.urlopen('http://127.0.0.1:{PORT}/v1/status',timeout=3).read()"
            ".decode())"
        )
        done = subprocess.run(
            ["ip", "netns", "exec", self.hosts[index], sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=False,
            timeout=20,
        )
        if done.returncode != 0:
            return {}
        result: dict[str, Any] = json.loads(done.stdout)
        return result

    def log(self, name: str) -> str:
        try:
            return (self.workdir / f"{name}.log").read_text(errors="replace")[-4000:]
        except OSError:
            return "(no log)"

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for ns in [*self.hosts, self.hub]:
            _ip("netns", "del", ns, check=False)


@pytest.fixture
def lan(tmp_path: Path) -> Iterator[Lan]:
    reason = _unavailable(netem=False)
    if reason is not None:
        pytest.skip(reason)
    made = Lan(tmp_path)
    try:
        yield made
    finally:
        made.close()


def training(index: int, peers: int, rounds: int, group: int) -> list[str]:
    return [
        "--task", "digits",
        "--rounds", str(rounds),
        "--group-size", str(group),
        # Record-level DP (the daemon tests' setting): DP-SGD steps make rounds long enough
        # that peers starting a moment apart still meet in their first rounds.
        "--privacy", "record",
        "--epsilon", "8",
        "--delta", "1e-5",
        "--ring", "auto",
        "--value-bound", "10",
        "--algorithm", "secure",
        "--seed", "0",
        "--shard", f"{index}/{peers}",
    ]  # fmt: skip


def wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        time.sleep(0.5)


def run_network(
    lan: Lan, *, reachable: int, firewalled: int, rounds: int, netem: str | None = None
) -> tuple[list[dict[str, Any]], list[int], list[int]]:
    """Start ``reachable`` + ``firewalled`` training daemons; return their final statuses."""
    peers = reachable + firewalled
    open_hosts = [lan.add_host(netem=netem) for _ in range(reachable)]
    closed_hosts = [lan.add_host(firewalled=True, netem=netem) for _ in range(firewalled)]
    boot = f"{lan.address(0)}:{PORT}"
    group = min(peers, 5)
    # Everyone starts once it sees all the others live: the firewalled ones only once their
    # relays are in their records.
    wait = f"[training]\nwait_peers = {peers - 1}\nstart_timeout_s = 90.0\n"
    (lan.workdir / "fast.toml").write_text(FAST_CONFIG + wait)
    for index in range(peers):
        more = () if index == 0 else ("--bootstrap", boot)
        lan.start(index, f"p{index}", *training(index, peers, rounds, group), *more)

    def done() -> bool:
        for index, proc in enumerate(lan.procs):
            if proc.poll() is not None:
                raise AssertionError(f"p{index} exited: {lan.log(f'p{index}')}")
        return all((lan.workdir / f"p{i}" / "model.json").exists() for i in range(peers))

    wait_for(done, 120.0 + 25.0 * rounds, "every peer to finish its rounds")
    statuses = [lan.status(i) for i in range(peers)]
    return statuses, open_hosts, closed_hosts


@pytest.mark.timeout(420)  # its own waits end first (~30 s when all is well)
def test_firewalled_peers_train_in_secure_groups_through_relays(lan: Lan) -> None:
    """Three reachable peers and two that accept no connection train digits in secure groups;
    the two are in groups (through relays that forwarded only sealed envelopes)."""
    rounds = 8
    statuses, open_hosts, closed_hosts = run_network(lan, reachable=3, firewalled=2, rounds=rounds)
    where = "\n".join(f"p{i}: {s}" for i, s in enumerate(statuses))
    logs = "\n".join(lan.log(f"p{i}") for i in closed_hosts)
    for i in open_hosts:
        assert statuses[i]["reachable"] == "yes", where
        assert statuses[i]["relays"] == [], where
    for i in closed_hosts:
        st = statuses[i]
        assert st["reachable"] == "no", where
        assert st["relays"], where
        assert all(a.startswith("relay:") for a in st["addresses"]), where
        assert st["ok_rounds"] + st["recovered_rounds"] >= rounds // 2, f"{where}\n{logs}"
        assert st["accuracy"] > st["initial_accuracy"] + 0.2, where
    forwarded = sum(statuses[i]["relay_forwarded"] for i in open_hosts)
    refused = sum(statuses[i]["relay_refused"] for i in open_hosts)
    assert forwarded > 0, where
    # A relay forwards only SEALED envelopes, whose bodies it cannot open (it refuses others
    # and counts them): nobody even tried to send it anything else.
    assert refused == 0, where
    for i in open_hosts:
        assert statuses[i]["ok_rounds"] + statuses[i]["recovered_rounds"] >= rounds // 2, where


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_eight_peers_two_behind_relays_complete_ten_secure_rounds_over_a_lossy_wan(
    tmp_path: Path,
) -> None:
    """50 ms delay and 1% loss on every host (``tc netem``): 8 peers, 2 firewalled, 10 rounds."""
    reason = _unavailable(netem=True)
    if reason is not None:
        pytest.skip(reason)
    lan = Lan(tmp_path)
    try:
        rounds = 10
        statuses, _, closed = run_network(
            lan, reachable=6, firewalled=2, rounds=rounds, netem="delay 50ms loss 1%"
        )
        where = "\n".join(f"p{i}: {s}" for i, s in enumerate(statuses))
        for st in statuses:
            assert st["round"] == rounds, where
            assert st["ok_rounds"] + st["recovered_rounds"] >= rounds // 2, where
        for i in closed:
            assert statuses[i]["reachable"] == "no" and statuses[i]["relays"], where
    finally:
        lan.close()
