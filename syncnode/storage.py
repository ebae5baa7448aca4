"""The syncnode's SQLite store: schema, reads, and the group-commit writer.

Durability rule: nothing is acknowledged before it is on disk. All writes go through one
:class:`Writer` task that takes everything queued by every connection, applies it in **one
transaction with one fsync** (WAL, ``synchronous=FULL``), and only then wakes the requests of
that batch. Under load a batch holds many writes, so the fsync cost is shared (group commit); a
lone write still commits at once. Each write runs in its own savepoint, so one failing write
never takes the rest of its batch down.

Reads use a separate connection on the trio thread; WAL lets them proceed while the writer
commits, and they only ever see committed (durable) data.

``threads=False`` commits on the trio thread instead of a worker thread. The deterministic
simulator needs that: a worker thread finishes at a real time the mock clock knows nothing of.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from proto.logs import get_logger
from proto.wakeup import Signal

log = get_logger("syncnode.storage")

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS groups (
    group_id BLOB PRIMARY KEY,
    creator BLOB NOT NULL,          -- fingerprint of the genesis signer (quota accounting)
    top_slot INTEGER NOT NULL,      -- highest decided slot (0: only genesis)
    bytes_used INTEGER NOT NULL,    -- stored log values + envelopes (quota accounting)
    created_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS groups_creator ON groups (creator);
CREATE TABLE IF NOT EXISTS manifests (   -- manifest of each epoch, from the decided log
    group_id BLOB NOT NULL, epoch INTEGER NOT NULL, manifest BLOB NOT NULL,
    PRIMARY KEY (group_id, epoch)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS decided (     -- slot -> value + certificate (NULL for genesis)
    group_id BLOB NOT NULL, slot INTEGER NOT NULL, value BLOB NOT NULL, certificate BLOB,
    PRIMARY KEY (group_id, slot)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS acceptor (    -- Paxos acceptor state per (group, slot)
    group_id BLOB NOT NULL, slot INTEGER NOT NULL, record BLOB NOT NULL,
    PRIMARY KEY (group_id, slot)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS envelopes (
    group_id BLOB NOT NULL, sender BLOB NOT NULL, seq INTEGER NOT NULL,
    digest BLOB NOT NULL, envelope BLOB NOT NULL,
    PRIMARY KEY (group_id, sender, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS mailbox (
    item_id INTEGER PRIMARY KEY AUTOINCREMENT,
    recipient BLOB NOT NULL, kind INTEGER NOT NULL, payload BLOB NOT NULL,
    expires_at INTEGER NOT NULL,
    sender BLOB NOT NULL DEFAULT X'',  -- member key fingerprint, or a join request's endpoint
    size INTEGER NOT NULL DEFAULT 0    -- bytes counted against the quotas (MAILBOX_SCHEMA)
);
CREATE INDEX IF NOT EXISTS mailbox_recipient ON mailbox (recipient, item_id);
CREATE TABLE IF NOT EXISTS address_records ( -- newest signed address record per syncnode
    node_id BLOB PRIMARY KEY, issued_at INTEGER NOT NULL, record BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS equivocations (
    group_id BLOB NOT NULL, slot INTEGER NOT NULL, proof BLOB NOT NULL,
    PRIMARY KEY (group_id, slot)
) WITHOUT ROWID;
"""

