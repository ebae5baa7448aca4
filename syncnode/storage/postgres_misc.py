"""The PostgreSQL statements of compaction, evidence, the mailbox, address records, the
statement clock and the node's identity and processes, mixed into
:class:`~syncnode.storage.postgres.PostgresStorage` (the same contracts as SQLite's, in
:mod:`~syncnode.storage.base`).

Node-wide writes take node-wide locks (``mailbox``, ``addresses``, ``clock``): two processes'
mailbox puts judge their quotas one after the other, never on the same stale usage.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
import trio

from syncnode.storage.base import (
    JOIN_REQUEST_KIND,
    SETSUM_MASK,
    Change,
    MailboxPutResult,
    MailboxQuota,
    MailboxRecord,
    MailboxRefusal,
    MailboxUsage,
    StorageConflict,
    digest_term,
)
from syncnode.storage.postgres_writer import Tx

JOIN_CLASS, OTHER_CLASS = b"j", b"m"
EVICT_BATCH = 64


@dataclass
class _Stamp:
    """One caller of :meth:`MiscSql.next_stamp`, waiting for a batch of stamps."""

    wall: int
    done: trio.Event = field(default_factory=trio.Event)
    value: int = 0
    error: BaseException | None = None


class MiscSql:
    """Mixed into PostgresStorage, which provides these."""

    _stamp_lock: threading.Lock
    _stamp_queue: list[_Stamp]
    _stamp_queued: bool

    _rows: Callable[..., Any]
    _one: Callable[..., Any]
    _blob: Callable[..., Any]
    _write: Callable[..., Any]
    _note: Callable[..., None]
    _read: Callable[..., Any]

    # -- compaction -----------------------------------------------------------------------------

    async def compact_envelopes(self, group_id: bytes, point: bytes,
                                covered: Mapping[bytes, int], keep: tuple[bytes, int]) -> int:
        vector = dict(covered)

        def write(tx: Tx) -> int:
            c = tx.conn
            if c.execute("SELECT 1 FROM groups WHERE group_id=%s", (group_id,)).fetchone() \
                    is None:
                raise StorageConflict("group not hosted")
            prior = {bytes(s): q for s, q in c.execute(
                "SELECT sender, seq FROM compacted WHERE group_id=%s", (group_id,))}
            if any(vector.get(s, 0) < q for s, q in prior.items()):
                raise StorageConflict("the point does not cover the one applied")
            freed = 0
            for sender, seq in vector.items():
                spare = keep[1] if sender == keep[0] else 0
                row = c.execute("WITH gone AS (DELETE FROM envelopes WHERE group_id=%s AND "
                                "sender=%s AND seq<=%s AND seq!=%s RETURNING envelope) "
                                "SELECT coalesce(sum(length(envelope)), 0) FROM gone",
                                (group_id, sender, seq, spare)).fetchone()
                freed += int(row[0]) if row else 0
                c.execute("INSERT INTO compacted VALUES (%s,%s,%s) ON CONFLICT (group_id, "
                          "sender) DO UPDATE SET seq=excluded.seq", (group_id, sender, seq))
                _resummarize(c, group_id, sender, seq)
            c.execute("INSERT INTO compactions VALUES (%s,%s) ON CONFLICT (group_id) DO UPDATE "
                      "SET point=excluded.point", (group_id, point))
            c.execute("UPDATE groups SET bytes_used=bytes_used-%s WHERE group_id=%s",
                      (freed, group_id))
            self._note(tx, "group", group_id)
            return freed

        return int(await self._write(write, "g:" + group_id.hex()))

    async def compaction(self, group_id: bytes) -> bytes | None:
        blob: bytes | None = await self._blob(
            "SELECT point FROM compactions WHERE group_id=%s", group_id)
        return blob

    # -- equivocation evidence ------------------------------------------------------------------

    async def put_equivocation(self, group_id: bytes, slot: int, proof: bytes) -> None:
        await self._write(lambda tx: tx.conn.execute(
            "INSERT INTO equivocations VALUES (%s,%s,%s) ON CONFLICT DO NOTHING",
            (group_id, slot, proof)), "g:" + group_id.hex())

    async def equivocation(self, group_id: bytes, slot: int) -> bytes | None:
        blob: bytes | None = await self._blob(
            "SELECT proof FROM equivocations WHERE group_id=%s AND slot=%s", group_id, slot)
        return blob

    # -- mailbox --------------------------------------------------------------------------------

    async def mailbox_put(self, recipient: bytes, kind: int, payload: bytes, *, sender: bytes,
                          size: int, now: int, expires_at: int, quota: MailboxQuota
                          ) -> MailboxPutResult:
        cls = JOIN_CLASS if kind == JOIN_REQUEST_KIND else OTHER_CLASS

        def write(tx: Tx) -> MailboxPutResult:
            c = tx.conn
            c.execute("DELETE FROM mailbox WHERE recipient=%s AND expires_at<=%s",
                      (recipient, now))
            row = c.execute("SELECT count(*) FROM mailbox WHERE recipient=%s",
                            (recipient,)).fetchone()
            if row and row[0] >= quota.items_per_recipient:
                return MailboxPutResult(refused=MailboxRefusal.RECIPIENT_FULL,
                                        limit=quota.items_per_recipient)
            usage = {bytes(who): (b, n) for who, b, n in c.execute(
                "SELECT who, bytes, items FROM mailbox_usage WHERE who IN (%s,%s)",
                (sender, cls))}
            sent, items = usage.get(sender, (0, 0))
            if sent + size > quota.bytes_per_sender or (
                    quota.items_per_sender is not None and items >= quota.items_per_sender):
                return MailboxPutResult(refused=MailboxRefusal.SENDER_QUOTA,
                                        sender_bytes=sent, sender_items=items)
            over = usage.get(cls, (0, 0))[0] + size - quota.class_bytes
            if over > 0 and (not quota.make_room or size > quota.class_bytes):
                return MailboxPutResult(refused=MailboxRefusal.NODE_QUOTA)
            evicted = 0
            while over > 0:  # the oldest of the class make room
                batch = c.execute(
                    "SELECT item_id, size FROM mailbox WHERE "
                    + ("kind=%s" if cls == JOIN_CLASS else "kind!=%s")
                    + " ORDER BY item_id LIMIT %s", (JOIN_REQUEST_KIND, EVICT_BATCH)).fetchall()
                if not batch:
                    break
                gone = []
                for item_id, item_size in batch:
                    gone.append(item_id)
                    over -= item_size
                    if over <= 0:
                        break
                c.execute("DELETE FROM mailbox WHERE item_id = ANY(%s)", (gone,))
                evicted += len(gone)
            row = c.execute("INSERT INTO mailbox (recipient, kind, payload, expires_at, sender, "
                            "size) VALUES (%s,%s,%s,%s,%s,%s) RETURNING item_id",
                            (recipient, kind, payload, expires_at, sender, size)).fetchone()
            self._note(tx, "mailbox", b"", recipient)
            return MailboxPutResult(item_id=int(row[0]) if row else 0, evicted=evicted)

        result: MailboxPutResult = await self._write(write, "mailbox")
        return result

    async def mailbox_items(self, recipient: bytes, *, after: int, now: int, limit: int,
                            max_bytes: int) -> tuple[list[MailboxRecord], bool]:
        items: list[MailboxRecord] = []
        budget = max_bytes
        for i, k, p, e in await self._rows(
                "SELECT item_id, kind, payload, expires_at FROM mailbox WHERE recipient=%s AND "
                "item_id>%s AND expires_at>%s ORDER BY item_id LIMIT %s",
                recipient, after, now, limit + 1):
            if len(items) == limit or (items and len(p) > budget):
                return items, True
            items.append(MailboxRecord(i, k, bytes(p), e))
            budget -= len(p)
        return items, False

    async def mailbox_ack(self, recipient: bytes, item_ids: Sequence[int]) -> int:
        ids = list(item_ids)
        return int(await self._write(lambda tx: tx.conn.execute(
            "DELETE FROM mailbox WHERE recipient=%s AND item_id = ANY(%s)",
            (recipient, ids)).rowcount, "mailbox"))

    async def mailbox_expire(self, now: int) -> int:
        return int(await self._write(lambda tx: tx.conn.execute(
            "DELETE FROM mailbox WHERE expires_at<=%s", (now,)).rowcount, "mailbox"))

    async def mailbox_usage(self) -> MailboxUsage:
        got = {bytes(w): b for w, b in await self._rows(
            "SELECT who, bytes FROM mailbox_usage WHERE who IN (%s,%s)", JOIN_CLASS,
            OTHER_CLASS)}
        return MailboxUsage(int(got.get(JOIN_CLASS, 0)), int(got.get(OTHER_CLASS, 0)))

    # -- address records ------------------------------------------------------------------------

    async def address_record(self, node_id: bytes) -> bytes | None:
        blob: bytes | None = await self._blob(
            "SELECT record FROM address_records WHERE node_id=%s", node_id)
        return blob

    async def put_address_record(self, node_id: bytes, issued_at: int, record: bytes, *,
                                 capacity: int) -> bool:
        def write(tx: Tx) -> bool:
            c = tx.conn
            row = c.execute("SELECT issued_at FROM address_records WHERE node_id=%s",
                            (node_id,)).fetchone()
            if row is not None and row[0] >= issued_at:
                return False
            if row is None:
                count = c.execute("SELECT count(*) FROM address_records").fetchone()
                if count and count[0] >= capacity:
                    return False
            c.execute("INSERT INTO address_records VALUES (%s,%s,%s) ON CONFLICT (node_id) DO "
                      "UPDATE SET issued_at=excluded.issued_at, record=excluded.record",
                      (node_id, issued_at, record))
            return True

        return bool(await self._write(write, "addresses"))

    # -- the statement clock, incarnation, identity ---------------------------------------------

    async def incarnation(self) -> bytes:
        row = await self._one("SELECT value FROM meta WHERE key='incarnation'")
        if row is None:
            raise RuntimeError("the PostgreSQL database has no incarnation")
        return bytes.fromhex(row[0])

    async def statement_clock(self) -> int:
        row = await self._one("SELECT value FROM meta WHERE key='statement_clock'")
        return int(row[0]) if row else 0

    async def reserve_statement_clock(self, until: int) -> None:
        await self._write(lambda tx: tx.conn.execute(
            "INSERT INTO meta VALUES ('statement_clock', %s) ON CONFLICT (key) DO UPDATE SET "
            "value = greatest(meta.value::bigint, excluded.value::bigint)::text",
            (str(until),)), "clock")

    async def next_stamp(self, wall_ms: int) -> int:
        # Under the node-wide clock lock, in a durable batch: a stamp handed out after another
        # process's was handed out (its batch committed) is larger, whatever the wall clocks.
        # Every stamp asked while one is being written is written with it: one statement for
        # all the acks of a batch, not one each.
        mine = _Stamp(wall_ms)
        with self._stamp_lock:
            self._stamp_queue.append(mine)
            lead = not self._stamp_queued
            self._stamp_queued = True
        if not lead:
            with trio.CancelScope(shield=True):  # asked: it completes, as a write does
                await mine.done.wait()
        else:
            await self._write_stamps()
        if mine.error is not None:
            raise mine.error
        return mine.value

    async def _write_stamps(self) -> None:
        taken: list[_Stamp] = []

        def write(tx: Tx) -> None:
            if not taken:  # (a batch run again keeps what it took the first time)
                with self._stamp_lock:
                    taken[:], self._stamp_queue = self._stamp_queue, []
                    self._stamp_queued = False
            n, wall = len(taken), max(s.wall for s in taken)
            row = tx.conn.execute(
                "INSERT INTO meta VALUES ('statement_clock', %s) ON CONFLICT (key) DO UPDATE "
                "SET value = greatest(meta.value::bigint + %s, excluded.value::bigint)::text "
                "RETURNING value", (str(wall + n - 1), n)).fetchone()
            first = (int(row[0]) if row else wall + n - 1) - n + 1
            for i, stamp in enumerate(taken):
                stamp.value = first + i

        error: BaseException | None = None
        try:
            await self._write(write, "clock")
        except BaseException as exc:
            error = exc
            if not taken:  # never ran (closing): fail everyone waiting
                with self._stamp_lock:
                    taken[:], self._stamp_queue = self._stamp_queue, []
                    self._stamp_queued = False
        for stamp in taken:
            stamp.error = error
            stamp.done.set()

    async def claim_node(self, node_id: bytes) -> None:
        def write(tx: Tx) -> bytes:
            row = tx.conn.execute(
                "INSERT INTO meta VALUES ('node_id', %s) ON CONFLICT (key) DO UPDATE SET "
                "value = meta.value RETURNING value", (node_id.hex(),)).fetchone()
            return bytes.fromhex(row[0]) if row else node_id

        owner = await self._write(write, "node")
        if owner != node_id:
            raise RuntimeError(f"this database belongs to syncnode {owner.hex()[:16]}..., not "
                               f"{node_id.hex()[:16]}... (every process of one node uses the "
                               "same node.key)")

    # -- the node's processes -------------------------------------------------------------------

    async def register_process(self, token: str, addrs: Sequence[str], pid: int, host: str,
                               now: float) -> None:
        """Record (or refresh) a live process of this node and its addresses; forget the
        records of processes unseen for an hour (killed ones never drop their own)."""
        def write(tx: Tx) -> None:
            tx.conn.execute("DELETE FROM processes WHERE seen_at < %s", (now - 3600,))
            tx.conn.execute(
                "INSERT INTO processes VALUES (%s,%s,%s,%s,%s) ON CONFLICT (token) DO UPDATE "
                "SET addrs=excluded.addrs, seen_at=excluded.seen_at",
                (token, " ".join(addrs), pid, host, now))

        await self._write(write, "processes")

    async def drop_process(self, token: str) -> None:
        await self._write(lambda tx: tx.conn.execute(
            "DELETE FROM processes WHERE token=%s", (token,)), "processes")

    async def live_processes(self, since: float) -> list[tuple[str, list[str]]]:
        """``(token, addresses)`` of the processes seen at or after ``since``, oldest first."""
        return [(t, a.split()) for t, a in await self._rows(
            "SELECT token, addrs FROM processes WHERE seen_at>=%s ORDER BY token", since)]


def _resummarize(c: psycopg.Connection, group_id: bytes, sender: bytes, covered: int) -> None:
    """As :func:`syncnode.storage.sqlite_schema.resummarize`: the sender's summary row rebuilt
    from what is held, what the point covers counting as held."""

    count, top, setsum, contiguous = 0, covered, 0, covered
    for seq, digest in c.execute("SELECT seq, digest FROM envelopes WHERE group_id=%s AND "
                                 "sender=%s ORDER BY seq", (group_id, sender)):
        count, top = count + 1, max(top, seq)
        setsum = (setsum + digest_term(bytes(digest))) & SETSUM_MASK
        if seq == contiguous + 1:
            contiguous = seq
    c.execute("INSERT INTO envelope_senders VALUES (%s,%s,%s,%s,%s,%s) ON CONFLICT (group_id, "
              "sender) DO UPDATE SET count=excluded.count, top=excluded.top, "
              "contiguous=excluded.contiguous, setsum=excluded.setsum",
              (group_id, sender, count, top, contiguous, setsum))


__all__ = ["Change", "MiscSql"]
