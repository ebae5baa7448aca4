"""The new device's side of joining (DESIGN.md "Join"), driven by :meth:`Device.join`.

1. Leave our KeyPackage, sealed to the inviter, in the invite's box on every syncnode of the
   ticket (:func:`proto.handoff.invite_box`).
2. Wait until a verified slot of the decided log adds us (its Welcome), or the inviter refuses
   the ticket (spent, expired, unknown: :mod:`proto.handoff`). The log is verified from the
   genesis the ticket names (its hash), one syncnode's answers apart from another's, so one
   malicious syncnode cannot stop the join; the syncnodes show the log to members only, so it
   is read once we are one. The inviter is asked for the document directly at the same time
   (:mod:`device.inviter_fetch`); it answers once it has added us, and its answer ends the
   pause between two polls of the syncnodes.
3. Get the document from whichever source answers first, all tried at once: the inviter and the
   other members directly (peer to peer), and the copy the inviter stored for us on the
   syncnodes before it announced the add (:mod:`device.state_fetch`). If none has it, members
   answer a state request through the syncnodes.
4. Return only once the document's content is here; at the timeout, raise :class:`JoinError`
   saying what was still missing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol

import trio

from device.document import Document
from device.errors import JoinError
from device.host import Host
from device.inviter_fetch import InviterFetch
from device.p2p import Progress
from device.replica import insert_document, mark_needs_state
from device.state_fetch import Say, clear_handoff, fetch_first_state, read_mailbox
from proto import entropy
from proto.codec import encode
from proto.errors import DecodeError, SyncnodeError, TransportError
from proto.groups import single_errors
from proto.handoff import HandoffPart, invite_box
from proto.identity import fingerprint, short_id
from proto.invite import InviteTicket, JoinRequest
from proto.logs import get_logger
from proto.manifest import (
    LogValue,
    Manifest,
    ManifestError,
    Rule,
    SyncnodeEntry,
    genesis_hash,
    validate_genesis,
    verify_decided,
)
from proto.paxos.messages import Decided
from proto.paxos.quorum import CertificateError
from proto.rpc import RemoteError, SyncnodeClient, UnexpectedReply
from proto.service import MailboxKind, put_proof
from proto.ticket import NodeTicket

log = get_logger("device.joining")

REQUEST_TTL = 7 * 24 * 3600
"""Longest a join request waits on a syncnode (their default ``max_mailbox_ttl``), whatever the
ticket's lifetime."""


class Joiner(Host, Protocol):
    """What a join needs from the device beyond what its documents need."""

    def free_name(self, wanted: str, group_id: bytes) -> str: ...

    def document_for(self, group_id: bytes) -> Document | None: ...

    def start_document(self, doc: Document) -> None: ...


class _Phase:
    """What the join is waiting for (for the timeout's message)."""

    def __init__(self) -> None:
        self.what = "reaching the document's syncnodes"


async def join(device: Joiner, ticket: str, *, name: str, timeout: float, say: Say,
               on_progress: Callable[[Progress], None] | None) -> Document:
    try:
        t = InviteTicket.parse(ticket)
    except DecodeError as exc:
        raise JoinError(f"bad invite ticket: {exc}") from None
    if t.expires_at < entropy.wall():
        raise JoinError("the invite ticket has expired; ask the inviter for a new one")
    if device.document_for(t.group_id) is not None:
        raise JoinError("this device is already a member of that document")
    phase = _Phase()
    with trio.move_on_after(timeout) as scope:
        return await _join(device, t, name or t.name, say, on_progress, phase)
    assert scope.cancelled_caught
    raise JoinError(f"no success after {timeout:g} s while {phase.what}")


async def _join(device: Joiner, t: InviteTicket, name: str, say: Say,
                on_progress: Callable[[Progress], None] | None, phase: _Phase) -> Document:
    key_package = device.mls.key_package()
    request = JoinRequest(t.group_id, t.secret, key_package, device.key.public,
                          device.endpoint_id, device.addresses()).seal(t.inviter)
    ttl = int(min(max(60, t.expires_at - entropy.wall()), REQUEST_TTL))
    posted: list[bytes] = []

    box = invite_box(t.secret)
    early = InviterFetch(device, t, on_progress) if device.config.p2p_state_transfer else None

    async def post(c: SyncnodeClient) -> bool:
        """Leave the request in the invite's box on ``c`` (proving that we hold the ticket,
        for that syncnode only) as soon as it is connected: a slow or dead syncnode of the
        ticket must not hold the others up."""
        kind = MailboxKind.KEY_PACKAGE
        try:
            await c.mailbox_put(box.public, kind, request, ttl,
                                proof=put_proof(box, c.node_id, kind, request, ttl))
            posted.append(c.node_id)
            return True
        except SyncnodeError as exc:  # the others may still take it
            log.info("join request not stored", node=short_id(c.node_id), error=str(exc))
            return False

    with single_errors():  # a JoinError comes out as itself
        async with trio.open_nursery() as nursery:
            if early is not None:  # dialled alongside the syncnodes; answers once we are added
                nursery.start_soon(early.run)
            doc, slot, loaded = await _welcomed(device, t, name, say, on_progress, phase, post,
                                                posted, early)
            nursery.cancel_scope.cancel()
    device.start_document(doc)
    if loaded:
        device.spawn(clear_handoff, device, doc, t)
    else:
        phase.what = ("waiting for a member to send the document through the syncnodes "
                      "(this device is a member now; it keeps asking whenever it runs)")
        say("no copy of the document available yet; asking the members via the syncnodes")
        await _wait_for_state(doc)
        say("received the document from a member through the syncnodes")
    log.info("joined document", doc=short_id(t.group_id), epoch=slot)
    return doc


