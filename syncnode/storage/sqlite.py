"""The SQLite implementation of :class:`~syncnode.storage.base.Storage`: every SQL statement
the syncnode runs (the schema is in :mod:`~syncnode.storage.sqlite_schema`).

Writes are closures handed to the group-commit :class:`~syncnode.storage.sqlite_writer.Writer`,
which runs them in one transaction per batch on its own connection (on a worker thread unless
``threads=False``). Reads use a second connection on the trio thread and never yield: WAL lets
them proceed while the writer commits, they only ever see committed (durable) data, and a
local file answers in microseconds, so a thread hop would cost more than the read.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import trio

from syncnode.storage.base import (
    JOIN_REQUEST_KIND,
    BatchHook,
    DecidedRecord,
    GroupRecord,
    HostingRecord,
    MailboxPutResult,
    MailboxQuota,
    MailboxRecord,
    MailboxRefusal,
    MailboxUsage,
    SenderSummary,
    StorageConflict,
)
from syncnode.storage.sqlite_compaction import CompactionSql
from syncnode.storage.sqlite_schema import add_to_summary, open_database, storage_bytes
from syncnode.storage.sqlite_writer import Writer

JOIN_CLASS, OTHER_CLASS = b"j", b"m"
"""``mailbox_usage`` rows of the two classes (never a sender: those are 32 bytes); the triggers
in :data:`~syncnode.storage.sqlite_schema.MAILBOX_SCHEMA` spell them X'6a' and X'6d'."""
EVICT_BATCH = 64


class SqliteStorage(CompactionSql):
    """A syncnode's data in one SQLite file. Opening checks the schema and integrity (and
    raises RuntimeError if they are wrong) before anything else runs."""

    def __init__(self, path: Path, *, batching: bool = True, threads: bool = True) -> None:
        self.path = path
        self.db = open_database(path)
        self.writer = Writer(path, batching=batching, threads=threads)

    @property
    def on_batch(self) -> BatchHook | None:
        return self.writer.on_batch

    @on_batch.setter
    def on_batch(self, hook: BatchHook | None) -> None:
        self.writer.on_batch = hook

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        await self.writer.run(task_status=task_status)

    async def aclose(self) -> None:
        await self.writer.aclose()
        self.db.close()

    async def barrier(self) -> None:
        await self.writer.barrier()

    def size_bytes(self) -> int:
        return storage_bytes(self.path)

    # -- groups ---------------------------------------------------------------------------------

    async def create_group(self, group_id: bytes, creator: bytes, genesis: bytes,
                           created_at: float) -> bool:
        def write(c: sqlite3.Connection) -> bool:
            prior = c.execute("SELECT value FROM decided WHERE group_id=? AND slot=0",
                              (group_id,)).fetchone()
            if prior is not None:
                if prior[0] != genesis:
                    raise StorageConflict("a different group has this id")
                return False
            c.execute("INSERT INTO groups VALUES (?,?,0,?,?)",
                      (group_id, creator, len(genesis), created_at))
            c.execute("INSERT INTO decided VALUES (?,0,?,NULL)", (group_id, genesis))
            return True  # the genesis manifest is read from slot 0: stored once

        return bool(await self.writer.execute(write))

    async def group(self, group_id: bytes) -> GroupRecord | None:
        row = self._one("SELECT creator, top_slot, bytes_used FROM groups WHERE group_id=?",
                        group_id)
        return None if row is None else GroupRecord(*row)

    async def group_count(self) -> int:
        row = self._one("SELECT count(*) FROM groups")
        return int(row[0]) if row else 0

    async def group_count_by_creator(self, creator: bytes) -> int:
        row = self._one("SELECT count(*) FROM groups WHERE creator=?", creator)
        return int(row[0]) if row else 0

    async def group_ids(self, after: bytes = b"", limit: int = 1000) -> list[bytes]:
        return [r[0] for r in self.db.execute(
            "SELECT group_id FROM groups WHERE group_id>? ORDER BY group_id LIMIT ?",
            (after, limit))]

    async def delete_group(self, group_id: bytes) -> bool:
        def write(c: sqlite3.Connection) -> bool:
            for table in ("decided", "manifests", "acceptor", "envelopes", "envelope_senders",
                          "equivocations", "hosting", "compactions", "compacted"):
                c.execute(f"DELETE FROM {table} WHERE group_id=?", (group_id,))
            return c.execute("DELETE FROM groups WHERE group_id=?", (group_id,)).rowcount == 1

        return bool(await self.writer.execute(write))

    # -- hosting: adopted and removed groups ----------------------------------------------------

    async def adopt_group(self, group_id: bytes, creator: bytes, genesis: bytes,
                          created_at: float, *, named_slot: int, adoption: bytes) -> bool:
        def write(c: sqlite3.Connection) -> bool:
            prior = c.execute("SELECT value FROM decided WHERE group_id=? AND slot=0",
                              (group_id,)).fetchone()
            if prior is not None:
                if prior[0] != genesis:
                    raise StorageConflict("a different group has this id")
                c.execute("UPDATE hosting SET named_slot=?, adoption=? WHERE group_id=? AND "
                          "named_slot IS NOT NULL AND serving=0",
                          (named_slot, adoption, group_id))
                return False
            c.execute("INSERT INTO groups VALUES (?,?,0,?,?)",
                      (group_id, creator, len(genesis), created_at))
            c.execute("INSERT INTO decided VALUES (?,0,?,NULL)", (group_id, genesis))
            c.execute("INSERT OR REPLACE INTO hosting VALUES (?,?,?,0,0,NULL,NULL)",
                      (group_id, named_slot, adoption))
            return True

        return bool(await self.writer.execute(write))

    async def hosting(self, group_id: bytes) -> HostingRecord | None:
        row = self._one("SELECT named_slot, adoption, serving, history_complete, removed_slot, "
                        "removed_at FROM hosting WHERE group_id=?", group_id)
        return None if row is None else _hosting(row)

    async def put_hosting(self, group_id: bytes, record: HostingRecord) -> None:
        def write(c: sqlite3.Connection) -> None:
            if c.execute("SELECT 1 FROM groups WHERE group_id=?", (group_id,)).fetchone() is None:
                raise StorageConflict("the group is not hosted")
            c.execute("INSERT OR REPLACE INTO hosting VALUES (?,?,?,?,?,?,?)",
                      (group_id, record.named_slot, record.adoption, int(record.serving),
                       int(record.history_complete), record.removed_slot, record.removed_at))

        await self.writer.execute(write)

    async def hosting_records(self, after: bytes = b"", limit: int = 1000
                              ) -> list[tuple[bytes, HostingRecord]]:
        return [(row[0], _hosting(row[1:])) for row in self.db.execute(
            "SELECT group_id, named_slot, adoption, serving, history_complete, removed_slot, "
            "removed_at FROM hosting WHERE group_id>? ORDER BY group_id LIMIT ?",
            (after, limit))]

    # -- decided log and manifests --------------------------------------------------------------

    async def append_decided(self, group_id: bytes, slot: int, value: bytes, certificate: bytes,
                             manifest: bytes) -> None:
        def write(c: sqlite3.Connection) -> None:
            moved = c.execute("UPDATE groups SET top_slot=?, bytes_used=bytes_used+? "
                              "WHERE group_id=? AND top_slot=?",
                              (slot, len(value), group_id, slot - 1)).rowcount
            if moved != 1:
                raise StorageConflict(f"slot {slot} is not the next slot of a hosted group")
            c.execute("INSERT INTO decided VALUES (?,?,?,?)", (group_id, slot, value,
                                                               certificate))
            c.execute("INSERT OR REPLACE INTO manifests VALUES (?,?,?)",
                      (group_id, slot, manifest))

        await self.writer.execute(write)

    async def decided(self, group_id: bytes, slot: int) -> DecidedRecord | None:
        row = self._one("SELECT value, certificate FROM decided WHERE group_id=? AND slot=?",
                        group_id, slot)
        return None if row is None else DecidedRecord(*row)

    async def decided_range(self, group_id: bytes, first: int, last: int, *, limit: int,
                            max_bytes: int) -> list[tuple[int, DecidedRecord]]:
        out: list[tuple[int, DecidedRecord]] = []
        budget = max_bytes
        for slot, value, cert in self.db.execute(
                "SELECT slot, value, certificate FROM decided WHERE group_id=? AND slot>=? "
                "AND slot>0 AND slot<=? ORDER BY slot LIMIT ?",
                (group_id, first, last, limit)):
            budget -= len(value)
            if out and budget < 0:
                break
            out.append((slot, DecidedRecord(value, cert)))
        return out

    async def manifest(self, group_id: bytes, epoch: int) -> bytes | None:
        return self._blob("SELECT manifest FROM manifests WHERE group_id=? AND epoch=?",
                          group_id, epoch)

    # -- Paxos acceptor -------------------------------------------------------------------------

    async def acceptor_record(self, group_id: bytes, slot: int) -> bytes | None:
        return self._blob("SELECT record FROM acceptor WHERE group_id=? AND slot=?", group_id,
                          slot)

    async def put_acceptor_records(self, records: Sequence[tuple[bytes, int, bytes]]) -> None:
        rows = list(records)

        def write(c: sqlite3.Connection) -> None:
            c.executemany("INSERT OR REPLACE INTO acceptor VALUES (?,?,?)", rows)

        await self.writer.execute(write)

    async def put_acceptor_record_if(self, group_id: bytes, slot: int, expected: bytes | None,
                                     record: bytes) -> bool:
        def write(c: sqlite3.Connection) -> bool:
            row = c.execute("SELECT record FROM acceptor WHERE group_id=? AND slot=?",
                            (group_id, slot)).fetchone()
            if (None if row is None else row[0]) != expected:
                return False
            c.execute("INSERT OR REPLACE INTO acceptor VALUES (?,?,?)", (group_id, slot, record))
            return True

        return bool(await self.writer.execute(write))

    # -- envelopes ------------------------------------------------------------------------------

    async def store_envelope(self, group_id: bytes, sender: bytes, seq: int, digest: bytes,
                             envelope: bytes, *, staged: Callable[[], None] | None = None
                             ) -> bool:
        def write(c: sqlite3.Connection) -> bool:
            covered = c.execute("SELECT seq FROM compacted WHERE group_id=? AND sender=?",
                                (group_id, sender)).fetchone()
            if covered is not None and seq <= covered[0] and c.execute(
                    "SELECT 1 FROM envelopes WHERE group_id=? AND sender=? AND seq=?",
                    (group_id, sender, seq)).fetchone() is None:
                return False  # in the compacted state already
            cur = c.execute("INSERT OR IGNORE INTO envelopes VALUES (?,?,?,?,?)",
                            (group_id, sender, seq, digest, envelope))
            if cur.rowcount == 0:
                prior = c.execute("SELECT digest FROM envelopes WHERE group_id=? AND sender=? "
                                  "AND seq=?", (group_id, sender, seq)).fetchone()
                if prior[0] != digest:
                    raise StorageConflict(f"sender already stored a different seq {seq}")
                return False
            c.execute("UPDATE groups SET bytes_used=bytes_used+? WHERE group_id=?",
                      (len(envelope), group_id))
            add_to_summary(c, group_id, sender, seq, digest)
            return True

        def new(result: bool) -> None:
            if result and staged is not None:
                staged()

        return bool(await self.writer.execute(write, staged=new))

    async def envelopes_after(self, group_id: bytes, watermarks: Mapping[bytes, int], *,
                              limit: int, max_bytes: int) -> tuple[list[bytes], bool]:
        out: list[bytes] = []
        budget = max_bytes
        senders = [r[0] for r in self.db.execute(
            "SELECT DISTINCT sender FROM envelopes WHERE group_id=? ORDER BY sender",
            (group_id,))]
        for sender in senders:
            for (raw,) in self.db.execute(
                    "SELECT envelope FROM envelopes WHERE group_id=? AND sender=? AND seq>? "
                    "ORDER BY seq LIMIT ?",
                    (group_id, sender, watermarks.get(sender, 0), limit - len(out) + 1)):
                if len(out) >= limit or (out and budget - len(raw) < 0):
                    return out, True
                budget -= len(raw)
                out.append(raw)
        return out, False

    async def envelope_marks(self, group_id: bytes) -> dict[bytes, int]:
        # The summary's contiguous mark counts what a compaction covers as held
        # (:func:`~syncnode.storage.sqlite_schema.resummarize`).
        return dict(self.db.execute(
            "SELECT sender, contiguous FROM envelope_senders WHERE group_id=? AND contiguous>0",
            (group_id,)))

    async def envelope_summary(self, group_id: bytes) -> dict[bytes, SenderSummary]:
        return {row[0]: SenderSummary(*row[1:]) for row in self.db.execute(
            "SELECT sender, count, top, contiguous, setsum FROM envelope_senders "
            "WHERE group_id=?", (group_id,))}

    async def envelope_count(self, group_id: bytes) -> int:
        row = self._one("SELECT count(*) FROM envelopes WHERE group_id=?", group_id)
        return int(row[0]) if row else 0

    async def envelope_digests(self, group_id: bytes, keys: Sequence[tuple[bytes, int]]
                               ) -> dict[tuple[bytes, int], bytes]:
        out = {}
        for sender, seq in keys:  # primary-key lookups
            digest = self._blob("SELECT digest FROM envelopes WHERE group_id=? AND sender=? "
                                "AND seq=?", group_id, sender, seq)
            if digest is not None:
                out[(sender, seq)] = digest
        return out

    # -- the statement clock and incarnation -----------------------------------------------------

    async def incarnation(self) -> bytes:
        row = self._one("SELECT value FROM meta WHERE key='incarnation'")
        if row is None:  # open_database made it: only a hand-edited database lacks it
            raise RuntimeError(f"{self.path}: the database has no incarnation")
        return bytes.fromhex(row[0])

    async def statement_clock(self) -> int:
        row = self._one("SELECT value FROM meta WHERE key='statement_clock'")
        return int(row[0]) if row else 0

    async def reserve_statement_clock(self, until: int) -> None:
        # The meta table exists in every schema version: no migration needed.
        await self.writer.execute(lambda c: c.execute(
            "INSERT INTO meta VALUES ('statement_clock', ?) ON CONFLICT (key) DO UPDATE SET "
            "value = CAST(max(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER)) AS TEXT)",
            (str(until),)))

    # -- equivocation evidence ------------------------------------------------------------------

    async def put_equivocation(self, group_id: bytes, slot: int, proof: bytes) -> None:
        await self.writer.execute(lambda c: c.execute(
            "INSERT OR IGNORE INTO equivocations VALUES (?,?,?)", (group_id, slot, proof)))

    async def equivocation(self, group_id: bytes, slot: int) -> bytes | None:
        return self._blob("SELECT proof FROM equivocations WHERE group_id=? AND slot=?",
                          group_id, slot)

    # -- mailbox --------------------------------------------------------------------------------

    async def mailbox_put(self, recipient: bytes, kind: int, payload: bytes, *, sender: bytes,
                          size: int, now: int, expires_at: int, quota: MailboxQuota
                          ) -> MailboxPutResult:
        cls = JOIN_CLASS if kind == JOIN_REQUEST_KIND else OTHER_CLASS

        def write(c: sqlite3.Connection) -> MailboxPutResult:
            c.execute("DELETE FROM mailbox WHERE recipient=? AND expires_at<=?",
                      (recipient, now))
            (count,) = c.execute("SELECT count(*) FROM mailbox WHERE recipient=?",
                                 (recipient,)).fetchone()
            if count >= quota.items_per_recipient:
                return MailboxPutResult(refused=MailboxRefusal.RECIPIENT_FULL,
                                        limit=quota.items_per_recipient)
            usage = {who: (b, n) for who, b, n in c.execute(
                "SELECT who, bytes, items FROM mailbox_usage WHERE who IN (?,?)", (sender, cls))}
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
                    + ("kind=?" if cls == JOIN_CLASS else "kind!=?")
                    + " ORDER BY item_id LIMIT ?", (JOIN_REQUEST_KIND, EVICT_BATCH)).fetchall()
                if not batch:
                    break
                gone = []
                for item_id, item_size in batch:
                    gone.append((item_id,))
                    over -= item_size
                    if over <= 0:
                        break
                c.executemany("DELETE FROM mailbox WHERE item_id=?", gone)
                evicted += len(gone)
            cur = c.execute("INSERT INTO mailbox (recipient, kind, payload, expires_at, sender, "
                            "size) VALUES (?,?,?,?,?,?)",
                            (recipient, kind, payload, expires_at, sender, size))
            return MailboxPutResult(item_id=int(cur.lastrowid or 0), evicted=evicted)

        result: MailboxPutResult = await self.writer.execute(write)
        return result

    async def mailbox_items(self, recipient: bytes, *, after: int, now: int, limit: int,
                            max_bytes: int) -> tuple[list[MailboxRecord], bool]:
        items: list[MailboxRecord] = []
        budget = max_bytes
        for i, k, p, e in self.db.execute(
                "SELECT item_id, kind, payload, expires_at FROM mailbox WHERE recipient=? AND "
                "item_id>? AND expires_at>? ORDER BY item_id LIMIT ?",
                (recipient, after, now, limit + 1)):
            if len(items) == limit or (items and len(p) > budget):
                return items, True
            items.append(MailboxRecord(i, k, p, e))
            budget -= len(p)
        return items, False

    async def mailbox_ack(self, recipient: bytes, item_ids: Sequence[int]) -> int:
        ids = [(recipient, i) for i in item_ids]

        def write(c: sqlite3.Connection) -> int:
            return c.executemany("DELETE FROM mailbox WHERE recipient=? AND item_id=?",
                                 ids).rowcount

        return int(await self.writer.execute(write))

    async def mailbox_expire(self, now: int) -> int:
        def write(c: sqlite3.Connection) -> int:
            return c.execute("DELETE FROM mailbox WHERE expires_at<=?", (now,)).rowcount

        return int(await self.writer.execute(write))

    async def mailbox_usage(self) -> MailboxUsage:
        got = dict(self.db.execute("SELECT who, bytes FROM mailbox_usage WHERE who IN (?,?)",
                                   (JOIN_CLASS, OTHER_CLASS)))
        return MailboxUsage(int(got.get(JOIN_CLASS, 0)), int(got.get(OTHER_CLASS, 0)))

    # -- address records ------------------------------------------------------------------------

    async def address_record(self, node_id: bytes) -> bytes | None:
        return self._blob("SELECT record FROM address_records WHERE node_id=?", node_id)

    async def put_address_record(self, node_id: bytes, issued_at: int, record: bytes, *,
                                 capacity: int) -> bool:
        def write(c: sqlite3.Connection) -> bool:
            row = c.execute("SELECT issued_at FROM address_records WHERE node_id=?",
                            (node_id,)).fetchone()
            if row is not None and row[0] >= issued_at:
                return False
            if row is None:
                (count,) = c.execute("SELECT count(*) FROM address_records").fetchone()
                if count >= capacity:
                    return False
            c.execute("INSERT OR REPLACE INTO address_records VALUES (?,?,?)",
                      (node_id, issued_at, record))
            return True

        return bool(await self.writer.execute(write))


def _hosting(row: Sequence[Any]) -> HostingRecord:
    named_slot, adoption, serving, complete, removed_slot, removed_at = row
    return HostingRecord(named_slot, adoption, bool(serving), bool(complete), removed_slot,
                         removed_at)
