"""Three real ``syncnode run`` processes on loopback, driven over real iroh by a scripted client
with real MLS commits and real signatures."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio

from proto.codec import decode
from proto.envelope import Envelope
from proto.errors import TransportError
from proto.identity import SecretKey
from proto.messages import ErrorCode, ErrorReply
from proto.paxos.messages import (
    Accepted,
    Ballot,
    Decided,
    Nack,
    PaxosRejected,
    Prepare,
    Promise,
)
from proto.paxos.quorum import verify_certificate
from proto.rpc import RemoteError, SyncnodeClient
from proto.service import FetchDecided
from proto.transport.iroh import IrohTransport
from syncnode.procs import NodeProcess
from tests.syncnode_kit import (
    Device,
    Group,
    decide,
    found_group,
    signed_accept,
    signed_prepare,
    update_value,
)


@asynccontextmanager
async def connected(nodes: Sequence[NodeProcess], device: Device | None = None
                    ) -> AsyncIterator[list[SyncnodeClient]]:
    transport = await IrohTransport.bind(SecretKey.generate())
    try:
        async with AsyncExitStack() as stack:
            clients = []
            for n in nodes:
                assert n.ticket is not None
                c = await stack.enter_async_context(SyncnodeClient.connect(transport, n.ticket))
                if device is not None:
                    await c.authenticate(device.key)
                clients.append(c)
            yield clients
    finally:
        await transport.aclose()


async def _new_group(nodes: Sequence[NodeProcess], alice: Device, *members: Device) -> Group:
    async with connected(nodes, alice) as clients:
        return await found_group([n.entry for n in nodes], clients, alice, members)


async def test_group_paxos_messages_and_push(nodes: list[NodeProcess]) -> None:
    alice, bob = Device("alice"), Device("bob")
    g = await _new_group(nodes, alice, bob)
    async with connected(nodes, alice) as ac, connected(nodes[:1], bob) as (bc,):
        v = update_value(g, alice)
        outcome = await decide(g, alice, ac, v)
        assert isinstance(outcome, Decided)
        alice.mls.apply(v.commit)
        bob.mls.apply(v.commit)
        for c in ac:  # every node serves both decisions with certificates that verify
            page = await c.fetch_decided(g.group_id, 1)
            assert page.top == 2
            for slot, d in enumerate(page.decided, start=1):
                verify_certificate(d.certificate, g.values[slot - 1].manifest.acceptors())
                assert d.value == g.values[slot].encode()
        async with bc.subscribe(g.group_id) as feed:
            sent = [Envelope.seal(alice.key, g.group_id, s, 2, alice.mls.encrypt(b"e%d" % s))
                    for s in range(1, 21)]
            for env in sent:
                for c in ac:
                    await c.store(env)
            got = [await feed.__anext__() for _ in sent]
        assert [bob.mls.decrypt(e.ciphertext) for e in got] == [b"e%d" % s for s in range(1, 21)]
        page = await bc.backfill(g.group_id, {alice.key_fpr: 15})
        assert [e.seq for e in page.envelopes] == [16, 17, 18, 19, 20]

    status, metrics = nodes[0].get("/metrics")
    assert status == 200
    assert 'syncnode_paxos_messages_total{type="Prepare"}' in metrics
    assert "syncnode_messages_stored_total 20.0" in metrics
    assert "syncnode_messages_pushed_total 20.0" in metrics
    assert "syncnode_commit_seconds_bucket" in metrics and "syncnode_groups 1.0" in metrics
    assert nodes[0].get("/healthz")[0] == 200 and nodes[0].get("/readyz")[0] == 200
    assert nodes[0].terminate() == 0  # graceful SIGTERM
    info = nodes[0].info()
    assert (info["groups"], info["decisions"], info["envelopes"]) == (1, 2, 20)


async def test_bad_input_is_refused_and_changes_nothing(nodes: list[NodeProcess]) -> None:
    alice, mallory = Device("alice"), Device("mallory")
    g = await _new_group(nodes, alice)
    target = nodes[0]
    before = target.info()

    async with connected([target], alice) as (c,):
        cases = [
            (signed_prepare(alice, b"\x07" * 32, 1, 1), ErrorCode.NOT_FOUND),
            (signed_prepare(mallory, g.group_id, 1, 1), 2),  # NOT_A_MEMBER
            (signed_prepare(alice, g.group_id, 5, 1), 4),  # wrong slot: UNKNOWN_SLOT
        ]
        good = signed_prepare(alice, g.group_id, 1, 3)
        replayed = Prepare(g.group_id, 1, Ballot(9, alice.key_fpr), good.signature)
        cases.append((replayed, 3))  # BAD_SIGNATURE: a signature for another ballot
        for msg, expected in cases:
            reply = await c.request(msg)
            if isinstance(expected, ErrorCode):
                assert isinstance(reply, ErrorReply) and reply.code == expected, reply
            else:
                assert isinstance(reply, PaxosRejected) and reply.reason == expected, reply
        forged = Envelope.seal(mallory.key, g.group_id, 1, 0, b"x")
        with pytest.raises(RemoteError) as err:
            await c.store(forged)
        assert err.value.code == ErrorCode.UNAUTHORIZED
        reply = await c.request(FetchDecided(g.group_id, 0, 10))
        assert reply.top == 0

    # Garbage and oversized frames get the connection dropped; the node keeps serving others.
    transport = await IrohTransport.bind(SecretKey.generate())
    try:
        assert target.ticket is not None
        for payload in (b"\x93\xff\x00garbage", None):
            conn = await transport.connect(target.ticket.node_id, target.ticket.addrs)
            stream = await conn.open_stream()
            if payload is None:  # a header announcing a 1 GiB frame
                await stream._send.write_all((1 << 30).to_bytes(4, "big"))  # type: ignore
            else:
                await stream.send(payload)
            with pytest.raises(TransportError), trio.fail_after(10):
                while True:
                    frame = await stream.receive()
                    assert isinstance(decode(frame), ErrorReply)
            await conn.aclose()
    finally:
        await transport.aclose()
    async with connected([target], alice) as (c,):
        assert (await c.fetch_decided(g.group_id, 0)).top == 0
    after = target.info()
    assert {k: after[k] for k in ("groups", "decisions", "envelopes")} == \
           {k: before[k] for k in ("groups", "decisions", "envelopes")}
    _, metrics = target.get("/metrics")
    assert "syncnode_protocol_disconnects_total 2.0" in metrics


async def test_sigkill_during_storms_loses_nothing_acknowledged(nodes: list[NodeProcess]
                                                               ) -> None:
    alice, bob = Device("alice"), Device("bob")
    g = await _new_group(nodes, alice, bob)     # slot 1 decided; storms below
    g2 = await _new_group(nodes, bob)           # slot 1 only gets prepares/accepts
    victim = nodes[2]
    acked_env: set[tuple[bytes, int]] = set()
    acked_round = {"promise": 0, "accepted": 0}
    storm_going = trio.Event()
    v2 = update_value(g2, bob)
    raw2 = v2.encode()

    async def envelope_storm(dev: Device, client: SyncnodeClient) -> None:
        seq = 0
        while True:
            seq += 1
            env = Envelope.seal(dev.key, g.group_id, seq, 1, b"%d" % seq * 64)
            await client.store(env)
            acked_env.add((dev.key_fpr, seq))
            if len(acked_env) >= 200:
                storm_going.set()

    async def paxos_storm(client: SyncnodeClient) -> None:
        rnd = 0
        while True:
            rnd += 1
            if rnd % 2:
                reply = await client.request(signed_prepare(bob, g2.group_id, 1, rnd))
                if isinstance(reply, Promise):
                    acked_round["promise"] = rnd
            else:
                reply = await client.request(signed_accept(bob, g2.group_id, 1, rnd, raw2))
                if isinstance(reply, Accepted):
                    acked_round["accepted"] = rnd

    async with connected([victim], alice) as (ca,), connected([victim], bob) as (cb,), \
            connected([victim], bob) as (cp,):
        with trio.move_on_after(20):
            try:
                async with trio.open_nursery() as n:
                    for dev, cl in ((alice, ca), (bob, cb)):
                        n.start_soon(envelope_storm, dev, cl)
                    n.start_soon(paxos_storm, cp)
                    await storm_going.wait()
                    await trio.to_thread.run_sync(victim.kill)
            except* (TransportError, RemoteError):
                pass
    assert len(acked_env) >= 200 and acked_round["accepted"] > 0

    # While the victim is down, the others decide two more slots.
    async with connected(nodes[:2], alice) as live:
        for _ in range(2):
            v = update_value(g, alice)
            assert isinstance(await decide(g, alice, live, v), Decided)
            alice.mls.apply(v.commit)

    db = sqlite3.connect(victim.data_dir / "syncnode.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    victim.start()
    async with connected([victim], alice) as (c,):
        stored: set[tuple[bytes, int]] = set()
        marks: dict[bytes, int] = {}
        while True:
            page = await c.backfill(g.group_id, marks, limit=1024)
            for e in page.envelopes:
                stored.add((e.sender, e.seq))
                marks[e.sender] = max(marks.get(e.sender, 0), e.seq)
            if not page.more:
                break
        assert acked_env <= stored, f"lost {len(acked_env - stored)} acknowledged envelopes"
        # Acknowledged promise/accept survived: a lower ballot is refused, and a new prepare
        # reports the value accepted at (at least) the acknowledged round.
        top = max(acked_round.values()) + 10
        promise = await c.request(signed_prepare(bob, g2.group_id, 1, top))
        assert isinstance(promise, Promise) and promise.accepted is not None
        assert promise.accepted.ballot.round >= acked_round["accepted"]
        nack = await c.request(signed_prepare(bob, g2.group_id, 1, acked_round["promise"]))
        assert isinstance(nack, Nack)
        # It catches up on the decisions it missed, from its peers, by itself.
        with trio.fail_after(30):
            while (await c.fetch_decided(g.group_id, 1)).top < 3:  # noqa: ASYNC110 (remote)
                await trio.sleep(0.2)
        page = await c.fetch_decided(g.group_id, 1)
        assert [d.value for d in page.decided] == [x.encode() for x in g.values[1:]]
