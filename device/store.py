"""The device's local store: one SQLite database per device (WAL, ``synchronous=FULL``).

It holds the identity keys, MLS group state (written by the binding through
:class:`device.mls.SqliteGroupStorage`), each document's decided log with certificates, CRDT
state (a snapshot plus the updates applied since), local edits not yet sent, the outbox of
sealed envelopes until a quorum of syncnodes acknowledged them, decrypted payloads waiting for
their causal dependencies, open invites (and the seats of documents made from a group), the
documents offered to this device through a group, and alarms.

Crash rule: each engine step (flush an edit, apply received messages, apply a decision) runs in
**one transaction** that also writes the MLS state it changed, so after a crash the database
is at a step boundary: never a ciphertext in the outbox whose ratchet state was not saved,
never a delivered update that is not in the CRDT state. Steps that other devices or the
syncnodes can redo (received messages, acks) commit without an fsync; a seal too, but nothing
it encrypted leaves before :meth:`Store.sync` put it on disk. Received steps may even wait for
the next transaction (:mod:`device.receive_journal`), which writes them first.

The device directory is private to its owner (0700, files 0600, see :func:`private_home`): the
database holds the keys that let anyone who reads them act as this device.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio

from proto.errors import SyncnodeError
from proto.logs import get_logger

log = get_logger("device.store")

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    group_id BLOB PRIMARY KEY,
    name TEXT NOT NULL,
    crdt TEXT NOT NULL,
    peer_id INTEGER NOT NULL,        -- this device's CRDT peer id in this document
    epoch INTEGER NOT NULL,          -- MLS epoch = highest applied slot
    joined_epoch INTEGER NOT NULL,   -- messages of earlier epochs cannot be decrypted here
    next_seq INTEGER NOT NULL,       -- our next envelope seq
    delivered BLOB NOT NULL,         -- per-sender delivered watermarks (msgpack map)
    status TEXT NOT NULL,            -- active | removed | failed
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS log (     -- slot -> encoded LogValue and encoded Decided (NULL: slot 0)
    group_id BLOB NOT NULL, slot INTEGER NOT NULL, value BLOB NOT NULL, decided BLOB,
    PRIMARY KEY (group_id, slot)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS mls_state (group_id BLOB PRIMARY KEY, state BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS mls_epochs (
    group_id BLOB NOT NULL, epoch_id INTEGER NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (group_id, epoch_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS crdt_snapshot (group_id BLOB PRIMARY KEY, snapshot BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS crdt_updates (
    id INTEGER PRIMARY KEY AUTOINCREMENT, group_id BLOB NOT NULL, data BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS crdt_updates_group ON crdt_updates (group_id, id);
CREATE TABLE IF NOT EXISTS local_pending (   -- local edits not yet sealed into an envelope
    id INTEGER PRIMARY KEY AUTOINCREMENT, group_id BLOB NOT NULL, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (          -- sealed envelopes until a quorum acknowledged
    group_id BLOB NOT NULL, seq INTEGER NOT NULL, envelope BLOB NOT NULL,
    PRIMARY KEY (group_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pending (         -- decrypted payloads waiting for dependencies
    group_id BLOB NOT NULL, sender BLOB NOT NULL, seq INTEGER NOT NULL, payload BLOB NOT NULL,
    PRIMARY KEY (group_id, sender, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS proposal (        -- our commit in flight (re-proposed after restart)
    group_id BLOB PRIMARY KEY, slot INTEGER NOT NULL, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS invites (
    secret_hash BLOB PRIMARY KEY, group_id BLOB NOT NULL, expires_at REAL NOT NULL,
    used INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS seats (          -- invites bound to one device (device/offers.py)
    secret_hash BLOB PRIMARY KEY, fingerprint BLOB NOT NULL, role INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS offers (         -- documents offered to us through a group
    group_id BLOB PRIMARY KEY, source BLOB NOT NULL, ticket TEXT NOT NULL,
    status TEXT NOT NULL, detail TEXT NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS undecryptable (  -- authentic envelopes MLS would not open (warned)
    group_id BLOB NOT NULL, sender BLOB NOT NULL, seq INTEGER NOT NULL,
    PRIMARY KEY (group_id, sender, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS syncnode_addrs ( -- addresses set by hand (`syncdevice set-address`)
    node_id BLOB PRIMARY KEY, addrs BLOB NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS witness (  -- syncnodes' signed statements (device/witness.py)
    group_id BLOB NOT NULL, node_id BLOB NOT NULL, kind TEXT NOT NULL, epoch INTEGER NOT NULL,
    statement BLOB NOT NULL, PRIMARY KEY (group_id, node_id, kind)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS alarms (
    id INTEGER PRIMARY KEY AUTOINCREMENT, group_id BLOB NOT NULL, kind TEXT NOT NULL,
    detail TEXT NOT NULL, evidence BLOB, at REAL NOT NULL);
"""


HOME_FILES = ("lock", "device.db", "device.db-wal", "device.db-shm", "device.db-journal")
"""What the store keeps in the device directory."""


def _create_private(path: Path, flags: int) -> int:
    """Open ``path``, creating it readable by its owner only (the umask can only narrow)."""
    return os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, 0o600)


def private_home(path: Path) -> list[str]:
    """Make the device directory and the store's files in it private to their owner (0700,
    0600): ``device.db`` holds the MLS signing secret and the endpoint seed, which let anyone
    who reads them act as this device. Homes made by older versions (0755 and 0644) are
    narrowed, with a warning naming each change; returns the changes."""
    changed: list[str] = []
    for p, want in [(path, 0o700), *[(path / n, 0o600) for n in HOME_FILES]]:
        try:
            mode = stat.S_IMODE(p.stat().st_mode)
        except FileNotFoundError:
            continue
        if mode & 0o077:
            new = mode & want
            try:
                os.chmod(p, new)
            except OSError as exc:
                log.warning("device home is readable by other users and could not be made "
                            "private", path=str(p), mode=f"{mode:04o}", error=str(exc))
                continue
            changed.append(f"{p} {mode:04o} -> {new:04o}")
    if changed:
        log.warning("device home was readable by other users; made it private to its owner",
                    changed=changed)
    return changed


