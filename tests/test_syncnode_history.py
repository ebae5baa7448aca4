"""Changing a group's syncnodes, the syncnode side (issue 16): adopting a group after its
genesis with its history, and a removed syncnode. Real services on the memory transport, real
SQLite, real MLS commits and certificates."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from proto.envelope import Envelope
from proto.manifest import LogValue, Role, SyncnodeEntry, next_manifest, sign_value
from proto.messages import ErrorCode, ErrorReply
from proto.paxos.messages import Decided, value_hash
from proto.rpc import RemoteError, SyncnodeClient
from proto.transport.memory import MemoryNetwork
from syncnode import peers as peers_module
from syncnode.config import Limits
from syncnode.history import HistoryPull, envelope_problem, holders_needed
from syncnode.storage.sqlite_schema import groups_in_progress, summary
from tests.syncnode_kit import (
    Device,
    Group,
    MemoryCluster,
    add_value,
    decide,
    new_group,
    signed_prepare,
    update_value,
)


@pytest.fixture
async def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                  ) -> AsyncIterator[MemoryCluster]:
    # A stopped peer is dialled in these tests: its dial hangs until this timeout.
    monkeypatch.setattr(peers_module, "CONNECT_TIMEOUT", 0.5)
    net = MemoryNetwork(seed=7)
    async with trio.open_nursery() as nursery:
        await nursery.start(net.run)
        c = MemoryCluster(net, nursery, tmp_path, Limits(removed_group_retention=60.0))
        for _ in range(3):
            await c.start_node()
        yield c
        nursery.cancel_scope.cancel()


def syncnodes_value(g: Group, admin: Device, syncnodes: Sequence[SyncnodeEntry]) -> LogValue:
    """An admin's commit naming a new syncnode set (an MLS update commit, as rotate_keys)."""
    commit = admin.mls.update()
    m = next_manifest(g.manifest, commit, syncnodes=tuple(syncnodes))
    return sign_value(admin.key, m, commit)


async def commit(g: Group, admin: Device, clients: Sequence[SyncnodeClient], value: LogValue,
                 members: Sequence[Device] = ()) -> Decided:
    """Decide ``value`` as the next slot; every syncnode reached learns it; MLS follows."""
    outcome = await decide(g, admin, clients, value)
    assert isinstance(outcome, Decided)
    for c in clients:  # the proposer announces to a quorum only: make sure each learned it
        await c.learn(outcome)
    admin.mls.apply(value.commit)
    for m in members:
        m.mls.apply(value.commit)
    return outcome


async def store_all(clients: Sequence[SyncnodeClient], envs: Sequence[Envelope]) -> None:
    for c in clients:
        for env in envs:
            await c.store(env)


def seal(d: Device, g: Group, seq: int, epoch: int) -> Envelope:
    return Envelope.seal(d.key, g.group_id, seq, epoch, d.mls.encrypt(b"%s %d" % (
        d.name.encode(), seq)))


async def group_with_history(cluster: MemoryCluster, alice: Device, bob: Device) -> Group:
    """A group on the three nodes with 2 decided slots and 10 envelopes from 2 senders; bob's
    4 and 5 reached only B and C (a quorum)."""
    g = new_group(alice, [n.entry for n in cluster.nodes])
    async with cluster.clients(alice) as clients:
        for cl in clients:
            await cl.register_group(g.values[0])
        value = add_value(g, alice, [bob])
        await commit(g, alice, clients, value)
        bob.mls.join(value.welcome)
        await store_all(clients, [seal(alice, g, s, 1) for s in range(1, 5)])
    async with cluster.clients(bob) as clients:
        await store_all(clients, [seal(bob, g, s, 1) for s in range(1, 4)])
        await store_all(clients[1:], [seal(bob, g, s, 1) for s in (4, 5)])
    async with cluster.clients(alice) as clients:
        await commit(g, alice, clients, update_value(g, alice), [bob])
        await store_all(clients, [seal(alice, g, 5, 2)])
    return g


