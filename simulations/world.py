"""The simulated world: syncnodes and devices of the real code in one trio run.

Every syncnode is the real :class:`~syncnode.service.Service` and
:class:`~syncnode.server.Server` (with its peer catch-up task) on a
:class:`~proto.transport.memory.MemoryNetwork` endpoint, storing into a real SQLite file;
every device is the real :class:`~device.agent.Device` with its documents, MLS state and SQLite
store. Only three things are simulated: the network (seeded faults), time (trio's mock clock,
plus a per-machine wall clock that can jump) and randomness (:mod:`proto.entropy`, seeded).

Crashes keep exactly what was on disk. A syncnode commits with ``synchronous=FULL``, so a crash
loses only queued writes nobody was told about. A device crash restores the database files as
they were at the crash instant; with ``power_loss`` the WAL is cut back to the last fsynced
commit (the device runs with automatic checkpoints off, so the WAL only grows and its fsynced
prefix is exactly what survives a power cut).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import trio

from device.agent import Device, DeviceConfig
from device.document import Document
from proto import entropy
from proto.codec import decode_as
from proto.envelope import Envelope
from proto.identity import SecretKey
from proto.manifest import LogValue
from proto.ticket import NodeTicket
from proto.transport.memory import Faults, MemoryNetwork, MemoryTransport
from simulations.byzantine import (
    EquivocatingService,
    ForgedGenesisService,
    StaleService,
    WithholdingService,
)
from syncnode.history import HistoryPull
from syncnode.peers import PeerSync
from syncnode.reconcile import Reconciler
from syncnode.server import Server
from syncnode.service import Service

BASE_WALL = 1_800_000_000.0
"""Wall-clock seconds at virtual time 0 (any fixed instant works; 2027-01-15)."""

SIM_DEVICE_CONFIG = DeviceConfig(
    reconnect_min=0.1, reconnect_max=4.0, connect_timeout=5.0, mailbox_interval=1.0,
    join_poll_interval=0.5, sync_request_interval=3.0, backfill_interval=10.0,
    holdings_interval=5.0,
    publish_state_every=200, snapshot_every=200)
"""Production defaults, except the periods that would make a run mostly idle virtual time."""

SERVICES: dict[str, type[Service]] = {
    "honest": Service,
    "withhold": WithholdingService,
    "stale": StaleService,
    "corrupt": Service,  # honest code; the network flips bytes of what it sends
    "equivocate": EquivocatingService,
    "forge": ForgedGenesisService,
}
CORRUPTING = Faults(corrupt=0.2, ordered=True)


class SimClock:
    """One machine's wall clock: virtual time plus an offset the simulator can jump."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return BASE_WALL + trio.current_time() + self.offset


@dataclass
class SimNode:
    index: int
    key: SecretKey
    path: Path
    behaviour: str = "honest"
    spare: bool = False
    """Not named by the genesis: a syncnode a replacement may move the document to."""
    used: bool = True
    """Named by some manifest (a spare once a replacement picked it)."""
    retired: bool = False
    """Stopped for good, its database deleted (after the document moved away from it)."""
    wipes: int = 0
    """Times its database was deleted and made again (same key): each is a new incarnation."""
    watched: dict[int, set[bytes]] = field(default_factory=dict)
    """Device index -> incarnations of this node's statements the device kept when it was
    wiped: a device that holds one of another incarnation later must have raised a
    ``syncnode-reset`` (:mod:`simulations.evidence`)."""
    clock: SimClock = field(default_factory=SimClock)
    service: Service | None = None
    transport: MemoryTransport | None = None
    scope: trio.CancelScope | None = None
    stopped: trio.Event | None = None

    @property
    def name(self) -> str:
        return f"n{self.index}"

    @property
    def up(self) -> bool:
        return self.service is not None

    @property
    def honest(self) -> bool:
        return self.behaviour == "honest"

    @property
    def ticket(self) -> NodeTicket:
        return NodeTicket(self.key.public, ())


@dataclass
class SimDevice:
    index: int
    path: Path
    clock: SimClock = field(default_factory=SimClock)
    device: Device | None = None
    doc: Document | None = None
    scope: trio.CancelScope | None = None
    stopped: trio.Event | None = None
    joined: bool = False
    """Has (or had) the document: the founder, or a device whose join completed."""
    joining: bool = False
    """Its join is under way."""
    made: list[str] = field(default_factory=list)
    """Markers of this device's edits, in order, not yet known to be acknowledged."""
    acked: set[str] = field(default_factory=set)
    """Markers acknowledged durable (their updates left the outbox on a quorum's ack)."""
    fingerprint: bytes = b""
    endpoint: bytes = b""
    restart_at: int | None = None
    crashing: bool = False
    """A crash is in progress (a background crash and a crash step may pick one device)."""
    durable_wal: int = 0
    counter: int = 0
    acked_seq: int = 0
    """Every update of this device up to this seq was acknowledged by a quorum."""

    @property
    def name(self) -> str:
        return f"d{self.index}"

    @property
    def up(self) -> bool:
        return self.device is not None

    @property
    def active(self) -> bool:
        return self.doc is not None and self.doc.status == "active"


