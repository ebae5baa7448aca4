"""One document's local replica: what this device holds of it, loaded from the device store.

:class:`Replica` is the state every engine module shares: the decided log (``values`` and
their certificates in ``decided``), the epoch and status, the MLS group, the CRDT, the causal
delivery buffer (what was delivered from whom), the app's listeners and the alarms. It also
owns the rows that describe a document (:func:`insert_document`) and the "content still to
come" mark of a joined document (:func:`mark_needs_state`, :attr:`Replica.state_loaded`).

The engine modules change this state, each for its own concept: :mod:`device.outbox` (our
updates), :mod:`device.inbox` (others' updates), :mod:`device.membership` (decisions).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

import msgpack
import trio

from device.compaction_check import Ledger
from device.crdt_loro import BACKENDS
from device.events import Alarm, Event
from device.host import Host
from device.mls import MlsGroup
from proto import entropy
from proto.causal import CausalBuffer
from proto.codec import decode_as
from proto.crdt import CrdtBackend
from proto.identity import short_id
from proto.logs import get_logger
from proto.manifest import LogValue, Manifest, may_send
from proto.p2p import SnapshotBody, snapshot_digest
from proto.paxos.messages import Decided
from proto.payload import Payload, vector_deps
from proto.wakeup import Signal

log = get_logger("device.document")


def needs_state_key(group_id: bytes) -> str:
    """Meta key present while a joined document still waits for a member's state."""
    return f"needs_state:{group_id.hex()}"


def mark_needs_state(db: Any, group_id: bytes) -> None:
    """Record (inside the join's transaction) that the document's content is still to come."""
    db.execute("INSERT OR REPLACE INTO meta VALUES (?,?)", (needs_state_key(group_id), b"1"))


def insert_document(db: sqlite3.Connection, gid: bytes, name: str, crdt: str,
                    epoch: int) -> None:
    """The row of a new document (created here at epoch 0, or joined at ``epoch``)."""
    db.execute("INSERT INTO documents VALUES (?,?,?,?,?,?,?,?,?,?)",
               (gid, name, crdt, entropy.randbits(63), epoch, epoch, 1, msgpack.packb({}),
                "active", entropy.wall()))


