"""The group-commit writer of the PostgreSQL storage.

The same rule as the SQLite writer (:mod:`~syncnode.storage.sqlite_writer`): nothing is
acknowledged before it is durable, and everything queued while one batch commits goes into the
next, as **one transaction and one WAL flush** (``synchronous_commit`` on, the default).

psycopg 3 has no trio support, so the batch runs on a worker thread (``trio.to_thread``) over
the writer's own connection; the trio side only queues and wakes (the thread hop costs once
per batch, not per write).

**One write fails alone, without savepoints** (a savepoint and its release would be two more
round trips per write, tripling a batch's): every write raises its own errors
(:class:`~syncnode.storage.base.StorageConflict`) before it has written anything, so nothing of
it needs undoing; a database error aborts the whole transaction, which is then rolled back and
run again without that write, which alone fails.

**Several processes, one database.** Every write names the locks it needs (``"g:" + group
id`` for everything of one group, ``"mailbox"``, ``"addresses"``, ``"clock"``); a batch takes
them all first, as transaction-scoped advisory locks in ascending key order
(``sn_lock_all``). So two processes' batches that touch the same group run one after the
other, and never deadlock on row locks taken in opposite orders (a deadlock would cost a
second and fail a whole batch). Writes may queue ``pg_notify`` payloads (:class:`Tx`): they are
sent in the batch's transaction, so other processes hear of a change exactly when it commits.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
import trio

from proto.logs import get_logger
from proto.wakeup import Signal
from syncnode.storage.base import StorageClosed
from syncnode.storage.postgres_schema import lock_key

log = get_logger("syncnode.storage")

RETRIES = 3
"""Times a batch that failed as a whole on a transient error (deadlock, serialization, lost
connection) is run again, on a new connection if needed, before its writes fail."""
TRANSIENT = ("40P01", "40001")


@dataclass
class Tx:
    """What a write sees: the connection (inside the batch transaction) and where to queue
    notifications for the other processes. A write raises only before it wrote anything."""

    conn: psycopg.Connection
    notes: list[str] = field(default_factory=list)

    def notify(self, payload: str) -> None:
        self.notes.append(payload)


WriteOp = Callable[[Tx], Any]


@dataclass
class _Pending:
    op: WriteOp
    locks: tuple[str, ...]
    done: trio.Event = field(default_factory=trio.Event)
    result: Any = None
    error: BaseException | None = None
    failed: bool = False
    """Failed in the database: left out when its batch runs again."""


class _Redo(Exception):
    """A write failed in the database and aborted the batch's transaction."""


class PgWriter:
    """Single writer per process with group commit (see the module doc). Start :meth:`run`
    in a nursery, submit with :meth:`execute`, finish with :meth:`aclose`."""

    def __init__(self, connect: Callable[[], psycopg.Connection], channel: str, *,
                 batching: bool = True, max_batch: int = 4096,
                 on_batch: Callable[[int, float], None] | None = None) -> None:
        self.connect = connect
        self.channel = channel
        self.max_batch = max_batch if batching else 1
        self.on_batch = on_batch
        self._queue: list[_Pending] = []
        self._wake = trio.Event()
        self._closing = False
        self._stopped = trio.Event()
        self._submitted = 0
        self._completed = 0
        self._progress = Signal()
        self._conn: psycopg.Connection | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        self._conn = await trio.to_thread.run_sync(self.connect)
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
                with trio.CancelScope(shield=True):  # a started batch finishes (see SQLite's)
                    started = time.perf_counter()
                    await trio.to_thread.run_sync(self._apply, batch)
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
                    p.error = StorageClosed("syncnode is shutting down")
                    p.done.set()
                self._queue.clear()
                conn, self._conn = self._conn, None
                if conn is not None:
                    await trio.to_thread.run_sync(conn.close)
                self._stopped.set()

    def _apply(self, batch: list[_Pending]) -> None:
        attempt = 0
        while True:
            try:
                self._attempt([p for p in batch if not p.failed])
                return
            except _Redo:
                self._reset()  # one write failed in the database: again without it
            except psycopg.Error as exc:
                transient = (isinstance(exc, psycopg.OperationalError)
                             or exc.sqlstate in TRANSIENT)
                log.warning("write batch failed", size=len(batch), error=str(exc).strip(),
                            attempt=attempt, retrying=transient and attempt < RETRIES)
                self._reset()
                if not transient or attempt == RETRIES:
                    for p in batch:
                        p.result, p.error = None, exc
                    return
                attempt += 1
                time.sleep(0.05 * attempt)

    def _reset(self) -> None:
        conn = self._conn
        try:
            if conn is not None and not conn.closed:
                conn.execute("ROLLBACK")
                return
        except psycopg.Error:
            pass
        if conn is not None:
            conn.close()
        self._conn = None

    def _attempt(self, batch: list[_Pending]) -> None:
        if self._conn is None or self._conn.closed:
            self._conn = self.connect()
        conn = self._conn
        notes: list[str] = []
        conn.execute("BEGIN")
        keys = sorted({lock_key(name) for p in batch for name in p.locks})
        if keys:
            conn.execute("SELECT sn_lock_all(%s)", (keys,))
        for p in batch:
            tx = Tx(conn)
            try:
                p.result, p.error = p.op(tx), None
                notes.extend(tx.notes)
            except psycopg.OperationalError:
                raise  # the connection is gone: the whole batch is retried
            except psycopg.Error as exc:  # the transaction is aborted: redo without this one
                p.result, p.error, p.failed = None, exc, True
                raise _Redo from exc
            except Exception as exc:  # raised before it wrote anything (see the module doc)
                p.result, p.error = None, exc
        if notes:
            conn.execute("SELECT pg_notify(%s, n) FROM unnest(%s::text[]) n",
                         (self.channel, notes))
        conn.execute("COMMIT")  # synchronous_commit: the WAL is flushed before this returns

    async def execute(self, op: WriteOp, *locks: str) -> Any:
        """Queue ``op`` (holding ``locks``) and return its result once its batch is durable
        (or raise its error). Shielded once queued, as in the SQLite writer."""
        if self._closing:
            raise StorageClosed("syncnode is shutting down")
        p = _Pending(op, locks)
        self._queue.append(p)
        self._submitted += 1
        self._wake.set()
        with trio.CancelScope(shield=True):
            await p.done.wait()
        if p.error is not None:
            raise p.error
        return p.result

    async def barrier(self) -> None:
        """Wait until every write submitted so far is durable (or the writer stopped)."""
        target = self._submitted
        while self._completed < target and not self._stopped.is_set():
            await self._progress.wait()

    async def aclose(self) -> None:
        self._closing = True
        self._wake.set()
        await self._stopped.wait()
