"""The data path's speed-ups keep their guarantees (issue 18).

* a sealed update leaves the device only once its seal (and the MLS ratchet state) is on disk,
  with one fsync off the event loop shared by everything sealed meanwhile (``Store.sync``);
* a device's own edits made during one flush travel as one combined CRDT update that imports to
  the same document and the same version (``CrdtBackend.combine``);
* received steps stored later (``Inbox.receive(defer=True)``) join the next transaction before
  anything it writes, and come back when that transaction rolls back;
* the syncnode's writer hands a new envelope on (to the push) before its batch is durable and
  acknowledges it only after (``Writer.execute(staged=...)``).
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import trio

from device.crdt_loro import LoroDocument
from device.store import Store
from syncnode.storage.sqlite import SqliteStorage
from syncnode.storage.sqlite_writer import Writer
from tests.device_kit import FAST, converged, eventually, memory_cluster, memory_device
from tests.storage_acceptance import G1, A, new_group, opened

# -- the device store ------------------------------------------------------------------------


async def test_sync_makes_every_commit_so_far_durable_with_one_shared_fsync(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tmp_path / "d")
    calls: list[int] = []
    release = threading.Event()

    def slow_fsync() -> None:
        calls.append(store.commits)
        release.wait(5)

    monkeypatch.setattr(store, "_fsync_wal", slow_fsync)
    with store.transaction(durable=False) as db:
        db.execute("INSERT INTO meta VALUES ('a', x'01')")
    assert store.synced < store.commits
    target = store.commits
    done: list[str] = []

    async def waiter(name: str) -> None:
        await store.sync(target)
        done.append(name)

    async with trio.open_nursery() as nursery:
        for name in ("a", "b", "c"):
            nursery.start_soon(waiter, name)
        await trio.sleep(0.2)
        assert done == []  # nobody returns before the fsync did
        release.set()
    assert sorted(done) == ["a", "b", "c"] and calls == [target]  # one fsync for all three
    assert store.synced >= target
    with store.transaction() as db:  # a durable commit counts as synced by itself
        db.execute("INSERT INTO meta VALUES ('b', x'02')")
    assert store.synced == store.commits
    await store.sync()
    assert calls == [target]
    store.close()


async def test_a_sealed_update_is_not_sent_before_it_is_on_disk(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    """The send path waits for ``Store.sync``: with the fsync held back, no syncnode receives
    the update; once it completes, every syncnode stores it."""
    async with memory_cluster(tmp_path, seed=3, nodes=1) as (net, _cluster, nodes):
        async with memory_device(net, tmp_path / "a") as device:
            doc = await device.create_document([nodes[0].ticket])
            await doc.wait_connected(1)
            held = threading.Event()
            release = threading.Event()
            real = Store._fsync_wal

            def gated(self: Store) -> None:
                if not release.is_set():
                    held.set()
                    release.wait(10)
                real(self)

            monkeypatch.setattr(device.store, "sync_in_thread", True)
            monkeypatch.setattr(Store, "_fsync_wal", gated)
            before = nodes[0].service.metrics.messages_stored._value.get()
            doc.change(lambda e: e.map("m").insert("k", 1))
            await eventually(held.is_set, 10, "the send path to reach the fsync")
            await trio.sleep(0.3)
            assert nodes[0].service.metrics.messages_stored._value.get() == before
            release.set()
            await eventually(lambda: nodes[0].service.metrics.messages_stored._value.get()
                             > before, what="the update stored after the fsync")


# -- combining a flush's edits -------------------------------------------------------------------


def test_combined_edits_import_to_the_same_document_and_version() -> None:
    a = LoroDocument(7)
    other = LoroDocument(11)
    remote = other.change(lambda e: e.map("x").insert("a", 1))
    ups = [a.change(lambda e, i=i: e.map("m").insert(f"k{i}", i)) for i in range(4)]
    a.apply([remote])  # a remote update in between: ours still combine, theirs stay out
    ups += [a.change(lambda e: e.text("t").insert(0, "hi"))]
    assert all(u is not None for u in ups)
    edits = [u for u in ups if u is not None]
    combined = a.combine(edits)
    assert combined is not None and len(combined) < sum(map(len, edits))
    b, c = LoroDocument(12), LoroDocument(13)
    assert b.apply([remote]) == [None] and c.apply([remote]) == [None]
    assert b.apply([combined]) == [None]
    c.apply(edits)
    assert b.value() == c.value() == a.value()
    assert a.version_of([combined]) == a.version_of(edits)
    # Not one run of our own edits: sent as they are.
    assert a.combine(edits[:1]) is None
    assert a.combine([edits[0], edits[2]]) is None
    assert a.combine([edits[1], edits[0]]) is None
    assert a.combine([remote, *edits]) is None


async def test_a_flush_of_many_edits_travels_as_one_update(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    combined: list[int] = []
    real = LoroDocument.combine

    def spy(self: LoroDocument, updates: list[bytes]) -> bytes | None:
        out = real(self, updates)
        if out is not None:
            combined.append(len(updates))
        return out

    monkeypatch.setattr(LoroDocument, "combine", spy)
    async with memory_cluster(tmp_path, seed=5, nodes=1) as (net, _cluster, nodes):
        async with memory_device(net, tmp_path / "a") as da, \
                memory_device(net, tmp_path / "b") as db:
            doc = await da.create_document([nodes[0].ticket])
            other = await db.join(doc.invite())
            await converged([doc, other])
            with trio.fail_after(30):  # the state the inviter publishes as it applies the add
                await doc.wait_durable()  # is stored, not counted among the edits below
            before = await nodes[0].service.store.envelope_count(doc.group_id)
            for i in range(20):  # no checkpoint in between: one flush takes all of them
                doc.change(lambda e, i=i: e.map("m").insert(f"k{i}", i))
            await converged([doc, other])
            assert other.value()["m"] == {f"k{i}": i for i in range(20)}
            assert 20 in combined  # the twenty edits left as one update
            assert await nodes[0].service.store.envelope_count(doc.group_id) == before + 1


# -- deferred receive steps -------------------------------------------------------------------


async def test_deferred_receive_steps_are_stored_by_the_next_transaction(tmp_path: Path
                                                                         ) -> None:
    async with memory_cluster(tmp_path, seed=7, nodes=1) as (net, _cluster, nodes):
        async with memory_device(net, tmp_path / "a") as da, \
                memory_device(net, tmp_path / "b", config=FAST) as dbv:
            doc = await da.create_document([nodes[0].ticket])
            other = await dbv.join(doc.invite())
            await converged([doc, other])
            inbox = other.inbox
            stored = lambda: dbv.store.one(  # noqa: E731
                "SELECT count(*) FROM crdt_updates WHERE group_id=?", other.group_id)[0]
            async with other.replica.apply_lock:  # its own push processing waits meanwhile
                sealed = doc.outbox.next_seq
                doc.change(lambda e: e.map("m").insert("late", 1))
                await eventually(lambda: doc.outbox.durable() >= sealed)
                envs = await _fetch_all(nodes[0], doc)
                base = stored()
                assert inbox.receive(envs, defer=True) >= 1  # as the processor does under load
                assert other.value()["m"]["late"] == 1  # visible at once
                assert inbox.journal.unsaved.payloads and stored() == base  # not stored yet
                # A transaction that fails takes nothing with it: the steps wait again.
                with pytest.raises(RuntimeError), dbv.store.transaction(durable=False):
                    raise RuntimeError("boom")
                assert inbox.journal.unsaved.payloads and stored() == base
                other.change(lambda e: e.map("m").insert("mine", 1))  # stores them too
                assert not inbox.journal.unsaved.payloads and stored() > base
                delivered = dbv.store.one("SELECT delivered FROM documents WHERE group_id=?",
                                          other.group_id)[0]
                assert delivered == other.replica.delivered_blob()


async def _fetch_all(node: object, doc: object) -> list:  # type: ignore[type-arg]
    """Every envelope of ``doc``'s group that ``node`` stores."""
    from proto.codec import decode_as
    from proto.envelope import Envelope

    raws, _more = await node.service.store.envelopes_after(  # type: ignore[attr-defined]
        doc.group_id, {}, limit=1000, max_bytes=1 << 30)  # type: ignore[attr-defined]
    return [decode_as(r, Envelope) for r in raws]


