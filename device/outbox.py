"""Our updates, from a local edit to durable: edit, flush, seal, send, acknowledgements.

* **edit** (:meth:`Outbox.edit`): store a local CRDT update as local state and as "not yet
  sent" (``local_pending``). Nothing else; works offline.
* **flush** (:meth:`Outbox.flusher`): coalesce unsent edits into one payload
  (:func:`device.rules.take_batch`), and **seal** it: encrypt it in the current epoch, sign it
  in an envelope with our next seq, put it in the outbox (one transaction, which also saves
  the MLS ratchet state; not fsynced by itself: the send below fsyncs the store once for
  everything sealed so far before the ciphertext leaves, :meth:`device.store.Store.sync`).
* **send** (:meth:`Outbox.push`, one task per syncnode link): every envelope goes to every
  syncnode of the group; an envelope leaves the outbox once a quorum stored it (then it is
  **durable**, :func:`device.rules.is_durable`). Acknowledgements are not kept across
  restarts: the outbox is sent again, which is harmless. Each ack is a syncnode's signed
  statement, verified before it counts and kept as evidence (:mod:`device.witness`).

Whole-document states (``STATE`` payloads, for devices that cannot read older epochs) and state
requests are sealed here too; when to send them is decided by :mod:`device.inbox` and
:mod:`device.membership`, and periodically here (:meth:`Outbox.maybe_publish_state`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio
import trio.lowlevel

from device.compaction_check import state_facts
from device.replica import Replica
from device.rules import (
    Outgoing,
    PendingAcks,
    durable_count,
    fits_one_message,
    payload_deps,
    publish_due,
    take_batch,
)
from device.witness import Witness
from proto import entropy
from proto.codec import decode_as, encode
from proto.envelope import Envelope
from proto.identity import short_id
from proto.logs import get_logger
from proto.messages import ErrorCode
from proto.payload import Payload, PayloadKind, pack_updates
from proto.rpc import RemoteError, SyncnodeClient
from proto.wakeup import Signal

log = get_logger("device.document")


class Outbox:
    """One document's outgoing updates (see the module doc)."""

    def __init__(self, replica: Replica, witness: Witness) -> None:
        self.replica = replica
        self.witness = witness
        self.host = replica.host
        self.store = replica.store
        gid = replica.group_id
        self.next_seq: int = self.store.one("SELECT next_seq FROM documents WHERE group_id=?",
                                            gid)[0]
        self.pending = PendingAcks(
            (seq, decode_as(env, Envelope))
            for seq, env in self.store.all("SELECT seq, envelope FROM outbox WHERE group_id=?",
                                           gid))
        self.edits_since_state = 0
        """Edit updates since a whole-document state went to the syncnodes."""
        self.changed = Signal()
        """Fires when an envelope is sealed."""
        self.durable_changed = Signal()
        """Fires when an envelope became durable (or the document stopped being active)."""
        self._dirty = trio.Event()
        witness.on_reset.append(self._node_reset)
        if self.store.one("SELECT 1 FROM local_pending WHERE group_id=? LIMIT 1", gid):
            self._dirty.set()

    # -- local edits -------------------------------------------------------------------------

    def edit(self, update: bytes) -> None:
        """Save a local CRDT update (applied already) and schedule its sending."""
        r = self.replica
        with self.store.transaction(durable=False) as db:
            db.execute("INSERT INTO crdt_updates (group_id, data) VALUES (?,?)",
                       (r.group_id, update))
            db.execute("INSERT INTO local_pending (group_id, data) VALUES (?,?)",
                       (r.group_id, update))
        r.updates_since_snapshot += 1
        self.edits_since_state += 1
        self.maybe_publish_state()
        self._dirty.set()

    def unsent(self) -> int:
        """Local edits not yet sealed into an update."""
        return int(self.store.one("SELECT count(*) FROM local_pending WHERE group_id=?",
                                  self.replica.group_id)[0])

    def durable(self) -> int:
        return durable_count(self.next_seq, len(self.pending))

    # -- flush: local edits -> outbox ----------------------------------------------------------

    async def flusher(self) -> None:
        """Self-clocked coalescing, like Nagle's algorithm: the first edit after a quiet spell
        goes out at once (low latency); while that update is not yet acknowledged by a quorum
        (at most ``coalesce_max`` s), further edits accumulate and then leave together. Under
        load the batch grows with the round trip, so the per-message cost (MLS, signatures,
        fsyncs on every device) is paid for many edits at once."""
        cfg = self.host.config
        r = self.replica
        # A device just started (a one-shot `syncdevice edit`) first learns the decisions it
        # missed, for at most connect_timeout: an update sealed in an epoch the group has
        # left cannot be read by members added since (they ask the others for the state).
        with trio.move_on_after(cfg.connect_timeout):
            await r.learned.wait()
        while True:
            await self._dirty.wait()
            self._dirty = trio.Event()
            if r.status != "active":
                return
            while self.flush_once():
                await trio.lowlevel.checkpoint()
            with trio.move_on_after(cfg.coalesce_max):
                while self.pending and r.status == "active":
                    await self.durable_changed.wait()
            await trio.sleep(cfg.flush_interval)

    def flush(self) -> None:
        """Seal every pending local edit now."""
        if self.replica.status == "active":
            while self.flush_once():
                pass

    def flush_once(self) -> bool:
        """Seal the oldest unsent edits into one update; True if more remain. A reader seals
        none (edits left from before a demotion stay local: they would be refused)."""
        if not self.replica.may_send:
            return False
        rows = self.store.all("SELECT id, data FROM local_pending WHERE group_id=? ORDER BY id",
                              self.replica.group_id)
        if not rows:
            return False
        take = take_batch(rows)
        updates = [d for _, d in take]
        combined = self.replica.crdt.combine(updates)
        if combined is not None and len(combined) <= sum(map(len, updates)):
            updates = [combined]
        body = pack_updates(updates)
        with self.store.transaction(durable=False) as db:
            payload, _env = self.seal(PayloadKind.UPDATE, body)
            db.executemany("DELETE FROM local_pending WHERE id=?", [(r,) for r, _ in take])
        self.replica.ledger.record_updates(payload.sender, payload.seq, updates)
        return len(take) < len(rows)

    def seal(self, kind: PayloadKind, body: bytes) -> tuple[Payload, Envelope]:
        """Encrypt a payload as our next seq and put it in the outbox (inside a transaction).
        Returns the payload and its envelope."""
        r = self.replica
        seq = self.next_seq
        deps = payload_deps(kind, r.buffer.delivered, r.me)
        payload = Payload(kind, r.me, seq, deps, r.crdt.backend_id, body)
        ciphertext = r.mls.encrypt(payload.encode())
        env = Envelope.seal(self.host.key, r.group_id, seq, r.epoch, ciphertext)
        # Not fsynced here: push() syncs the store before the ciphertext leaves (Store.sync),
        # so the ratchet state is on disk before anyone can see what it encrypted.
        with self.store.transaction(durable=False) as db:
            r.mls.persist()
            db.execute("INSERT INTO outbox VALUES (?,?,?)", (r.group_id, seq, encode(env)))
            r.buffer.mark_delivered(r.me, seq)
            db.execute("UPDATE documents SET next_seq=?, delivered=? WHERE group_id=?",
                       (seq + 1, r.delivered_blob(), r.group_id))
        self.next_seq = seq + 1
        # The commit that makes this durable: the enclosing transaction's when nested.
        self.pending.add(env, self.store.commits + (1 if self.store.in_transaction else 0))
        self.changed.fire()
        return payload, env

    # -- whole-document states -----------------------------------------------------------------

    def maybe_publish_state(self) -> None:
        """Periodic state upload. Whoever crosses the threshold first publishes; everyone who
        sees that state resets, so members rarely publish twice for the same stretch."""
        if publish_due(self.edits_since_state, self.host.config.publish_state_every):
            self.publish_state()

    def publish_state(self) -> None:
        """Store the whole document, encrypted in the current epoch, on the syncnodes (a STATE
        update covering everything we delivered). A device added in this epoch can read it, so
        it gets the document even when no member is online to send it directly."""
        r = self.replica
        self.edits_since_state = 0
        if not r.may_send:  # a reader's would be refused; the writers publish
            return
        self.seal_state()

    def seal_state(self) -> tuple[Payload, Envelope, bytes] | None:
        """Seal the whole document as a STATE of ours (None, logged, if it does not fit one
        message); returns the payload, its envelope and the snapshot. One synchronous step,
        so the snapshot and the vector the payload claims to cover match."""
        r = self.replica
        snapshot = r.crdt.snapshot()
        body = pack_updates([snapshot])
        if not fits_one_message(body):
            log.warning("document too large for one state message; not published",
                        doc=short_id(r.group_id), bytes=len(body))
            return None
        with self.store.transaction(durable=False):
            payload, env = self.seal(PayloadKind.STATE, body)
        r.ledger.state(state_facts(r.crdt, r.me, payload.seq, payload.vector(), body, snapshot))
        return payload, env, snapshot

    # -- send: outbox -> syncnodes ---------------------------------------------------------------

    async def push(self, client: SyncnodeClient,
                   resync: Callable[[SyncnodeClient], Awaitable[object]]) -> None:
        """Send the outbox to one syncnode for as long as its link is up. ``resync`` brings a
        syncnode that lags behind our epoch up to date (it refuses our envelopes until then)."""
        node = client.node_id
        limiter = trio.Semaphore(self.host.config.max_in_flight)
        while self.replica.status == "active":
            todo = self.pending.unacked_by(node)
            if not todo:
                await self.changed.wait()
                continue
            async with trio.open_nursery() as nursery:
                for out in todo:
                    await limiter.acquire()
                    nursery.start_soon(self._send_one, client, out, limiter, resync)

    async def _send_one(self, client: SyncnodeClient, out: Outgoing, limiter: trio.Semaphore,
                        resync: Callable[[SyncnodeClient], Awaitable[object]]) -> None:
        try:
            await self.store.sync(out.commit)  # its seal on disk before it leaves
            delay = 0.05
            while True:
                try:
                    stored = await client.store(out.envelope)
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
                    await resync(client)  # it lags behind our epoch; tell it, retry
                    stored = await client.store(out.envelope)
                    break
            self.witness.acked(client.node_id, out.envelope, stored)  # raises if unsigned
            self._acked(out, client.node_id)
        finally:
            limiter.release()

    def _node_reset(self, node: bytes) -> None:
        """``node`` lost its storage: what it acked and is not yet durable goes to it again
        (what is durable its peers give back: :mod:`device.witness`)."""
        self.pending.forget(node)
        self.changed.fire()

    def _acked(self, out: Outgoing, node: bytes) -> None:
        r = self.replica
        if self.pending.ack(out, node, r.manifest.acceptors()):
            seq = out.envelope.seq
            # Not fsynced: losing it only sends the envelope again, which syncnodes
            # acknowledge again without storing it twice.
            with self.store.transaction(durable=False) as db:
                db.execute("DELETE FROM outbox WHERE group_id=? AND seq=?", (r.group_id, seq))
            self.pending.settle(seq)
            self.durable_changed.fire()