MAILBOX_ITEM_OVERHEAD = 256
"""Bytes every mailbox item counts beyond its payload (row, indexes): tiny items are not free."""
MAILBOX_SCHEMA = """
CREATE INDEX IF NOT EXISTS mailbox_kind ON mailbox (kind, item_id);
CREATE INDEX IF NOT EXISTS mailbox_expiry ON mailbox (expires_at);
-- Live mailbox use per sender and per class (X'6a': join requests, X'6d': the rest), kept
-- exact by the triggers whatever deletes an item (ack, expiry, eviction).
CREATE TABLE IF NOT EXISTS mailbox_usage (
    who BLOB PRIMARY KEY, bytes INTEGER NOT NULL, items INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS mailbox_usage_in AFTER INSERT ON mailbox BEGIN
    INSERT INTO mailbox_usage VALUES (NEW.sender, NEW.size, 1) ON CONFLICT (who)
        DO UPDATE SET bytes = bytes + excluded.bytes, items = items + 1;
    INSERT INTO mailbox_usage VALUES (CASE WHEN NEW.kind = 1 THEN X'6a' ELSE X'6d' END,
                                      NEW.size, 1) ON CONFLICT (who)
        DO UPDATE SET bytes = bytes + excluded.bytes, items = items + 1;
END;
CREATE TRIGGER IF NOT EXISTS mailbox_usage_out AFTER DELETE ON mailbox BEGIN
    UPDATE mailbox_usage SET bytes = bytes - OLD.size, items = items - 1
        WHERE who IN (OLD.sender, CASE WHEN OLD.kind = 1 THEN X'6a' ELSE X'6d' END);
    DELETE FROM mailbox_usage WHERE who = OLD.sender AND items <= 0;
END;
"""


def _migrate_mailbox(conn: sqlite3.Connection) -> None:
    """Bring the mailbox of a database made by an older syncnode up to date: sender and size
    columns, the usage table (filled from the items already there) and its triggers. Additive,
    so the schema version stays: an older syncnode still runs on the result (what it puts
    then counts 0 bytes until it expires)."""
    columns = {r[1] for r in conn.execute("PRAGMA table_info(mailbox)")}
    fresh = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND "
                         "name='mailbox_usage'").fetchone() is None
    script = ["BEGIN IMMEDIATE;"]
    if "sender" not in columns:
        script.append("ALTER TABLE mailbox ADD COLUMN sender BLOB NOT NULL DEFAULT X'';")
    if "size" not in columns:
        script.append("ALTER TABLE mailbox ADD COLUMN size INTEGER NOT NULL DEFAULT 0;")
    script.append(MAILBOX_SCHEMA)
    if fresh:  # items an older syncnode stored count their payload from now on
        script.append(f"""
            UPDATE mailbox SET size = length(payload) + {MAILBOX_ITEM_OVERHEAD};
            DELETE FROM mailbox_usage;
            INSERT INTO mailbox_usage SELECT sender, sum(size), count(*) FROM mailbox
                GROUP BY sender;
            INSERT INTO mailbox_usage SELECT CASE WHEN kind = 1 THEN X'6a' ELSE X'6d' END
                AS who, sum(size), count(*) FROM mailbox GROUP BY who;""")
    script.append("COMMIT;")
    try:
        conn.executescript("\n".join(script))
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


WriteOp = Callable[[sqlite3.Connection], Any]
"""A write: runs inside the batch transaction (in its own savepoint) on the writer thread."""


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None,
                               check_same_thread=False)
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


def open_database(path: Path) -> sqlite3.Connection:
    """Create or open the database, check its schema version, return a read connection."""
    conn = connect(path)
    conn.executescript(SCHEMA)
    _migrate_mailbox(conn)
    row = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
    if row is None:
        conn.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
    elif int(row[0]) != SCHEMA_VERSION:
        raise RuntimeError(f"{path}: schema version {row[0]}, this syncnode needs "
                           f"{SCHEMA_VERSION}")
    check = conn.execute("PRAGMA quick_check").fetchone()[0]
    if check != "ok":
        raise RuntimeError(f"{path}: database integrity check failed: {check}")
    return conn


def storage_bytes(path: Path) -> int:
    """Bytes the database occupies on disk (main file + WAL)."""
    total = 0
    for p in (path, path.with_name(path.name + "-wal")):
        try:
            total += p.stat().st_size
        except FileNotFoundError:
            pass
    return total


@dataclass
class _Pending:
    op: WriteOp
    done: trio.Event = field(default_factory=trio.Event)
    result: Any = None
    error: BaseException | None = None


class WriterClosed(Exception):
    """The writer is shutting down and takes no new writes."""


