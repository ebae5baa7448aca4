"""The syncnode's storage interface: everything a syncnode keeps, named for what it means.

:class:`Storage` is the only way the service reaches its data; SQLite
(:mod:`syncnode.storage.sqlite`) is one implementation, and a server database (issue 20) is
meant to be another, tested by the same acceptance suite (``tests/storage_acceptance.py``).

What is kept, per group: a row (creator, highest decided slot, bytes used against the quota),
the decided log (slot 0 the genesis value; slot ``s`` a value with its decision certificate),
the manifest of every epoch ``s >= 1`` (the genesis manifest is read from slot 0), the Paxos
acceptor record of each slot, envelopes by ``(sender, seq)``, proofs of equivocation, and how
the compaction point applied with its covered vector (:meth:`Storage.compact_envelopes`), and how
this node hosts the group when that is more than "named by the genesis, serving"
(:class:`HostingRecord`: adopted later, or removed).
Node-wide: mailbox items with their quota accounting, and signed address records of other
syncnodes. Values are opaque bytes here (encoded by the service); only the keys and sizes the
contracts speak of are read by a backend.

**Writes** are ``async`` and return once the change is durable (committed and flushed to disk):
the service answers a request only after that. A backend commits concurrent writes together
(group commit: many requests, one transaction, one flush), and each write succeeds or fails on
its own. A write, once called, completes even if its caller is cancelled (the connection
dropped mid-request), and returns to the caller without a further checkpoint, so the caller's
in-memory update that follows happens with it. Conditional writes decide inside the transaction
and report the outcome (:class:`StorageConflict`, a bool, a :class:`MailboxPutResult`) instead of
leaving a read-then-write race to the caller.

**Reads** are ``async`` too. SQLite answers them on the event loop thread without yielding (a
local file in WAL mode, a few microseconds, no thread hop: as fast as the synchronous reads they
replace); a server database must go over the network, which must not block the event loop, so it
will await a pool. Callers therefore treat every read as a possible switch point: in-memory
state checked before a read is checked again after it. Reads see only committed data.

Not part of the interface: caching (the service keeps bounded caches of group and slot state),
validation and policy (who may write what; quotas are passed in, enforced atomically here).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import trio

MAILBOX_ITEM_OVERHEAD = 256
"""Bytes every mailbox item counts beyond its payload (row, indexes): tiny items are not free.
The service passes ``size`` = payload + this; a backend uses it only to count items stored by a
syncnode that did not pass a size (a migrated database)."""

JOIN_REQUEST_KIND = 1
"""Mailbox items of this kind (:attr:`proto.service.MailboxKind.KEY_PACKAGE`) are join
requests: their usage is counted apart from everything else (:meth:`Storage.mailbox_usage`)."""

BatchHook = Callable[[int, float], None]
"""Called after every committed batch with (writes in it, seconds to commit including flush)."""


class StorageConflict(Exception):
    """A write contradicts what is stored (a taken key holds something else, or a slot is not
    the next one); nothing of that write was kept."""


class StorageClosed(Exception):
    """The storage is shutting down and takes no new writes."""


class GroupRecord(NamedTuple):
    creator: bytes
    """Fingerprint of the genesis signer (quota accounting)."""
    top: int
    """Highest decided slot (0: only the genesis)."""
    bytes_used: int
    """Log values and envelopes stored, in bytes (quota accounting)."""


class DecidedRecord(NamedTuple):
    value: bytes
    certificate: bytes | None
    """The encoded decision certificate; None for the genesis (slot 0)."""


class HostingRecord(NamedTuple):
    """How this node hosts a group that it was not simply named in at the genesis (a group
    without one is hosted from its genesis: serving, its history complete, not removed)."""

    named_slot: int | None
    """The slot whose manifest first names this node (an adopted group); None: the genesis."""
    adoption: bytes | None
    """Opaque: what the service keeps of an adoption (its encoded naming decision)."""
    serving: bool
    """The verified log reached ``named_slot`` and its manifest names this node."""
    history_complete: bool
    """Every envelope stored before this node was named has been pulled from its peers."""
    removed_slot: int | None = None
    """The slot whose manifest dropped this node, once one did."""
    removed_at: float | None = None
    """When this node learned it was removed (the retention of its data counts from then)."""


class SenderSummary(NamedTuple):
    """What a syncnode holds of one sender's envelopes in one group, kept up to date on every
    store (so comparing two syncnodes' copies never rescans the envelopes)."""

    envelopes: int
    """Envelopes stored."""
    top: int
    """The highest seq stored."""
    contiguous: int
    """The highest seq such that ``1..contiguous`` are all stored (0: seq 1 is missing)."""
    setsum: int
    """The sum, modulo 2**63, of :func:`digest_term` of every stored envelope's digest: equal
    sums mean equal sets (up to a collision), whatever order they were stored in."""


def digest_term(digest: bytes) -> int:
    """One envelope's term of :attr:`SenderSummary.setsum` (the first 8 bytes of its digest)."""
    return int.from_bytes(digest[:8].ljust(8, b"\0"), "big") & SETSUM_MASK


SETSUM_MASK = (1 << 63) - 1


class MailboxRecord(NamedTuple):
    item_id: int
    kind: int
    payload: bytes
    expires_at: int


class MailboxRefusal(enum.Enum):
    RECIPIENT_FULL = "recipient_full"
    SENDER_QUOTA = "sender_quota"
    NODE_QUOTA = "node_quota"


@dataclass(frozen=True)
class MailboxQuota:
    """What one put may use, judged atomically with the put (:meth:`Storage.mailbox_put`)."""

    items_per_recipient: int
    """Items the recipient may have stored (the new one must fit under it)."""
    bytes_per_sender: int
    """Bytes (sizes) the sender may have stored, the new item included."""
    items_per_sender: int | None
    """Items the sender may have stored (the new one must fit under it); None: no limit."""
    class_bytes: int
    """Bytes items of this class (join requests, or the rest) may take together."""
    make_room: bool
    """When the class is full, the oldest items of the class are deleted to make room (join
    requests), instead of refusing. An item larger than ``class_bytes`` is refused anyway."""


@dataclass(frozen=True)
class MailboxPutResult:
    item_id: int = 0
    """The new item's id (ids only grow, never reused); 0 when refused."""
    refused: MailboxRefusal | None = None
    limit: int = 0
    """RECIPIENT_FULL: the item limit that was reached."""
    sender_bytes: int = 0
    """SENDER_QUOTA: the sender's stored bytes before this put."""
    sender_items: int = 0
    """SENDER_QUOTA: the sender's stored items before this put."""
    evicted: int = 0
    """Items deleted to make room (``make_room``); may be non-zero only when stored."""


@dataclass(frozen=True)
class MailboxUsage:
    """Bytes (sizes) of the stored items: an item counts from its put until it is deleted
    (acked, expired by :meth:`Storage.mailbox_expire` or by a put to its recipient, or deleted
    to make room), against its sender and its class."""

    join_requests: int
    """Items of :data:`JOIN_REQUEST_KIND`."""
    other: int
    """Every other item."""


class Change(NamedTuple):
    """A change another process of this node committed (:class:`SharedStorage`)."""

    kind: str
    """``envelope`` (``key`` the sender, ``number`` the seq, ``size`` its bytes), ``decided``
    (``number`` the slot), ``mailbox`` (``key`` the recipient), ``group`` (anything else of
    the group: created, adopted, hosting, compaction, deleted), or ``resync`` (changes may
    have been missed: everything cached may be stale)."""
    group_id: bytes
    key: bytes
    number: int
    size: int


class Storage(Protocol):
    """Everything a syncnode stores. Lifecycle: construct (backend-specific), start
    :meth:`run` in a nursery, use, :meth:`aclose`."""

    on_batch: BatchHook | None
    """Told about every committed batch (metrics); set by the owner before :meth:`run`."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Run the writer until :meth:`aclose` (``nursery.start(storage.run)``). Cancelling it
        is a crash: writes not yet acknowledged may be lost, acknowledged ones never are."""

    async def aclose(self) -> None:
        """Take no new writes (they raise :class:`StorageClosed`), finish the queued ones,
        release everything. Also safe after :meth:`run` was cancelled."""

    async def barrier(self) -> None:
        """Return once every write called before this is durable (or the writer stopped)."""

    def size_bytes(self) -> int:
        """Space the data takes, for metrics. Cheap and non-blocking (may be an estimate)."""

    # -- groups ---------------------------------------------------------------------------------

    async def create_group(self, group_id: bytes, creator: bytes, genesis: bytes,
                           created_at: float) -> bool:
        """Store a new group with its genesis value as slot 0 (top 0, ``bytes_used`` =
        ``len(genesis)``). False if the group exists with this very genesis (idempotent);
        :class:`StorageConflict` if with another."""

    async def group(self, group_id: bytes) -> GroupRecord | None: ...

    async def group_count(self) -> int: ...

    async def group_count_by_creator(self, creator: bytes) -> int: ...

    async def group_ids(self, after: bytes = b"", limit: int = 1000) -> list[bytes]:
        """Ids of hosted groups greater than ``after``, ascending, at most ``limit``."""

    async def delete_group(self, group_id: bytes) -> bool:
        """Delete everything kept for the group (its row, log, manifests, acceptor records,
        envelopes, evidence, hosting record). Whether it was hosted."""

    # -- hosting: adopted and removed groups ----------------------------------------------------

    async def adopt_group(self, group_id: bytes, creator: bytes, genesis: bytes,
                          created_at: float, *, named_slot: int, adoption: bytes) -> bool:
        """Store a new group like :meth:`create_group` together with its hosting record
        (adopted at ``named_slot``, not serving, history incomplete), all at once. False if the
        group exists with this very genesis: then, if it is an adoption not yet serving, its
        ``named_slot`` and ``adoption`` are replaced (the newest claim is tried), else nothing
        changes. :class:`StorageConflict` if the group exists with another genesis."""

    async def hosting(self, group_id: bytes) -> HostingRecord | None:
        """The group's hosting record; None when it has none (hosted from its genesis, or not
        hosted)."""

    async def put_hosting(self, group_id: bytes, record: HostingRecord) -> None:
        """Replace the hosting record of a hosted group (:class:`StorageConflict` if it is not
        hosted)."""

    async def hosting_records(self, after: bytes = b"", limit: int = 1000
                              ) -> list[tuple[bytes, HostingRecord]]:
        """Hosting records of groups with ids greater than ``after``, ascending by id, at most
        ``limit``."""

    # -- decided log and manifests --------------------------------------------------------------

    async def append_decided(self, group_id: bytes, slot: int, value: bytes, certificate: bytes,
                             manifest: bytes) -> None:
        """Store the decided ``value`` of ``slot`` with its certificate and the manifest of
        epoch ``slot``; the group's top becomes ``slot`` and ``len(value)`` is added to its
        ``bytes_used``, all at once. :class:`StorageConflict` unless ``slot`` is top + 1 of a
        hosted group."""

    async def decided(self, group_id: bytes, slot: int) -> DecidedRecord | None:
        """The decided value of ``slot`` (0: the genesis, with no certificate)."""

    async def decided_range(self, group_id: bytes, first: int, last: int, *, limit: int,
                            max_bytes: int) -> list[tuple[int, DecidedRecord]]:
        """Decided slots ``first..last`` (slot 0 excluded), ascending: at most ``limit``, and
        no more once their values would exceed ``max_bytes`` together (the first is always
        given)."""

    async def manifest(self, group_id: bytes, epoch: int) -> bytes | None:
        """The manifest decided at slot ``epoch``, kept by :meth:`append_decided` (the
        genesis manifest, epoch 0, is not kept apart: it is in the genesis value)."""

    # -- Paxos acceptor -------------------------------------------------------------------------

    async def acceptor_record(self, group_id: bytes, slot: int) -> bytes | None:
        """The acceptor's state of one slot as last written, or None if never written."""

    async def put_acceptor_records(self, records: Sequence[tuple[bytes, int, bytes]]) -> None:
        """Replace the acceptor state of each ``(group_id, slot, record)``, all at once."""

    async def put_acceptor_record_if(self, group_id: bytes, slot: int, expected: bytes | None,
                                     record: bytes) -> bool:
        """Replace the slot's acceptor state with ``record`` only if it is still ``expected``
        (None: never written), deciding inside the write's transaction; whether it was
        replaced. Several processes sharing one database decide Paxos steps with it
        (:class:`SharedStorage`): a step taken on a state another process changed meanwhile
        is not kept, and is taken again on the new state."""

    # -- envelopes ------------------------------------------------------------------------------

    async def store_envelope(self, group_id: bytes, sender: bytes, seq: int, digest: bytes,
                             envelope: bytes, *, staged: Callable[[], None] | None = None
                             ) -> bool:
        """Keep an envelope under ``(group, sender, seq)``, adding ``len(envelope)`` to the
        group's ``bytes_used``. False if that key holds the same ``digest`` already (idempotent,
        nothing counted), or if it is covered by the group's compaction and not held (the
        state holds it: nothing kept); :class:`StorageConflict` if it holds another.

        ``staged`` is called on the event loop, once, if the envelope is new, as early as the
        backend knows it: the SQLite backend calls it while the group commit flushes, before
        the envelope is durable (the service pushes it to subscribers then); a backend that
        cannot tell earlier calls it after the commit, before returning. Not called for a
        write that fails, but it may have been called for one whose commit then fails."""

    async def envelopes_after(self, group_id: bytes, watermarks: Mapping[bytes, int], *,
                              limit: int, max_bytes: int) -> tuple[list[bytes], bool]:
        """Envelopes of the group above each sender's watermark (0 for a sender not named),
        ordered by sender then seq: at most ``limit``, and no more once they would exceed
        ``max_bytes`` together (the first is always given). The bool says whether more were
        left."""

    async def envelope_marks(self, group_id: bytes) -> dict[bytes, int]:
        """Per sender, the highest ``seq`` such that ``1..seq`` are all stored or covered by
        the group's compaction (senders whose seq 1 is neither are left out): the watermarks
        a backfill resumes from, whatever arrived out of order."""

    async def envelope_count(self, group_id: bytes) -> int:
        """Envelopes stored for the group."""

    async def envelope_digests(self, group_id: bytes, keys: Sequence[tuple[bytes, int]]
                               ) -> dict[tuple[bytes, int], bytes]:
        """The digest held under each ``(sender, seq)`` of ``keys`` (absent keys left out)."""

    # -- the statement clock and incarnation (proto.holdings) ------------------------------------

    async def incarnation(self) -> bytes:
        """16 random bytes made with the storage and kept for its whole life, the same after
        every reopening; new storage (a lost database made again) gets new ones. Every statement
        the node signs names it, so a node that lost its data is not taken for one that
        withholds it (:mod:`proto.holdings`)."""

    async def statement_clock(self) -> int:
        """The highest statement stamp reserved so far (0 on a new database)."""

    async def reserve_statement_clock(self, until: int) -> None:
        """Durably raise the reservation to ``until`` (never lowers it): a restarted node stamps
        above every stamp it may have issued."""

    async def envelope_summary(self, group_id: bytes) -> dict[bytes, SenderSummary]:
        """Per sender of the group, a :class:`SenderSummary` of its stored envelopes. Kept with
        the envelopes (updated in the transaction of each store), so reading it costs one row
        per sender, never a scan of the envelopes: the reconciler compares groups with it.
        After a compaction, a covered sender's row counts only the envelopes above the point,
        and its contiguous mark starts at the covered seq."""

    async def envelope(self, group_id: bytes, sender: bytes, seq: int
                       ) -> tuple[bytes, bytes] | None:
        """The ``(digest, envelope)`` kept under ``(group, sender, seq)``, or None."""

    # -- compaction (proto.compaction) ----------------------------------------------------------

    async def compact_envelopes(self, group_id: bytes, point: bytes,
                                covered: Mapping[bytes, int], keep: tuple[bytes, int]) -> int:
        """Apply a decided compaction point, all at once: delete every envelope of the group
        with ``seq <= covered[sender]`` except ``keep`` (the state envelope's ``(sender,
        seq)``), subtract their bytes from ``bytes_used``, and record ``point`` (opaque) and
        ``covered`` as the group's compaction. From then on :meth:`store_envelope` keeps no
        envelope under a covered key (it answers False: the state holds it) and
        :meth:`envelope_marks` counts covered seqs as stored. Returns the bytes freed.
        :class:`StorageConflict` if the group is not hosted or ``covered`` does not cover
        the vector applied before (points only advance)."""

    async def compaction(self, group_id: bytes) -> bytes | None:
        """The point last applied by :meth:`compact_envelopes`, or None."""

    # -- equivocation evidence ------------------------------------------------------------------

    async def put_equivocation(self, group_id: bytes, slot: int, proof: bytes) -> None:
        """Keep a proof of two certified values for one slot (the first proof of a slot
        stays)."""

    async def equivocation(self, group_id: bytes, slot: int) -> bytes | None: ...

    # -- mailbox --------------------------------------------------------------------------------

    async def mailbox_put(self, recipient: bytes, kind: int, payload: bytes, *, sender: bytes,
                          size: int, now: int, expires_at: int, quota: MailboxQuota
                          ) -> MailboxPutResult:
        """Store an item for ``recipient`` counted as ``size`` bytes against ``sender`` and its
        class (:class:`MailboxUsage`), unless a quota refuses it. In one transaction: the
        recipient's expired items (``expires_at <= now``) go; then, in this order,
        RECIPIENT_FULL (its items are at ``items_per_recipient``), SENDER_QUOTA (bytes, then
        items), NODE_QUOTA (the class would exceed ``class_bytes``; with ``make_room`` the
        oldest items of the class are deleted instead, unless ``size`` alone exceeds it)."""

    async def mailbox_items(self, recipient: bytes, *, after: int, now: int, limit: int,
                            max_bytes: int) -> tuple[list[MailboxRecord], bool]:
        """Live items (``expires_at > now``) of ``recipient`` with ids above ``after``,
        ascending: at most ``limit``, and no more once their payloads would exceed
        ``max_bytes`` together (the first is always given). The bool says whether more were
        left."""

    async def mailbox_ack(self, recipient: bytes, item_ids: Sequence[int]) -> int:
        """Delete those of ``item_ids`` that belong to ``recipient``; how many were deleted."""

    async def mailbox_expire(self, now: int) -> int:
        """Delete every item with ``expires_at <= now``; how many were deleted."""

    async def mailbox_usage(self) -> MailboxUsage: ...

    # -- address records ------------------------------------------------------------------------

    async def address_record(self, node_id: bytes) -> bytes | None: ...

    async def put_address_record(self, node_id: bytes, issued_at: int, record: bytes, *,
                                 capacity: int) -> bool:
        """Keep ``record`` as the node's if it was issued later than the one kept; a node not
        yet kept is added only while fewer than ``capacity`` nodes are. Whether it was kept."""


class SharedStorage(Storage, Protocol):
    """A storage that several processes of one node use at once (PostgreSQL: ``shared`` is
    True). What one process caches, another may change, so the service then:

    * takes every Paxos acceptor step on the state read from storage and keeps it only through
      :meth:`Storage.put_acceptor_record_if` (retrying on the newer state), never on its cache;
    * stamps statements with :meth:`next_stamp`, one clock for all processes;
    * hears every change another process commits through :attr:`on_change` (pushes to its own
      subscribers, cache refreshes).

    A storage without the attribute ``shared`` (SQLite) is used by one process only."""

    shared: bool
    on_change: Callable[[Change], None] | None
    """Called on the trio thread, in commit order, for each change another process committed;
    set by the owner before :meth:`run`."""

    async def next_stamp(self, wall_ms: int) -> int:
        """The node's next statement stamp: above every stamp any process of the node got
        before (and above :meth:`statement_clock`), at least ``wall_ms``, durable before it is
        returned; :meth:`statement_clock` is then at least that stamp."""

    async def claim_node(self, node_id: bytes) -> None:
        """Bind the database to this node id on first use; RuntimeError if it belongs to
        another node (two identities on one database would be one acceptor answering as
        two)."""
