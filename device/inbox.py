"""Others' updates, from an envelope to the CRDT: open, causal delivery, whole-document states.

* **receive** (:meth:`Inbox.receive`): envelopes from live push and backfill are deduplicated by
  ``(sender, seq)`` and triaged (:func:`device.rules.triage`): those of a future epoch wait
  here until :mod:`device.membership` applies its commit (:meth:`Inbox.deliver_future`).
  The others are checked against the manifest of their epoch, decrypted, checked against the
  MLS sender (:func:`device.rules.check_plaintext`), and delivered causally to the CRDT in
  batches (:class:`proto.causal.CausalBuffer`), in one transaction with the MLS state.
* **states**: a device that cannot read some updates (they predate its join, or MLS no longer
  opens them) asks the members for the document's state (:meth:`Inbox.request_state`, through
  the syncnodes); members answer with a ``STATE`` covering everything they delivered
  (:meth:`Inbox._answer`). A state a new member got directly is loaded with
  :meth:`Inbox.load_state`.
* **gaps**: an update that causal delivery waits for and that no syncnode served (every one
  was backfilled from since, or ``gap_wait`` passed: :func:`device.gaps.gap_state_due`) was
  lost on the syncnodes, or never reached them; the members that delivered it hold it in
  their state, so the device asks them for it, again with a growing pause while none answers
  (:meth:`Inbox.check_gap`). ``sync_status()`` shows the count (``waiting_for``) and the
  ``gap`` flag.
* **readers** send nothing: an envelope whose sender is a reader in the manifest of its epoch is
  dropped (logged and counted in :attr:`Inbox.reader_drops`, no alarm: the syncnodes refuse
  them, so one arrives only through a faulty syncnode); a reader neither asks for the state
  nor answers such requests through the syncnodes, it fetches a member's state directly
  (:mod:`device.reader_state`).
"""

from __future__ import annotations

from collections.abc import Sequence

import trio

from device.compaction_check import state_facts
from device.events import Change
from device.gaps import backfill_shows_gap, first_missing, gap_state_due, waiting_for
from device.mls import MlsError, identity_for
from device.offers import take_offer
from device.outbox import Outbox
from device.reader_state import DirectState
from device.receive_journal import ReceiveJournal
from device.replica import Replica
from device.rules import (
    Triage,
    check_plaintext,
    lacks_something,
    state_request_due,
    triage,
)
from proto import entropy
from proto.crdt import CrdtError
from proto.envelope import Envelope
from proto.errors import DecodeError
from proto.identity import short_id
from proto.logs import get_logger
from proto.manifest import may_send
from proto.payload import Payload, PayloadKind, unpack_updates

log = get_logger("device.document")


