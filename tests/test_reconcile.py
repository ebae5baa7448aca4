"""A syncnode fills gaps in its copy of an active group from the group's other syncnodes
(:mod:`syncnode.reconcile`). Real services on the memory transport, real SQLite and MLS."""

from __future__ import annotations

from syncnode.history import HistoryPull
from syncnode.reconcile import Reconciler
from tests.syncnode_kit import Device, MemoryCluster
from tests.test_syncnode_history import cluster, group_with_history, seal  # noqa: F401


async def test_a_syncnode_fills_its_gaps_from_its_peers(cluster: MemoryCluster) -> None:  # noqa: F811
    alice, bob = Device("alice"), Device("bob")
    a = cluster.nodes[0]
    g = await group_with_history(cluster, alice, bob)  # bob's 4 and 5 reached only B and C
    rec = Reconciler(a.service, a.peers, HistoryPull(a.service, a.peers), interval=10.0)
    assert await a.service.store.envelope_marks(g.group_id) == {alice.key_fpr: 5, bob.key_fpr: 3}

    assert await rec.round() == 0  # no traffic since it started: nothing is compared

    async with cluster.clients(alice, [a]) as (ac,):
        await ac.store(seal(alice, g, 6, 2))  # traffic: the group is active
    assert await rec.round() == 2  # bob's 4 and 5, from B or C (each stored once)
    assert await a.service.store.envelope_marks(g.group_id) == {alice.key_fpr: 6, bob.key_fpr: 5}
    assert await rec.round() == 0  # nothing left to fill