class World:
    """Nodes and devices of one run. Start/crash/restart are the only ways state changes
    hands; the runner drives the workload and the faults through them."""

    def __init__(self, root: Path, net: MemoryNetwork, nursery: trio.Nursery,
                 config: DeviceConfig = SIM_DEVICE_CONFIG,
                 service_factory: Callable[[SimNode], type[Service]] | None = None) -> None:
        self.root = root
        self.net = net
        self.nursery = nursery
        self.config = config
        self.nodes: list[SimNode] = []
        self.group_id = b""
        self.devices: list[SimDevice] = []
        self.service_factory = service_factory or (lambda n: SERVICES[n.behaviour])

    # -- syncnodes -------------------------------------------------------------------------------

    def add_node(self, behaviour: str = "honest", *, spare: bool = False) -> SimNode:
        i = len(self.nodes)
        node = SimNode(i, SecretKey.generate(), self.root / f"n{i}.db", behaviour,
                       spare=spare, used=not spare)
        self.nodes.append(node)
        return node

    async def start_node(self, node: SimNode) -> None:
        assert not node.up
        service = self.service_factory(node)(node.key, node.path, threads=False,
                                             clock=node.clock)
        transport = self.net.endpoint(node.key.public)
        if node.behaviour == "corrupt":
            self.net.set_node_faults(node.key.public, CORRUPTING)
        peers = PeerSync(service, transport, interval=20.0)
        history = HistoryPull(service, peers)
        reconciler = Reconciler(service, peers, history, interval=10.0)
        node.scope, node.stopped = trio.CancelScope(), trio.Event()
        node.service, node.transport = service, transport
        stopped = node.stopped

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            entropy.set_wall_clock(node.clock)
            try:
                with node.scope:
                    async with trio.open_nursery() as n:
                        await n.start(service.run)
                        await n.start(transport.serve, Server(service).handle_connection)
                        n.start_soon(peers.run)
                        n.start_soon(history.run)
                        n.start_soon(reconciler.run)
                        task_status.started()
            finally:
                stopped.set()

        await self.nursery.start(run)

    async def crash_node(self, node: SimNode) -> None:
        """Stop the node at once: queued writes are lost (nobody was told they were done)."""
        assert node.up and node.scope is not None and node.stopped is not None
        service, transport = node.service, node.transport
        node.service = node.transport = None
        node.scope.cancel()
        await node.stopped.wait()
        assert service is not None and transport is not None
        await transport.aclose()
        await service.store.aclose()  # its writer stopped with the node: nothing is drained

    async def wipe_node(self, node: SimNode) -> None:
        """Crash the node, delete its database, and start it again with the same key: an
        operator who lost the disk and kept only the identity."""
        for dev in self.devices:
            kept = kept_incarnations(dev, node.key.public)
            if kept:
                node.watched.setdefault(dev.index, set()).update(kept)
        if node.up:
            await self.crash_node(node)
        for p in _db_files(node.path.parent, node.path.name):
            p.unlink()
        node.wipes += 1
        await self.start_node(node)

    def held(self, node: SimNode) -> dict[bytes, set[int]]:
        """Sender -> seqs of the document's envelopes the node stores."""
        out: dict[bytes, set[int]] = {}
        if node.retired or not node.path.exists():
            return out
        with closing(sqlite3.connect(f"file:{node.path}?mode=ro", uri=True)) as db:
            for sender, seq in db.execute("SELECT sender, seq FROM envelopes WHERE group_id=?",
                                          (self.group_id,)):
                out.setdefault(sender, set()).add(seq)
        return out

    async def retire_node(self, node: SimNode) -> None:
        """Stop the node for good and delete its database (an operator who left)."""
        if node.up:
            await self.crash_node(node)
        node.retired = True
        for p in _db_files(node.path.parent, node.path.name):
            p.unlink()

    # -- devices ---------------------------------------------------------------------------------

    def add_device(self) -> SimDevice:
        i = len(self.devices)
        dev = SimDevice(i, self.root / f"d{i}")
        self.devices.append(dev)
        return dev

    async def start_device(self, dev: SimDevice) -> None:
        assert not dev.up
        dev.scope, dev.stopped = trio.CancelScope(), trio.Event()
        scope, stopped = dev.scope, dev.stopped
        started = trio.Event()

        def endpoint(key: SecretKey) -> MemoryTransport:
            return self.net.endpoint(key.public)

        async def run() -> None:
            entropy.set_wall_clock(dev.clock)
            try:
                with scope:
                    async with Device.open(dev.path, config=self.config,
                                           transport=endpoint) as device:
                        device.store.db.execute("PRAGMA wal_autocheckpoint=0")
                        wal = dev.path / "device.db-wal"
                        dev.durable_wal = _size(wal)

                        def committed(durable: bool) -> None:
                            if durable:
                                dev.durable_wal = _size(wal)

                        device.store.on_commit = committed
                        device.store.sync_in_thread = False
                        device.store.on_sync = lambda: committed(True)
                        dev.device = device
                        dev.fingerprint, dev.endpoint = device.fingerprint, device.endpoint_id
                        docs = device.documents()
                        dev.doc = docs[0] if docs else None
                        started.set()
                        await trio.sleep_forever()
            finally:
                dev.device = dev.doc = None
                started.set()
                stopped.set()

        self.nursery.start_soon(run)
        await started.wait()

    async def crash_device(self, dev: SimDevice, *, power_loss: bool) -> None:
        """Kill the device. Its files are put back as they were at this instant (with
        ``power_loss``: without the WAL frames written since the last fsync)."""
        assert dev.up and dev.scope is not None and dev.stopped is not None
        if dev.crashing:
            return
        dev.crashing = True
        try:
            await self._crash_device(dev, power_loss=power_loss)
        finally:
            dev.crashing = False

    async def _crash_device(self, dev: SimDevice, *, power_loss: bool) -> None:
        assert dev.scope is not None and dev.stopped is not None
        files = {p: p.read_bytes() for p in _db_files(dev.path)}
        wal = dev.path / "device.db-wal"
        if power_loss and wal in files:
            files[wal] = files[wal][:dev.durable_wal]
            for node in self.nodes:  # its kept statements (not fsynced) may be lost
                node.watched.pop(dev.index, None)
        dev.scope.cancel()
        await dev.stopped.wait()
        for p in _db_files(dev.path):
            p.unlink()
        for p, data in files.items():
            if not p.name.endswith("-shm"):
                p.write_bytes(data)

    # -- observation -----------------------------------------------------------------------------

    def node_log(self, node: SimNode) -> dict[int, tuple[bytes, bytes | None]]:
        """Slot -> (value, certificate) stored by the node (read from its database)."""
        if node.retired:
            return {}
        with closing(sqlite3.connect(f"file:{node.path}?mode=ro", uri=True)) as db:
            return {s: (v, c) for s, v, c in
                    db.execute("SELECT slot, value, certificate FROM decided")}

    def node_envelopes(self, node: SimNode) -> list[Envelope]:
        if node.retired:
            return []
        with closing(sqlite3.connect(f"file:{node.path}?mode=ro", uri=True)) as db:
            return [decode_as(raw, Envelope) for (raw,) in db.execute(
                "SELECT envelope FROM envelopes WHERE group_id=?", (self.group_id,))]

    def node_compaction(self, node: SimNode) -> tuple[bytes | None, bytes | None]:
        """The compaction point the node applied, and the one its newest manifest holds."""
        if node.retired:
            return None, None
        with closing(sqlite3.connect(f"file:{node.path}?mode=ro", uri=True)) as db:
            row = db.execute("SELECT point FROM compactions WHERE group_id=?",
                             (self.group_id,)).fetchone()
            top = db.execute("SELECT value FROM decided WHERE group_id=? ORDER BY slot DESC "
                             "LIMIT 1", (self.group_id,)).fetchone()
        decided = None if top is None else LogValue.decode(top[0]).manifest.compaction
        return (None if row is None else row[0]), decided

    def node_bytes(self, node: SimNode) -> bytes:
        return b"".join(p.read_bytes() for p in _db_files(node.path.parent, node.path.name))

    def members(self) -> list[SimDevice]:
        return [d for d in self.devices if d.active]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _db_files(directory: Path, name: str = "device.db") -> list[Path]:
    return [p for p in (directory / name, directory / f"{name}-wal", directory / f"{name}-shm")
            if p.exists()]


def kept_incarnations(dev: SimDevice, node_id: bytes) -> set[bytes]:
    """Incarnations of the statements of ``node_id`` that ``dev``'s witness keeps now."""
    if dev.doc is None:
        return set()
    w = dev.doc.witness
    return {k[1].incarnation for k in (w.acks.get(node_id), w.heads.get(node_id)) if k}
