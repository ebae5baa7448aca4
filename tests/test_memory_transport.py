"""The in-memory transport: fault injection and seeded, byte-for-byte reproducible runs."""

from __future__ import annotations

import itertools

import pytest
import trio
import trio.testing

from proto.errors import ConnectTimeout, StreamClosed, TransportError
from proto.identity import SecretKey
from proto.transport.base import Connection
from proto.transport.memory import Faults, MemoryNetwork

NODES = [SecretKey(bytes([i]) * 32).public for i in range(1, 5)]


async def _collect(conn: Connection, sink: list[tuple[str, bytes]]) -> None:
    while True:
        try:
            stream = await conn.accept_stream()
        except TransportError:
            return
        while True:
            try:
                sink.append((conn.remote_id.hex()[:6], await stream.receive()))
            except (StreamClosed, TransportError):
                break


async def _scenario(seed: int, faults: Faults) -> tuple[str, list[tuple[str, bytes]]]:
    net = MemoryNetwork(seed=seed, faults=faults)
    received: dict[bytes, list[tuple[str, bytes]]] = {n: [] for n in NODES}
    async with trio.open_nursery() as nursery:
        await nursery.start(net.run)
        transports = {n: net.endpoint(n) for n in NODES}
        for n, t in transports.items():
            async def handler(conn: Connection, n: bytes = n) -> None:
                await _collect(conn, received[n])
            await nursery.start(t.serve, handler)

        async def sender(src: bytes, dst: bytes) -> None:
            # retry the dial: handshake frames can be dropped too
            while True:
                try:
                    conn = await transports[src].connect(dst, timeout=1.0)
                    break
                except TransportError:
                    continue
            stream = await conn.open_stream()
            for i in range(30):
                await stream.send(f"{src.hex()[:4]}->{dst.hex()[:4]} #{i}".encode())
                await trio.sleep(0.001)
            await stream.send_eof()

        async with trio.open_nursery() as senders:
            for src in NODES:
                for dst in NODES:
                    if src != dst:
                        senders.start_soon(sender, src, dst)
        await trio.sleep(5)
        nursery.cancel_scope.cancel()
    # per (receiver, sender) in arrival order; streams from different senders interleave freely
    flat = [(n.hex()[:6], *item) for n in NODES
            for item in sorted(received[n], key=lambda item: item[0])]
    return net.trace_digest(), flat  # type: ignore[return-value]


FAULTY = Faults(drop=0.2, duplicate=0.1, min_delay=0.001, max_delay=0.02, reorder=0.2)


def _run(seed: int, faults: Faults) -> tuple[str, list[tuple[str, bytes]]]:
    return trio.run(_scenario, seed, faults, clock=trio.testing.MockClock(autojump_threshold=0))


def test_seeded_run_is_reproducible() -> None:
    digest1, got1 = _run(7, FAULTY)
    digest2, got2 = _run(7, FAULTY)
    assert digest1 == digest2
    assert got1 == got2
    digest3, got3 = _run(8, FAULTY)
    assert digest3 != digest1 and got3 != got1


def test_faults_actually_happen_and_no_faults_is_reliable() -> None:
    _, clean = _run(1, Faults(min_delay=0.001, max_delay=0.005))
    # 12 ordered pairs x 30 frames, each exactly once and in order per pair
    assert len(clean) == 12 * 30
    by_pair: dict[tuple[str, str], list[bytes]] = {}
    for receiver, sender, frame in clean:  # type: ignore[misc]
        by_pair.setdefault((receiver, sender), []).append(frame)
    for frames in by_pair.values():
        assert [int(f.rsplit(b"#", 1)[1]) for f in frames] == list(range(30))

    _, faulty = _run(1, FAULTY)
    frames = [f for _, _, f in faulty]  # type: ignore[misc]
    assert len(set(frames)) < 12 * 30  # some were dropped
    assert len(frames) > len(set(frames))  # some were duplicated
    out_of_order = 0
    by_pair = {}
    for receiver, sender, frame in faulty:  # type: ignore[misc]
        by_pair.setdefault((receiver, sender), []).append(frame)
    for seq in by_pair.values():
        nums = [int(f.rsplit(b"#", 1)[1]) for f in seq]
        out_of_order += sum(1 for a, b in itertools.pairwise(nums) if b < a)
    assert out_of_order > 0  # some were reordered


async def test_partition_heal_and_asymmetric_cut(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork(seed=3)
    a, b = NODES[0], NODES[1]
    got: list[bytes] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(net.run)
        ta, tb = net.endpoint(a), net.endpoint(b)

        async def handler(conn: Connection) -> None:
            stream = await conn.accept_stream()
            while True:
                try:
                    got.append(await stream.receive())
                except (StreamClosed, TransportError):
                    return

        await nursery.start(tb.serve, handler)
        conn = await ta.connect(b)
        stream = await conn.open_stream()
        await stream.send(b"before")
        await trio.sleep(0.1)
        net.partition([a], [b])
        await stream.send(b"during")
        with pytest.raises(ConnectTimeout):
            await ta.connect(b, timeout=2)
        await trio.sleep(0.1)
        net.heal()
        await stream.send(b"after")
        await trio.sleep(0.1)
        assert got == [b"before", b"after"]

        # one-way cut: b -> a blocked, a -> b still flows
        net.block(b, a)
        await stream.send(b"one-way")
        await trio.sleep(0.1)
        assert got[-1] == b"one-way"
        nursery.cancel_scope.cancel()
    events = {e[1] for e in net.trace}
    assert {"block", "cut", "heal", "dial-unreachable"} <= events


async def test_closing_an_endpoint_breaks_its_connections(
        autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork(seed=4)
    async with trio.open_nursery() as nursery:
        await nursery.start(net.run)
        ta, tb = net.endpoint(NODES[0]), net.endpoint(NODES[1])
        accepted: list[Connection] = []

        async def handler(conn: Connection) -> None:
            accepted.append(conn)
            await trio.sleep_forever()

        await nursery.start(tb.serve, handler)
        conn = await ta.connect(NODES[1])
        stream = await conn.open_stream()
        await trio.sleep(0.1)
        await tb.aclose()  # the peer "crashes"
        await trio.sleep(0.1)
        with pytest.raises(TransportError):
            await stream.receive()
        with pytest.raises(TransportError):
            await stream.send(b"x")
        with pytest.raises(ConnectTimeout):
            await ta.connect(NODES[1], timeout=1)
        nursery.cancel_scope.cancel()
