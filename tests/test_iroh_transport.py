"""The iroh transport against a peer in a separate process, on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from proto import PROTOCOL_VERSION
from proto.errors import ConnectTimeout, FrameError, HandshakeError, StreamClosed, TransportError
from proto.identity import SecretKey
from proto.transport.base import Connection
from proto.transport.iroh import IrohTransport

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def echo_peer() -> Iterator[dict[str, Any]]:
    proc = subprocess.Popen([sys.executable, "-m", "tests.iroh_peer"], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, "peer process did not start"
        info = json.loads(line)
        info["node_id"] = bytes.fromhex(info["node_id"])
        info["pid"] = proc.pid
        yield info
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _client() -> IrohTransport:
    return await IrohTransport.bind(SecretKey.generate(), listen="127.0.0.1:0",
                                    connect_timeout=10)


async def test_exchange_frames_with_separate_process(echo_peer: dict[str, Any]) -> None:
    client = await _client()
    try:
        conn = await client.connect(echo_peer["node_id"], echo_peer["addrs"])
        assert conn.remote_id == echo_peer["node_id"]
        assert conn.protocol_version == PROTOCOL_VERSION
        stream = await conn.open_stream()
        frames = [b"", b"x", bytes(range(256)) * 100, b"y" * (1 << 20)]
        for f in frames:
            await stream.send(f)
        for f in frames:
            assert await stream.receive() == f
        # several streams at once on one connection
        async def one(i: int) -> None:
            s = await conn.open_stream()
            await s.send(f"stream {i}".encode())
            assert await s.receive() == f"stream {i}".encode()
            await s.send_eof()
            with pytest.raises(StreamClosed):
                await s.receive()

        async with trio.open_nursery() as nursery:
            for i in range(10):
                nursery.start_soon(one, i)
        await conn.aclose()
    finally:
        await client.aclose()


async def test_peer_id_mismatch_fails_cleanly(echo_peer: dict[str, Any]) -> None:
    client = await IrohTransport.bind(SecretKey.generate(), connect_timeout=2)
    try:
        wrong = SecretKey.generate().public
        with pytest.raises(TransportError):
            await client.connect(wrong, echo_peer["addrs"])
        # the endpoint is still fine afterwards
        conn = await client.connect(echo_peer["node_id"], echo_peer["addrs"])
        await conn.aclose()
    finally:
        await client.aclose()


async def test_dead_address_times_out() -> None:
    client = await IrohTransport.bind(SecretKey.generate())
    dead = await IrohTransport.bind(SecretKey.generate())
    addrs = dead.addresses()
    await dead.aclose()
    try:
        start = trio.current_time()
        with pytest.raises(ConnectTimeout):
            await client.connect(dead.node_id, addrs, timeout=1.5)
        assert trio.current_time() - start < 5  # bounded by the timeout, not iroh's ~30 s
    finally:
        await client.aclose()


async def test_closing_after_a_dial_to_a_dead_address_is_bounded() -> None:
    """iroh's close waits for every connection, and a dial to a dead address that was
    cancelled held it for about 3 s: ``aclose`` waits at most ``CLOSE_WAIT`` (every one-shot
    CLI command run while a syncnode was down took 3 s longer than its ``--wait``)."""
    from proto.transport.iroh import CLOSE_WAIT

    client = await IrohTransport.bind(SecretKey.generate())
    dead = await IrohTransport.bind(SecretKey.generate())
    addrs = dead.addresses()
    await dead.aclose()
    with trio.move_on_after(0.5) as dial:  # cancelled from outside, as a join's timeout does
        await client.connect(dead.node_id, addrs, timeout=5)
    assert dial.cancelled_caught
    start = trio.current_time()  # (aclose is shielded: a fail_after could not cut it short)
    await client.aclose()
    assert trio.current_time() - start < CLOSE_WAIT + 1.5  # about 3 s unbounded


async def test_cancelled_read_leaves_stream_usable(echo_peer: dict[str, Any]) -> None:
    client = await _client()
    try:
        conn = await client.connect(echo_peer["node_id"], echo_peer["addrs"])
        stream = await conn.open_stream()
        with trio.move_on_after(0.2) as scope:
            await stream.receive()  # nothing sent yet: blocks until cancelled
        assert scope.cancelled_caught
        for i in range(5):
            await stream.send(f"after cancel {i}".encode())
            assert await stream.receive() == f"after cancel {i}".encode()
        await conn.aclose()
    finally:
        await client.aclose()


async def test_version_mismatch_is_a_handshake_error() -> None:
    server = await IrohTransport.bind(SecretKey.generate())
    client = await _client()
    client.versions = (99,)  # a future client that speaks only protocol v99

    async def idle(conn: Connection) -> None:
        await trio.sleep_forever()

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, idle)
            with pytest.raises(HandshakeError, match="UNSUPPORTED_VERSION"):
                await client.connect(server.node_id, server.addresses())
            nursery.cancel_scope.cancel()
    finally:
        await client.aclose()
        await server.aclose()


async def test_oversized_frame_from_peer_is_rejected() -> None:
    server = await IrohTransport.bind(SecretKey.generate(), max_frame=1024)
    client = await _client()
    got: list[BaseException] = []
    done = trio.Event()

    async def handler(conn: Connection) -> None:
        stream = await conn.accept_stream()
        try:
            await stream.receive()
        except FrameError as exc:
            got.append(exc)
        done.set()

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, handler)
            conn = await client.connect(server.node_id, server.addresses())
            stream = await conn.open_stream()
            await stream.send(b"z" * 2048)  # the client's own limit is 16 MiB
            with trio.fail_after(10):
                await done.wait()
            nursery.cancel_scope.cancel()
    finally:
        await client.aclose()
        await server.aclose()
    assert isinstance(got[0], FrameError) and "exceeds max 1024" in str(got[0])
