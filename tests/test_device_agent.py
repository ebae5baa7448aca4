"""The device agent end to end: real ``syncnode`` processes, devices on real iroh endpoints on
loopback, real MLS, real SQLite on both sides."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from device.agent import Device
from device.document import Alarm, Change, Document
from device.mls import MlsError
from proto.invite import InviteTicket
from proto.messages import ErrorCode
from proto.rpc import RemoteError, SyncnodeClient
from proto.ticket import NodeTicket
from syncnode.procs import NodeProcess
from tests.device_kit import FAST, converged, eventually

MARKER = "PLAINTEXT-MARKER-7f3a"


def tickets(nodes: list[NodeProcess]) -> list[NodeTicket]:
    out = []
    for n in nodes:
        assert n.ticket is not None
        out.append(n.ticket)
    return out


@asynccontextmanager
async def devices(root: Path, *names: str) -> AsyncIterator[list[Device]]:
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(Device.open(root / n, config=FAST))
               for n in names]


async def share(doc: Document, others: list[Device]) -> list[Document]:
    """Invite ``others`` into ``doc`` one by one (invite ticket, mailbox, Paxos, Welcome)."""
    out = [doc]
    for dev in others:
        with trio.fail_after(60):
            out.append(await dev.join(doc.invite()))
    return out


async def test_three_devices_converge_on_every_container_type(
        tmp_path: Path, nodes: list[NodeProcess]) -> None:
    async with devices(tmp_path, "a", "b", "c") as (a, b, c):
        doc = await a.create_document(tickets(nodes), name="notes")
        doc.change(lambda e: e.text("body").insert(0, "shared "))
        docs = await share(doc, [b, c])
        await converged(docs)
        assert [d.epoch for d in docs] == [2, 2, 2]

        # Concurrent edits on all four container types from all three devices.
        for i in range(20):
            for k, d in enumerate(docs):
                d.change(lambda e, i=i, k=k: (
                    e.text("body").insert(0, f"{MARKER}{k}.{i} "),
                    e.map("meta").insert(f"k{k}", i),
                    e.list("log").push(f"{k}:{i}"),
                    e.counter("clicks").increment(1)))
            await trio.sleep(0.005)
        value = await converged(docs)
        assert value["clicks"] == 60
        assert sorted(value["log"]) == sorted(f"{k}:{i}" for k in range(3) for i in range(20))
        assert value["meta"] == {"k0": 19, "k1": 19, "k2": 19}
        assert value["body"].count(MARKER) == 60
        for d in docs:
            with trio.fail_after(30):
                await d.wait_durable()
            assert not d.alarms()
        assert {m.id for m in docs[2].members()} == {a.id, b.id, c.id}
    for n in nodes:
        assert n.terminate() == 0
    # The syncnodes stored every update, and none of them in a readable form.
    for n in nodes:
        raw = b"".join(p.read_bytes() for p in n.data_dir.glob("*.db*"))
        assert b"PLAINTEXT-MARKER" not in raw and b"shared " not in raw
        db = sqlite3.connect(n.data_dir / "syncnode.db")
        assert db.execute("SELECT count(*) FROM envelopes").fetchone()[0] >= 3


async def test_conflicting_commits_one_winner_loser_rebased(
        tmp_path: Path, nodes: list[NodeProcess]) -> None:
    async with devices(tmp_path, "a", "b", "c") as (a, b, c):
        docs = await share(await a.create_document(tickets(nodes)), [b, c])
        for d in docs:
            await d.wait_connected(3)
        start = docs[0].epoch
        slots: dict[str, int] = {}

        async def rotate(d: Document) -> None:
            slots[d.device.id] = await d.rotate_keys()

        with trio.fail_after(60):
            async with trio.open_nursery() as n:
                n.start_soon(rotate, docs[1])
                n.start_soon(rotate, docs[2])
        # Both rotations were decided, in two different slots: one won start+1, the other was
        # re-based onto the winner and decided at start+2.
        assert sorted(slots.values()) == [start + 1, start + 2]
        for d in docs:
            await eventually(lambda d=d: d.epoch == start + 2, what="all at the same epoch")
        assert len({d.manifest.hash() for d in docs}) == 1
        for slot in (start + 1, start + 2):
            assert len({d.decided[slot].value for d in docs}) == 1
        # Same MLS epoch secrets everywhere: no fork.
        assert len({d.mls.export_secret(b"fork-check", b"", 32) for d in docs}) == 1
        docs[1].change(lambda e: e.text("t").insert(0, "after"))
        await converged(docs)
        assert all(not d.alarms() for d in docs)


async def test_removed_device_cannot_decrypt_and_is_refused(
        tmp_path: Path, nodes: list[NodeProcess]) -> None:
    async with devices(tmp_path, "a", "b", "c") as (a, b, c):
        docs = await share(await a.create_document(tickets(nodes)), [b, c])
        da, db_, dc = docs
        events: list[object] = []
        dc.subscribe(events.append)
        with trio.fail_after(60):
            slot = await da.remove_device(c.id)
        await eventually(lambda: dc.status == "removed", what="c learns it was removed")
        assert any(isinstance(e, Alarm) and e.kind == "removed" for e in events)
        assert c.id not in {m.id for m in db_.members()}
        await eventually(lambda: db_.epoch == slot)

        da.change(lambda e: e.map("m").insert("secret", "after removal"))
        await converged([da, db_])
        with pytest.raises(Exception, match="removed"):
            dc.change(lambda e: e.map("m").insert("x", 1))
        assert "m" not in dc.value()
        with trio.fail_after(30):
            await da.wait_durable()

        # c still has its MLS state, but the new epoch's messages are beyond it.
        ticket = tickets(nodes)[0]
        async with SyncnodeClient.connect(a.transport, ticket) as ac:
            await ac.authenticate(a.key)
            page = await ac.backfill(da.group_id, {})
        new = [e for e in page.envelopes if e.epoch >= slot]
        assert new
        for env in new:
            with pytest.raises(MlsError):
                dc.mls.decrypt(env.ciphertext)
        # And the syncnodes refuse c for this group.
        async with SyncnodeClient.connect(c.transport, ticket) as cc:
            await cc.authenticate(c.key)
            with pytest.raises(RemoteError) as err:
                await cc.backfill(da.group_id, {})
            assert err.value.code == ErrorCode.UNAUTHORIZED
            with pytest.raises(RemoteError):
                async with cc.subscribe(da.group_id):
                    pass


async def test_offline_device_catches_up_on_1000_updates_and_3_epochs(
        tmp_path: Path, nodes: list[NodeProcess]) -> None:
    async with devices(tmp_path, "a", "b") as (a, b):
        doc = await a.create_document(tickets(nodes))
        async with Device.open(tmp_path / "c", config=FAST) as c:
            dc = await c.join(doc.invite())
            await converged([doc, dc])
            joined_epoch = dc.epoch
        # c is now offline (process state closed; its store stays on disk).
        db_ = await b.join(doc.invite())
        for i in range(1000):
            writer = doc if i % 2 else db_
            writer.change(lambda e, i=i: (e.list("items").push(i),
                                          e.counter("n").increment(1)))
            writer.flush()  # one update message per edit
            if i in (249, 499, 749):
                with trio.fail_after(60):
                    await writer.rotate_keys()
        assert doc.epoch == joined_epoch + 1 + 3  # b's add plus three rotations
        value = await converged([doc, db_], timeout=60)
        assert value["n"] == 1000
        with trio.fail_after(60):
            await doc.wait_durable()
            await db_.wait_durable()

        async with Device.open(tmp_path / "c", config=FAST) as c:
            dc = c.document(doc.id)
            changes: list[Change] = []
            dc.subscribe(lambda ev: changes.append(ev) if isinstance(ev, Change) else None)
            await converged([doc, db_, dc], timeout=90)
            assert dc.epoch == doc.epoch
            assert sorted(dc.value()["items"]) == list(range(1000))
            assert sum(ch.updates for ch in changes) == 1000  # each update applied once
            assert not dc.alarms()


async def test_one_syncnode_down_throughout(tmp_path: Path, nodes: list[NodeProcess]) -> None:
    nodes[2].kill()
    async with devices(tmp_path, "a", "b") as (a, b):
        doc = await a.create_document(tickets(nodes))
        docs = await share(doc, [b])
        docs[1].change(lambda e: e.text("t").insert(0, "from b "))
        docs[0].change(lambda e: e.counter("c").increment(5))
        value = await converged(docs)
        assert value == {"t": "from b ", "c": 5.0}
        with trio.fail_after(60):
            await docs[1].rotate_keys()
        docs[0].change(lambda e: e.map("m").insert("after", "rotation"))
        await converged(docs)
        for d in docs:
            with trio.fail_after(30):
                await d.wait_durable()  # a quorum of 2 of 3 acknowledged
            assert len(d.sync_status().connected) == 2


def syncdevice(home: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "device", "--home", str(home), *args]


async def test_sigkill_with_outbox_delivers_exactly_once(
        tmp_path: Path, nodes: list[NodeProcess]) -> None:
    home = tmp_path / "cli-device"
    async with devices(tmp_path, "a") as (a,):
        doc = await a.create_document(tickets(nodes))
        changes: list[Change] = []
        doc.subscribe(lambda ev: changes.append(ev) if isinstance(ev, Change) else None)
        with trio.fail_after(90):
            done = await trio.run_process(
                syncdevice(home, "--json", "join", "--init", doc.invite()),
                capture_stdout=True, capture_stderr=True)
        joined = json.loads(done.stdout)
        assert joined["id"] == doc.id

        # Two of three syncnodes frozen: updates reach one, never a quorum.
        for n in nodes[1:]:
            assert n.proc is not None
            n.proc.send_signal(signal.SIGSTOP)
        edits = 5
        for _ in range(edits):
            await trio.run_process(syncdevice(home, "edit", doc.id, "--counter", "c",
                                              "--add", "1", "--wait", "0"),
                                   capture_stderr=True)
        proc = await trio.lowlevel.open_process(syncdevice(home, "watch", doc.id),
                                                stdout=subprocess.DEVNULL,
                                                stderr=subprocess.DEVNULL)
        await trio.sleep(3)  # it reconnects and resends to the reachable syncnode
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        outbox = sqlite3.connect(home / "device.db").execute(
            "SELECT count(*) FROM outbox").fetchone()[0]
        assert outbox == edits  # all sealed, none acknowledged by a quorum

        for n in nodes[1:]:
            assert n.proc is not None
            n.proc.send_signal(signal.SIGCONT)
        with trio.fail_after(90):
            status = await trio.run_process(syncdevice(home, "--json", "status", "--wait", "60"),
                                            capture_stdout=True, check=False)
        assert status.returncode == 0, status.stdout
        assert json.loads(status.stdout)[0]["pending"] == 0
        await eventually(lambda: doc.value().get("c") == edits, 30, "a sees every edit")
        await trio.sleep(1)  # time for any duplicate to show up
        from_cli = [ch for ch in changes if ch.origin == "remote"]
        assert sum(ch.updates for ch in from_cli) == edits  # exactly once
        assert doc.value()["c"] == edits


async def test_cli_round_trip(tmp_path: Path, nodes: list[NodeProcess]) -> None:
    home = tmp_path / "cli"

    async def run(*args: str, check: bool = True) -> Any:
        with trio.fail_after(60):
            done = await trio.run_process(syncdevice(home, "--json", *args), capture_stdout=True,
                                          capture_stderr=True, check=False)
        if check:
            assert done.returncode == 0, done.stderr.decode()
        return done

    me = json.loads((await run("init")).stdout)
    created = json.loads((await run("create", "--name", "notes", *(
        x for t in tickets(nodes) for x in ("--syncnode", str(t))))).stdout)
    assert created["name"] == "notes"
    await run("set", "notes", "meta.title", '"Groceries"')
    await run("edit", "notes", "--text", "body", "--append", "milk")
    await run("edit", "notes", "--counter", "n", "--add", "2")
    shown = json.loads((await run("show", "notes", "--sync", "0")).stdout)
    assert shown == {"meta": {"title": "Groceries"}, "body": "milk", "n": 2.0}
    members = json.loads((await run("members", "notes")).stdout)
    assert [m["fingerprint"] for m in members] == [me["device"]] and members[0]["self"]
    assert json.loads((await run("rotate", "notes")).stdout)["epoch"] == 1
    listed = json.loads((await run("list")).stdout)
    assert [(d["name"], d["epoch"], d["status"]) for d in listed] == [("notes", 1, "active")]
    inv = await run("invite", "notes", "--qr", "--wait", "0")
    ticket = json.loads(inv.stdout)["ticket"]
    assert InviteTicket.parse(ticket.upper()) == InviteTicket.parse(ticket)
    assert "█" in inv.stderr.decode() or "▀" in inv.stderr.decode()  # the QR code
    status = json.loads((await run("status")).stdout)
    assert status[0]["pending"] == 0 and status[0]["connected"] == 3
    # Errors are one clear line and a non-zero exit, not a traceback.
    bad = await run("show", "nope", check=False)
    assert bad.returncode == 1 and b"no document matches 'nope'" in bad.stderr
    assert b"Traceback" not in bad.stderr
    bad = await run("set", "notes", "no-dot", "1", check=False)
    assert bad.returncode == 2 and b"MAP.KEY" in bad.stderr