async def _welcomed(device: Joiner, t: InviteTicket, name: str, say: Say,
                    on_progress: Callable[[Progress], None] | None, phase: _Phase,
                    post: Callable[[SyncnodeClient], Awaitable[bool]], posted: list[bytes],
                    early: InviterFetch | None) -> tuple[Document, int, bool]:
    """Steps 1 to 3 of the module doc: the document, at the slot that added us, and whether
    its content loaded."""
    async with _connect_all(device, t.syncnodes, post) as clients:
        if not posted:
            raise JoinError("no syncnode stored the join request")
        phase.what = "waiting for the inviter to add this device (is it online?)"
        say(f"join request left with the syncnodes ({len(posted)} of {len(t.syncnodes)} so "
            f"far); waiting for the inviter ({short_id(fingerprint(t.inviter))}) to add this "
            "device (the inviter's device must be running)")
        parts: dict[int, HandoffPart] = {}
        slot, values, decided = await _await_welcome(
            device, clients, t, parts, None if early is None else early.answered)
        welcome = values[slot].welcome
        assert welcome is not None
        group = device.mls.join(welcome)
        with device.store.transaction() as db:
            group.persist()
            insert_document(db, t.group_id, device.free_name(name, t.group_id),
                            values[0].manifest.crdt_type, slot)
            for s in range(slot + 1):
                db.execute("INSERT INTO log VALUES (?,?,?,?)",
                           (t.group_id, s, values[s].encode(),
                            encode(decided[s]) if s else None))
            mark_needs_state(db, t.group_id)
        doc = Document(device, t.group_id)
        phase.what = "fetching the document (from the inviter, other members or the syncnodes)"
        say(f"added at epoch {slot}; fetching the document")
        loaded = await fetch_first_state(device, doc, t, clients, parts, say, on_progress,
                                         early)
    return doc, slot, loaded


async def _wait_for_state(doc: Document) -> None:
    await doc.state_loaded.wait()


@asynccontextmanager
async def _connect_all(device: Host, entries: Sequence[SyncnodeEntry],
                       ready: Callable[[SyncnodeClient], Awaitable[bool]]
                       ) -> AsyncIterator[list[SyncnodeClient]]:
    """Authenticated connections to the reachable syncnodes, dialled in parallel; ``ready``
    runs on each as it connects (True: keep it). Yields once a majority is ready or every
    dial has ended; syncnodes that connect later join the list."""
    clients: list[SyncnodeClient] = []
    untried = len(entries)
    enough, release = trio.Event(), trio.Event()
    majority = len(entries) // 2 + 1

    def tried() -> None:
        nonlocal untried
        untried -= 1
        if untried == 0 or len(clients) >= majority:
            enough.set()

    async def hold(e: SyncnodeEntry) -> None:
        try:
            async with SyncnodeClient.connect(device.transport, NodeTicket(e.node_id, e.addrs),
                                              timeout=device.config.connect_timeout) as c:
                await c.authenticate(device.key)
                if await ready(c):
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
            await enough.wait()
            if clients:
                try:
                    yield clients
                finally:
                    release.set()
                    # a dial still pending (a frozen syncnode) must not hold the join up
                    nursery.cancel_scope.cancel()
            else:
                nursery.cancel_scope.cancel()
    if not clients:
        raise JoinError("none of the document's syncnodes is reachable")


@dataclass
class _Log:
    """The decided log as one syncnode has proven it so far: slot 0 is the genesis the ticket
    names, every later slot carries a certificate that verifies against the manifest before
    it. What was verified stays verified; a bad answer is never added."""

    values: dict[int, LogValue] = field(default_factory=dict)
    decided: dict[int, Decided] = field(default_factory=dict)


def _log_of(logs: dict[bytes, _Log], node_id: bytes) -> _Log:
    """The log a syncnode's answers extend: its own. Sharing one across syncnodes let the first
    to answer decide for all of them (issue 14, finding 4: one forged genesis, and no answer of
    the honest ones verified any more)."""
    return logs.setdefault(node_id, _Log())


