"""The syncnode service in-process: 3 nodes on the memory transport, real SQLite, real MLS."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from device.paxos_driver import ProposeFailed, propose
from proto.envelope import Envelope
from proto.manifest import Role, Rule, next_manifest, sign_value
from proto.messages import ErrorCode, ErrorReply
from proto.paxos.messages import (
    Decided,
    PaxosRejected,
)
from proto.paxos.proposer import Lost
from proto.rpc import RemoteError
from proto.service import GetChallenge, MailboxKind, RegisterGroup
from proto.transport.memory import MemoryNetwork
from syncnode.config import Limits
from tests.syncnode_kit import (
    Device,
    Group,
    MemoryCluster,
    add_value,
    decide,
    found_group,
    new_group,
    remove_value,
    signed_accept,
    signed_prepare,
    update_value,
)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[MemoryCluster]:
    net = MemoryNetwork(seed=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(net.run)
        c = MemoryCluster(net, nursery, tmp_path, Limits(max_groups_per_connection=5))
        for _ in range(3):
            await c.start_node()
        yield c
        nursery.cancel_scope.cancel()


async def test_genesis_paxos_learn_and_fetch(cluster: MemoryCluster) -> None:
    alice, bob = Device("alice"), Device("bob")
    g = new_group(alice, [n.entry for n in cluster.nodes])
    async with cluster.clients(alice) as clients:
        for c in clients:
            assert (await c.register_group(g.values[0])).created
        assert not (await clients[0].register_group(g.values[0])).created  # idempotent
        value = add_value(g, alice, [bob])
        outcome = await decide(g, alice, clients, value)
        assert isinstance(outcome, Decided)
        for c in clients:  # every syncnode learned and serves the decision
            page = await c.fetch_decided(g.group_id, 0)
            assert page.top == 1 and page.genesis == g.values[0].encode()
            assert [d.value for d in page.decided] == [value.encode()]
        # A proposer arriving late at a decided slot is told the decision, not a new vote.
        late = await clients[0].request(signed_prepare(alice, g.group_id, 1, 1))
        assert isinstance(late, Decided) and late.value == value.encode()


async def test_invalid_values_are_rejected_with_rule(cluster: MemoryCluster) -> None:
    alice, bob, mallory = Device("alice"), Device("bob"), Device("mallory")
    g = new_group(alice, [n.entry for n in cluster.nodes])
    async with cluster.clients(alice) as clients:
        for c in clients:
            await c.register_group(g.values[0])
        good = add_value(g, alice, [bob])
        # Roster lie: the manifest adds bob as admin... signed by alice (admin) is fine, so
        # instead claim a different device than the commit adds.
        lie = sign_value(alice.key, replace(good.manifest, devices=(
            good.manifest.devices[0], replace(mallory.entry(), leaf=1))), good.commit,
            good.welcome)
        forged = replace(good, signature=bytes(64))
        wrong_epoch = sign_value(alice.key, replace(good.manifest, epoch=5), good.commit)
        for i, (bad, rule) in enumerate([(lie, Rule.ROSTER_MISMATCH),
                                         (forged, Rule.BAD_SIGNATURE),
                                         (wrong_epoch, Rule.WRONG_EPOCH)]):
            with pytest.raises(ProposeFailed):
                await decide_quick(g, alice, clients, bad)
            reply = await _accept_reply(alice, clients[0], g, bad, 1000 * (i + 1))
            assert isinstance(reply, PaxosRejected) and reply.rule == rule, reply
        # A non-member cannot even prepare.
        reply = await clients[0].request(signed_prepare(mallory, g.group_id, 1, 1))
        assert isinstance(reply, PaxosRejected) and reply.reason == 2  # NOT_A_MEMBER
        assert isinstance(await decide(g, alice, clients, good), Decided)


async def decide_quick(g, device, clients, value):  # type: ignore[no-untyped-def]
    return await propose(device.key, clients, g.group_id, g.next_slot, value.encode(),
                         g.manifest.acceptors(), attempts=2, backoff=0.001)


async def _accept_reply(device, client, g, value, round_):  # type: ignore[no-untyped-def]
    """Prepare at a high round then Accept ``value``: the acceptor's verdict on the value."""
    await client.request(signed_prepare(device, g.group_id, g.next_slot, round_))
    return await client.request(signed_accept(device, g.group_id, g.next_slot, round_,
                                              value.encode()))


