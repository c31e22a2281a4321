"""Membership: who is in the network, learnt from signed peer records, kept fresh by gossip.

``PeerView`` is the socket-free core: it checks records, keeps an active view (capped, pinged)
and a passive reserve (HyParView's idea), and applies SWIM-style suspicion and removal from
the times it is given. ``Membership`` drives it over a ``Transport``: bootstrap join, periodic
peer exchange with a few random peers (Cyclon-like), pings, persistence in the data dir.
Protocol time comes from the event loop's clock; record timestamps from the wall clock.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from floor.envelope import Received
from floor.errors import (
    BadSignature,
    ConfigError,
    InconsistentMessage,
    MurmurError,
    NetworkError,
    PeerUnreachable,
    ProtocolError,
    RefusalCode,
    RemoteRefused,
)
from floor.identity import Identity, PeerId
from floor.transport.base import Transport
from p2p.config import MembershipConfig
from p2p.messages import Exchange, ExchangeReply, Join, JoinReply, PeerRecord, Ping, Pong

__all__ = ["Membership", "MembershipConfig", "PeerEntry", "PeerView"]

log = logging.getLogger("murmur.membership")

PEERS_FILE = "peers.json"
MAX_ADDRESSES = 8
MAX_RECORDS_PER_MESSAGE = 64


@dataclass(slots=True)
class PeerEntry:
    """One peer in the active view."""

    record: PeerRecord
    last_seen: float
    """Loop time of the last authenticated contact (or when the peer entered the view)."""
    suspect: bool = False
    confirmed: bool = False
    """Whether the peer itself has answered us or written to us since it entered the view."""


class PeerView:
    """The socket-free membership state: records, active view, reserve, suspicion.

    ``now`` arguments are event-loop times; ``wall_now`` is the wall clock used to judge record
    timestamps. ``valid_address`` and ``admit`` filter records (malformed addresses, allowlist).
    """

    def __init__(
        self,
        self_id: PeerId,
        config: MembershipConfig,
        *,
        valid_address: Callable[[str], bool],
        admit: Callable[[PeerId], bool] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.self_id = self_id
        self.config = config
        self._valid_address = valid_address
        self._admit = admit
        self._rng = rng or random.Random()
        self.active: dict[PeerId, PeerEntry] = {}
        self.passive: dict[PeerId, PeerRecord] = {}
        self._tombstones: dict[PeerId, tuple[float, float]] = {}  # peer -> (record ts, until)
        self.changed = False

    def offer(self, record: PeerRecord, now: float, wall_now: float) -> bool:
        """Consider a record; return True if it was taken (new peer or newer record).

        Dropped silently: our own, older than what we hold, not allowed, stamped too far in
        the future, refused by a tombstone, malformed addresses, or a bad signature.
        """
        peer = record.peer_id
        if peer == self.self_id or (self._admit is not None and not self._admit(peer)):
            return False
        known = self.known(peer)
        if known is not None and record.timestamp <= known.timestamp:
            return False
        stone = self._tombstones.get(peer)
        if stone is not None:
            if now < stone[1] and record.timestamp <= stone[0]:
                return False
            del self._tombstones[peer]
        if record.timestamp > wall_now + self.config.max_clock_skew_s:
            return False
        if not 0 < len(record.addresses) <= MAX_ADDRESSES or not all(
            self._valid_address(a) for a in record.addresses
        ):
            return False
        try:
            record.verify()
        except BadSignature:
            return False
        entry = self.active.get(peer)
        if entry is not None:
            entry.record = record
        elif len(self.active) < self.config.max_view:
            self.passive.pop(peer, None)
            self.active[peer] = PeerEntry(record, last_seen=now)
        else:
            self._to_passive(record)
        self.changed = True
        return True

    def known(self, peer: PeerId) -> PeerRecord | None:
        """The record held for ``peer`` (active or passive), if any."""
        entry = self.active.get(peer)
        return entry.record if entry is not None else self.passive.get(peer)

    def seen(self, peer: PeerId, now: float, *, confirm: bool = True) -> None:
        """Note an authenticated contact from ``peer`` (clears suspicion).

        ``confirm=False``: the peer wrote to us, but none of its addresses is proven yet (a
        record can name anyone's address): it stays unconfirmed, so it is neither offered to
        protocols nor passed on to other peers until an answer from its address proves it.
        """
        entry = self.active.get(peer)
        if entry is None:
            record = self.passive.get(peer)
            if record is None or len(self.active) >= self.config.max_view:
                return
            del self.passive[peer]
            entry = self.active[peer] = PeerEntry(record, last_seen=now)
            self.changed = True
        entry.last_seen = max(entry.last_seen, now)
        entry.suspect = False
        entry.confirmed = entry.confirmed or confirm

    def tick(self, now: float) -> list[PeerId]:
        """Apply suspicion and removal at time ``now``; refill from the reserve.

        Returns the peers removed from the active view.
        """
        removed: list[PeerId] = []
        for peer, entry in list(self.active.items()):
            silence = now - entry.last_seen
            if silence >= self.config.dead_after_s:
                del self.active[peer]
                self._tombstones[peer] = (entry.record.timestamp, now + self.config.tombstone_s)
                removed.append(peer)
            elif silence >= self.config.suspect_after_s:
                entry.suspect = True
        for peer, (_, until) in list(self._tombstones.items()):
            if now >= until:
                del self._tombstones[peer]
        while len(self.active) < self.config.max_view and self.passive:
            peer = self._rng.choice(list(self.passive))
            self.active[peer] = PeerEntry(self.passive.pop(peer), last_seen=now)
        if removed:
            self.changed = True
        return removed

    def live(self) -> list[PeerEntry]:
        """Active peers that have been in contact and are not under suspicion."""
        return [e for e in self.active.values() if e.confirmed and not e.suspect]

    def due_for_ping(self, now: float) -> list[PeerId]:
        """Active peers never confirmed, or not heard from for ``ping_interval_s``."""
        limit = self.config.ping_interval_s
        return [p for p, e in self.active.items() if not e.confirmed or now - e.last_seen >= limit]

    def sample_peers(self, k: int) -> list[PeerId]:
        """Up to ``k`` random live peers."""
        live = [e.record.peer_id for e in self.live()]
        return self._rng.sample(live, min(k, len(live)))

    def sample_records(self, k: int, exclude: PeerId | None = None) -> list[PeerRecord]:
        """Up to ``k`` random records of live peers (not ``exclude``)."""
        records = [e.record for e in self.live() if e.record.peer_id != exclude]
        return self._rng.sample(records, min(k, len(records)))

    def all_records(self) -> list[PeerRecord]:
        """Every record held (active first), for persistence."""
        return [e.record for e in self.active.values()] + list(self.passive.values())

    def _to_passive(self, record: PeerRecord) -> None:
        if record.peer_id not in self.passive and len(self.passive) >= self.config.max_passive:
            del self.passive[self._rng.choice(list(self.passive))]
        self.passive[record.peer_id] = record


def record_to_json(record: PeerRecord) -> dict[str, object]:
    """A JSON-ready form of a record (public data only)."""
    return {
        "peer_id": str(record.peer_id),
        "addresses": list(record.addresses),
        "timestamp": record.timestamp,
        "signature": record.signature.hex(),
    }


def record_from_json(data: object) -> PeerRecord:
    """Rebuild a record from ``record_to_json`` output; ConfigError if malformed."""
    try:
        if not isinstance(data, dict):
            raise TypeError("not an object")
        return PeerRecord(
            peer_id=PeerId.parse(str(data["peer_id"])),
            addresses=tuple(str(a) for a in data["addresses"]),
            timestamp=float(data["timestamp"]),
            signature=bytes.fromhex(str(data["signature"])),
        )
    except (KeyError, TypeError, ValueError, MurmurError) as exc:
        raise ConfigError(f"bad stored peer record: {exc}") from None


class Membership:
    """Joins a network and keeps the view over a transport. Run with ``async with``.

    ``run()`` holds the periodic exchange and ping loop; the owner runs it in its TaskGroup.
    """

    def __init__(
        self,
        identity: Identity,
        transport: Transport,
        config: MembershipConfig | None = None,
        *,
        data_dir: Path | None = None,
        admit: Callable[[PeerId], bool] | None = None,
        rng: random.Random | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config or MembershipConfig()
        self._identity = identity
        self._transport = transport
        self._data_dir = data_dir
        self._wall = wall_clock
        self._rng = rng or random.Random()
        self.view = PeerView(
            identity.peer_id,
            self.config,
            valid_address=transport.accepts_address,
            admit=admit,
            rng=self._rng,
        )
        self._record: PeerRecord | None = None
        self._seq = 0
        self.joins_received = 0
        """Joins others sent us: each came over a connection the joiner opened to us."""
        transport.register(Join, self._on_join)
        transport.register(Exchange, self._on_exchange)
        transport.register(Ping, self._on_ping)
        transport.add_contact_listener(self._on_contact)
        self._load()

    # -- time and our own record -----------------------------------------------------------
    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    def own_record(self) -> PeerRecord:
        """Our signed record, re-signed with a fresh timestamp when the addresses changed or
        it is older than the exchange interval (so peers see newer records from live peers)."""
        addresses = self._transport.addresses
        wall = self._wall()
        rec = self._record
        if rec is None or rec.addresses != addresses or wall - rec.timestamp >= 1.0:
            stamp = wall if rec is None else max(wall, rec.timestamp + 1e-6)
            self._record = PeerRecord.create(self._identity, addresses, stamp)
        assert self._record is not None
        return self._record

    def _take(self, records: Iterable[PeerRecord]) -> int:
        now, wall = self._now(), self._wall()
        taken = 0
        for record in list(records)[:MAX_RECORDS_PER_MESSAGE]:
            if self.view.offer(record, now, wall):
                taken += 1
                self._transport.set_addresses(record.peer_id, record.addresses)
        return taken

    def _proven(self, peer: PeerId) -> bool:
        transport = self._transport
        return any(transport.is_proven(peer, a) for a in transport.addresses_of(peer))

    def _on_contact(self, peer: PeerId) -> None:
        self.view.seen(peer, self._now(), confirm=self._proven(peer))

    # -- handlers ----------------------------------------------------------------------------
    async def _on_join(self, received: Received) -> JoinReply:
        message = received.message
        assert isinstance(message, Join)
        if message.record.peer_id != received.sender:
            raise InconsistentMessage("a Join must carry the sender's own record")
        self.joins_received += 1
        self._take([message.record])
        self.view.seen(received.sender, self._now(), confirm=self._proven(received.sender))
        sample = self.view.sample_records(self.config.exchange_size, exclude=received.sender)
        return JoinReply(records=(self.own_record(), *sample))

    async def _on_exchange(self, received: Received) -> ExchangeReply:
        message = received.message
        assert isinstance(message, Exchange)
        self._take(message.records)
        sample = self.view.sample_records(self.config.exchange_size, exclude=received.sender)
        return ExchangeReply(records=(self.own_record(), *sample))

    async def _on_ping(self, received: Received) -> Pong:
        message = received.message
        assert isinstance(message, Ping)
        return Pong(seq=message.seq)

    # -- join ------------------------------------------------------------------------------
    async def join(self, bootstrap: Iterable[str]) -> int:
        """Join through the given addresses (and stored peers); return how many answered.

        Raises ``PeerUnreachable`` if addresses were given and none answered after
        ``join_attempts`` rounds, and ``RemoteRefused`` without retrying if nobody answered
        and a bootstrap address refused us as unauthorized (wrong or missing network key, not
        on the allowlist). Stored addresses may be stale (now someone else's): their
        refusals only count as silence.
        """
        addresses = list(dict.fromkeys(bootstrap))
        relayed = self._transport.is_relayed  # a join is SIGNED: no relay forwards it
        stored = [a for r in self.view.all_records() for a in r.addresses[:1] if not relayed(a)]
        stored = [a for a in dict.fromkeys(stored) if a not in addresses]
        if not addresses and not stored:
            return 0
        last_error: Exception | None = None
        for attempt in range(self.config.join_attempts):
            if attempt:
                await asyncio.sleep(self.config.join_retry_delay_s)
            targets = addresses + stored
            results = await asyncio.gather(
                *(self._join_one(a) for a in targets), return_exceptions=True
            )
            answered = 0
            refused: RemoteRefused | None = None
            for address, result in zip(targets, results, strict=True):
                if result is None:
                    answered += 1
                elif not isinstance(result, (NetworkError, ProtocolError)):
                    raise result
                else:
                    last_error = result
                    if (
                        isinstance(result, RemoteRefused)
                        and result.code == RefusalCode.UNAUTHORIZED
                        and address in addresses
                    ):
                        refused = result
            if answered:
                log.info("event=joined answered=%d view=%d", answered, len(self.view.active))
                return answered
            if refused is not None:
                raise refused
            if not addresses:
                return 0  # only stored peers, none up: start alone and wait to be found
        raise PeerUnreachable(f"no bootstrap peer answered ({last_error})")

    async def _join_one(self, address: str) -> None:
        reply = await self._transport.request_address(
            address, Join(record=self.own_record()), timeout=self.config.join_timeout_s
        )
        if not isinstance(reply.message, JoinReply):
            raise InconsistentMessage(f"expected JoinReply, got {type(reply.message).__name__}")
        self._take(reply.message.records)
        self.view.seen(reply.sender, self._now())

    # -- the periodic loop -------------------------------------------------------------------
    async def run(self) -> None:
        """Exchange, ping, expire and persist until cancelled."""
        next_exchange = self._now()
        while True:
            now = self._now()
            for peer in self.view.tick(now):
                self._transport.forget(peer)
                log.info("event=peer_removed peer=%s", peer.short())
            async with asyncio.TaskGroup() as tg:
                for peer in self.view.due_for_ping(now):
                    tg.create_task(self._ping(peer))
                if now >= next_exchange:
                    next_exchange = now + self.config.exchange_interval_s * self._rng.uniform(
                        0.75, 1.25
                    )
                    for peer in self.view.sample_peers(self.config.exchange_fanout):
                        tg.create_task(self._exchange(peer))
            if self.view.changed:
                self.save()
            await asyncio.sleep(
                min(self.config.ping_interval_s, self.config.exchange_interval_s) / 2
            )

    async def announce(self) -> None:
        """Send our fresh record to ``exchange_fanout`` live peers now (our addresses changed:
        e.g. new relays), instead of waiting for the next exchange."""
        peers = self.view.sample_peers(self.config.exchange_fanout)
        await asyncio.gather(*(self._exchange(peer) for peer in peers))

    async def _ping(self, peer: PeerId) -> None:
        self._seq += 1
        try:
            await self._transport.request(
                peer, Ping(seq=self._seq), timeout=self.config.ping_timeout_s
            )
        except (NetworkError, ProtocolError) as exc:
            log.debug("event=ping_failed peer=%s error=%s", peer.short(), type(exc).__name__)

    async def _exchange(self, peer: PeerId) -> None:
        records = (self.own_record(), *self.view.sample_records(self.config.exchange_size, peer))
        try:
            reply = await self._transport.request(
                peer, Exchange(records=records), timeout=self.config.ping_timeout_s
            )
        except (NetworkError, ProtocolError) as exc:
            log.debug("event=exchange_failed peer=%s error=%s", peer.short(), type(exc).__name__)
            return
        if isinstance(reply.message, ExchangeReply):
            self._take(reply.message.records)

    # -- persistence -------------------------------------------------------------------------
    def save(self) -> None:
        """Write the known records to ``<data_dir>/peers.json`` atomically (if a dir is set)."""
        self.view.changed = False
        if self._data_dir is None:
            return
        path = self._data_dir / PEERS_FILE
        tmp = path.with_suffix(".tmp")
        data = [record_to_json(r) for r in self.view.all_records()]
        tmp.write_text(json.dumps(data), encoding="utf-8")
        os.replace(tmp, path)

    def _load(self) -> None:
        if self._data_dir is None:
            return
        path = self._data_dir / PEERS_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("event=peers_file_unreadable error=%s", type(exc).__name__)
            return
        records = []
        for item in data if isinstance(data, list) else []:
            try:
                record = record_from_json(item)
                record.verify()
            except (ConfigError, BadSignature):
                continue
            records.append(record)
        # Stored peers go to the reserve: they enter the active view once they answer.
        wall = self._wall()
        for record in records[: self.config.max_passive]:
            if (
                record.peer_id != self.view.self_id
                and record.timestamp <= wall + self.config.max_clock_skew_s
            ):
                self.view.passive[record.peer_id] = record
                self._transport.set_addresses(record.peer_id, record.addresses)
        self.view.changed = False
