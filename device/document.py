"""One shared document: an MLS group, a CRDT, a decided log, and its links to syncnodes.

The engine steps (each one SQLite transaction that also saves the MLS state it touched):

* **edit** (:meth:`Document.change`): run the app's function on the CRDT, store the update as
  local state and as "not yet sent". Nothing else; works offline.
* **flush** (every ``flush_interval`` while there are unsent edits): coalesce them into one
  payload, encrypt it in the current epoch, seal it in a signed envelope with the next seq and
  put it in the outbox. The outbox is sent to every syncnode of the group; an envelope leaves
  the outbox once a quorum stored it (then it is **durable**).
* **receive**: envelopes from live push and backfill are deduplicated by ``(sender, seq)``,
  checked against the manifest of their epoch, decrypted (messages of a future epoch wait for
  the commit), checked against the MLS sender, and delivered causally to the CRDT in batches.
* **decide**: a decided value is applied only in slot order, after its certificate and the
  manifest rules verify (:func:`proto.manifest.verify_decided`) and MLS accepts the commit from
  the signer. Our own membership changes go through Paxos (:meth:`_commit`); if another
  device's commit wins the slot, ours is rebuilt on the new epoch and proposed again.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack
import trio
import trio.lowlevel

from device.crdt_loro import BACKENDS, Editor
from device.errors import DocumentError, Offline
from device.invites import Added, Invites
from device.mls import MlsError, MlsGroup, identity_for
from device.paxos_driver import ProposeFailed, propose
from proto import entropy
from proto.causal import CausalBuffer
from proto.codec import decode_as, encode
from proto.crdt import CrdtBackend, PartialChange
from proto.envelope import Envelope
from proto.errors import DecodeError, SyncnodeError, TransportError
from proto.identity import fingerprint, short_id
from proto.logs import get_logger
from proto.manifest import (
    DeviceEntry,
    LogValue,
    Manifest,
    ManifestError,
    Role,
    next_manifest,
    sign_value,
    validate_transition,
    verify_decided,
)
from proto.messages import ErrorCode
from proto.paxos.messages import Decided, EquivocationProof
from proto.paxos.proposer import Lost
from proto.paxos.quorum import CertificateError
from proto.payload import (
    MAX_BODY,
    Payload,
    PayloadKind,
    pack_updates,
    unpack_updates,
    vector_deps,
)
from proto.rpc import RemoteError, Subscription, SyncnodeClient
from proto.service import MailboxNotice
from proto.ticket import NodeTicket
from proto.wakeup import Signal

if TYPE_CHECKING:
    from device.agent import Device

log = get_logger("device.document")

MAX_FLUSH_BYTES = 1024 * 1024


def _needs_state_key(group_id: bytes) -> str:
    """Meta key present while a joined document still waits for a member's state."""
    return f"needs_state:{group_id.hex()}"


def mark_needs_state(db: Any, group_id: bytes) -> None:
    """Record (inside the join's transaction) that the document's content is still to come."""
    db.execute("INSERT OR REPLACE INTO meta VALUES (?,?)", (_needs_state_key(group_id), b"1"))


@dataclass(frozen=True)
class Change:
    """A change to the document. ``origin`` is ``"local"`` or ``"remote"``; ``senders`` are the
    short ids of the devices whose updates were applied; ``updates`` counts edit updates and
    ``states`` whole-document states (a member's snapshot, which may repeat known edits)."""

    origin: str
    senders: tuple[str, ...]
    updates: int
    states: int = 0


@dataclass(frozen=True)
class Alarm:
    """Something the app must show the user: ``equivocation`` (syncnodes signed two different
    decisions for one slot — evidence is kept), ``invalid-decision``, ``bad-update``,
    ``removed``."""

    kind: str
    detail: str


Event = Change | Alarm


@dataclass(frozen=True)
class Member:
    id: str
    fingerprint: bytes
    role: str
    endpoint_id: bytes
    is_self: bool


@dataclass(frozen=True)
class SyncStatus:
    epoch: int
    durable: int
    """Our updates a quorum of syncnodes has stored."""
    unsent: int
    """Local edits not yet sealed into an update (sealed within the flush interval)."""
    outbox: int
    """Sealed updates still waiting for a quorum of acknowledgements."""
    connected: tuple[str, ...]
    syncnodes: int
    status: str


@dataclass
class _Outgoing:
    envelope: Envelope
    acks: set[bytes] = field(default_factory=set)


