"""The PostgreSQL statements of envelopes (store, backfill, marks, summaries), mixed into
:class:`~syncnode.storage.postgres.PostgresStorage`. A store is one call of the server-side
function ``sn_store_envelope`` (:mod:`.postgres_schema`), under its group's lock."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import psycopg

from syncnode.storage.base import SenderSummary, StorageConflict, digest_term
from syncnode.storage.postgres_writer import Tx


class EnvelopeSql:
    """Mixed into PostgresStorage, which provides these."""

    _rows: Callable[..., Any]
    _one: Callable[..., Any]
    _write: Callable[..., Any]
    _note: Callable[..., None]
    _read: Callable[..., Any]


    async def store_envelope(self, group_id: bytes, sender: bytes, seq: int, digest: bytes,
                             envelope: bytes, *, staged: Callable[[], None] | None = None
                             ) -> bool:
        def write(tx: Tx) -> bool:
            row = tx.conn.execute("SELECT sn_store_envelope(%s,%s,%s,%s,%s,%s)",
                                  (group_id, sender, seq, digest, envelope,
                                   digest_term(digest))).fetchone()
            outcome = row[0] if row else -1
            if outcome < 0:
                raise StorageConflict(f"sender already stored a different seq {seq}")
            if outcome:
                self._note(tx, "envelope", group_id, sender, seq, len(envelope))
            return outcome == 1

        new = bool(await self._write(write, "g:" + group_id.hex()))
        if new and staged is not None:  # after the commit: this writer hands nothing on earlier
            staged()
        return new

    async def envelopes_after(self, group_id: bytes, watermarks: Mapping[bytes, int], *,
                              limit: int, max_bytes: int) -> tuple[list[bytes], bool]:
        marks = dict(watermarks)

        def read(c: psycopg.Connection) -> tuple[list[bytes], bool]:
            out: list[bytes] = []
            budget = max_bytes
            senders = [bytes(r[0]) for r in c.execute(
                "SELECT sender FROM envelope_senders WHERE group_id=%s AND count>0 "
                "ORDER BY sender", (group_id,))]
            for sender in senders:
                for (raw,) in c.execute(
                        "SELECT envelope FROM envelopes WHERE group_id=%s AND sender=%s AND "
                        "seq>%s ORDER BY seq LIMIT %s",
                        (group_id, sender, marks.get(sender, 0), limit - len(out) + 1)):
                    if len(out) >= limit or (out and budget - len(raw) < 0):
                        return out, True
                    budget -= len(raw)
                    out.append(bytes(raw))
            return out, False

        result: tuple[list[bytes], bool] = await self._read(read)
        return result

    async def envelope_marks(self, group_id: bytes) -> dict[bytes, int]:
        return {bytes(s): q for s, q in await self._rows(
            "SELECT sender, contiguous FROM envelope_senders WHERE group_id=%s AND "
            "contiguous>0", group_id)}

    async def envelope_summary(self, group_id: bytes) -> dict[bytes, SenderSummary]:
        return {bytes(row[0]): SenderSummary(*row[1:]) for row in await self._rows(
            "SELECT sender, count, top, contiguous, setsum FROM envelope_senders WHERE "
            "group_id=%s", group_id)}

    async def envelope_count(self, group_id: bytes) -> int:
        row = await self._one("SELECT count(*) FROM envelopes WHERE group_id=%s", group_id)
        return int(row[0]) if row else 0

    async def envelope_digests(self, group_id: bytes, keys: Sequence[tuple[bytes, int]]
                               ) -> dict[tuple[bytes, int], bytes]:
        if not keys:
            return {}
        senders, seqs = [k[0] for k in keys], [k[1] for k in keys]
        return {(bytes(s), q): bytes(d) for s, q, d in await self._rows(
            "SELECT e.sender, e.seq, e.digest FROM envelopes e JOIN unnest(%s::bytea[], "
            "%s::bigint[]) k(sender, seq) ON e.sender=k.sender AND e.seq=k.seq WHERE "
            "e.group_id=%s", senders, seqs, group_id)}

    async def envelope(self, group_id: bytes, sender: bytes, seq: int
                       ) -> tuple[bytes, bytes] | None:
        row = await self._one("SELECT digest, envelope FROM envelopes WHERE group_id=%s AND "
                              "sender=%s AND seq=%s", group_id, sender, seq)
        return None if row is None else (bytes(row[0]), bytes(row[1]))

