"""This node's signed statements of what it holds: acks, heads and backfill answers
(:mod:`proto.holdings` says what each claims and why a device keeps them).

The :class:`Notary` owns the statement clock: stamps strictly increase, and are never above a
reservation kept durably in storage (one write every ``RESERVE_MS`` of stamps), so a restarted
node, whatever its wall clock says, stamps above everything it signed before. That is what
makes "signed later" mean "happened later" for an honest node, and so what keeps proofs
against it impossible. Every statement also names the storage's **incarnation**
(:meth:`~syncnode.storage.Storage.incarnation`, read with the clock's reservation before the
first stamp): a node restarted on a lost, re-made database signs under a new one, so what it
acked before the loss cannot be held against what it holds now (:mod:`proto.holdings`).

Cost: one Ed25519 signature per ``Stored``, per backfill page and per ``FetchHoldings`` (about
60 µs on the development machine, against about 95 µs for the envelope signature a Store
already verifies: ``scripts/bench_holdings.py``). Heads cost one read of the group's envelope
index (:meth:`~syncnode.storage.Storage.envelope_marks`, linear in the group's envelopes) plus
one lookup per probe; ``FetchHoldings`` is a page-sized request in the server's budget (two at
once per connection), for current members and the group's syncnodes only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import trio

from proto.codec import encode_struct
from proto.compaction import CompactionPoint
from proto.envelope import Envelope
from proto.holdings import (
    ACK_CTX,
    BACKFILL_CTX,
    HEADS_CTX,
    AckBody,
    BackfillBody,
    Entry,
    FetchHoldings,
    HeadsBody,
    Holdings,
    Probe,
    SignedHeads,
)
from proto.identity import SecretKey
from proto.messages import ErrorCode
from proto.service import Backfill, Stored, Watermark
from proto.stampclock import StampClock
from syncnode.groups import Groups, may_read
from syncnode.metrics import Metrics
from syncnode.session import RequestError, Session
from syncnode.storage import Storage


class Notary:
    """Signs this node's statements (see the module doc)."""

    def __init__(self, key: SecretKey, store: Storage, groups: Groups, metrics: Metrics,
                 clock: Callable[[], float]) -> None:
        self.key = key
        self.node_id = key.public
        self.store = store
        self.groups = groups
        self.metrics = metrics
        self.clock = clock
        self._stamps: StampClock | None = None
        self._incarnation: bytes | None = None
        self._lock = trio.Lock()
        self.shared = bool(getattr(store, "shared", False))

    async def stamp(self) -> int:
        """The next statement stamp (ms), reserving more of the clock durably when needed.

        On a database shared by several processes of this node, every stamp comes from the
        database (:meth:`~syncnode.storage.SharedStorage.next_stamp`, one clock for all of
        them): with a clock per process, a device could get an ack from one process and then
        heads from another whose clock is behind, stamped earlier, and an honest node would
        look backdated, or a heads read before the ack's write but stamped after it would
        prove withholding that never happened."""
        if self.shared:
            if self._incarnation is None:
                self._incarnation = await self.store.incarnation()
            stamp: int = await self.store.next_stamp(  # type: ignore[attr-defined]
                int(self.clock() * 1000))
            return stamp
        while True:
            if self._stamps is not None:
                t = self._stamps.next(int(self.clock() * 1000))
                if t is not None:
                    return t
            async with self._lock:
                if self._stamps is None:
                    self._incarnation = await self.store.incarnation()
                    self._stamps = StampClock(await self.store.statement_clock())
                stamps, wall = self._stamps, int(self.clock() * 1000)
                if max(wall, stamps.last + 1) > stamps.reserved:  # another task may have
                    want = stamps.wanted(wall)                      # reserved meanwhile
                    await self.store.reserve_statement_clock(want)
                    stamps.reserved = max(stamps.reserved, want)

    @property
    def incarnation(self) -> bytes:
        """The storage's incarnation; known once :meth:`stamp` ran (every statement is stamped
        before it is signed)."""
        if self._incarnation is None:
            raise RuntimeError("a statement must be stamped before it is signed")
        return self._incarnation

    async def ack(self, env: Envelope) -> Stored:
        """The signed ack of an envelope that is durable here (stamped after the write)."""
        digest, at = env.digest(), await self.stamp()
        body = AckBody(self.node_id, self.incarnation, env.group_id, env.sender, env.seq, digest,
                       at)
        sig = self.key.sign(ACK_CTX, encode_struct(body))
        return Stored(env.group_id, env.sender, env.seq, digest, self.incarnation, at, sig)

    async def backfill_signature(self, msg: Backfill, at: int, envelopes: tuple[Envelope, ...],
                                 more: bool, covered: tuple[Watermark, ...] = ()) -> bytes:
        """Sign a backfill answer; ``at`` was stamped before the envelopes were read, and
        ``covered`` (:meth:`covered`) read after them."""
        entries = tuple(Entry(e.sender, e.seq, e.digest()) for e in envelopes)
        body = BackfillBody(self.node_id, self.incarnation, msg.group_id, msg.watermarks,
                            entries, more, at, covered)
        return self.key.sign(BACKFILL_CTX, encode_struct(body))

    async def covered(self, group_id: bytes, senders: Iterable[bytes] | None = None
                      ) -> tuple[Watermark, ...]:
        """The covered vector of the compaction this node applied to the group (of ``senders``
        only, if given). Read *after* the envelopes a statement describes: a compaction applied
        meanwhile deleted only what it covers, so the claim covers whatever the read missed.
        Read from storage, not the cached group state: the deletion and the recorded point
        commit together, while the cache learns of it later (or holds a copy reloaded before
        the commit), and a stale vector next to a completed deletion would be a lack."""
        raw = await self.store.compaction(group_id)
        if raw is None:
            return ()
        vector = CompactionPoint.decode(raw).vector()
        wanted = vector.keys() if senders is None else senders
        return tuple(Watermark(s, vector[s]) for s in dict.fromkeys(wanted) if s in vector)

    async def holdings(self, session: Session, msg: FetchHoldings) -> Holdings:
        """Signed heads of one group, for those who may read its log (as ``FetchHeads``)."""
        g = await self.groups.get(msg.group_id)
        if g is None or not may_read(session, g.manifest):
            self.metrics.refuse("holdings_not_member")
            raise RequestError(ErrorCode.UNAUTHORIZED,
                               "only members of a group and its syncnodes read its holdings "
                               "(or this syncnode does not host the group)")
        at = await self.stamp()  # before reading: what is read is at least this recent
        top = g.top
        marks = await self.store.envelope_marks(g.group_id)
        senders = tuple(dict.fromkeys(msg.senders))
        keys = list(dict.fromkeys((p.sender, p.seq) for p in msg.probes))
        held = await self.store.envelope_digests(g.group_id, keys)
        covered = await self.covered(g.group_id, [*senders, *(s for s, _ in keys)])
        return Holdings(self.sign_heads(
            g.group_id, top, tuple(Watermark(s, marks.get(s, 0)) for s in senders),
            tuple(Probe(s, q, held.get((s, q))) for s, q in keys), at, covered))

    def sign_heads(self, group_id: bytes, top: int, marks: tuple[Watermark, ...],
                   probes: tuple[Probe, ...], at: int, covered: tuple[Watermark, ...] = ()
                   ) -> SignedHeads:
        body = HeadsBody(self.node_id, self.incarnation, group_id, top, marks, probes, at,
                         covered)
        sig = self.key.sign(HEADS_CTX, encode_struct(body))
        return SignedHeads(self.node_id, self.incarnation, group_id, top, marks, probes, at, sig,
                           covered)
