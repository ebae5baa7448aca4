"""Tools shared by the hostile tests: a stranger's raw connection, process RSS and honest-client
latency probes."""

from __future__ import annotations

import statistics
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from proto.identity import SecretKey
from proto.rpc import SyncnodeClient
from proto.transport.base import Connection
from proto.transport.iroh import IrohTransport
from syncnode.procs import NodeProcess


def rss_bytes(pid: int) -> int:
    """Resident set size of a process now (``VmRSS``)."""
    return _status_kb(pid, "VmRSS") * 1024


def peak_rss_bytes(pid: int) -> int:
    """Peak resident set size of a process so far (``VmHWM``): catches a spike between samples."""
    return _status_kb(pid, "VmHWM") * 1024


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(f"{field} not in /proc/{pid}/status")


def pid_of(node: NodeProcess) -> int:
    assert node.proc is not None
    return node.proc.pid


def disk_bytes(node: NodeProcess) -> int:
    """Bytes of the node's database files (with WAL and shared memory)."""
    return sum(p.stat().st_size for p in node.data_dir.glob("syncnode.db*"))


@asynccontextmanager
async def stranger(node: NodeProcess) -> AsyncIterator[tuple[SyncnodeClient, Connection]]:
    """A connection from a fresh endpoint key that belongs to no group (an outsider). Yields the
    request client and its raw connection (open extra streams on it to send arbitrary bytes)."""
    transport = await IrohTransport.bind(SecretKey.generate())
    try:
        assert node.ticket is not None
        async with SyncnodeClient.connect(transport, node.ticket) as client:
            yield client, client.conn
    finally:
        await transport.aclose()


async def latencies(call: Callable[[], Awaitable[object]], n: int = 20) -> list[float]:
    """Seconds each of ``n`` sequential calls took."""
    out = []
    for _ in range(n):
        start = trio.current_time()
        await call()
        out.append(trio.current_time() - start)
    return out


def p50(samples: list[float]) -> float:
    return statistics.median(samples)


def refusals(node: NodeProcess) -> dict[str, float]:
    """``syncnode_refused_total{reason=...}`` from the node's /metrics, by reason."""
    status, text = node.get("/metrics")
    assert status == 200
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith('syncnode_refused_total{reason="'):
            reason = line.split('"')[1]
            out[reason] = float(line.rsplit(" ", 1)[1])
    return out


def configured(root: Path, limits: str) -> NodeProcess:
    """A started ``syncnode run`` whose ``[limits]`` table is ``limits`` (TOML lines)."""
    node = NodeProcess(root)
    node.init()
    (root / "syncnode.toml").write_text("[limits]\n" + limits)
    return node.start()
