"""The SQLite storage: the shared acceptance suite (``tests/storage_acceptance.py``) in both
writer modes, and what only SQLite has (its schema version, group commit switched off)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from syncnode.storage import Storage
from syncnode.storage.sqlite import SqliteStorage
from syncnode.storage.sqlite_schema import SCHEMA_VERSION
from tests.storage_acceptance import *  # noqa: F403
from tests.storage_acceptance import StorageFactory, new_group, opened


@pytest.fixture(params=["threads", "inline"])
def storage_factory(request: pytest.FixtureRequest, tmp_path: Path) -> StorageFactory:
    """Commits on a worker thread (the daemon) or on the trio thread (the simulator)."""
    threads = request.param == "threads"

    def make() -> Storage:
        return SqliteStorage(tmp_path / "syncnode.db", threads=threads)

    return make


@pytest.fixture
def fresh_storage_factory(tmp_path: Path) -> StorageFactory:
    """Another database file: a lost data directory made again."""
    return lambda: SqliteStorage(tmp_path / "fresh.db")


async def test_without_group_commit_every_write_commits_alone(tmp_path: Path) -> None:
    batches: list[int] = []
    store = SqliteStorage(tmp_path / "syncnode.db", batching=False)
    store.on_batch = lambda size, seconds: batches.append(size)
    async with opened(lambda: store) as s:
        await new_group(s)
        for seq in range(1, 6):
            await s.store_envelope(b"\x01" * 16, b"a" * 32, seq, b"d", b"e")
    assert batches == [1] * 6


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "syncnode.db"
    SqliteStorage(path).db.close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value='99' WHERE key='schema'")
    db.close()
    with pytest.raises(RuntimeError, match="schema version 99"):
        SqliteStorage(path)


async def test_a_version_1_database_gets_its_envelope_summary(tmp_path: Path) -> None:
    """Version 2 keeps a per-sender summary of each group's envelopes; opening a version 1
    database builds it from the envelopes already there."""
    path = tmp_path / "syncnode.db"
    async with opened(lambda: SqliteStorage(path)) as s:
        await new_group(s)
        for seq in (1, 2, 4):
            await s.store_envelope(b"\x01" * 16, b"a" * 32, seq, b"d%d" % seq, b"e")
        want = await s.envelope_summary(b"\x01" * 16)
    with sqlite3.connect(path) as db:  # what a version 1 syncnode left
        db.execute("DROP TABLE envelope_senders")
        db.execute("UPDATE meta SET value='1' WHERE key='schema'")
    db.close()
    async with opened(lambda: SqliteStorage(path)) as s:
        assert await s.envelope_summary(b"\x01" * 16) == want
        assert await s.envelope_marks(b"\x01" * 16) == {b"a" * 32: 2}


async def test_a_version_1_database_is_migrated_to_compaction(tmp_path: Path) -> None:
    """A syncnode from before anti-entropy and compaction left schema 1 without the summary
    and compaction tables: opening it adds them and records version 3, and its envelopes
    stay."""
    path = tmp_path / "syncnode.db"
    async with opened(lambda: SqliteStorage(path)) as s:
        await new_group(s)
        await s.store_envelope(b"\x01" * 16, b"a" * 32, 1, b"d", b"e")
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE compactions")
        db.execute("DROP TABLE compacted")
        db.execute("DROP TABLE envelope_senders")
        db.execute("UPDATE meta SET value='1' WHERE key='schema'")
    db.close()
    async with opened(lambda: SqliteStorage(path)) as s:
        assert await s.compaction(b"\x01" * 16) is None
        assert await s.compact_envelopes(b"\x01" * 16, b"p", {b"a" * 32: 1}, (b"a" * 32, 1)) == 0
        assert await s.envelope_count(b"\x01" * 16) == 1
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta WHERE key='schema'").fetchone() == ("3",)
    db.close()


async def test_a_database_made_before_incarnations_gets_one_that_stays(tmp_path: Path) -> None:
    """The incarnation lives in ``meta`` (no schema bump): a database an older syncnode made
    has none, gets one when opened, and keeps it; the schema version stays."""
    path = tmp_path / "syncnode.db"
    SqliteStorage(path).db.close()
    with sqlite3.connect(path) as db:  # what an older syncnode left
        db.execute("DELETE FROM meta WHERE key='incarnation'")
    db.close()
    async with opened(lambda: SqliteStorage(path)) as s:
        made = await s.incarnation()
    async with opened(lambda: SqliteStorage(path)) as s:
        assert await s.incarnation() == made
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta WHERE key='schema'").fetchone() == (
            str(SCHEMA_VERSION),)
    db.close()
