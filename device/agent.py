"""The device agent library: what an app embeds.

    async with Device.open("~/.local/share/myapp/device") as device:
        doc = await device.create_document(syncnodes=["sn1...", "sn1...", "sn1..."])
        doc.change(lambda e: e.text("notes").insert(0, "hello"))
        await doc.wait_durable()

A :class:`Device` owns one local store (identity keys, MLS state, documents), one iroh endpoint,
and the background tasks of its documents. Everything is async under trio; edits apply locally
and immediately, also offline, and are delivered whenever syncnodes are reachable.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import msgpack
import trio

from device.document import Document, DocumentError
from device.mls import DEFAULT_EPOCH_RETENTION, MlsClient, SqliteGroupStorage, new_signature_key
from device.p2p import PeerServer, Progress, TransferError, fetch_snapshot
from device.store import Store
from proto import entropy
from proto.codec import encode
from proto.crdt import CrdtError
from proto.errors import DecodeError, SyncnodeError, TransportError
from proto.groups import single_errors
from proto.identity import SecretKey, fingerprint, short_id
from proto.invite import InviteTicket, JoinRequest
from proto.logs import get_logger
from proto.manifest import (
    LogValue,
    ManifestError,
    SyncnodeEntry,
    genesis,
    validate_genesis,
    verify_decided,
)
from proto.paxos.messages import Decided
from proto.paxos.quorum import CertificateError
from proto.rpc import RemoteError, SyncnodeClient
from proto.service import MailboxKind
from proto.ticket import NodeTicket
from proto.transport.base import Transport
from proto.transport.iroh import IrohTransport

log = get_logger("device.agent")


@dataclass(frozen=True)
class DeviceConfig:
    flush_interval: float = 0.0
    """Extra minimum spacing of two updates of one document (edits in between are coalesced).
    Usually unnecessary: waiting for the previous update's quorum ack already batches."""
    coalesce_max: float = 0.25
    """While our last update waits for its quorum acknowledgement (at most this long), new
    edits are coalesced into the next update."""
    epoch_retention: int = DEFAULT_EPOCH_RETENTION
    """Past MLS epochs whose secrets are kept, so late messages of those epochs decrypt."""
    snapshot_every: int = 2000
    publish_state_every: int = 5000
    """After this many edit updates with no whole-document state seen on the syncnodes, this
    device stores one there (encrypted), so new devices can load it with no member online."""
    """Stored CRDT updates are folded into one snapshot after this many."""
    connect_timeout: float = 10.0
    reconnect_min: float = 0.2
    reconnect_max: float = 10.0
    propose_attempts: int = 12
    propose_backoff: float = 0.02
    rebase_attempts: int = 8
    max_in_flight: int = 256
    mailbox_interval: float = 1.0
    """How often a device with open invites checks the mailbox for join requests."""
    fast_poll_interval: float = 0.02
    fast_poll_window: float = 120.0
    """For this long after making an invite (inviter) or starting a join (new device), poll
    every ``fast_poll_interval`` instead: an interactive join completes in a fraction of a
    second, without polling the syncnodes that often the rest of the time."""
    sync_request_interval: float = 3.0
    backfill_interval: float = 30.0
    """Safety net: re-ask each syncnode for envelopes past our watermarks this often (covers a
    push lost on the way; normally finds nothing)."""
    join_poll_interval: float = 1.0
    p2p_state_transfer: bool = True
    """On join, fetch the document directly from the inviter (else only via the syncnodes)."""
    listen: str = "127.0.0.1:0"
    relays: tuple[str, ...] = ()
    """iroh relay URLs; empty for direct connections only."""


class JoinError(SyncnodeError):
    """The join could not complete (bad or expired ticket, no syncnode reachable, timeout)."""


