"""Issue 14, finding 7: the decided log and heads of a group are for its members and its own
syncnodes only, against real ``syncnode run`` processes.

A stranger (no key, or a key of its own) gets UNAUTHORIZED for ``FetchDecided`` and no head from
``FetchHeads``, for an existing group exactly as for a made-up id (no existence oracle), and
each refusal is counted in /metrics. A member reads the whole log; a removed member reads up to
its removal and nothing after; a syncnode of the group catches up from its peers (they know it
by its authenticated node id); a new device, which may read nothing before its add, still joins
in a fraction of a second."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
import trio

from device.agent import Device as Agent
from device.agent import DeviceConfig
from proto.identity import SecretKey
from proto.messages import ErrorCode
from proto.paxos.messages import Decided
from proto.rpc import RemoteError, SyncnodeClient
from syncnode.procs import NodeProcess
from tests.hostile.kit import refusals, stranger
from tests.syncnode_kit import Device, decide, found_group, remove_value, update_value
from tests.test_syncnode_process import connected


async def _refused_log(c: SyncnodeClient, group_id: bytes, from_slot: int) -> None:
    with pytest.raises(RemoteError) as err:
        await c.fetch_decided(group_id, from_slot)
    assert err.value.code == ErrorCode.UNAUTHORIZED, err.value


async def test_strangers_read_no_log_and_no_head(nodes: list[NodeProcess]) -> None:
    alice, bob = Device("alice"), Device("bob")
    async with connected(nodes, alice) as clients:
        g = await found_group([n.entry for n in nodes], clients, alice, [bob])
    node = nodes[0]
    before = refusals(node)
    unknown = secrets.token_bytes(32)
    async with stranger(node) as (c, _):
        for authenticate in (False, True):
            if authenticate:  # a key of its own changes nothing
                await c.authenticate(SecretKey.generate())
            for slot in (0, 1, 5):
                await _refused_log(c, g.group_id, slot)
            await _refused_log(c, unknown, 0)  # the same answer as for a hosted group
            assert (await c.heads([g.group_id, unknown])).heads == ()
    after = refusals(node)
    assert after.get("log_not_member", 0) - before.get("log_not_member", 0) == 8
    # counted once per connection: a joiner polls heads until it is added
    assert after.get("heads_not_member", 0) - before.get("heads_not_member", 0) == 1
    # Members read it all, from the genesis.
    async with connected([node], bob) as (bc,):
        page = await bc.fetch_decided(g.group_id, 0)
        assert page.genesis == g.values[0].encode() and page.top == 1
        assert [d.value for d in page.decided] == [g.values[1].encode()]
        assert [(h.group_id, h.top) for h in (await bc.heads([g.group_id, unknown])).heads] \
            == [(g.group_id, 1)]


async def test_a_removed_member_reads_up_to_its_removal(nodes: list[NodeProcess]) -> None:
    alice, bob = Device("alice"), Device("bob")
    async with connected(nodes, alice) as clients:
        g = await found_group([n.entry for n in nodes], clients, alice, [bob])
        removal = remove_value(g, alice, [bob])
        assert isinstance(await decide(g, alice, clients, removal), Decided)
        alice.mls.apply(removal.commit)
        later = update_value(g, alice)
        assert isinstance(await decide(g, alice, clients, later), Decided)
    async with connected(nodes[:1], bob) as (bc,):
        page = await bc.fetch_decided(g.group_id, 2)  # bob was a member of epoch 1
        assert [d.value for d in page.decided] == [removal.encode()] and page.top == 2
        await _refused_log(bc, g.group_id, 3)  # after its removal: nothing
        await _refused_log(bc, g.group_id, 0)
        assert (await bc.heads([g.group_id])).heads == ()


async def test_a_syncnode_catches_up_from_its_peers(nodes: list[NodeProcess]) -> None:
    """Peers answer FetchHeads/FetchDecided for a node of the group's manifest: the node that was
    down catches up by itself when it starts (its sweep)."""
    alice = Device("alice")
    async with connected(nodes, alice) as clients:
        g = await found_group([n.entry for n in nodes], clients, alice)
    lagging = nodes[2]
    lagging.terminate()
    async with connected(nodes[:2], alice) as live:
        for _ in range(3):
            v = update_value(g, alice)
            assert isinstance(await decide(g, alice, live, v), Decided)
            alice.mls.apply(v.commit)
    lagging.start()
    async with connected([lagging], alice) as (c,):
        with trio.fail_after(30):
            while (await c.fetch_decided(g.group_id, 1)).top < 3:  # noqa: ASYNC110 (remote)
                await trio.sleep(0.1)
        page = await c.fetch_decided(g.group_id, 1)
        assert [d.value for d in page.decided] == [x.encode() for x in g.values[1:]]
    for peer in nodes[:2]:
        assert "log_not_member" not in refusals(peer)


async def test_joins_stay_fast(tmp_path: Path, nodes: list[NodeProcess]) -> None:
    """The new device may read nothing until its add is decided; it waits on FetchHeads (no
    refusal, no log line on the syncnodes) and reads the log from the genesis once it is a
    member. A join on loopback still takes a fraction of a second."""
    config = DeviceConfig(connect_timeout=5.0)
    times = []
    async with Agent.open(tmp_path / "a", config=config) as a:
        doc = await a.create_document([n.ticket for n in nodes])
        doc.change(lambda e: e.map("m").insert("k", 1))
        for i in range(3):
            async with Agent.open(tmp_path / f"j{i}", config=config) as joiner:
                ticket = doc.invite()
                started = trio.current_time()
                with trio.fail_after(30):
                    joined = await joiner.join(ticket)
                times.append(trio.current_time() - started)
                assert joined.value()["m"] == {"k": 1}
    print("join seconds:", [f"{t:.3f}" for t in times])
    assert min(times) < 1.0, times
    for node in nodes:
        assert "log_not_member" not in refusals(node)
