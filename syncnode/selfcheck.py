"""A short end-to-end check of the installed stack (``syncnode selfcheck``, ``make demo``).

Loads the native bindings with their patches, runs an MLS encrypt/decrypt between two members,
a Loro CRDT merge, and an iroh exchange between two real endpoints on loopback (handshake and
framed request/response). Prints one line per check; exits non-zero if any fails.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import trio

from proto.identity import SecretKey, short_id


def check_mls() -> str:
    from device import mls

    msg = b"hello from the selfcheck"
    got = mls.selfcheck(msg)
    if got != msg:
        raise RuntimeError(f"MLS round trip returned {got!r}")
    return "two-member group, 1 encrypted message decrypted"


def check_loro() -> str:
    import loro

    a, b = loro.LoroDoc(), loro.LoroDoc()
    a.get_text("t").insert(0, "hello ")
    a.commit()
    b.get_text("t").insert(0, "world")
    b.commit()
    a.import_(b.export(loro.ExportMode.Snapshot()))
    b.import_(a.export(loro.ExportMode.Snapshot()))
    if a.get_text("t").to_string() != b.get_text("t").to_string():
        raise RuntimeError("loro replicas diverged")
    return f"2 replicas converged on {a.get_text('t').to_string()!r}"


async def check_iroh(rounds: int = 50) -> str:
    from proto.errors import StreamClosed
    from proto.transport.base import Connection
    from proto.transport.iroh import IrohTransport

    server = await IrohTransport.bind(SecretKey.generate(), listen="127.0.0.1:0")
    client = await IrohTransport.bind(SecretKey.generate(), listen="127.0.0.1:0")

    async def echo(conn: Connection) -> None:
        stream = await conn.accept_stream()
        try:
            while True:
                await stream.send(await stream.receive())
        except StreamClosed:
            await stream.send_eof()

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, echo)
            t0 = time.perf_counter()
            conn = await client.connect(server.node_id, server.addresses(), timeout=10)
            connect_ms = (time.perf_counter() - t0) * 1000
            stream = await conn.open_stream()
            rtts = []
            for i in range(rounds):
                payload = f"ping {i}".encode()
                t = time.perf_counter()
                await stream.send(payload)
                if await stream.receive() != payload:
                    raise RuntimeError("echo mismatch")
                rtts.append(time.perf_counter() - t)
            await stream.send_eof()
            await conn.aclose()
            nursery.cancel_scope.cancel()
    finally:
        await client.aclose()
        await server.aclose()
    return (f"{short_id(client.node_id)} -> {short_id(server.node_id)} on loopback, "
            f"protocol v{conn.protocol_version}, connect {connect_ms:.1f} ms, "
            f"{rounds} echoes, median RTT {statistics.median(rtts) * 1e6:.0f} µs")


def run(echo: Callable[[str], None] = print) -> bool:
    """Run every check, report each, return True if all passed."""
    ok = True
    checks: list[tuple[str, Callable[[], str]]] = [
        ("mls (mls-rs via agentvault-mls-rs-uniffi)", check_mls),
        ("crdt (loro)", check_loro),
        ("iroh transport", lambda: trio.run(check_iroh)),
    ]
    for name, fn in checks:
        t = time.perf_counter()
        try:
            detail = fn()
        except Exception as exc:
            ok = False
            echo(f"  FAIL  {name}: {type(exc).__name__}: {exc}")
        else:
            echo(f"  ok    {name}: {detail} ({(time.perf_counter() - t) * 1000:.0f} ms)")
    return ok
