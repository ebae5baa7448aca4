"""The syncnode's mailbox in-process (memory transport, real SQLite): the join-request proof, the
quotas and budgets, paging, notices for invite boxes, and an older database's mailbox."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from proto.handoff import invite_box, invite_box_from_hash
from proto.identity import SecretKey
from proto.invite import secret_hash
from proto.messages import ErrorCode
from proto.rpc import RemoteError, SyncnodeClient
from proto.service import (
    MAX_JOIN_REQUEST,
    MailboxKind,
    MailboxNotice,
    MailboxPut,
    put_proof,
    put_proof_valid,
)
from proto.transport.memory import MemoryNetwork
from syncnode.config import Limits
from syncnode.service import Service
from syncnode.storage import MAILBOX_ITEM_OVERHEAD
from tests.syncnode_kit import Device, MemoryCluster, new_group

KP = MailboxKind.KEY_PACKAGE
HANDOFF = MailboxKind.STATE_HANDOFF


def refused(service: Service, reason: str) -> float:
    return service.metrics.registry.get_sample_value(
        "syncnode_refused_total", {"reason": reason}) or 0.0


async def put_join(c: SyncnodeClient, box: SecretKey, payload: bytes, ttl: int = 600) -> int:
    return await c.mailbox_put(box.public, KP, payload, ttl,
                               proof=put_proof(box, c.node_id, KP, payload, ttl))


@asynccontextmanager
async def one_node(tmp_path: Path, limits: Limits) -> AsyncIterator[MemoryCluster]:
    net = MemoryNetwork(seed=3)
    async with trio.open_nursery() as nursery:
        await nursery.start(net.run)
        cluster = MemoryCluster(net, nursery, tmp_path, limits)
        await cluster.start_node()
        yield cluster
        nursery.cancel_scope.cancel()


def test_put_proof_binds_node_recipient_kind_payload_and_ttl() -> None:
    box, other = invite_box(b"a" * 16), invite_box(b"b" * 16)
    assert invite_box(b"a" * 16) == invite_box_from_hash(secret_hash(b"a" * 16))
    assert box.public != other.public
    node, node2 = b"\x01" * 32, b"\x02" * 32
    proof = put_proof(box, node, KP, b"request", 600)
    good = MailboxPut(box.public, KP, b"request", 600, proof=proof)
    assert put_proof_valid(node, good)
    assert not put_proof_valid(node2, good)  # replayed to another syncnode
    for bad in (MailboxPut(box.public, KP, b"request!", 600, proof=proof),  # payload
                MailboxPut(box.public, KP, b"request", 601, proof=proof),  # ttl
                MailboxPut(box.public, HANDOFF, b"request", 600, proof=proof),  # kind
                MailboxPut(other.public, KP, b"request", 600, proof=proof),  # recipient
                MailboxPut(box.public, KP, b"request", 600),  # none
                MailboxPut(other.public, KP, b"request", 600,  # signed by the wrong key
                           proof=put_proof(box, node, KP, b"request", 600))):
        assert not put_proof_valid(node, bad)
    # The syncnode learns only the public key: a proof made with any other key fails.
    assert not put_proof_valid(node, MailboxPut(
        box.public, KP, b"x", 1, proof=SecretKey.generate().sign(
            "syncnode/mailbox-put/v1", b"anything")))


async def test_join_request_limits(tmp_path: Path) -> None:
    limits = Limits(max_join_requests_per_box=3, max_join_requests_per_sender=5,
                    max_join_request_bytes=8 * (1000 + MAILBOX_ITEM_OVERHEAD))
    async with one_node(tmp_path, limits) as cluster, cluster.clients() as (a,), \
            cluster.clients() as (b,), cluster.clients() as (c,):
        service = cluster.nodes[0].service
        box1, box2, box3 = (invite_box(bytes([i]) * 16) for i in range(3))
        with pytest.raises(RemoteError) as err:
            await put_join(a, box1, b"x" * (MAX_JOIN_REQUEST + 1))
        assert err.value.code == ErrorCode.INVALID
        assert refused(service, "mailbox_join_too_large") == 1
        ids = [await put_join(a, box1, bytes([i]) * 1000) for i in range(3)]
        with pytest.raises(RemoteError) as err:  # per box
            await put_join(a, box1, b"4" * 1000)
        assert err.value.code == ErrorCode.QUOTA_EXCEEDED
        ids += [await put_join(a, box2, bytes([i]) * 1000) for i in range(2)]
        with pytest.raises(RemoteError) as err:  # per sender (endpoint)
            await put_join(a, box3, b"6" * 1000)
        assert err.value.code == ErrorCode.QUOTA_EXCEEDED
        assert refused(service, "mailbox_sender_quota") == 1
        # The node-wide share for join requests (8 items here): the oldest make room.
        later = [await put_join(b, box3, bytes([i]) * 1000) for i in range(3)]
        later += [await put_join(c, box2, b"z" * 1000)]
        assert refused(service, "mailbox_join_evicted") == 1
        await b.authenticate(box1)
        left = [i.item_id for i in (await b.mailbox_fetch(box1.public)).items]
        assert left == ids[1:3]  # the first request went
        usage = await service.mailbox.usage()
        assert usage["join_requests"] == 8 * (1000 + MAILBOX_ITEM_OVERHEAD)
        # Acking frees the sender's count and the share.
        assert await b.mailbox_ack(box1.public, left) == 2
        usage = await service.mailbox.usage()
        assert usage["join_requests"] == 6 * (1000 + MAILBOX_ITEM_OVERHEAD)
        await put_join(a, box1, b"7" * 1000)
        assert len(later) == 4


async def test_member_puts_are_bounded_per_sender_per_endpoint_and_node_wide(
        tmp_path: Path) -> None:
    part = 100_000
    counted = part + MAILBOX_ITEM_OVERHEAD
    limits = Limits(max_mailbox_bytes=10 * counted + 1000, max_join_request_bytes=1000,
                    max_mailbox_bytes_per_sender=6 * counted,
                    mailbox_put_bytes_per_second=1.0, mailbox_put_burst_bytes=8 * counted)
    alice, bob, joiner = Device("alice"), Device("bob"), Device("joiner")
    async with one_node(tmp_path, limits) as cluster:
        service = cluster.nodes[0].service
        entries = [n.entry for n in cluster.nodes]
        ga, gb = new_group(alice, entries), new_group(bob, entries)
        async with cluster.clients(alice) as (a,), cluster.clients(bob) as (b,), \
                cluster.clients(bob) as (b2,):
            await a.register_group(ga.values[0])
            await b.register_group(gb.values[0])
            for _ in range(6):
                await a.mailbox_put(joiner.key.public, HANDOFF, b"a" * part, 60,
                                    group_id=ga.group_id)
            with pytest.raises(RemoteError) as err:  # alice's key has 6 parts waiting
                await a.mailbox_put(joiner.key.public, HANDOFF, b"a" * part, 60,
                                    group_id=ga.group_id)
            assert err.value.code == ErrorCode.QUOTA_EXCEEDED
            assert refused(service, "mailbox_sender_quota") == 1
            for _ in range(4):
                await b.mailbox_put(joiner.key.public, HANDOFF, b"b" * part, 60,
                                    group_id=gb.group_id)
            with pytest.raises(RemoteError) as err:  # the node's mailbox is full
                await b2.mailbox_put(joiner.key.public, HANDOFF, b"b" * part, 60,
                                     group_id=gb.group_id)
            assert err.value.code == ErrorCode.QUOTA_EXCEEDED
            assert refused(service, "mailbox_node_quota") == 1
            assert (await service.mailbox.usage())["other"] == 10 * counted
            # Alice's endpoint spent 7 parts of its 8-part burst (one was refused later):
            # room is made, but her endpoint's budget is what stops her now.
            async with cluster.clients(joiner) as (j,):
                page = (await j.mailbox_fetch(joiner.key.public, 0, 3)).items
                await j.mailbox_ack(joiner.key.public, [i.item_id for i in page])
            await a.mailbox_put(joiner.key.public, HANDOFF, b"a" * part, 60,
                                group_id=ga.group_id)
            with pytest.raises(RemoteError) as err:
                await a.mailbox_put(joiner.key.public, HANDOFF, b"a" * part, 60,
                                    group_id=ga.group_id)
            assert err.value.code == ErrorCode.RATE_LIMITED
            assert refused(service, "mailbox_rate") == 1


async def test_fetch_pages_by_count_and_bytes(tmp_path: Path) -> None:
    alice, joiner = Device("alice"), Device("joiner")
    async with one_node(tmp_path, Limits()) as cluster:
        g = new_group(alice, [n.entry for n in cluster.nodes])
        async with cluster.clients(alice) as (a,), cluster.clients(joiner) as (j,):
            await a.register_group(g.values[0])
            for i in range(30):
                await a.mailbox_put(joiner.key.public, HANDOFF, bytes([i]) * 200_000, 60,
                                    group_id=g.group_id)
            seen, after, pages = [], 0, 0
            while True:
                page = await j.mailbox_fetch(joiner.key.public, after, 25)
                pages += 1
                seen += [i.payload[0] for i in page.items]
                assert sum(len(i.payload) for i in page.items) <= 4 * 1024 * 1024
                if not page.more:
                    break
                after = page.items[-1].item_id
            assert seen == list(range(30)) and pages == 2
            small = await j.mailbox_fetch(joiner.key.public, 0, 5)
            assert len(small.items) == 5 and small.more


async def test_notice_for_a_box_read_after_subscribing(tmp_path: Path) -> None:
    """An inviter subscribes with its device key, then reads a new invite's box: a join
    request landing in that box is pushed on the subscription."""
    alice = Device("alice")
    box = invite_box(b"n" * 16)
    async with one_node(tmp_path, Limits()) as cluster:
        g = new_group(alice, [n.entry for n in cluster.nodes])
        async with cluster.clients(alice) as (a,), cluster.clients() as (joiner,):
            await a.register_group(g.values[0])
            async with a.subscribe(g.group_id) as sub:
                await a.authenticate(box)
                assert (await a.mailbox_fetch(box.public)).items == ()
                await put_join(joiner, box, b"request")
                with trio.fail_after(5):
                    got = await sub.__anext__()
                assert got == MailboxNotice(box.public)


async def test_an_older_database_keeps_its_mailbox(tmp_path: Path) -> None:
    """A database made before the mailbox counted senders and sizes: its items stay, count
    against the quotas, and go as usual."""
    key = SecretKey.generate()
    path = tmp_path / f"{key.public.hex()[:8]}.db"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema', '1');
        CREATE TABLE mailbox (
            item_id INTEGER PRIMARY KEY AUTOINCREMENT,
            recipient BLOB NOT NULL, kind INTEGER NOT NULL, payload BLOB NOT NULL,
            expires_at INTEGER NOT NULL);
        CREATE INDEX mailbox_recipient ON mailbox (recipient, item_id);
    """)
    joiner = Device("joiner")
    old.execute("INSERT INTO mailbox (recipient, kind, payload, expires_at) VALUES (?,?,?,?)",
                (joiner.key.public, int(HANDOFF), b"p" * 1000, 2**40))
    old.commit()
    old.close()
    net = MemoryNetwork(seed=4)
    async with trio.open_nursery() as nursery:
        await nursery.start(net.run)
        cluster = MemoryCluster(net, nursery, tmp_path, Limits())
        node = await cluster.start_node(key)
        assert await node.service.mailbox.usage() == {"join_requests": 0,
                                                      "other": 1000 + MAILBOX_ITEM_OVERHEAD}
        async with cluster.clients(joiner) as (j,):
            items = (await j.mailbox_fetch(joiner.key.public)).items
            assert [i.payload for i in items] == [b"p" * 1000]
            await j.mailbox_ack(joiner.key.public, [items[0].item_id])
        assert await node.service.mailbox.usage() == {"join_requests": 0, "other": 0}
        nursery.cancel_scope.cancel()
