"""The installed stack's self-check: a small runner, and the checks both programs need.

``syncnode selfcheck`` (:mod:`syncnode.selfcheck`) and ``syncdevice selfcheck``
(:mod:`device.selfcheck`) each run a list of checks, one line per check, and fail if any check
fails. Both need the runner and the parts of the stack they share (the wire codec and Ed25519
signatures, SQLite, the iroh transport), and ``syncnode/`` and ``device/`` may not import each
other, so the shared part lives here; the device adds what only it uses (MLS, the CRDT).

Each check runs the real thing once on this machine, small: a native binding that is missing,
the wrong build or patched wrongly (``proto/transport/uniffi_trio.py``) fails here with its own
error rather than later in the middle of a sync. The checks do disk and network I/O (a temporary
SQLite database, two iroh endpoints on loopback) when they run; importing this module does none.
"""

from __future__ import annotations

import inspect
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import trio

from proto.identity import SecretKey, short_id

CheckFn = Callable[[], str] | Callable[[], Awaitable[str]]
"""A check returns a one-line detail of what it verified, or raises to fail."""
Check = tuple[str, CheckFn]
"""A check's name as printed (what is checked and through which library), and the check."""


def check_wire() -> str:
    """The codec (msgspec) and signatures (pynacl): an envelope sealed, encoded, decoded and
    verified; a tampered copy and a frame announcing 2^32-1 items refused."""
    import msgspec

    from proto.codec import decode, encode
    from proto.envelope import Envelope
    from proto.errors import DecodeError

    key = SecretKey.generate()
    env = Envelope.seal(key, b"g" * 32, 1, 0, b"selfcheck ciphertext")
    raw = encode(env)
    got = decode(raw)
    if got != env or not got.verify(key.public):
        raise RuntimeError("an envelope did not survive encode, decode and verify")
    if Envelope.seal(key, b"g" * 32, 1, 0, b"other").verify(SecretKey.generate().public):
        raise RuntimeError("a signature verified under another key")
    tampered = decode(raw.replace(b"selfcheck", b"SELFCHECK"))
    if tampered.verify(key.public):
        raise RuntimeError("a tampered envelope verified")
    try:
        decode(b"\xdd\xff\xff\xff\xff")
    except DecodeError:
        pass
    else:
        raise RuntimeError("a frame announcing 2^32-1 items was accepted")
    return (f"msgspec {msgspec.__version__}: {len(raw)} B envelope signed, decoded, verified; "
            "tampered copy and hostile header refused")


def check_sqlite() -> str:
    """What the stores need from SQLite: WAL, WITHOUT ROWID tables, upserts (3.24+)."""
    with tempfile.TemporaryDirectory(prefix="selfcheck-") as tmp:
        db = sqlite3.connect(Path(tmp) / "check.db")
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise RuntimeError(f"journal_mode=WAL gave {mode!r}")
            db.execute("CREATE TABLE t (k BLOB PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID")
            with db:
                for _ in range(3):
                    db.execute("INSERT INTO t VALUES (?, 1) ON CONFLICT (k) DO UPDATE "
                               "SET n = n + 1", (b"k",))
            n = db.execute("SELECT n FROM t WHERE k = ?", (b"k",)).fetchone()[0]
            if n != 3:
                raise RuntimeError(f"3 upserts counted {n}")
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise RuntimeError(f"quick_check: {check}")
        finally:
            db.close()
    return f"SQLite {sqlite3.sqlite_version}: WAL, WITHOUT ROWID table, 3 upserts, quick_check ok"


async def check_iroh(rounds: int = 50) -> str:
    """Two real iroh endpoints on loopback: connect with the version handshake, echo frames."""
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


STACK_CHECKS: tuple[Check, ...] = (
    ("wire (msgspec codec, ed25519 via pynacl)", check_wire),
    ("storage (sqlite3)", check_sqlite),
    ("iroh transport", check_iroh),
)
"""What a syncnode and a device both rely on."""


def run(checks: Sequence[Check], echo: Callable[[str], None] = print) -> bool:
    """Run ``checks`` in order (an async check under its own ``trio.run``), print one line for
    each, and return True if all passed. A failing check does not stop the others: the report
    then shows everything that is wrong at once."""
    ok = True
    for name, fn in checks:
        t = time.perf_counter()
        try:
            detail = trio.run(fn) if inspect.iscoroutinefunction(fn) else fn()
        except Exception as exc:
            ok = False
            echo(f"  FAIL  {name}: {type(exc).__name__}: {exc}")
        else:
            echo(f"  ok    {name}: {detail} ({(time.perf_counter() - t) * 1000:.0f} ms)")
    return ok
