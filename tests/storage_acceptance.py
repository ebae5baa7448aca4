"""The acceptance suite every syncnode storage backend must pass (:mod:`syncnode.storage.base`
says what each method promises; this checks it).

A backend's test module provides a ``storage_factory`` fixture -- a callable that returns a new,
not yet started :class:`~syncnode.storage.Storage` over the same data every time it is called
(so calling it again after closing the first one reopens the data) -- and a
``fresh_storage_factory`` fixture, the same over other, new data (a lost data directory made
again) -- and imports the tests::

    from tests.storage_acceptance import *  # noqa: F403

``tests/test_storage_sqlite.py`` does this for SQLite; a server database adds its own module.
Values are opaque bytes to a backend, so the tests use made-up ones.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from syncnode.storage import (
    JOIN_REQUEST_KIND,
    DecidedRecord,
    GroupRecord,
    HostingRecord,
    MailboxQuota,
    MailboxRefusal,
    MailboxUsage,
    SenderSummary,
    Storage,
    StorageClosed,
    StorageConflict,
    digest_term,
)

__all__ = [
    "test_acceptor_record_is_replaced_only_if_unchanged",
    "test_acceptor_records_replace",
    "test_acknowledged_writes_survive_a_crash",
    "test_address_records_keep_the_newest_within_capacity",
    "test_adopted_groups_keep_a_hosting_record",
    "test_barrier_waits_for_earlier_writes",
    "test_compacted_copies_of_a_group_summarize_alike",
    "test_compaction_deletes_covered_envelopes_but_the_state",
    "test_compaction_points_only_advance_and_go_with_the_group",
    "test_concurrent_writes_share_commits_and_fail_alone",
    "test_decided_log_appends_only_the_next_slot",
    "test_decided_range_orders_and_pages",
    "test_delete_group_removes_everything_of_it",
    "test_envelope_digests_answer_held_keys_only",
    "test_envelope_marks_stop_at_the_first_gap",
    "test_envelope_staged_once_for_a_new_envelope_only",
    "test_envelope_summary_follows_every_store",
    "test_envelopes_after_orders_by_sender_and_pages",
    "test_envelopes_are_idempotent_and_conflicts_refused",
    "test_equivocation_keeps_the_first_proof",
    "test_everything_survives_reopening",
    "test_group_ids_page_in_order",
    "test_groups_are_created_once",
    "test_incarnation_is_kept_for_life_and_new_storage_gets_another",
    "test_mailbox_make_room_evicts_the_oldest_of_the_class",
    "test_mailbox_node_quota_is_per_class",
    "test_mailbox_orders_pages_acks_and_expires",
    "test_mailbox_recipient_quota_counts_unexpired_items",
    "test_mailbox_sender_quota_bytes_then_items",
    "test_no_writes_after_close",
    "test_statement_clock_only_rises_and_survives_reopening",
]

StorageFactory = Callable[[], Storage]

G1, G2, G3 = b"\x01" * 16, b"\x02" * 16, b"\x03" * 16
CREATOR, OTHER = b"c" * 32, b"o" * 32
GENESIS = b"genesis value"
A, B = b"\x0a" * 32, b"\x0b" * 32
R1, R2 = b"r" * 32, b"s" * 32
WELCOME = 2
BIG = 1 << 30
ROOMY = MailboxQuota(items_per_recipient=1000, bytes_per_sender=BIG, items_per_sender=None,
                     class_bytes=BIG, make_room=False)


@asynccontextmanager
async def opened(factory: StorageFactory) -> AsyncIterator[Storage]:
    """A started storage, closed cleanly (queued writes finished) at the end."""
    store = factory()
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        try:
            yield store
        finally:
            with trio.CancelScope(shield=True):
                await store.aclose()


@asynccontextmanager
async def crashing(factory: StorageFactory) -> AsyncIterator[Storage]:
    """A started storage whose writer is cancelled at the end (a crash), then released."""
    store = factory()
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        yield store
        nursery.cancel_scope.cancel()
    await store.aclose()


async def new_group(store: Storage, group_id: bytes = G1, creator: bytes = CREATOR) -> None:
    assert await store.create_group(group_id, creator, GENESIS, 1.0)


async def decide(store: Storage, group_id: bytes, slot: int, value: bytes | None = None
                 ) -> None:
    await store.append_decided(group_id, slot, value or b"value %d" % slot, b"cert %d" % slot,
                               b"manifest %d" % slot)


async def put(store: Storage, recipient: bytes, payload: bytes, *, kind: int = WELCOME,
              sender: bytes = A, now: int = 0, ttl: int = 1000,
              quota: MailboxQuota = ROOMY) -> tuple[int, MailboxRefusal | None]:
    r = await store.mailbox_put(recipient, kind, payload, sender=sender, size=len(payload),
                                now=now, expires_at=now + ttl, quota=quota)
    assert r.refused is None or r.item_id == 0
    return r.item_id, r.refused


# -- groups ---------------------------------------------------------------------------------------


async def test_groups_are_created_once(storage_factory: StorageFactory) -> None:
    async with opened(storage_factory) as s:
        assert await s.group(G1) is None and await s.group_count() == 0
        assert await s.create_group(G1, CREATOR, GENESIS, 1.0)
        assert await s.group(G1) == GroupRecord(CREATOR, 0, len(GENESIS))
        assert await s.decided(G1, 0) == DecidedRecord(GENESIS, None)
        assert not await s.create_group(G1, CREATOR, GENESIS, 2.0)  # the same: idempotent
        with pytest.raises(StorageConflict):
            await s.create_group(G1, OTHER, b"another genesis", 3.0)
        assert await s.group(G1) == GroupRecord(CREATOR, 0, len(GENESIS))
        assert await s.decided(G1, 0) == DecidedRecord(GENESIS, None)
        await new_group(s, G2, OTHER)
        await new_group(s, G3, CREATOR)
        assert await s.group_count() == 3
        assert await s.group_count_by_creator(CREATOR) == 2
        assert await s.group_count_by_creator(OTHER) == 1
        assert await s.group_count_by_creator(b"x" * 32) == 0


async def test_adopted_groups_keep_a_hosting_record(storage_factory: StorageFactory) -> None:
    async with opened(storage_factory) as s:
        assert await s.adopt_group(G1, CREATOR, GENESIS, 1.0, named_slot=4, adoption=b"n4")
        assert await s.group(G1) == GroupRecord(CREATOR, 0, len(GENESIS))
        assert await s.decided(G1, 0) == DecidedRecord(GENESIS, None)
        pending = HostingRecord(4, b"n4", False, False)
        assert await s.hosting(G1) == pending
        # Again, with another claim: the newest is kept while it is not serving.
        assert not await s.adopt_group(G1, CREATOR, GENESIS, 2.0, named_slot=6, adoption=b"n6")
        assert await s.hosting(G1) == HostingRecord(6, b"n6", False, False)
        with pytest.raises(StorageConflict):
            await s.adopt_group(G1, OTHER, b"another genesis", 3.0, named_slot=1, adoption=b"x")
        serving = HostingRecord(6, b"n6", True, True)
        await s.put_hosting(G1, serving)
        assert not await s.adopt_group(G1, CREATOR, GENESIS, 4.0, named_slot=9, adoption=b"n9")
        assert await s.hosting(G1) == serving  # serving: a new claim changes nothing
        # A group created from its genesis has no record, and adopting it changes nothing.
        await new_group(s, G2)
        assert not await s.adopt_group(G2, CREATOR, GENESIS, 5.0, named_slot=2, adoption=b"a")
        assert await s.hosting(G2) is None
        removed = HostingRecord(None, None, False, True, 8, 123.5)
        await s.put_hosting(G2, removed)
        with pytest.raises(StorageConflict):  # only hosted groups have a record
            await s.put_hosting(G3, removed)
        assert await s.hosting(G3) is None
        assert await s.hosting_records() == [(G1, serving), (G2, removed)]
        assert await s.hosting_records(G1) == [(G2, removed)]
        assert await s.hosting_records(limit=1) == [(G1, serving)]
        assert await s.group_count() == 2
    async with opened(storage_factory) as s:
        assert await s.hosting_records() == [(G1, serving), (G2, removed)]


async def test_delete_group_removes_everything_of_it(storage_factory: StorageFactory) -> None:
    async with opened(storage_factory) as s:
        await write_one_of_everything(s)
        await s.put_hosting(G1, HostingRecord(None, None, False, True, 1, 9.0))
        await new_group(s, G2)
        await s.store_envelope(G2, A, 1, b"d", b"kept")
        assert await s.delete_group(G1)
        assert not await s.delete_group(G1)
        assert await s.group(G1) is None and await s.group_ids() == [G2]
        assert await s.decided(G1, 0) is None and await s.decided(G1, 1) is None
        assert await s.manifest(G1, 1) is None and await s.acceptor_record(G1, 2) is None
        assert await s.envelopes_after(G1, {}, limit=10, max_bytes=BIG) == ([], False)
        assert await s.envelope_count(G1) == 0
        assert await s.equivocation(G1, 1) is None and await s.hosting(G1) is None
        assert await s.envelopes_after(G2, {}, limit=10, max_bytes=BIG) == ([b"kept"], False)
        assert await s.address_record(b"n" * 32) == b"record"  # node-wide data stays
        # The id is free again: a new group may take it.
        assert await s.create_group(G1, OTHER, b"another genesis", 2.0)


async def test_group_ids_page_in_order(storage_factory: StorageFactory) -> None:
    ids = [bytes([i]) * 16 for i in (9, 3, 7, 1, 5)]
    async with opened(storage_factory) as s:
        assert await s.group_ids() == []
        for gid in ids:
            await new_group(s, gid)
        assert await s.group_ids() == sorted(ids)
        first = await s.group_ids(limit=2)
        assert first == sorted(ids)[:2]
        assert await s.group_ids(first[-1], 2) == sorted(ids)[2:4]
        assert await s.group_ids(sorted(ids)[-1]) == []


# -- decided log and manifests --------------------------------------------------------------------


async def test_decided_log_appends_only_the_next_slot(storage_factory: StorageFactory) -> None:
    async with opened(storage_factory) as s:
        with pytest.raises(StorageConflict):  # not a hosted group
            await decide(s, G1, 1)
        await new_group(s)
        await decide(s, G1, 1, b"one")
        await decide(s, G1, 2, b"two!")
        assert await s.group(G1) == GroupRecord(CREATOR, 2, len(GENESIS) + 3 + 4)
        assert await s.decided(G1, 1) == DecidedRecord(b"one", b"cert 1")
        assert await s.decided(G1, 2) == DecidedRecord(b"two!", b"cert 2")
        assert await s.decided(G1, 3) is None
        assert await s.manifest(G1, 1) == b"manifest 1"
        assert await s.manifest(G1, 2) == b"manifest 2"
        assert await s.manifest(G1, 3) is None
        for slot in (1, 2, 4):  # taken, taken, a gap: nothing changes
            with pytest.raises(StorageConflict):
                await decide(s, G1, slot, b"other")
        assert await s.group(G1) == GroupRecord(CREATOR, 2, len(GENESIS) + 3 + 4)
        assert await s.decided(G1, 2) == DecidedRecord(b"two!", b"cert 2")
        assert await s.decided(G1, 4) is None


async def test_decided_range_orders_and_pages(storage_factory: StorageFactory) -> None:
    async with opened(storage_factory) as s:
        await new_group(s)
        await new_group(s, G2)
        for slot in range(1, 11):
            await decide(s, G1, slot, bytes([slot]) * 100)
        await decide(s, G2, 1)

        async def slots(first: int, last: int, limit: int = 100, max_bytes: int = BIG
                        ) -> list[int]:
            page = await s.decided_range(G1, first, last, limit=limit, max_bytes=max_bytes)
            for slot, rec in page:
                assert rec == DecidedRecord(bytes([slot]) * 100, b"cert %d" % slot)
            return [slot for slot, _ in page]

        assert await slots(0, 10) == list(range(1, 11))  # never the genesis
        assert await slots(3, 8) == [3, 4, 5, 6, 7, 8]
        assert await slots(1, 10, limit=4) == [1, 2, 3, 4]
        assert await slots(1, 10, max_bytes=250) == [1, 2]
        assert await slots(5, 10, max_bytes=300) == [5, 6, 7]
        assert await slots(5, 10, max_bytes=10) == [5]  # the first always
        assert await slots(7, 6) == []
        assert await slots(11, 20) == []


# -- Paxos acceptor -------------------------------------------------------------------------------


async def test_acceptor_records_replace(storage_factory: StorageFactory) -> None:
    async with opened(storage_factory) as s:
        assert await s.acceptor_record(G1, 1) is None
        await s.put_acceptor_records([(G1, 1, b"promised 1")])
        assert await s.acceptor_record(G1, 1) == b"promised 1"
        await s.put_acceptor_records([(G1, 1, b"accepted 1"), (G1, 2, b"promised 2"),
                                      (G2, 1, b"other group")])
        assert await s.acceptor_record(G1, 1) == b"accepted 1"
        assert await s.acceptor_record(G1, 2) == b"promised 2"
        assert await s.acceptor_record(G2, 1) == b"other group"
        assert await s.acceptor_record(G2, 2) is None


async def test_acceptor_record_is_replaced_only_if_unchanged(storage_factory: StorageFactory
                                                             ) -> None:
    """The compare-and-set several processes decide Paxos steps with: a step taken on a
    state that changed meanwhile is not kept."""
    async with opened(storage_factory) as s:
        assert not await s.put_acceptor_record_if(G1, 1, b"never written", b"x")
        assert await s.acceptor_record(G1, 1) is None
        assert await s.put_acceptor_record_if(G1, 1, None, b"promised 1")
        assert not await s.put_acceptor_record_if(G1, 1, None, b"promised 2")
        assert not await s.put_acceptor_record_if(G1, 1, b"stale", b"promised 2")
        assert await s.put_acceptor_record_if(G1, 1, b"promised 1", b"accepted 1")
        assert await s.acceptor_record(G1, 1) == b"accepted 1"
        results = []

        async def step(record: bytes) -> None:
            results.append(await s.put_acceptor_record_if(G1, 1, b"accepted 1", record))

        async with trio.open_nursery() as nursery:  # in one batch: the first one wins
            for i in range(5):
                nursery.start_soon(step, b"step %d" % i)
        assert sorted(results) == [False] * 4 + [True]
        assert await s.acceptor_record(G1, 1) in {b"step %d" % i for i in range(5)}
    async with opened(storage_factory) as s:
        assert (await s.acceptor_record(G1, 1) or b"").startswith(b"step ")


# -- envelopes ------------------------------------------------------------------------------------


async def test_envelopes_are_idempotent_and_conflicts_refused(storage_factory: StorageFactory
                                                              ) -> None:
    async with opened(storage_factory) as s:
        await new_group(s)
        assert await s.store_envelope(G1, A, 1, b"digest 1", b"envelope one")
        used = len(GENESIS) + len(b"envelope one")
        assert (await s.group(G1)) == GroupRecord(CREATOR, 0, used)
        assert not await s.store_envelope(G1, A, 1, b"digest 1", b"envelope one")
        with pytest.raises(StorageConflict):
            await s.store_envelope(G1, A, 1, b"digest X", b"another envelope")
        assert (await s.group(G1)) == GroupRecord(CREATOR, 0, used)
        assert await s.envelopes_after(G1, {}, limit=10, max_bytes=BIG) == \
            ([b"envelope one"], False)


async def test_envelope_staged_once_for_a_new_envelope_only(storage_factory: StorageFactory
                                                            ) -> None:
    """``staged`` (the early push) fires once for a new envelope, never for a duplicate, a
    conflict or one the compacted state covers; and by the time the write returns."""
    async with opened(storage_factory) as s:
        await new_group(s)
        calls: list[str] = []
        assert await s.store_envelope(G1, A, 1, b"d1", b"e1", staged=lambda: calls.append("1"))
        assert calls == ["1"]
        assert not await s.store_envelope(G1, A, 1, b"d1", b"e1",
                                          staged=lambda: calls.append("dup"))
        with pytest.raises(StorageConflict):
            await s.store_envelope(G1, A, 1, b"dX", b"eX", staged=lambda: calls.append("x"))
        assert await s.store_envelope(G1, A, 2, b"d2", b"e2", staged=lambda: calls.append("2"))
        assert calls == ["1", "2"]


async def test_envelopes_after_orders_by_sender_and_pages(storage_factory: StorageFactory
                                                          ) -> None:
    def env(sender: bytes, seq: int) -> bytes:
        return sender[:1] + bytes([seq]) * 99

    async with opened(storage_factory) as s:
        await new_group(s)
        await new_group(s, G2)
        for sender, seq in ((B, 2), (A, 3), (B, 1), (A, 1), (B, 3), (A, 2)):
            await s.store_envelope(G1, sender, seq, b"d", env(sender, seq))
        await s.store_envelope(G2, A, 1, b"d", b"elsewhere")

        async def page(marks: dict[bytes, int], limit: int = 100, max_bytes: int = BIG
                       ) -> tuple[list[bytes], bool]:
            return await s.envelopes_after(G1, marks, limit=limit, max_bytes=max_bytes)

        everything = [env(A, 1), env(A, 2), env(A, 3), env(B, 1), env(B, 2), env(B, 3)]
        assert await page({}) == (everything, False)
        assert await page({A: 2}) == ([env(A, 3), env(B, 1), env(B, 2), env(B, 3)], False)
        assert await page({A: 3, B: 1}) == ([env(B, 2), env(B, 3)], False)
        assert await page({A: 9, B: 9}) == ([], False)
        assert await page({}, limit=4) == (everything[:4], True)
        assert await page({}, limit=6) == (everything, False)
        assert await page({}, limit=3) == (everything[:3], True)  # more: at the next sender
        assert await page({}, max_bytes=250) == (everything[:2], True)
        assert await page({}, max_bytes=10) == (everything[:1], True)  # the first always
        assert await s.envelopes_after(G3, {}, limit=10, max_bytes=BIG) == ([], False)


# -- equivocation evidence ------------------------------------------------------------------------


async def test_envelope_marks_stop_at_the_first_gap(storage_factory: StorageFactory) -> None:
    async with opened(storage_factory) as s:
        await new_group(s)
        await new_group(s, G2)
        assert await s.envelope_marks(G1) == {} and await s.envelope_count(G1) == 0
        for sender, seqs in ((A, (1, 2, 3, 5, 6)), (B, (2, 3)), (R1, (1,))):
            for seq in seqs:
                await s.store_envelope(G1, sender, seq, b"d%d" % seq, b"e%d" % seq)
        await s.store_envelope(G2, R2, 1, b"d", b"e")
        # A: 1..3 then a gap; B: no seq 1 (nothing to resume from); R1: just 1.
        assert await s.envelope_marks(G1) == {A: 3, R1: 1}
        assert await s.envelope_count(G1) == 8 and await s.envelope_count(G2) == 1
        await s.store_envelope(G1, A, 4, b"d4", b"e4")
        assert (await s.envelope_marks(G1))[A] == 6


async def test_envelope_digests_answer_held_keys_only(storage_factory: StorageFactory
                                                     ) -> None:
    async with opened(storage_factory) as s:
        await new_group(s)
        await new_group(s, G2)
        await s.store_envelope(G1, A, 1, b"d1", b"e1")
        await s.store_envelope(G1, A, 3, b"d3", b"e3")
        await s.store_envelope(G2, A, 2, b"x2", b"e2")
        assert await s.envelope_digests(G1, [(A, 1), (A, 2), (A, 3), (B, 1)]) == {
            (A, 1): b"d1", (A, 3): b"d3"}
        assert await s.envelope_digests(G1, []) == {}


async def test_statement_clock_only_rises_and_survives_reopening(
        storage_factory: StorageFactory) -> None:
    """The reservation a syncnode's signed statements are stamped below (proto.holdings): a
    restarted node must start above it, so it is durable and never lowered."""
    async with opened(storage_factory) as s:
        assert await s.statement_clock() == 0
        await s.reserve_statement_clock(5_000)
        await s.reserve_statement_clock(3_000)
        assert await s.statement_clock() == 5_000
        await s.reserve_statement_clock(1_800_000_000_000)
    async with opened(storage_factory) as s:
        assert await s.statement_clock() == 1_800_000_000_000
async def test_envelope_summary_follows_every_store(storage_factory: StorageFactory) -> None:
    def summary(seqs: tuple[int, ...], contiguous: int) -> SenderSummary:
        return SenderSummary(len(seqs), max(seqs), contiguous,
                             sum(digest_term(b"d%d" % q) for q in seqs) % (1 << 63))

    async with opened(storage_factory) as s:
        await new_group(s)
        await new_group(s, G2)
        assert await s.envelope_summary(G1) == {}
        for seq in (5, 3, 1, 2):  # out of order, with a gap at 4
            await s.store_envelope(G1, A, seq, b"d%d" % seq, b"e%d" % seq)
        await s.store_envelope(G1, A, 3, b"d3", b"e3")  # again: idempotent, not counted
        await s.store_envelope(G1, B, 2, b"d2", b"e2")
        await s.store_envelope(G2, A, 1, b"d1", b"e1")
        assert await s.envelope_summary(G1) == {A: summary((1, 2, 3, 5), 3),
                                                B: summary((2,), 0)}
        with pytest.raises(StorageConflict):
            await s.store_envelope(G1, A, 2, b"other", b"x")
        await s.store_envelope(G1, A, 4, b"d4", b"e4")  # the gap filled: contiguous jumps
        assert (await s.envelope_summary(G1))[A] == summary((1, 2, 3, 4, 5), 5)
        assert await s.envelope_summary(G2) == {A: summary((1,), 1)}
        # The same set stored in another order sums the same (what peers compare).
        await new_group(s, G3)
        for seq in (4, 2, 5, 1, 3):
            await s.store_envelope(G3, A, seq, b"d%d" % seq, b"e%d" % seq)
        assert (await s.envelope_summary(G3))[A] == (await s.envelope_summary(G1))[A]
        assert await s.delete_group(G1)
        assert await s.envelope_summary(G1) == {}
    async with opened(storage_factory) as s:  # kept across reopening
        assert await s.envelope_summary(G2) == {A: summary((1,), 1)}


async def test_equivocation_keeps_the_first_proof(storage_factory: StorageFactory) -> None:
    async with opened(storage_factory) as s:
        assert await s.equivocation(G1, 3) is None
        await s.put_equivocation(G1, 3, b"first proof")
        await s.put_equivocation(G1, 3, b"second proof")
        await s.put_equivocation(G1, 4, b"slot 4")
        assert await s.equivocation(G1, 3) == b"first proof"
        assert await s.equivocation(G1, 4) == b"slot 4"
        assert await s.equivocation(G2, 3) is None


# -- mailbox --------------------------------------------------------------------------------------


async def test_mailbox_orders_pages_acks_and_expires(storage_factory: StorageFactory) -> None:
    async with opened(storage_factory) as s:
        ids = [(await put(s, R1, bytes([i]) * 100, ttl=100 * (i + 1)))[0] for i in range(4)]
        other, _ = await put(s, R2, b"for r2", kind=JOIN_REQUEST_KIND, sender=B)
        assert ids == sorted(ids) and len({*ids, other}) == 5 and min(ids) > 0

        async def page(after: int = 0, now: int = 0, limit: int = 100, max_bytes: int = BIG
                       ) -> tuple[list[int], bool]:
            items, more = await s.mailbox_items(R1, after=after, now=now, limit=limit,
                                                max_bytes=max_bytes)
            for item in items:
                i = ids.index(item.item_id)
                assert (item.kind, item.payload, item.expires_at) == \
                    (WELCOME, bytes([i]) * 100, 100 * (i + 1))
            return [item.item_id for item in items], more

        assert await page() == (ids, False)
        assert await page(after=ids[1]) == (ids[2:], False)
        assert await page(limit=2) == (ids[:2], True)
        assert await page(limit=4) == (ids, False)
        assert await page(max_bytes=250) == (ids[:2], True)
        assert await page(max_bytes=10) == (ids[:1], True)  # the first always
        assert await page(now=100) == (ids[1:], False)  # expires_at <= now: not served
        assert await page(now=400) == ([], False)
        assert await s.mailbox_usage() == MailboxUsage(join_requests=6, other=400)
        assert await s.mailbox_ack(R1, [ids[0], other, 10**9]) == 1  # only R1's own
        assert await s.mailbox_ack(R1, [ids[0]]) == 0
        assert await page() == (ids[1:], False)
        assert await s.mailbox_usage() == MailboxUsage(join_requests=6, other=300)
        assert await s.mailbox_expire(200) == 1  # ids[1], expiring at 200
        assert await page() == (ids[2:], False)
        assert await s.mailbox_usage() == MailboxUsage(join_requests=6, other=200)
        assert await s.mailbox_expire(10**6) == 3
        assert await s.mailbox_usage() == MailboxUsage(join_requests=0, other=0)


async def test_mailbox_recipient_quota_counts_unexpired_items(storage_factory: StorageFactory
                                                              ) -> None:
    quota = MailboxQuota(items_per_recipient=2, bytes_per_sender=BIG, items_per_sender=None,
                         class_bytes=BIG, make_room=False)
    async with opened(storage_factory) as s:
        await put(s, R1, b"a", quota=quota, ttl=10)
        await put(s, R1, b"b", quota=quota, ttl=1000)
        r = await s.mailbox_put(R1, WELCOME, b"c", sender=A, size=1, now=0, expires_at=100,
                                quota=quota)
        assert (r.refused, r.limit, r.item_id) == (MailboxRefusal.RECIPIENT_FULL, 2, 0)
        assert (await put(s, R2, b"c", quota=quota))[1] is None  # another recipient
        # At now=10 the first item expired: it goes, and makes room.
        assert (await put(s, R1, b"c", quota=quota, now=10))[1] is None
        items, _ = await s.mailbox_items(R1, after=0, now=0, limit=10, max_bytes=BIG)
        assert [i.payload for i in items] == [b"b", b"c"]
        assert (await put(s, R1, b"d", quota=quota, now=10))[1] is MailboxRefusal.RECIPIENT_FULL


async def test_mailbox_sender_quota_bytes_then_items(storage_factory: StorageFactory) -> None:
    by_bytes = MailboxQuota(items_per_recipient=100, bytes_per_sender=300,
                            items_per_sender=None, class_bytes=BIG, make_room=False)
    by_items = MailboxQuota(items_per_recipient=100, bytes_per_sender=BIG, items_per_sender=1,
                            class_bytes=BIG, make_room=False)
    async with opened(storage_factory) as s:
        await put(s, R1, b"x" * 200, quota=by_bytes)
        r = await s.mailbox_put(R2, WELCOME, b"y" * 101, sender=A, size=101, now=0,
                                expires_at=100, quota=by_bytes)
        assert (r.refused, r.sender_bytes, r.sender_items) == \
            (MailboxRefusal.SENDER_QUOTA, 200, 1)
        assert (await put(s, R2, b"y" * 100, quota=by_bytes))[1] is None  # exactly 300
        assert (await put(s, R2, b"z" * 200, sender=B, quota=by_bytes))[1] is None
        r = await s.mailbox_put(R1, JOIN_REQUEST_KIND, b"j", sender=B, size=1, now=0,
                                expires_at=100, quota=by_items)
        assert (r.refused, r.sender_bytes, r.sender_items) == \
            (MailboxRefusal.SENDER_QUOTA, 200, 1)
        assert await s.mailbox_usage() == MailboxUsage(join_requests=0, other=500)


async def test_mailbox_node_quota_is_per_class(storage_factory: StorageFactory) -> None:
    full = MailboxQuota(items_per_recipient=100, bytes_per_sender=BIG, items_per_sender=None,
                        class_bytes=300, make_room=False)
    async with opened(storage_factory) as s:
        await put(s, R1, b"x" * 200, quota=full)
        assert (await put(s, R1, b"y" * 101, sender=B, quota=full))[1] is \
            MailboxRefusal.NODE_QUOTA
        assert (await put(s, R1, b"y" * 100, sender=B, quota=full))[1] is None
        # Join requests are the other class: their own share.
        assert (await put(s, R2, b"j" * 300, kind=JOIN_REQUEST_KIND, quota=full))[1] is None
        assert await s.mailbox_usage() == MailboxUsage(join_requests=300, other=300)


async def test_mailbox_make_room_evicts_the_oldest_of_the_class(storage_factory: StorageFactory
                                                               ) -> None:
    share = MailboxQuota(items_per_recipient=100, bytes_per_sender=BIG, items_per_sender=None,
                         class_bytes=500, make_room=True)
    async with opened(storage_factory) as s:
        welcome, _ = await put(s, R1, b"w" * 1000)  # another class: never evicted
        ids = [(await put(s, R2, bytes([i]) * 200, kind=JOIN_REQUEST_KIND, quota=share))[0]
               for i in range(2)]
        r = await s.mailbox_put(R1, JOIN_REQUEST_KIND, b"n" * 200, sender=B, size=200, now=0,
                                expires_at=100, quota=share)
        assert r.refused is None and r.evicted == 1 and r.item_id > ids[-1]
        got, _ = await s.mailbox_items(R2, after=0, now=0, limit=10, max_bytes=BIG)
        assert [i.item_id for i in got] == ids[1:]  # the oldest went
        r = await s.mailbox_put(R1, JOIN_REQUEST_KIND, b"n" * 450, sender=B, size=450, now=0,
                                expires_at=100, quota=share)
        assert r.refused is None and r.evicted == 2
        r = await s.mailbox_put(R1, JOIN_REQUEST_KIND, b"n" * 501, sender=B, size=501, now=0,
                                expires_at=100, quota=share)
        assert r.refused is MailboxRefusal.NODE_QUOTA and r.evicted == 0  # too big to fit
        assert await s.mailbox_usage() == MailboxUsage(join_requests=450, other=1000)
        items, _ = await s.mailbox_items(R1, after=0, now=0, limit=10, max_bytes=BIG)
        assert items[0].item_id == welcome


# -- address records ------------------------------------------------------------------------------


async def test_address_records_keep_the_newest_within_capacity(storage_factory: StorageFactory
                                                               ) -> None:
    n1, n2 = b"1" * 32, b"2" * 32
    async with opened(storage_factory) as s:
        assert await s.address_record(n1) is None
        assert await s.put_address_record(n1, 10, b"at 10", capacity=1)
        assert not await s.put_address_record(n1, 10, b"again at 10", capacity=1)
        assert not await s.put_address_record(n1, 5, b"older", capacity=1)
        assert await s.address_record(n1) == b"at 10"
        assert not await s.put_address_record(n2, 1, b"full", capacity=1)
        assert await s.put_address_record(n1, 11, b"at 11", capacity=1)  # full, but n1's own
        assert await s.address_record(n1) == b"at 11"
        assert await s.put_address_record(n2, 1, b"n2", capacity=2)
        assert await s.address_record(n2) == b"n2"


# -- durability and group commit ------------------------------------------------------------------


# -- compaction -----------------------------------------------------------------------------------


async def test_compaction_deletes_covered_envelopes_but_the_state(storage_factory: StorageFactory
                                                                   ) -> None:
    async with opened(storage_factory) as s:
        await new_group(s)
        await new_group(s, G2)
        for sender, seqs in ((A, (1, 2, 3, 4, 6)), (B, (1, 2, 3))):
            for seq in seqs:
                await s.store_envelope(G1, sender, seq, b"d%d" % seq, b"%s%d" % (sender[:1], seq))
        await s.store_envelope(G2, A, 1, b"d1", b"other group")
        assert await s.envelope(G1, A, 3) == (b"d3", b"\x0a3")
        assert await s.envelope(G1, A, 5) is None and await s.compaction(G1) is None
        before = (await s.group(G1)).bytes_used  # type: ignore[union-attr]
        # A's 3 is the state: A 1..3 and B 1..2 are in it.
        freed = await s.compact_envelopes(G1, b"point 1", {A: 3, B: 2}, (A, 3))
        assert freed == 4 * 2
        assert (await s.group(G1)).bytes_used == before - freed  # type: ignore[union-attr]
        assert await s.compaction(G1) == b"point 1"
        assert await s.envelopes_after(G1, {}, limit=10, max_bytes=BIG) == \
            ([b"\x0a3", b"\x0a4", b"\x0a6", b"\x0b3"], False)
        assert await s.envelope_count(G1) == 4 and await s.envelope_count(G2) == 1
        # Covered seqs count as stored; A stops at its gap (5), B goes on from 2.
        assert await s.envelope_marks(G1) == {A: 4, B: 3}
        # A covered envelope sent again (a device resending its outbox) is not kept again,
        # nor counted; the state envelope is still idempotent; above the point is as before.
        assert not await s.store_envelope(G1, B, 1, b"d1", b"\x0b1")
        assert not await s.store_envelope(G1, A, 3, b"d3", b"\x0a3")
        with pytest.raises(StorageConflict):
            await s.store_envelope(G1, A, 3, b"dX", b"another")
        assert await s.store_envelope(G1, A, 5, b"d5", b"\x0a5")
        assert await s.envelope_count(G1) == 5
        assert (await s.group(G1)).bytes_used == before - freed + 2  # type: ignore[union-attr]
        assert await s.envelope_marks(G1) == {A: 6, B: 3}


async def test_compaction_points_only_advance_and_go_with_the_group(
        storage_factory: StorageFactory) -> None:
    async with opened(storage_factory) as s:
        await new_group(s)
        for seq in (1, 2, 3, 4):
            await s.store_envelope(G1, A, seq, b"d%d" % seq, b"e%d" % seq)
        await s.store_envelope(G1, B, 1, b"d1", b"f1")
        await s.compact_envelopes(G1, b"point 1", {A: 2, B: 1}, (A, 2))
        with pytest.raises(StorageConflict):  # covers less of B
            await s.compact_envelopes(G1, b"point 0", {A: 4}, (A, 4))
        with pytest.raises(StorageConflict):  # not hosted
            await s.compact_envelopes(G2, b"point", {A: 1}, (A, 1))
        assert await s.compaction(G1) == b"point 1"
        assert await s.compact_envelopes(G1, b"point 2", {A: 4, B: 1}, (A, 4)) == 4
        assert await s.envelopes_after(G1, {}, limit=10, max_bytes=BIG) == ([b"e4"], False)
    async with opened(storage_factory) as s:  # durable
        assert await s.compaction(G1) == b"point 2"
        assert await s.envelope_marks(G1) == {A: 4, B: 1}
        assert await s.delete_group(G1)
        await new_group(s)  # the id taken again starts with no compaction
        assert await s.compaction(G1) is None
        assert await s.store_envelope(G1, A, 1, b"d1", b"e1")


async def write_one_of_everything(s: Storage) -> None:
    await new_group(s)
    await decide(s, G1, 1)
    await s.put_acceptor_records([(G1, 2, b"promise")])
    await s.store_envelope(G1, A, 1, b"digest", b"envelope")
    await s.put_equivocation(G1, 1, b"proof")
    await put(s, R1, b"item")
    await s.put_address_record(b"n" * 32, 7, b"record", capacity=10)


async def check_one_of_everything(s: Storage) -> None:
    assert await s.group(G1) == GroupRecord(CREATOR, 1, len(GENESIS) + len(b"value 1")
                                            + len(b"envelope"))
    assert await s.group_ids() == [G1]
    assert await s.decided(G1, 1) == DecidedRecord(b"value 1", b"cert 1")
    assert await s.manifest(G1, 1) == b"manifest 1"
    assert await s.acceptor_record(G1, 2) == b"promise"
    assert await s.envelopes_after(G1, {}, limit=10, max_bytes=BIG) == ([b"envelope"], False)
    assert await s.equivocation(G1, 1) == b"proof"
    items, _ = await s.mailbox_items(R1, after=0, now=0, limit=10, max_bytes=BIG)
    assert [i.payload for i in items] == [b"item"]
    assert await s.mailbox_usage() == MailboxUsage(0, 4)
    assert await s.address_record(b"n" * 32) == b"record"


async def test_everything_survives_reopening(storage_factory: StorageFactory) -> None:
    async with opened(storage_factory) as s:
        await write_one_of_everything(s)
        await check_one_of_everything(s)
        assert s.size_bytes() > 0
    async with opened(storage_factory) as s:
        await check_one_of_everything(s)
        assert not await s.create_group(G1, CREATOR, GENESIS, 1.0)


async def test_acknowledged_writes_survive_a_crash(storage_factory: StorageFactory) -> None:
    async with crashing(storage_factory) as s:
        await write_one_of_everything(s)
    async with opened(storage_factory) as s:
        await check_one_of_everything(s)


async def test_concurrent_writes_share_commits_and_fail_alone(storage_factory: StorageFactory
                                                             ) -> None:
    n = 200
    batches: list[int] = []
    outcomes: dict[int, bool | str] = {}
    store = storage_factory()
    store.on_batch = lambda size, seconds: batches.append(size)
    async with opened(lambda: store) as s:
        await new_group(s)
        await s.store_envelope(G1, B, 1, b"digest", b"taken")
        batches.clear()

        async def one(seq: int) -> None:
            try:
                if seq == n // 2:  # a conflicting write in the middle of the crowd
                    outcomes[seq] = await s.store_envelope(G1, B, 1, b"other", b"conflict")
                else:
                    outcomes[seq] = await s.store_envelope(G1, A, seq, b"d", b"e%d" % seq)
            except StorageConflict:
                outcomes[seq] = "conflict"

        async with trio.open_nursery() as nursery:
            for seq in range(1, n + 1):
                nursery.start_soon(one, seq)
        assert outcomes == {seq: "conflict" if seq == n // 2 else True
                            for seq in range(1, n + 1)}
        assert sum(batches) == n and len(batches) <= n // 4, batches
        stored, more = await s.envelopes_after(G1, {}, limit=1000, max_bytes=BIG)
        assert len(stored) == n and not more
    async with opened(storage_factory) as s:  # and they are durable
        assert len((await s.envelopes_after(G1, {}, limit=1000, max_bytes=BIG))[0]) == n


async def test_barrier_waits_for_earlier_writes(storage_factory: StorageFactory) -> None:
    async with opened(storage_factory) as s:
        await new_group(s)
        async with trio.open_nursery() as nursery:
            for seq in range(1, 51):
                nursery.start_soon(s.store_envelope, G1, A, seq, b"d", b"e")
            await trio.testing.wait_all_tasks_blocked()  # every write has been called
            await s.barrier()
            stored, _ = await s.envelopes_after(G1, {}, limit=100, max_bytes=BIG)
            assert len(stored) == 50


async def test_no_writes_after_close(storage_factory: StorageFactory) -> None:
    async with opened(storage_factory) as s:
        await new_group(s)
    with pytest.raises(StorageClosed):
        await s.put_acceptor_records([(G1, 1, b"late")])


async def test_incarnation_is_kept_for_life_and_new_storage_gets_another(
        storage_factory: StorageFactory, fresh_storage_factory: StorageFactory) -> None:
    """The incarnation every signed statement names (proto.holdings): the same for the whole
    life of the storage (reopened, crashed), or an honest node would look like one that lost
    its data; different for new storage, or a node that lost its data would be convicted of
    withholding what it acknowledged before."""
    async with opened(storage_factory) as s:
        first = await s.incarnation()
        assert len(first) == 16
        assert await s.incarnation() == first
        await new_group(s)
    async with crashing(storage_factory) as s:
        assert await s.incarnation() == first
        await s.store_envelope(G1, A, 1, b"d1", b"e1")
    async with opened(storage_factory) as s:
        assert await s.incarnation() == first
    async with opened(fresh_storage_factory) as s:
        fresh = await s.incarnation()
        assert len(fresh) == 16 and fresh != first
    async with opened(fresh_storage_factory) as s:
        assert await s.incarnation() == fresh


async def test_compacted_copies_of_a_group_summarize_alike(storage_factory: StorageFactory
                                                           ) -> None:
    """Two syncnodes that applied the same point and hold the same tail must look in sync to
    the reconciler, although one held every covered envelope and the other, which pulled the
    group after the compaction, only the state (here: G1 and G2 as the two copies)."""
    async with opened(storage_factory) as s:
        await new_group(s)
        await new_group(s, G2)
        for seq in (1, 2, 3, 4, 5):
            await s.store_envelope(G1, A, seq, b"d%d" % seq, b"e%d" % seq)
        for seq in (1, 2):
            await s.store_envelope(G1, B, seq, b"b%d" % seq, b"f%d" % seq)
        await s.store_envelope(G2, A, 3, b"d3", b"e3")  # the state only, then the tail
        await s.store_envelope(G2, A, 5, b"d5", b"e5")
        await s.store_envelope(G2, A, 4, b"d4", b"e4")
        assert await s.envelope_summary(G1) != await s.envelope_summary(G2)
        for g in (G1, G2):
            await s.compact_envelopes(g, b"point", {A: 3, B: 2}, (A, 3))
        assert await s.envelope_summary(G1) == await s.envelope_summary(G2)
        assert await s.envelope_marks(G1) == await s.envelope_marks(G2) == {A: 5, B: 2}
        await s.store_envelope(G1, B, 3, b"b3", b"f3")  # the tail grows on one copy only
        assert await s.envelope_summary(G1) != await s.envelope_summary(G2)
        await s.store_envelope(G2, B, 3, b"b3", b"f3")
        assert await s.envelope_summary(G1) == await s.envelope_summary(G2)
