"""The Paxos driver goes at the pace of a quorum (issue 14, finding 9), and the request channel
it relies on stays in step when requests are abandoned. In-process syncnodes on the memory
transport; the unreachable one is a client whose requests never get an answer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from device.paxos_driver import LeaseBook, propose
from proto.errors import TransportError
from proto.paxos.messages import Decided
from proto.paxos.proposer import Lost
from proto.rpc import Channel, SyncnodeClient
from proto.service import FetchHeads
from proto.transport.base import Stream
from proto.transport.memory import MemoryNetwork
from tests.syncnode_kit import (
    Device,
    MemoryCluster,
    add_value,
    found_group,
    new_group,
    update_value,
)

TIMEOUT = 60.0
"""The driver's per-phase bound in these tests: far above anything a quorum needs, so
finishing well within it shows that nothing waited for the silent syncnode."""


class Silent:
    """A syncnode link whose requests never get an answer (down, frozen or cut off)."""

    def __init__(self, node_id: bytes) -> None:
        self.node_id = node_id
        self.asked: list[Any] = []

    async def request(self, msg: Any) -> Any:
        self.asked.append(msg)
        await trio.sleep_forever()


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[MemoryCluster]:
    net = MemoryNetwork(seed=3)
    async with trio.open_nursery() as nursery:
        await nursery.start(net.run)
        c = MemoryCluster(net, nursery, tmp_path)
        for _ in range(3):
            await c.start_node()
        yield c
        nursery.cancel_scope.cancel()


async def test_one_silent_syncnode_costs_nothing(cluster: MemoryCluster) -> None:
    alice = Device("alice")
    silent = Silent(cluster.nodes[2].key.public)
    async with cluster.clients(alice) as clients, trio.open_nursery() as background:
        g = await found_group([n.entry for n in cluster.nodes], clients, alice)
        live = clients[:2]
        value = update_value(g, alice)
        with trio.fail_after(TIMEOUT / 2):
            outcome = await propose(alice.key, [*live, silent], g.group_id, g.next_slot,
                                    value.encode(), g.manifest.acceptors(), timeout=TIMEOUT,
                                    background=background.start_soon)
        assert isinstance(outcome, Decided)
        # It was asked in both phases and told the decision, just never waited for.
        assert [type(m).__name__ for m in silent.asked] == ["Prepare", "Accept", "Decided"]
        for c in live:  # the quorum holds the decision when propose returns
            assert (await c.fetch_decided(g.group_id, 1)).top == 1
        background.cancel_scope.cancel()


async def test_a_link_that_comes_back_is_used_by_the_next_ballot(
        cluster: MemoryCluster) -> None:
    alice = Device("alice")
    async with cluster.clients(alice) as clients:
        g = await found_group([n.entry for n in cluster.nodes], clients, alice)
        calls = 0

        async def linked() -> list[SyncnodeClient]:
            nonlocal calls
            calls += 1
            return clients[:1] if calls == 1 else clients  # two links come back meanwhile

        outcome = await propose(alice.key, linked, g.group_id, g.next_slot,
                                update_value(g, alice).encode(), g.manifest.acceptors(),
                                backoff=0.001)
        assert isinstance(outcome, Decided)
        assert calls >= 2


class _Pipe(Stream):
    """A stream whose peer is the test: sent frames are recorded, replies are fed by hand, and
    sending can be made to block (a full flow-control window)."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.blocked = False
        self._replies_in, self._replies = trio.open_memory_channel[bytes](16)

    async def send(self, frame: bytes) -> None:
        if self.blocked:
            await trio.sleep_forever()
        self.sent.append(frame)

    async def receive(self) -> bytes:
        return await self._replies.receive()

    async def send_eof(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    def reply(self, frame: bytes) -> None:
        self._replies_in.send_nowait(frame)


async def test_stalled_for_measures_the_peer_not_the_request(
        autojump_clock: trio.testing.MockClock) -> None:
    from proto.codec import encode
    from proto.service import Heads

    pipe = _Pipe()
    channel = Channel(pipe)
    async with trio.open_nursery() as nursery:
        await nursery.start(channel.run)
        assert channel.stalled_for() == 0.0  # idle is not stalled
        await trio.sleep(10)
        nursery.start_soon(channel.call, FetchHeads(()))
        nursery.start_soon(channel.call, FetchHeads(()))
        await trio.sleep(1)
        assert channel.stalled_for() == pytest.approx(1.0)  # counted from the request
        await trio.sleep(2)
        pipe.reply(encode(Heads(())))  # progress: the second request waits, but not stalled
        await trio.sleep(0.5)
        assert channel.stalled_for() == pytest.approx(0.5)
        pipe.reply(encode(Heads(())))
        await trio.testing.wait_all_tasks_blocked()
        assert channel.stalled_for() == 0.0
        nursery.cancel_scope.cancel()


async def test_a_request_interrupted_while_sending_breaks_the_channel(
        autojump_clock: trio.testing.MockClock) -> None:
    """Otherwise its waiter stays queued with no request behind it, and every later caller
    gets the reply meant for the one before."""
    pipe = _Pipe()
    channel = Channel(pipe)
    async with trio.open_nursery() as nursery:
        await nursery.start(channel.run)
        pipe.blocked = True
        with trio.move_on_after(1):
            await channel.call(FetchHeads(()))
        pipe.blocked = False
        with pytest.raises(TransportError, match="interrupted"):
            await channel.call(FetchHeads(()))
        assert pipe.sent == []
        nursery.cancel_scope.cancel()


class Recording:
    """A syncnode link that records the type of every request it carries; ``silent``: it
    records them and answers none (down or frozen)."""

    def __init__(self, inner: SyncnodeClient) -> None:
        self.inner = inner
        self.node_id = inner.node_id
        self.asked: list[str] = []
        self.silent = False

    async def request(self, msg: Any) -> Any:
        self.asked.append(type(msg).__name__)
        if self.silent:
            await trio.sleep_forever()
        return await self.inner.request(msg)


async def test_a_decision_leaves_a_lease_and_the_next_commit_skips_phase_1(
        cluster: MemoryCluster) -> None:
    """The next commit sends Accept at once (the lease), and only to the quorum of lease
    holders that answered the last ballot first (thrifty); the third syncnode is told the
    decision only."""
    alice = Device("alice")
    leases = LeaseBook()
    async with cluster.clients(alice) as clients:
        g = await found_group([n.entry for n in cluster.nodes], clients, alice)
        links = [Recording(c) for c in clients]
        for first in (True, False, False):
            value = update_value(g, alice)
            outcome = await propose(alice.key, links, g.group_id, g.next_slot, value.encode(),
                                    g.manifest.acceptors(), leases=leases)
            assert isinstance(outcome, Decided) and outcome.value == value.encode()
            asked = sorted(link.asked for link in links)
            if first:
                assert asked == [["Prepare", "AcceptLeased", "Decided"]] * 3
            else:
                assert asked == [["AcceptLeased", "Decided"]] * 2 + [["Decided"]]
            for link in links:
                link.asked.clear()
            g.values.append(value)
            alice.mls.apply(value.commit)
            assert leases.holds(g.group_id, g.next_slot)


async def test_a_thrifty_accept_asks_the_third_syncnode_when_a_lease_holder_is_silent(
        cluster: MemoryCluster) -> None:
    """A lease holder goes silent: the thrifty Accept asks the third syncnode after the
    patience, the decision is reached on the fast path all the same (no Prepare), and the next
    lease leaves the silent one out of the thrifty quorum."""
    alice = Device("alice")
    leases = LeaseBook()
    async with cluster.clients(alice) as clients, trio.open_nursery() as background:
        g = await found_group([n.entry for n in cluster.nodes], clients, alice)
        links = [Recording(c) for c in clients]

        async def commit() -> None:
            for link in links:
                link.asked.clear()
            value = update_value(g, alice)
            with trio.fail_after(TIMEOUT / 2):
                outcome = await propose(alice.key, links, g.group_id, g.next_slot,
                                        value.encode(), g.manifest.acceptors(), leases=leases,
                                        timeout=TIMEOUT, background=background.start_soon)
            assert isinstance(outcome, Decided) and outcome.value == value.encode()
            g.values.append(value)
            alice.mls.apply(value.commit)

        await commit()
        await commit()  # thrifty: one syncnode got no Accept
        spared = next(link for link in links if "AcceptLeased" not in link.asked)
        await commit()
        (silent,) = [link for link in links if link is not spared][:1]
        silent.silent = True
        for link in links:
            link.asked.clear()
        value = update_value(g, alice)
        with trio.fail_after(TIMEOUT / 2):
            outcome = await propose(alice.key, links, g.group_id, g.next_slot, value.encode(),
                                    g.manifest.acceptors(), leases=leases, timeout=TIMEOUT,
                                    background=background.start_soon)
        assert isinstance(outcome, Decided)
        g.values.append(value)
        alice.mls.apply(value.commit)
        assert "AcceptLeased" in spared.asked  # after the patience, not Prepare
        assert all("Prepare" not in link.asked for link in links)
        await commit()  # the fallback's lease: the two that answered
        assert "AcceptLeased" not in silent.asked  # (its Decided may still be on the way)
        assert spared.asked == ["AcceptLeased", "Decided"]
        background.cancel_scope.cancel()


async def test_a_rival_breaks_the_lease_and_the_leader_loses_to_it(
        cluster: MemoryCluster) -> None:
    """Bob commits slot 2 with the full protocol while Alice holds the lease for it; Bob's
    decision is not announced, so the syncnodes can only stop Alice's fast Accept by their
    promises to Bob. Alice must fall back and end with Bob's value (Lost), never her own."""
    alice, bob = Device("alice"), Device("bob")
    leases = LeaseBook()
    async with cluster.clients(alice) as clients:
        g = new_group(alice, [n.entry for n in cluster.nodes])
        for c in clients:
            await c.register_group(g.values[0])
        add = add_value(g, alice, [bob])
        outcome = await propose(alice.key, clients, g.group_id, 1, add.encode(),
                                g.manifest.acceptors(), leases=leases)
        assert isinstance(outcome, Decided)
        g.values.append(add)
        alice.mls.apply(add.commit)
        bob.mls.join(add.welcome)
        assert leases.holds(g.group_id, 2)
        theirs = update_value(g, bob)
        won = await propose(bob.key, clients, g.group_id, 2, theirs.encode(),
                            g.manifest.acceptors(), announce=False, backoff=0.001)
        assert isinstance(won, Decided)
        ours = update_value(g, alice)
        lost = await propose(alice.key, clients, g.group_id, 2, ours.encode(),
                             g.manifest.acceptors(), announce=False, leases=leases,
                             backoff=0.001)
        assert isinstance(lost, Lost)
        assert lost.value == theirs.encode()
        assert lost.certificate.value_hash == won.certificate.value_hash


async def test_a_node_that_cannot_hold_two_slots_answers_without_a_lease(
        tmp_path: Path) -> None:
    """A slot cache of one entry cannot hold slot n + 1 beside slot n: the node accepts as
    usual and grants no lease (it must not loop, nor read state it did not load); the other
    two nodes still give the proposer its quorum of lease promises."""
    net = MemoryNetwork(seed=4)
    async with trio.open_nursery() as nursery:
        await nursery.start(net.run)
        c = MemoryCluster(net, nursery, tmp_path)
        tiny = await c.start_node(cache_slots=1)
        for _ in range(2):
            await c.start_node()
        alice = Device("alice")
        leases = LeaseBook()
        async with c.clients(alice) as clients:
            g = await found_group([n.entry for n in c.nodes], clients, alice)
            links = {c.node_id: Recording(c) for c in clients}
            for _ in range(3):
                value = update_value(g, alice)
                with trio.fail_after(TIMEOUT / 2):
                    outcome = await propose(alice.key, list(links.values()), g.group_id,
                                            g.next_slot, value.encode(), g.manifest.acceptors(),
                                            leases=leases)
                assert isinstance(outcome, Decided)
                g.values.append(value)
                alice.mls.apply(value.commit)
            assert links[tiny.key.public].asked.count("Prepare") == 1  # the fast path held
            lease = leases.take(g.group_id, g.next_slot)
            assert lease is not None
            assert tiny.key.public not in {p.acceptor for p in lease.promises}
        nursery.cancel_scope.cancel()
