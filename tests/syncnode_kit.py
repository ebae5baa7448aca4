"""Helpers to build real groups (real MLS commits, real signatures) and syncnode clusters."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from device.mls import Member
from device.paxos_driver import propose
from proto.codec import encode_struct
from proto.identity import SecretKey
from proto.manifest import (
    DeviceEntry,
    LogValue,
    Manifest,
    Role,
    SyncnodeEntry,
    genesis,
    next_manifest,
    sign_value,
)
from proto.paxos.messages import (
    ACCEPT_CTX,
    PREPARE_CTX,
    Accept,
    AcceptBody,
    Ballot,
    Decided,
    Prepare,
    PrepareBody,
    value_hash,
)
from proto.paxos.proposer import Outcome
from proto.rpc import SyncnodeClient
from proto.ticket import NodeTicket
from proto.transport.base import Transport
from proto.transport.memory import MemoryNetwork
from syncnode.config import Limits
from syncnode.peers import PeerSync
from syncnode.procs import NodeProcess
from syncnode.server import Server
from syncnode.service import Service


class Device:
    """A test device: an MLS member plus its manifest entry data."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.mls = Member(name.encode())
        self.key = self.mls.key
        self.endpoint = SecretKey.generate().public

    def entry(self, role: Role = Role.WRITER) -> DeviceEntry:
        return DeviceEntry(self.key_fpr, self.key.public, self.endpoint, 0, role)

    @property
    def key_fpr(self) -> bytes:
        from proto.identity import fingerprint

        return fingerprint(self.key.public)


@dataclass
class Group:
    """A group's log as seen by the test: genesis plus decided values."""

    group_id: bytes
    creator: Device
    values: list[LogValue] = field(default_factory=list)

    @property
    def manifest(self) -> Manifest:
        return self.values[-1].manifest

    @property
    def next_slot(self) -> int:
        return len(self.values)


def new_group(creator: Device, syncnodes: Sequence[SyncnodeEntry]) -> Group:
    gid = secrets.token_bytes(32)
    creator.mls.create_group(gid)
    g = Group(gid, creator)
    g.values.append(genesis(creator.key, gid, creator.endpoint, tuple(syncnodes), "loro"))
    return g


def add_value(g: Group, committer: Device, joiners: Sequence[Device],
              role: Role = Role.WRITER) -> LogValue:
    commit, welcome = committer.mls.add([d.mls.key_package() for d in joiners])
    m = next_manifest(g.manifest, commit, add=tuple(d.entry(role) for d in joiners))
    return sign_value(committer.key, m, commit, welcome)


def remove_value(g: Group, committer: Device, leaving: Sequence[Device]) -> LogValue:
    commit = committer.mls.remove([d.mls for d in leaving])
    m = next_manifest(g.manifest, commit, remove=tuple(d.key_fpr for d in leaving))
    return sign_value(committer.key, m, commit)


def update_value(g: Group, committer: Device) -> LogValue:
    commit = committer.mls.update()
    return sign_value(committer.key, next_manifest(g.manifest, commit), commit)


def signed_prepare(device: Device, group_id: bytes, slot: int, rnd: int) -> Prepare:
    """A Prepare at round ``rnd`` signed by ``device`` (tests pick rounds themselves)."""
    ballot = Ballot(rnd, device.key_fpr)
    body = PrepareBody(group_id, slot, ballot)
    return Prepare(group_id, slot, ballot, device.key.sign(PREPARE_CTX, encode_struct(body)))


def signed_accept(device: Device, group_id: bytes, slot: int, rnd: int, value: bytes) -> Accept:
    ballot = Ballot(rnd, device.key_fpr)
    body = AcceptBody(group_id, slot, ballot, value_hash(value))
    return Accept(group_id, slot, ballot, value, device.key.sign(ACCEPT_CTX, encode_struct(body)))


