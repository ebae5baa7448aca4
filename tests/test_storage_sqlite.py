"""The SQLite storage: the shared acceptance suite (``tests/storage_acceptance.py``) in both
writer modes, and what only SQLite has (its schema version, group commit switched off)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from proto.antientropy import Summary, backfill_marks, marks_of
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


async def test_a_peer_that_lacks_the_state_pulls_it_from_a_compacted_one(tmp_path: Path) -> None:
    """The kept state envelope counts in its sender's summary row, so a syncnode that missed
    it (down during the compaction) sees a peer row it lacks and backfills it; otherwise the
    digests differed forever and it never applied the point (review finding)."""
    g, a = b"\x01" * 16, b"a" * 32
    async with opened(lambda: SqliteStorage(tmp_path / "x.db")) as x, \
            opened(lambda: SqliteStorage(tmp_path / "y.db")) as y:
        for s in (x, y):
            await new_group(s)
        for seq in (1, 2, 3, 4, 5):  # 5 is the state
            await x.store_envelope(g, a, seq, b"d%d" % seq, b"e%d" % seq)
        for seq in (1, 2):
            await y.store_envelope(g, a, seq, b"d%d" % seq, b"e%d" % seq)
        await x.compact_envelopes(g, b"point", {a: 5}, (a, 5))
        theirs = {s: Summary(*v) for s, v in (await x.envelope_summary(g)).items()}
        ours = {s: Summary(*v) for s, v in (await y.envelope_summary(g)).items()}
        assert theirs[a].envelopes == 1  # the state
        assert backfill_marks(ours, marks_of(theirs)[0]) == {a: 2}  # from Y's run: gets 5
        await y.store_envelope(g, a, 5, b"d5", b"e5")
        await y.compact_envelopes(g, b"point", {a: 5}, (a, 5))
        assert await y.envelope_summary(g) == await x.envelope_summary(g)


async def test_a_version_2_database_gets_its_summary_rebuilt(tmp_path: Path) -> None:
    """Version 2 was the summary on one branch and the compaction tables on another: opening
    any version 2 database rebuilds the summary, compactions included."""
    path = tmp_path / "syncnode.db"
    g, a = b"\x01" * 16, b"a" * 32
    async with opened(lambda: SqliteStorage(path)) as s:
        await new_group(s)
        for seq in (1, 2, 3, 4):
            await s.store_envelope(g, a, seq, b"d%d" % seq, b"e")
        await s.compact_envelopes(g, b"p", {a: 2}, (a, 2))
        want = await s.envelope_summary(g)
    with sqlite3.connect(path) as db:  # the compaction branch's version 2: no summary rows
        db.execute("DELETE FROM envelope_senders")
        db.execute("UPDATE meta SET value='2' WHERE key='schema'")
    db.close()
    async with opened(lambda: SqliteStorage(path)) as s:
        assert await s.envelope_summary(g) == want
        assert await s.envelope_marks(g) == {a: 4}
