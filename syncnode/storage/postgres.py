"""The PostgreSQL implementation of :class:`~syncnode.storage.base.Storage` (the server
database), selected by ``storage = "postgresql://..."`` in ``syncnode.toml`` or ``--database``.

Several ``syncnode run`` processes of one node may use one database at once (a
:class:`~syncnode.storage.base.SharedStorage`): each has its own group-commit writer
(:mod:`.postgres_writer`), its own read pool and its own LISTEN connection
(:mod:`.postgres_listen`), and the database is what makes them one node (see
``README.md``, "Several processes, one node").

**Threads.** psycopg 3 has no trio support. Writes go to the writer, which hops to a worker
thread once per batch. Reads borrow a connection from a ``psycopg_pool.ConnectionPool`` on a
worker thread (``trio.to_thread.run_sync``) under a :class:`trio.CapacityLimiter` of the pool's
size, so a burst of reads waits in trio, not in the pool: a read costs a thread hop plus a
round trip (``scripts/bench_postgres.py`` measures it) where SQLite answers on the trio thread.
Reads run in autocommit: each sees what was committed when it started.

**Statements** are the SQLite ones in PostgreSQL's dialect; the mailbox, compaction and
address record statements are in :mod:`.postgres_misc`, the schema and its migrations in
:mod:`.postgres_schema`.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
import trio
from psycopg_pool import ConnectionPool

from proto import entropy
from syncnode.storage.base import (
    BatchHook,
    Change,
    DecidedRecord,
    GroupRecord,
    HostingRecord,
    StorageConflict,
)
from syncnode.storage.postgres_envelopes import EnvelopeSql
from syncnode.storage.postgres_listen import Listener, encode_change
from syncnode.storage.postgres_misc import MiscSql
from syncnode.storage.postgres_schema import migrate
from syncnode.storage.postgres_writer import PgWriter, Tx

GROUP_TABLES = ("decided", "manifests", "acceptor", "envelopes", "envelope_senders",
                "equivocations", "hosting", "compactions", "compacted")
SIZE_REFRESH = 30.0
"""Seconds between refreshes of :meth:`PostgresStorage.size_bytes` (a catalog query)."""


class PostgresStorage(EnvelopeSql, MiscSql):
    """A syncnode's data in a PostgreSQL database (``dsn``: a ``postgresql://`` URL or a
    libpq connection string; a ``search_path`` in its options picks the schema)."""

    shared = True

    def __init__(self, dsn: str, *, batching: bool = True, pool_size: int = 8) -> None:
        self.dsn = dsn
        self.origin = entropy.token_bytes(8).hex()
        self.on_change: Callable[[Change], None] | None = None
        self.channel = "syncnode"  # until run() knows the schema
        self.pool_size = pool_size
        self.limiter = trio.CapacityLimiter(pool_size)
        self.pool: ConnectionPool | None = None
        self.writer = PgWriter(self._connect, self.channel, batching=batching)
        self._listener: Listener | None = None
        self._size = 0
        self._stamp_lock = threading.Lock()
        self._stamp_queue: list[Any] = []
        self._stamp_queued = False

    def _connect(self) -> psycopg.Connection:
        return psycopg.connect(self.dsn, autocommit=True)

    @property
    def on_batch(self) -> BatchHook | None:
        return self.writer.on_batch

    @on_batch.setter
    def on_batch(self, hook: BatchHook | None) -> None:
        self.writer.on_batch = hook

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        await trio.to_thread.run_sync(self._prepare)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self._listener_run)
                await nursery.start(self.writer.run)
                nursery.start_soon(self._size_loop)
                task_status.started()
                await self.writer._stopped.wait()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self._close_pool()

    def _prepare(self) -> None:
        """Migrate, learn the schema (it names the notification channel), open the pool."""
        with self._connect() as conn:
            migrate(conn)
            row = conn.execute("SELECT current_schema()").fetchone()
            schema = row[0] if row else "public"
        self.channel = "syncnode_" + hashlib.blake2b(schema.encode(), digest_size=8).hexdigest()
        self.writer.channel = self.channel
        self.pool = ConnectionPool(self.dsn, min_size=1, max_size=self.pool_size,
                                   kwargs={"autocommit": True}, open=False)
        self.pool.open(wait=True, timeout=30.0)
        self._size = self._measure()

    async def _listener_run(self, *, task_status: trio.TaskStatus[None]) -> None:
        self._listener = Listener(self._connect, self.channel, self.origin, self._heard)
        await self._listener.run(task_status=task_status)

    def _heard(self, change: Change) -> None:
        if self.on_change is not None:
            self.on_change(change)

    async def _size_loop(self) -> None:
        while True:
            await trio.sleep(SIZE_REFRESH)
            self._size = await self._read(lambda c: self._measure(c))

    def _measure(self, conn: psycopg.Connection | None = None) -> int:
        sql = ("SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c JOIN "
               "pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = current_schema() "
               "AND c.relkind = 'r'")
        if conn is not None:
            row = conn.execute(sql).fetchone()
        else:
            with self._connect() as own:
                row = own.execute(sql).fetchone()
        return int(row[0]) if row else 0

    async def _close_pool(self) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            await trio.to_thread.run_sync(pool.close)

    async def aclose(self) -> None:
        await self.writer.aclose()
        await self._close_pool()

    async def barrier(self) -> None:
        await self.writer.barrier()

    def size_bytes(self) -> int:
        return self._size

    # -- reads and writes ---------------------------------------------------------------------

    async def _read(self, fn: Callable[[psycopg.Connection], Any]) -> Any:
        def go() -> Any:
            pool = self.pool
            if pool is None:
                raise RuntimeError("the storage is not running")
            try:
                with pool.connection() as conn:
                    return fn(conn)
            except psycopg.OperationalError:
                # Idle connections die with a server restart or failover: drop every broken
                # one and read again once (a read may be repeated).
                pool.check()
                with pool.connection() as conn:
                    return fn(conn)

        return await trio.to_thread.run_sync(go, limiter=self.limiter)

    async def _rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = await self._read(
            lambda c: c.execute(sql, args).fetchall())  # type: ignore[arg-type]
        return rows

    async def _one(self, sql: str, *args: Any) -> tuple[Any, ...] | None:
        rows = await self._rows(sql, *args)
        return rows[0] if rows else None

    async def _blob(self, sql: str, *args: Any) -> bytes | None:
        row = await self._one(sql, *args)
        return None if row is None else bytes(row[0])

    async def _write(self, op: Callable[[Tx], Any], *locks: str) -> Any:
        return await self.writer.execute(op, *locks)

    def _note(self, tx: Tx, kind: str, group_id: bytes, key: bytes = b"", number: int = 0,
              size: int = 0) -> None:
        tx.notify(encode_change(self.origin, Change(kind, group_id, key, number, size)))

    # -- groups ---------------------------------------------------------------------------------

    def _insert_group(self, tx: Tx, group_id: bytes, creator: bytes, genesis: bytes,
                      created_at: float) -> bool:
        """Insert the group and its genesis; False if it exists with this genesis."""
        prior = tx.conn.execute("SELECT value FROM decided WHERE group_id=%s AND slot=0",
                                (group_id,)).fetchone()
        if prior is not None:
            if bytes(prior[0]) != genesis:
                raise StorageConflict("a different group has this id")
            return False
        tx.conn.execute("INSERT INTO groups VALUES (%s,%s,0,%s,%s)",
                        (group_id, creator, len(genesis), created_at))
        tx.conn.execute("INSERT INTO decided VALUES (%s,0,%s,NULL)", (group_id, genesis))
        self._note(tx, "group", group_id)
        return True

    async def create_group(self, group_id: bytes, creator: bytes, genesis: bytes,
                           created_at: float) -> bool:
        return bool(await self._write(
            lambda tx: self._insert_group(tx, group_id, creator, genesis, created_at),
            _g(group_id)))

    async def group(self, group_id: bytes) -> GroupRecord | None:
        row = await self._one("SELECT creator, top_slot, bytes_used FROM groups WHERE "
                              "group_id=%s", group_id)
        return None if row is None else GroupRecord(bytes(row[0]), row[1], row[2])

    async def group_count(self) -> int:
        row = await self._one("SELECT count(*) FROM groups")
        return int(row[0]) if row else 0

    async def group_count_by_creator(self, creator: bytes) -> int:
        row = await self._one("SELECT count(*) FROM groups WHERE creator=%s", creator)
        return int(row[0]) if row else 0

    async def group_ids(self, after: bytes = b"", limit: int = 1000) -> list[bytes]:
        return [bytes(r[0]) for r in await self._rows(
            "SELECT group_id FROM groups WHERE group_id>%s ORDER BY group_id LIMIT %s",
            after, limit)]

    async def delete_group(self, group_id: bytes) -> bool:
        def write(tx: Tx) -> bool:
            for table in GROUP_TABLES:
                tx.conn.execute(f"DELETE FROM {table} WHERE group_id=%s",  # type: ignore
                                (group_id,))
            gone = tx.conn.execute("DELETE FROM groups WHERE group_id=%s", (group_id,))
            self._note(tx, "group", group_id)
            return gone.rowcount == 1

        return bool(await self._write(write, _g(group_id)))

    # -- hosting --------------------------------------------------------------------------------

    async def adopt_group(self, group_id: bytes, creator: bytes, genesis: bytes,
                          created_at: float, *, named_slot: int, adoption: bytes) -> bool:
        def write(tx: Tx) -> bool:
            if not self._insert_group(tx, group_id, creator, genesis, created_at):
                tx.conn.execute("UPDATE hosting SET named_slot=%s, adoption=%s WHERE "
                                "group_id=%s AND named_slot IS NOT NULL AND NOT serving",
                                (named_slot, adoption, group_id))
                self._note(tx, "group", group_id)
                return False
            tx.conn.execute("INSERT INTO hosting VALUES (%s,%s,%s,false,false,NULL,NULL) "
                            "ON CONFLICT (group_id) DO UPDATE SET named_slot=excluded.named_slot,"
                            " adoption=excluded.adoption, serving=false, history_complete=false,"
                            " removed_slot=NULL, removed_at=NULL",
                            (group_id, named_slot, adoption))
            return True

        return bool(await self._write(write, _g(group_id)))

    async def hosting(self, group_id: bytes) -> HostingRecord | None:
        row = await self._one("SELECT named_slot, adoption, serving, history_complete, "
                              "removed_slot, removed_at FROM hosting WHERE group_id=%s", group_id)
        return None if row is None else _hosting(row)

    async def put_hosting(self, group_id: bytes, record: HostingRecord) -> None:
        def write(tx: Tx) -> None:
            if tx.conn.execute("SELECT 1 FROM groups WHERE group_id=%s",
                               (group_id,)).fetchone() is None:
                raise StorageConflict("the group is not hosted")
            tx.conn.execute(
                "INSERT INTO hosting VALUES (%s,%s,%s,%s,%s,%s,%s) ON CONFLICT (group_id) DO "
                "UPDATE SET named_slot=excluded.named_slot, adoption=excluded.adoption, "
                "serving=excluded.serving, history_complete=excluded.history_complete, "
                "removed_slot=excluded.removed_slot, removed_at=excluded.removed_at",
                (group_id, record.named_slot, record.adoption, record.serving,
                 record.history_complete, record.removed_slot, record.removed_at))
            self._note(tx, "group", group_id)

        await self._write(write, _g(group_id))

    async def hosting_records(self, after: bytes = b"", limit: int = 1000
                              ) -> list[tuple[bytes, HostingRecord]]:
        return [(bytes(row[0]), _hosting(row[1:])) for row in await self._rows(
            "SELECT group_id, named_slot, adoption, serving, history_complete, removed_slot, "
            "removed_at FROM hosting WHERE group_id>%s ORDER BY group_id LIMIT %s",
            after, limit)]

    # -- decided log and manifests --------------------------------------------------------------

    async def append_decided(self, group_id: bytes, slot: int, value: bytes, certificate: bytes,
                             manifest: bytes) -> None:
        def write(tx: Tx) -> None:
            moved = tx.conn.execute("UPDATE groups SET top_slot=%s, bytes_used=bytes_used+%s "
                                    "WHERE group_id=%s AND top_slot=%s",
                                    (slot, len(value), group_id, slot - 1)).rowcount
            if moved != 1:
                raise StorageConflict(f"slot {slot} is not the next slot of a hosted group")
            tx.conn.execute("INSERT INTO decided VALUES (%s,%s,%s,%s)",
                            (group_id, slot, value, certificate))
            tx.conn.execute("INSERT INTO manifests VALUES (%s,%s,%s) ON CONFLICT (group_id, "
                            "epoch) DO UPDATE SET manifest=excluded.manifest",
                            (group_id, slot, manifest))
            self._note(tx, "decided", group_id, number=slot, size=len(value))

        await self._write(write, _g(group_id))

    async def decided(self, group_id: bytes, slot: int) -> DecidedRecord | None:
        row = await self._one("SELECT value, certificate FROM decided WHERE group_id=%s AND "
                              "slot=%s", group_id, slot)
        return None if row is None else DecidedRecord(bytes(row[0]), _b(row[1]))

    async def decided_range(self, group_id: bytes, first: int, last: int, *, limit: int,
                            max_bytes: int) -> list[tuple[int, DecidedRecord]]:
        out: list[tuple[int, DecidedRecord]] = []
        budget = max_bytes
        for slot, value, cert in await self._rows(
                "SELECT slot, value, certificate FROM decided WHERE group_id=%s AND slot>=%s "
                "AND slot>0 AND slot<=%s ORDER BY slot LIMIT %s",
                group_id, first, last, limit):
            budget -= len(value)
            if out and budget < 0:
                break
            out.append((slot, DecidedRecord(bytes(value), _b(cert))))
        return out

    async def manifest(self, group_id: bytes, epoch: int) -> bytes | None:
        return await self._blob("SELECT manifest FROM manifests WHERE group_id=%s AND epoch=%s",
                                group_id, epoch)

    # -- Paxos acceptor -------------------------------------------------------------------------

    async def acceptor_record(self, group_id: bytes, slot: int) -> bytes | None:
        return await self._blob("SELECT record FROM acceptor WHERE group_id=%s AND slot=%s",
                                group_id, slot)

    async def put_acceptor_records(self, records: Sequence[tuple[bytes, int, bytes]]) -> None:
        rows = [(g, s, r, _hash(r)) for g, s, r in records]

        def write(tx: Tx) -> None:
            with tx.conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO acceptor VALUES (%s,%s,%s,%s) ON CONFLICT (group_id, slot) DO "
                    "UPDATE SET record=excluded.record, record_hash=excluded.record_hash", rows)

        await self._write(write, *{_g(g) for g, _, _ in records})

    async def put_acceptor_record_if(self, group_id: bytes, slot: int, expected: bytes | None,
                                     record: bytes) -> bool:
        # Decided under the group's lock, in the batch's transaction: of two processes' steps
        # taken on one state, the first to commit is kept and the other sees False.
        def write(tx: Tx) -> bool:
            if expected is None:
                return tx.conn.execute(
                    "INSERT INTO acceptor VALUES (%s,%s,%s,%s) ON CONFLICT DO NOTHING",
                    (group_id, slot, record, _hash(record))).rowcount == 1
            return tx.conn.execute(
                "UPDATE acceptor SET record=%s, record_hash=%s WHERE group_id=%s AND slot=%s "
                "AND record_hash=%s",
                (record, _hash(record), group_id, slot, _hash(expected))).rowcount == 1

        return bool(await self._write(write, _g(group_id)))


def _g(group_id: bytes) -> str:
    return "g:" + group_id.hex()


def _b(value: Any) -> bytes | None:
    return None if value is None else bytes(value)


def _hash(record: bytes) -> bytes:
    return hashlib.blake2b(record, digest_size=32).digest()


def _hosting(row: Sequence[Any]) -> HostingRecord:
    named_slot, adoption, serving, complete, removed_slot, removed_at = row
    return HostingRecord(named_slot, _b(adoption), bool(serving), bool(complete), removed_slot,
                         removed_at)
