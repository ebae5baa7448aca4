"""The SQLite statements of compaction (:meth:`~syncnode.storage.base.Storage.compact_envelopes`
and its reads), mixed into :class:`~syncnode.storage.sqlite.SqliteStorage`.

The applied point is kept opaque in ``compactions``; its covered vector, one row per sender, in
``compacted``, which :meth:`SqliteStorage.store_envelope` and ``envelope_marks`` read.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from typing import Any

from syncnode.storage.base import StorageConflict
from syncnode.storage.sqlite_schema import resummarize
from syncnode.storage.sqlite_writer import Writer


class CompactionSql:
    db: sqlite3.Connection
    writer: Writer

    def _one(self, sql: str, *args: Any) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = self.db.execute(sql, args).fetchone()
        return row

    def _blob(self, sql: str, *args: Any) -> bytes | None:
        row = self._one(sql, *args)
        blob: bytes | None = None if row is None else row[0]
        return blob

    async def envelope(self, group_id: bytes, sender: bytes, seq: int
                       ) -> tuple[bytes, bytes] | None:
        row = self._one("SELECT digest, envelope FROM envelopes WHERE group_id=? AND sender=? "
                        "AND seq=?", group_id, sender, seq)
        return None if row is None else (row[0], row[1])

    async def compact_envelopes(self, group_id: bytes, point: bytes,
                                covered: Mapping[bytes, int], keep: tuple[bytes, int]) -> int:
        def write(c: sqlite3.Connection) -> int:
            if c.execute("SELECT 1 FROM groups WHERE group_id=?", (group_id,)).fetchone() \
                    is None:
                raise StorageConflict("group not hosted")
            prior = dict(c.execute("SELECT sender, seq FROM compacted WHERE group_id=?",
                                   (group_id,)).fetchall())
            if any(covered.get(s, 0) < q for s, q in prior.items()):
                raise StorageConflict("the point does not cover the one applied")
            freed = 0
            for sender, seq in covered.items():
                spare = keep[1] if sender == keep[0] else 0
                freed += c.execute(
                    "SELECT coalesce(sum(length(envelope)), 0) FROM envelopes WHERE "
                    "group_id=? AND sender=? AND seq<=? AND seq!=?",
                    (group_id, sender, seq, spare)).fetchone()[0]
                c.execute("DELETE FROM envelopes WHERE group_id=? AND sender=? AND seq<=? "
                          "AND seq!=?", (group_id, sender, seq, spare))
            c.executemany("INSERT OR REPLACE INTO compacted VALUES (?,?,?)",
                          [(group_id, s, q) for s, q in covered.items()])
            for sender, seq in covered.items():
                resummarize(c, group_id, sender, seq)
            c.execute("INSERT OR REPLACE INTO compactions VALUES (?,?)", (group_id, point))
            c.execute("UPDATE groups SET bytes_used=bytes_used-? WHERE group_id=?",
                      (freed, group_id))
            return int(freed)

        return int(await self.writer.execute(write))

    async def compaction(self, group_id: bytes) -> bytes | None:
        return self._blob("SELECT point FROM compactions WHERE group_id=?", group_id)