async def found_group(syncnodes: Sequence[SyncnodeEntry], clients: Sequence[SyncnodeClient],
                      creator: Device, members: Sequence[Device] = ()) -> Group:
    """Register a new group of ``syncnodes`` through ``clients`` (one per syncnode) and, if
    ``members`` are given, decide slot 1 adding them; the MLS state of creator and members
    follows the decision."""
    g = new_group(creator, syncnodes)
    for c in clients:
        assert (await c.register_group(g.values[0])).created
    if members:
        value = add_value(g, creator, list(members))
        assert isinstance(await decide(g, creator, clients, value), Decided)
        creator.mls.apply(value.commit)
        for m in members:
            m.mls.join(value.welcome)
    return g


async def decide(g: Group, proposer: Device, clients: Sequence[SyncnodeClient],
                 value: LogValue) -> Outcome:
    """Run Paxos for the group's next slot; on success record the value in ``g`` (applying the
    commit to MLS members is the caller's business)."""
    outcome = await propose(proposer.key, clients, g.group_id, g.next_slot, value.encode(),
                            g.manifest.acceptors())
    if isinstance(outcome, Decided):
        g.values.append(value)
    return outcome


@dataclass
class Node:
    key: SecretKey
    path: Path
    service: Service
    transport: Transport
    scope: trio.CancelScope
    peers: PeerSync

    @property
    def entry(self) -> SyncnodeEntry:
        return SyncnodeEntry(self.key.public, ())

    @property
    def ticket(self) -> NodeTicket:
        return NodeTicket(self.key.public, ())


class MemoryCluster:
    """Syncnodes in this process on the in-memory transport (real SQLite in ``tmp``)."""

    def __init__(self, net: MemoryNetwork, nursery: trio.Nursery, tmp: Path,
                 limits: Limits | None = None) -> None:
        self.net = net
        self.nursery = nursery
        self.tmp = tmp
        self.limits = limits
        self.nodes: list[Node] = []

    async def start_node(self, key: SecretKey | None = None, *, cache_groups: int = 1024,
                         cache_slots: int = 4096, service_class: type[Service] = Service
                         ) -> Node:
        """Start a node (``service_class``: a Byzantine :class:`Service` subclass, say)."""
        key = key or SecretKey.generate()
        path = self.tmp / f"{key.public.hex()[:8]}.db"
        service = service_class(key, path, limits=self.limits, cache_groups=cache_groups,
                                cache_slots=cache_slots)
        transport = self.net.endpoint(key.public)
        scope = trio.CancelScope()
        peers = PeerSync(service, transport, interval=3600)

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                async with trio.open_nursery() as n:
                    await n.start(service.run)
                    await n.start(transport.serve, Server(service).handle_connection)
                    task_status.started()
            await transport.aclose()

        await self.nursery.start(run)
        node = Node(key, path, service, transport, scope, peers)
        self.nodes.append(node)
        return node

    async def stop_node(self, node: Node) -> None:
        """Stop serving, drain writes, close the database (like a clean shutdown)."""
        await node.service.aclose()
        node.scope.cancel()
        await node.transport.aclose()
        self.net._listeners.pop(node.key.public, None)
        self.nodes.remove(node)

    @asynccontextmanager
    async def clients(self, device: Device | None = None, nodes: Sequence[Node] | None = None
                      ) -> AsyncIterator[list[SyncnodeClient]]:
        """Connections from a fresh endpoint to ``nodes``, authenticated as ``device``."""
        me = self.net.endpoint(SecretKey.generate().public)
        async with AsyncExitStack() as stack:
            out = []
            for node in nodes if nodes is not None else self.nodes:
                c = await stack.enter_async_context(SyncnodeClient.connect(me, node.ticket))
                if device is not None:
                    await c.authenticate(device.key)
                out.append(c)
            yield out


def restart_on_new_port(node: NodeProcess) -> None:
    """Stop a real ``syncnode run`` (SIGINT) and start it again on a UDP port it never had:
    a syncnode that moved, with the same identity."""
    import socket

    node.interrupt()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        node.listen = f"127.0.0.1:{s.getsockname()[1]}"
    node.start()
