"""Issue 14, findings 2 (frames before authentication), 3 (catch-up starvation), 5 (group
creation) and 10 (slow and greedy clients), against real ``syncnode run`` processes.

Each test runs the attack, then checks what SECURITY.md promises: the node refuses it (and counts
the refusal by reason in /metrics), its memory stays bounded, and an honest client's requests
keep their latency (compared with the same requests measured in the same test without the
attack, with a generous multiple: these are bounds, not benchmarks)."""

from __future__ import annotations

import secrets
import socket
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio

from proto.codec import encode
from proto.envelope import Envelope
from proto.errors import SyncnodeError
from proto.identity import SecretKey
from proto.manifest import SyncnodeEntry, genesis
from proto.messages import ErrorCode, ErrorReply
from proto.paxos.messages import PaxosRejected
from proto.rpc import RemoteError, SyncnodeClient
from proto.service import Backfill, GetChallenge
from proto.transport.iroh import IrohTransport
from syncnode.procs import NodeProcess
from tests.hostile.kit import (
    configured,
    latencies,
    p50,
    peak_rss_bytes,
    pid_of,
    refusals,
    rss_bytes,
    stranger,
)
from tests.syncnode_kit import Device, decide, found_group, signed_prepare, update_value

MiB = 1024 * 1024


def _closed_port() -> int:
    """A UDP port on loopback that nothing listens on (dials to it time out)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _challenge(client: SyncnodeClient) -> None:
    await client.request(GetChallenge())


async def test_big_frame_before_authentication_is_refused_from_its_header(
        nodes: list[NodeProcess]) -> None:
    node = nodes[0]
    async with stranger(node) as (client, conn):
        stream = await conn.open_stream()
        await stream.send(b"\xc4" + b"\x00" * (300 * 1024))  # 300 KiB, never decoded
        with pytest.raises(SyncnodeError):
            with trio.fail_after(10):
                for _ in range(50):  # the node drops the whole connection
                    await client.request(GetChallenge())
                    await trio.sleep(0.05)
    assert refusals(node).get("frame_too_large", 0) >= 1
    async with stranger(node) as (client, conn):  # once a key is proven, the limit lifts
        key = SecretKey.generate()
        await client.authenticate(key)
        big = Envelope.seal(key, secrets.token_bytes(32), 1, 0, b"\x00" * (300 * 1024))
        reply = await client.request(big)
        assert isinstance(reply, ErrorReply) and reply.code == ErrorCode.NOT_FOUND
        await _challenge(client)  # still connected


async def test_nested_array_bomb_costs_a_few_times_its_size(nodes: list[NodeProcess]) -> None:
    """16 MiB of nested empty msgpack arrays (about 16 million objects if decoded blindly) from
    a connection that authenticated a self-made key: the node's peak RSS grows by at most a few
    times the frame, and an honest client is not held up."""
    node = nodes[0]
    pid = pid_of(node)
    inner = b"\xdd" + (1_048_000).to_bytes(4, "big") + b"\x90" * 1_048_000
    bomb = b"\xdc" + (16).to_bytes(2, "big") + inner * 16
    assert len(bomb) < 16 * MiB
    async with stranger(node) as (honest, _):
        normal = p50(await latencies(lambda: _challenge(honest)))
        before = peak_rss_bytes(pid)
        during: list[float] = []
        async with stranger(node) as (attacker, conn), trio.open_nursery() as nursery:
            await attacker.authenticate(SecretKey.generate())

            async def attack() -> None:
                try:
                    stream = await conn.open_stream()
                    await stream.send(bomb)
                    await stream.receive()  # MALFORMED, then the connection is dropped
                except SyncnodeError:
                    pass

            nursery.start_soon(attack)
            during = await latencies(lambda: _challenge(honest), 40)
        grew = peak_rss_bytes(pid) - before
    assert grew < 4 * len(bomb), f"peak RSS grew {grew / MiB:.0f} MiB for a 16 MiB frame"
    assert max(during) < max(20 * normal, 0.5), (normal, max(during))
    assert refusals(node).get("undecodable", 0) >= 1


async def test_catch_up_is_not_starved_by_made_up_syncnodes(nodes: list[NodeProcess]) -> None:
    """A member of its own group names 8 syncnodes that do not exist and asks the node to catch
    up on it; an honest group's catch-up on the same node is not delayed."""
    alice, bob, mallory = Device("alice"), Device("bob"), Device("mallory")
    target = nodes[2]
    async with AsyncExitStack() as stack:
        transport = await IrohTransport.bind(SecretKey.generate())
        stack.push_async_callback(transport.aclose)
        clients = [await _connect(stack, transport, n, alice) for n in nodes]
        g = await found_group([n.entry for n in nodes], clients, alice, [bob])
        quorum, lagging = clients[:2], clients[2]

        async def lag_and_catch_up() -> float:
            """Decide a slot without the target, then time its catch-up from a member's hint."""
            v = update_value(g, alice)
            assert type(await decide(g, alice, quorum, v)).__name__ == "Decided"
            alice.mls.apply(v.commit)
            top = len(g.values) - 1
            start = trio.current_time()
            reply = await lagging.request(signed_prepare(alice, g.group_id, top + 1, 1))
            assert isinstance(reply, PaxosRejected)  # behind: it catches up from its peers
            with trio.fail_after(60):
                while True:  # the node pushes nothing to tell: poll its log
                    if (await lagging.fetch_decided(g.group_id, top)).top >= top:
                        break
                    await trio.sleep(0.02)
            return trio.current_time() - start

        normal = await lag_and_catch_up()
        evil = await _connect(stack, transport, target, mallory)
        for _ in range(3):
            fakes = [SyncnodeEntry(SecretKey.generate().public,
                                   (f"127.0.0.1:{_closed_port()}",)) for _ in range(8)]
            bad = genesis(mallory.key, secrets.token_bytes(32), mallory.endpoint,
                          (target.entry, *fakes), "loro")
            assert (await evil.register_group(bad)).created
            await evil.request(signed_prepare(mallory, bad.manifest.group_id, 5, 1))
        # a stranger (no member of alice's group) cannot make the node dial for it
        async with stranger(target) as (outsider, _):
            await outsider.authenticate(SecretKey.generate())
            await outsider.request(signed_prepare(mallory, g.group_id, 50, 1))
        attacked = await lag_and_catch_up()
    assert attacked < max(5 * normal, normal + 2.0), (normal, attacked)
    assert refusals(target).get("catchup_not_member", 0) >= 1


