"""The group-commit writer of the SQLite storage.

Durability rule: nothing is acknowledged before it is on disk. All writes go through one
:class:`Writer` task that takes everything queued by every connection, applies it in **one
transaction with one fsync** (WAL, ``synchronous=FULL``), and only then wakes the requests of
that batch. Under load a batch holds many writes, so the fsync cost is shared (group commit); a
lone write still commits at once. Each write runs in its own savepoint, so one failing write
never takes the rest of its batch down. A write may ask to learn its outcome early
(``staged``): once its statements ran, while the commit and its fsync are still going on.

``threads=False`` commits on the trio thread instead of a worker thread. The deterministic
simulator needs that: a worker thread finishes at a real time the mock clock knows nothing of.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from proto.logs import get_logger
from proto.wakeup import Signal
from syncnode.storage.base import StorageClosed
from syncnode.storage.sqlite_schema import connect

log = get_logger("syncnode.storage")

WriteOp = Callable[[sqlite3.Connection], Any]
"""A write: runs inside the batch transaction (in its own savepoint) on the writer thread."""


@dataclass
class _Pending:
    op: WriteOp
    staged: Callable[[Any], None] | None = None
    done: trio.Event = field(default_factory=trio.Event)
    result: Any = None
    error: BaseException | None = None


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
        self._token: trio.lowlevel.TrioToken | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        self._conn = connect(self.path)
        self._token = trio.lowlevel.current_trio_token()
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
                    p.error = StorageClosed("syncnode is shutting down")
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
                else:
                    if p.staged is not None:
                        self._stage(p.staged, p.result)
            conn.execute("COMMIT")  # synchronous=FULL: fsync before this returns
        except sqlite3.Error as exc:
            log.error("write batch failed", size=len(batch), error=str(exc))
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            for p in batch:
                p.result, p.error = None, exc

    def _stage(self, staged: Callable[[Any], None], result: Any) -> None:
        """Hand a write's outcome to ``staged`` on the event loop while its batch commits."""
        def call() -> None:
            try:
                staged(result)
            except Exception as exc:  # a push failing must not stop the writer
                log.error("staged callback failed", error=repr(exc))

        if self.threads:
            assert self._token is not None
            self._token.run_sync_soon(call)
        else:
            call()

    async def execute(self, op: WriteOp, *, staged: Callable[[Any], None] | None = None
                      ) -> Any:
        """Queue ``op`` and return its result once its batch is durable (or raise its error).

        ``staged(result)`` is called on the event loop as soon as ``op`` ran inside the batch
        transaction and succeeded, while the batch still commits: before the write is durable
        (it may yet be lost with a crash or a failing commit). For work that may run ahead of
        durability, like pushing a new envelope to subscribers (:mod:`syncnode.envelopes`)."""
        if self._closing:
            raise StorageClosed("syncnode is shutting down")
        p = _Pending(op, staged)
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
