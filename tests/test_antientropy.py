"""Anti-entropy with real ``syncnode run`` processes on loopback (issue 17): a syncnode whose
data directory is wiped (same key, or a new key that the admin puts in its place) or that is
frozen for a while holds every acknowledged update again after reconciliation, and a device
that misses an update no syncnode holds any more gets it from a member.

The syncnodes reconcile every 0.5 s here (``reconcile_interval``), so each wait below is a few
rounds; every wait is bounded and fails with what is missing."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
from contextlib import closing
from pathlib import Path

import trio

from device.agent import Device
from device.document import Document
from syncnode.procs import NodeProcess, start_cluster
from tests.device_kit import FAST, converged, eventually
from tests.test_migration import edit_until

FAST_TOML = {"reconcile_interval = 10.0": "reconcile_interval = 0.5",
             "catchup_interval = 30.0": "catchup_interval = 1.0"}
WAIT = 30.0


def fast_cluster(root: Path, n: int) -> list[NodeProcess]:
    """``n`` syncnodes that reconcile and catch up often (their syncnode.toml says so)."""
    for i in range(n):
        node = NodeProcess(root / f"node{i}")
        node.init()
        toml = node.data_dir / "syncnode.toml"
        text = toml.read_text()
        for old, new in FAST_TOML.items():
            assert old in text
            text = text.replace(old, new)
        toml.write_text(text)
    return start_cluster(root, n)


def held(node: NodeProcess, group_id: bytes) -> dict[bytes, set[int]]:
    """(sender -> seqs) of the group's envelopes in the node's database (read-only: works
    while it runs, and with no member device around)."""
    out: dict[bytes, set[int]] = {}
    path = node.data_dir / "syncnode.db"
    if not path.exists():
        return out
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        for sender, seq in db.execute("SELECT sender, seq FROM envelopes WHERE group_id=?",
                                      (group_id,)):
            out.setdefault(sender, set()).add(seq)
    return out


def acked(docs: list[Document]) -> dict[bytes, int]:
    """Per device, the highest seq up to which every update of it is acknowledged by a
    quorum (those still waiting for acks are the newest, and not counted)."""
    out = {}
    for d in docs:
        waiting = d.outbox.pending.waiting
        out[d.me] = min(waiting) - 1 if waiting else d.next_seq - 1
    return out


async def everywhere(nodes: list[NodeProcess], group_id: bytes, sent: dict[bytes, int],
                     what: str) -> None:
    """Wait until every node holds seqs 1..sent[s] of every sender ``s``."""
    def lacking() -> dict[str, int]:
        out = {}
        for node in nodes:
            got = held(node, group_id)
            n = sum(len(set(range(1, top + 1)) - got.get(s, set())) for s, top in sent.items())
            if n:
                out[node.data_dir.name] = n
        return out

    with trio.move_on_after(WAIT):
        while lacking():  # noqa: ASYNC110 - the condition is other processes' progress
            await trio.sleep(0.2)
    missing = lacking()
    assert not missing, f"{what}: acknowledged updates missing (node: count): {missing}"


def wipe(node: NodeProcess) -> None:
    """Kill the node and delete its database, keeping its key and its UDP port (an operator
    who lost the disk and restores only the configuration); then start it again."""
    assert node.ticket is not None
    node.listen = node.ticket.addrs[0]
    node.kill()
    for p in node.data_dir.glob("syncnode.db*"):
        p.unlink()
    node.start()


async def test_wiped_and_frozen_syncnodes_get_every_acknowledged_update_back(tmp_path: Path
                                                                              ) -> None:
    cluster = fast_cluster(tmp_path / "nodes", 3)
    try:
        tickets = [n.ticket for n in cluster if n.ticket is not None]
        async with Device.open(tmp_path / "a", config=FAST) as a, \
                Device.open(tmp_path / "b", config=FAST) as b:
            doc_a = await a.create_document(tickets)
            with trio.fail_after(60):
                doc_b = await b.join(doc_a.invite())
            gid = doc_a.group_id
            made: dict[str, list[str]] = {"a": [], "b": []}
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(edit_until, doc_a, "a", stop, made["a"])
                nursery.start_soon(edit_until, doc_b, "b", stop, made["b"])
                await trio.sleep(1.0)
                # Wiped while the devices edit: it comes back with the same key and no data.
                # Both hold node2's signed ack before: what it signs after is compared to it.
                assert cluster[2].ticket is not None
                node2 = cluster[2].ticket.node_id
                await eventually(lambda: all(node2 in d.witness.acks for d in (doc_a, doc_b)),
                                 WAIT, "both devices to hold an ack of node2")
                before = acked([doc_a, doc_b])
                wipe(cluster[2])
                await everywhere(cluster, gid, before, "after the wipe of node2")
                # Its statements name a new incarnation: told as a reset, not as withholding.
                for doc in (doc_a, doc_b):
                    await eventually(lambda doc=doc: any(
                        a.kind == "syncnode-reset" and node2.hex() in a.detail
                        for a in doc.alarms()), WAIT, "a syncnode-reset alarm naming node2")
                # Frozen while the devices edit: the other two are a quorum meanwhile.
                assert cluster[1].proc is not None
                os.kill(cluster[1].proc.pid, signal.SIGSTOP)
                try:
                    await trio.sleep(3.0)
                finally:
                    os.kill(cluster[1].proc.pid, signal.SIGCONT)
                await trio.sleep(1.0)
                stop.set()
            with trio.fail_after(60):
                await doc_a.wait_durable()
                await doc_b.wait_durable()
            sent = acked([doc_a, doc_b])
            assert min(sent.values()) > min(before.values())
            await everywhere(cluster, gid, sent, "after node1 was frozen")
            value = await converged([doc_a, doc_b], timeout=30)
            assert set(value["m"]) == set(made["a"]) | set(made["b"])
            accused = [a for d in (doc_a, doc_b) for a in d.alarms()
                       if a.kind.startswith("withholding")]
            assert not accused, accused  # the wiped node lacked what it acked: no accusation

        # No device online at all: a wiped syncnode is handed the group by its peers and
        # pulls its log and every envelope from them.
        wipe(cluster[0])
        await everywhere(cluster, gid, sent, "node0 wiped with no device online")
    finally:
        for n in cluster:
            n.stop()


async def test_a_syncnode_wiped_with_a_new_key_is_replaced(tmp_path: Path) -> None:
    """A syncnode whose data dir (key included) is gone is a new node: the admin replaces
    the old one by it, and then every acknowledged update is on every syncnode of the new
    set."""
    cluster = fast_cluster(tmp_path / "nodes", 4)
    old, spare = cluster[2], cluster[3]
    try:
        tickets = [n.ticket for n in cluster[:3] if n.ticket is not None]
        async with Device.open(tmp_path / "a", config=FAST) as a, \
                Device.open(tmp_path / "b", config=FAST) as b:
            doc_a = await a.create_document(tickets)
            with trio.fail_after(60):
                doc_b = await b.join(doc_a.invite())
            made: dict[str, list[str]] = {"a": [], "b": []}
            stop = trio.Event()
            assert old.ticket is not None and spare.ticket is not None
            async with trio.open_nursery() as nursery:
                nursery.start_soon(edit_until, doc_a, "a", stop, made["a"])
                nursery.start_soon(edit_until, doc_b, "b", stop, made["b"])
                await trio.sleep(1.0)
                old.stop()
                shutil.rmtree(old.data_dir)  # its key too
                with trio.fail_after(120):
                    await doc_a.replace_syncnode(old.ticket.node_id.hex(), spare.ticket,
                                                 wait=60)
                await trio.sleep(1.0)
                stop.set()
            with trio.fail_after(60):
                await doc_a.wait_durable()
                await doc_b.wait_durable()
            sent = acked([doc_a, doc_b])
            now = [cluster[0], cluster[1], spare]
            assert {e.node_id for e in doc_a.manifest.syncnodes} == \
                {n.ticket.node_id for n in now if n.ticket is not None}
            await everywhere(now, doc_a.group_id, sent, "after the replacement")
            value = await converged([doc_a, doc_b], timeout=30)
            assert set(value["m"]) == set(made["a"]) | set(made["b"])
    finally:
        for n in cluster:
            n.stop()


async def edits(doc: Document, numbers: range) -> None:
    """One update per edit: each is acknowledged before the next is made."""
    for i in numbers:
        doc.change(lambda e, i=i: e.map("m").insert(f"a-{i}", i))
        await doc.wait_durable()


def lose(node: NodeProcess, group_id: bytes, sender: bytes, seq: int) -> None:
    """Delete one envelope from a stopped node's database (its per-sender summary is rebuilt
    at the next start: the database is marked schema 1)."""
    with closing(sqlite3.connect(node.data_dir / "syncnode.db")) as db:
        assert db.execute("DELETE FROM envelopes WHERE group_id=? AND sender=? AND seq=?",
                          (group_id, sender, seq)).rowcount == 1
        db.execute("UPDATE meta SET value='1' WHERE key='schema'")
        db.commit()


async def test_a_device_asks_the_members_for_updates_no_syncnode_holds(tmp_path: Path
                                                                        ) -> None:
    """One of alice's updates is lost on every syncnode and alice is offline. Carol, who was
    offline too, backfills the ones before and after it: her causal buffer waits for it, and
    no syncnode serves it. She says so (``gap``) and asks the members; once bob, who holds it, is
    online, his state fills the gap."""
    cluster = fast_cluster(tmp_path / "nodes", 3)
    try:
        tickets = [n.ticket for n in cluster if n.ticket is not None]
        async with Device.open(tmp_path / "a", config=FAST) as a:
            doc_a = await a.create_document(tickets)
            with trio.fail_after(60):
                async with Device.open(tmp_path / "c", config=FAST) as c:
                    await c.join(doc_a.invite())
                async with Device.open(tmp_path / "b", config=FAST) as b:
                    doc_b = await b.join(doc_a.invite())
                    await edits(doc_a, range(3))
                    await converged([doc_a, doc_b], timeout=30)
                    # The joins' state requests are answered by now: no whole-document state
                    # of alice's comes after the edits below to cover the lost one.
                    await trio.sleep(2.0)
                    await edits(doc_a, range(3, 6))
                    await converged([doc_a, doc_b], timeout=30)
                    lost = doc_a.me, doc_a.next_seq - 2  # "a-4"
                    value = doc_b.value()
        for node in cluster:  # all stopped first: a running one would fetch it back
            assert node.interrupt() == 0
        for node in cluster:
            lose(node, doc_a.group_id, *lost)
            node.listen = node.ticket.addrs[0] if node.ticket else node.listen
            node.start()

        async with Device.open(tmp_path / "c", config=FAST) as c:
            doc_c = c.documents()[0]
            await eventually(lambda: doc_c.sync_status().gap, 30,
                             "carol to notice the gap no syncnode fills")
            assert doc_c.sync_status().waiting_for == 1
            assert "a-4" not in doc_c.value().get("m", {})
            async with Device.open(tmp_path / "b", config=FAST) as b:
                assert await converged([doc_c, b.documents()[0]], timeout=30) == value
                await eventually(lambda: doc_c.sync_status().waiting_for == 0, 10,
                                 "the gap to close")
                assert not doc_c.sync_status().gap
    finally:
        for n in cluster:
            n.stop()