async def _connect(stack: AsyncExitStack, transport: IrohTransport, node: NodeProcess,
                   device: Device) -> SyncnodeClient:
    """A client of ``node`` authenticated as ``device``, closed with ``stack``."""
    assert node.ticket is not None
    client = await stack.enter_async_context(SyncnodeClient.connect(transport, node.ticket))
    await client.authenticate(device.key)
    return client


async def test_group_creation_is_bounded_per_node_and_by_allow_list(tmp_path: Path) -> None:
    alice = Device("alice")
    node = configured(tmp_path / "n", "group_creations_per_second = 0.5\n"
                      "group_creation_burst = 10\n"
                      f"accept_groups_from = [\"{alice.key_fpr.hex()}\"]\n")
    try:
        created = refused = 0
        for _ in range(4):  # four connections, fresh endpoints, one creator each
            creator = Device("flood")
            async with stranger(node) as (c, _):
                for _ in range(10):
                    g = genesis(creator.key, secrets.token_bytes(32), creator.endpoint,
                                (node.entry,), "loro")
                    try:
                        created += (await c.register_group(g)).created
                    except RemoteError as exc:
                        assert exc.code in (ErrorCode.UNAUTHORIZED, ErrorCode.RATE_LIMITED)
                        refused += 1
        assert created == 0 and refused == 40  # not on the allow-list
        async with stranger(node) as (c, _):
            for _ in range(30):
                g = genesis(alice.key, secrets.token_bytes(32), alice.endpoint, (node.entry,),
                            "loro")
                try:
                    created += (await c.register_group(g)).created
                except RemoteError as exc:
                    assert exc.code == ErrorCode.RATE_LIMITED, exc
                    refused += 1
        assert 10 <= created <= 13, created  # the burst, plus what refilled meanwhile
        got = refusals(node)
        assert got.get("creator_not_allowed") == 40 and got.get("group_creation_rate", 0) >= 17
        assert node.info()["groups"] == created
    finally:
        node.stop()


async def test_slow_reader_and_greedy_connections_are_bounded(tmp_path: Path) -> None:
    """A member pipelines 200 page-sized backfills and never reads the answers (about 800 MiB if
    the node queued them all); one endpoint opens more connections than allowed; a connection
    idles. The node's memory stays bounded and an honest client keeps its latency."""
    node = configured(tmp_path / "n", "max_connections_per_endpoint = 2\nidle_timeout = 2.0\n")
    alice = Device("alice")
    pid = pid_of(node)
    try:
        async with AsyncExitStack() as stack:
            transport = await IrohTransport.bind(SecretKey.generate())
            stack.push_async_callback(transport.aclose)
            c = await _connect(stack, transport, node, alice)
            g = await found_group([node.entry], [c], alice)
            for seq in range(1, 9):  # 8 envelopes of 2 MiB: every backfill page is ~4 MiB
                env = Envelope.seal(alice.key, g.group_id, seq, 0, secrets.token_bytes(2 * MiB))
                await c.store(env)
            async with stranger(node) as (honest, _):
                normal = p50(await latencies(lambda: _challenge(honest)))
                base = rss_bytes(pid)
                stream = await c.conn.open_stream()
                request = encode(Backfill(g.group_id, (), 2))
                for _ in range(200):
                    await stream.send(request)  # and never read a reply
                await trio.sleep(1)  # (under idle_timeout: the honest client stays)
                during = await latencies(lambda: _challenge(honest), 40)
                grew = peak_rss_bytes(pid) - base
            assert grew < 120 * MiB, f"RSS grew {grew / MiB:.0f} MiB"
            assert max(during) < max(20 * normal, 0.5), (normal, max(during))
            assert refusals(node).get("slow_reader", 0) >= 1
            await _connect(stack, transport, node, alice)  # the second from this endpoint
            with pytest.raises(SyncnodeError):  # a third is refused at once
                await _connect(stack, transport, node, alice)
            assert refusals(node).get("too_many_connections_per_endpoint", 0) >= 1
        async with stranger(node) as (idler, _):  # silence for idle_timeout: closed
            await trio.sleep(3.5)
            with pytest.raises(SyncnodeError):
                await _challenge(idler)
        assert refusals(node).get("idle", 0) >= 1
    finally:
        node.stop()
