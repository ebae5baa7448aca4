"""Withholding leaves evidence, end to end (issue 17): two honest ``syncnode run`` processes
and one withholding syncnode (the simulator's :class:`WithholdingService`: the real service,
storing and acking everything, serving nothing) in this process, all on iroh loopback; a real
device with real MLS and SQLite. The device raises a ``withholding`` alarm, ``syncdevice alarms
--export`` writes its proof, and ``syncdevice verify-evidence`` verifies it on its own (and
refuses it once a byte of it is changed)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import trio

from device.agent import Device
from proto.identity import SecretKey
from proto.ticket import NodeTicket
from proto.transport.iroh import IrohTransport
from simulations.byzantine import WithholdingService
from syncnode.procs import start_cluster
from syncnode.server import Server
from tests.device_kit import FAST, eventually

ROOT = Path(__file__).resolve().parent.parent


def syncdevice(home: Path, *args: str, stdin: bytes | None = None
               ) -> subprocess.CompletedProcess[bytes]:
    """The CLI of this checkout (``python -m device``)."""
    return subprocess.run([sys.executable, "-m", "device", "--home", str(home), *args],
                          cwd=ROOT, capture_output=True, input=stdin, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


async def test_a_withholding_syncnode_is_proven_to_withhold(tmp_path: Path) -> None:
    honest = start_cluster(tmp_path / "honest", 2)
    home = tmp_path / "alice"
    try:
        key = SecretKey.generate()
        transport = await IrohTransport.bind(key, listen="127.0.0.1:0")
        service = WithholdingService(key, tmp_path / "withholder.db")
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            await nursery.start(transport.serve, Server(service).handle_connection)
            bad = NodeTicket(key.public, tuple(transport.addresses()))
            tickets = [n.ticket for n in honest if n.ticket is not None] + [bad]
            config = dataclasses.replace(FAST, holdings_interval=0.5)
            async with Device.open(home, config=config) as alice:
                doc = await alice.create_document(tickets, name="notes")
                # Every link up first: an update durable on the two honest nodes before the
                # withholder's link is up is not sent to it (its peers would give it), and
                # without its ack there is nothing to prove.
                with trio.fail_after(30):
                    await doc.wait_connected(3)
                for i in range(3):
                    doc.change(lambda e, i=i: e.text("body").insert(0, f"edit {i} "))
                with trio.fail_after(60):
                    await doc.wait_durable()
                await eventually(lambda: any(a.kind == "withholding" for a in doc.alarms()),
                                 30, "a withholding alarm")
                alarm = next(a for a in doc.alarms() if a.kind == "withholding")
                assert key.public.hex() in alarm.detail
                assert not any(a.kind == "withholding" and n.ticket is not None
                               and n.ticket.node_id.hex() in a.detail
                               for a in doc.alarms() for n in honest)
            await service.aclose()
            nursery.cancel_scope.cancel()
        await transport.aclose()
    finally:
        for n in honest:
            n.stop()
    check_with_the_cli(home, tmp_path, key.public.hex())


def check_with_the_cli(home: Path, tmp_path: Path, node_hex: str) -> None:
    """Export the proof and verify it with nothing but the CLI; tampered or junk files are
    refused with their exit codes."""
    listed = syncdevice(home, "--json", "alarms", "notes", "--export", str(tmp_path / "ev"))
    assert listed.returncode == 0, listed.stderr.decode()
    rows = json.loads(listed.stdout)
    files = [r["evidence"] for r in rows if r["kind"] == "withholding"]
    assert len(files) == 1 and Path(files[0]).stat().st_mode & 0o077 == 0

    ok = syncdevice(home, "verify-evidence", files[0])
    assert ok.returncode == 0, ok.stderr.decode()
    assert ok.stdout.decode().startswith("VERIFIED: ")
    assert node_hex in ok.stdout.decode()

    proof = Path(files[0]).read_bytes()
    by_stdin = syncdevice(home, "--json", "verify-evidence", "-", stdin=proof.hex().encode())
    assert by_stdin.returncode == 0 and json.loads(by_stdin.stdout)["node_id"] == node_hex

    tampered = bytearray(proof)
    tampered[-3] ^= 0x01  # inside the last signature
    bad_file = tmp_path / "tampered.proof"
    bad_file.write_bytes(bytes(tampered))
    refused = syncdevice(home, "verify-evidence", str(bad_file))
    assert refused.returncode == 5, (refused.stdout, refused.stderr)
    assert refused.stdout.decode().startswith("DOES NOT VERIFY")

    junk = tmp_path / "junk"
    junk.write_bytes(b"\x00not a proof")
    err = syncdevice(home, "verify-evidence", str(junk))
    assert err.returncode == 1 and len(err.stderr.decode().strip().splitlines()) == 1