class Device:
    """One device: identity, local store, iroh endpoint, documents. Use :meth:`open`."""

    def __init__(self, store: Store, transport: Transport, config: DeviceConfig,
                 nursery: trio.Nursery) -> None:
        self.store = store
        self.transport = transport
        self.config = config
        self.nursery = nursery
        secret = store.get_meta("mls_secret")
        public = store.get_meta("mls_public")
        assert secret is not None and public is not None
        self.key = SecretKey(secret[:32])
        self.fingerprint = fingerprint(public)
        self.mls = MlsClient(public, secret, SqliteGroupStorage(store.db, config.epoch_retention))
        self._docs: dict[bytes, Document] = {}
        self._scopes: dict[bytes, trio.CancelScope] = {}

    @classmethod
    @asynccontextmanager
    async def open(cls, path: str | os.PathLike[str], *, config: DeviceConfig | None = None,
                   transport: Callable[[SecretKey], Transport] | None = None
                   ) -> AsyncIterator[Device]:
        """Open (creating on first use) the device stored in directory ``path``.

        ``transport`` makes the endpoint from the device's endpoint key instead of binding iroh
        (tests and the simulator pass an in-memory network's ``endpoint``)."""
        config = config or DeviceConfig()
        store = _open_store(path)
        try:
            endpoint_key = init_identity(store)
            async with AsyncExitStack() as stack:
                if transport is None:
                    endpoint: Transport = await _bind(store, endpoint_key, config)
                else:
                    endpoint = transport(endpoint_key)
                stack.push_async_callback(endpoint.aclose)
                async with trio.open_nursery() as nursery:
                    device = cls(store, endpoint, config, nursery)
                    await nursery.start(endpoint.serve, PeerServer(device).handle_connection)
                    for (gid,) in store.all("SELECT group_id FROM documents ORDER BY created_at"):
                        device._start(Document(device, gid))
                    try:
                        yield device
                    finally:
                        nursery.cancel_scope.cancel()
        finally:
            store.close()

    @property
    def id(self) -> str:
        return short_id(self.fingerprint)

    @property
    def endpoint_id(self) -> bytes:
        return self.transport.node_id

    def addresses(self) -> tuple[str, ...]:
        """Where other devices can reach this one directly (dialling hints)."""
        return tuple(self.transport.addresses()[:8])

    def documents(self) -> list[Document]:
        return list(self._docs.values())

    def document(self, ref: str) -> Document:
        """A document by name or by (a prefix of) its id."""
        ref = ref.lower()
        found = [d for d in self._docs.values() if d.name == ref] or \
            [d for d in self._docs.values() if d.id.startswith(ref)]
        if len(found) != 1:
            raise DocumentError(f"{'no' if not found else 'more than one'} document matches "
                                f"{ref!r}")
        return found[0]

    def _start(self, doc: Document) -> None:
        self._docs[doc.group_id] = doc
        scope = trio.CancelScope()
        self._scopes[doc.group_id] = scope

        async def run() -> None:
            with scope:
                try:
                    await doc.run()
                except* SyncnodeError as group:  # one broken document must not stop the others
                    log.error("document stopped", doc=short_id(doc.group_id),
                              error="; ".join(str(e) for e in group.exceptions))

        self.nursery.start_soon(run)

    async def create_document(self, syncnodes: Sequence[str | NodeTicket], crdt: str = "loro",
                              name: str = "") -> Document:
        """A new document served by ``syncnodes`` (tickets). Works offline: the syncnodes
        learn about it when they are reachable."""
        if not syncnodes:
            raise DocumentError("a document needs at least one syncnode")
        tickets = [t if isinstance(t, NodeTicket) else NodeTicket.parse(t) for t in syncnodes]
        entries = tuple(SyncnodeEntry(t.node_id, t.addrs) for t in tickets)
        if crdt != "loro":
            raise DocumentError(f"unknown CRDT backend {crdt!r} (available: loro)")
        gid = entropy.token_bytes(32)
        group = self.mls.create_group(gid)
        g = genesis(self.key, gid, self.endpoint_id, entries, crdt, self.addresses())
        with self.store.transaction() as db:
            group.persist()
            _insert_document(db, gid, name or gid.hex()[:8], crdt, 0)
            db.execute("INSERT INTO log VALUES (?,?,?,?)", (gid, 0, g.encode(), None))
        doc = Document(self, gid)
        self._start(doc)
        log.info("document created", doc=short_id(gid), syncnodes=len(entries))
        return doc

    async def join(self, ticket: str, *, name: str = "", timeout: float = 600.0,
                   progress: Callable[[str], None] | None = None,
                   on_progress: Callable[[Progress], None] | None = None) -> Document:
        """Join a document with an invite ticket from a member.

        Sends our KeyPackage, sealed to the inviter, through the syncnodes' mailbox; waits
        until the inviter's add is decided (the inviter may come online later); joins the MLS
        group from the Welcome in the decided log (after verifying the whole log); then asks the
        inviter for the current state directly (peer to peer, resumable, verified against the
        inviter's signature); if that fails, members send it through the syncnodes. ``progress``
        gets human-readable steps, ``on_progress`` the bytes received. This process must stay up
        until it returns: the KeyPackage's private key lives only in memory.
        """
        say = progress or (lambda _msg: None)
        try:
            t = InviteTicket.parse(ticket)
        except DecodeError as exc:
            raise JoinError(f"bad invite ticket: {exc}") from None
        if t.expires_at < entropy.wall():
            raise JoinError("the invite ticket has expired")
        if t.group_id in self._docs:
            raise JoinError("this device is already a member of that document")
        key_package = self.mls.key_package()
        request = JoinRequest(t.group_id, t.secret, key_package, self.key.public,
                              self.endpoint_id, self.addresses()).seal(t.inviter)
        with trio.fail_after(timeout):
            async with self._connect_all(t.syncnodes) as clients:
                ttl = int(max(60, t.expires_at - entropy.wall()))
                posted: list[bytes] = []

                async def post(c: SyncnodeClient) -> None:
                    try:
                        await c.mailbox_put(t.inviter, MailboxKind.KEY_PACKAGE, request, ttl)
                        posted.append(c.node_id)
                    except SyncnodeError as exc:  # the others may still take it
                        log.info("join request not stored", node=short_id(c.node_id),
                                 error=str(exc))

                async with trio.open_nursery() as nursery:
                    for c in clients:
                        nursery.start_soon(post, c)
                if not posted:
                    raise JoinError("no syncnode stored the join request")
                say(f"join request sent to {len(posted)} syncnode(s); waiting for the "
                    "inviter to add this device")
                slot, values, decided = await self._await_welcome(clients, t)
        welcome = values[slot].welcome
        assert welcome is not None
        group = self.mls.join(welcome)
        with self.store.transaction() as db:
            group.persist()
            _insert_document(db, t.group_id, name or t.group_id.hex()[:8],
                             values[0].manifest.crdt_type, slot)
            for s in range(slot + 1):
                db.execute("INSERT INTO log VALUES (?,?,?,?)",
                           (t.group_id, s, values[s].encode(),
                            encode(decided[s]) if s else None))
        doc = Document(self, t.group_id)
        say(f"joined at epoch {slot}; fetching the document from a member")
        await self._initial_state(doc, t, say, on_progress)
        self._start(doc)
        log.info("joined document", doc=short_id(t.group_id), epoch=slot)
        return doc

    async def _initial_state(self, doc: Document, t: InviteTicket, say: Callable[[str], None],
                             on_progress: Callable[[Progress], None] | None) -> None:
        """Load the document peer to peer from the inviter (one resume after an interruption).
        If that fails, the members answer our state request through the syncnodes instead."""
        if self.config.p2p_state_transfer:
            sources = [(t.inviter_endpoint, t.inviter_addrs)] + [
                (d.endpoint_id, d.addrs) for d in doc.manifest.devices
                if d.fingerprint != self.fingerprint and d.endpoint_id != t.inviter_endpoint]
            for endpoint, addrs in sources:
                if await self._fetch_from(doc, endpoint, addrs, say, on_progress):
                    return
        say("asking members for the document via the syncnodes")
        doc._missing = True

    async def _fetch_from(self, doc: Document, endpoint: bytes, addrs: tuple[str, ...],
                          say: Callable[[str], None],
                          on_progress: Callable[[Progress], None] | None) -> bool:
        """One member as the source; an interrupted transfer is resumed once."""
        partial: dict[bytes, bytearray] = {}
        for attempt in range(2):
            try:
                data, body = await fetch_snapshot(self.transport, endpoint, addrs, doc.manifest,
                                                  progress=on_progress, partial=partial,
                                                  timeout=self.config.connect_timeout)
                if body.backend != doc.crdt.backend_id:
                    raise TransferError(f"snapshot of backend {body.backend!r}")
                doc.load_state(data, {d.sender: d.seq for d in body.covers})
                say(f"received the document peer to peer from {short_id(endpoint)} "
                    f"({len(data)} bytes)")
                return True
            except (TransferError, CrdtError) as exc:
                log.info("peer-to-peer state transfer failed", source=short_id(endpoint),
                         attempt=attempt + 1, error=str(exc))
                if not partial:
                    break
        return False

    @asynccontextmanager
    async def _connect_all(self, entries: Sequence[SyncnodeEntry]
                           ) -> AsyncIterator[list[SyncnodeClient]]:
        """Authenticated connections to every reachable syncnode, dialled in parallel."""
        clients: list[SyncnodeClient] = []
        untried = len(entries)
        all_tried, release = trio.Event(), trio.Event()

        def tried() -> None:
            nonlocal untried
            untried -= 1
            if untried == 0:
                all_tried.set()

        async def hold(e: SyncnodeEntry) -> None:
            try:
                async with SyncnodeClient.connect(self.transport, NodeTicket(e.node_id, e.addrs),
                                                  timeout=self.config.connect_timeout) as c:
                    await c.authenticate(self.key)
                    clients.append(c)
                    tried()
                    await release.wait()  # keep the connection until the join is done
            except SyncnodeError as exc:  # unreachable, or a faulty syncnode
                log.info("syncnode unreachable", node=short_id(e.node_id), error=str(exc))
                tried()

        with single_errors():  # a JoinError of the caller's block comes out as itself
            async with trio.open_nursery() as nursery:
                for e in entries:
                    nursery.start_soon(hold, e)
                await all_tried.wait()
                if clients:
                    try:
                        yield clients
                    finally:
                        release.set()
        if not clients:
            raise JoinError("none of the document's syncnodes is reachable")

    async def _await_welcome(self, clients: list[SyncnodeClient], t: InviteTicket
                             ) -> tuple[int, dict[int, LogValue], dict[int, Decided]]:
        """Poll the decided log until a verified slot adds this device. What was verified
        stays verified: each poll reads only the slots after it (re-verifying the whole log
        at every poll cost the simulator most of its time)."""
        started = trio.current_time()
        values: dict[int, LogValue] = {}
        decided: dict[int, Decided] = {}
        while True:
            for c in clients:
                try:
                    found = await self._scan_log(c, t, values, decided)
                except (TransportError, RemoteError, DecodeError, CertificateError,
                        ManifestError) as exc:  # a bad or unreachable syncnode: try the others
                    log.info("cannot read the decided log", node=short_id(c.node_id),
                             error=str(exc))
                    continue
                if found is not None:
                    return found, values, decided
            fast = trio.current_time() - started < self.config.fast_poll_window
            await trio.sleep(self.config.fast_poll_interval if fast
                             else self.config.join_poll_interval)

    async def _scan_log(self, c: SyncnodeClient, t: InviteTicket, values: dict[int, LogValue],
                        decided: dict[int, Decided]) -> int | None:
        """Extend the verified log (``values``, ``decided``) from ``c``; the slot that adds
        this device, once there is one."""
        slot = len(values)
        while True:
            page = await c.fetch_decided(t.group_id, slot)
            if slot == 0:
                if page.genesis is None:
                    return None
                g = LogValue.decode(page.genesis)
                validate_genesis(t.group_id, g)
                values[0] = g
                slot = 1
            for d in page.decided:
                s = d.certificate.slot
                if s != slot:
                    break
                values[s] = verify_decided(values[s - 1].manifest, d.value, d.certificate)
                decided[s] = d
                if values[s].manifest.device(self.fingerprint) is not None \
                        and values[s].welcome is not None:
                    return s
                slot += 1
            if not page.decided or slot > page.top:
                return None


