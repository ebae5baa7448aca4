"""The Paxos acceptor of a syncnode: the driver around the sans-IO
:class:`proto.paxos.acceptor.Acceptor`.

For a Prepare or Accept of a group's next slot it loads what the acceptor reads (the slot's
state, the manifest that names the slot's acceptors and proposers), takes the acceptor's step,
makes the step's records durable **before** the reply leaves, and answers. A slot already
decided is answered with its decision; a slot beyond the next one with a rejection (and a
catch-up from peers). An AcceptLeased (the fast path) also loads slot + 1, whose promise the
acceptor may give in the same step; both records go to storage in one write (one fsync).

Slot state lives in a bounded LRU over the storage's acceptor records (:class:`SlotCache`).
State changed in memory but not yet durable is pinned until its write commits, so eviction can
never resurrect an older promise; a load that raced a change of the same slot is read again.

**Several processes on one database** (a :class:`~syncnode.storage.SharedStorage`): another
process may promise or accept on the same slot at any moment, so no cache can be trusted.
Each step is then taken on the record just read from the database (committed, so durable), in
a mapping of its own (never on another request's uncommitted state), and kept only through
:meth:`~syncnode.storage.Storage.put_acceptor_record_if` on the record it was taken on; if the
record changed meanwhile, the step is thrown away and taken again on the new one. A step that
writes nothing answers from committed state. So the node's processes answer proposers as one
acceptor whose every promise and accept is decided and made durable in one transaction.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import Any

from proto.codec import decode_as, encode
from proto.errors import DecodeError
from proto.identity import SecretKey
from proto.manifest import LogValue, Manifest, ManifestError, validate_transition
from proto.messages import ErrorCode
from proto.paxos.acceptor import EMPTY, Acceptor, Reject, RejectReason, SlotState
from proto.paxos.messages import (
    Accept,
    AcceptLeased,
    AcceptorRecord,
    Decided,
    PaxosRejected,
    Prepare,
)
from proto.paxos.quorum import AcceptorSet
from syncnode.budgets import LRU
from syncnode.groups import Groups, GroupState
from syncnode.metrics import Metrics
from syncnode.session import RequestError, Session
from syncnode.storage import Storage

SlotKey = tuple[bytes, int]
SHARED_ATTEMPTS = 16
"""Steps taken on one request before giving up on a slot other processes keep changing."""
Request = Prepare | Accept | AcceptLeased


class SlotCache(MutableMapping[SlotKey, SlotState]):
    """The acceptor's slot map: an LRU over the stored acceptor records. A slot must be
    :meth:`load`-ed before the acceptor reads it (reads are async; the acceptor is not).
    Entries written in memory stay pinned in ``dirty`` until :meth:`flushed` says their record
    is durable."""

    def __init__(self, store: Storage, capacity: int) -> None:
        self.store = store
        self.lru = LRU(capacity)
        self.dirty: dict[SlotKey, SlotState] = {}
        self._loading: dict[SlotKey, int] = {}
        """Slot -> loads in flight (only while some are)."""
        self._changed: dict[SlotKey, int] = {}
        """Slot -> changes made while loads of it were in flight."""

    def loaded(self, key: SlotKey) -> bool:
        return key in self.dirty or key in self.lru

    async def load(self, key: SlotKey) -> None:
        """Bring the slot's state into memory (a no-op when it is)."""
        while not self.loaded(key):
            changes = self._changed.get(key, 0)
            self._loading[key] = self._loading.get(key, 0) + 1
            try:
                blob = await self.store.acceptor_record(*key)
            finally:
                changed = self._changed.get(key, 0) != changes
                self._loading[key] -= 1
                if not self._loading[key]:
                    del self._loading[key]
                    self._changed.pop(key, None)
            if self.loaded(key) or changed:
                continue  # someone else's load or change is newer than what we read
            if blob is None:
                self.lru.put(key, EMPTY)
            else:
                rec = decode_as(blob, AcceptorRecord)
                self.lru.put(key, SlotState(rec.promised, rec.accepted))

    def __getitem__(self, key: SlotKey) -> SlotState:
        if key in self.dirty:
            return self.dirty[key]
        if key in self.lru:
            self.lru.move_to_end(key)
            state: SlotState = self.lru[key]  # EMPTY: loaded, never written
            return state
        raise RuntimeError(f"acceptor state of slot {key[1]} read before it was loaded")

    def __setitem__(self, key: SlotKey, value: SlotState) -> None:
        if key in self._loading:
            self._changed[key] = self._changed.get(key, 0) + 1
        self.dirty[key] = value
        self.lru.put(key, value)

    def __delitem__(self, key: SlotKey) -> None:
        raise NotImplementedError("acceptor state is never deleted")

    def __iter__(self) -> Iterator[SlotKey]:
        return iter(self.lru)

    def __len__(self) -> int:
        return len(self.lru)

    def flushed(self, key: SlotKey, value: SlotState) -> None:
        if self.dirty.get(key) == value:
            del self.dirty[key]


