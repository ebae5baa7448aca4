"""The README's main job: 3 local syncnodes and 2 devices editing one document concurrently.

Starts three real ``syncnode`` daemons (subprocesses, loopback, temporary data dirs), opens two
devices on real iroh endpoints, creates a document on device A, invites device B, lets both edit
the same text, list, map and counter at the same time, shows that they converge, rotates the
keys once, and stops everything cleanly. Run: ``.venv/bin/python scripts/demo.py``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import trio

from device.agent import Device, DeviceConfig
from device.document import Document
from proto.logs import configure_logging
from syncnode.procs import NodeProcess, start_cluster

T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:5.1f}s] {msg}", flush=True)


async def edit(doc: Document, who: str, n: int) -> None:
    for i in range(n):
        doc.change(lambda e, i=i: (e.text("story").insert(0, f"{who}{i} "),
                                   e.list("log").push(f"{who}:{i}"),
                                   e.map("last").insert(who, i),
                                   e.counter("edits").increment(1)))
        await trio.sleep(0.01)


async def main(root: Path, nodes: list[NodeProcess]) -> None:
    tickets = [n.ticket for n in nodes if n.ticket is not None]
    config = DeviceConfig()
    async with Device.open(root / "device-a", config=config) as a, \
            Device.open(root / "device-b", config=config) as b:
        say(f"devices up: A {a.id}, B {b.id}")
        doc_a = await a.create_document(tickets, name="demo")
        say(f"A created document {doc_a.id[:16]} on 3 syncnodes")
        ticket = doc_a.invite()
        say(f"A made an invite ticket ({len(ticket)} chars); B joins with it")
        doc_b = await b.join(ticket, progress=lambda m: say(f"B: {m}"))
        say(f"B is a member; epoch {doc_b.epoch}, members "
            f"{', '.join(m.id for m in doc_b.members())}")

        say("A and B edit the same text, list, map and counter concurrently (25 edits each)")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(edit, doc_a, "A", 25)
            nursery.start_soon(edit, doc_b, "B", 25)
        with trio.fail_after(60):
            while doc_a.value() != doc_b.value():  # noqa: ASYNC110 - two docs' state
                await trio.sleep(0.05)
            await doc_a.wait_durable()
            await doc_b.wait_durable()
        v = doc_a.value()
        say(f"converged: edits={v['edits']:.0f}, log has {len(v['log'])} items, "
            f"last={v['last']}, story starts {v['story'][:40]!r}")
        slot = await doc_b.rotate_keys()
        say(f"B rotated the keys through Paxos: epoch {slot}")
        doc_a.change(lambda e: e.map("last").insert("after-rotation", True))
        with trio.fail_after(30):
            while doc_a.value() != doc_b.value():  # noqa: ASYNC110 - two docs' state
                await trio.sleep(0.05)
        st = doc_a.sync_status()
        say(f"still converged after the rotation; A: {st.durable} updates durable, "
            f"{st.unsent + st.outbox} pending, {len(st.connected)}/{st.syncnodes} syncnodes")
    say("devices closed")


def run() -> int:
    configure_logging("warning")
    with tempfile.TemporaryDirectory(prefix="syncnode-demo-") as tmp:
        root = Path(tmp)
        say("starting 3 syncnodes on loopback")
        nodes = start_cluster(root, 3)
        try:
            for n in nodes:
                say(f"  syncnode {n.ticket.node_id.hex()[:10] if n.ticket else '?'} "
                    f"ticket {str(n.ticket)[:24]}...")
            trio.run(main, root, nodes)
            for n in nodes:
                n.terminate()
            envelopes = sum(int(str(n.info().get("envelopes", 0))) for n in nodes)
            say(f"syncnodes stopped cleanly; they hold {envelopes} envelopes in total, "
                "all ciphertext")
        finally:
            for n in nodes:
                n.stop()
    say("demo finished")
    return 0


if __name__ == "__main__":
    sys.exit(run())
