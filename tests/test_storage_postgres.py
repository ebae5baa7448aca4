"""The PostgreSQL storage: the shared acceptance suite (``tests/storage_acceptance.py``),
unchanged, and what only a server database has: versioned migrations, the node a database
belongs to, and several processes on one database (one statement clock, compare-and-set on
acceptor records, changes heard across processes). Needs a server: ``tests/pg_kit.py`` says
where it comes from; without one these tests skip with the reason (and fail under CI)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import psycopg
import pytest
import trio

from syncnode.storage import Change, Storage
from syncnode.storage.postgres import PostgresStorage
from syncnode.storage.postgres_schema import SCHEMA_VERSION
from tests.pg_kit import new_schema, pg_dsn, pg_server  # noqa: F401
from tests.storage_acceptance import *  # noqa: F403
from tests.storage_acceptance import G1, ROOMY, A, StorageFactory, new_group, opened


@pytest.fixture
def storage_factory(pg_dsn: str) -> StorageFactory:  # noqa: F811
    def make() -> Storage:
        return PostgresStorage(pg_dsn)

    return make


@pytest.fixture
def fresh_storage_factory(pg_server: str, pg_dsn: str) -> StorageFactory:  # noqa: F811
    """Another schema: a lost database made again."""
    dsn = new_schema(pg_server, f"fresh_{abs(hash(pg_dsn)) % 10**9}")
    return lambda: PostgresStorage(dsn)


@asynccontextmanager
async def processes(dsn: str, count: int) -> AsyncIterator[list[PostgresStorage]]:
    """``count`` storages over one database, as ``count`` processes of one node have."""
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(opened(lambda: PostgresStorage(dsn)))
               for _ in range(count)]  # type: ignore[misc]


def schema_version(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        return int(row[0]) if row else 0


async def test_migrations_are_applied_once_and_a_newer_schema_is_refused(pg_dsn: str  # noqa: F811
                                                                         ) -> None:
    async with processes(pg_dsn, 3) as stores:  # three processes starting on a new database
        await new_group(stores[0])
    assert schema_version(pg_dsn) == SCHEMA_VERSION
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("UPDATE meta SET value='99' WHERE key='schema'")
    with pytest.raises(RuntimeError, match="schema version 99"):
        await PostgresStorage(pg_dsn).run()  # refused before it serves anything


async def test_a_database_belongs_to_one_node(pg_dsn: str) -> None:  # noqa: F811
    async with opened(lambda: PostgresStorage(pg_dsn)) as s:
        await s.claim_node(b"n" * 32)  # type: ignore[attr-defined]
        await s.claim_node(b"n" * 32)  # type: ignore[attr-defined]
        with pytest.raises(RuntimeError, match="belongs to syncnode 6e6e"):
            await s.claim_node(b"m" * 32)  # type: ignore[attr-defined]


async def test_stamps_rise_across_processes_whatever_their_clocks(pg_dsn: str  # noqa: F811
                                                                  ) -> None:
    """One statement clock for the node: a stamp handed out after another one was is larger,
    whichever process asks and whatever its wall clock says (a process whose clock is behind
    must not sign a statement that looks older than an ack another process gave)."""
    async with processes(pg_dsn, 2) as (p1, p2):
        await p1.reserve_statement_clock(5_000)
        handed: list[tuple[float, float, int]] = []

        async def ask(store: PostgresStorage, wall: int) -> None:
            for _ in range(30):
                asked = trio.current_time()
                stamp = await store.next_stamp(wall)
                assert stamp >= wall  # never below the asker's wall clock
                handed.append((asked, trio.current_time(), stamp))

        async with trio.open_nursery() as nursery:  # several at once: written together
            for _ in range(4):
                nursery.start_soon(ask, p1, 1_000)      # a clock far behind the reservation
                nursery.start_soon(ask, p2, 9_000)      # and one ahead of it
        stamps = [s for _, _, s in handed]
        assert len(set(stamps)) == 240 and min(stamps) > 5_000
        for asked, _, stamp in handed:  # every stamp handed out before this was asked is lower
            assert all(other < stamp for _, got, other in handed if got < asked)
        assert await p2.statement_clock() == max(stamps)


async def test_two_processes_compare_and_set_one_slot(pg_dsn: str) -> None:  # noqa: F811
    """Many rounds of both processes replacing the same acceptor record at once, each on the
    state it read: exactly one of them wins each round."""
    async with processes(pg_dsn, 2) as stores:
        await stores[0].put_acceptor_records([(G1, 1, b"round 0")])
        for rnd in range(1, 41):
            wins: list[bytes] = []
            prior = await stores[0].acceptor_record(G1, 1)

            async def step(store: PostgresStorage, mine: bytes, prior: bytes | None = prior,
                           wins: list[bytes] = wins) -> None:
                if await store.put_acceptor_record_if(G1, 1, prior, mine):
                    wins.append(mine)

            async with trio.open_nursery() as nursery:
                for i, store in enumerate(stores):
                    for j in range(3):
                        nursery.start_soon(step, store, b"round %d by p%d.%d" % (rnd, i, j))
            assert len(wins) == 1, wins
            assert await stores[1].acceptor_record(G1, 1) == wins[0]


async def test_other_processes_hear_each_change_once_committed(pg_dsn: str  # noqa: F811
                                                               ) -> None:
    async with processes(pg_dsn, 2) as (writer, other):
        heard: list[tuple[float, Change]] = []
        own: list[Change] = []
        writer.on_change = own.append
        all_heard = trio.Event()

        def hear(change: Change) -> None:
            heard.append((time.perf_counter(), change))
            if len(heard) == 4:
                all_heard.set()

        other.on_change = hear
        await new_group(writer)
        sent = time.perf_counter()
        assert await writer.store_envelope(G1, A, 1, b"d1", b"envelope 1")
        assert not await writer.store_envelope(G1, A, 1, b"d1", b"envelope 1")  # no change
        await writer.append_decided(G1, 1, b"value", b"cert", b"manifest")
        await writer.mailbox_put(b"r" * 32, 2, b"item", sender=A, size=4, now=0,
                                 expires_at=100, quota=ROOMY)
        with trio.fail_after(5):
            await all_heard.wait()
        await trio.sleep(0.1)
        assert [c for _, c in heard] == [
            Change("group", G1, b"", 0, 0), Change("envelope", G1, A, 1, len(b"envelope 1")),
            Change("decided", G1, b"", 1, len(b"value")), Change("mailbox", b"", b"r" * 32, 0, 0)]
        assert own == []  # a process does not hear its own changes
        assert heard[1][0] - sent < 1.0


async def test_a_write_failing_in_the_database_fails_alone(pg_dsn: str) -> None:  # noqa: F811
    """No savepoints: a database error aborts the batch's transaction, which runs again
    without the failing write. Here a seq PostgreSQL cannot take, amid a crowd of good ones."""
    batches: list[int] = []
    store = PostgresStorage(pg_dsn)
    store.on_batch = lambda size, seconds: batches.append(size)
    async with opened(lambda: store) as s:
        await new_group(s)
        batches.clear()
        failed: list[BaseException] = []

        async def one(seq: int) -> None:
            try:
                await s.store_envelope(G1, A, seq, b"d%d" % seq, b"e%d" % seq)
            except psycopg.Error as exc:
                failed.append(exc)

        async with trio.open_nursery() as nursery:
            for seq in range(1, 41):
                nursery.start_soon(one, 1 << 64 if seq == 20 else seq)
        assert len(failed) == 1 and sum(batches) == 40 and len(batches) < 10
        assert await s.envelope_count(G1) == 39
        assert (await s.group(G1)).bytes_used == len(b"genesis value") + sum(  # type: ignore
            len(b"e%d" % q) for q in range(1, 41) if q != 20)


async def test_connections_cut_by_the_server_are_made_again(pg_dsn: str) -> None:  # noqa: F811
    """A server restart or failover ends every connection (here: the server terminates them):
    the writer runs its batch again on a new one, reads drop the dead pooled connections and
    read again, and the listener reconnects and reports that changes may have been missed."""
    async with processes(pg_dsn, 2) as (writer, other):
        heard: list[str] = []
        resynced = trio.Event()

        def hear(change: Change) -> None:
            heard.append(change.kind)
            if change.kind == "resync":
                resynced.set()

        other.on_change = hear
        await new_group(writer)
        assert await other.group(G1) is not None  # a pooled connection to cut
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                          "backend_type = 'client backend' AND pid <> pg_backend_pid()")
        for seq in range(1, 6):  # every write succeeds
            assert await writer.store_envelope(G1, A, seq, b"d%d" % seq, b"e%d" % seq)
        assert await other.envelope_count(G1) == 5
        with trio.fail_after(10):
            await resynced.wait()
