"""Real ``syncnode run`` processes of one node over one PostgreSQL database, on loopback over
iroh: they share the node key and one ticket lists them all; a subscriber on one process gets
what another stored; Paxos through one is served by the other; and a process killed with
SIGKILL mid-traffic loses nothing it acknowledged, while the device reconnects to another."""

from __future__ import annotations

import random
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio

from proto.envelope import Envelope
from proto.errors import SyncnodeError
from proto.identity import SecretKey
from proto.manifest import SyncnodeEntry
from proto.paxos.messages import Decided
from proto.rpc import SyncnodeClient
from proto.ticket import NodeTicket
from proto.transport.iroh import IrohTransport
from syncnode.procs import NodeProcess
from tests.pg_kit import pg_dsn, pg_server  # noqa: F401
from tests.syncnode_kit import (
    Device,
    decide,
    found_group,
    signed_accept,
    signed_prepare,
    update_value,
)
from tests.test_postgres_processes import check_one_acceptor


def node_process(root: Path, name: str, dsn: str, key_from: Path | None = None
                 ) -> NodeProcess:
    """A process of a node on ``dsn``: the first named by ``--database``, another (with the
    first one's key) by ``storage`` in its syncnode.toml."""
    node = NodeProcess(root / name, [] if key_from else ["--database", dsn])
    subprocess.run([*node.command, "init", "--data-dir", str(node.data_dir),
                    *(["--key", str(key_from)] if key_from else [])],
                   check=True, capture_output=True, text=True, timeout=60)
    if key_from:
        toml = node.data_dir / "syncnode.toml"
        toml.write_text(toml.read_text().replace('storage = ""', f'storage = "{dsn}"'))
    return node


@pytest.fixture
def two(tmp_path: Path, pg_dsn: str) -> Iterator[list[NodeProcess]]:  # noqa: F811
    """Two processes of one node, the second started after the first is serving."""
    first = node_process(tmp_path, "p1", pg_dsn)
    second = node_process(tmp_path, "p2", pg_dsn, key_from=first.data_dir / "node.key")
    try:
        first.start()
        second.start()
        yield [first, second]
    finally:
        for n in (first, second):
            n.stop()


@asynccontextmanager
async def client(ticket: NodeTicket, device: Device | None = None
                 ) -> AsyncIterator[SyncnodeClient]:
    """A connection from its own endpoint (so it reaches the addresses it is given)."""
    transport = await IrohTransport.bind(SecretKey.generate())
    try:
        async with SyncnodeClient.connect(transport, ticket, timeout=20) as c:
            if device is not None:
                await c.authenticate(device.key)
            yield c
    finally:
        await transport.aclose()


def only(node: NodeProcess) -> NodeTicket:
    """A ticket of the node with this process's address only."""
    assert node.ticket is not None
    return NodeTicket(node.ticket.node_id, node.ticket.addrs[:1])


async def test_processes_of_one_node_serve_as_one(two: list[NodeProcess]) -> None:
    p1, p2 = two
    assert p1.ticket is not None and p2.ticket is not None
    assert p1.ticket.node_id == p2.ticket.node_id
    assert set(p2.ticket.addrs) == {p2.ticket.addrs[0], p1.ticket.addrs[0]}  # lists both
    alice, bob = Device("alice"), Device("bob")
    async with client(only(p1), alice) as c1, client(only(p2), bob) as c2:
        # Slot 1 adds bob (a sender's own envelopes are not pushed back to it).
        g = await found_group([SyncnodeEntry(p2.ticket.node_id, p2.ticket.addrs)], [c1], alice,
                              [bob])
        assert isinstance(await decide(g, alice, [c1], update_value(g, alice)), Decided)
        alice.mls.apply(g.values[2].commit)
        page = await c2.fetch_decided(g.group_id, 1)  # decided through p1, served by p2
        assert page.top == 2 and page.decided[1].value == g.values[2].encode()
        latencies = []
        async with c2.subscribe(g.group_id) as feed:
            for seq in range(1, 31):
                env = Envelope.seal(alice.key, g.group_id, seq, 2, b"update %d" % seq)
                sent = time.perf_counter()
                await c1.store(env)
                with trio.fail_after(10):
                    assert await feed.__anext__() == env
                latencies.append(time.perf_counter() - sent)
    info = p2.info()  # syncnode info reads the shared database
    assert (info["groups"], info["decisions"], info["envelopes"], info["processes"]) == \
        (1, 2, 30, 2)
    assert set(NodeTicket.parse(str(info["ticket"])).addrs) == set(p2.ticket.addrs)
    latencies.sort()
    print(f"\nreal processes, store acked by p1 -> pushed by p2 to its subscriber: median "
          f"{latencies[15] * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms")