# -- the syncnode's writer ------------------------------------------------------------------------


async def test_writer_stages_a_write_before_its_batch_is_durable(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    """``staged`` runs while the COMMIT (and its fsync) is still under way; ``execute``
    returns only after the commit."""
    gate = threading.Event()
    in_commit = threading.Event()
    writer = Writer(tmp_path / "w.db")
    staged: list[int] = []

    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        conn = writer._conn
        assert conn is not None

        class Gated:
            def __getattr__(self, name: str) -> object:
                return getattr(conn, name)

            def execute(self, sql: str, *args: object) -> object:
                if sql == "COMMIT":
                    in_commit.set()
                    gate.wait(10)
                return conn.execute(sql, *args)

        writer._conn = Gated()  # type: ignore[assignment]
        returned = trio.Event()

        async def write() -> None:
            await writer.execute(lambda c: c.execute("CREATE TABLE t (x)") and 1,
                                 staged=staged.append)
            returned.set()

        nursery.start_soon(write)
        await eventually(in_commit.is_set, 10, "the batch to reach its COMMIT")
        await trio.sleep(0.05)  # the staged callback ran on the event loop meanwhile
        assert staged == [1] and not returned.is_set()
        gate.set()
        with trio.fail_after(10):
            await returned.wait()
        writer._conn = conn
        await writer.aclose()


async def test_storage_calls_staged_only_for_new_envelopes_under_real_threads(tmp_path: Path
                                                                             ) -> None:
    """Concurrent stores (one batch, the writer in its thread): one ``staged`` per new
    envelope, none for the duplicate."""
    async with opened(lambda: SqliteStorage(tmp_path / "n.db")) as s:
        await new_group(s)
        seen: list[int] = []
        results: list[bool] = []

        async def one(seq: int) -> None:
            results.append(await s.store_envelope(G1, A, seq, b"d%d" % seq, b"e%d" % seq,
                                                  staged=lambda: seen.append(seq)))

        async with trio.open_nursery() as nursery:
            for seq in (1, 2, 2, 3):
                nursery.start_soon(one, seq)
        assert sorted(seen) == [1, 2, 3] and sorted(results) == [False, True, True, True]