async def wait_until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Wait (polling) until ``check()`` holds (an async read of a service's state)."""
    with trio.move_on_after(20) as scope:
        while not await check():  # noqa: ASYNC110 - the condition is another task's progress
            await trio.sleep(0.01)
    if scope.cancelled_caught:
        raise AssertionError(f"timed out waiting for {what}")


async def test_a_new_syncnode_adopts_a_group_with_its_history(cluster: MemoryCluster) -> None:
    alice, bob = Device("alice"), Device("bob")
    a, b, c = cluster.nodes
    g = await group_with_history(cluster, alice, bob)
    d = await cluster.start_node()
    async with cluster.clients(alice, [a, b, c]) as clients:
        named = await commit(g, alice, clients, syncnodes_value(
            g, alice, [a.entry, b.entry, c.entry, d.entry]), [bob])
    assert named.certificate.slot == 3
    async with cluster.clients(alice, [d]) as (dc,):
        # The genesis does not name D: RegisterGroup is refused, AdoptGroup is taken.
        with pytest.raises(RemoteError, match="does not name this syncnode"):
            await dc.register_group(g.values[0])
        reg = await dc.adopt_group(g.values[0], named)
        assert reg.created and not (await dc.adopt_group(g.values[0], named)).created
        status = await dc.group_status(g.group_id)
        assert (status.top, status.serving, status.history_complete) == (0, False, False)
    assert summary(d.path)["catching_up"] == 1

    # The decided log comes from the hints (A, B, C); at slot 3 D is named: serving.
    await d.peers.catch_up(g.group_id)
    rec = await d.service.hosting.record(g.group_id)
    assert (await d.service.group(g.group_id)).top == 3 and rec.serving
    assert not rec.history_complete

    # With B and C down, a pass from A alone is not enough: 3 syncnodes, quorum 2 -> 2 passes.
    assert holders_needed(g.values[2].manifest) == 2
    await cluster.stop_node(b)
    await cluster.stop_node(c)
    pull = HistoryPull(d.service, d.peers)
    assert not await pull.pull(g.group_id)
    async with cluster.clients(alice, [d]) as (dc,):
        status = await dc.group_status(g.group_id)
        assert status.serving and not status.history_complete
        assert status.envelopes == 8  # A lacks bob's 4 and 5
    assert summary(d.path)["pulling"] == 1
    assert groups_in_progress(d.path) == [g.group_id.hex()]
    served_by_a = a.service.metrics.messages_served._value.get()
    assert served_by_a == 8

    # D restarts in the middle; B comes back. The pull resumes from what D stored.
    await cluster.stop_node(d)
    d = await cluster.start_node(d.key)
    b = await cluster.start_node(b.key)
    pull = HistoryPull(d.service, d.peers)
    await cluster.nursery.start(pull.run)  # resume() finds the incomplete group

    async def complete() -> bool:
        return (await d.service.hosting.record(g.group_id)).history_complete

    await wait_until(complete, "history complete")
    assert b.service.metrics.messages_served._value.get() == 2  # only what D lacked
    assert a.service.metrics.messages_served._value.get() == served_by_a  # nothing again
    async with cluster.clients(bob, [d]) as (dc,):
        status = await dc.group_status(g.group_id)
        assert (status.top, status.serving, status.history_complete, status.envelopes,
                status.removed_slot) == (3, True, True, 10, None)
        page = await dc.backfill(g.group_id, {})
        got = sorted((e.sender, e.seq) for e in page.envelopes)
        assert got == sorted([(alice.key_fpr, s) for s in range(1, 6)]
                             + [(bob.key_fpr, s) for s in range(1, 6)])
        assert bob.mls.decrypt(next(e for e in page.envelopes
                                    if e.sender == alice.key_fpr and e.seq == 5).ciphertext) \
            == b"alice 5"
    assert summary(d.path)["pulling"] == 0 and groups_in_progress(d.path) == []

    # D now votes: slot 4's acceptors are A, B, C, D (quorum 3; C is down).
    async with cluster.clients(alice, [a, b, d]) as clients:
        await commit(g, alice, clients, update_value(g, alice), [bob])
    assert (await d.service.group(g.group_id)).top == 4


async def test_an_adoption_the_log_does_not_confirm_is_dropped(cluster: MemoryCluster) -> None:
    alice = Device("alice")
    a, b, c = cluster.nodes
    g = new_group(alice, [n.entry for n in cluster.nodes])
    d = await cluster.start_node()
    async with cluster.clients(alice, [a, b, c]) as clients:
        for cl in clients:
            await cl.register_group(g.values[0])
        real = await commit(g, alice, clients, update_value(g, alice))
        await commit(g, alice, clients, syncnodes_value(
            g, alice, [a.entry, b.entry, c.entry, d.entry]))
    # A claim that slot 1 names D (D is named at slot 2): well formed, but not what was
    # decided (its certificate's signatures are for another value; D cannot tell yet).
    fake_value = sign_value(alice.key, replace(g.values[1].manifest, syncnodes=(
        *g.values[1].manifest.syncnodes, d.entry)), g.values[1].commit).encode()
    fake = Decided(fake_value, replace(real.certificate, value_hash=value_hash(fake_value)))
    async with cluster.clients(alice, [d]) as (dc,):
        wrong_slot = replace(fake, certificate=replace(fake.certificate, slot=2))
        with pytest.raises(RemoteError) as err:
            await dc.adopt_group(g.values[0], wrong_slot)
        assert err.value.code == ErrorCode.INVALID
        assert (await dc.adopt_group(g.values[0], fake)).created
    await d.peers.catch_up(g.group_id)  # verified slot 1 does not name D: dropped
    assert await d.service.group(g.group_id) is None
    assert await d.service.store.hosting(g.group_id) is None
    assert d.service.metrics.refused.labels("adoption_not_named")._value.get() == 1
    assert summary(d.path)["groups"] == 0


async def test_a_removed_syncnode_answers_gone_and_is_deleted_later(cluster: MemoryCluster
                                                                    ) -> None:
    alice, bob = Device("alice"), Device("bob")
    a, b, c = cluster.nodes
    g = new_group(alice, [n.entry for n in cluster.nodes])
    async with cluster.clients(alice) as clients:
        for cl in clients:
            await cl.register_group(g.values[0])
        value = add_value(g, alice, [bob])
        await commit(g, alice, clients, value)
        bob.mls.join(value.welcome)
        await store_all(clients, [seal(alice, g, 1, 1)])
        await commit(g, alice, clients, syncnodes_value(g, alice, [a.entry, b.entry]), [bob])
    async with cluster.clients(alice, [c]) as (cc,):
        with pytest.raises(RemoteError) as err:
            await cc.store(seal(alice, g, 2, 2))
        assert err.value.code == ErrorCode.GONE
        assert err.value.detail == "this syncnode no longer serves this group (removed at slot 2)"
        with pytest.raises(RemoteError) as err:
            async with cc.subscribe(g.group_id):
                pass
        assert err.value.code == ErrorCode.GONE
        reply = await cc.request(signed_prepare(alice, g.group_id, 3, 1))
        assert isinstance(reply, ErrorReply) and reply.code == ErrorCode.GONE
        decided_slot_2 = await cc.request(signed_prepare(alice, g.group_id, 2, 9))
        assert isinstance(decided_slot_2, Decided)  # a decided slot still answers its decision
        # Reads go on, so a device that was away learns where the group went.
        page = await cc.fetch_decided(g.group_id, 0)
        assert page.top == 2
        syncnodes = LogValue.decode(page.decided[-1].value).manifest.syncnodes
        assert [s.node_id for s in syncnodes] == [a.key.public, b.key.public]
        assert [h.top for h in (await cc.heads([g.group_id])).heads] == [2]
        status = await cc.group_status(g.group_id)
        assert (status.serving, status.removed_slot, status.envelopes) == (False, 2, 1)
    async with cluster.clients(None, [c]) as (anon,):
        with pytest.raises(RemoteError) as err:
            await anon.group_status(g.group_id)
        assert err.value.code == ErrorCode.UNAUTHORIZED
    async with cluster.clients(bob, [a]) as (ac,):  # the others go on
        assert (await ac.store(seal(bob, g, 1, 2))).seq == 1
        assert (await ac.group_status(g.group_id)).serving
    assert summary(c.path)["removed"] == 1

    # Retention: nothing before the grace period, then the periodic task deletes the group.
    assert await c.service.expire_removed() == 0
    later = c.service.clock() + 61
    c.service.clock = lambda: later
    async with trio.open_nursery() as nursery:
        nursery.start_soon(c.service.hosting.retention, 0.01)

        async def deleted() -> bool:
            return await c.service.group(g.group_id) is None

        await wait_until(deleted, "group deleted")
        nursery.cancel_scope.cancel()
    assert summary(c.path) == {"groups": 0, "envelopes": 0, "decisions": 0, "catching_up": 0,
                               "pulling": 0, "removed": 0}
    assert await b.service.group(g.group_id) is not None  # only C dropped it


async def test_retention_zero_keeps_a_removed_group(cluster: MemoryCluster) -> None:
    alice = Device("alice")
    a, b, c = cluster.nodes
    c.service.hosting.limits = replace(c.service.limits, removed_group_retention=0)
    g = new_group(alice, [n.entry for n in cluster.nodes])
    async with cluster.clients(alice) as clients:
        for cl in clients:
            await cl.register_group(g.values[0])
        await commit(g, alice, clients, syncnodes_value(g, alice, [a.entry, b.entry]))
    c.service.clock = lambda: 10.0 ** 12
    assert await c.service.expire_removed() == 0
    assert (await c.service.store.hosting(g.group_id)).removed_slot == 1


def test_pulled_envelopes_are_judged_at_their_epoch() -> None:
    alice, bob, mallory = Device("alice"), Device("bob"), Device("mallory")
    g = new_group(alice, [SyncnodeEntry(b"n" * 32, ())])
    g.values.append(add_value(g, alice, [bob]))
    bob.mls.join(g.values[1].welcome)
    m0, m1 = g.values[0].manifest, g.values[1].manifest
    env = Envelope.seal(bob.key, g.group_id, 1, 1, b"x")
    assert envelope_problem(m1, g.group_id, env) is None
    assert envelope_problem(m0, g.group_id, env) == \
        "sender is not a member at the envelope's epoch"
    assert envelope_problem(m1, b"o" * 32, env) == "envelope is for another group"
    forged = replace(Envelope.seal(mallory.key, g.group_id, 1, 1, b"x"), sender=bob.key_fpr)
    assert envelope_problem(m1, g.group_id, forged) == "envelope signature does not verify"
    as_reader = replace(m1, devices=tuple(replace(d, role=Role.READER) if d.fingerprint ==
                                          bob.key_fpr else d for d in m1.devices))
    assert envelope_problem(as_reader, g.group_id, env) == \
        "the sender is a reader at the envelope's epoch"
    assert holders_needed(m1) == 1


async def test_info_counts_groups_by_how_they_are_hosted(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from syncnode.cli import cli
    from syncnode.startup import init_data_dir
    from syncnode.storage import HostingRecord
    from syncnode.storage.sqlite import SqliteStorage

    init_data_dir(tmp_path)
    store = SqliteStorage(tmp_path / "syncnode.db")
    ids = [bytes([i]) * 32 for i in range(1, 6)]
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        for gid in ids[:2]:
            await store.create_group(gid, b"c" * 32, b"genesis", 1.0)
        await store.adopt_group(ids[2], b"c" * 32, b"genesis", 1.0, named_slot=3, adoption=b"")
        await store.adopt_group(ids[3], b"c" * 32, b"genesis", 1.0, named_slot=3, adoption=b"")
        await store.put_hosting(ids[3], HostingRecord(3, b"", True, False))
        await store.adopt_group(ids[4], b"c" * 32, b"genesis", 1.0, named_slot=3, adoption=b"")
        await store.put_hosting(ids[4], HostingRecord(3, b"", False, True, 7, 5.0))
        await store.aclose()
    out = CliRunner().invoke(cli, ["info", "--data-dir", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert "hosting:   2 caught up, 1 catching up the log, 1 pulling history, 1 removed" \
        in out.output
    assert f"not caught up: {ids[2].hex()}" in out.output
    assert f"not caught up: {ids[3].hex()}" in out.output
    js = CliRunner().invoke(cli, ["info", "--json", "--data-dir", str(tmp_path)])
    assert '"removed": 1' in js.output and '"pulling_history": 1' in js.output