def _genesis_of(t: InviteTicket, raw: bytes) -> LogValue:
    """The genesis a syncnode served, if it is the one the ticket names (raises otherwise).
    Any self-signed genesis for the group id is well formed: only the hash binds it."""
    if genesis_hash(raw) != t.genesis:
        raise ManifestError(Rule.BAD_GENESIS,
                            "not the genesis the invite ticket names (a forged group)")
    g = LogValue.decode(raw)
    validate_genesis(t.group_id, g)
    return g


def _check_inviter(t: InviteTicket, manifest: Manifest) -> None:
    """The ticket's inviter is a device of the manifest our add was decided against."""
    inviter = manifest.device(fingerprint(t.inviter))
    if inviter is None or inviter.sig_pub != t.inviter:
        raise JoinError("the invite ticket's inviter is not a member of the document it names; "
                        "ask a member for a new ticket")


async def _await_welcome(device: Host, clients: list[SyncnodeClient], t: InviteTicket,
                         parts: dict[int, HandoffPart], wake: trio.Event | None = None
                         ) -> tuple[int, dict[int, LogValue], dict[int, Decided]]:
    """Poll until a syncnode proves a slot that adds this device (its Welcome), and our mailbox
    for the inviter's refusal (and the state it staged, kept in ``parts``).

    Each syncnode's answers are verified on their own (:class:`_Log`), from the genesis the
    ticket names: a syncnode that serves a forged genesis or an uncertified slot spoils only its
    own log, and the first syncnode whose log reaches our add wins. A syncnode shows a group's
    log only to its members and syncnodes, so until our add is decided there it answers no head
    for the group and there is nothing to read; each poll costs two small requests per
    syncnode, and the log is read from the genesis once we are a member. ``wake`` (the inviter
    started sending us the document: it has added us) cuts one pause short."""
    cfg = device.config
    started = trio.current_time()
    logs: dict[bytes, _Log] = {}
    complaints: dict[bytes, str] = {}
    read_to: dict[bytes, int] = {}  # per syncnode: our mailbox's items read so far
    while True:
        for c in list(clients):
            known = _log_of(logs, c.node_id)
            try:
                read_to[c.node_id] = await read_mailbox(device, c, t, parts,
                                                        after=read_to.get(c.node_id, 0))
                found = await _scan_log(device, c, t, known)
            except TransportError as exc:  # gone: stop asking it
                log.info("lost a syncnode while waiting", node=short_id(c.node_id),
                         error=str(exc))
                clients.remove(c)
                if not clients:
                    raise JoinError("lost every syncnode of the document while waiting for "
                                    "the inviter") from None
                continue
            except (RemoteError, UnexpectedReply, DecodeError, CertificateError,
                    ManifestError) as exc:  # a bad syncnode: its answer is dropped
                if complaints.get(c.node_id) != str(exc):  # once, not at every poll
                    complaints[c.node_id] = str(exc)
                    log.warning("a syncnode served a decided log that does not verify",
                                node=short_id(c.node_id), error=str(exc))
                continue
            if found is not None:
                _check_inviter(t, known.values[found - 1].manifest)
                return found, known.values, known.decided
        fast = trio.current_time() - started < cfg.fast_poll_window
        with trio.move_on_after(cfg.fast_poll_interval if fast else cfg.join_poll_interval):
            if wake is not None:
                await wake.wait()
                wake = None  # one early poll; if no syncnode shows the add yet, the usual pace
            else:
                await trio.sleep_forever()


async def _scan_log(device: Host, c: SyncnodeClient, t: InviteTicket, known: _Log
                    ) -> int | None:
    """Extend ``known`` (``c``'s verified log) from ``c``; the slot that adds this device, once
    there is one. Until ``c`` shows us the group's head (it does once we are a member there),
    there is nothing to read."""
    slot = len(known.values)
    heads = await c.heads([t.group_id])
    top = next((h.top for h in heads.heads if h.group_id == t.group_id), None)
    if top is None or top < slot:
        return None
    while True:
        page = await c.fetch_decided(t.group_id, slot)
        if slot == 0:
            if page.genesis is None:
                raise ManifestError(Rule.BAD_GENESIS, "the syncnode served no genesis")
            known.values[0] = _genesis_of(t, page.genesis)
            slot = 1
        for d in page.decided:
            s = d.certificate.slot
            if s != slot:
                break
            known.values[s] = verify_decided(known.values[s - 1].manifest, d.value,
                                             d.certificate)
            known.decided[s] = d
            if known.values[s].manifest.device(device.fingerprint) is not None \
                    and known.values[s].welcome is not None:
                return s
            slot += 1
        if not page.decided or slot > page.top:
            return None
