"""New documents from a group (``create_document(from_group=...)``, :mod:`device.group_docs`):
real ``syncnode`` processes, devices on real iroh endpoints on loopback, real MLS and SQLite."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest
import trio

import device.inbox
from device.agent import Device
from device.document import Document
from device.errors import DocumentError, JoinError
from device.events import Event, NewDocument
from device.offers import JOINED, PENDING
from proto.doc_offer import DocOffer, Seat
from proto.errors import DecodeError
from proto.manifest import Role
from proto.payload import Payload, PayloadKind
from syncnode.procs import NodeProcess
from tests.device_kit import FAST, converged, eventually
from tests.test_device_agent import devices, share, tickets


def roles(doc: Document) -> dict[bytes, Role]:
    return {d.fingerprint: d.role for d in doc.manifest.devices}


def offer_status(dev: Device, group_id: bytes) -> str | None:
    row = dev.store.one("SELECT status FROM offers WHERE group_id=?", group_id)
    return None if row is None else str(row[0])


async def test_members_join_a_document_made_from_their_group_and_converge(
        tmp_path: Path, nodes: list[NodeProcess]) -> None:
    async with devices(tmp_path, "a", "b", "c") as (a, b, c):
        src = await a.create_document(tickets(nodes), name="team")
        src_a, src_b, src_c = await share(src, [b, c])
        arrived: dict[str, list[Event]] = {"b": [], "c": []}
        src_b.subscribe(arrived["b"].append)
        src_c.subscribe(arrived["c"].append)

        # Only an admin copies a membership: b is not one.
        with pytest.raises(DocumentError, match="only an admin of team"):
            await b.create_document(from_group=src_b, name="nope")
        assert [d.name for d in b.documents()] == ["team"]

        new_a = await a.create_document(from_group=src_a, name="plan")
        assert [e.node_id for e in new_a.manifest.syncnodes] == \
            [e.node_id for e in src_a.manifest.syncnodes]  # the source's syncnodes by default
        await eventually(lambda: b.document_for(new_a.group_id) is not None
                         and c.document_for(new_a.group_id) is not None, 60,
                         "b and c to join the new document by themselves")
        new_b, new_c = b.document(new_a.id), c.document(new_a.id)
        assert new_b.name == new_c.name == "plan"
        docs = [new_a, new_b, new_c]
        await eventually(lambda: all(len(d.manifest.devices) == 3 for d in docs), 30,
                         "every member to see the three members")
        assert roles(new_a) == roles(new_b) == roles(new_c) == roles(src_a)
        assert set(roles(src_a).values()) == {Role.ADMIN, src_b.manifest.device(b.fingerprint)
                                             .role}  # an admin and another role, both copied
        for name, dev in (("b", b), ("c", c)):
            got = [e for e in arrived[name] if isinstance(e, NewDocument)]
            assert got == [NewDocument(new_a.id, "plan", a.id)], got
            assert offer_status(dev, new_a.group_id) == JOINED

        for k, d in enumerate(docs):
            d.change(lambda e, k=k: (e.list("items").push(f"from {k}"),
                                     e.counter("n").increment(1)))
        value = await converged(docs)
        assert sorted(value["items"]) == ["from 0", "from 1", "from 2"] and value["n"] == 3
        for d in docs:
            with trio.fail_after(30):
                await d.wait_durable()
            assert not d.alarms()
        # The old document is untouched: same members, its content does not have the new one's.
        assert "items" not in src_c.value() and len(src_c.manifest.devices) == 3
        assert not src_b.alarms() and not src_c.alarms()

        # An offer from a member that is not an admin is dropped by the others (b could only
        # lure them into a document it controls).
        forged = DocOffer(bytes(32), bytes(32), b.endpoint_id, (), new_b.manifest.syncnodes,
                          2**40, "lure", (Seat(c.fingerprint, bytes(16)),))
        with b.store.transaction():
            src_b.outbox.seal(PayloadKind.DOC_INVITE, forged.encode())
        sent = src_b.next_seq - 1
        await eventually(lambda: src_c.buffer.delivered.get(b.fingerprint, 0) >= sent, 30,
                         "c to receive b's forged offer")
        assert offer_status(c, bytes(32)) is None and c.document_for(bytes(32)) is None


def test_an_offer_names_one_seat_per_device_and_decodes_within_bounds() -> None:
    seats = tuple(Seat(bytes([i]) * 32, bytes([i]) * 16) for i in range(3))
    offer = DocOffer(b"g" * 32, b"h" * 32, b"e" * 32, ("127.0.0.1:1",), (), 99, "plan", seats)
    assert DocOffer.decode(offer.encode()) == offer
    ticket = offer.ticket_for(bytes([1]) * 32, b"i" * 32)
    assert ticket is not None and ticket.secret == bytes([1]) * 16
    assert (ticket.inviter, ticket.group_id, ticket.name) == (b"i" * 32, b"g" * 32, "plan")
    assert offer.ticket_for(b"x" * 32, b"i" * 32) is None
    with pytest.raises(DecodeError):
        DocOffer.decode(offer.encode()[:-3])


async def test_a_member_presenting_another_members_seat_is_refused(
        tmp_path: Path, nodes: list[NodeProcess], monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[DocOffer] = []
    take = device.inbox.take_offer

    def spy(r: object, p: Payload) -> None:
        assert p.kind == PayloadKind.DOC_INVITE
        seen.append(DocOffer.decode(p.body))
        take(r, p)  # type: ignore[arg-type]

    monkeypatch.setattr(device.inbox, "take_offer", spy)
    manual = replace(FAST, join_offers=False)  # c records offers but does not join them
    async with devices(tmp_path, "a", "b") as (a, b):
        src = await a.create_document(tickets(nodes), name="team")
        async with Device.open(tmp_path / "c", config=manual) as c:
            src_a = (await share(src, [b, c]))[0]
            new_a = await a.create_document(from_group=src_a, name="plan")
            await eventually(lambda: offer_status(c, new_a.group_id) == PENDING, 30,
                             "c to record the offer")
            offer = seen[-1]
            b_seat = offer.ticket_for(b.fingerprint, a.key.public)
            assert b_seat is not None
            # c holds b's seat (every member can read the offer) but not b's key.
            with trio.fail_after(60), pytest.raises(
                    JoinError, match="bound to another member's device"):
                await c.join(str(b_seat), timeout=50)
            assert c.document_for(new_a.group_id) is None
            # b joins with its own seat regardless, by itself.
            await eventually(lambda: b.document_for(new_a.group_id) is not None, 60,
                             "b to join")
            assert c.fingerprint not in roles(new_a)
        # c's offer waited in its store; the next run that joins offers takes it up.
        assert offer_status_closed(tmp_path / "c", new_a.group_id) == PENDING
        async with Device.open(tmp_path / "c", config=FAST) as c:
            await eventually(lambda: c.document_for(new_a.group_id) is not None, 60,
                             "c to join from its recorded offer after a restart")
            new_c = c.document(new_a.id)
            await eventually(lambda: len(new_a.manifest.devices) == 3, 30)
            assert roles(new_a) == roles(src_a)
            new_c.change(lambda e: e.map("m").insert("c", 1))
            await converged([new_a, b.document(new_a.id), new_c])
            assert offer_status(c, new_a.group_id) == JOINED
            assert not c.document(src.id).alarms()
        # Joined once: a restart does not join again or alarm.
        async with Device.open(tmp_path / "c", config=FAST) as c:
            assert [d.id for d in c.documents()].count(new_a.id) == 1
            assert offer_status(c, new_a.group_id) == JOINED


def offer_status_closed(home: Path, group_id: bytes) -> str | None:
    db = sqlite3.connect(home / "device.db")
    try:
        row = db.execute("SELECT status FROM offers WHERE group_id=?", (group_id,)).fetchone()
    finally:
        db.close()
    return None if row is None else str(row[0])
