"""Device agent on the in-memory network (fast, deterministic timing): equivocation alarms,
restart with a pending proposal, bad input from members and syncnodes."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from device.document import Alarm
from proto.codec import decode_as, encode_struct
from proto.identity import fingerprint
from proto.manifest import next_manifest, sign_value
from proto.paxos.messages import (
    ACCEPTED_CTX,
    AcceptedBody,
    AcceptorSignature,
    Ballot,
    Certificate,
    Decided,
    EquivocationProof,
    value_hash,
)
from tests.device_kit import converged, eventually, memory_cluster, memory_device


async def test_equivocation_is_detected_raised_and_persisted(tmp_path: Path) -> None:
    async with memory_cluster(tmp_path, 3) as (net, _, nodes):
        async with memory_device(net, tmp_path / "a") as a, \
                memory_device(net, tmp_path / "b") as b:
            da = await a.create_document([n.ticket for n in nodes])
            db_ = await b.join(da.invite())
            # b builds a key update in the current epoch but never gets it decided: a's wins.
            prev = db_.manifest
            commit = db_.mls.build_update()
            other = sign_value(b.key, next_manifest(prev, commit), commit).encode()
            slot = await da.rotate_keys()
            await eventually(lambda: db_.epoch == slot)
            alarms: list[Alarm] = []
            db_.subscribe(lambda ev: alarms.append(ev) if isinstance(ev, Alarm) else None)

            # A colluding majority (two of three syncnode keys) certifies a second, otherwise
            # valid value for the same slot: b's key update.
            ballot = Ballot(99, fingerprint(b.key.public))
            body = encode_struct(AcceptedBody(da.group_id, slot, ballot, value_hash(other)))
            cert = Certificate(da.group_id, slot, ballot, value_hash(other), tuple(
                AcceptorSignature(n.key.public, n.key.sign(ACCEPTED_CTX, body))
                for n in nodes[:2]))
            await db_.apply_decided(Decided(other, cert))

            assert [a.kind for a in alarms] == ["equivocation"]
            assert [a.kind for a in db_.alarms()] == ["equivocation"]
            (evidence,) = b.store.one("SELECT evidence FROM alarms WHERE kind='equivocation'")
            proof = decode_as(evidence, EquivocationProof)
            assert {proof.first.value_hash, proof.second.value_hash} == {
                value_hash(other), db_.decided[slot].certificate.value_hash}
            # The device did not switch to the forged branch.
            assert db_.epoch == slot and db_.decided[slot].value != other

            # A decision whose certificate is not a quorum is ignored, not alarmed.
            weak = Certificate(cert.group_id, slot + 1, ballot, cert.value_hash,
                               cert.signatures[:1])
            await db_.apply_decided(Decided(other, weak))
            assert db_.epoch == slot


async def test_restart_keeps_documents_outbox_and_identity(tmp_path: Path) -> None:
    async with memory_cluster(tmp_path, 4) as (net, cluster, nodes):
        async with memory_device(net, tmp_path / "a") as a, \
                memory_device(net, tmp_path / "b") as b:
            da = await a.create_document([n.ticket for n in nodes], name="n")
            db_ = await b.join(da.invite())
            a_id = a.id
            for n in list(nodes):
                await cluster.stop_node(n)  # every syncnode down: offline editing
            da.change(lambda e: e.text("t").insert(0, "offline edit"))
            da.flush()
            assert da.sync_status().outbox == 1
        # Reopen: same identity, same document, the edit still queued.
        restarted = [await cluster.start_node(n.key) for n in nodes]
        async with memory_device(net, tmp_path / "a") as a2, \
                memory_device(net, tmp_path / "b") as b2:
            assert a2.id == a_id
            da2, db2 = a2.document("n"), b2.document(db_.id)
            assert da2.value() == {"t": "offline edit"}
            await converged([da2, db2])
            with trio.fail_after(20):
                await da2.wait_durable()
            assert len(restarted) == 3


async def test_bad_updates_from_a_member_and_bad_envelopes_change_nothing(tmp_path: Path
                                                                          ) -> None:
    from dataclasses import replace

    from proto.payload import PayloadKind, pack_updates

    async with memory_cluster(tmp_path, 5) as (net, cluster, nodes):
        async with memory_device(net, tmp_path / "a") as a, \
                memory_device(net, tmp_path / "b") as b:
            da = await a.create_document([n.ticket for n in nodes])
            db_ = await b.join(da.invite())
            db_.change(lambda e: e.text("t").insert(0, "good"))
            await converged([da, db_])
            alarms: list[Alarm] = []
            da.subscribe(lambda ev: alarms.append(ev) if isinstance(ev, Alarm) else None)
            before = da.crdt.snapshot()

            # A member (b) sends a well-encrypted update whose CRDT bytes are garbage.
            with b.store.transaction():
                db_.outbox.seal(PayloadKind.UPDATE, pack_updates([b"\x00garbage"]))
            await eventually(lambda: any(al.kind == "bad-update" for al in alarms),
                             what="a raises a bad-update alarm")
            assert da.crdt.snapshot() == before
            # ...and b's later, valid updates still apply (the bad one does not block).
            db_.change(lambda e: e.text("t").insert(4, "!"))
            await converged([da, db_])
            assert da.value()["t"] == "good!"

            # Envelopes a syncnode tampered with are refused before decryption.
            async with cluster.clients(b, nodes[:1]) as (c,):
                env = (await c.backfill(da.group_id, {})).envelopes[-1]
            forged = replace(env, seq=env.seq + 100)  # signature no longer matches
            wrong_sender = replace(env, sender=a.fingerprint)
            assert da.receive([forged, wrong_sender]) == 0
            assert da.value()["t"] == "good!"


async def test_members_publish_the_state_periodically_and_once_per_stretch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import replace

    from device.outbox import Outbox
    from proto.envelope import Envelope
    from proto.payload import Payload, PayloadKind
    from tests.device_kit import FAST

    sealed: list[tuple[str, PayloadKind]] = []
    orig = Outbox.seal

    def spy(self: Outbox, kind: PayloadKind, body: bytes) -> tuple[Payload, Envelope]:
        sealed.append((self.host.id, kind))
        return orig(self, kind, body)

    monkeypatch.setattr(Outbox, "seal", spy)
    config = replace(FAST, publish_state_every=10)
    async with memory_cluster(tmp_path, 6) as (net, _, nodes):
        async with memory_device(net, tmp_path / "a", config) as a, \
                memory_device(net, tmp_path / "b", config) as b:
            da = await a.create_document([n.ticket for n in nodes])
            db_ = await b.join(da.invite())
            await converged([da, db_])
            sealed.clear()
            for i in range(25):
                (da if i % 2 else db_).change(lambda e, i=i: e.list("l").push(i))
                (da if i % 2 else db_).flush()
                await converged([da, db_])  # the other member sees each update before the next
            await converged([da, db_])
            states = [who for who, kind in sealed if kind == PayloadKind.STATE]
            # 25 edits, a state every 10 without one: two states in all, not one per member.
            assert len(states) == 2, sealed


async def test_a_lost_push_is_recovered_by_periodic_backfill(tmp_path: Path) -> None:
    from dataclasses import replace

    from proto.envelope import Envelope
    from tests.device_kit import FAST

    async with memory_cluster(tmp_path, 7, nodes=1) as (net, _, nodes):
        async with memory_device(net, tmp_path / "a") as a, \
                memory_device(net, tmp_path / "b", replace(FAST, backfill_interval=0.3)) as b:
            da = await a.create_document([n.ticket for n in nodes])
            db_ = await b.join(da.invite())
            await converged([da, db_])
            dropped: list[int] = []
            real = db_.session._queue_send

            class Lossy:
                async def send(self, item: tuple[object, object]) -> None:
                    if isinstance(item[1], Envelope) and not dropped:
                        dropped.append(item[1].seq)  # this push never reaches b's engine
                        return
                    await real.send(item)  # type: ignore[arg-type]

            db_.session._queue_send = Lossy()  # type: ignore[assignment]
            with trio.fail_after(10):
                await db_.wait_connected(1)  # b's live feed is up: the update comes as a push
            da.change(lambda e: e.map("m").insert("k", "lost push"))
            await eventually(lambda: bool(dropped), what="the push to be dropped")
            await converged([da, db_], timeout=10)
            assert db_.value()["m"] == {"k": "lost push"}
