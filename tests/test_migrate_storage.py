"""``syncnode migrate-storage``: a stopped node's SQLite data moved to PostgreSQL whole, as
the same node (incarnation, statement clock, mailbox ids), and what it refuses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from proto.identity import read_key_file
from syncnode.startup import init_data_dir, lock_data_dir
from syncnode.storage import DecidedRecord
from syncnode.storage.postgres import PostgresStorage
from syncnode.storage.sqlite import SqliteStorage
from tests.pg_kit import pg_dsn, pg_server  # noqa: F401
from tests.storage_acceptance import (
    G1,
    GENESIS,
    R1,
    A,
    opened,
    put,
    write_one_of_everything,
)

SYNCNODE = [sys.executable, "-m", "syncnode"]


def migrate(data_dir: Path, dsn: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SYNCNODE, "migrate-storage", "--data-dir", str(data_dir),
                           "--to", dsn, *extra], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})


def one_line(done: subprocess.CompletedProcess[str], text: str) -> None:
    assert done.returncode == 1, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and text in lines[0], done.stderr


async def test_a_node_moves_to_postgresql_whole(tmp_path: Path, pg_dsn: str) -> None:  # noqa: F811
    data_dir = tmp_path / "node"
    init_data_dir(data_dir)
    db = data_dir / "syncnode.db"
    async with opened(lambda: SqliteStorage(db)) as s:
        await write_one_of_everything(s)
        for seq in (2, 3, 4):
            await s.store_envelope(G1, A, seq, b"d%d" % seq, b"e%d" % seq)
        await s.compact_envelopes(G1, b"point", {A: 3}, (A, 3))
        gone, _ = await put(s, R1, b"acked")
        assert await s.mailbox_ack(R1, [gone]) == 1
        await s.reserve_statement_clock(1_900_000_000_000)
        incarnation = await s.incarnation()
        summary = await s.envelope_summary(G1)

    fd = lock_data_dir(data_dir)  # a running node holds the lock: refused
    one_line(migrate(data_dir, pg_dsn), "already running")
    os.close(fd)

    done = migrate(data_dir, pg_dsn)
    assert done.returncode == 0, done.stderr
    assert "migrated 1 groups, 2 envelopes" in done.stdout

    async with opened(lambda: PostgresStorage(pg_dsn)) as p:
        await check_one_of_envelopes_but_compacted(p)
        assert await p.incarnation() == incarnation  # the same node, not one that lost data
        assert await p.statement_clock() == 1_900_000_000_000
        assert await p.envelope_summary(G1) == summary
        assert await p.compaction(G1) == b"point"
        item, _ = await put(p, R1, b"new")
        assert item > gone  # ids never reused, also across the move
        await p.claim_node(read_key_file(data_dir / "node.key").public)
    assert db.exists()  # left as it was

    one_line(migrate(data_dir, pg_dsn), "already holds data")  # never merged into
    other = tmp_path / "other"
    init_data_dir(other)
    (other / "syncnode.db").write_bytes(db.read_bytes())
    one_line(migrate(other, pg_dsn), "belongs to syncnode")  # another node's database


async def check_one_of_envelopes_but_compacted(p: PostgresStorage) -> None:
    """What write_one_of_everything left, after the compaction above took A's 1 and 2."""
    await check_one_of_everything_except_envelopes(p)
    got, more = await p.envelopes_after(G1, {}, limit=10, max_bytes=1 << 20)
    assert got == [b"e3", b"e4"] and not more
    assert await p.envelope_marks(G1) == {A: 4}


async def check_one_of_everything_except_envelopes(p: PostgresStorage) -> None:
    assert await p.group_ids() == [G1]
    assert await p.decided(G1, 1) == DecidedRecord(b"value 1", b"cert 1")
    assert await p.decided(G1, 0) == DecidedRecord(GENESIS, None)
    assert await p.manifest(G1, 1) == b"manifest 1"
    assert await p.acceptor_record(G1, 2) == b"promise"
    assert await p.equivocation(G1, 1) == b"proof"
    assert await p.address_record(b"n" * 32) == b"record"
    items, _ = await p.mailbox_items(R1, after=0, now=0, limit=10, max_bytes=1 << 20)
    assert [i.payload for i in items] == [b"item"]
    assert (await p.mailbox_usage()).other == 4



def test_an_unusable_database_is_one_line(tmp_path: Path) -> None:
    """No server needed: what an operator gets wrong about the database is one line each."""
    init_data_dir(tmp_path / "n")
    run = subprocess.run([*SYNCNODE, "run", "--data-dir", str(tmp_path / "n"), "--listen",
                          "127.0.0.1:0", "--http", "127.0.0.1:0", "--database",
                          f"postgresql://nobody@/x?host={tmp_path}/nowhere"],
                         capture_output=True, text=True, timeout=60)
    one_line(run, "cannot use PostgreSQL (database x on ")
    (tmp_path / "n" / "syncnode.toml").write_text('storage = "mysql://x/y"\n')
    run = subprocess.run([*SYNCNODE, "run", "--data-dir", str(tmp_path / "n")],
                         capture_output=True, text=True, timeout=60)
    one_line(run, "neither a path nor a postgresql:// URL")
    done = migrate(tmp_path / "n", "sqlite:elsewhere")
    assert done.returncode == 2 and "must be a postgresql:// URL" in done.stderr