async def _bind(store: Store, key: SecretKey, config: DeviceConfig) -> Transport:
    """Bind iroh, reusing the port of the previous run when ``listen`` asks for any port, so
    the addresses other members hold for this device (manifest hints) stay valid."""
    host, _, port = config.listen.rpartition(":")
    saved = store.get_meta("listen_port")
    if saved and port == "0":
        try:
            return await IrohTransport.bind(key, listen=f"{host}:{int(saved)}",
                                            relays=list(config.relays))
        except TransportError as exc:
            log.info("previous port is taken; binding a new one", port=int(saved),
                     error=str(exc))
    t = await IrohTransport.bind(key, listen=config.listen, relays=list(config.relays))
    v6 = host.startswith("[") or ":" in host
    same_family = [a for a in t.addresses() if a.startswith("[") == v6]
    if same_family:
        with store.transaction():
            store.set_meta("listen_port", same_family[0].rpartition(":")[2].encode())
    return t


def _open_store(path: str | os.PathLike[str]) -> Store:
    return Store(Path(os.path.expanduser(os.fspath(path))))


def _insert_document(db: sqlite3.Connection, gid: bytes, name: str, crdt: str,
                     epoch: int) -> None:
    db.execute("INSERT INTO documents VALUES (?,?,?,?,?,?,?,?,?,?)",
               (gid, name, crdt, entropy.randbits(63), epoch, epoch, 1, msgpack.packb({}),
                "active", entropy.wall()))


def init_identity(store: Store) -> SecretKey:
    """Create the device's keys on first use; returns the iroh endpoint key."""
    if store.get_meta("mls_secret") is None:
        public, secret = new_signature_key()
        with store.transaction():
            store.set_meta("mls_public", public)
            store.set_meta("mls_secret", secret)
            store.set_meta("endpoint_seed", SecretKey.generate().seed)
    seed = store.get_meta("endpoint_seed")
    assert seed is not None
    return SecretKey(seed)


__all__ = ["Device", "DeviceConfig", "Document", "JoinError"]