async def _group_with(cluster: MemoryCluster, creator: Device, *members: Device) -> Group:
    async with cluster.clients(creator) as clients:
        return await found_group([n.entry for n in cluster.nodes], clients, creator, members)


async def test_store_backfill_push_and_idempotence(cluster: MemoryCluster) -> None:
    alice, bob = Device("alice"), Device("bob")
    g = await _group_with(cluster, alice, bob)
    node = cluster.nodes[0]
    async with cluster.clients(bob, [node]) as (bc,), cluster.clients(alice, [node]) as (ac,):
        async with bc.subscribe(g.group_id) as feed, ac.subscribe(g.group_id) as own_feed:
            sent = [Envelope.seal(alice.key, g.group_id, seq, 1, alice.mls.encrypt(b"u%d" % seq))
                    for seq in range(1, 6)]
            for env in sent:
                assert (await ac.store(env)).seq == env.seq
            await ac.store(sent[0])  # duplicate: acknowledged again, stored once
            pushed = [await feed.__anext__() for _ in sent]
            assert pushed == sent
            assert [bob.mls.decrypt(e.ciphertext) for e in pushed] == [b"u%d" % i
                                                                      for i in range(1, 6)]
            # Not echoed to its sender: alice's own feed brings bob's envelope first.
            reply = Envelope.seal(bob.key, g.group_id, 1, 1, bob.mls.encrypt(b"r"))
            await bc.store(reply)
            with trio.fail_after(5):
                assert await own_feed.__anext__() == reply
        # Same (sender, seq) with other content is refused: it would be a device equivocating.
        clash = Envelope.seal(alice.key, g.group_id, 3, 1, b"other")
        with pytest.raises(RemoteError) as err:
            await ac.store(clash)
        assert err.value.code == ErrorCode.CONFLICT
        # Backfill by watermark, paged.
        page = await bc.backfill(g.group_id, {alice.key_fpr: 2, bob.key_fpr: 1}, limit=2)
        assert [e.seq for e in page.envelopes] == [3, 4] and page.more
        page = await bc.backfill(g.group_id, {alice.key_fpr: 4, bob.key_fpr: 1}, limit=2)
        assert [e.seq for e in page.envelopes] == [5] and not page.more
        assert node.service.metrics.messages_pushed._value.get() == 6


async def test_a_subscriber_registered_while_an_envelope_commits_still_gets_it(
        cluster: MemoryCluster) -> None:
    """An envelope is pushed while its batch commits, to the subscribers of that moment. Bob
    subscribes just then and backfills on ``Subscribed``, as a device does: the envelope must
    reach him by the feed or by that backfill. (``Subscribed`` waits for the commit: without
    that, the backfill read the database before the commit and the push had gone to the old
    subscribers only, so bob had it only at his next periodic backfill.)"""
    import threading

    from tests.device_kit import eventually

    alice, bob = Device("alice"), Device("bob")
    g = await _group_with(cluster, alice, bob)
    node = cluster.nodes[0]
    writer = node.service.store.writer  # type: ignore[attr-defined]
    conn = writer._conn
    gate, in_commit = threading.Event(), threading.Event()

    class Gated:  # the writer's connection, held at its next COMMIT until the gate opens
        def __getattr__(self, name: str) -> object:
            return getattr(conn, name)

        def execute(self, sql: str, *args: object) -> object:
            if sql == "COMMIT" and not gate.is_set():
                in_commit.set()
                gate.wait(10)
            return conn.execute(sql, *args)

    env = Envelope.seal(alice.key, g.group_id, 1, 1, alice.mls.encrypt(b"u1"))
    async with cluster.clients(bob, [node]) as (bc,), cluster.clients(alice, [node]) as (ac,), \
            trio.open_nursery() as nursery:
        await bc.backfill(g.group_id, {})  # the statement clock is reserved: later stamps
        writer._conn = Gated()               # (and so backfills) do not wait for the writer
        try:
            nursery.start_soon(ac.store, env)
            await eventually(in_commit.is_set, 10, "the batch to reach its COMMIT")
            await trio.sleep(0.05)  # the early push went out (to nobody: bob is not subscribed)

            async def open_gate() -> None:
                await trio.sleep(0.3)
                gate.set()

            nursery.start_soon(open_gate)
            async with bc.subscribe(g.group_id) as feed:
                page = await bc.backfill(g.group_id, {})
                got = list(page.envelopes)
                if not got:
                    with trio.move_on_after(2):
                        got.append(await feed.__anext__())
            assert got == [env]
        finally:
            gate.set()
            writer._conn = conn