class Writer:
    """Single writer with group commit. Start :meth:`run` in a nursery, submit with
    :meth:`execute`, finish with :meth:`aclose` (drains the queue, then closes)."""

    def __init__(self, path: Path, *, batching: bool = True, max_batch: int = 4096,
                 on_batch: Callable[[int, float], None] | None = None,
                 threads: bool = True) -> None:
        self.path = path
        self.threads = threads
        self.batching = batching
        self.max_batch = max_batch if batching else 1
        self.on_batch = on_batch
        self._queue: list[_Pending] = []
        self._wake = trio.Event()
        self._closing = False
        self._stopped = trio.Event()
        self._submitted = 0
        self._completed = 0
        self._progress = Signal()
        self._conn: sqlite3.Connection | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        self._conn = connect(self.path)
        task_status.started()
        try:
            while True:
                if not self._queue:
                    if self._closing:
                        break
                    self._wake = trio.Event()
                    await self._wake.wait()
                    continue
                batch = self._queue[:self.max_batch]
                del self._queue[:len(batch)]
                # Shielded: a batch that started must finish, or its callers would never know
                # whether their writes are durable.
                with trio.CancelScope(shield=True):
                    started = time.perf_counter()
                    await self._run_sync(self._apply, batch)
                    elapsed = time.perf_counter() - started
                self._completed += len(batch)
                for p in batch:
                    p.done.set()
                self._progress.fire()
                if self.on_batch:
                    self.on_batch(len(batch), elapsed)
        finally:
            with trio.CancelScope(shield=True):
                for p in self._queue:
                    p.error = WriterClosed("syncnode is shutting down")
                    p.done.set()
                self._queue.clear()
                conn, self._conn = self._conn, None
                if conn is not None:
                    await self._run_sync(conn.close)
                self._stopped.set()

    async def _run_sync(self, fn: Callable[..., Any], *args: Any) -> None:
        if self.threads:
            await trio.to_thread.run_sync(fn, *args)
        else:
            fn(*args)
            await trio.lowlevel.checkpoint()

    def _apply(self, batch: list[_Pending]) -> None:
        conn = self._conn
        assert conn is not None
        try:
            conn.execute("BEGIN IMMEDIATE")
            for i, p in enumerate(batch):
                conn.execute(f"SAVEPOINT w{i}")
                try:
                    p.result = p.op(conn)
                    conn.execute(f"RELEASE w{i}")
                except Exception as exc:  # one bad write fails alone
                    conn.execute(f"ROLLBACK TO w{i}")
                    conn.execute(f"RELEASE w{i}")
                    p.error = exc
            conn.execute("COMMIT")  # synchronous=FULL: fsync before this returns
        except sqlite3.Error as exc:
            log.error("write batch failed", size=len(batch), error=str(exc))
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            for p in batch:
                p.result, p.error = None, exc

    async def execute(self, op: WriteOp) -> Any:
        """Queue ``op`` and return its result once its batch is durable (or raise its error)."""
        if self._closing:
            raise WriterClosed("syncnode is shutting down")
        p = _Pending(op)
        self._queue.append(p)
        self._submitted += 1
        self._wake.set()
        # Shielded: once queued, the write happens whether or not our caller is cancelled (a
        # connection dropping mid-request), and the caller's in-memory update that follows
        # must happen with it, or memory and disk disagree (found by the simulator: a learned
        # decision on disk but not in the group's top slot, so the next learn of that slot
        # failed its INSERT). The wait is one batch at most.
        with trio.CancelScope(shield=True):
            await p.done.wait()
        if p.error is not None:
            raise p.error
        return p.result

    async def barrier(self) -> None:
        """Wait until every write submitted so far is durable. A reply that depends on state
        another request just changed (in memory) waits here before it leaves."""
        target = self._submitted
        while self._completed < target and not self._stopped.is_set():
            await self._progress.wait()

    async def aclose(self) -> None:
        """Take no new writes, finish the queued ones, close the connection."""
        self._closing = True
        self._wake.set()
        await self._stopped.wait()


# -- read helpers ---------------------------------------------------------------------------


def rows(conn: sqlite3.Connection, sql: str, *args: Any) -> Iterator[tuple[Any, ...]]:
    yield from conn.execute(sql, args)


def one(conn: sqlite3.Connection, sql: str, *args: Any) -> tuple[Any, ...] | None:
    row: tuple[Any, ...] | None = conn.execute(sql, args).fetchone()
    return row

