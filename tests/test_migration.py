"""Live migration between operators, with real ``syncnode run`` processes on loopback.

A document served by syncnodes {A, B, C} moves to {D, E, F}, one replacement at a time, while
two devices keep editing, and a third device that was offline meanwhile follows it through the
removed syncnodes. Then A, B and C are stopped and their data deleted: every
acknowledged edit is on both devices and on each of D, E and F, and a new device joins through
D, E and F alone (issue 16)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import trio

from device.agent import Device
from device.document import Document
from proto.identity import short_id
from proto.ticket import NodeTicket
from syncnode.procs import NodeProcess, start_cluster
from tests.cli_kit import one_line_error, real_syncnodes, sd
from tests.device_kit import FAST, converged, eventually, held


async def edit_until(doc: Document, who: str, stop: trio.Event, made: list[str]) -> None:
    i = 0
    while not stop.is_set():
        key = f"{who}-{i}"
        doc.change(lambda e, key=key: e.map("m").insert(key, 1))
        made.append(key)
        i += 1
        await trio.sleep(0.03)


async def test_document_moves_to_new_operators_while_devices_edit(tmp_path: Path) -> None:
    cluster = start_cluster(tmp_path / "nodes", 6)
    old, new = cluster[:3], cluster[3:]
    try:
        await _migrate(tmp_path, old, new)
    finally:
        for n in cluster:
            n.stop()


async def _migrate(tmp_path: Path, old: list[NodeProcess], new: list[NodeProcess]) -> None:
    old_t = [n.ticket for n in old if n.ticket is not None]
    new_t = [n.ticket for n in new if n.ticket is not None]
    async with Device.open(tmp_path / "a", config=FAST) as a, \
            Device.open(tmp_path / "b", config=FAST) as b:
        doc_a = await a.create_document(old_t)
        with trio.fail_after(60):
            doc_b = await b.join(doc_a.invite())
            async with Device.open(tmp_path / "z", config=FAST) as z:  # offline meanwhile
                await z.join(doc_a.invite())
        made: dict[str, list[str]] = {"a": [], "b": []}
        stop = trio.Event()
        slots = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(edit_until, doc_a, "a", stop, made["a"])
            nursery.start_soon(edit_until, doc_b, "b", stop, made["b"])
            with trio.fail_after(240):
                for before, after in zip(old_t, new_t, strict=True):
                    slots.append(await doc_a.replace_syncnode(before.node_id.hex(), after,
                                                              wait=120))
                    await trio.sleep(0.3)  # edits keep flowing between replacements
            stop.set()
        assert {e.node_id for e in doc_a.manifest.syncnodes} == {t.node_id for t in new_t}
        assert [s for pair in slots for s in pair] == list(range(3, 9))  # 1, 2: the adds
        with trio.fail_after(60):
            await doc_a.wait_durable()
            await doc_b.wait_durable()
            want = {t.node_id for t in new_t}
            await eventually(lambda: {e.node_id for e in doc_b.manifest.syncnodes} == want
                             and want <= set(doc_b.clients), 60,
                             "the other device to follow the document to its new syncnodes")

        # A device that was offline during the whole migration follows the group through
        # the removed syncnodes (they serve the log for removed_group_retention).
        async with Device.open(tmp_path / "z", config=FAST) as z:
            doc_z = z.documents()[0]
            want = {t.node_id for t in new_t}
            await eventually(lambda: {e.node_id for e in doc_z.manifest.syncnodes} == want
                             and want <= set(doc_z.clients), 60,
                             "the offline device to follow the document to its new syncnodes")
            await converged([doc_a, doc_z], timeout=60)

        for n in old:  # the old operators leave for good
            n.stop()
            shutil.rmtree(n.data_dir)

        expected = {k for keys in made.values() for k in keys}
        value = await converged([doc_a, doc_b], timeout=60)
        assert set(value["m"]) == expected, "an acknowledged edit is missing"
        sent = {doc.me: doc.next_seq - 1 for doc in (doc_a, doc_b)}
        for t in new_t:
            # A syncnode added while a device still sent to the old set only may have gaps
            # at first; it fills them from the others (syncnode.reconcile, every 10 s).
            with trio.move_on_after(60):
                while missing := await lacking(doc_a, t, sent):  # noqa: ASYNC110
                    await trio.sleep(1.0)
            assert not missing, (f"{short_id(t.node_id)} lacks updates: "
                                 f"{ {short_id(s): len(m) for s, m in missing.items()} }")

        async with Device.open(tmp_path / "c", config=FAST) as c:
            with trio.fail_after(60):
                doc_c = await c.join(doc_a.invite())
            assert {e.node_id for e in doc_c.manifest.syncnodes} == {t.node_id for t in new_t}
            assert await converged([doc_a, doc_c], timeout=60) == value



async def lacking(doc: Document, ticket: NodeTicket, sent: dict[bytes, int]
                  ) -> dict[bytes, set[int]]:
    """Per sender, the seqs up to ``sent`` the syncnode of ``ticket`` does not hold."""
    stored = await held(doc, ticket)
    out = {sender: set(range(1, top + 1)) - stored.get(sender, set())
           for sender, top in sent.items()}
    return {s: m for s, m in out.items() if m}


def test_cli_replaces_a_syncnode_and_refuses_unsafe_or_wrong_requests(tmp_path: Path) -> None:
    """`syncdevice syncnode list|replace|remove` as a user runs them, with real daemons."""
    cluster = start_cluster(tmp_path / "nodes", 4)
    try:
        home = tmp_path / "a"
        sd(home, "init", check=True)
        sd(home, "create", *real_syncnodes(cluster[:3]), "--name", "notes", check=True)
        sd(home, "set", "notes", "m.x", '"1"', check=True)
        old, new = cluster[0].ticket, cluster[3].ticket
        assert old is not None and new is not None
        one_line_error(sd(home, "syncnode", "replace", "notes", "ffff", str(new)), 1,
                       "no syncnode of this document matches 'ffff'")
        one_line_error(sd(home, "syncnode", "add", "notes", "sn1nonsense"), 1,
                       "bad syncnode ticket")
        done = sd(home, "--json", "syncnode", "replace", "notes", old.node_id.hex()[:8],
                  str(new), check=True)
        assert json.loads(done.stdout)["node_id"] == new.node_id.hex()
        rows = json.loads(sd(home, "--json", "syncnode", "list", "notes", check=True).stdout)
        assert {r["node_id"] for r in rows} == {n.ticket.node_id.hex() for n in cluster[1:]
                                               if n.ticket is not None}
        assert all(r["history"] == "complete" for r in rows)
        cluster[1].stop()  # a remaining syncnode is down: removing another is not safe now
        assert cluster[2].ticket is not None
        done = sd(home, "syncnode", "remove", "notes", cluster[2].ticket.node_id.hex()[:8])
        # the progress lines of the steps, then one error line
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.strip().splitlines()[-1].startswith("Error: not removed"), done.stderr
        assert "not reachable" in done.stderr
        assert json.loads(sd(home, "--json", "show", "notes", check=True).stdout) == \
            {"m": {"x": "1"}}
    finally:
        for n in cluster:
            n.stop()