async def test_readers_updates_are_refused(cluster: MemoryCluster) -> None:
    """A reader's envelope is refused by the manifest of its epoch: a reader added at slot 2,
    and a writer demoted at slot 3, whose envelope of epoch 2 (sent before) is still taken."""
    alice, bob, carol = Device("alice"), Device("bob"), Device("carol")
    g = await _group_with(cluster, alice, bob)
    node = cluster.nodes[0]
    async with cluster.clients(alice) as clients:
        value = add_value(g, alice, [carol], role=Role.READER)
        assert isinstance(await decide(g, alice, clients, value), Decided)
        for m in (alice, bob):
            m.mls.apply(value.commit)
        carol.mls.join(value.welcome)
        before = Envelope.seal(bob.key, g.group_id, 1, 2, bob.mls.encrypt(b"written"))
        commit = alice.mls.update()
        demote = sign_value(alice.key, next_manifest(g.manifest, commit,
                                                     roles={bob.key_fpr: Role.READER}), commit)
        assert isinstance(await decide(g, alice, clients, demote), Decided)
    refused = node.service.metrics.refused.labels("reader_update")
    async with cluster.clients(carol, [node]) as (cc,), cluster.clients(bob, [node]) as (bc,):
        with pytest.raises(RemoteError) as err:
            await cc.store(Envelope.seal(carol.key, g.group_id, 1, 2, b"x"))
        assert err.value.code == ErrorCode.UNAUTHORIZED and "reader" in err.value.detail
        assert (await bc.store(before)).seq == 1
        with pytest.raises(RemoteError) as err:
            await bc.store(Envelope.seal(bob.key, g.group_id, 2, 3, b"y"))
        assert err.value.code == ErrorCode.UNAUTHORIZED and "reader at epoch 3" in err.value.detail
    assert refused._value.get() == 2
    stored, _more = await node.service.store.envelopes_after(g.group_id, {}, limit=10,
                                                             max_bytes=1 << 20)
    assert len(stored) == 1


async def test_membership_is_enforced(cluster: MemoryCluster) -> None:
    alice, bob, carol = Device("alice"), Device("bob"), Device("carol")
    g = await _group_with(cluster, alice, bob, carol)
    node = cluster.nodes[0]
    stranger = Device("stranger")
    async with cluster.clients(stranger, [node]) as (sc,), cluster.clients(None, [node]) as (anon,):
        for client in (sc, anon):
            for request in (bc_backfill(client, g.group_id),
                            client.store(Envelope.seal(alice.key, g.group_id, 1, 1, b"x"))):
                with pytest.raises(RemoteError) as err:
                    await request
                assert err.value.code == ErrorCode.UNAUTHORIZED
        # A forged envelope (signed by a stranger, claiming alice) is refused even from a member.
    async with cluster.clients(bob, [node]) as (bc,):
        forged = replace(Envelope.seal(stranger.key, g.group_id, 1, 1, b"x"), sender=alice.key_fpr)
        with pytest.raises(RemoteError) as err:
            await bc.store(forged)
        assert err.value.code == ErrorCode.UNAUTHORIZED
        assert await node.service.store.envelopes_after(g.group_id, {}, limit=10,
                                                        max_bytes=1 << 20) == ([], False)
    # Remove carol: from that slot on she is refused, and her live feed is cut.
    async with cluster.clients(carol, [node]) as (cc,):
        async with cc.subscribe(g.group_id) as feed:
            async with cluster.clients(alice) as clients:
                value = remove_value(g, alice, [carol])
                assert isinstance(await decide(g, alice, clients, value), Decided)
            items = []
            with pytest.raises(RemoteError) as err:
                async for item in feed:
                    items.append(item)
            assert err.value.code == ErrorCode.UNAUTHORIZED
            assert [type(i) for i in items] == []  # the removing decision is not shown to her
        with pytest.raises(RemoteError) as err:
            await cc.backfill(g.group_id, {})
        assert err.value.code == ErrorCode.UNAUTHORIZED


