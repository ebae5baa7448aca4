"""Joining a document: invite tickets, the Welcome through the decided log, and the initial
state peer to peer (or, failing that, from members through the syncnodes)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio

import device.p2p as p2p
import device.state_fetch
from device.agent import Device, JoinError
from device.p2p import Progress
from device.testdata import editing_trace, replay
from proto.invite import InviteTicket
from proto.transport.memory import MemoryNetwork
from tests.device_kit import converged, eventually, memory_cluster, memory_device
from tests.syncnode_kit import Node


async def test_join_large_history_transfers_about_the_snapshot(tmp_path: Path) -> None:
    patches, final = editing_trace()
    async with memory_cluster(tmp_path, 11) as (net, _, nodes), \
            memory_device(net, tmp_path / "a") as a, memory_device(net, tmp_path / "b") as b:
        doc = await a.create_document([n.ticket for n in nodes])
        replay(doc, patches, "paper", per_change=5000, flush_each=True)
        assert doc.value()["paper"] == final
        with trio.fail_after(60):
            await doc.wait_durable()
        history = sum(len(e.ciphertext)  # type: ignore[attr-defined]
                      for e in await _all_envelopes(net, a, nodes[0], doc.group_id))
        snapshot = len(doc.crdt.snapshot())

        seen: list[Progress] = []
        with trio.fail_after(60):
            joined = await b.join(doc.invite(), on_progress=seen.append)
        assert joined.value()["paper"] == final  # usable at once, before any backfill
        assert seen and seen[-1].done == seen[-1].total
        transferred = seen[-1].total
        assert transferred <= snapshot * 1.2
        await converged([doc, joined])
        # Nothing from before the join was fetched or asked for: the snapshot covered it.
        await trio.sleep(0.5)
        assert joined.next_seq == 1 and not joined.alarms()
        print(f"history {history} B, snapshot {snapshot} B, transferred {transferred} B")


async def _all_envelopes(net: MemoryNetwork, device: Device, node: Node, group_id: bytes
                         ) -> list[object]:
    from proto.rpc import SyncnodeClient

    async with SyncnodeClient.connect(device.transport, node.ticket) as c:
        await c.authenticate(device.key)
        out, marks = [], {}
        while True:
            page = await c.backfill(group_id, marks)
            out += page.envelopes
            for e in page.envelopes:
                marks[e.sender] = max(marks.get(e.sender, 0), e.seq)
            if not page.more:
                return out


async def test_inviter_offline_at_first_join_completes_later(tmp_path: Path) -> None:
    async with memory_cluster(tmp_path, 12) as (net, _, nodes):
        async with memory_device(net, tmp_path / "a") as a:
            doc = await a.create_document([n.ticket for n in nodes], name="n")
            doc.change(lambda e: e.map("m").insert("k", "v"))
            with trio.fail_after(20):
                await doc.wait_durable()
            ticket = doc.invite()
        # a is offline now. b starts joining and waits.
        steps: list[str] = []
        async with memory_device(net, tmp_path / "b") as b:
            result: list[object] = []

            async def join() -> None:
                result.append(await b.join(ticket, progress=steps.append))

            async with trio.open_nursery() as n:
                n.start_soon(join)
                await eventually(lambda: any("waiting for the inviter" in s for s in steps))
                await trio.sleep(1.0)
                assert not result  # still waiting: nobody can add it
                async with memory_device(net, tmp_path / "a") as a2:
                    await eventually(lambda: bool(result), what="join completes")
                    joined = result[0]
                    await converged([a2.document("n"), joined])  # type: ignore[list-item]


async def test_interrupted_transfer_resumes_or_falls_back_to_members(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(p2p, "CHUNK", 4096)  # many chunks for a modest document
    patches, _ = editing_trace()
    async with memory_cluster(tmp_path, 13) as (net, _, nodes), \
            memory_device(net, tmp_path / "a") as a, memory_device(net, tmp_path / "c") as c, \
            memory_device(net, tmp_path / "b") as b, memory_device(net, tmp_path / "d") as d, \
            memory_device(net, tmp_path / "f") as f:
        doc = await a.create_document([n.ticket for n in nodes])
        replay(doc, patches[:20000], "paper", per_change=20000)
        await c.join(doc.invite())
        streams: list[int] = []
        orig = p2p.PeerServer._serve

        async def cut_after_3_chunks(self: p2p.PeerServer, peer: bytes, stream: object,
                                     req: object) -> None:
            real_send = stream.send  # type: ignore[attr-defined]
            streams.append(0)
            first = len(streams) == 1

            async def send(frame: bytes) -> None:
                streams[-1] += 1
                if first and streams[-1] == 5:  # offer + 3 chunks went out, then the cut
                    raise p2p.TransportError("cut")
                await real_send(frame)

            stream.send = send  # type: ignore[attr-defined]
            await orig(self, peer, stream, req)  # type: ignore[arg-type]

        monkeypatch.setattr(p2p.PeerServer, "_serve", cut_after_3_chunks)
        progress: list[Progress] = []
        with trio.fail_after(60):
            joined_b = await b.join(doc.invite(), on_progress=progress.append)
        # Resumed: the second request started where the first stopped, not at 0.
        assert progress[-1].done == progress[-1].total
        assert sum(1 for p in progress if p.done <= 3 * 4096) == 3  # chunks 1-3 received once
        await converged([doc, joined_b])

        # Now the inviter (a) cannot serve at all, and its staged copy is not found (the
        # joiner prefers it to another member, which may be behind the inviter): d gets the
        # state from c, peer to peer.
        async def nothing_staged(*args: object) -> None:
            return None

        monkeypatch.setattr(device.state_fetch, "_staged_from", nothing_staged)

        async def inviter_broken(self: p2p.PeerServer, peer: bytes, stream: object,
                                 req: object) -> None:
            if self.device is a:
                raise p2p.TransportError("inviter broke")
            await orig(self, peer, stream, req)  # type: ignore[arg-type]

        monkeypatch.setattr(p2p.PeerServer, "_serve", inviter_broken)
        steps: list[str] = []
        with trio.fail_after(60):
            joined_d = await d.join(doc.invite(), progress=steps.append)
        assert any(f"peer to peer from {c.id}" in s for s in steps), steps
        await converged([doc, joined_b, joined_d], timeout=60)
        monkeypatch.undo()  # the staged copy is found again
        monkeypatch.setattr(p2p, "CHUNK", 4096)

        # No member can serve directly: the copy the inviter stored on the syncnodes before
        # the add is used.
        async def all_broken(self: p2p.PeerServer, peer: bytes, stream: object,
                             req: object) -> None:
            raise p2p.TransportError("broken")

        monkeypatch.setattr(p2p.PeerServer, "_serve", all_broken)
        steps = []
        with trio.fail_after(60):
            joined_f = await f.join(doc.invite(), progress=steps.append)
        assert any("from the copy stored on the syncnodes" in s for s in steps), steps
        value = await converged([doc, joined_b, joined_d, joined_f], timeout=60)
        assert value["paper"] == doc.value()["paper"]


async def test_bad_tickets_and_bad_peers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with memory_cluster(tmp_path, 14) as (net, _, nodes), \
            memory_device(net, tmp_path / "a") as a, memory_device(net, tmp_path / "b") as b, \
            memory_device(net, tmp_path / "e") as e:
        doc = await a.create_document([n.ticket for n in nodes])
        doc.change(lambda ed: ed.map("m").insert("k", 1))
        # Malformed and expired tickets are refused at once.
        with pytest.raises(JoinError, match="bad invite ticket"):
            await b.join("sninv1notbase32!!")
        expired = InviteTicket.parse(doc.invite())
        expired = InviteTicket(*[getattr(expired, f) for f in (
            "group_id", "genesis", "inviter", "inviter_endpoint", "inviter_addrs", "syncnodes",
            "secret")],
            expires_at=int(time.time()) - 1)
        with pytest.raises(JoinError, match="expired"):
            await b.join(str(expired))
        # No syncnode of the ticket reachable: a clear error.
        from proto.manifest import SyncnodeEntry

        t0 = InviteTicket.parse(doc.invite())
        nowhere = InviteTicket(t0.group_id, t0.genesis, t0.inviter, t0.inviter_endpoint,
                               t0.inviter_addrs, (SyncnodeEntry(b"\x01" * 32, ()),), t0.secret,
                               t0.expires_at)
        with pytest.raises(JoinError, match="none of the document's syncnodes"):
            await b.join(str(nowhere), timeout=20)
        # A forged secret (like a revoked invite's, or another device's): its box is one the
        # inviter never reads; the joiner waits, then times out.
        ticket = InviteTicket.parse(doc.invite())
        forged = InviteTicket(ticket.group_id, ticket.genesis, ticket.inviter,
                              ticket.inviter_endpoint,
                              ticket.inviter_addrs, ticket.syncnodes, b"\x00" * 16,
                              ticket.expires_at)
        with pytest.raises(JoinError, match="waiting for the inviter to add this device"):
            await b.join(str(forged), timeout=5)
        assert len(doc.members()) == 1
        # A good ticket works once; reusing it adds nobody else, and the second device is told
        # so by the inviter at once (not at its timeout).
        good = doc.invite()
        joined = await b.join(good)
        started = trio.current_time()
        with pytest.raises(JoinError, match="already used by another device"):
            await e.join(good, timeout=60)
        assert trio.current_time() - started < 10
        assert {m.id for m in doc.members()} == {a.id, b.id}

        # A peer whose snapshot does not match its signed hash is rejected, nothing loaded.
        from proto.p2p import SnapshotChunk

        orig = p2p.PeerServer._serve

        async def corrupt(self: p2p.PeerServer, peer: bytes, stream: object, req: object
                          ) -> None:
            real_send = stream.send  # type: ignore[attr-defined]

            async def send(frame: bytes) -> None:
                from proto.codec import decode, encode

                msg = decode(frame)
                if isinstance(msg, SnapshotChunk):
                    frame = encode(SnapshotChunk(msg.offset, bytes(len(msg.data))))
                await real_send(frame)

            stream.send = send  # type: ignore[attr-defined]
            await orig(self, peer, stream, req)  # type: ignore[arg-type]

        monkeypatch.setattr(p2p.PeerServer, "_serve", corrupt)
        with pytest.raises(p2p.TransferError, match="signed hash"):
            await p2p.fetch_snapshot(b.transport, a.endpoint_id, (), joined.manifest)
        # A peer that stalls is given up on.

        async def stall(self: p2p.PeerServer, peer: bytes, stream: object, req: object) -> None:
            await trio.sleep_forever()

        monkeypatch.setattr(p2p.PeerServer, "_serve", stall)
        with pytest.raises(p2p.TransferError, match="stalled"):
            await p2p.fetch_snapshot(b.transport, a.endpoint_id, (), joined.manifest, timeout=1)
        monkeypatch.setattr(p2p.PeerServer, "_serve", orig)
        # Someone who is not in the manifest gets nothing; a non-member endpoint is refused.
        with pytest.raises(p2p.TransferError, match="UNAUTHORIZED"):
            await p2p.fetch_snapshot(e.transport, a.endpoint_id, (), joined.manifest)
        with pytest.raises(p2p.TransferError, match="not a member"):
            await p2p.fetch_snapshot(b.transport, e.endpoint_id, (), joined.manifest)
        data, body = await p2p.fetch_snapshot(b.transport, a.endpoint_id, (), joined.manifest)
        assert body.size == len(data) > 0

        # A join request naming another group, with this document's valid secret, in the
        # invite's box: dropped, and the invite stays usable. Nothing goes to the inviter's own
        # key any more.
        import secrets as pysecrets

        from proto.handoff import invite_box
        from proto.invite import JoinRequest
        from proto.rpc import RemoteError, SyncnodeClient
        from proto.service import MailboxKind, put_proof

        open_invite = InviteTicket.parse(doc.invite())
        kp = e.mls.key_package()
        req = JoinRequest(pysecrets.token_bytes(32), open_invite.secret, kp, e.key.public,
                          e.endpoint_id, e.addresses()).seal(a.key.public)
        box, kind = invite_box(open_invite.secret), MailboxKind.KEY_PACKAGE
        async with SyncnodeClient.connect(e.transport, nodes[0].ticket) as c:
            with pytest.raises(RemoteError, match="UNAUTHORIZED"):
                await c.mailbox_put(a.key.public, kind, req, 600)
            await c.mailbox_put(box.public, kind, req, 600,
                                proof=put_proof(box, c.node_id, kind, req, 600))
            await c.authenticate(box)
            for _ in range(50):
                if not (await c.mailbox_fetch(box.public)).items:
                    break
                await trio.sleep(0.1)
            assert not (await c.mailbox_fetch(box.public)).items  # read and dropped
        assert {m.id for m in doc.members()} == {a.id, b.id}
        joined_e = await e.join(str(open_invite))
        assert {m.id for m in joined_e.members()} == {a.id, b.id, e.id}


async def test_no_member_online_joiner_uses_the_state_stored_on_syncnodes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import replace

    from device.inbox import Inbox
    from tests.device_kit import FAST

    # Members never answer state requests here: only what is stored on the syncnodes counts.
    monkeypatch.setattr(Inbox, "_answer_later", lambda self, request: None)

    patches, _ = editing_trace()
    async with memory_cluster(tmp_path, 15) as (net, _, nodes):
        async with memory_device(net, tmp_path / "b", replace(FAST, p2p_state_transfer=False)
                                 ) as b:
            async with memory_device(net, tmp_path / "a") as a:
                doc = await a.create_document([n.ticket for n in nodes])
                replay(doc, patches[:30000], "paper", per_change=30000)
                expected = doc.value()
                joined = await b.join(doc.invite())
                with trio.fail_after(20):
                    await doc.wait_durable()  # the state message is on the syncnodes
            # The only other member is gone; b still gets the document.
            await eventually(lambda: joined.value() == expected, 30, "b loads the stored state")
            assert not joined.alarms()


@pytest.mark.parametrize("staged", [True, False])
async def test_inviter_gone_as_the_add_is_decided_joiner_still_gets_every_durable_edit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, staged: bool) -> None:
    """The inviter goes offline the instant its add of the new device is decided, and no other
    member is online: the document was stored for the joiner on a quorum before the add was
    proposed, so the join completes with every durable edit. Negative control (staged=False,
    staging disabled): the join cannot get the document and fails at its timeout, saying so,
    instead of reporting success with an empty document."""
    import device.invites as invites

    if not staged:
        monkeypatch.setattr(invites, "MAX_HANDOFF", 0)
    async with memory_cluster(tmp_path, 16) as (net, _, nodes):
        async with memory_device(net, tmp_path / "b") as b, trio.open_nursery() as nursery:
            a_scope = trio.CancelScope()
            got: list[str] = []

            async def inviter() -> None:
                with a_scope:
                    async with memory_device(net, tmp_path / "a") as a:
                        doc = await a.create_document([n.ticket for n in nodes], name="n")
                        for i in range(17):
                            doc.change(lambda e, i=i: e.list("items").push(i))
                            doc.flush()
                        with trio.fail_after(20):
                            await doc.wait_durable()
                        got.append(doc.invite())
                        await doc.wait_epoch(1)  # the add is decided: vanish at once
                        a_scope.cancel()

            nursery.start_soon(inviter)
            await eventually(lambda: bool(got), what="the invite")
            if staged:
                with trio.fail_after(30):
                    joined = await b.join(got[0], timeout=25)
                assert joined.value() == {"items": list(range(17))}
                assert joined.name == "n"  # the ticket carries the document's name
            else:
                with pytest.raises(JoinError, match="waiting for a member to send"):
                    await b.join(got[0], timeout=8)
                assert a_scope.cancelled_caught


async def test_join_requests_reach_an_online_inviter_by_push(tmp_path: Path) -> None:
    """The inviter's safety-net poll is set to 1000 s: the join completes only because the
    syncnodes push a notice when the request lands in the inviter's mailbox."""
    from dataclasses import replace

    from tests.device_kit import FAST

    slow_poll = replace(FAST, mailbox_interval=1000.0)
    async with memory_cluster(tmp_path, 17) as (net, _, nodes), \
            memory_device(net, tmp_path / "a", slow_poll) as a, \
            memory_device(net, tmp_path / "b") as b:
        doc = await a.create_document([n.ticket for n in nodes])
        doc.change(lambda e: e.map("m").insert("k", "v"))
        with trio.fail_after(20):
            await doc.wait_connected(3)
        ticket = doc.invite()
        await trio.sleep(0.5)  # the read that invite() triggers is over: only a push helps
        with trio.fail_after(30):
            joined = await b.join(ticket)
        assert joined.value() == {"m": {"k": "v"}}