class Inbox:
    """One document's incoming updates (see the module doc)."""

    def __init__(self, replica: Replica, outbox: Outbox) -> None:
        self.replica = replica
        self.outbox = outbox
        self.store = replica.store
        self.future: dict[tuple[bytes, int], Envelope] = {}
        """Envelopes of epochs not applied yet, by ``(sender, seq)``."""
        self.missing = not replica.state_loaded.is_set()
        """Something we cannot read was seen (or the content has not arrived): ask the
        members for the state."""
        self._last_sync_request = 0.0
        self._answered: set[tuple[bytes, int]] = set()
        self.reader_drops = 0
        """Envelopes dropped because their sender was a reader at their epoch."""
        self.direct = DirectState(replica, self.load_state, self._direct_failed)
        self.gap_since: float | None = None
        """When updates causal delivery waits for were first found missing (None: no gap)."""
        self.gap_backfilled: set[bytes] = set()
        """Syncnodes backfilled from since then (none served them)."""
        self.gap_asks = 0
        """State requests made for the current gap."""
        self._gap_last_ask = 0.0
        self.journal = ReceiveJournal(replica)

    def waiting_for(self) -> int:
        """Updates of others that causal delivery waits for and this device does not hold."""
        b = self.replica.buffer
        return waiting_for(b.pending.values(), b.delivered)

    def check_gap(self, backfilled: bytes | None = None, started: float = 0.0,
                  served: dict[bytes, int] | None = None) -> None:
        """After a batch, or a full backfill from syncnode ``backfilled`` that began at
        ``started``: follow the gap, and ask the members for the state when the syncnodes
        cannot fill it (module doc). Only a backfill that began after the gap was found counts:
        one that began before counts only if it served later seqs of each sender than the
        missing ones (``served``: per sender, the highest seq it served): else it may have read
        the syncnode before the missing updates reached it (an update pushed ahead of the one
        before it, both in flight, looked like a gap nobody could fill when the join's first
        backfills ended just then)."""
        r = self.replica
        missing = self.waiting_for()
        if missing == 0:
            if self.gap_asks:
                log.info("gap filled", doc=short_id(r.group_id), asked=self.gap_asks)
            self.gap_since, self.gap_backfilled, self.gap_asks = None, set(), 0
            return
        now = trio.current_time()
        if self.gap_since is None:
            self.gap_since, self.gap_backfilled = now, set()
        if backfilled is not None and (started >= self.gap_since or backfill_shows_gap(
                first_missing(r.buffer.pending.values(), r.buffer.delivered), served or {})):
            self.gap_backfilled.add(backfilled)
        cfg = r.host.config
        if r.status != "active" or not gap_state_due(
                missing=missing, since=self.gap_since, now=now, backfilled=self.gap_backfilled,
                syncnodes=[e.node_id for e in r.manifest.syncnodes], wait=cfg.gap_wait,
                asked=self.gap_asks, last_ask=self._gap_last_ask,
                retry=cfg.sync_request_interval, retry_max=cfg.gap_retry_max):
            return
        log.warning("updates are missing on every syncnode; asking the members for the state",
                    doc=short_id(r.group_id), missing=missing, asked_before=self.gap_asks)
        self.gap_asks += 1
        self._gap_last_ask = now
        self._last_sync_request = -float("inf")  # this request is due whatever asked last
        self.missing = True
        self.request_state()

    def receive(self, envelopes: Sequence[Envelope], *, defer: bool = False) -> int:
        """Process envelopes from a syncnode; returns how many payloads were delivered.

        Applied to the CRDT (and visible) at once. Stored in one transaction with the MLS
        state, at once, or with ``defer`` (the push processor under load) with the next
        transaction of this device, soon after (:mod:`device.receive_journal`): the MLS
        state (kilobytes, a third of a receive's cost) is then saved once for many pushes."""
        r = self.replica
        payloads: list[Payload] = []
        taken: set[tuple[bytes, int]] = set()
        for env in envelopes:
            key = (env.sender, env.seq)
            verdict = triage(env, group_id=r.group_id, active=r.status == "active",
                             epoch=r.epoch, joined_epoch=r.joined_epoch,
                             duplicate=key in taken or r.buffer.seen(*key))
            if verdict is Triage.SKIP:
                continue
            taken.add(key)
            if verdict is Triage.FUTURE:
                self.future[key] = env
                r.learn_wanted.fire()
                continue
            if verdict is Triage.TOO_OLD:
                self.missing = True
                continue
            p = self._open(env)
            if p is not None:
                payloads.append(p)
        if not payloads:
            return 0
        before = set(r.buffer.pending)
        ready = r.buffer.add_many(payloads)
        bodies: list[bytes] = []
        is_state: list[bool] = []
        senders: set[str] = set()
        contents: list[tuple[Payload, tuple[bytes, ...]]] = []
        for p in ready:
            if p.kind == PayloadKind.SYNC_REQUEST:
                self._answer_later(p)
                continue
            if p.kind == PayloadKind.DOC_INVITE:  # a new document for our members
                take_offer(r, p)
                continue
            try:
                updates = unpack_updates(p.body)
            except DecodeError as exc:
                r.alarm("bad-update", f"from {short_id(p.sender)} seq {p.seq}: {exc}")
                continue
            bodies += updates
            contents.append((p, updates))
            is_state += [p.kind == PayloadKind.STATE] * len(updates)
            senders.add(short_id(p.sender))
        applied = []
        states = 0
        errors = r.crdt.apply(bodies)
        for body, state, err in zip(bodies, is_state, errors, strict=True):
            if err is None:
                applied.append(body)
                states += state
            else:
                r.alarm("bad-update", str(err))
        after = set(r.buffer.pending)
        self.journal.add(applied, after - before, before - after, states, len(payloads))
        if not defer or states:
            self.save()
        r.applied(len(applied))
        self._record(contents, errors)
        out = self.outbox
        out.edits_since_state = 0 if states else out.edits_since_state + len(applied)
        out.maybe_publish_state()
        if applied:
            r.emit(Change("remote", tuple(sorted(senders)), len(applied) - states, states))
        return len(ready)

    def save(self) -> None:
        """Store what :meth:`receive` applied and has not stored yet (one transaction)."""
        self.journal.save()

    def save_deadline(self) -> float:
        return self.journal.deadline()

    def _record(self, contents: list[tuple[Payload, tuple[bytes, ...]]],
                errors: list[CrdtError | None]) -> None:
        """Tell the compaction checks what each delivered payload that applied holds
        (:mod:`device.compaction_check`)."""
        r = self.replica
        at = 0
        for p, updates in contents:
            ok = all(e is None for e in errors[at:at + len(updates)])
            at += len(updates)
            if not ok or not updates:
                continue
            if p.kind == PayloadKind.STATE:
                try:
                    facts = state_facts(r.crdt, p.sender, p.seq, p.vector(), p.body, updates[0])
                except CrdtError:
                    continue
                r.ledger.state(facts)
            else:
                r.ledger.record_updates(p.sender, p.seq, list(updates))

    def _open(self, env: Envelope) -> Payload | None:
        """Verify, decrypt and check one envelope; None (logged) if it is not acceptable."""
        r = self.replica
        m = r.values.get(env.epoch)
        entry = m.manifest.device(env.sender) if m is not None else None
        if entry is None or not env.verify(entry.sig_pub):
            log.warning("envelope refused: sender not a member or bad signature",
                        doc=short_id(r.group_id), sender=short_id(env.sender), seq=env.seq)
            return None
        if not may_send(entry):
            self.reader_drops += 1
            log.warning("envelope dropped: its sender is a reader at that epoch",
                        doc=short_id(r.group_id), sender=short_id(env.sender), seq=env.seq,
                        epoch=env.epoch)
            return None
        try:
            sender, plaintext = r.mls.decrypt(env.ciphertext)
        except MlsError as exc:
            # An authentic envelope we cannot decrypt: an epoch we never had or no longer
            # keep, or (found by the simulator) a past-epoch message from a member removed in
            # the epoch we applied since, which mls-rs no longer opens. Members that did
            # decrypt it answer our state request with a STATE covering it.
            self.missing = True
            key = (r.group_id, env.sender, env.seq)
            said = self.store.one("SELECT 1 FROM undecryptable WHERE group_id=? AND sender=? "
                                  "AND seq=?", *key)
            (log.debug if said else log.warning)(
                "cannot decrypt; asking members for the state instead",
                doc=short_id(r.group_id), sender=short_id(env.sender), seq=env.seq,
                epoch=env.epoch, error=str(exc))
            if not said:  # warned once, not at every run that backfills it again
                with self.store.transaction(durable=False) as db:
                    db.execute("INSERT OR IGNORE INTO undecryptable VALUES (?,?,?)", key)
            return None
        if sender != identity_for(entry.sig_pub):
            log.warning("envelope sender is not the MLS sender", doc=short_id(r.group_id))
            return None
        try:
            p = Payload.decode(plaintext)
            check_plaintext(p, env, r.crdt.backend_id, r.crdt_type)
        except DecodeError as exc:
            r.alarm("bad-update", f"from {short_id(env.sender)} seq {env.seq}: {exc}")
            return None
        return p

    def deliver_future(self) -> None:
        """Receive the envelopes that waited for the epoch just applied."""
        future = [e for e in self.future.values() if e.epoch <= self.replica.epoch]
        for e in future:
            del self.future[(e.sender, e.seq)]
        if future:
            self.receive(future)

    # -- whole-document states -------------------------------------------------------------------

    def load_state(self, snapshot: bytes, covers: dict[bytes, int]) -> None:
        """Load a member's snapshot that contains every payload in ``covers`` (a verified p2p
        transfer); backfill then only fetches what came after it."""
        r = self.replica
        (err,) = r.crdt.apply([snapshot])
        if err is not None:
            raise err
        before = set(r.buffer.pending)
        r.buffer.cover(covers)
        with self.store.transaction() as db:
            db.execute("INSERT INTO crdt_updates (group_id, data) VALUES (?,?)",
                       (r.group_id, snapshot))
            db.executemany("DELETE FROM pending WHERE group_id=? AND sender=? AND seq=?",
                           [(r.group_id, s, q) for (s, q) in before - set(r.buffer.pending)])
            db.execute("UPDATE documents SET delivered=? WHERE group_id=?",
                       (r.delivered_blob(), r.group_id))
            r.state_arrived(db)
        self.missing = False
        r.emit(Change("remote", (), 0, 1))

    def ask_if_missing(self) -> None:
        """After a batch or a backfill: ask for the state if something could not be read."""
        if self.missing and self.replica.status == "active":
            self.request_state()

    def request_state(self) -> None:
        r = self.replica
        now = trio.current_time()
        if not state_request_due(now, self._last_sync_request,
                                 r.host.config.sync_request_interval):
            return
        self._last_sync_request = now
        self.missing = False
        if not r.may_send:  # a reader seals nothing: it fetches the state directly
            self.direct.want()
            return
        with self.store.transaction():
            self.outbox.seal(PayloadKind.SYNC_REQUEST, r.crdt.version())
        log.info("asked members for the document state", doc=short_id(r.group_id))

    def _direct_failed(self) -> None:
        self.missing = True

    def _answer_later(self, request: Payload) -> None:
        r = self.replica
        if not r.may_send:
            return  # a reader's STATE would be refused; the writers answer
        if request.sender == r.me or (request.sender, request.seq) in self._answered:
            return
        if not lacks_something(request.vector(), r.buffer.delivered):
            return  # they have everything we have
        self._answered.add((request.sender, request.seq))
        r.host.spawn(self._answer, request)

    async def _answer(self, request: Payload) -> None:
        r = self.replica
        # A little jitter so several members answering do not all send at the same instant.
        await trio.sleep(entropy.uniform(0, 0.2))
        if r.status != "active" or not r.may_send:
            return
        # The whole document, not a diff against the requester's version: a STATE goes to
        # every member, and each marks the vector it covers delivered. A diff holds only what
        # the requester lacked, so another member lacking something else marked that delivered
        # without its content, and never asked again (found by the simulator: partition seed
        # 17 left three devices without four acknowledged updates for good).
        sealed = self.outbox.seal_state()
        if sealed is None:  # too large for one message: the requester needs a direct transfer
            return
        log.info("sent document state", doc=short_id(r.group_id),
                 to=short_id(request.sender), bytes=len(sealed[2]))
