"""Several processes of one syncnode over one PostgreSQL database, as service instances in one
test process (each with its own storage: writer, read pool and LISTEN connection, as separate
``syncnode run`` processes have): the Paxos acceptor stays one acceptor, pushes reach
subscribers of any process, and what one process decides the others serve. Real processes:
``tests/test_postgres_cluster.py``."""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import trio

from proto.codec import decode, decode_as
from proto.envelope import Envelope
from proto.identity import SecretKey
from proto.manifest import SyncnodeEntry
from proto.paxos.messages import (
    Accept,
    Accepted,
    AcceptorRecord,
    Ballot,
    Decided,
    Nack,
    Prepare,
    Promise,
)
from proto.paxos.quorum import make_certificate
from proto.service import RegisterGroup, Subscribe
from syncnode.budgets import TokenBucket
from syncnode.service import Service
from syncnode.session import Session
from syncnode.storage.postgres import PostgresStorage
from tests.pg_kit import pg_dsn, pg_server  # noqa: F401
from tests.syncnode_kit import (
    Device,
    Group,
    add_value,
    new_group,
    signed_accept,
    signed_prepare,
    update_value,
)


def session_of(device: Device) -> Session:
    s = Session(device.endpoint, TokenBucket(1e9, 10**9))
    s.keys[device.key_fpr] = device.key.public
    return s


@asynccontextmanager
async def node_processes(dsn: str, key: SecretKey, count: int, **kwargs: Any
                         ) -> AsyncIterator[list[Service]]:
    """``count`` services of one node (one key) over one database."""
    async with AsyncExitStack() as stack:
        services = []
        for _ in range(count):
            service = Service(key, PostgresStorage(dsn), **kwargs)
            nursery = await stack.enter_async_context(trio.open_nursery())
            await nursery.start(service.run)
            stack.push_async_callback(service.aclose)
            services.append(service)
        yield services


async def founded(services: list[Service], creator: Device, key: SecretKey) -> Group:
    g = new_group(creator, [SyncnodeEntry(key.public, ())])
    reply = await services[0].handle(session_of(creator), RegisterGroup(g.values[0].encode()))
    assert reply.created, reply
    return g


def check_one_acceptor(replies: list[Promise | Accepted]) -> None:
    """What any single Paxos acceptor guarantees: if it accepted ballot ``a`` and promised
    ballot ``b > a``, the promise reports an accepted ballot of at least ``a`` (the accept came
    first), or it broke its promise. One violation breaks Paxos' safety."""
    accepted = [r.ballot for r in replies if isinstance(r, Accepted)]
    for p in (r for r in replies if isinstance(r, Promise)):
        for a in accepted:
            if a < p.ballot:
                assert p.accepted is not None and not p.accepted.ballot < a, \
                    f"promise {p.ballot} reports {p.accepted and p.accepted.ballot}, but " \
                    f"{a} was accepted"


async def test_conflicting_prepares_and_accepts_to_two_processes(pg_dsn: str  # noqa: F811
                                                                 ) -> None:
    """Both processes get Prepares and Accepts of one slot at once, ballots in a random order,
    many times over: together they answer as one acceptor."""
    key, creator = SecretKey.generate(), Device("creator")
    rng = random.Random(20)
    async with node_processes(pg_dsn, key, 2) as services:
        g = await founded(services, creator, key)
        me = session_of(creator)
        replies: list[Any] = []
        value = update_value(g, creator).encode()  # (MLS allows one pending commit)

        async def send(service: Service, msg: Prepare | Accept) -> None:
            replies.append(await service.handle(me, msg))

        for burst in range(40):
            rounds = list(range(burst * 10 + 1, burst * 10 + 11))
            rng.shuffle(rounds)
            async with trio.open_nursery() as nursery:
                for i, rnd in enumerate(rounds):
                    service = services[i % 2]
                    if rng.random() < 0.5:
                        msg: Prepare | Accept = signed_prepare(creator, g.group_id, 1, rnd)
                    else:
                        msg = signed_accept(creator, g.group_id, 1, rnd, value)
                    nursery.start_soon(send, service, msg)
        kinds = {type(r).__name__ for r in replies}
        assert kinds <= {"Promise", "Accepted", "Nack"}, kinds
        assert {"Promise", "Accepted", "Nack"} <= kinds  # the race was real
        check_one_acceptor(replies)
        nacked = [r for r in replies if isinstance(r, Nack)]
        granted = [r.ballot for r in replies if isinstance(r, Promise | Accepted)]
        assert all(n.promised > n.ballot for n in nacked)
        final = decode_as(await services[1].store.acceptor_record(g.group_id, 1) or b"",
                          AcceptorRecord)
        assert final.promised == max(granted)