class Document:
    def __init__(self, device: Device, group_id: bytes) -> None:
        self.device = device
        self.store = device.store
        self.group_id = group_id
        self.me = device.fingerprint
        row = self.store.one("SELECT name, crdt, peer_id, epoch, joined_epoch, next_seq, "
                             "delivered, status FROM documents WHERE group_id=?", group_id)
        self.name: str = row[0]
        self.crdt_type: str = row[1]
        peer_id: int = row[2]
        self.epoch: int = row[3]
        self.joined_epoch: int = row[4]
        self.next_seq: int = row[5]
        delivered: bytes = row[6]
        self.status: str = row[7]
        self.values: dict[int, LogValue] = {}
        self.decided: dict[int, Decided] = {}
        for slot, value, dec in self.store.all("SELECT slot, value, decided FROM log WHERE "
                                               "group_id=? ORDER BY slot", group_id):
            self.values[slot] = LogValue.decode(value)
            if dec is not None:
                self.decided[slot] = decode_as(dec, Decided)
        self.mls: MlsGroup = device.mls.load(group_id)
        snap = self.store.one("SELECT snapshot FROM crdt_snapshot WHERE group_id=?", group_id)
        self.crdt: CrdtBackend = BACKENDS[self.crdt_type](peer_id, snap[0] if snap else None)
        updates = [u for (u,) in self.store.all("SELECT data FROM crdt_updates WHERE group_id=? "
                                                "ORDER BY id", group_id)]
        self._updates_since_snapshot = len(updates)
        self._since_state = 0  # edit updates since a whole-document state went to syncnodes
        self.crdt.apply(updates)
        pending = [Payload.decode(p) for (p,) in self.store.all(
            "SELECT payload FROM pending WHERE group_id=?", group_id)]
        self.buffer = CausalBuffer(msgpack.unpackb(delivered, strict_map_key=False), pending)
        self.outbox: dict[int, _Outgoing] = {
            seq: _Outgoing(decode_as(env, Envelope))  # acks are not kept: resending is harmless
            for seq, env in self.store.all("SELECT seq, envelope FROM outbox WHERE group_id=?",
                                           group_id)}
        self.clients: dict[bytes, SyncnodeClient] = {}
        self.future: dict[tuple[bytes, int], Envelope] = {}
        self._listeners: list[Callable[[Event], None]] = []
        self._outbox_changed = Signal()
        self._dirty = trio.Event()
        self._learn_wanted = Signal()
        self._epoch_changed = Signal()
        self._durable_changed = Signal()
        self._links_changed = Signal()
        self._propose_lock = trio.Lock()
        self._apply_lock = trio.Lock()
        self._inbox_send, self._inbox = trio.open_memory_channel[tuple[SyncnodeClient, Any]](
            4096)
        self._missing = False
        self._last_sync_request = 0.0
        self._answered: set[tuple[bytes, int]] = set()
        self._link_delay: dict[bytes, float] = {}
        self._link_attempts: dict[bytes, trio.CancelScope] = {}
        self._link_pauses: dict[bytes, trio.CancelScope] = {}
        self.invites = Invites(self)
        self.state_loaded = trio.Event()
        """Set once this device holds the document's content (always, except right after a
        join until a member's state arrived)."""
        if self.store.get_meta(_needs_state_key(group_id)) is None:
            self.state_loaded.set()
        else:
            self._missing = True
        if self.store.one("SELECT 1 FROM local_pending WHERE group_id=? LIMIT 1", group_id):
            self._dirty.set()

    # -- public API ------------------------------------------------------------------------

    @property
    def id(self) -> str:
        return self.group_id.hex()

    @property
    def manifest(self) -> Manifest:
        return self.values[self.epoch].manifest

    def value(self) -> Any:
        """The document as plain Python values."""
        return self.crdt.value()

    def change(self, fn: Callable[[Editor], Any]) -> None:
        """Apply a local edit now (also offline); it is sent within the flush interval.

        ``fn`` receives an :class:`~device.crdt_loro.Editor`: ``e.text("body").insert(0, "hi")``,
        ``e.map("meta").insert("title", "x")``, ``e.list("items").push(1)``,
        ``e.counter("likes").increment(1)``. When this returns the edit is in the database:
        it survives a crash of the process at once, and a power loss once sealed into an
        update (within ``flush_interval``/``coalesce_max``; that step fsyncs).
        """
        if self.status != "active":
            raise DocumentError(f"document is {self.status}")
        failed: BaseException | None = None
        try:
            update = self.crdt.change(fn)
        except PartialChange as partial:  # keep what it did do: saved state = state in memory
            update, failed = partial.update, partial.error
        if update is None:
            return
        with self.store.transaction(durable=False) as db:
            db.execute("INSERT INTO crdt_updates (group_id, data) VALUES (?,?)",
                       (self.group_id, update))
            db.execute("INSERT INTO local_pending (group_id, data) VALUES (?,?)",
                       (self.group_id, update))
        self._updates_since_snapshot += 1
        self._since_state += 1
        self._maybe_publish_state()
        self._dirty.set()
        self._emit(Change("local", (short_id(self.me),), 1))
        if failed is not None:
            raise failed

    def flush(self) -> None:
        """Seal pending local edits into an update now rather than at the flush interval."""
        if self.status == "active":
            while self._flush_once():
                pass

    def subscribe(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``callback`` with every :class:`Change` and :class:`Alarm`; returns a function
        that unsubscribes."""
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback)

    @asynccontextmanager
    async def events(self, buffer: int = 1024) -> AsyncIterator[trio.MemoryReceiveChannel[Event]]:
        """``async with doc.events() as changes: async for ev in changes: ...``"""
        send, receive = trio.open_memory_channel[Event](buffer)

        def push(ev: Event) -> None:
            try:
                send.send_nowait(ev)
            except trio.WouldBlock:
                pass

        unsubscribe = self.subscribe(push)
        try:
            yield receive
        finally:
            unsubscribe()

    def members(self) -> list[Member]:
        return [Member(short_id(d.fingerprint), d.fingerprint, d.role.name.lower(),
                       d.endpoint_id, d.fingerprint == self.me)
                for d in self.manifest.devices]

    def sync_status(self) -> SyncStatus:
        unsent = self.store.one("SELECT count(*) FROM local_pending WHERE group_id=?",
                                self.group_id)[0]
        return SyncStatus(self.epoch, self.next_seq - 1 - len(self.outbox), unsent,
                          len(self.outbox), tuple(short_id(n) for n in self.clients),
                          len(self.manifest.syncnodes), self.status)

    def alarms(self) -> list[Alarm]:
        return [Alarm(k, d) for k, d in self.store.all(
            "SELECT kind, detail FROM alarms WHERE group_id=? ORDER BY id", self.group_id)]

    async def wait_durable(self) -> None:
        """Until every edit made so far is stored by a quorum of syncnodes."""
        self._wake_links_below_quorum()
        while self.status == "active":
            s = self.sync_status()
            if s.unsent == 0 and s.outbox == 0:
                return
            await self._durable_changed.wait()

    async def wait_connected(self, count: int) -> None:
        """Until links to ``count`` syncnodes are up."""
        while len(self.clients) < count:
            await self._links_changed.wait()

    async def wait_epoch(self, epoch: int) -> None:
        while self.epoch < epoch:
            await self._epoch_changed.wait()

    def invite(self, ttl: float = 24 * 3600) -> str:
        """A one-time invite ticket for a new device (see :meth:`Device.join`), valid for
        ``ttl`` seconds. The add happens when the new device's request arrives while this
        device is online; :meth:`wait_invite` follows it."""
        return self.invites.create(ttl)

    async def wait_invite(self, ticket: str, *, grace: float = 10.0,
                          say: Callable[[str], None] = lambda _m: None) -> tuple[Added, str]:
        """Until the device holding ``ticket`` is added and holds the document (see
        :meth:`device.invites.Invites.wait`)."""
        return await self.invites.wait(ticket, grace=grace, say=say)

    async def add_device(self, key_package: bytes, sig_pub: bytes, endpoint_id: bytes,
                         role: Role = Role.MEMBER, addrs: tuple[str, ...] = ()) -> int:
        """Add a device by its KeyPackage (through Paxos); returns the slot that added it.
        ``addrs`` (its endpoint's addresses) go into the manifest as dialling hints."""
        fpr = fingerprint(sig_pub)

        def build() -> LogValue | None:
            if self.manifest.device(fpr) is not None:
                return None
            commit, welcome = self.mls.build_add([key_package])
            entry = DeviceEntry(fpr, sig_pub, endpoint_id, 0, role, addrs[:8])
            m = next_manifest(self.manifest, commit, add=(entry,))
            return sign_value(self.device.key, m, commit, welcome)

        return await self._commit(build)  # _apply_decided publishes the state for it

    def _maybe_publish_state(self) -> None:
        """Periodic state upload. Whoever crosses the threshold first publishes; everyone who
        sees that state resets, so members rarely publish twice for the same stretch."""
        if self._since_state >= self.device.config.publish_state_every:
            self.publish_state()

    def publish_state(self) -> None:
        """Store the whole document, encrypted in the current epoch, on the syncnodes (a STATE
        update covering everything we delivered). A device added in this epoch can read it, so
        it gets the document even when no member is online to send it directly."""
        self._since_state = 0
        body = pack_updates([self.crdt.snapshot()])
        if len(body) > MAX_BODY - 1024:
            log.warning("document too large for one state message; not published",
                        doc=short_id(self.group_id), bytes=len(body))
            return
        with self.store.transaction():
            self._seal(PayloadKind.STATE, body, exclude_self=False)

    async def remove_device(self, device_id: str) -> int:
        """Remove a member (by id prefix); returns the slot of the removal."""
        target = self._find(device_id)

        def build() -> LogValue | None:
            entry = self.manifest.device(target.fingerprint)
            if entry is None:
                return None
            commit = self.mls.build_remove([entry.sig_pub])
            m = next_manifest(self.manifest, commit, remove=(entry.fingerprint,))
            return sign_value(self.device.key, m, commit)

        return await self._commit(build)

    async def rotate_keys(self) -> int:
        """Commit a key update (new epoch secrets, fresh leaf key); returns its slot."""

        def build() -> LogValue:
            commit = self.mls.build_update()
            return sign_value(self.device.key, next_manifest(self.manifest, commit), commit)

        return await self._commit(build)

    def _find(self, device_id: str) -> DeviceEntry:
        prefix = device_id.lower()
        found = [d for d in self.manifest.devices if d.fingerprint.hex().startswith(prefix)]
        if len(found) != 1:
            raise DocumentError(f"{'no' if not found else 'more than one'} member matches "
                                f"{device_id!r}")
        return found[0]

    # -- events ------------------------------------------------------------------------------

    def _emit(self, event: Event) -> None:
        for cb in list(self._listeners):
            try:
                cb(event)
            except Exception:
                log.exception("event listener failed")

    def _alarm(self, kind: str, detail: str, evidence: bytes | None = None) -> None:
        if self.store.one("SELECT 1 FROM alarms WHERE group_id=? AND kind=? AND detail=?",
                          self.group_id, kind, detail):
            return  # raised already (the same bad decision keeps arriving from syncnodes)
        log.error("alarm", doc=short_id(self.group_id), kind=kind, detail=detail)
        with self.store.transaction() as db:
            db.execute("INSERT INTO alarms (group_id, kind, detail, evidence, at) "
                       "VALUES (?,?,?,?,?)",
                       (self.group_id, kind, detail, evidence, entropy.wall()))
        self._emit(Alarm(kind, detail))

    # -- flush: local edits -> outbox ------------------------------------------------------------

    async def _flusher(self) -> None:
        """Self-clocked coalescing, like Nagle's algorithm: the first edit after a quiet spell
        goes out at once (low latency); while that update is not yet acknowledged by a quorum
        (at most ``coalesce_max`` s), further edits accumulate and then leave together. Under
        load the batch grows with the round trip, so the per-message cost (MLS, signatures,
        fsyncs on every device) is paid for many edits at once."""
        cfg = self.device.config
        while True:
            await self._dirty.wait()
            self._dirty = trio.Event()
            if self.status != "active":
                return
            while self._flush_once():
                await trio.lowlevel.checkpoint()
            with trio.move_on_after(cfg.coalesce_max):
                while self.outbox and self.status == "active":
                    await self._durable_changed.wait()
            await trio.sleep(cfg.flush_interval)

    def _flush_once(self) -> bool:
        rows = self.store.all("SELECT id, data FROM local_pending WHERE group_id=? ORDER BY id",
                              self.group_id)
        if not rows:
            return False
        take: list[tuple[int, bytes]] = []
        size = 0
        for rid, data in rows:
            if take and size + len(data) > MAX_FLUSH_BYTES:
                break
            take.append((rid, data))
            size += len(data)
        body = pack_updates([d for _, d in take])
        with self.store.transaction() as db:
            self._seal(PayloadKind.UPDATE, body, exclude_self=True)
            db.executemany("DELETE FROM local_pending WHERE id=?", [(r,) for r, _ in take])
        return len(take) < len(rows)

    def _seal(self, kind: PayloadKind, body: bytes, *, exclude_self: bool) -> None:
        """Encrypt a payload as our next seq and put it in the outbox (inside a transaction)."""
        seq = self.next_seq
        deps = vector_deps(self.buffer.delivered, exclude=self.me if exclude_self else None)
        payload = Payload(kind, self.me, seq, deps, self.crdt.backend_id, body)
        ciphertext = self.mls.encrypt(payload.encode())
        env = Envelope.seal(self.device.key, self.group_id, seq, self.epoch, ciphertext)
        with self.store.transaction() as db:
            self.mls.persist()  # before the ciphertext can leave
            db.execute("INSERT INTO outbox VALUES (?,?,?)", (self.group_id, seq, encode(env)))
            self.buffer.mark_delivered(self.me, seq)
            db.execute("UPDATE documents SET next_seq=?, delivered=? WHERE group_id=?",
                       (seq + 1, msgpack.packb(self.buffer.delivered), self.group_id))
        self.next_seq = seq + 1
        self.outbox[seq] = _Outgoing(env)
        self._outbox_changed.fire()

    # -- receive: envelopes -> CRDT --------------------------------------------------------------

    def receive(self, envelopes: Sequence[Envelope]) -> int:
        """Process envelopes from a syncnode; returns how many payloads were delivered."""
        payloads: list[Payload] = []
        taken: set[tuple[bytes, int]] = set()
        for env in envelopes:
            if env.group_id != self.group_id or self.status != "active":
                continue
            key = (env.sender, env.seq)
            if key in taken or self.buffer.seen(*key):
                continue
            taken.add(key)
            if env.epoch > self.epoch:
                self.future[(env.sender, env.seq)] = env
                self._learn_wanted.fire()
                continue
            if env.epoch < self.joined_epoch:
                self._missing = True
                continue
            p = self._open(env)
            if p is not None:
                payloads.append(p)
        if not payloads:
            return 0
        before = set(self.buffer.pending)
        ready = self.buffer.add_many(payloads)
        bodies: list[bytes] = []
        is_state: list[bool] = []
        senders: set[str] = set()
        for p in ready:
            if p.kind == PayloadKind.SYNC_REQUEST:
                self._answer_later(p)
                continue
            try:
                updates = unpack_updates(p.body)
            except DecodeError as exc:
                self._alarm("bad-update", f"from {short_id(p.sender)} seq {p.seq}: {exc}")
                continue
            bodies += updates
            is_state += [p.kind == PayloadKind.STATE] * len(updates)
            senders.add(short_id(p.sender))
        applied = []
        states = 0
        for body, state, err in zip(bodies, is_state, self.crdt.apply(bodies), strict=True):
            if err is None:
                applied.append(body)
                states += state
            else:
                self._alarm("bad-update", str(err))
        after = set(self.buffer.pending)
        # Not fsynced: after a power loss this step is redone from the syncnodes (the MLS state
        # and the watermarks roll back together).
        with self.store.transaction(durable=False) as db:
            self.mls.persist()
            db.executemany("INSERT INTO crdt_updates (group_id, data) VALUES (?,?)",
                           [(self.group_id, b) for b in applied])
            db.executemany("INSERT OR IGNORE INTO pending VALUES (?,?,?,?)",
                           [(self.group_id, s, q, self.buffer.pending[(s, q)].encode())
                            for (s, q) in after - before])
            db.executemany("DELETE FROM pending WHERE group_id=? AND sender=? AND seq=?",
                           [(self.group_id, s, q) for (s, q) in before - after])
            db.execute("UPDATE documents SET delivered=? WHERE group_id=?",
                       (msgpack.packb(self.buffer.delivered), self.group_id))
            if states:
                self._state_arrived(db)
        self._updates_since_snapshot += len(applied)
        if self._updates_since_snapshot >= self.device.config.snapshot_every:
            self.compact()
        self._since_state = 0 if states else self._since_state + len(applied)
        self._maybe_publish_state()
        if applied:
            self._emit(Change("remote", tuple(sorted(senders)), len(applied) - states, states))
        return len(ready)

    def _open(self, env: Envelope) -> Payload | None:
        """Verify, decrypt and check one envelope; None (logged) if it is not acceptable."""
        m = self.values.get(env.epoch)
        entry = m.manifest.device(env.sender) if m is not None else None
        if entry is None or not env.verify(entry.sig_pub):
            log.warning("envelope refused: sender not a member or bad signature",
                        doc=short_id(self.group_id), sender=short_id(env.sender), seq=env.seq)
            return None
        try:
            sender, plaintext = self.mls.decrypt(env.ciphertext)
        except MlsError as exc:
            # An authentic envelope we cannot decrypt: an epoch we never had or no longer
            # keep, or (found by the simulator) a past-epoch message from a member removed in
            # the epoch we applied since, which mls-rs no longer opens. Members that did
            # decrypt it answer our state request with a STATE covering it.
            self._missing = True
            key = (self.group_id, env.sender, env.seq)
            said = self.store.one("SELECT 1 FROM undecryptable WHERE group_id=? AND sender=? "
                                  "AND seq=?", *key)
            (log.debug if said else log.warning)(
                "cannot decrypt; asking members for the state instead",
                doc=short_id(self.group_id), sender=short_id(env.sender), seq=env.seq,
                epoch=env.epoch, error=str(exc))
            if not said:  # warned once, not at every run that backfills it again
                with self.store.transaction(durable=False) as db:
                    db.execute("INSERT OR IGNORE INTO undecryptable VALUES (?,?,?)", key)
            return None
        if sender != identity_for(entry.sig_pub):
            log.warning("envelope sender is not the MLS sender", doc=short_id(self.group_id))
            return None
        try:
            p = Payload.decode(plaintext)
            if p.sender != env.sender or p.seq != env.seq:
                raise DecodeError("Payload", "does not match its envelope")
            if p.backend != self.crdt.backend_id:
                raise DecodeError("Payload.backend", f"{p.backend!r} in a {self.crdt_type} doc")
            if p.kind == PayloadKind.STATE and p.vector().get(p.sender, 0) < p.seq - 1:
                raise DecodeError("Payload.deps", "STATE must cover its sender's past")
        except DecodeError as exc:
            self._alarm("bad-update", f"from {short_id(env.sender)} seq {env.seq}: {exc}")
            return None
        return p

    def load_state(self, snapshot: bytes, covers: dict[bytes, int]) -> None:
        """Load a member's snapshot that contains every payload in ``covers`` (a verified p2p
        transfer); backfill then only fetches what came after it."""
        (err,) = self.crdt.apply([snapshot])
        if err is not None:
            raise err
        before = set(self.buffer.pending)
        self.buffer.cover(covers)
        with self.store.transaction() as db:
            db.execute("INSERT INTO crdt_updates (group_id, data) VALUES (?,?)",
                       (self.group_id, snapshot))
            db.executemany("DELETE FROM pending WHERE group_id=? AND sender=? AND seq=?",
                           [(self.group_id, s, q) for (s, q) in before - set(self.buffer.pending)])
            db.execute("UPDATE documents SET delivered=? WHERE group_id=?",
                       (msgpack.packb(self.buffer.delivered), self.group_id))
            self._state_arrived(db)
        self._missing = False
        self._emit(Change("remote", (), 0, 1))

    def _state_arrived(self, db: Any) -> None:
        if not self.state_loaded.is_set():
            db.execute("DELETE FROM meta WHERE key=?", (_needs_state_key(self.group_id),))
            self.state_loaded.set()

    def compact(self) -> None:
        """Replace the stored CRDT updates by one snapshot (bounded load time)."""
        snap = self.crdt.snapshot()
        with self.store.transaction() as db:
            db.execute("INSERT OR REPLACE INTO crdt_snapshot VALUES (?,?)", (self.group_id, snap))
            db.execute("DELETE FROM crdt_updates WHERE group_id=?", (self.group_id,))
        self._updates_since_snapshot = 0

    # -- state sync for devices that cannot read older epochs ------------------------------------

    def _request_state(self) -> None:
        now = trio.current_time()
        if now - self._last_sync_request < self.device.config.sync_request_interval:
            return
        self._last_sync_request = now
        self._missing = False
        with self.store.transaction():
            self._seal(PayloadKind.SYNC_REQUEST, self.crdt.version(), exclude_self=True)
        log.info("asked members for the document state", doc=short_id(self.group_id))

    def _answer_later(self, request: Payload) -> None:
        if request.sender == self.me or (request.sender, request.seq) in self._answered:
            return
        theirs = request.vector()
        if all(theirs.get(s, 0) >= q for s, q in self.buffer.delivered.items()):
            return  # they have everything we have
        self._answered.add((request.sender, request.seq))
        self.device.spawn(self._answer, request)

    async def _answer(self, request: Payload) -> None:
        # A little jitter so several members answering do not all send at the same instant.
        await trio.sleep(entropy.uniform(0, 0.2))
        if self.status != "active":
            return
        # The whole document, not a diff against the requester's version: a STATE goes to
        # every member, and each marks the vector it covers delivered. A diff holds only what
        # the requester lacked, so another member lacking something else marked that delivered
        # without its content, and never asked again (found by the simulator: partition seed
        # 17 left three devices without four acknowledged updates for good).
        diff = self.crdt.snapshot()
        body = pack_updates([diff])
        if len(body) > MAX_BODY - 1024:
            log.warning("state too large for one message; the requester needs a direct "
                        "transfer", doc=short_id(self.group_id), bytes=len(body))
            return
        with self.store.transaction():
            self._seal(PayloadKind.STATE, body, exclude_self=False)
        log.info("sent document state", doc=short_id(self.group_id),
                 to=short_id(request.sender), bytes=len(diff))

    # -- decisions ---------------------------------------------------------------------------

    async def apply_decided(self, d: Decided) -> bool:
        """Apply the decision for the next slot (or check a known one for equivocation).
        Returns True if the epoch advanced."""
        async with self._apply_lock:
            return self._apply_decided(d)

    def _apply_decided(self, d: Decided) -> bool:
        slot = d.certificate.slot
        if d.certificate.group_id != self.group_id or self.status != "active":
            return False
        if slot <= self.epoch:
            self._check_known(d)
            return False
        if slot > self.epoch + 1:
            self._learn_wanted.fire()
            return False
        try:
            value = verify_decided(self.manifest, d.value, d.certificate)
        except CertificateError as exc:
            # Not a decision at all: one syncnode sent garbage or a forgery, which proves
            # nothing about the quorum. Ignored; the honest syncnodes serve the real one.
            log.warning("ignored a decision without a valid certificate",
                        doc=short_id(self.group_id), slot=slot, error=str(exc))
            return False
        except ManifestError as exc:  # a quorum certified a value that breaks the rules
            self._alarm("invalid-decision", f"slot {slot}: {exc}")
            return False
        signer = self.manifest.device(value.signer)
        assert signer is not None and value.commit is not None  # verify_decided checked
        try:
            committer, removed = self.mls.apply_commit(value.commit)
        except MlsError as exc:
            self._fail(f"MLS rejected the decided commit of slot {slot}: {exc}")
            return False
        if committer != identity_for(signer.sig_pub):
            self._fail(f"slot {slot}: the MLS committer is not the manifest signer")
            return False
        removed = removed or value.manifest.device(self.me) is None
        status = "removed" if removed else "active"
        with self.store.transaction(durable=False) as db:  # re-learnable, like receive()
            self.mls.persist()
            db.execute("INSERT INTO log VALUES (?,?,?,?)",
                       (self.group_id, slot, d.value, encode(d)))
            db.execute("UPDATE documents SET epoch=?, status=? WHERE group_id=?",
                       (slot, status, self.group_id))
            db.execute("DELETE FROM proposal WHERE group_id=? AND slot<=?", (self.group_id, slot))
        self.values[slot], self.decided[slot] = value, d
        self.epoch, self.status = slot, status
        log.info("decision applied", doc=short_id(self.group_id), slot=slot,
                 signer=short_id(value.signer), devices=len(value.manifest.devices))
        self._epoch_changed.fire()
        if removed:
            self._alarm("removed", f"this device was removed at epoch {slot}")
            self._durable_changed.fire()
            return True
        if value.signer == self.me and value.welcome is not None:
            # Our add of a device: store the document for it in the epoch it joins, in the same
            # step that applies the add, whichever task applies it (a syncnode's push, learn,
            # or _commit after announcing to every syncnode, which can be much later).
            self.publish_state()
        future = [e for e in self.future.values() if e.epoch <= self.epoch]
        for e in future:
            del self.future[(e.sender, e.seq)]
        if future:
            self.receive(future)
        return True

    def _check_known(self, d: Decided) -> None:
        slot = d.certificate.slot
        known = self.decided.get(slot)
        if known is None or known.value == d.value:
            return
        try:
            verify_decided(self.values[slot - 1].manifest, d.value, d.certificate)
        except (CertificateError, ManifestError):
            return  # not a valid decision at all: a syncnode sent garbage
        proof = EquivocationProof(known.certificate, d.certificate)
        self._alarm("equivocation", f"two certified values for slot {slot}", encode(proof))

    def _fail(self, reason: str) -> None:
        self.status = "failed"
        with self.store.transaction() as db:
            db.execute("UPDATE documents SET status='failed' WHERE group_id=?", (self.group_id,))
        self._alarm("invalid-decision", reason)

    async def learn(self, client: SyncnodeClient) -> None:
        """Fetch and apply every decision the syncnode has beyond our epoch."""
        while self.status == "active":
            page = await client.fetch_decided(self.group_id, self.epoch + 1)
            progressed = False
            for d in page.decided:
                if not await self.apply_decided(d):
                    break  # the rest cannot follow a decision we could not apply
                progressed = True
            if not progressed or self.epoch >= page.top:
                return

    async def _learn_round(self) -> None:
        """Before proposing, learn what the linked syncnodes decided beyond our epoch (so a
        ballot is not spent on a slot that is already taken). Returns once a quorum of the
        slot's acceptors answered, every link finished, or ``keepalive_timeout`` passed: a
        syncnode that is down, frozen or slow is not waited for (Paxos itself finds any
        decision this misses: the Promises report it). The others are cancelled."""
        acceptors = self.manifest.acceptors()
        clients = [c for n, c in self.clients.items() if n in acceptors]
        learned = finished = 0
        enough = trio.Event()

        async def one(client: SyncnodeClient) -> None:
            nonlocal learned, finished
            try:
                await self.learn(client)
                learned += 1
            except SyncnodeError as exc:  # unreachable, or garbage from a faulty syncnode
                log.debug("learn failed", node=short_id(client.node_id), error=str(exc))
            finally:
                finished += 1
                if learned >= acceptors.quorum or finished == len(clients):
                    enough.set()

        if not clients:
            return
        async with trio.open_nursery() as nursery:
            for client in clients:
                nursery.start_soon(one, client)
            with trio.move_on_after(self.device.config.keepalive_timeout):
                await enough.wait()
            nursery.cancel_scope.cancel()

    async def _wait_for_quorum(self) -> None:
        """Give links a moment to come up (right after start, after a network change, or
        after stale links to restarted syncnodes were dropped)."""
        acceptors = self.manifest.acceptors()
        self._wake_links_below_quorum()
        with trio.move_on_after(self.device.config.connect_timeout):
            while sum(n in acceptors for n in self.clients) < acceptors.quorum:
                await self._links_changed.wait()

    async def _quorum_links(self) -> list[SyncnodeClient]:
        """The acceptors linked now (waiting, up to ``keepalive_timeout``, for a quorum of
        them). Paxos calls it at every ballot, so a link that comes back while a commit is
        under way is used by the commit's next ballot."""
        acceptors = self.manifest.acceptors()
        self._wake_links_below_quorum()
        with trio.move_on_after(self.device.config.keepalive_timeout):
            while sum(n in acceptors for n in self.clients) < acceptors.quorum:
                await self._links_changed.wait()
        return [c for n, c in self.clients.items() if n in acceptors]

    async def _commit(self, build: Callable[[], LogValue | None]) -> int:
        """Get one commit of ours decided. ``build`` makes it for the current epoch (None: no
        longer needed). Losing a slot re-bases: the winner is applied and ``build`` runs again."""
        cfg = self.device.config
        async with self._propose_lock:
            for _ in range(cfg.rebase_attempts):
                if self.status != "active":
                    raise DocumentError(f"document is {self.status}")
                await self._wait_for_quorum()
                await self._learn_round()
                slot = self.epoch + 1
                row = self.store.one("SELECT slot, value FROM proposal WHERE group_id=?",
                                     self.group_id)
                mine: bytes | None = None
                if row is not None and row[0] == slot:
                    value_bytes = row[1]  # a commit of ours from before: finish it first
                else:
                    try:
                        value = build()
                        if value is not None:
                            validate_transition(self.manifest, value)
                    except (ManifestError, MlsError):
                        # Drop the commit MLS now holds as pending (the binding cannot clear
                        # it): reload the stored state, or every later commit of this device
                        # fails with "commit already pending" (found by the simulator).
                        self.mls = self.device.mls.load(self.group_id)
                        raise
                    if value is None:
                        return self.epoch
                    value_bytes = mine = value.encode()
                    with self.store.transaction() as db:
                        self.mls.persist()
                        db.execute("INSERT OR REPLACE INTO proposal VALUES (?,?,?)",
                                   (self.group_id, slot, value_bytes))
                acceptors = self.manifest.acceptors()
                # Again: the learn round may have dropped stale links (to syncnodes that
                # restarted), which redial at once.
                await self._wait_for_quorum()
                linked = sum(n in acceptors for n in self.clients)
                if linked < acceptors.quorum:
                    raise Offline(f"{linked} of {len(acceptors)} syncnodes reachable, "
                                  f"a membership change needs {acceptors.quorum}")
                try:
                    outcome = await propose(self.device.key, self._quorum_links, self.group_id,
                                            slot, value_bytes, acceptors,
                                            attempts=cfg.propose_attempts,
                                            backoff=cfg.propose_backoff,
                                            timeout=cfg.keepalive_timeout,
                                            background=self.device.spawn)
                except ProposeFailed as exc:
                    raise Offline(str(exc)) from None
                if isinstance(outcome, Decided):
                    await self.apply_decided(outcome)
                    if mine is not None:
                        return slot
                    continue  # that was an older commit of ours; now build this one
                if isinstance(outcome, Lost):
                    log.info("our commit lost the slot; re-basing", doc=short_id(self.group_id),
                             slot=slot)
                    if outcome.value is not None:
                        await self.apply_decided(Decided(outcome.value, outcome.certificate))
                        if self.epoch < slot:
                            # The winner does not follow our log (equivocating syncnodes):
                            # re-basing cannot help; the alarm says why.
                            raise DocumentError(f"the value decided for slot {slot} does not "
                                                "apply to this device's log; see alarms")
                    continue
                assert isinstance(outcome, EquivocationProof)
                self._alarm("equivocation", f"conflicting certificates for slot {slot}",
                            encode(outcome))
                raise DocumentError("syncnodes equivocated; see alarms")
            raise Offline(f"no commit decided after {cfg.rebase_attempts} rounds of contention")

    # -- links to syncnodes ------------------------------------------------------------------

    async def run(self) -> None:
        """All the document's background work; runs until cancelled or the doc is removed."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._flusher)
            nursery.start_soon(self._processor)
            for entry in self.manifest.syncnodes:
                nursery.start_soon(self._link, NodeTicket(entry.node_id, entry.addrs))

    async def _link(self, ticket: NodeTicket) -> None:
        cfg = self.device.config
        node = short_id(ticket.node_id)
        self._link_delay[ticket.node_id] = cfg.reconnect_min
        while self.status == "active":
            attempt = self._link_attempts[ticket.node_id] = trio.CancelScope()
            try:
                dial = self.device.syncnode_ticket(ticket)  # a newer address set by hand
                with attempt:
                    async with SyncnodeClient.connect(self.device.transport, dial,
                                                      timeout=cfg.connect_timeout) as client, \
                            trio.open_nursery() as guard:
                        guard.start_soon(self._watchdog, client)  # bounds every request below
                        await client.authenticate(self.device.key)
                        await self._serve(client)
            except* SyncnodeError as group:
                # Transport, remote and protocol errors end this link attempt, never the
                # device: it reconnects with backoff.
                log.info("syncnode link down", doc=short_id(self.group_id), node=node,
                         error="; ".join(str(e) for e in group.exceptions))
            finally:
                self.clients.pop(ticket.node_id, None)
                self._links_changed.fire()
            if self.status != "active":
                return
            # The delay resets only once a link got as far as its subscription: a syncnode
            # that accepts connections and then refuses us is not retried in a tight loop.
            delay = self._link_delay[ticket.node_id]
            self._link_delay[ticket.node_id] = min(delay * 2, cfg.reconnect_max)
            if attempt.cancelled_caught:  # relink(): a new address, dial it now
                self._link_delay[ticket.node_id] = cfg.reconnect_min
                continue
            with trio.CancelScope() as pause:
                self._link_attempts[ticket.node_id] = self._link_pauses[ticket.node_id] = pause
                await trio.sleep(delay * entropy.uniform(0.5, 1.0))
            self._link_pauses.pop(ticket.node_id, None)

    def _wake_links_below_quorum(self) -> None:
        """Without a quorum of links, dial at once every syncnode whose link is waiting out
        its reconnect backoff: this document needs a quorum now (a commit, a durability wait),
        and a syncnode that came back during a long backoff would otherwise be found up to
        ``reconnect_max`` late. A dial in progress is left alone (it reaches a syncnode that
        comes back). Once per wait, never on every change of the links: a dial that fails at
        once would otherwise be woken again at once, in a loop."""
        acceptors = self.manifest.acceptors()
        if sum(n in acceptors for n in self.clients) < acceptors.quorum:
            for pause in list(self._link_pauses.values()):
                pause.cancel()

    def relink(self, node_id: bytes) -> None:
        """Drop the link to ``node_id`` (or its pending dial) and dial again at once."""
        scope = self._link_attempts.get(node_id)
        if scope is not None:
            scope.cancel()

    async def _serve(self, client: SyncnodeClient) -> None:
        known = await self._sync_node(client)
        async with self._subscription(client) as sub, trio.open_nursery() as nursery:
            self._link_delay[client.node_id] = self.device.config.reconnect_min
            self.clients[client.node_id] = client
            self._links_changed.fire()
            log.info("syncnode link up", doc=short_id(self.group_id),
                     node=short_id(client.node_id))
            nursery.start_soon(self._push_outbox, client)
            nursery.start_soon(self._announce, client, known)
            nursery.start_soon(self._learner, client)
            nursery.start_soon(self.invites.run, client)
            nursery.start_soon(self._keepalive, client)
            nursery.start_soon(self._follow_addresses, client)
            await self.learn(client)
            await self._backfill(client)
            nursery.start_soon(self._periodic_backfill, client)
            async for item in sub:
                if isinstance(item, MailboxNotice):
                    self.invites.notify()
                    continue
                await self._inbox_send.send((client, item))
            raise TransportError("subscription ended")

    @asynccontextmanager
    async def _subscription(self, client: SyncnodeClient) -> AsyncIterator[Subscription]:
        """The group's live feed from ``client``, its start bounded by ``keepalive_timeout``:
        it has a stream of its own, which the link's watchdog does not see."""
        limit = self.device.config.keepalive_timeout
        async with AsyncExitStack() as stack:
            sub: Subscription | None = None
            with trio.move_on_after(limit):
                sub = await stack.enter_async_context(client.subscribe(self.group_id))
            if sub is None:
                raise TransportError(f"no answer to the subscription within {limit:g} s")
            yield sub

    async def _sync_node(self, client: SyncnodeClient) -> int:
        """Make the syncnode know our group and every decision we know (it may have missed
        the genesis while offline, or the decision that added us). Returns the slot up to
        which it now knows our log."""
        heads = {h.group_id: h.top for h in (await client.heads([self.group_id])).heads}
        top = heads.get(self.group_id)
        hidden = top is None
        if top is None:
            # Not hosted there, or not shown to us: a syncnode shows a group's head only to
            # its current members and syncnodes, so a device removed meanwhile sees none. It
            # may still read on from its own epoch, up to its removal (learn, below).
            await client.register_group(self.values[0])
            top = 0
        epoch = self.epoch
        for slot in range(top + 1, epoch + 1):
            await self._tell(client, slot)
        if hidden or top > self.epoch:
            await self.learn(client)
        return max(top, epoch)

    async def _announce(self, client: SyncnodeClient, known: int) -> None:
        """Tell the syncnode each decision we apply from now on that it may lack. A decision
        reached while it was cut off (the proposer's announcement lost) would otherwise stay
        with the devices that applied it, and the others, who learn only from syncnodes,
        would never see it (found by the simulator)."""
        while self.status == "active":
            if known >= self.epoch:
                await self._epoch_changed.wait()
                continue
            known += 1
            await self._tell(client, known)

    async def _tell(self, client: SyncnodeClient, slot: int) -> None:
        try:
            await client.learn(self.decided[slot])
        except RemoteError as exc:
            if exc.code not in (ErrorCode.CONFLICT, ErrorCode.INVALID):
                raise
            # The syncnode holds another certified value for this slot, or another chain
            # before it: syncnodes equivocated. It keeps the proof; we raise our alarm when its
            # value reaches us. Retrying would not change its mind.
            log.error("syncnode holds a conflicting decision", doc=short_id(self.group_id),
                      node=short_id(client.node_id), slot=slot, error=exc.detail)

    async def _backfill(self, client: SyncnodeClient) -> None:
        more = True
        while more and self.status == "active":
            page = await client.backfill(self.group_id, self.buffer.watermarks())
            async with self._apply_lock:
                self.receive(page.envelopes)
            more = page.more and bool(page.envelopes)
            await trio.lowlevel.checkpoint()
        if self._missing and self.status == "active":
            self._request_state()

    async def _periodic_backfill(self, client: SyncnodeClient) -> None:
        while self.status == "active":
            await trio.sleep(self.device.config.backfill_interval)
            await self._backfill(client)

    async def _keepalive(self, client: SyncnodeClient) -> None:
        """Ask for our head every ``keepalive_interval``, so that an idle link, too, has a
        request for the :meth:`_watchdog` to time."""
        while self.status == "active":
            await trio.sleep(self.device.config.keepalive_interval)
            await client.heads([self.group_id])

    async def _watchdog(self, client: SyncnodeClient) -> None:
        """A link counts as up only while its syncnode answers: drop it (it redials after
        ``reconnect_min``) when a request has waited ``keepalive_timeout`` with no reply at all.

        This bounds every request on the link, whoever made it. A dead or frozen syncnode
        does not close its QUIC connection, and one that restarted cannot (its new process
        does not know the old connection, and iroh gives up on it only after 30 s): requests
        on such a stale link would hang while the restarted syncnode answers a new connection
        at once. Silence is measured on the whole pipeline (:meth:`Channel.stalled_for`), not
        per request, so a busy syncnode working through many requests is not dropped."""
        limit = self.device.config.keepalive_timeout
        while True:
            stalled = client.channel.stalled_for()
            if stalled >= limit:
                raise TransportError(f"no answer within {limit:g} s")
            await trio.sleep(max(limit - stalled, limit / 8))

    async def _follow_addresses(self, client: SyncnodeClient) -> None:
        """Ask this syncnode where the group's other syncnodes are now (their signed address
        records, :mod:`proto.address`), so a syncnode that moved is found again without a new
        document. Asked at link-up and every ``backfill_interval`` while one is unreachable."""
        while self.status == "active":
            others = [e.node_id for e in self.manifest.syncnodes if e.node_id != client.node_id]
            if any(n not in self.clients for n in others):
                try:
                    records = await client.get_addresses(others)
                except RemoteError as exc:  # a syncnode of an older version
                    log.debug("no address records", node=short_id(client.node_id),
                              error=str(exc))
                    return
                for record in records:
                    node = record.body.node_id
                    if node in others and node not in self.clients and record.verify() \
                            and self.device.learn_address(record):
                        log.info("syncnode moved; dialling its new address",
                                 doc=short_id(self.group_id), node=short_id(node),
                                 addrs=list(record.body.addrs), via=short_id(client.node_id))
                        self.relink(node)
            await trio.sleep(self.device.config.backfill_interval)

    async def _learner(self, client: SyncnodeClient) -> None:
        while True:
            await self._learn_wanted.wait()
            await self.learn(client)

    async def _processor(self) -> None:
        """Apply pushed items in arrival order, envelopes in batches."""
        while True:
            client, item = await self._inbox.receive()
            batch = [(client, item)]
            while len(batch) < 1024:
                try:
                    batch.append(self._inbox.receive_nowait())
                except trio.WouldBlock:
                    break
            envelopes: list[Envelope] = []
            async with self._apply_lock:
                for _client, it in batch:
                    if isinstance(it, Envelope):
                        envelopes.append(it)
                        continue
                    if envelopes:
                        self.receive(envelopes)
                        envelopes = []
                    self._apply_decided(it)
                if envelopes:
                    self.receive(envelopes)
            if self._missing and self.status == "active":
                self._request_state()

    async def _push_outbox(self, client: SyncnodeClient) -> None:
        node = client.node_id
        limiter = trio.Semaphore(self.device.config.max_in_flight)
        while self.status == "active":
            todo = [o for o in sorted(self.outbox.items()) if node not in o[1].acks]
            if not todo:
                await self._outbox_changed.wait()
                continue
            async with trio.open_nursery() as nursery:
                for _seq, out in todo:
                    await limiter.acquire()
                    nursery.start_soon(self._send_one, client, out, limiter)

    async def _send_one(self, client: SyncnodeClient, out: _Outgoing,
                        limiter: trio.Semaphore) -> None:
        try:
            delay = 0.05
            while True:
                try:
                    await client.store(out.envelope)
                    break
                except RemoteError as exc:
                    if exc.code == ErrorCode.RATE_LIMITED:
                        # Over the syncnode's budget: the envelope waits, the link stays up
                        # (it used to be dropped and resent only after a reconnect).
                        await trio.sleep(delay * entropy.uniform(0.5, 1.0))
                        delay = min(delay * 2, 2.0)
                        continue
                    if exc.code not in (ErrorCode.NOT_FOUND, ErrorCode.UNAUTHORIZED):
                        raise
                    await self._sync_node(client)  # it lags behind our epoch; tell it, retry
                    await client.store(out.envelope)
                    break
            self._acked(out, client.node_id)
        finally:
            limiter.release()

    def _acked(self, out: _Outgoing, node: bytes) -> None:
        out.acks.add(node)
        acceptors = self.manifest.acceptors()
        seq = out.envelope.seq
        if seq in self.outbox and len(out.acks & acceptors.members) >= acceptors.quorum:
            with self.store.transaction() as db:
                db.execute("DELETE FROM outbox WHERE group_id=? AND seq=?", (self.group_id, seq))
            del self.outbox[seq]
            self._durable_changed.fire()
