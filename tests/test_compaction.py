"""Compaction with real ``syncnode run`` processes on loopback, real MLS and real SQLite (issue
17): a decided compaction point makes every syncnode delete the updates it covers and keep the
state; a device that was offline across it catches up from the state plus the tail, and its
own edits made offline (sealed, never acknowledged) still arrive; a device joins after it; a
forged point (a state that lacks updates it claims) raises the alarm with evidence on honest
members, whose own states then carry the lost updates to a device that comes back later."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import trio

from device.agent import Device
from device.document import Document
from proto.codec import decode_as
from proto.compaction import CompactionEvidence, CompactionPoint, make_point
from proto.payload import PayloadKind, pack_updates
from proto.ticket import NodeTicket
from proto.transport.memory import MemoryNetwork
from syncnode.procs import NodeProcess
from tests.device_kit import FAST, converged, eventually, held, memory_device

CONFIG = replace(FAST, compact_every_updates=0, compact_every_bytes=0)
"""Compaction only when a test asks for it."""


def below_point(point: CompactionPoint, envelopes: dict[bytes, set[int]]) -> set[tuple[bytes, int]]:
    """Envelopes a syncnode still serves that the point covers (the state aside)."""
    covered = point.vector()
    return {(s, q) for s, seqs in envelopes.items() for q in seqs
            if q <= covered.get(s, 0) and (s, q) != (point.state_sender, point.state_seq)}


async def compacted_everywhere(doc: Document, tickets: list[NodeTicket],
                               point: CompactionPoint) -> list[dict[bytes, set[int]]]:
    """Wait until every syncnode serves nothing below the point (but the state)."""
    with trio.fail_after(20):
        while True:
            views = [await held(doc, t) for t in tickets]
            if not any(below_point(point, v) for v in views):
                return views
            await trio.sleep(0.1)


async def edits(doc: Document, who: str, count: int) -> None:
    """``count`` edits, each sealed into an envelope of its own, then durable."""
    for i in range(count):
        doc.change(lambda e, k=f"{who}-{i}", i=i: e.map("m").insert(k, i))
        doc.flush()
    await doc.wait_durable()


async def offline_edits(path: Path, keys: list[str]) -> None:
    """Open the device with no syncnode reachable (an empty in-memory network) and edit: the
    edits are sealed into the outbox and never acknowledged."""
    net = MemoryNetwork(seed=7)
    async with trio.open_nursery() as nursery:
        await nursery.start(net.run)
        async with memory_device(net, path, CONFIG) as dev:
            doc = dev.documents()[0]
            for k in keys:
                doc.change(lambda e, k=k: e.map("m").insert(k, 1))
            doc.flush()
            assert doc.sync_status().unsent == 0 and len(doc.outbox.pending) >= 1
        nursery.cancel_scope.cancel()


async def test_compaction_bounds_storage_and_offline_devices_catch_up(
        tmp_path: Path, nodes: list[NodeProcess]) -> None:
    tickets = [n.ticket for n in nodes if n.ticket is not None]
    async with Device.open(tmp_path / "a", config=CONFIG) as a, \
            Device.open(tmp_path / "b", config=CONFIG) as b:
        doc_a = await a.create_document(tickets)
        with trio.fail_after(60):
            doc_b = await b.join(doc_a.invite())
            async with Device.open(tmp_path / "c", config=CONFIG) as c:
                doc_c = await c.join(doc_a.invite())
                await edits(doc_c, "c-early", 2)
        await offline_edits(tmp_path / "c", ["c-offline-1", "c-offline-2"])

        await edits(doc_a, "a", 40)
        await edits(doc_b, "b", 40)
        await converged([doc_a, doc_b])
        before = [await held(doc_a, t) for t in tickets]
        with trio.fail_after(60):
            slot = await doc_a.compact()
        assert slot == doc_a.epoch
        raw = doc_a.manifest.compaction
        assert raw is not None
        point = CompactionPoint.decode(raw)
        assert point.vector()[doc_b.me] >= 40 and point.vector()[doc_a.me] > 40
        assert point.vector()[doc_c.me] == 2  # c's offline edits were never sent

        # Every syncnode deleted what the point covers and kept the state and the rest.
        views = await compacted_everywhere(doc_a, tickets, point)
        for old, now in zip(before, views, strict=True):
            assert point.state_seq in now[doc_a.me]
            assert sum(map(len, now.values())) <= 1 + sum(
                1 for s, seqs in old.items() for q in seqs if q > point.vector().get(s, 0))
            assert sum(map(len, old.values())) >= 80

        # The other member checked the point against the updates it delivered and the state.
        await eventually(lambda: doc_b.replica.ledger.state_checked, 20, "b to check the state")
        assert doc_b.replica.ledger.checked >= 80 and not doc_a.alarms() and not doc_b.alarms()

        await edits(doc_a, "a-tail", 3)

        # c comes back: it learns the point's slot, gets the state first, then the tail; its
        # offline edits (older than the point, seqs above what it covered of c) arrive.
        async with Device.open(tmp_path / "c", config=CONFIG) as c:
            doc_c = c.documents()[0]
            with trio.fail_after(60):
                value = await converged([doc_a, doc_b, doc_c], timeout=60)
                await doc_c.wait_durable()
            assert {"c-offline-1", "c-offline-2", "a-tail-2", "b-39", "c-early-0"} <= \
                set(value["m"])
            assert len(value["m"]) == 40 + 40 + 3 + 2 + 2
            assert not doc_c.alarms()

            # A device joining after the compaction gets the document too.
            async with Device.open(tmp_path / "d", config=CONFIG) as d:
                with trio.fail_after(60):
                    doc_d = await d.join(doc_a.invite())
                    await converged([doc_a, doc_d], timeout=60)


async def test_a_forged_compaction_raises_the_alarm_and_loses_nothing(
        tmp_path: Path, nodes: list[NodeProcess]) -> None:
    tickets = [n.ticket for n in nodes if n.ticket is not None]
    async with Device.open(tmp_path / "a", config=CONFIG) as a, \
            Device.open(tmp_path / "b", config=CONFIG) as b, \
            Device.open(tmp_path / "m", config=CONFIG) as m:
        doc_a = await a.create_document(tickets)
        with trio.fail_after(60):
            doc_b = await b.join(doc_a.invite())
            doc_m = await m.join(doc_a.invite())
            async with Device.open(tmp_path / "c", config=CONFIG) as c:
                await c.join(doc_a.invite())  # then offline until the end
        await edits(doc_a, "a", 5)
        await converged([doc_a, doc_b, doc_m])
        stale = doc_m.crdt.snapshot()  # what the forger's state will hold
        await edits(doc_b, "b-late", 5)
        await converged([doc_a, doc_b, doc_m])

        # m, a writer, seals its stale snapshot as a STATE claiming everything it delivered
        # (b's late edits included), and commits that point: the syncnodes cannot tell.
        r = doc_m.replica
        body = pack_updates([stale])
        with r.store.transaction():
            payload, env = doc_m.outbox.seal(PayloadKind.STATE, body)
        point = make_point({**payload.vector(), r.me: payload.seq}, r.me, payload.seq,
                           env.digest(), body, r.crdt.version_of([stale]))
        with trio.fail_after(60):
            await doc_m.wait_durable()
            await doc_m.membership.commit(lambda: doc_m.compactor._build(point))
        assert doc_m.manifest.compaction == point.encode()
        await compacted_everywhere(doc_a, tickets, point)  # b's late edits are gone there

        for doc in (doc_a, doc_b):  # honest members hold b's late edits: proven wrong
            await eventually(lambda doc=doc: any(x.kind == "bad-compaction"
                                                 for x in doc.alarms()), 20,
                             "the bad-compaction alarm")
        evidence = doc_b.store.one("SELECT evidence FROM alarms WHERE group_id=? AND "
                                   "kind='bad-compaction'", doc_b.group_id)[0]
        proof = decode_as(evidence, CompactionEvidence)
        assert proof.decided.certificate.slot == doc_m.epoch
        assert proof.sender == doc_b.me and "lacks an update" in proof.reason

        # The honest members republished the document; c, offline across the forged point,
        # gets b's late edits from their states.
        await doc_a.wait_durable()
        await doc_b.wait_durable()
        async with Device.open(tmp_path / "c", config=CONFIG) as c:
            doc_c = c.documents()[0]
            value = await converged([doc_b, doc_c], timeout=60)
            assert {f"b-late-{i}" for i in range(5)} <= set(value["m"])
