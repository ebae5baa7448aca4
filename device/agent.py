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

import contextvars
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import msgpack
import trio

from device import group_docs, joining
from device.config import DeviceConfig
from device.document import Document
from device.errors import DocumentError, JoinError
from device.mls import MlsClient, SqliteGroupStorage, new_signature_key
from device.p2p import PeerServer, Progress
from device.replica import insert_document
from device.rules import address_is_news
from device.store import Store
from proto import entropy
from proto.address import AddressRecord
from proto.errors import DecodeError, SyncnodeError, TransportError
from proto.identity import SecretKey, fingerprint, short_id
from proto.logs import get_logger
from proto.manifest import ManifestError, SyncnodeEntry, genesis, validate_genesis
from proto.ticket import NodeTicket, preferred, same_family
from proto.transport.base import Transport
from proto.transport.iroh import IrohTransport

log = get_logger("device.agent")


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
        self.offers = group_docs.Offers(self)
        """Documents offered to us through a group, joined in the background."""
        self._context = contextvars.copy_context()
        """The context the device was opened in: its background tasks run in it, whoever
        started them (in the simulator it holds the device's own wall clock)."""

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
                        device.start_document(Document(device, gid))
                    device.spawn(device.offers.run)
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
        """Where other devices can reach this one directly (dialling hints): those of the
        ``listen`` address's IP family (:func:`proto.ticket.same_family`)."""
        host = self.config.listen.rpartition(":")[0]
        return tuple(same_family(self.transport.addresses(), host)[:8])

    def set_syncnode_address(self, ticket: str | NodeTicket) -> list[Document]:
        """Dial the syncnode of ``ticket`` at the ticket's addresses from now on, in every
        document that names it (for a syncnode that moved: the node id, which authenticates
        it, stays the same). Returns the documents concerned; links reconnect at once."""
        try:
            t = ticket if isinstance(ticket, NodeTicket) else NodeTicket.parse(ticket)
        except DecodeError as exc:
            raise DocumentError(f"bad syncnode ticket: {exc}") from None
        docs = [d for d in self._docs.values()
                if any(e.node_id == t.node_id for e in d.manifest.syncnodes)]
        if not docs:
            raise DocumentError(f"no document of this device uses syncnode {short_id(t.node_id)}")
        with self.store.transaction() as db:
            db.execute("INSERT OR REPLACE INTO syncnode_addrs VALUES (?,?,?)",
                       (t.node_id, msgpack.packb(list(t.addrs)), entropy.wall()))
        for d in docs:
            d.relink(t.node_id)
        return docs

    def learn_address(self, record: AddressRecord) -> bool:
        """Keep a verified address record if it is newer than what this device holds for that
        syncnode (set by hand or learned); True if the addresses changed."""
        body = record.body
        row = self.store.one("SELECT addrs, at FROM syncnode_addrs WHERE node_id=?",
                             body.node_id)
        held = (row[1], tuple(msgpack.unpackb(row[0]))) if row is not None else None
        if not address_is_news(held, body.issued_at, body.addrs):
            return False
        with self.store.transaction() as db:
            db.execute("INSERT OR REPLACE INTO syncnode_addrs VALUES (?,?,?)",
                       (body.node_id, msgpack.packb(list(body.addrs)), body.issued_at))
        return True

    def syncnode_ticket(self, ticket: NodeTicket) -> NodeTicket:
        """``ticket`` with the addresses set by hand for its node, if any (tried first, then
        the manifest's)."""
        row = self.store.one("SELECT addrs FROM syncnode_addrs WHERE node_id=?", ticket.node_id)
        if row is None:
            return ticket
        return NodeTicket(ticket.node_id, preferred(msgpack.unpackb(row[0]), ticket.addrs))

    def documents(self) -> list[Document]:
        return list(self._docs.values())

    def document_for(self, group_id: bytes) -> Document | None:
        """The document of this group, if this device has it."""
        return self._docs.get(group_id)

    def document(self, ref: str) -> Document:
        """A document by name or by (a prefix of) its id."""
        ref = ref.lower()
        found = [d for d in self._docs.values() if d.name == ref] or \
            [d for d in self._docs.values() if d.id.startswith(ref)]
        if len(found) != 1:
            raise DocumentError(f"{'no' if not found else 'more than one'} document matches "
                                f"{ref!r}")
        return found[0]

    def start_document(self, doc: Document) -> None:
        """Run ``doc``'s background work under this device (until it closes)."""
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

        self.spawn(run)

    def free_name(self, wanted: str, group_id: bytes) -> str:
        """``wanted`` (or the id's first 8 hex digits) if no other document has that name,
        else with the id's first 4 hex digits appended (a joined document keeps its
        inviter's name unless it clashes with one here)."""
        name = wanted or group_id.hex()[:8]
        if any(d.name == name for d in self._docs.values()):
            name = f"{name}-{group_id.hex()[:4]}"
        return name

    def spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        """Start a background task of this device (in the device's own context)."""
        self._context.run(self.nursery.start_soon, fn, *args)

    def offer_arrived(self) -> None:
        """A document was offered to us through a group (:mod:`device.group_docs`)."""
        self.offers.wake()

    async def create_document(self, syncnodes: Sequence[str | NodeTicket] = (),
                              crdt: str = "loro", name: str = "", *,
                              from_group: Document | None = None) -> Document:
        """A new document served by ``syncnodes`` (tickets). Works offline: the syncnodes
        learn about it when they are reachable.

        ``from_group``: a document of which this device is an admin; the new one gets its
        members and roles (and, by default, its syncnodes). Its members join by themselves,
        through ``from_group``'s group, whenever they and this device are online
        (:mod:`device.group_docs`)."""
        if from_group is not None:
            return await group_docs.create_from_group(self, from_group, syncnodes, crdt, name)
        if not syncnodes:
            raise DocumentError("a document needs at least one syncnode")
        try:
            tickets = [t if isinstance(t, NodeTicket) else NodeTicket.parse(t)
                       for t in syncnodes]
        except DecodeError as exc:
            raise DocumentError(f"bad syncnode ticket: {exc}") from None
        ids = [t.node_id for t in tickets]
        if len(set(ids)) != len(ids):
            twice = sorted({short_id(n) for n in ids if ids.count(n) > 1})
            raise DocumentError(f"syncnode {', '.join(twice)} is named more than once; each "
                                "syncnode counts once toward a quorum")
        entries = tuple(SyncnodeEntry(t.node_id, t.addrs) for t in tickets)
        if crdt != "loro":
            raise DocumentError(f"unknown CRDT backend {crdt!r} (available: loro)")
        if name and any(d.name == name for d in self._docs.values()):
            raise DocumentError(f"a document named {name!r} exists already; choose another name")
        gid = entropy.token_bytes(32)
        g = genesis(self.key, gid, self.endpoint_id, entries, crdt, self.addresses())
        try:  # the syncnodes check the same rules: a genesis they refuse is refused here
            validate_genesis(gid, g)
        except ManifestError as exc:
            raise DocumentError(f"cannot create this document: {exc}") from None
        group = self.mls.create_group(gid)
        with self.store.transaction() as db:
            group.persist()
            insert_document(db, gid, name or gid.hex()[:8], crdt, 0)
            db.execute("INSERT INTO log VALUES (?,?,?,?)", (gid, 0, g.encode(), None))
        doc = Document(self, gid)
        self.start_document(doc)
        log.info("document created", doc=short_id(gid), syncnodes=len(entries))
        return doc

    async def join(self, ticket: str, *, name: str = "", timeout: float = 600.0,
                   progress: Callable[[str], None] | None = None,
                   on_progress: Callable[[Progress], None] | None = None) -> Document:
        """Join a document with an invite ticket from a member; returns once this device is a
        member **and** holds the document's content (steps in :mod:`device.joining`).

        ``progress`` gets human-readable steps, ``on_progress`` the bytes of a direct
        transfer. Raises :class:`JoinError` for a bad, spent or expired ticket (the inviter's
        refusal arrives within seconds when it is online), when no syncnode is reachable, and
        at ``timeout`` (saying what it was waiting for). This process must stay up until it
        returns: the KeyPackage's private key lives only in memory.
        """
        return await joining.join(self, ticket, name=name, timeout=timeout,
                                  say=progress or (lambda _msg: None), on_progress=on_progress)


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