async def test_conflicting_paxos_requests_to_two_processes(two: list[NodeProcess]) -> None:
    """Prepares and Accepts of one slot, ballots shuffled, sent at once over iroh to both
    processes, 20 bursts of 10: the replies are those of one acceptor."""
    p1, p2 = two
    assert p2.ticket is not None
    alice = Device("alice")
    rng = random.Random(7)
    replies: list[Any] = []
    async with client(only(p1), alice) as c1, client(only(p2), alice) as c2:
        g = await found_group([SyncnodeEntry(p2.ticket.node_id, p2.ticket.addrs)], [c1], alice)
        value = update_value(g, alice).encode()

        async def send(c: SyncnodeClient, msg: Any) -> None:
            replies.append(await c.request(msg))

        for burst in range(20):
            rounds = list(range(burst * 10 + 1, burst * 10 + 11))
            rng.shuffle(rounds)
            async with trio.open_nursery() as nursery:
                for i, rnd in enumerate(rounds):
                    msg = signed_prepare(alice, g.group_id, 1, rnd) if rng.random() < 0.5 \
                        else signed_accept(alice, g.group_id, 1, rnd, value)
                    nursery.start_soon(send, (c1, c2)[i % 2], msg)
    kinds = {type(r).__name__ for r in replies}
    assert kinds == {"Promise", "Accepted", "Nack"}, kinds
    check_one_acceptor(replies)


async def test_a_killed_process_loses_nothing_acknowledged(two: list[NodeProcess]) -> None:
    """Many stores in flight through p1 when it is killed with SIGKILL: every acknowledged
    envelope is held afterwards, and the device, dialling the ticket that lists both
    processes, goes on through p2."""
    p1, p2 = two
    assert p2.ticket is not None
    alice = Device("alice")
    acked: set[int] = set()
    async with client(only(p1), alice) as c1:
        g = await found_group([SyncnodeEntry(p2.ticket.node_id, p2.ticket.addrs)], [c1], alice)

        some_acked = trio.Event()

        async def store(seq: int) -> None:
            try:
                await c1.store(Envelope.seal(alice.key, g.group_id, seq, 0, b"e%d" % seq))
                acked.add(seq)
                if len(acked) == 50:
                    some_acked.set()
            except SyncnodeError:
                pass  # in flight when the process died: not acknowledged

        async with trio.open_nursery() as nursery:
            for seq in range(1, 401):
                nursery.start_soon(store, seq)
            await some_acked.wait()
            p1.kill()  # SIGKILL, with stores in flight
            # The replies still in flight will never come; a device's link watchdog would give
            # up on the connection, here we stop waiting.
            nursery.cancel_scope.deadline = trio.current_time() + 3
    assert 0 < len(acked) < 400
    both = NodeTicket(p2.ticket.node_id, (p1.ticket.addrs[0], p2.ticket.addrs[0]))  # type: ignore
    async with client(both, alice) as c:  # the dead process first: the device gets through
        for seq in range(1, 401):
            await c.store(Envelope.seal(alice.key, g.group_id, seq, 0, b"e%d" % seq))
        held: set[int] = set()
        marks: dict[bytes, int] = {}
        while True:
            page = await c.backfill(g.group_id, marks)
            held.update(e.seq for e in page.envelopes)
            if not page.more:
                break
            marks = {alice.key_fpr: max(held)}
    assert held == set(range(1, 401)) and acked <= held


def open_connections(node: NodeProcess) -> float:
    status, text = node.get("/metrics")
    assert status == 200
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("syncnode_connections_open"))


async def test_devices_carry_on_when_their_process_is_killed(
        tmp_path: Path, two: list[NodeProcess]) -> None:
    """Two real device agents on a document of this node (its ticket lists both processes):
    the process serving them is SIGKILLed, and they reconnect to the other, keep converging,
    and every edit becomes durable. (It takes about 20 s here: a device keeps its iroh
    endpoint, which sees both processes as one remote endpoint and keeps trying the dead path
    for a while before the other; the bound is 60 s.)"""
    from device.agent import Device as Agent
    from tests.device_kit import FAST, converged, eventually

    p1, p2 = two
    assert p2.ticket is not None and len(p2.ticket.addrs) == 2
    config = replace(FAST, keepalive_interval=0.5, keepalive_timeout=1.0)  # notice it sooner
    async with Agent.open(tmp_path / "a", config=config) as a, \
            Agent.open(tmp_path / "b", config=config) as b:
        doc_a = await a.create_document([p2.ticket], name="notes")
        doc_a.change(lambda e: e.counter("edits").increment(1))
        with trio.fail_after(60):
            doc_b = await b.join(doc_a.invite())
        await converged([doc_a, doc_b])
        victim, survivor = (p1, p2) if open_connections(p1) >= open_connections(p2) \
            else (p2, p1)
        assert open_connections(victim) >= 1  # at least one device is served by it
        victim.kill()
        killed = time.perf_counter()
        for i in range(20):
            for name, d in (("a", doc_a), ("b", doc_b)):
                d.change(lambda e, item=f"{name}{i}": e.list("log").push(item))
            await trio.sleep(0.05)
        want = sorted(f"{name}{i}" for name in "ab" for i in range(20))
        await converged([doc_a, doc_b], timeout=60)
        await eventually(lambda: sorted(doc_a.value()["log"]) == want, 60, "every edit")
        await converged([doc_a, doc_b], timeout=60)
        print(f"\ndevices converged again {time.perf_counter() - killed:.1f} s after their "
              "process was killed")
        for d in (doc_a, doc_b):
            with trio.fail_after(60):
                await d.wait_durable()
        assert open_connections(survivor) >= 2