class Replica:
    """A document's state on this device (see the module doc)."""

    def __init__(self, host: Host, group_id: bytes) -> None:
        self.host = host
        self.store = host.store
        self.group_id = group_id
        self.me = host.fingerprint
        row = self.store.one("SELECT name, crdt, peer_id, epoch, joined_epoch, delivered, "
                             "status FROM documents WHERE group_id=?", group_id)
        self.name: str = row[0]
        self.crdt_type: str = row[1]
        peer_id: int = row[2]
        self.epoch: int = row[3]
        self.joined_epoch: int = row[4]
        delivered: bytes = row[5]
        self.status: str = row[6]
        self.values: dict[int, LogValue] = {}
        self.decided: dict[int, Decided] = {}
        for slot, value, dec in self.store.all("SELECT slot, value, decided FROM log WHERE "
                                               "group_id=? ORDER BY slot", group_id):
            self.values[slot] = LogValue.decode(value)
            if dec is not None:
                self.decided[slot] = decode_as(dec, Decided)
        self.mls: MlsGroup = host.mls.load(group_id)
        snap = self.store.one("SELECT snapshot FROM crdt_snapshot WHERE group_id=?", group_id)
        self.crdt: CrdtBackend = BACKENDS[self.crdt_type](peer_id, snap[0] if snap else None)
        updates = [u for (u,) in self.store.all("SELECT data FROM crdt_updates WHERE group_id=? "
                                                "ORDER BY id", group_id)]
        self.updates_since_snapshot = len(updates)
        self.crdt.apply(updates)
        pending = [Payload.decode(p) for (p,) in self.store.all(
            "SELECT payload FROM pending WHERE group_id=?", group_id)]
        self.buffer = CausalBuffer(msgpack.unpackb(delivered, strict_map_key=False), pending)
        self.ledger = Ledger(self.crdt)
        """Checks decided compaction points against what we hold (:mod:`device.compaction`)."""
        if self.epoch in self.values:
            self.ledger.load(self.values[self.epoch].manifest.compaction, self.epoch)
        self.listeners: list[Callable[[Event], None]] = []
        self.learn_wanted = Signal()
        self.fork_suspected = False
        """A certified decision followed another log (:meth:`Membership.find_fork`)."""
        self.fork_searched: set[bytes] = set()
        """Syncnodes whose log :meth:`Membership.find_fork` searched already."""
        """Fires when something shows that syncnodes decided slots we have not applied."""
        self.epoch_changed = Signal()
        self.learned = trio.Event()
        """Set once a syncnode told us every decision it has (this run): edits are sealed
        after it, so they do not go out in an epoch the group has left (members added since
        could not read them)."""
        self.apply_lock = trio.Lock()
        """Held while received envelopes or decisions are applied (one engine step at a time)."""
        self.state_loaded = trio.Event()
        """Set once this device holds the document's content (always, except right after a
        join until a member's state arrived)."""
        if self.store.get_meta(needs_state_key(group_id)) is None:
            self.state_loaded.set()

    @property
    def manifest(self) -> Manifest:
        return self.values[self.epoch].manifest

    @property
    def may_send(self) -> bool:
        """Whether envelopes of ours are accepted at the current epoch: not as a reader, whose
        updates syncnodes refuse and members drop (:func:`proto.manifest.may_send`). A reader
        seals nothing: no edits, no states, no state requests."""
        entry = self.manifest.device(self.me)
        return entry is not None and may_send(entry)

    def delivered_blob(self) -> bytes:
        """The delivered watermarks as stored in the document's row."""
        return msgpack.packb(self.buffer.delivered)  # type: ignore[no-any-return]

    def emit(self, event: Event) -> None:
        for cb in list(self.listeners):
            try:
                cb(event)
            except Exception:
                log.exception("event listener failed")

    def alarm(self, kind: str, detail: str, evidence: bytes | None = None) -> None:
        """Record an alarm (once per kind and detail) and tell the app."""
        if self.store.one("SELECT 1 FROM alarms WHERE group_id=? AND kind=? AND detail=?",
                          self.group_id, kind, detail):
            return  # raised already (the same bad decision keeps arriving from syncnodes)
        log.error("alarm", doc=short_id(self.group_id), kind=kind, detail=detail)
        with self.store.transaction() as db:
            db.execute("INSERT INTO alarms (group_id, kind, detail, evidence, at) "
                       "VALUES (?,?,?,?,?)",
                       (self.group_id, kind, detail, evidence, entropy.wall()))
        self.emit(Alarm(kind, detail))

    def alarms(self) -> list[Alarm]:
        return [Alarm(k, d) for k, d in self.store.all(
            "SELECT kind, detail FROM alarms WHERE group_id=? ORDER BY id", self.group_id)]

    def alarm_records(self) -> list[tuple[str, str, bytes | None]]:
        """Every alarm with its evidence (an encoded proof, when it has one)."""
        return [(k, d, e) for k, d, e in self.store.all(
            "SELECT kind, detail, evidence FROM alarms WHERE group_id=? ORDER BY id",
            self.group_id)]

    def compact(self) -> None:
        """Replace the stored CRDT updates by one snapshot (bounded load time)."""
        snap = self.crdt.snapshot()
        with self.store.transaction() as db:
            db.execute("INSERT OR REPLACE INTO crdt_snapshot VALUES (?,?)", (self.group_id, snap))
            db.execute("DELETE FROM crdt_updates WHERE group_id=?", (self.group_id,))
        self.updates_since_snapshot = 0

    def applied(self, count: int) -> None:
        """``count`` more CRDT updates were stored: fold them into a snapshot every
        ``snapshot_every``."""
        self.updates_since_snapshot += count
        if self.updates_since_snapshot >= self.host.config.snapshot_every:
            self.compact()

    def state_arrived(self, db: Any) -> None:
        """A whole-document state was loaded (inside that step's transaction)."""
        if not self.state_loaded.is_set():
            db.execute("DELETE FROM meta WHERE key=?", (needs_state_key(self.group_id),))
            self.state_loaded.set()

    def snapshot_body(self, data: bytes) -> SnapshotBody:
        """What a snapshot ``data`` just taken covers (epoch, size, hash, delivered vector):
        take both in one synchronous step, so they match."""
        return SnapshotBody(self.group_id, self.epoch, len(data), snapshot_digest(data),
                            vector_deps(self.buffer.delivered), self.crdt.backend_id)