class AcceptorDriver:
    """Prepare, Accept and AcceptLeased requests of every hosted group."""

    def __init__(self, key: SecretKey, store: Storage, groups: Groups, metrics: Metrics,
                 capacity: int, *, decided_at: Callable[[bytes, int], Awaitable[Decided]]
                 ) -> None:
        self.store = store
        self.groups = groups
        self.metrics = metrics
        self.decided_at = decided_at
        self.slots = SlotCache(store, capacity)
        self.shared = bool(getattr(store, "shared", False))
        self._one_slot: dict[SlotKey, SlotState] = {}
        """Shared storage: the state of the one slot the next step is taken on."""
        self.acceptor = Acceptor(key, self._acceptors_for, self._proposer_key_for,
                                 self._one_slot if self.shared else self.slots,
                                 validate_value=self._validate_value)
        self._inputs: tuple[bytes, int, Manifest | None] | None = None
        """(group, slot, manifest of slot - 1) of the step about to be taken."""

    async def handle(self, session: Session, msg: Request) -> Any:
        self.metrics.paxos.labels(type(msg).__name__).inc()
        g = await self.groups.require(msg.group_id)
        if msg.slot == 0:
            raise RequestError(ErrorCode.INVALID, "slot 0 is the genesis, not decided by Paxos")
        reloaded = not self.shared
        while True:
            if msg.slot <= g.top:
                return await self.decided_at(g.group_id, msg.slot)  # tell the proposer
            if msg.slot > g.top + 1 and not reloaded:  # another process may have learned it
                await self.groups.reload(g, throttled=True)
                reloaded = True
                continue
            if msg.slot > g.top + 1:
                self.groups.behind(session, g)
                return PaxosRejected(msg.group_id, msg.slot, RejectReason.UNKNOWN_SLOT, 0,
                                     f"this syncnode has decided up to slot {g.top} only; "
                                     "catching up from peers, retry shortly")
            top = g.top
            if self.shared:
                if isinstance(msg, AcceptLeased):  # one record per compare-and-set: no lease
                    msg = msg.accept
                return await self._shared_step(msg, g)
            leased = await self.load(msg.group_id, msg.slot, lease=isinstance(msg, AcceptLeased))
            if isinstance(msg, AcceptLeased) and not leased:
                msg = msg.accept  # no room to hold slot + 1 as well: a plain Accept, no lease
            if g.top == top:  # nothing was decided while we loaded
                break
        step = self.acceptor.handle(msg)
        if step.persist:
            await self.store.put_acceptor_records(
                [(r.group_id, r.slot, encode(r)) for r in step.persist])
            for r in step.persist:
                self.slots.flushed((r.group_id, r.slot), SlotState(r.promised, r.accepted))
        else:
            await self.store.barrier()  # the state this reply reports is durable
        return self.reply(msg, step.reply)

    async def _shared_step(self, msg: Prepare | Accept, g: GroupState) -> Any:
        """The step on a shared database (see the module doc): read, step, compare-and-set,
        again on the new record if another process or request changed it meanwhile."""
        key = (msg.group_id, msg.slot)
        for _ in range(SHARED_ATTEMPTS):
            try:
                manifest: Manifest | None = await self.groups.manifest_at(msg.group_id,
                                                                          msg.slot - 1)
            except KeyError:
                manifest = None
            blob = await self.store.acceptor_record(*key)
            if msg.slot <= g.top:  # decided while we read
                return await self.decided_at(g.group_id, msg.slot)
            rec = None if blob is None else decode_as(blob, AcceptorRecord)
            self._one_slot.clear()
            self._one_slot[key] = EMPTY if rec is None else SlotState(rec.promised, rec.accepted)
            self._inputs = (msg.group_id, msg.slot, manifest)
            step = self.acceptor.handle(msg)  # no await since the read: the state is ours
            self._one_slot.clear()
            if not step.persist:  # answered from what was read: committed, so durable
                return self.reply(msg, step.reply)
            (new,) = step.persist
            if await self.store.put_acceptor_record_if(msg.group_id, msg.slot, blob,
                                                       encode(new)):
                return self.reply(msg, step.reply)
            self.metrics.refuse("paxos_step_raced")  # taken on a state changed meanwhile
        raise RequestError(ErrorCode.RATE_LIMITED, "this slot is contended; retry shortly")

    async def load(self, group_id: bytes, slot: int, *, lease: bool = False) -> bool:
        """Load what the acceptor reads for ``slot`` (and ``slot + 1`` with ``lease``). Take the
        step right after, with no await in between (the loaded state is only pinned until
        then). Returns False when ``slot + 1`` could not be held too (loading one slot may
        evict the other from a tiny or busy cache): the caller then gives no lease."""
        try:
            manifest: Manifest | None = await self.groups.manifest_at(group_id, slot - 1)
        except KeyError:
            manifest = None
        here, nxt = (group_id, slot), (group_id, slot + 1)
        for _ in range(3 if lease else 0):
            await self.slots.load(nxt)
            await self.slots.load(here)
            if self.slots.loaded(nxt) and self.slots.loaded(here):
                break
        await self.slots.load(here)
        self._inputs = (group_id, slot, manifest)
        return not lease or self.slots.loaded(nxt)

    def reply(self, msg: Request, reply: Any) -> Any:
        if isinstance(reply, Reject):
            self.metrics.paxos.labels("Rejected").inc()
            return PaxosRejected(msg.group_id, msg.slot, int(reply.reason), reply.rule,
                                 reply.detail[:512])
        self.metrics.paxos.labels(type(reply).__name__).inc()
        return reply

    # -- what the sans-IO acceptor asks (answered from what load() brought in) -----------------

    def _manifest_before(self, group_id: bytes, slot: int) -> Manifest | None:
        if self._inputs is None or self._inputs[:2] != (group_id, slot):
            raise RuntimeError(f"acceptor inputs of slot {slot} read before they were loaded")
        return self._inputs[2]

    def _acceptors_for(self, group_id: bytes, slot: int) -> AcceptorSet | None:
        if slot < 1:
            return None
        m = self._manifest_before(group_id, slot)
        return None if m is None else m.acceptors()

    def _proposer_key_for(self, group_id: bytes, slot: int, fpr: bytes) -> bytes | None:
        m = self._manifest_before(group_id, slot)
        device = None if m is None else m.device(fpr)
        return device.sig_pub if device else None

    def _validate_value(self, group_id: bytes, slot: int, value: bytes) -> tuple[int, str] | None:
        m = self._manifest_before(group_id, slot)
        if m is None:
            return 1, "no manifest known for the previous slot"
        try:
            validate_transition(m, LogValue.decode(value))
        except ManifestError as exc:
            return int(exc.rule), exc.detail
        except DecodeError as exc:
            return 1, f"value does not decode: {exc}"
        return None
