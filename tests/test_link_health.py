"""A syncnode link counts as connected only while the syncnode answers (real processes)."""

from __future__ import annotations

import os
import signal
from dataclasses import replace
from pathlib import Path

import trio

from device.agent import Device
from syncnode.procs import NodeProcess
from tests.device_kit import FAST, eventually


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