def bc_backfill(client, group_id):  # type: ignore[no-untyped-def]
    return client.backfill(group_id, {})


async def test_mailbox(cluster: MemoryCluster) -> None:
    """Join requests go to an invite's box with the box key's proof; everything else comes from
    a member of a hosted group; only the recipient key reads and acks. (More in
    tests/test_mailbox.py.)"""
    from proto.handoff import invite_box
    from proto.service import put_proof

    alice, bob, eve = Device("alice"), Device("bob"), Device("eve")
    node = cluster.nodes[0]
    box = invite_box(b"s" * 16)
    kp = MailboxKind.KEY_PACKAGE
    g = new_group(alice, [n.entry for n in cluster.nodes])
    async with cluster.clients(None, [node]) as (anon,), cluster.clients(bob, [node]) as (bc,), \
            cluster.clients(alice, [node]) as (ac,):
        await ac.register_group(g.values[0])
        with pytest.raises(RemoteError) as err:  # no proof
            await anon.mailbox_put(box.public, kp, b"kp", 60)
        assert err.value.code == ErrorCode.UNAUTHORIZED
        item = await anon.mailbox_put(box.public, kp, b"kp", 60,
                                      proof=put_proof(box, node.key.public, kp, b"kp", 60))
        with pytest.raises(RemoteError) as err:
            await anon.mailbox_fetch(box.public)
        assert err.value.code == ErrorCode.UNAUTHORIZED
        await bc.authenticate(box)
        items = (await bc.mailbox_fetch(box.public)).items
        assert [(i.item_id, i.kind, i.payload) for i in items] == [(item, kp, b"kp")]
        # Other kinds: only from a current member of a group hosted here, naming it.
        for who, group in ((anon, None), (anon, g.group_id), (bc, g.group_id)):
            with pytest.raises(RemoteError) as err:
                await who.mailbox_put(bob.key.public, MailboxKind.WELCOME, b"w", 60,
                                      group_id=group)
            assert err.value.code == ErrorCode.UNAUTHORIZED
        with pytest.raises(RemoteError):
            await ac.mailbox_put(eve.key.public, MailboxKind.WELCOME, b"w", 10**9,
                                 group_id=g.group_id)
        assert await bc.mailbox_ack(box.public, [item]) == 1
        assert (await bc.mailbox_fetch(box.public)).items == ()
        # Expiry: an item whose ttl passed is not served.
        node.service.clock = lambda: 10**10
        await ac.mailbox_put(bob.key.public, MailboxKind.WELCOME, b"old", 1, group_id=g.group_id)
        node.service.clock = time.time
        assert (await bc.mailbox_fetch(bob.key.public)).items != ()  # far-future clock: live
        node.service.clock = lambda: 10**11
        assert (await bc.mailbox_fetch(bob.key.public)).items == ()


async def test_quota_and_rate_limit(cluster: MemoryCluster) -> None:
    node = cluster.nodes[0]
    async with cluster.clients(None, [node]) as (anon,):
        for i in range(6):
            d = Device(f"d{i}")
            g = new_group(d, [node.entry])
            reply = await anon.request(RegisterGroup(
                g.values[0].encode()))
            if i < 5:
                assert not isinstance(reply, ErrorReply), reply
            else:
                assert isinstance(reply, ErrorReply) and reply.code == ErrorCode.QUOTA_EXCEEDED
    node.service.limits = replace(node.service.limits, requests_per_second=1, request_burst=3)
    async with cluster.clients(None, [node]) as (anon,):
        replies = [await anon.request(GetChallenge())
                   for _ in range(6)]
        codes = [r.code for r in replies if isinstance(r, ErrorReply)]
        assert ErrorCode.RATE_LIMITED in codes and len(codes) >= 2


