"""Received steps applied in memory and stored a little later, together.

Under load the push processor (:meth:`device.session.Session.processor`) applies each batch
of pushed envelopes to the CRDT at once (the change is visible), but stores what the step
changed -- the MLS state, the CRDT updates, the causal buffer and the delivered watermarks --
with the device's next transaction, or :data:`SAVE_DELAY` s (or :data:`SAVE_PAYLOADS`
payloads) later. The MLS state is kilobytes and was a third of a receive's cost; it is now
written once for many pushes.

Why this is safe: these steps were never fsynced (a power loss already had to be answered by
redoing them from the syncnodes); a crash now loses them the same way. What must never happen
is that something stored later gets ahead of them: a seal stores the MLS state, which includes
the ratchet steps the receive consumed, and if the receive's watermarks and updates were not
stored with it, the restarted device could neither decrypt those messages again nor knew it
had them. So the journal is written at the **start** of every transaction of the device
(:attr:`device.store.Store.on_begin`), before anything that transaction writes, and comes back
if that transaction rolls back (:attr:`device.store.Store.on_rollback`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field

import trio

from device.replica import Replica

SAVE_DELAY = 0.05
"""Seconds a received step may wait to be stored."""
SAVE_PAYLOADS = 256
"""Payloads after which waiting steps are stored whatever the time."""


@dataclass
class Unsaved:
    """Received steps applied in memory and not stored yet."""

    updates: list[bytes] = field(default_factory=list)
    added: set[tuple[bytes, int]] = field(default_factory=set)
    removed: set[tuple[bytes, int]] = field(default_factory=set)
    states: int = 0
    payloads: int = 0
    since: float | None = None

    def merge(self, later: Unsaved) -> None:
        self.updates += later.updates
        self.added = (self.added | later.added) - later.removed
        self.removed |= later.removed
        self.states += later.states
        self.payloads += later.payloads


class ReceiveJournal:
    """One document's received steps waiting to be stored (see the module doc)."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self.store = replica.store
        self.unsaved = Unsaved()
        self._saving: Unsaved | None = None
        self.store.on_begin.append(self._save_into)
        self.store.on_rollback.append(self._undo)

    def add(self, updates: list[bytes], added: Iterable[tuple[bytes, int]],
            removed: Iterable[tuple[bytes, int]], states: int, payloads: int) -> None:
        """A receive step: CRDT updates applied, payloads that entered or left the causal
        buffer, whole-document states among them, payloads received."""
        u = self.unsaved
        u.updates += updates
        u.added |= set(added)
        u.removed |= set(removed)
        u.states += states
        u.payloads += payloads
        if u.since is None:
            u.since = trio.current_time()

    def save(self) -> None:
        """Store every waiting step now (one transaction)."""
        if self.unsaved.payloads:
            with self.store.transaction(durable=False):
                pass  # the on_begin hook (_save_into) writes them

    def deadline(self) -> float:
        """When the waiting steps must be stored (``inf``: none wait; ``-inf``: now)."""
        u = self.unsaved
        if u.since is None or not u.payloads:
            return float("inf")
        if u.payloads >= SAVE_PAYLOADS:
            return -float("inf")
        return u.since + SAVE_DELAY

    def _save_into(self, db: sqlite3.Connection) -> None:
        """Write the waiting steps inside the transaction ``db`` just began. Not fsynced:
        after a power loss (or a crash, for waiting steps) they are redone from the syncnodes;
        the MLS state, the CRDT updates and the watermarks roll back together."""
        u, r = self.unsaved, self.replica
        self._saving = None  # a new transaction: the one before committed or was undone
        if not u.payloads:
            return
        self.unsaved, self._saving = Unsaved(), u
        r.mls.persist()
        db.executemany("INSERT INTO crdt_updates (group_id, data) VALUES (?,?)",
                       [(r.group_id, b) for b in u.updates])
        db.executemany("INSERT OR IGNORE INTO pending VALUES (?,?,?,?)",
                       [(r.group_id, s, q, r.buffer.pending[(s, q)].encode())
                        for (s, q) in u.added if (s, q) in r.buffer.pending])
        db.executemany("DELETE FROM pending WHERE group_id=? AND sender=? AND seq=?",
                       [(r.group_id, s, q) for (s, q) in u.removed])
        db.execute("UPDATE documents SET delivered=? WHERE group_id=?",
                   (r.delivered_blob(), r.group_id))
        if u.states:
            r.state_arrived(db)

    def _undo(self) -> None:
        """The transaction that stored the waiting steps rolled back: they wait again."""
        u, self._saving = self._saving, None
        if u is not None:
            u.merge(self.unsaved)
            self.unsaved = u
