"""A syncnode link counts as connected only while the syncnode answers (real processes)."""

from __future__ import annotations

import os
import signal
from dataclasses import replace
from pathlib import Path

import trio

from device.agent import Device
from proto.ticket import NodeTicket
from syncnode.procs import NodeProcess
from tests.device_kit import FAST, eventually
from tests.syncnode_kit import restart_on_new_port


async def test_frozen_syncnode_is_reported_down_and_back_up(
        tmp_path: Path, nodes: list[NodeProcess]) -> None:
    config = replace(FAST, keepalive_interval=0.5, keepalive_timeout=1.0)
    async with Device.open(tmp_path / "a", config=config) as a:
        doc = await a.create_document([n.ticket for n in nodes if n.ticket])
        with trio.fail_after(30):
            await doc.wait_connected(3)
        frozen = nodes[2]
        assert frozen.proc is not None
        os.kill(frozen.proc.pid, signal.SIGSTOP)
        try:
            await eventually(lambda: len(doc.sync_status().connected) == 2, 10,
                             "the frozen syncnode to count as down")
            # Edits still become durable on the two that answer.
            doc.change(lambda e: e.map("m").insert("k", "v"))
            with trio.fail_after(20):
                await doc.wait_durable()
        finally:
            os.kill(frozen.proc.pid, signal.SIGCONT)
        await eventually(lambda: len(doc.sync_status().connected) == 3, 30,
                         "the thawed syncnode to count as up again")


async def test_a_moved_syncnode_is_reached_after_set_address(
        tmp_path: Path, nodes: list[NodeProcess]) -> None:
    async with Device.open(tmp_path / "a", config=FAST) as a:
        doc = await a.create_document([n.ticket for n in nodes if n.ticket])
        with trio.fail_after(30):
            await doc.wait_connected(3)
        moved = nodes[2]
        restart_on_new_port(moved)
        port = moved.listen.rpartition(":")[2]
        assert moved.ticket is not None
        assert any(addr.endswith(f":{port}") for addr in moved.ticket.addrs)
        await trio.sleep(2.0)
        assert len(doc.sync_status().connected) == 2  # the manifest's address is stale
        assert a.set_syncnode_address(str(moved.ticket)) == [doc]
        await eventually(lambda: len(doc.sync_status().connected) == 3, 20,
                         "the link to the moved syncnode")
    # The address is kept across restarts of the device.
    async with Device.open(tmp_path / "a", config=FAST) as a:
        with trio.fail_after(30):
            await a.documents()[0].wait_connected(3)


async def test_devices_follow_a_moved_syncnode_through_the_others(
        tmp_path: Path, nodes: list[NodeProcess]) -> None:
    """A syncnode restarts on another address while the device is offline; it hands its
    signed address record to the group's other syncnodes, and the device, reaching those,
    learns the new address and links to all three again with no manual step."""
    async with Device.open(tmp_path / "a", config=FAST) as a:
        doc = await a.create_document([n.ticket for n in nodes if n.ticket])
        with trio.fail_after(30):
            await doc.wait_connected(3)
    moved = nodes[2]
    restart_on_new_port(moved)
    async with Device.open(tmp_path / "a", config=FAST) as a:
        doc = a.documents()[0]
        await eventually(lambda: len(doc.sync_status().connected) == 3, 30,
                         "the link to the moved syncnode, found through the others")
        assert moved.ticket is not None
        assert a.syncnode_ticket(NodeTicket(moved.ticket.node_id, ())).addrs == \
            moved.ticket.addrs