async def test_restart_restores_state_and_lru_bounds_memory(cluster: MemoryCluster) -> None:
    alice, bob = Device("alice"), Device("bob")
    g = await _group_with(cluster, alice, bob)
    async with cluster.clients(alice) as clients:
        for seq in range(1, 4):
            await clients[0].store(Envelope.seal(alice.key, g.group_id, seq, 1, b"%d" % seq))
        v2 = update_value(g, alice)
        assert isinstance(await decide(g, alice, clients, v2), Decided)
    old = cluster.nodes[0]
    await cluster.stop_node(old)
    node = await cluster.start_node(old.key, cache_groups=1, cache_slots=1)
    others = [new_group(Device(f"o{i}"), [node.entry]) for i in range(3)]
    async with cluster.clients(None, [node]) as (anon,):
        for o in others:
            await anon.register_group(o.values[0])
    async with cluster.clients(alice, [node]) as (ac,):  # the log is for members only
        page = await ac.fetch_decided(g.group_id, 0)
        assert page.top == 2 and len(page.decided) == 2
    assert len(node.service.groups.cache) == 1  # bounded by the LRU
    async with cluster.clients(bob, [node]) as (bc,):
        assert [e.seq for e in (await bc.backfill(g.group_id, {})).envelopes] == [1, 2, 3]
        # The acceptor state of slot 3 survives a restart too: promise, restart, higher slot.
        promise = await bc.request(signed_prepare(alice, g.group_id, 3, 7))
        assert type(promise).__name__ == "Promise"
    await cluster.stop_node(node)
    node = await cluster.start_node(old.key, cache_groups=1, cache_slots=1)
    async with cluster.clients(None, [node]) as (anon,):
        nack = await anon.request(signed_prepare(alice, g.group_id, 3, 5))
        assert type(nack).__name__ == "Nack" and nack.promised.round == 7


async def test_peer_catch_up_after_downtime(cluster: MemoryCluster) -> None:
    alice, bob = Device("alice"), Device("bob")
    g = new_group(alice, [n.entry for n in cluster.nodes])
    async with cluster.clients(alice) as clients:
        for c in clients:
            await c.register_group(g.values[0])
    lagging = cluster.nodes[2]
    await cluster.stop_node(lagging)
    async with cluster.clients(alice) as clients:  # the two live nodes decide 3 slots
        v = add_value(g, alice, [bob])
        assert isinstance(await decide(g, alice, clients, v), Decided)
        alice.mls.apply(v.commit)
        for _ in range(2):
            v = update_value(g, alice)
            assert isinstance(await decide(g, alice, clients, v), Decided)
            alice.mls.apply(v.commit)
    node = await cluster.start_node(lagging.key)
    assert (await node.service.group(g.group_id)).top == 0
    await node.peers.sweep()
    assert (await node.service.group(g.group_id)).top == 3
    async with cluster.clients(bob, [node]) as (bc,):
        page = await bc.fetch_decided(g.group_id, 1)
        assert [d.value for d in page.decided] == [x.encode() for x in g.values[1:]]


async def test_conflicting_proposals_one_winner(cluster: MemoryCluster) -> None:
    alice, bob = Device("alice"), Device("bob")
    g = await _group_with(cluster, alice, bob)
    va, vb = update_value(g, alice), update_value(g, bob)
    outcomes = {}
    async with cluster.clients(alice) as ac, cluster.clients(bob) as bc:
        async with trio.open_nursery() as n:
            async def run(name, dev, clients, value):  # type: ignore[no-untyped-def]
                outcomes[name] = await propose(dev.key, clients, g.group_id, 2, value.encode(),
                                               g.manifest.acceptors())
            n.start_soon(run, "a", alice, ac, va)
            n.start_soon(run, "b", bob, bc, vb)
    kinds = sorted(type(o).__name__ for o in outcomes.values())
    assert kinds == ["Decided", "Lost"]
    winner = next(o for o in outcomes.values() if isinstance(o, Decided))
    loser = next(o for o in outcomes.values() if isinstance(o, Lost))
    assert loser.certificate.value_hash == winner.certificate.value_hash
    for node in cluster.nodes:  # every syncnode stores the same single winner
        assert (await node.service.decided_at(g.group_id, 2)).value == winner.value
