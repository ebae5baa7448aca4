"""The syncnode service: which part of the node answers each request, and how the parts are
wired to one storage.

The parts, one concept each (their modules say more):

* :mod:`syncnode.session` -- a connection's session, proving a key, :class:`RequestError`;
* :mod:`syncnode.groups` -- hosted groups' state and manifests, membership and read rights;
* :mod:`syncnode.admission` -- whether a new group is taken (``RegisterGroup``);
* :mod:`syncnode.hosting` -- groups adopted after their genesis (``AdoptGroup``), removed ones
  (GONE, retention), and each group's status (``FetchGroupStatus``);
* :mod:`syncnode.acceptor` -- the Paxos acceptor driver (Prepare, Accept, AcceptLeased);
* :mod:`syncnode.decisions` -- the decided log: learning, equivocation evidence, log and heads;
* :mod:`syncnode.envelopes` -- the envelope store and backfill;
* :mod:`syncnode.statements` -- signed acks, heads and backfill answers (``FetchHoldings``);
* :mod:`syncnode.fanout` -- live subscriptions and mailbox notices;
* :mod:`syncnode.mailbox`, :mod:`syncnode.addresses` -- the mailbox and address records;
* :mod:`syncnode.storage` -- the storage interface; SQLite is the default implementation.

Every state change is durable **before** its request is answered (the storage's writes return
once committed; see :mod:`syncnode.storage.base`). The service knows nothing about sockets, so
tests, the daemon and the simulator drive the same code.

Requests are dispatched by type through :attr:`Service._handlers` to methods of this class,
by name: the simulator's byzantine services (``simulations/byzantine.py``) subclass
:class:`Service` and override those methods, :meth:`_publish`, or the parts' helpers exposed
here (:meth:`require_group`, :meth:`_require_member`, :attr:`acceptor`, :meth:`_paxos_reply`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from os import PathLike
from typing import Any

import trio

from proto import entropy
from proto.address import Addresses, GetAddresses, PutAddress
from proto.antientropy import Digests, FetchDigests, FetchMarks, Marks
from proto.envelope import Envelope
from proto.holdings import FetchHoldings, Holdings
from proto.identity import SecretKey, short_id
from proto.logs import get_logger
from proto.manifest import Manifest
from proto.messages import ErrorCode
from proto.paxos.acceptor import Acceptor
from proto.paxos.messages import Accept, AcceptLeased, Decided, Prepare
from proto.service import (
    AdoptGroup,
    Authenticate,
    Authenticated,
    Backfill,
    BackfillPage,
    Challenge,
    DecidedPage,
    Done,
    FetchDecided,
    FetchGroupStatus,
    FetchHeads,
    GetChallenge,
    GroupRegistered,
    GroupStatus,
    Heads,
    MailboxAck,
    MailboxFetch,
    MailboxItems,
    MailboxPut,
    MailboxStored,
    RegisterGroup,
    Stored,
    Subscribe,
    Subscribed,
)
from syncnode.acceptor import AcceptorDriver
from syncnode.addresses import AddressBook
from syncnode.admission import Admission
from syncnode.budgets import LRU, KeyedBuckets, TokenBucket
from syncnode.compaction import Compactor
from syncnode.config import Limits
from syncnode.decisions import PAGE_BYTES, DecidedLog
from syncnode.envelopes import Envelopes
from syncnode.fanout import SUBSCRIBER_QUEUE, Fanout, Subscriber
from syncnode.groups import Groups, GroupState, may_read, require_member
from syncnode.hosting import Hosting
from syncnode.mailbox import Mailbox
from syncnode.metrics import Metrics
from syncnode.session import RequestError, Session, authenticate, challenge
from syncnode.siblings import Siblings
from syncnode.statements import Notary
from syncnode.storage import Storage
from syncnode.storage.open import open_storage

__all__ = [  # names other modules have imported from here
    "LRU", "PAGE_BYTES", "SUBSCRIBER_QUEUE", "GroupState", "KeyedBuckets", "RequestError",
    "Service", "Session", "Subscriber", "TokenBucket",
]

log = get_logger("syncnode.service")


class Service:
    """All request handling of one syncnode. Run :meth:`run` in a nursery before use.

    ``storage`` is a :class:`~syncnode.storage.Storage`, a ``postgresql://`` URL, or the path
    of a SQLite database (opened here, with ``group_commit`` and ``threads`` for its
    writer). ``threads=False`` also
    keeps the server from decoding on worker threads (the deterministic simulator)."""

    def __init__(self, key: SecretKey, storage: str | PathLike[str] | Storage, *,
                 limits: Limits | None = None,
                 metrics: Metrics | None = None, group_commit: bool = True,
                 cache_groups: int = 1024, cache_slots: int = 4096,
                 clock: Callable[[], float] = entropy.wall, threads: bool = True) -> None:
        self.key = key
        self.node_id = key.public
        self.limits = limits or Limits()
        self.metrics = metrics or Metrics()
        self.clock = clock
        self.threads = threads
        self.store: Storage = storage if not isinstance(storage, (str, PathLike)) else \
            open_storage(storage, group_commit=group_commit, threads=threads)
        self.store.on_batch = self.metrics.on_batch
        self._nursery: trio.Nursery | None = None
        self.groups = Groups(self.store, self.metrics, cache_groups)
        self.fanout = Fanout(self.metrics)
        self.admission = Admission(self.node_id, self.store, self.groups, self.limits,
                                   self.metrics, clock=clock, now=lambda: self.clock())
        self.decisions = DecidedLog(self.store, self.groups, self.metrics,
                                    publish=self._publish, fire=self._fire)
        self.hosting = Hosting(self.node_id, self.store, self.groups, self.admission,
                               self.limits, self.metrics, now=lambda: self.clock(),
                               capacity=cache_groups)
        self.paxos = AcceptorDriver(key, self.store, self.groups, self.metrics, cache_slots,
                                    decided_at=self.decisions.decided_at)
        self.notary = Notary(key, self.store, self.groups, self.metrics, clock)
        self.compactor = Compactor(self.store, self.groups, self.metrics)
        self.envelopes = Envelopes(self.store, self.groups, self.limits, self.metrics,
                                   publish=self._publish, notary=self.notary,
                                   compactor=self.compactor)
        self.mailbox = Mailbox(self.store, self.limits, self.metrics, lambda: self.clock(),
                               self.fanout.notify_mailbox, node_id=self.node_id,
                               member_key=self._member_key)
        self.addresses = AddressBook(key, self.store, clock, self.limits.max_address_records)
        self._siblings_scope = trio.CancelScope()
        self.siblings: Siblings | None = None
        """Shared storage: keeps this process in step with the node's others."""
        if getattr(self.store, "shared", False):
            self.siblings = Siblings(self.store, self.groups, self.hosting, self.decisions,
                                     self.fanout, self.metrics)
            self.store.on_change = self.siblings.heard  # type: ignore[attr-defined]
        self.on_stored: Callable[[bytes], None] = lambda group_id: None
        """Hook: a device's envelope for this group was stored (the reconciler's trigger)."""
        self.metrics.track_storage(self.store.size_bytes)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Run the storage's writer (and fire-and-forget writes) until :meth:`aclose`."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.store.run)
            if self.siblings is not None:
                nursery.start_soon(self._run_siblings)
            self.metrics.groups.set(await self.groups.count())
            self._nursery = nursery
            task_status.started()

    async def _run_siblings(self) -> None:
        assert self.siblings is not None
        with self._siblings_scope:
            await self.siblings.run()

    async def aclose(self) -> None:
        """Finish queued writes and close the storage."""
        await self.store.aclose()
        self._siblings_scope.cancel()

    def _fire(self, write: Callable[[], Awaitable[object]]) -> None:
        """Run a write nobody waits for (evidence, housekeeping)."""
        async def go() -> None:
            try:
                await write()
            except Exception as exc:
                log.error("background write failed", error=str(exc))

        if self._nursery is not None:
            self._nursery.start_soon(go)

    # -- the parts' state and helpers, as the simulator's byzantine services use them ----------

    @property
    def catchup(self) -> Callable[[bytes], None]:
        """Hook: ask the peer-sync task to fetch missing decisions of a group."""
        return self.groups.catchup

    @catchup.setter
    def catchup(self, hook: Callable[[bytes], None]) -> None:
        self.groups.catchup = hook

    @property
    def acceptor(self) -> Acceptor:
        return self.paxos.acceptor

    @acceptor.setter
    def acceptor(self, acceptor: Acceptor) -> None:
        self.paxos.acceptor = acceptor

    async def group_count(self) -> int:
        return await self.groups.count()

    async def group(self, group_id: bytes) -> GroupState | None:
        return await self.groups.get(group_id)

    async def require_group(self, group_id: bytes) -> GroupState:
        return await self.groups.require(group_id)

    async def manifest_at(self, group_id: bytes, epoch: int) -> Manifest:
        return await self.groups.manifest_at(group_id, epoch)

    def _require_member(self, session: Session, g: GroupState) -> bytes:
        return require_member(session, g)

    def _may_read(self, session: Session, m: Manifest) -> bool:
        return may_read(session, m)

    def _paxos_reply(self, msg: Prepare | Accept | AcceptLeased, reply: Any) -> Any:
        return self.paxos.reply(msg, reply)

    async def decided_at(self, group_id: bytes, slot: int) -> Decided:
        return await self.decisions.decided_at(group_id, slot)

    async def learn(self, msg: Decided, *, source: str, session: Session | None = None) -> int:
        """Verify and store a decision (from a device or a peer syncnode). Returns 1 when it was
        new, 0 when already known; raises RequestError otherwise."""
        learned = await self.decisions.learn(msg, source=source, session=session)
        if learned:  # serving now, or removed?
            await self.hosting.decided(msg.certificate.group_id)
            g = await self.groups.get(msg.certificate.group_id)
            if g is not None:
                self.compact_soon(g)
        return learned

    def compact_soon(self, g: GroupState) -> None:
        """Apply ``g``'s decided compaction point in the background if it is not applied
        yet (:mod:`syncnode.compaction`: once the state envelope is here). Cheap when
        there is nothing to do."""
        if g.manifest.compaction is not None and g.manifest.compaction != g.compacted:
            self._fire(lambda: self.compactor.maybe_apply(g))

    def _publish(self, g: GroupState, item: Envelope | Decided, *,
                 new_manifest: bool = False) -> None:
        self.fanout.publish(g, item, new_manifest=new_manifest)

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

    async def _register(self, session: Session, msg: RegisterGroup) -> GroupRegistered:
        return await self.admission.register(session, msg)

    async def _adopt(self, session: Session, msg: AdoptGroup) -> GroupRegistered:
        return await self.hosting.adopt(session, msg)

    async def _group_status(self, session: Session, msg: FetchGroupStatus) -> GroupStatus:
        return await self.hosting.status(session, msg.group_id)

    async def _paxos(self, session: Session, msg: Prepare | Accept | AcceptLeased) -> Any:
        g = await self.groups.require(msg.group_id)
        if msg.slot > g.top:  # a decided slot is still answered with its decision
            await self.hosting.refuse_if_removed(g)
        return await self.paxos.handle(session, msg)

    async def _learn(self, session: Session, msg: Decided) -> Done:
        return Done(await self.learn(msg, source=short_id(session.remote_id), session=session))

    async def _fetch_decided(self, session: Session, msg: FetchDecided) -> DecidedPage:
        return await self.decisions.fetch_decided(session, msg)

    async def _fetch_heads(self, session: Session, msg: FetchHeads) -> Heads:
        return await self.decisions.fetch_heads(session, msg)

    async def _fetch_holdings(self, session: Session, msg: FetchHoldings) -> Holdings:
        return await self.notary.holdings(session, msg)

    async def _store(self, session: Session, msg: Envelope) -> Stored:
        g = await self.groups.require(msg.group_id)
        if self.siblings is not None and msg.epoch > g.top:  # learned by another process?
            await self.groups.reload(g, throttled=True)
        await self.hosting.refuse_if_removed(g)
        stored = await self.envelopes.store_envelope(session, msg)
        self.on_stored(msg.group_id)
        self.compact_soon(await self.groups.require(msg.group_id))
        return stored

    async def _backfill(self, session: Session, msg: Backfill) -> BackfillPage:
        page = await self.envelopes.backfill(session, msg)
        # A point not applied yet (this node restarted before its background deletion ran):
        # devices backfill after every reconnect, so that is when it catches up.
        self.compact_soon(await self.groups.require(msg.group_id))
        return page

    async def _fetch_digests(self, session: Session, msg: FetchDigests) -> Digests:
        return await self.envelopes.digests(session, msg)

    async def _fetch_marks(self, session: Session, msg: FetchMarks) -> Marks:
        return await self.envelopes.marks(session, msg)

    async def subscribe(self, session: Session, msg: Subscribe) -> tuple[Subscribed, Subscriber]:
        """Register a live subscriber (the driver streams its queue). Raises RequestError.

        ``Subscribed`` is answered only once every write begun before the subscriber was
        registered is committed. A new envelope is pushed while its batch still commits
        (:mod:`syncnode.envelopes`), to the subscribers registered then; one that subscribes
        in between, and backfills when it gets ``Subscribed`` (as devices do), would find it
        neither in its feed nor, not yet committed, in the backfill, and have it only at its
        next periodic backfill (a rare test failure: an envelope that never arrived within 30 s).
        The wait is one batch at most."""
        g = await self.groups.require(msg.group_id)
        await self.hosting.refuse_if_removed(g)
        fpr = require_member(session, g)
        sub = self.fanout.subscribe(session, g.group_id, fpr,
                                    max_bytes=self.limits.max_subscriber_queue_bytes)
        try:
            await self.store.barrier()
        except BaseException:
            self.fanout.unsubscribe(sub)
            raise
        return Subscribed(g.group_id, g.top), sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self.fanout.unsubscribe(sub)

    async def _mailbox_put(self, session: Session, msg: MailboxPut) -> MailboxStored:
        return await self.mailbox.put(session, msg)

    async def _member_key(self, session: Session, group_id: bytes) -> bytes | None:
        g = await self.groups.get(group_id)
        if g is None:
            return None
        try:
            return require_member(session, g)
        except RequestError:
            return None

    async def _mailbox_fetch(self, session: Session, msg: MailboxFetch) -> MailboxItems:
        items = await self.mailbox.fetch(session, msg)
        self.fanout.watch_mailbox(session, msg.recipient)
        return items

    async def _mailbox_ack(self, session: Session, msg: MailboxAck) -> Done:
        return await self.mailbox.ack(session, msg)

    async def expire_mailbox(self) -> None:
        await self.mailbox.expire()

    async def expire_removed(self) -> int:
        """Delete the groups this node was removed from longer ago than the retention."""
        return await self.hosting.expire_removed()

    async def _get_addresses(self, session: Session, msg: GetAddresses) -> Addresses:
        return Addresses(tuple(await self.addresses.lookup(msg.node_ids)))

    async def _put_address(self, session: Session, msg: PutAddress) -> Done:
        why = self.addresses.check(msg.record)
        if why is not None:
            raise RequestError(ErrorCode.INVALID, f"address record refused: {why}")
        kept = await self.addresses.keep(msg.record)
        if kept:
            log.info("address record stored", node=short_id(msg.record.body.node_id),
                     addrs=list(msg.record.body.addrs), source=short_id(session.remote_id))
        return Done(int(kept))

    _handlers: dict[type, str] = {  # by name: subclasses (the simulator's) may override
        GetChallenge: "_challenge",
        Authenticate: "_authenticate",
        RegisterGroup: "_register",
        AdoptGroup: "_adopt",
        FetchGroupStatus: "_group_status",
        Prepare: "_paxos",
        Accept: "_paxos",
        AcceptLeased: "_paxos",
        Decided: "_learn",
        FetchDecided: "_fetch_decided",
        FetchHeads: "_fetch_heads",
        FetchHoldings: "_fetch_holdings",
        Envelope: "_store",
        Backfill: "_backfill",
        FetchDigests: "_fetch_digests",
        FetchMarks: "_fetch_marks",
        MailboxPut: "_mailbox_put",
        MailboxFetch: "_mailbox_fetch",
        MailboxAck: "_mailbox_ack",
        GetAddresses: "_get_addresses",
        PutAddress: "_put_address",
    }