async def test_a_promise_made_by_one_process_binds_the_other(pg_dsn: str  # noqa: F811
                                                             ) -> None:
    """The sequence a cache per process gets wrong: process 2 read the slot (its cache
    says: nothing promised), process 1 promises round 5, then process 2 gets an Accept of
    round 4. It must refuse it, and a Prepare of round 6 must learn of nothing accepted."""
    key, creator = SecretKey.generate(), Device("creator")
    async with node_processes(pg_dsn, key, 2) as (p1, p2):
        g = await founded([p1, p2], creator, key)
        me = session_of(creator)
        value = update_value(g, creator).encode()
        assert isinstance(await p2.handle(me, signed_prepare(creator, g.group_id, 1, 1)),
                          Promise)
        assert isinstance(await p1.handle(me, signed_prepare(creator, g.group_id, 1, 5)),
                          Promise)
        nack = await p2.handle(me, signed_accept(creator, g.group_id, 1, 4, value))
        assert isinstance(nack, Nack) and nack.promised == Ballot(5, creator.key_fpr)
        promise = await p2.handle(me, signed_prepare(creator, g.group_id, 1, 6))
        assert isinstance(promise, Promise) and promise.accepted is None


async def test_pushes_reach_subscribers_of_every_process(pg_dsn: str) -> None:  # noqa: F811
    """An envelope stored through one process and a decision learned through another reach
    a subscriber of a third, in order; prints the push latency across processes."""
    key, creator, bob = SecretKey.generate(), Device("creator"), Device("bob")
    async with node_processes(pg_dsn, key, 3) as services:
        g = await founded(services, creator, key)
        me = session_of(creator)

        async def decide(value: bytes) -> Decided:
            """Paxos through process 0, learned through process 1."""
            slot = g.next_slot
            for msg in (signed_prepare(creator, g.group_id, slot, 1),
                        signed_accept(creator, g.group_id, slot, 1, value)):
                reply = await services[0].handle(me, msg)
            assert isinstance(reply, Accepted)
            decided = Decided(value, make_certificate(g.group_id, slot, reply.ballot,
                                                      reply.value_hash,
                                                      {reply.acceptor: reply.signature}))
            assert (await services[1].handle(me, decided)).count == 1
            return decided

        # Slot 1 adds bob, who subscribes (a sender's own envelopes are not pushed back to it).
        add = add_value(g, creator, [bob])
        await decide(add.encode())
        g.values.append(add)
        creator.mls.apply(add.commit)
        _, sub = await services[2].subscribe(session_of(bob), Subscribe(g.group_id))
        latencies = []
        for seq in range(1, 21):
            env = Envelope.seal(creator.key, g.group_id, seq, 1, b"update %d" % seq)
            sent = time.perf_counter()
            assert type(await services[seq % 2].handle(me, env)).__name__ == "Stored"
            with trio.fail_after(5):
                got = decode(await sub.receive.receive())
            latencies.append(time.perf_counter() - sent)
            assert got == env
        decided = await decide(update_value(g, creator).encode())
        with trio.fail_after(5):
            assert decode(await sub.receive.receive()) == decided
        assert (await services[2].group(g.group_id)).top == 2  # type: ignore[union-attr]
        latencies.sort()
        print(f"\ncross-process push (store acked by one process -> frame queued on "
              f"another): median {latencies[len(latencies) // 2] * 1000:.2f} ms, "
              f"max {latencies[-1] * 1000:.2f} ms")


async def test_a_process_not_yet_told_of_a_decision_reads_it_before_refusing(
        pg_dsn: str) -> None:  # noqa: F811
    """Notifications take a moment (or a process missed them): an envelope of the new epoch,
    or a Prepare of the next slot, sent to a process whose cache is behind is not refused
    while the database has the decision."""
    key, creator = SecretKey.generate(), Device("creator")
    async with node_processes(pg_dsn, key, 2) as (p1, p2):
        g = await founded([p1, p2], creator, key)
        me = session_of(creator)
        assert (await p2.group(g.group_id)).top == 0  # type: ignore[union-attr]  # cached
        p2.store.on_change = None  # type: ignore[attr-defined]  # it hears nothing more
        value = update_value(g, creator)
        for msg in (signed_prepare(creator, g.group_id, 1, 1),
                    signed_accept(creator, g.group_id, 1, 1, value.encode())):
            reply = await p1.handle(me, msg)
        cert = make_certificate(g.group_id, 1, reply.ballot, reply.value_hash,
                                {reply.acceptor: reply.signature})
        assert (await p1.handle(me, Decided(value.encode(), cert))).count == 1
        assert (await p2.group(g.group_id)).top == 0  # type: ignore[union-attr]  # stale
        env = Envelope.seal(creator.key, g.group_id, 1, 1, b"at epoch 1")
        assert type(await p2.handle(me, env)).__name__ == "Stored"
        creator.mls.apply(value.commit)
        assert isinstance(await p2.handle(me, signed_prepare(creator, g.group_id, 2, 1)),
                          Promise)
        assert (await p2.handle(me, Decided(value.encode(), cert))).count == 0  # known