async def test_the_add_is_balloted_while_the_copy_is_staged_and_announced_after_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The inviter stores the joiner's copy of the document alongside the add's ballot (not
    before it), and announces the decided add, which lets the joiner learn it, only once that
    copy is stored."""
    import device.invites as invites
    import device.paxos_driver as driver

    gate, balloted, events = trio.Event(), trio.Event(), []
    stage, ballot, announce = invites.Invites._stage, driver._ballot, driver.announce_decision

    async def held_stage(self: invites.Invites, req: object) -> int:
        await gate.wait()
        n = await stage(self, req)  # type: ignore[arg-type]
        events.append("staged")
        return n

    async def spy_ballot(*args: object, **kw: object) -> object:
        out = await ballot(*args, **kw)  # type: ignore[arg-type]
        events.append("ballot")
        balloted.set()
        return out

    async def spy_announce(*args: object, **kw: object) -> object:
        events.append("announce")
        return await announce(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(invites.Invites, "_stage", held_stage)
    monkeypatch.setattr(driver, "_ballot", spy_ballot)
    monkeypatch.setattr(driver, "announce_decision", spy_announce)
    async with memory_cluster(tmp_path, 5) as (net, _, nodes), \
            memory_device(net, tmp_path / "a") as a, memory_device(net, tmp_path / "b") as b:
        doc = await a.create_document([n.ticket for n in nodes])
        doc.change(lambda e: e.map("m").insert("k", "v"))
        joined: list[object] = []

        async def join() -> None:
            joined.append(await b.join(doc.invite()))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(join)
            with trio.fail_after(20):  # the ballot ends while the copy is held back
                await balloted.wait()
            await trio.sleep(0.3)
            assert "announce" not in events and not joined and doc.epoch == 0
            gate.set()
        assert events == ["ballot", "staged", "announce"]
        assert joined and joined[0].value() == doc.value()  # type: ignore[attr-defined]


async def test_the_joiner_deletes_the_staged_copy_after_joining(tmp_path: Path) -> None:
    """The copy the inviter stored for the joiner is deleted by the joiner once it joined
    (in the background, over the document's own links), from every syncnode."""
    from proto.rpc import SyncnodeClient

    async with memory_cluster(tmp_path, 7) as (net, _, nodes), \
            memory_device(net, tmp_path / "a") as a, memory_device(net, tmp_path / "b") as b:
        doc = await a.create_document([n.ticket for n in nodes])
        doc.change(lambda e: e.text("t").insert(0, "hello"))
        with trio.fail_after(30):
            joined = await b.join(doc.invite())
        assert joined.value() == doc.value()
        for node in nodes:
            async with SyncnodeClient.connect(b.transport, node.ticket) as c:
                await c.authenticate(b.key)
                with trio.fail_after(10):
                    while (await c.mailbox_fetch(b.key.public)).items:  # noqa: ASYNC110
                        await trio.sleep(0.05)


async def test_a_waiting_joiner_reads_the_staged_copy_once_per_syncnode(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While the joiner polls for its add, the copy staged for it sits in its mailbox: each
    poll reads only what is new there, not the whole copy again from every syncnode."""
    from collections import Counter

    import device.paxos_driver as driver
    from proto.rpc import SyncnodeClient
    from proto.service import MailboxKind

    announce, fetch = driver.announce_decision, SyncnodeClient.mailbox_fetch
    reads: Counter[tuple[bytes, int]] = Counter()

    async def late_announce(*args: object, **kw: object) -> object:
        await trio.sleep(0.5)  # the joiner polls (every 20 ms) with the copy staged
        return await announce(*args, **kw)  # type: ignore[arg-type]

    async def counted_fetch(self: SyncnodeClient, *args: object, **kw: object) -> object:
        page = await fetch(self, *args, **kw)  # type: ignore[arg-type]
        for item in page.items:
            if item.kind == MailboxKind.STATE_HANDOFF:
                reads[(self.node_id, item.item_id)] += 1
        return page

    monkeypatch.setattr(driver, "announce_decision", late_announce)
    monkeypatch.setattr(SyncnodeClient, "mailbox_fetch", counted_fetch)
    async with memory_cluster(tmp_path, 9) as (net, _, nodes), \
            memory_device(net, tmp_path / "a") as a, memory_device(net, tmp_path / "b") as b:
        doc = await a.create_document([n.ticket for n in nodes])
        doc.change(lambda e: e.text("t").insert(0, "x" * 5000))
        with trio.fail_after(30):
            joined = await b.join(doc.invite())
        assert joined.value() == doc.value()
        # Read while waiting (once), maybe by the staged fetch, and by the clean-up.
        assert reads and max(reads.values()) <= 3, reads


async def test_a_one_shot_edit_is_sealed_in_the_epoch_the_group_is_in(tmp_path: Path) -> None:
    """A device that was not running while a member was added makes a one-shot edit (what
    `syncdevice edit` does: change, then settle): it is sealed in the group's current epoch,
    not the one the device last saw, so the member added meanwhile reads it with nobody else
    online. Sealed at once (flush before the first learn), the new member could not decrypt
    it and would wait for a member to send the state."""
    from device.cli_support import settle

    async with memory_cluster(tmp_path, 23) as (net, _, nodes):
        async with memory_device(net, tmp_path / "a") as a:
            doc = await a.create_document([n.ticket for n in nodes])
            async with memory_device(net, tmp_path / "b") as b:
                with trio.fail_after(30):
                    await b.join(doc.invite())
            async with memory_device(net, tmp_path / "c") as c:  # added while b is off
                with trio.fail_after(30):
                    await c.join(doc.invite())
            assert doc.epoch == 2
        async with memory_device(net, tmp_path / "b") as b:
            doc_b = b.document_for(doc.group_id)
            assert doc_b is not None and doc_b.epoch == 1
            doc_b.change(lambda e: e.map("m").insert("k", "from b"))
            await settle(doc_b, 20)
            assert doc_b.sync_status().outbox == 0
        async with memory_device(net, tmp_path / "c") as c:  # alone: only the syncnodes
            doc_c = c.document_for(doc.group_id)
            assert doc_c is not None
            await eventually(lambda: doc_c.value().get("m", {}).get("k") == "from b",
                             timeout=15, what="c to read b's edit")


async def test_the_inviter_answers_the_joiners_early_request_once_it_added_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The joiner asks the inviter for the document as soon as its join request is posted
    (:mod:`device.inviter_fetch`). The joiner's poll of the syncnodes is set to 1000 s, so the
    join completes only because that early request's answer wakes the wait for the Welcome;
    and the document it brought is the one loaded: the inviter served one transfer."""
    from dataclasses import replace

    from tests.device_kit import FAST

    slow_poll = replace(FAST, fast_poll_interval=1000.0, join_poll_interval=1000.0)
    served: list[bytes] = []
    orig = p2p.PeerServer._serve

    async def counted(self: p2p.PeerServer, peer: bytes, stream: object, req: object) -> None:
        served.append(peer)
        await orig(self, peer, stream, req)  # type: ignore[arg-type]

    monkeypatch.setattr(p2p.PeerServer, "_serve", counted)
    async with memory_cluster(tmp_path, 23) as (net, _, nodes), \
            memory_device(net, tmp_path / "a") as a, \
            memory_device(net, tmp_path / "b", slow_poll) as b:
        doc = await a.create_document([n.ticket for n in nodes])
        doc.change(lambda e: e.text("t").insert(0, "early"))
        with trio.fail_after(30):
            joined = await b.join(doc.invite())
        assert joined.value() == doc.value()
        assert served == [b.endpoint_id]
