"""The syncnode service in-process: 3 nodes on the memory transport, real SQLite, real MLS."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from device.paxos_driver import ProposeFailed, propose
from proto.envelope import Envelope
from proto.manifest import Role, Rule, sign_value
from proto.messages import ErrorCode, ErrorReply
from proto.paxos.messages import Decided, PaxosRejected
from proto.paxos.proposer import Lost
from proto.rpc import RemoteError
from proto.service import MailboxKind
from proto.transport.memory import MemoryNetwork
from syncnode.config import Limits
from tests.syncnode_kit import (
    Device,
    MemoryCluster,
    add_value,
    decide,
    new_group,
    remove_value,
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
        late = await clients[0].request(
            (await _prepare_for(alice, g.group_id, 1)))
        assert isinstance(late, Decided) and late.value == value.encode()


async def _prepare_for(device: Device, group_id: bytes, slot: int):  # type: ignore[no-untyped-def]
    from proto.paxos.proposer import Proposer
    from proto.paxos.quorum import AcceptorSet

    return Proposer(device.key, group_id, slot, b"x", AcceptorSet.of(b"\0" * 32)).start()[0]


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
        mallory_prepare = await _prepare_for(mallory, g.group_id, 1)
        reply = await clients[0].request(mallory_prepare)
        assert isinstance(reply, PaxosRejected) and reply.reason == 2  # NOT_A_MEMBER
        assert isinstance(await decide(g, alice, clients, good), Decided)


async def decide_quick(g, device, clients, value):  # type: ignore[no-untyped-def]
    return await propose(device.key, clients, g.group_id, g.next_slot, value.encode(),
                         g.manifest.acceptors(), attempts=2, backoff=0.001)


async def _accept_reply(device, client, g, value, round_):  # type: ignore[no-untyped-def]
    """Prepare at a high round then Accept ``value``: the acceptor's verdict on the value."""
    from proto.codec import encode_struct
    from proto.paxos.messages import ACCEPT_CTX, Accept, AcceptBody, Ballot, value_hash

    prepare = await _prepare_for(device, g.group_id, g.next_slot)
    ballot = Ballot(round_, prepare.ballot.proposer)
    from proto.paxos.messages import PREPARE_CTX, Prepare, PrepareBody

    body = PrepareBody(g.group_id, g.next_slot, ballot)
    await client.request(Prepare(g.group_id, g.next_slot, ballot,
                                 device.key.sign(PREPARE_CTX, encode_struct(body))))
    raw = value.encode()
    abody = AcceptBody(g.group_id, g.next_slot, ballot, value_hash(raw))
    return await client.request(Accept(g.group_id, g.next_slot, ballot, raw,
                                       device.key.sign(ACCEPT_CTX, encode_struct(abody))))
