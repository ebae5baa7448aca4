"""The other processes of this node: keeping one process in step with what they commit.

Several ``syncnode run`` processes of one node share one database (PostgreSQL, a
:class:`~syncnode.storage.SharedStorage`) and act as one syncnode. What must hold across them
is decided in the database (Paxos steps by compare-and-set, :mod:`syncnode.acceptor`; one
statement clock, :mod:`syncnode.statements`; every conditional write in its transaction).
What each process keeps in memory is only a cache, and this module keeps it fresh: the storage
reports every change another process commits (LISTEN/NOTIFY, in commit order,
:mod:`syncnode.storage.postgres_listen`) and :class:`Siblings` applies it here:

* ``envelope``: pushed to this process's subscribers of the group (read back from the
  database: a notification names the envelope, never carries it), and its bytes counted in the
  cached group state;
* ``decided``: the cached group state moves to the new top slot and manifest, and the decision
  is pushed to this process's subscribers (who are dropped if it removed their device);
* ``mailbox``: a notice to this process's watchers of the recipient;
* ``group``: the cached group and hosting state are read again (a deletion ends the group
  here too);
* ``resync`` (the notification connection was lost): every cache is dropped.

Until a notification arrives (about a millisecond: ``scripts/bench_postgres.py``) a process
may answer from the older state, as a single node that has not yet learned a decision does;
the requests whose answer depends on it read the database again first (a Prepare or an
envelope for a slot beyond the cached top). Events queue without blocking the notifying
thread; past :data:`MAX_QUEUED` the process stops queueing and drops its caches instead.
"""

from __future__ import annotations

from collections import deque

import trio

from proto.codec import decode_as
from proto.envelope import Envelope
from proto.logs import get_logger
from syncnode.decisions import DecidedLog
from syncnode.fanout import Fanout
from syncnode.groups import Groups, GroupState
from syncnode.hosting import Hosting
from syncnode.metrics import Metrics
from syncnode.storage import Change, Storage

log = get_logger("syncnode.siblings")

MAX_QUEUED = 100_000


class Siblings:
    """Applies the changes other processes of this node commit (see the module doc)."""

    def __init__(self, store: Storage, groups: Groups, hosting: Hosting, decisions: DecidedLog,
                 fanout: Fanout, metrics: Metrics) -> None:
        self.store = store
        self.groups = groups
        self.hosting = hosting
        self.decisions = decisions
        self.fanout = fanout
        self.metrics = metrics
        self._queue: deque[Change] = deque()
        self._wake = trio.Event()
        self._overflowed = False
        self.applied = 0
        """Changes applied so far (tests wait on it)."""

    def heard(self, change: Change) -> None:
        """Called by the storage on the trio thread; never blocks."""
        if len(self._queue) >= MAX_QUEUED:
            self._overflowed = True
        else:
            self._queue.append(change)
        self._wake.set()

    async def run(self) -> None:
        while True:
            if not self._queue and not self._overflowed:
                self._wake = trio.Event()
                await self._wake.wait()
                continue
            if self._overflowed:
                self._overflowed = False
                self._queue.clear()
                self._drop_caches()
                continue
            change = self._queue.popleft()
            try:
                await self.apply(change)
            except Exception as exc:  # a cache left stale must not stop the others
                log.error("change from another process not applied", kind=change.kind,
                          error=str(exc))
                self._forget(change.group_id)
            self.applied += 1

    async def apply(self, change: Change) -> None:
        gid = change.group_id
        if change.kind == "resync":
            self._drop_caches()
        elif change.kind == "mailbox":
            self.fanout.notify_mailbox(change.key)
        elif change.kind == "envelope":
            g = self.groups.cache.get(gid)
            if g is not None:
                g.bytes_used += change.size
            if self.fanout.subscribers.get(gid):
                held = await self.store.envelope(gid, change.key, change.number)
                g = await self.groups.get(gid)
                if held is not None and g is not None:
                    self.fanout.publish(g, decode_as(held[1], Envelope))
        elif change.kind == "decided":
            await self._decided(gid, change.number)
        elif change.kind == "group":
            self.hosting.cache.pop(gid, None)
            g = self.groups.cache.get(gid)
            if g is not None:
                async with g.lock:
                    if await self.store.group(gid) is None:  # deleted by another process
                        g.deleted = True
                        self.groups.cache.pop(gid, None)
                    else:
                        await self._publish_learned(g, await self.groups.reload(g))

    async def _decided(self, gid: bytes, slot: int) -> None:
        self.hosting.cache.pop(gid, None)  # serving or removed may follow from it
        cached = self.groups.cache.get(gid)
        if cached is None:
            if not self.fanout.subscribers.get(gid):
                return  # nothing here depends on it: read when next needed
            g = await self.groups.get(gid)  # read now: it includes the slot
            if g is not None and g.top >= slot:
                await self._publish_learned(g, [slot])
            return
        async with cached.lock:
            await self._publish_learned(cached, await self.groups.reload(cached))

    async def _publish_learned(self, g: GroupState, slots: list[int]) -> None:
        if not self.fanout.subscribers.get(g.group_id):
            return
        for slot in slots:
            self.fanout.publish(g, await self.decisions.decided_at(g.group_id, slot),
                                new_manifest=True)

    def _forget(self, gid: bytes) -> None:
        self.groups.cache.pop(gid, None)
        self.hosting.cache.pop(gid, None)

    def _drop_caches(self) -> None:
        self.groups.cache.clear()
        self.hosting.cache.clear()
        log.warning("changes of other processes may have been missed; caches dropped")
