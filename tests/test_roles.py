"""Roles, leaving and periodic key rotation end to end: real ``syncnode run`` processes, devices
on real iroh endpoints on loopback, real MLS, real SQLite."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import trio

from device.document import Document
from device.errors import NotAllowed
from device.rules import payload_deps
from proto.envelope import Envelope
from proto.manifest import Role
from proto.messages import ErrorCode
from proto.payload import Payload, PayloadKind, pack_updates
from proto.rpc import RemoteError
from syncnode.procs import NodeProcess
from tests.device_kit import FAST, converged, eventually
from tests.test_device_agent import devices, tickets


def _role(doc: Document, device: Document) -> str:
    return next(m.role for m in doc.members() if m.fingerprint == device.me)


def _forged_update(doc: Document, text: str) -> Envelope:
    """What a reader's modified client would send: a real update, encrypted and signed by the
    reader's own keys (the engine itself never seals one for a reader)."""
    r = doc.replica
    update = r.crdt.change(lambda e: e.text("body").insert(0, text))
    assert update is not None
    seq = doc.next_seq
    p = Payload(PayloadKind.UPDATE, r.me, seq, payload_deps(PayloadKind.UPDATE,
                                                            r.buffer.delivered, r.me),
                r.crdt.backend_id, pack_updates([update]))
    return Envelope.seal(r.host.key, r.group_id, seq, r.epoch, r.mls.encrypt(p.encode()))


async def test_a_reader_receives_and_its_updates_are_dropped(
        tmp_path: Path, nodes: list[NodeProcess]) -> None:
    async with devices(tmp_path, "a", "b") as (a, b):
        ad = await a.create_document(tickets(nodes), name="notes")
        ad.change(lambda e: e.text("body").insert(0, "from the writer"))
        ticket = ad.invite(role=Role.READER)
        with trio.fail_after(60):
            bd = await b.join(ticket)
        assert _role(bd, bd) == "reader" and _role(ad, bd) == "reader"
        await converged([ad, bd])
        with pytest.raises(NotAllowed, match="reader"):
            bd.change(lambda e: e.text("body").insert(0, "no"))
        with pytest.raises(NotAllowed, match="only an admin can invite"):
            bd.invite()
        with pytest.raises(NotAllowed, match="only an admin can remove"):
            await bd.remove_device(ad.me.hex())
        with pytest.raises(NotAllowed, match="only an admin can change roles"):
            await bd.set_role(bd.me.hex(), "writer")
        ad.change(lambda e: e.text("body").insert(0, "more "))
        await converged([ad, bd])
        assert bd.next_seq == 1  # the reader sealed nothing: no state, no state request

        forged = _forged_update(bd, "FORGED ")
        client = next(iter(ad.clients.values()))
        with pytest.raises(RemoteError) as err:  # a syncnode refuses it...
            await client.store(forged)
        assert err.value.code == ErrorCode.UNAUTHORIZED and "reader" in err.value.detail
        async with ad.replica.apply_lock:  # ...and a member drops one a faulty node passes on
            assert ad.receive([forged]) == 0
        assert ad.inbox.reader_drops == 1
        assert "FORGED" not in ad.value()["body"]
        assert ad.alarms() == []



async def test_set_role_and_leave(tmp_path: Path, nodes: list[NodeProcess]) -> None:
    async with devices(tmp_path, "a", "b", "c") as (a, b, c):
        ad = await a.create_document(tickets(nodes), name="notes")
        with trio.fail_after(60):
            bd = await b.join(ad.invite())
            cd = await c.join(ad.invite())
        docs = [ad, bd, cd]
        assert [_role(ad, d) for d in docs] == ["admin", "writer", "writer"]
        with pytest.raises(NotAllowed, match="last admin"):
            await ad.set_role(ad.me.hex(), Role.WRITER)
        with pytest.raises(NotAllowed, match="last admin"):
            await ad.leave()

        await ad.set_role(cd.me.hex()[:8], "reader")
        await ad.set_role(bd.me.hex()[:8], Role.ADMIN)
        await eventually(lambda: all(_role(d, cd) == "reader" and _role(d, bd) == "admin"
                                     for d in docs), what="the role changes everywhere")
        with pytest.raises(NotAllowed, match="reader"):
            cd.change(lambda e: e.text("body").insert(0, "no"))
        ad.change(lambda e: e.text("body").insert(0, "still syncing "))
        await converged(docs)

        # A reader leaves: an admin removes it by itself; it stopped syncing at once.
        await cd.leave()
        assert cd.status == "left"
        await eventually(lambda: all(d.manifest.device(cd.me) is None for d in (ad, bd)),
                         what="an admin to remove the leaver")
        # An admin leaves while another admin remains.
        await ad.leave()
        await eventually(lambda: bd.manifest.device(ad.me) is None,
                         what="the other admin to remove the leaving admin")
        assert [m.role for m in bd.members()] == ["admin"]
        bd.change(lambda e: e.text("body").insert(0, "alone "))
        await bd.wait_durable()


async def test_keys_rotate_by_themselves(tmp_path: Path, nodes: list[NodeProcess]) -> None:
    config = replace(FAST, rotate_keys_after=0, rotate_keys_after_messages=3)
    async with devices(tmp_path, "a", "b") as (a, b):
        a.config = b.config = config
        ad = await a.create_document(tickets(nodes), name="notes")
        with trio.fail_after(60):
            bd = await b.join(ad.invite())
        start = ad.epoch
        for i in range(4):
            ad.change(lambda e, i=i: e.text("body").insert(0, f"{i} "))
            await ad.wait_durable()
        await eventually(lambda: ad.rotation.rotations >= 1, what="a rotation by itself")
        assert any(ad.values[s].signer == ad.me for s in range(start + 1, ad.epoch + 1))
        await eventually(lambda: bd.epoch >= ad.epoch, what="b to follow the rotation")
        for d in (ad, bd):
            d.change(lambda e, d=d: e.text("body").insert(0, f"after {d.me.hex()[:4]} "))
        value = await converged([ad, bd])
        assert "after" in value["body"]
