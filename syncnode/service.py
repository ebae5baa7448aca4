"""The syncnode service: what each request does to the store, and what it answers.

This is the driver around the sans-IO pieces (:mod:`proto.paxos.acceptor`,
:mod:`proto.manifest`): it validates requests against the group's manifest chain, makes state
changes durable through the group-commit :class:`~syncnode.storage.Writer` **before** answering,
and fans new envelopes and decisions out to subscribers. It knows nothing about sockets, so
tests, the daemon and the simulator drive the same code.

Per-group state (current manifest, top slot, quota use) and Paxos slot state are loaded lazily
from SQLite and held in bounded LRU caches, so a node can host far more groups than fit in
memory. Slot state changed in memory but not yet durable is pinned until its write commits, so
eviction can never resurrect an older promise.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from proto import entropy
from proto.address import Addresses, GetAddresses, PutAddress
from proto.codec import decode_as, decode_struct, encode, encode_struct
from proto.envelope import Envelope
from proto.errors import DecodeError
from proto.identity import SecretKey, short_id
from proto.logs import get_logger
from proto.manifest import (
    LogValue,
    Manifest,
    ManifestError,
    validate_genesis,
    validate_transition,
    verify_decided,
)
from proto.messages import ErrorCode
from proto.paxos.acceptor import Acceptor, Reject, RejectReason, SlotState
from proto.paxos.messages import (
    Accept,
    AcceptorRecord,
    Certificate,
    Decided,
    EquivocationProof,
    PaxosRejected,
    Prepare,
    value_hash,
)
from proto.paxos.quorum import AcceptorSet, CertificateError, verify_certificate
from proto.service import (
    MAX_PAGE,
    Authenticate,
    Authenticated,
    Backfill,
    BackfillPage,
    Challenge,
    DecidedPage,
    Done,
    FetchDecided,
    FetchHeads,
    GetChallenge,
    GroupRegistered,
    Head,
    Heads,
    MailboxAck,
    MailboxFetch,
    MailboxItems,
    MailboxNotice,
    MailboxPut,
    MailboxStored,
    RegisterGroup,
    Stored,
    Subscribe,
    Subscribed,
)
from syncnode.addresses import AddressBook
from syncnode.budgets import LRU, KeyedBuckets, TokenBucket
from syncnode.config import Limits
from syncnode.mailbox import Mailbox
from syncnode.metrics import Metrics
from syncnode.session import RequestError, Session, authenticate, challenge
from syncnode.storage import Writer, one, open_database, rows, storage_bytes

log = get_logger("syncnode.service")

PAGE_BYTES = 4 * 1024 * 1024
"""Soft byte budget of one page of decided values or envelopes (well under a frame)."""
SUBSCRIBER_QUEUE = 1024


@dataclass
class GroupState:
    group_id: bytes
    creator: bytes
    top: int
    manifest: Manifest
    bytes_used: int
    lock: trio.Lock = field(default_factory=trio.Lock)


class SlotCache(MutableMapping[tuple[bytes, int], SlotState]):
    """The acceptor's slot map: an LRU over the ``acceptor`` table. Entries written in memory
    stay pinned in ``dirty`` until :meth:`flushed` says their record is durable."""

    def __init__(self, db: sqlite3.Connection, capacity: int) -> None:
        self.db = db
        self.lru = LRU(capacity)
        self.dirty: dict[tuple[bytes, int], SlotState] = {}

    def __getitem__(self, key: tuple[bytes, int]) -> SlotState:
        if key in self.dirty:
            return self.dirty[key]
        if key in self.lru:
            self.lru.move_to_end(key)
            return self.lru[key]  # type: ignore[no-any-return]
        row = one(self.db, "SELECT record FROM acceptor WHERE group_id=? AND slot=?", *key)
        if row is None:
            raise KeyError(key)
        rec = decode_as(row[0], AcceptorRecord)
        state = SlotState(rec.promised, rec.accepted)
        self.lru.put(key, state)
        return state

    def __setitem__(self, key: tuple[bytes, int], value: SlotState) -> None:
        self.dirty[key] = value
        self.lru.put(key, value)

    def __delitem__(self, key: tuple[bytes, int]) -> None:
        raise NotImplementedError("acceptor state is never deleted")

    def __iter__(self) -> Iterator[tuple[bytes, int]]:
        return iter(self.lru)

    def __len__(self) -> int:
        return len(self.lru)

    def flushed(self, key: tuple[bytes, int], value: SlotState) -> None:
        if self.dirty.get(key) == value:
            del self.dirty[key]


class Service:
    """All request handling of one syncnode. Run :meth:`run` in a nursery before use."""

    def __init__(self, key: SecretKey, db_path: Path, *, limits: Limits | None = None,
                 metrics: Metrics | None = None, group_commit: bool = True,
                 cache_groups: int = 1024, cache_slots: int = 4096,
                 clock: Callable[[], float] = entropy.wall, threads: bool = True) -> None:
        self.key = key
        self.node_id = key.public
        self.db_path = db_path
        self.limits = limits or Limits()
        self.metrics = metrics or Metrics()
        self.clock = clock
        self.db = open_database(db_path)
        self.writer = Writer(db_path, batching=group_commit, on_batch=self.metrics.on_batch,
                             threads=threads)
        self.groups = LRU(cache_groups)
        self.slots = SlotCache(self.db, cache_slots)
        self.acceptor = Acceptor(key, self._acceptors_for, self._proposer_key_for, self.slots,
                                 validate_value=self._validate_value)
        self.subscribers: dict[bytes, set[Subscriber]] = {}
        self.mailbox_watchers: dict[bytes, set[Subscriber]] = {}
        """Recipient key -> subscriptions of sessions authenticated with it (mailbox notices)."""
        self.mailbox = Mailbox(self.db, self.writer, self.limits, self.metrics,
                               lambda: self.clock(), self._mailbox_notify,
                               node_id=self.node_id, member_key=self._member_key)
        self._nursery: trio.Nursery | None = None
        self.catchup: Callable[[bytes], None] = lambda group_id: None
        """Hook: ask the peer-sync task to fetch missing decisions of a group."""
        self.addresses = AddressBook(key, self.db, clock, self.limits.max_address_records)
        lim = self.limits
        self.creations = TokenBucket(lim.group_creations_per_second, lim.group_creation_burst,
                                     clock)
        self.endpoint_creations = KeyedBuckets(lim.endpoint_group_creations_per_hour / 3600,
                                               lim.endpoint_group_creations_per_hour, clock)
        self.allowed_creators = {bytes.fromhex(h) for h in lim.accept_groups_from}
        self.metrics.track_storage(lambda: storage_bytes(db_path))
        self.metrics.groups.set(self.group_count())

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Run the writer (and fire-and-forget writes) until :meth:`aclose`."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.writer.run)
            self._nursery = nursery
            task_status.started()

    async def aclose(self) -> None:
        """Finish queued writes and close the database."""
        await self.writer.aclose()
        self.db.close()

    # -- group state ---------------------------------------------------------------------------

    def group_count(self) -> int:
        row = one(self.db, "SELECT count(*) FROM groups")
        return int(row[0]) if row else 0

    def group(self, group_id: bytes) -> GroupState | None:
        g: GroupState | None = self.groups.get(group_id)
        if g is not None:
            self.groups.move_to_end(group_id)
            return g
        row = one(self.db, "SELECT creator, top_slot, bytes_used FROM groups WHERE group_id=?",
                  group_id)
        if row is None:
            return None
        g = GroupState(group_id, row[0], row[1], self.manifest_at(group_id, row[1]), row[2])
        self.groups.put(group_id, g)
        return g

    def require_group(self, group_id: bytes) -> GroupState:
        g = self.group(group_id)
        if g is None:
            raise RequestError(ErrorCode.NOT_FOUND, "this syncnode does not host that group")
        return g

    def manifest_at(self, group_id: bytes, epoch: int) -> Manifest:
        g: GroupState | None = self.groups.get(group_id)
        if g is not None and g.top == epoch:
            return g.manifest
        # The manifests table holds just the manifest of each epoch: reading it avoids loading
        # and decoding whole log values (commit + Welcome, up to megabytes).
        row = one(self.db, "SELECT manifest FROM manifests WHERE group_id=? AND epoch=?",
                  group_id, epoch)
        if row is None and epoch == 0:  # the genesis is small: its manifest is not kept twice
            genesis = one(self.db, "SELECT value FROM decided WHERE group_id=? AND slot=0",
                          group_id)
            if genesis is not None:
                return LogValue.decode(genesis[0]).manifest
        if row is None:
            raise KeyError((group_id, epoch))
        return decode_struct(row[0], Manifest)

    def _acceptors_for(self, group_id: bytes, slot: int) -> AcceptorSet | None:
        g = self.group(group_id)
        if g is None or slot < 1 or slot - 1 > g.top:
            return None
        return self.manifest_at(group_id, slot - 1).acceptors()

    def _proposer_key_for(self, group_id: bytes, slot: int, fpr: bytes) -> bytes | None:
        device = self.manifest_at(group_id, slot - 1).device(fpr)
        return device.sig_pub if device else None

    def _validate_value(self, group_id: bytes, slot: int, value: bytes) -> tuple[int, str] | None:
        try:
            validate_transition(self.manifest_at(group_id, slot - 1), LogValue.decode(value))
        except ManifestError as exc:
            return int(exc.rule), exc.detail
        except DecodeError as exc:
            return 1, f"value does not decode: {exc}"
        return None

    # -- dispatch ------------------------------------------------------------------------------

    async def handle(self, session: Session, msg: Any) -> Any:
        """Answer one request (never raises for a bad request: returns an ErrorReply)."""
        name = type(msg).__name__
        self.metrics.requests.labels(name).inc()
        handler = self._handlers.get(type(msg))
        try:
            if handler is None:
                raise RequestError(ErrorCode.MALFORMED, f"{name} is not a request")
            return await getattr(self, handler)(session, msg)
        except RequestError as exc:
            self.metrics.errors.labels(exc.code.name).inc()
            log.info("request refused", request=name, code=exc.code.name, detail=exc.detail,
                     peer=short_id(session.remote_id))
            return exc.reply()

    async def _challenge(self, session: Session, msg: GetChallenge) -> Challenge:
        return challenge(session)

    async def _authenticate(self, session: Session, msg: Authenticate) -> Authenticated:
        return authenticate(self.node_id, session, msg)

    def _behind(self, session: Session | None, g: GroupState) -> None:
        """A request showed this node is behind on ``g``: ask the peer sync to catch up, but
        only for a current member or one of the group's own syncnodes (``session`` None: this
        node's own code). A stranger's Prepare for a made-up slot must not make the node dial
        anything."""
        if session is not None and not self._may_read(session, g.manifest):
            self.metrics.refuse("catchup_not_member")
            return
        self.catchup(g.group_id)

    def _require_member(self, session: Session, g: GroupState) -> bytes:
        """The fingerprint under which the session acts as a current member of ``g``."""
        for fpr, pub in session.keys.items():
            d = g.manifest.device(fpr)
            if d is not None and d.sig_pub == pub:
                return fpr
        raise RequestError(ErrorCode.UNAUTHORIZED,
                           "not authenticated as a current member of this group")

    # -- genesis -------------------------------------------------------------------------------

    async def _register(self, session: Session, msg: RegisterGroup) -> GroupRegistered:
        try:
            value = LogValue.decode(msg.value)
            validate_genesis(value.manifest.group_id, value)
        except (DecodeError, ManifestError) as exc:
            raise RequestError(ErrorCode.INVALID, f"bad genesis: {exc}") from None
        m = value.manifest
        if self.node_id not in m.acceptors():
            raise RequestError(ErrorCode.INVALID, "the genesis does not name this syncnode")
        existing = self.group(m.group_id)
        if existing is not None:
            stored = one(self.db, "SELECT value FROM decided WHERE group_id=? AND slot=0",
                         m.group_id)
            if stored is not None and stored[0] == msg.value:
                return GroupRegistered(m.group_id, False)
            raise RequestError(ErrorCode.CONFLICT, "a different group has this id")
        self._admit_group(session, value)
        raw, now = msg.value, self.clock()

        def write(c: sqlite3.Connection) -> bool:
            prior = c.execute("SELECT value FROM decided WHERE group_id=? AND slot=0",
                              (m.group_id,)).fetchone()
            if prior is not None:
                if prior[0] != raw:
                    raise RequestError(ErrorCode.CONFLICT, "a different group has this id")
                return False
            c.execute("INSERT INTO groups VALUES (?,?,0,?,?)", (m.group_id, value.signer,
                                                                len(raw), now))
            c.execute("INSERT INTO decided VALUES (?,0,?,NULL)", (m.group_id, raw))
            return True  # the genesis manifest is read from slot 0: stored once

        created = bool(await self.writer.execute(write))
        if created:
            session.groups_created += 1
            self.metrics.groups.inc()
            log.info("group created", group=short_id(m.group_id), creator=short_id(value.signer),
                     syncnodes=len(m.syncnodes), peer=short_id(session.remote_id))
        return GroupRegistered(m.group_id, created)

    def _admit_group(self, session: Session, value: LogValue) -> None:
        """Raise unless this node takes one more group from this creator and connection: the
        operator's allow-list, the node-wide count and creation rate, per-endpoint, -connection
        and -creator counts, and a bound on the peers catch-up would dial (SECURITY.md)."""
        lim, m = self.limits, value.manifest

        def refuse(reason: str, code: ErrorCode, detail: str) -> None:
            self.metrics.refuse(reason)
            raise RequestError(code, detail)

        if self.allowed_creators and value.signer not in self.allowed_creators:
            refuse("creator_not_allowed", ErrorCode.UNAUTHORIZED,
                   "this syncnode accepts new groups only from keys its operator listed")
        if len(m.syncnodes) > lim.max_group_syncnodes:
            refuse("too_many_syncnodes", ErrorCode.INVALID,
                   f"a group may name at most {lim.max_group_syncnodes} syncnodes here")
        if self.group_count() >= lim.max_groups:
            refuse("node_group_quota", ErrorCode.QUOTA_EXCEEDED,
                   "this syncnode hosts as many groups as its operator allows")
        if session.groups_created >= lim.max_groups_per_connection:
            refuse("connection_group_quota", ErrorCode.QUOTA_EXCEEDED,
                   f"at most {lim.max_groups_per_connection} new groups per connection")
        row = one(self.db, "SELECT count(*) FROM groups WHERE creator=?", value.signer)
        if row is not None and row[0] >= lim.max_groups_per_key:
            refuse("creator_group_quota", ErrorCode.QUOTA_EXCEEDED,
                   f"at most {lim.max_groups_per_key} groups per creator")
        if not self.creations.take():
            refuse("group_creation_rate", ErrorCode.RATE_LIMITED,
                   "too many new groups on this syncnode just now; retry in a few seconds")
        if not self.endpoint_creations.take(session.remote_id):
            refuse("endpoint_group_creation_rate", ErrorCode.RATE_LIMITED,
                   f"at most {lim.endpoint_group_creations_per_hour} new groups per hour "
                   "from one endpoint")

    # -- Paxos ---------------------------------------------------------------------------------

    async def _paxos(self, session: Session, msg: Prepare | Accept) -> Any:
        self.metrics.paxos.labels(type(msg).__name__).inc()
        g = self.require_group(msg.group_id)
        if msg.slot == 0:
            raise RequestError(ErrorCode.INVALID, "slot 0 is the genesis, not decided by Paxos")
        if msg.slot <= g.top:
            return self.decided_at(g.group_id, msg.slot)  # tell the proposer it is over
        if msg.slot > g.top + 1:
            self._behind(session, g)
            return PaxosRejected(msg.group_id, msg.slot, RejectReason.UNKNOWN_SLOT, 0,
                                 f"this syncnode has decided up to slot {g.top} only; "
                                 "catching up from peers, retry shortly")
        step = self.acceptor.handle(msg)
        if step.persist:
            records = [(r.group_id, r.slot, encode(r)) for r in step.persist]

            def write(c: sqlite3.Connection) -> None:
                c.executemany("INSERT OR REPLACE INTO acceptor VALUES (?,?,?)", records)

            await self.writer.execute(write)
            for r in step.persist:
                self.slots.flushed((r.group_id, r.slot), SlotState(r.promised, r.accepted))
        else:
            await self.writer.barrier()  # the state this reply reports is durable
        return self._paxos_reply(msg, step.reply)

    def _paxos_reply(self, msg: Prepare | Accept, reply: Any) -> Any:
        if isinstance(reply, Reject):
            self.metrics.paxos.labels("Rejected").inc()
            return PaxosRejected(msg.group_id, msg.slot, int(reply.reason), reply.rule,
                                 reply.detail[:512])
        self.metrics.paxos.labels(type(reply).__name__).inc()
        return reply

    def decided_at(self, group_id: bytes, slot: int) -> Decided:
        row = one(self.db, "SELECT value, certificate FROM decided WHERE group_id=? AND slot=?",
                  group_id, slot)
        assert row is not None and row[1] is not None
        return Decided(row[0], decode_as(row[1], Certificate))

    # -- decided log ---------------------------------------------------------------------------

    async def _learn(self, session: Session, msg: Decided) -> Done:
        return Done(await self.learn(msg, source=short_id(session.remote_id), session=session))

    async def learn(self, msg: Decided, *, source: str, session: Session | None = None) -> int:
        """Verify and store a decision (from a device or a peer syncnode). Returns 1 when it was
        new, 0 when already known; raises RequestError otherwise."""
        cert = msg.certificate
        g = self.require_group(cert.group_id)
        if value_hash(msg.value) != cert.value_hash:
            raise RequestError(ErrorCode.INVALID, "value does not match the certificate")
        if cert.slot == 0:
            raise RequestError(ErrorCode.INVALID, "slot 0 is the genesis")
        async with g.lock:
            if cert.slot <= g.top:
                return self._known(g, msg)
            if cert.slot > g.top + 1:
                self._behind(session, g)
                raise RequestError(ErrorCode.NOT_FOUND,
                                   f"missing slots {g.top + 1}..{cert.slot - 1}; catching up")
            try:
                value = verify_decided(g.manifest, msg.value, cert)
            except CertificateError as exc:
                raise RequestError(ErrorCode.INVALID, f"certificate: {exc}") from None
            except ManifestError as exc:
                # A valid certificate for an invalid value means a quorum of acceptors broke the
                # rules. Refuse to serve it; members will see the same.
                log.error("certified value breaks the manifest rules", group=short_id(g.group_id),
                          slot=cert.slot, error=str(exc))
                raise RequestError(ErrorCode.INVALID, f"certified value is invalid: {exc}"
                                   ) from None
            size = len(msg.value)

            def write(c: sqlite3.Connection) -> None:
                c.execute("INSERT INTO decided VALUES (?,?,?,?)",
                          (g.group_id, cert.slot, msg.value, encode(cert)))
                c.execute("INSERT OR REPLACE INTO manifests VALUES (?,?,?)",
                          (g.group_id, cert.slot, encode_struct(value.manifest)))
                c.execute("UPDATE groups SET top_slot=?, bytes_used=bytes_used+? "
                          "WHERE group_id=?", (cert.slot, size, g.group_id))

            await self.writer.execute(write)
            g.top, g.manifest, g.bytes_used = cert.slot, value.manifest, g.bytes_used + size
        self.metrics.decisions.inc()
        log.info("decision stored", group=short_id(g.group_id), slot=cert.slot,
                 epoch=value.manifest.epoch, devices=len(value.manifest.devices),
                 signer=short_id(value.signer), source=source)
        self._publish(g, msg, new_manifest=True)
        return 1

    def _known(self, g: GroupState, msg: Decided) -> int:
        stored = self.decided_at(g.group_id, msg.certificate.slot)
        if stored.certificate.value_hash == msg.certificate.value_hash:
            return 0
        try:
            acceptors = self.manifest_at(g.group_id, msg.certificate.slot - 1).acceptors()
            verify_certificate(msg.certificate, acceptors)
        except CertificateError as exc:
            raise RequestError(ErrorCode.INVALID, f"certificate: {exc}") from None
        proof = EquivocationProof(stored.certificate, msg.certificate)
        self.metrics.equivocations.inc()
        log.error("EQUIVOCATION: two certified values for one slot", group=short_id(g.group_id),
                  slot=msg.certificate.slot)
        self.writer_fire(lambda c: c.execute(
            "INSERT OR IGNORE INTO equivocations VALUES (?,?,?)",
            (g.group_id, msg.certificate.slot, encode(proof))))
        raise RequestError(ErrorCode.CONFLICT,
                           "a different value is certified for this slot (equivocation)")

    def writer_fire(self, op: Callable[[sqlite3.Connection], Any]) -> None:
        """Queue a write nobody waits for (evidence, housekeeping)."""
        async def go() -> None:
            try:
                await self.writer.execute(op)
            except Exception as exc:
                log.error("background write failed", error=str(exc))

        if self._nursery is not None:
            self._nursery.start_soon(go)

    # Who reads a group's decided log and heads (issue 14, finding 7). Manifests name every
    # member's keys, endpoints and addresses and the group's syncnodes; commits and Welcomes
    # show sizes and timing. So:
    # - a current member (a session authenticated with a device key of the current manifest)
    #   and the group's own syncnodes (the connection's authenticated endpoint id is a node id
    #   of the current manifest: peer catch-up and sweeps) read all of it, from the genesis (a
    #   device added at slot s is a member from s on, and then verifies the log from slot 0);
    # - a former member or syncnode reads from the slot after an epoch whose manifest names it
    #   up to the slot that dropped it, so a device removed while away learns its removal, and
    #   nothing later;
    # - anyone else, including a device waiting to be added, gets UNAUTHORIZED for the log and
    #   no head for the group. An unknown group gets the same UNAUTHORIZED as a hidden one, and
    #   the same empty answer from FetchHeads: the log requests are no existence oracle. (Group
    #   ids are random; RegisterGroup must still refuse an id that is taken, with CONFLICT.)

    def _may_read(self, session: Session, m: Manifest) -> bool:
        """Is the session a device or syncnode named by manifest ``m``?"""
        if any(s.node_id == session.remote_id for s in m.syncnodes):
            return True
        return any((d := m.device(fpr)) is not None and d.sig_pub == pub
                   for fpr, pub in session.keys.items())

    def _readable_up_to(self, session: Session, g: GroupState, from_slot: int, limit: int
                        ) -> int | None:
        """The last slot of ``g`` the session may read in a page from ``from_slot`` (None: not
        allowed at all)."""
        if self._may_read(session, g.manifest):
            return g.top
        if not 1 <= from_slot <= g.top:
            return None
        try:
            if not self._may_read(session, self.manifest_at(g.group_id, from_slot - 1)):
                return None
            last = min(g.top, from_slot + min(limit, 64) - 1)
            for slot in range(from_slot, last + 1):  # a former member: up to its removal
                if not self._may_read(session, self.manifest_at(g.group_id, slot)):
                    return slot
        except KeyError:  # a manifest this node lacks: nothing to judge by
            return None
        return last

    async def _fetch_decided(self, session: Session, msg: FetchDecided) -> DecidedPage:
        g = self.group(msg.group_id)
        limit = max(1, min(msg.limit, MAX_PAGE))
        up_to = None if g is None else self._readable_up_to(session, g, msg.from_slot, limit)
        if g is None or up_to is None:
            self.metrics.refuse("log_not_member")
            raise RequestError(ErrorCode.UNAUTHORIZED,
                               "only members of a group and its syncnodes read its decided "
                               "log (or this syncnode does not host the group)")
        genesis = None
        if msg.from_slot == 0:
            row = one(self.db, "SELECT value FROM decided WHERE group_id=? AND slot=0",
                      g.group_id)
            genesis = row[0] if row else None
        out: list[Decided] = []
        budget = PAGE_BYTES
        for value, cert in rows(self.db, "SELECT value, certificate FROM decided WHERE "
                                "group_id=? AND slot>=? AND slot>0 AND slot<=? ORDER BY slot "
                                "LIMIT ?", g.group_id, max(msg.from_slot, 1), up_to, limit):
            budget -= len(value)
            if out and budget < 0:
                break
            out.append(Decided(value, decode_as(cert, Certificate)))
        return DecidedPage(g.group_id, genesis, tuple(out), up_to)

    async def _fetch_heads(self, session: Session, msg: FetchHeads) -> Heads:
        """Heads of the asked groups this node hosts and the session may read (above); the
        others are left out, hosted or not."""
        heads = []
        hidden = False
        for gid in msg.group_ids:
            g = self.group(gid)
            if g is None:
                continue
            if self._may_read(session, g.manifest):
                heads.append(Head(gid, g.top))
            else:
                hidden = True
        if hidden:
            if "heads_not_member" not in session.counted:  # a joiner polls until it is added
                session.counted.add("heads_not_member")
                self.metrics.refuse("heads_not_member")
        return Heads(tuple(heads))

    # -- messages ------------------------------------------------------------------------------

    async def _store(self, session: Session, msg: Envelope) -> Stored:
        g = self.require_group(msg.group_id)
        self._require_member(session, g)
        if msg.epoch > g.top:
            self._behind(session, g)
            raise RequestError(ErrorCode.NOT_FOUND,
                               f"envelope epoch {msg.epoch} is ahead of this syncnode's "
                               f"{g.top}; send the decision first or retry")
        sender = g.manifest.device(msg.sender)
        if sender is None:
            raise RequestError(ErrorCode.UNAUTHORIZED, "sender is not a current member")
        if msg.seq < 1:
            raise RequestError(ErrorCode.INVALID, "seq counts from 1")
        if not msg.verify(sender.sig_pub):
            raise RequestError(ErrorCode.UNAUTHORIZED, "envelope signature does not verify")
        raw = encode(msg)
        if g.bytes_used + len(raw) > self.limits.max_bytes_per_group:
            raise RequestError(ErrorCode.QUOTA_EXCEEDED,
                               f"group is over its {self.limits.max_bytes_per_group} byte quota")
        digest = msg.digest()

        def write(c: sqlite3.Connection) -> bool:
            cur = c.execute("INSERT OR IGNORE INTO envelopes VALUES (?,?,?,?,?)",
                            (msg.group_id, msg.sender, msg.seq, digest, raw))
            if cur.rowcount == 0:
                prior = c.execute("SELECT digest FROM envelopes WHERE group_id=? AND sender=? "
                                  "AND seq=?", (msg.group_id, msg.sender, msg.seq)).fetchone()
                if prior[0] != digest:
                    raise RequestError(ErrorCode.CONFLICT,
                                       f"sender already stored a different seq {msg.seq}")
                return False
            c.execute("UPDATE groups SET bytes_used=bytes_used+? WHERE group_id=?",
                      (len(raw), msg.group_id))
            return True

        if await self.writer.execute(write):
            g.bytes_used += len(raw)
            self.metrics.messages_stored.inc()
            self._publish(g, msg)
        return Stored(msg.group_id, msg.sender, msg.seq)

    async def _backfill(self, session: Session, msg: Backfill) -> BackfillPage:
        g = self.require_group(msg.group_id)
        self._require_member(session, g)
        marks = {w.sender: w.seq for w in msg.watermarks}
        limit = max(1, min(msg.limit, MAX_PAGE))
        out: list[Envelope] = []
        budget = PAGE_BYTES
        more = False
        senders = [r[0] for r in rows(self.db, "SELECT DISTINCT sender FROM envelopes "
                                      "WHERE group_id=? ORDER BY sender", g.group_id)]
        for sender in senders:
            for (raw,) in rows(self.db, "SELECT envelope FROM envelopes WHERE group_id=? AND "
                               "sender=? AND seq>? ORDER BY seq LIMIT ?", g.group_id, sender,
                               marks.get(sender, 0), limit - len(out) + 1):
                if len(out) >= limit or (out and budget - len(raw) < 0):
                    more = True
                    break
                budget -= len(raw)
                out.append(decode_as(raw, Envelope))
            if more:
                break
        self.metrics.messages_served.inc(len(out))
        return BackfillPage(tuple(out), more)

    def subscribe(self, session: Session, msg: Subscribe) -> tuple[Subscribed, Subscriber]:
        """Register a live subscriber (the driver streams its queue). Raises RequestError."""
        g = self.require_group(msg.group_id)
        fpr = self._require_member(session, g)
        sub = Subscriber(g.group_id, fpr, session,
                         max_bytes=self.limits.max_subscriber_queue_bytes)
        self.subscribers.setdefault(g.group_id, set()).add(sub)
        for key in session.keys.values():
            self.mailbox_watchers.setdefault(key, set()).add(sub)
        return Subscribed(g.group_id, g.top), sub

    def unsubscribe(self, sub: Subscriber) -> None:
        subs = self.subscribers.get(sub.group_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self.subscribers[sub.group_id]
        for key in sub.session.keys.values():
            watchers = self.mailbox_watchers.get(key)
            if watchers is not None:
                watchers.discard(sub)
                if not watchers:
                    del self.mailbox_watchers[key]

    def _publish(self, g: GroupState, item: Envelope | Decided, *,
                 new_manifest: bool = False) -> None:
        frame = encode(item)
        for sub in list(self.subscribers.get(g.group_id, ())):
            if new_manifest and g.manifest.device(sub.fingerprint) is None:
                sub.close("removed from the group")
                self.unsubscribe(sub)
                continue
            if not sub.offer(frame):
                self.metrics.refuse("subscriber_behind")
                self.unsubscribe(sub)
            elif isinstance(item, Envelope):
                self.metrics.messages_pushed.inc()

    # -- mailbox (syncnode/mailbox.py) ---------------------------------------------------------

    def _mailbox_notify(self, recipient: bytes) -> None:
        notice = encode(MailboxNotice(recipient))
        for sub in list(self.mailbox_watchers.get(recipient, ())):
            if not sub.offer(notice):
                self.unsubscribe(sub)

    async def _mailbox_put(self, session: Session, msg: MailboxPut) -> MailboxStored:
        return await self.mailbox.put(session, msg)

    def _member_key(self, session: Session, group_id: bytes) -> bytes | None:
        g = self.group(group_id)
        if g is None:
            return None
        try:
            return self._require_member(session, g)
        except RequestError:
            return None

    async def _mailbox_fetch(self, session: Session, msg: MailboxFetch) -> MailboxItems:
        items = await self.mailbox.fetch(session, msg)
        self._watch_mailbox(session, msg.recipient)
        return items

    def _watch_mailbox(self, session: Session, recipient: bytes) -> None:
        """Notices for ``recipient`` also reach the session's subscriptions made before it
        authenticated with that key (an inviter reading its invite boxes). :meth:`unsubscribe`
        drops them with the session's other keys."""
        watchers = self.mailbox_watchers.get(recipient, set())
        if any(s.session is session for s in watchers):
            return
        mine = {s for key in session.keys.values() if key != recipient
                for s in self.mailbox_watchers.get(key, ()) if s.session is session}
        if mine:
            self.mailbox_watchers[recipient] = watchers | mine

    async def _mailbox_ack(self, session: Session, msg: MailboxAck) -> Done:
        return await self.mailbox.ack(session, msg)

    async def expire_mailbox(self) -> None:
        await self.mailbox.expire()

    # -- address records -------------------------------------------------------------------------

    async def _get_addresses(self, session: Session, msg: GetAddresses) -> Addresses:
        return Addresses(tuple(self.addresses.lookup(msg.node_ids)))

    async def _put_address(self, session: Session, msg: PutAddress) -> Done:
        why = self.addresses.check(msg.record)
        if why is not None:
            raise RequestError(ErrorCode.INVALID, f"address record refused: {why}")
        kept = await self.writer.execute(self.addresses.write(msg.record))
        if kept:
            log.info("address record stored", node=short_id(msg.record.body.node_id),
                     addrs=list(msg.record.body.addrs), source=short_id(session.remote_id))
        return Done(int(kept))

    _handlers: dict[type, str] = {  # by name: subclasses (the simulator's) may override
        GetChallenge: "_challenge",
        Authenticate: "_authenticate",
        RegisterGroup: "_register",
        Prepare: "_paxos",
        Accept: "_paxos",
        Decided: "_learn",
        FetchDecided: "_fetch_decided",
        FetchHeads: "_fetch_heads",
        Envelope: "_store",
        Backfill: "_backfill",
        MailboxPut: "_mailbox_put",
        MailboxFetch: "_mailbox_fetch",
        MailboxAck: "_mailbox_ack",
        GetAddresses: "_get_addresses",
        PutAddress: "_put_address",
    }


class Subscriber:
    """One live subscription: a bounded queue of frames. A subscriber that falls too far behind
    (more than ``max_queue`` frames or ``max_bytes`` bytes waiting) is dropped (it reconnects and
    backfills) rather than making the node buffer without bound."""

    def __init__(self, group_id: bytes, fpr: bytes, session: Session, *,
                 max_bytes: int = 8 * 1024 * 1024) -> None:
        self.group_id = group_id
        self.fingerprint = fpr
        self.session = session
        self.send, self.receive = trio.open_memory_channel[bytes](SUBSCRIBER_QUEUE)
        self.closed_reason: str | None = None
        self.queued = 0
        self.max_bytes = max_bytes

    def offer(self, frame: bytes) -> bool:
        if self.queued + len(frame) > self.max_bytes and self.queued:
            self.close("subscriber fell behind")
            return False
        try:
            self.send.send_nowait(frame)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            self.close("subscriber fell behind")
            return False
        self.queued += len(frame)
        return True

    def taken(self, size: int) -> None:
        """The driver took a frame of ``size`` bytes off the queue to send it."""
        self.queued -= size

    def close(self, reason: str) -> None:
        if self.closed_reason is None:
            self.closed_reason = reason
            self.send.close()
