"""Anti-entropy among a group's syncnodes (:mod:`syncnode.reconcile`, :mod:`proto.antientropy`).
Real services on the memory transport, real SQLite and MLS."""

from __future__ import annotations

from pathlib import Path

from proto.antientropy import SenderMark, Summary, backfill_marks, group_digest
from syncnode.history import HistoryPull
from syncnode.reconcile import Reconciler
from tests.syncnode_kit import Device, MemoryCluster, Node, new_group
from tests.test_syncnode_history import (  # noqa: F401
    cluster,
    group_with_history,
    seal,
    store_all,
    wait_until,
)


def wipe(tmp_path: Path, node: Node) -> None:
    """Delete a stopped node's database (its key is kept by the caller)."""
    for p in tmp_path.glob(f"{node.key.public.hex()[:8]}.db*"):
        p.unlink()


def reconciler(node: Node, groups_per_round: int = 256) -> Reconciler:
    return Reconciler(node.service, node.peers, HistoryPull(node.service, node.peers),
                      interval=10.0, groups_per_round=groups_per_round)


def test_backfill_marks_ask_from_the_contiguous_mark_of_differing_senders() -> None:
    a, b, c = b"a" * 32, b"b" * 32, b"c" * 32
    ours = {a: Summary(4, 5, 3, 11), b: Summary(2, 2, 2, 7)}
    same_b = SenderMark(b, 2, 2, 2, 7)
    # In sync: nothing to ask.
    assert backfill_marks(ours, (SenderMark(a, 4, 5, 3, 11), same_b)) is None
    # They hold seq 4 of a, which we miss below our top 5: ask from our contiguous 3.
    assert backfill_marks(ours, (SenderMark(a, 5, 5, 5, 99), same_b)) == {a: 3, b: 2}
    # A sender we never saw: from 0. One whose seqs all lie within our run: nothing.
    assert backfill_marks(ours, (SenderMark(a, 3, 3, 3, 5), SenderMark(c, 1, 1, 1, 1))) == \
        {a: 3, c: 0}
    assert backfill_marks(ours, (SenderMark(a, 3, 3, 3, 5),)) is None
    # The digest follows the sums, not the order of arrival.
    assert group_digest(ours) == group_digest(dict(reversed(list(ours.items()))))
    assert group_digest(ours) != group_digest({a: Summary(4, 5, 3, 12), b: ours[b]})


async def test_a_quiet_group_is_compared_and_its_gaps_filled(cluster: MemoryCluster  # noqa: F811
                                                             ) -> None:
    alice, bob = Device("alice"), Device("bob")
    a, b, c = cluster.nodes
    g = await group_with_history(cluster, alice, bob)  # bob's 4 and 5 reached only B and C
    rec = reconciler(a)
    assert await a.service.store.envelope_marks(g.group_id) == {alice.key_fpr: 5, bob.key_fpr: 3}

    # No device stored anything since it started: the round robin compares it anyway.
    assert await rec.round() == 2  # bob's 4 and 5, from B or C (each stored once)
    assert await a.service.store.envelope_marks(g.group_id) == {alice.key_fpr: 5, bob.key_fpr: 5}
    assert rec.stats["handed_over"] == 0

    # In sync: one digest per peer, no marks, no backfill.
    served = [n.service.metrics.messages_served._value.get() for n in (b, c)]
    before = dict(rec.stats)
    assert await rec.round() == 0
    assert rec.stats["digest_requests"] - before["digest_requests"] == 2
    assert rec.stats["marks"] == before["marks"] and rec.stats["pages"] == before["pages"]
    assert [n.service.metrics.messages_served._value.get() for n in (b, c)] == served


async def test_a_seq_missing_below_the_top_is_fetched(cluster: MemoryCluster  # noqa: F811
                                                      ) -> None:
    """A holds alice's 1-3 and 5-7 (its contiguous mark is 3, its top 7): a peer's 4 fills
    the hole, and the contiguous mark jumps to 7."""
    alice, bob = Device("alice"), Device("bob")
    a, b, c = cluster.nodes
    g = await group_with_history(cluster, alice, bob)
    envs = {s: seal(alice, g, s, 2) for s in (6, 7, 8)}
    async with cluster.clients(alice, [a, b, c]) as (ac, bc, cc):
        await store_all([ac], [envs[7]])  # A: alice 1-5 and 7 (6 missing, below its top)
        await store_all([bc, cc], [envs[6], envs[7], envs[8]])
    summary = await a.service.store.envelope_summary(g.group_id)
    assert (summary[alice.key_fpr].top, summary[alice.key_fpr].contiguous) == (7, 5)
    rec = reconciler(a)
    assert await rec.round() == 4  # alice 6 and 8, bob 4 and 5
    summary = await a.service.store.envelope_summary(g.group_id)
    assert (summary[alice.key_fpr].top, summary[alice.key_fpr].contiguous) == (8, 8)
    assert await rec.round() == 0


async def test_a_wiped_syncnode_is_handed_its_groups_back(cluster: MemoryCluster,  # noqa: F811
                                                          tmp_path: Path) -> None:
    """C loses its data and comes back with the same key: B's reconciler finds C does not
    show the group, hands it over (AdoptGroup), and C pulls the log and every envelope from its
    peers, with no device involved."""
    alice, bob = Device("alice"), Device("bob")
    _a, b, c = cluster.nodes
    g = await group_with_history(cluster, alice, bob)
    await cluster.stop_node(c)
    wipe(tmp_path, c)
    c = await cluster.start_node(c.key)
    pull = HistoryPull(c.service, c.peers)
    await cluster.nursery.start(pull.run)
    await cluster.nursery.start(c.peers.run)
    assert await c.service.group(g.group_id) is None

    rec_b = reconciler(b)
    await rec_b.round()
    assert rec_b.stats["handed_over"] == 1
    assert await rec_b.round() == 0 and rec_b.stats["handed_over"] == 1  # not again at once

    async def complete() -> bool:
        return (await c.service.hosting.record(g.group_id)).history_complete

    await wait_until(complete, "C's history pulled again")
    assert (await c.service.group(g.group_id)).top == 2
    assert await c.service.store.envelope_marks(g.group_id) == \
        {alice.key_fpr: 5, bob.key_fpr: 5}
    assert await reconciler(c).round() == 0  # nothing left to fill


async def test_the_round_robin_visits_a_bounded_batch_of_groups(cluster: MemoryCluster  # noqa: F811
                                                                ) -> None:
    alice = Device("alice")
    a = cluster.nodes[0]

    ids = []
    async with cluster.clients(alice) as clients:
        for _ in range(5):
            g = new_group(alice, [n.entry for n in cluster.nodes])
            for cl in clients:
                await cl.register_group(g.values[0])
            ids.append(g.group_id)
    rec = reconciler(a, groups_per_round=2)
    seen = []
    for _ in range(5):
        seen.append(await rec._due())
    assert all(len(batch) == 2 for batch in seen)
    # Ascending, wrapping around: every group within ceil(5 / 2) rounds, then again.
    flat = [gid for batch in seen for gid in batch]
    assert set(flat[:6]) == set(ids)
    assert flat[:5] == sorted(ids)
