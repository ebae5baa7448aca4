"""Real processes, real network faults: 3 ``syncnode`` processes and 3 device processes on
loopback (iroh, MLS, SQLite). One syncnode is frozen (SIGSTOP) while another is killed and
restarted and a device process is killed mid-way and restarted; at the end every device holds
every edit and all three documents are identical."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import trio

from device.agent import Device
from syncnode.procs import NodeProcess
from tests.device_kit import FAST

EDITS = 25
ROOT = Path(__file__).resolve().parent.parent


def worker(home: Path, doc_id: str, name: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.device_worker", str(home), doc_id, name, str(EDITS),
         str(3 * EDITS)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


async def test_processes_converge_through_pause_kill_and_restart(
        tmp_path: Path, nodes: list[NodeProcess]) -> None:
    tickets = [n.ticket for n in nodes if n.ticket is not None]
    names = ["a", "b", "c"]
    async with Device.open(tmp_path / "a", config=FAST) as a:  # set up the membership
        doc = await a.create_document(tickets)
        for other in names[1:]:
            async with Device.open(tmp_path / other, config=FAST) as dev:
                with trio.fail_after(60):
                    await dev.join(doc.invite())
        doc_id = doc.id

    frozen, killed = nodes[0], nodes[1]
    assert frozen.proc is not None and killed.ticket is not None
    procs = {n: worker(tmp_path / n, doc_id, n) for n in names}
    try:
        frozen.proc.send_signal(signal.SIGSTOP)  # cut off: its connections go silent
        await trio.sleep(1.0)
        killed.kill()  # with one frozen, no quorum now: edits wait in the outboxes
        procs["c"].send_signal(signal.SIGKILL)
        procs["c"].wait(10)
        await trio.sleep(1.0)
        port = killed.ticket.addrs[0].rpartition(":")[2]
        killed.extra_args = ["--listen", f"127.0.0.1:{port}"]  # same address as in the tickets
        killed.start()
        procs["c"] = worker(tmp_path / "c", doc_id, "c")
        await trio.sleep(2.0)
        frozen.proc.send_signal(signal.SIGCONT)
        results = {}
        for n, p in procs.items():
            out, _ = await trio.to_thread.run_sync(lambda p=p: p.communicate(timeout=280))
            assert p.returncode == 0, f"device {n} did not converge"
            results[n] = json.loads(out.strip().splitlines()[-1])
    finally:
        if frozen.proc is not None and frozen.proc.poll() is None:
            frozen.proc.send_signal(signal.SIGCONT)
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    expected = {f"{n}-{i}" for n in names for i in range(EDITS)}
    assert set(results["a"]["m"]) == expected
    assert results["a"] == results["b"] == results["c"]
