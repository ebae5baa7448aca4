"""The new device's first copy of the document (step 3 of :mod:`device.joining`).

The first source that verifies wins (:func:`fetch_first_state`), tried in this order, each
starting when the one before failed or took too long: the inviter directly (peer to peer,
:mod:`device.p2p`); the copy the inviter stored for us on the syncnodes before it announced the
add, which arrives in our mailbox there in parts (:func:`read_mailbox`, :mod:`proto.handoff`)
next to a refusal, if the inviter refused the ticket; then the other members directly,
staggered like "happy eyeballs" (they may be behind the inviter). What the inviter left for us
is deleted after the join returned, over the document's own links (:func:`clear_handoff`).
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from device.document import Document
from device.errors import JoinRefused
from device.host import Host
from device.inviter_fetch import InviterFetch
from device.p2p import Progress, TransferError, fetch_snapshot
from proto.crdt import CrdtError
from proto.errors import DecodeError, SyncnodeError, TransportError
from proto.handoff import HandoffPart, assemble, open_part, open_refusal
from proto.identity import short_id
from proto.invite import InviteTicket
from proto.logs import get_logger
from proto.p2p import SnapshotBody
from proto.rpc import RemoteError, SyncnodeClient, UnexpectedReply
from proto.service import MailboxItem, MailboxKind

log = get_logger("device.joining")

MAILBOX_PAGE = 64

Say = Callable[[str], None]


STAGGER = 1.0
STAGED_AFTER = 2.0
"""The inviter's direct transfer gets this head start over the copy it staged on the syncnodes:
it is fresher (taken after the add). A transfer already receiving bytes is left to finish."""


async def fetch_first_state(device: Host, doc: Document, t: InviteTicket,
                       clients: list[SyncnodeClient], parts: dict[int, HandoffPart], say: Say,
                       on_progress: Callable[[Progress], None] | None,
                       early: InviterFetch | None = None) -> bool:
    """Get the document from the first source that verifies: the members directly, or the
    copy the inviter stored on the syncnodes. False if none had it (members then answer a
    state request through the syncnodes). ``early``: the request to the inviter made when the
    join request was posted (:mod:`device.inviter_fetch`); it is the inviter's direct transfer
    if it is out or answering, else it is stopped and the inviter asked anew."""
    got: list[tuple[bytes, SnapshotBody, str]] = []
    done, inviter_over, staged_over = trio.Event(), trio.Event(), trio.Event()
    inviter_receiving = early.answered if early is not None else trio.Event()

    def take(result: tuple[bytes, SnapshotBody] | None, endpoint: bytes) -> None:
        if result is not None and not got:
            member = next((d for d in doc.manifest.devices if d.endpoint_id == endpoint), None)
            who = short_id(member.fingerprint if member is not None else endpoint)
            got.append((*result, f"peer to peer from {who}"))
            done.set()

    async def direct(endpoint: bytes, addrs: tuple[str, ...], receiving: trio.Event,
                     failed: trio.Event) -> None:
        def progress(p: Progress) -> None:
            receiving.set()
            if on_progress is not None:
                on_progress(p)

        take(await _fetch_from(device, doc, endpoint, addrs, progress), endpoint)
        failed.set()

    async def inviter() -> None:
        if early is not None and early.worth_waiting_for():
            await early.over.wait()
            if early.result is not None and early.result[1].backend == doc.crdt.backend_id:
                take(early.result, t.inviter_endpoint)
                return
        if early is not None:
            early.stop()
        await direct(t.inviter_endpoint, t.inviter_addrs, inviter_receiving, inviter_over)

    async def all_direct() -> None:
        """The inviter first; the other members only once the copy the inviter staged on the
        syncnodes was tried too: both are the inviter's document, which holds every update the
        inviter held when it made the ticket, while another member may be behind it (one cut
        off from the inviter's syncnodes handed a joiner a copy without the inviter's latest
        updates: found by the simulator, migrate scenario). The other members are staggered
        like "happy eyeballs": the next one starts when the last failed or said nothing for
        STAGGER seconds; a transfer that is receiving bytes is not doubled by another."""
        if not device.config.p2p_state_transfer:
            inviter_over.set()
            return
        try:
            await inviter()
        finally:
            inviter_over.set()
        await staged_over.wait()
        sources = [(d.endpoint_id, d.addrs) for d in doc.manifest.devices
                   if d.fingerprint != device.fingerprint and d.endpoint_id != t.inviter_endpoint]
        async with trio.open_nursery() as nursery:
            for endpoint, addrs in sources:
                receiving, failed = trio.Event(), trio.Event()
                nursery.start_soon(direct, endpoint, addrs, receiving, failed)
                with trio.move_on_after(STAGGER):
                    await failed.wait()
                if receiving.is_set():
                    await failed.wait()

    async def staged() -> None:
        try:
            await _staged(clients)
        finally:
            staged_over.set()

    async def _staged(clients: list[SyncnodeClient]) -> None:
        with trio.move_on_after(STAGED_AFTER):
            await inviter_over.wait()
        if inviter_receiving.is_set():
            await inviter_over.wait()
        for attempt in range(3):  # stored before the add; a slow syncnode may lag a little
            for c in clients:
                found = await _staged_from(device, doc, c, t, parts)
                if found is not None:
                    if not got:
                        got.append((*found, "from the copy stored on the syncnodes"))
                        done.set()
                    return
            await trio.sleep(0.2 * (attempt + 1))

    async def both() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(all_direct)
            nursery.start_soon(staged)
        done.set()  # every source tried

    async with trio.open_nursery() as nursery:
        nursery.start_soon(both)
        await done.wait()
        nursery.cancel_scope.cancel()
    if not got:
        return False
    data, body, how = got[0]
    try:
        async with doc.replica.apply_lock:
            doc.load_state(data, {d.sender: d.seq for d in body.covers})
    except CrdtError as exc:
        log.warning("the document state does not load", error=str(exc))
        return False
    say(f"received the document {how} ({len(data):,} bytes)")
    return True


async def clear_handoff(device: Host, doc: Document, t: InviteTicket) -> None:
    """Delete what the inviter left for us, over the document's own links once they are up:
    after the join returned, not on its path (reading the pages back to learn their ids cost
    a join about a tenth of its time). Best effort: the items also expire."""
    with trio.move_on_after(device.config.connect_timeout):
        await doc.wait_connected(1)
    await _ack_handoff(device, list(doc.clients.values()), t)


async def _staged_from(device: Host, doc: Document, c: SyncnodeClient, t: InviteTicket,
                       parts: dict[int, HandoffPart]) -> tuple[bytes, SnapshotBody] | None:
    """The copy the inviter stored for us, read from one syncnode, if complete and signed by
    a member."""
    try:
        await read_mailbox(device, c, t, parts, refusals=False)
        found = assemble(parts)
    except (TransportError, RemoteError, UnexpectedReply, DecodeError) as exc:
        # a bad syncnode's answer spoils only what came from it
        log.info("cannot read the staged state", node=short_id(c.node_id), error=str(exc))
        parts.clear()
        return None
    if found is None:
        return None
    offer, data = found
    inviter = doc.manifest.device(offer.signer)
    if inviter is None or not offer.verify(inviter.sig_pub) \
            or offer.body.backend != doc.crdt.backend_id \
            or offer.body.group_id != doc.group_id:
        log.warning("staged state not signed by a member", node=short_id(c.node_id))
        parts.clear()
        return None
    return data, offer.body


def _ours(t: InviteTicket, me: bytes, item: MailboxItem) -> bool:
    """Whether ``item`` is something the inviter of ``t`` left for us (it opens with the
    ticket's secret). Items of another join of ours stay for that join."""
    try:
        if item.kind == MailboxKind.STATE_HANDOFF:
            open_part(t.secret, t.group_id, me, item.payload)
        elif item.kind == MailboxKind.JOIN_REFUSED:
            open_refusal(t.secret, t.group_id, me, item.payload)
        else:
            return False
    except DecodeError:
        return False
    return True


async def _ack_handoff(device: Host, clients: list[SyncnodeClient], t: InviteTicket) -> None:
    """Delete what the inviter left for us (best effort: it also expires)."""
    me = device.key.public

    async def one(c: SyncnodeClient) -> None:
        try:
            after = 0
            while True:
                page = await c.mailbox_fetch(me, after, MAILBOX_PAGE)
                if page.items:
                    after = page.items[-1].item_id
                ids = [i.item_id for i in page.items if _ours(t, me, i)]
                if ids:
                    await c.mailbox_ack(me, ids)
                if not page.more:
                    break
        except SyncnodeError as exc:
            log.info("could not clear the mailbox", node=short_id(c.node_id), error=str(exc))

    with trio.move_on_after(device.config.connect_timeout):
        async with trio.open_nursery() as nursery:
            for c in clients:
                nursery.start_soon(one, c)


async def _fetch_from(device: Host, doc: Document, endpoint: bytes, addrs: tuple[str, ...],
                      on_progress: Callable[[Progress], None] | None
                      ) -> tuple[bytes, SnapshotBody] | None:
    """One member as the source; an interrupted transfer is resumed once."""
    partial: dict[bytes, bytearray] = {}
    for attempt in range(2):
        try:
            data, body = await fetch_snapshot(device.transport, endpoint, addrs, doc.manifest,
                                              progress=on_progress, partial=partial,
                                              timeout=device.config.connect_timeout)
            if body.backend != doc.crdt.backend_id:
                raise TransferError(f"snapshot of backend {body.backend!r}")
            return data, body
        except TransferError as exc:
            log.info("peer-to-peer state transfer failed", source=short_id(endpoint),
                     attempt=attempt + 1, error=str(exc))
            if not partial:
                break
    return None


async def read_mailbox(device: Host, c: SyncnodeClient, t: InviteTicket,
                        parts: dict[int, HandoffPart], *, refusals: bool = True,
                        after: int = 0) -> int:
    """Our mailbox on one syncnode, from the item after ``after``: a refusal ends the join
    (until we are added); handoff parts are collected. Returns the last item id read, for
    the next poll to start after (the staged copy is read once, not at every poll: a 10k-edit
    document's copy was fetched and decrypted from every syncnode every 20 ms while the
    joiner waited for its add)."""
    me = device.key.public
    while True:
        page = await c.mailbox_fetch(me, after, MAILBOX_PAGE)
        for item in page.items:
            after = max(after, item.item_id)
            try:
                if item.kind == MailboxKind.JOIN_REFUSED and refusals:
                    refusal = open_refusal(t.secret, t.group_id, me, item.payload)
                    raise JoinRefused(f"the inviter refused this ticket: {refusal.reason}")
                if item.kind == MailboxKind.STATE_HANDOFF:
                    part = open_part(t.secret, t.group_id, me, item.payload)
                    if parts and next(iter(parts.values())).digest != part.digest:
                        parts.clear()  # a newer staging (the inviter retried the add)
                    parts[part.index] = part
            except DecodeError:
                continue  # another join's, or junk
        if not page.more:
            return after
