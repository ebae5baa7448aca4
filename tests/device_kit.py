"""Helpers for device-agent tests: devices on the in-memory network or on iroh."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from device.agent import Device, DeviceConfig
from device.document import Document
from proto.identity import SecretKey
from proto.rpc import SyncnodeClient
from proto.ticket import NodeTicket
from proto.transport.memory import MemoryNetwork
from tests.syncnode_kit import MemoryCluster, Node

FAST = DeviceConfig(flush_interval=0.01, reconnect_min=0.05, reconnect_max=0.5,
                    mailbox_interval=0.1, join_poll_interval=0.1, sync_request_interval=0.5,
                    connect_timeout=5.0)


@asynccontextmanager
async def memory_device(net: MemoryNetwork, path: Path, config: DeviceConfig = FAST
                        ) -> AsyncIterator[Device]:
    def endpoint(key: SecretKey) -> Any:
        net._listeners.pop(key.public, None)
        return net.endpoint(key.public)

    async with Device.open(path, config=config, transport=endpoint) as device:
        yield device


@asynccontextmanager
async def memory_cluster(tmp_path: Path, seed: int, nodes: int = 3
                         ) -> AsyncIterator[tuple[MemoryNetwork, MemoryCluster, list[Node]]]:
    """A running memory network with ``nodes`` in-process syncnodes (real SQLite in
    ``tmp_path``); stopped on exit."""
    net = MemoryNetwork(seed=seed)
    async with trio.open_nursery() as nursery:
        await nursery.start(net.run)
        cluster = MemoryCluster(net, nursery, tmp_path)
        started = [await cluster.start_node() for _ in range(nodes)]
        yield net, cluster, started
        nursery.cancel_scope.cancel()


async def eventually(check: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    """Wait (polling) until ``check()`` holds; fail with ``what`` after ``timeout`` seconds."""
    with trio.move_on_after(timeout) as scope:
        while not check():  # noqa: ASYNC110 - the condition spans several tasks' state
            await trio.sleep(0.02)
    if scope.cancelled_caught:
        raise AssertionError(f"timed out waiting for {what or check}")


async def converged(docs: list[Document], timeout: float = 30.0) -> Any:
    await eventually(lambda: all(d.value() == docs[0].value() for d in docs), timeout,
                     "documents to converge")
    return docs[0].value()


async def held(doc: Document, ticket: NodeTicket) -> dict[bytes, set[int]]:
    """Every (sender, seq) the syncnode of ``ticket`` serves for ``doc``, read as a member."""
    host = doc.replica.host
    out: dict[bytes, set[int]] = {}
    async with SyncnodeClient.connect(host.transport, ticket, timeout=10) as client:
        await client.authenticate(host.key)
        marks: dict[bytes, int] = {}
        while True:
            page = await client.backfill(doc.group_id, marks)
            for env in page.envelopes:
                out.setdefault(env.sender, set()).add(env.seq)
                marks[env.sender] = max(marks.get(env.sender, 0), env.seq)
            if not page.more:
                return out