class StoreLocked(SyncnodeError):
    """Another process has this device store open."""


class Store:
    """The open database plus an exclusive lock on the device directory (two processes driving
    one MLS state would reuse ratchet keys and fork it)."""

    def __init__(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        private_home(path)
        self.path = path
        self._lock = os.fdopen(_create_private(path / "lock", os.O_RDWR | os.O_APPEND), "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise StoreLocked(f"{path} is in use by another syncdevice process") from None
        self._lock.truncate(0)
        self._lock.write(str(os.getpid()))
        self._lock.flush()
        # SQLite creates the -wal and -shm files with the database file's permissions.
        os.close(_create_private(path / "device.db", os.O_RDWR))
        self.db = sqlite3.connect(path / "device.db", isolation_level=None,
                                  check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        self._depth = 0
        self._sync = "FULL"
        self.on_commit: Callable[[bool], None] | None = None
        """Called after each commit with its ``durable`` flag (the simulator's power-loss
        model tracks which part of the WAL has been fsynced)."""
        self.commits = 1
        """Commits so far; the first stands for what was on disk when the store opened (a
        previous process may have left it in the page cache only)."""
        self.synced = 0
        """Commits known to be on disk (:meth:`sync`)."""
        self._syncing: trio.Event | None = None
        self.sync_in_thread = True
        """Fsync in a worker thread (the deterministic simulator turns it off: a thread ends
        at a real time its mock clock knows nothing of)."""
        self.on_begin: list[Callable[[sqlite3.Connection], None]] = []
        """Run at the start of every outermost transaction, inside it: steps whose writes were
        deferred (:meth:`device.inbox.Inbox.receive` under load) join the next transaction,
        before anything it writes (an MLS state saved later must not get ahead of them)."""
        self.on_rollback: list[Callable[[], None]] = []
        """Run when an outermost transaction rolls back (an ``on_begin`` hook takes back what
        it wrote)."""
        self.on_sync: Callable[[], None] | None = None
        """Called after each :meth:`sync` (the simulator's power-loss model)."""

    @contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One atomic step. Nested uses join the outer transaction.

        ``durable=False`` skips the fsync at commit (WAL, ``synchronous=NORMAL``): still atomic
        and safe against a process crash; only a power loss can undo it, and the next durable
        commit makes it durable too. For steps that can be redone from the syncnodes
        (received messages, learned decisions), never for local edits or the outbox."""
        if self._depth:
            self._depth += 1
            try:
                yield self.db
            finally:
                self._depth -= 1
            return
        sync = "FULL" if durable else "NORMAL"
        if sync != self._sync:
            self.db.execute(f"PRAGMA synchronous={sync}")
            self._sync = sync
        self.db.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            for hook in list(self.on_begin):
                hook(self.db)
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            for undo in list(self.on_rollback):
                undo()
            raise
        else:
            self.db.execute("COMMIT")
            self.commits += 1
            if durable:
                self.synced = self.commits
            if self.on_commit is not None:
                self.on_commit(durable)
        finally:
            self._depth = 0

    async def sync(self, through: int | None = None) -> None:
        """Make every commit up to number ``through`` (default: all so far) durable, off the
        event loop: one fsync of the WAL in a worker thread, shared by everyone waiting.

        Why this is enough: commits with ``durable=False`` are written to the WAL without an
        fsync (``synchronous=NORMAL``); an fsync of the WAL file then makes them durable, as
        ``synchronous=FULL`` would have at each commit. A checkpoint in between fsyncs the WAL
        before copying it into the database and the database after, so what it moved is
        durable too. The sender seals with ``durable=False`` and calls this before the
        ciphertext leaves (:mod:`device.outbox`): one fsync per flush, not one per step, and
        never on the event loop, where it stalled every document of the process."""
        target = self.commits if through is None else through
        while self.synced < target:
            if self._syncing is not None:
                await self._syncing.wait()
                continue
            done = self._syncing = trio.Event()
            upto = self.commits
            try:
                with trio.CancelScope(shield=True):
                    if self.sync_in_thread:
                        await trio.to_thread.run_sync(self._fsync_wal)
                    else:
                        self._fsync_wal()
                self.synced = max(self.synced, upto)
                if self.on_sync is not None:
                    self.on_sync()
            finally:
                self._syncing = None
                done.set()

    def _fsync_wal(self) -> None:
        try:
            fd = os.open(self.path / "device.db-wal", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:  # nothing written in WAL mode yet: nothing to sync
            return
        try:
            # fdatasync: the data and what reading it back needs (the file size), not the
            # timestamps; what SQLite itself uses for its own syncs on Linux.
            os.fdatasync(fd)
        finally:
            os.close(fd)

    @property
    def in_transaction(self) -> bool:
        return self._depth > 0

    def get_meta(self, key: str) -> bytes | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return bytes(row[0]) if row else None

    def set_meta(self, key: str, value: bytes) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?,?)", (key, value))

    def one(self, sql: str, *args: Any) -> Any:
        return self.db.execute(sql, args).fetchone()

    def all(self, sql: str, *args: Any) -> list[Any]:
        return self.db.execute(sql, args).fetchall()

    def close(self) -> None:
        self.db.close()
        self._lock.close()
