"""The syncnode's mailbox: small sealed items kept for a recipient key until it acks them or
they expire (join requests for an inviter, state handoffs and refusals for a joiner).

:class:`Mailbox` holds what it needs of the node (storage, limits, metrics, clock);
:class:`~syncnode.service.Service` keeps thin handlers that delegate here. The quotas are judged
here and enforced by the storage in the put's own transaction
(:meth:`~syncnode.storage.Storage.mailbox_put`).

Who may put what (issue 14, findings 1 and 6; the wire side is :class:`proto.service.MailboxPut`):

* A **join request** (``KEY_PACKAGE``) goes to the invite's own box, whose key pair the joiner
  and the inviter derive from the ticket's secret (:func:`proto.handoff.invite_box`); the put
  carries the box key's signature over this node's id, the recipient, kind, payload hash and
  ttl, which we check against the recipient key itself. No registration, nothing secret here:
  we learn only the public key, so we cannot forge a request to the other syncnodes, and a
  proof made for us is useless on them. Strangers can no longer fill the mailbox an inviter
  reads: only someone holding the ticket can put into its box. At most
  ``max_join_requests_per_box`` wait per box and ``max_join_requests_per_sender`` per endpoint,
  each at most :data:`~proto.service.MAX_JOIN_REQUEST` bytes.
* **Everything else** (state handoffs, refusals) must come from a session authenticated as a
  current member of the group it names (``group_id``), hosted on this node.

Disk is bounded by quotas on the live items, each counted as payload +
:data:`~syncnode.storage.MAILBOX_ITEM_OVERHEAD` bytes (kept exact by the storage whatever
deletes an item, :class:`~syncnode.storage.MailboxUsage`): ``max_mailbox_bytes`` node-wide, of
which join requests (which anyone who invents a box key can send) may take
``max_join_request_bytes`` (when that share is full the **oldest** join requests make room, so
a flood cannot lock out fresh requests, which an online inviter reads within a second);
``max_mailbox_bytes_per_sender`` per member key or join-request endpoint; and every put spends
a per-endpoint token bucket of bytes (``mailbox_put_bytes_per_second``,
``mailbox_put_burst_bytes``). The defaults fit the largest handoff
(:data:`proto.handoff.MAX_HANDOFF`, 32 MiB, about 32.05 MiB counted) several times per sender
and within one burst.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from proto.identity import fingerprint
from proto.messages import ErrorCode
from proto.service import (
    MAX_JOIN_REQUEST,
    MAX_PAGE,
    Done,
    MailboxAck,
    MailboxFetch,
    MailboxItem,
    MailboxItems,
    MailboxKind,
    MailboxPut,
    MailboxStored,
    put_proof_valid,
)
from syncnode.budgets import KeyedBuckets
from syncnode.config import Limits
from syncnode.metrics import Metrics
from syncnode.session import RequestError, Session
from syncnode.storage import (
    MAILBOX_ITEM_OVERHEAD,
    MailboxQuota,
    MailboxRefusal,
    MailboxUsage,
    Storage,
)

FETCH_BYTES = 4 * 1024 * 1024
"""Soft byte budget of one page of mailbox items (well under a frame)."""
ENDPOINT_BUCKETS = 16384
"""Endpoints whose put budget is remembered (least recently used forgotten: a forgotten one
starts afresh, as a new endpoint would; the quotas bound what that gains)."""


class Mailbox:
    """Mailbox requests of one syncnode.

    ``notify(recipient)`` tells the recipient's live subscriptions that an item arrived;
    ``member_key(session, group_id)`` is the fingerprint under which the session acts as a
    current member of a hosted group, or None."""

    def __init__(self, store: Storage, limits: Limits, metrics: Metrics,
                 clock: Callable[[], float], notify: Callable[[bytes], None], *,
                 node_id: bytes,
                 member_key: Callable[[Session, bytes], Awaitable[bytes | None]],
                 monotonic: Callable[[], float] | None = None) -> None:
        self.store = store
        self.limits = limits
        self.metrics = metrics
        self.clock = clock
        self.notify = notify
        self.node_id = node_id
        self.member_key = member_key
        self.budgets = KeyedBuckets(limits.mailbox_put_bytes_per_second,
                                    limits.mailbox_put_burst_bytes,
                                    monotonic or trio.current_time, ENDPOINT_BUCKETS, debt=True)

    def _refuse(self, reason: str, code: ErrorCode, detail: str) -> RequestError:
        self.metrics.refuse(reason)
        return RequestError(code, detail)

    async def put(self, session: Session, msg: MailboxPut) -> MailboxStored:
        lim = self.limits
        if not 1 <= msg.ttl <= lim.max_mailbox_ttl:
            raise self._refuse("mailbox_bad_ttl", ErrorCode.INVALID,
                               f"ttl must be 1..{lim.max_mailbox_ttl} seconds")
        join = msg.kind == MailboxKind.KEY_PACKAGE
        sender: bytes | None
        if join:
            if len(msg.payload) > MAX_JOIN_REQUEST:
                raise self._refuse("mailbox_join_too_large", ErrorCode.INVALID,
                                   f"a join request holds at most {MAX_JOIN_REQUEST} bytes")
            if not put_proof_valid(self.node_id, msg):
                raise self._refuse(
                    "mailbox_unproven", ErrorCode.UNAUTHORIZED,
                    "a join request goes to an invite's box, signed by the box key for this "
                    "syncnode")
            sender = session.remote_id
        else:
            sender = None if msg.group_id is None else \
                await self.member_key(session, msg.group_id)
            if sender is None:
                raise self._refuse(
                    "mailbox_not_member", ErrorCode.UNAUTHORIZED,
                    "only a current member of a group hosted here (named in the put) may "
                    "leave this kind of item")
        size = len(msg.payload) + MAILBOX_ITEM_OVERHEAD
        if not self.budgets.take(session.remote_id, size):
            raise self._refuse("mailbox_rate", ErrorCode.RATE_LIMITED,
                               "mailbox puts from this endpoint are over "
                               f"{lim.mailbox_put_bytes_per_second:g} bytes/s; retry later")
        now = int(self.clock())
        share = lim.max_join_request_bytes if join else \
            max(0, lim.max_mailbox_bytes - lim.max_join_request_bytes)
        quota = MailboxQuota(
            items_per_recipient=lim.max_join_requests_per_box if join
            else lim.max_mailbox_items_per_recipient,
            bytes_per_sender=lim.max_mailbox_bytes_per_sender,
            items_per_sender=lim.max_join_requests_per_sender if join else None,
            class_bytes=min(share, lim.max_mailbox_bytes),
            make_room=join)  # join requests: the oldest make room
        result = await self.store.mailbox_put(msg.recipient, int(msg.kind), msg.payload,
                                              sender=sender, size=size, now=now,
                                              expires_at=now + msg.ttl, quota=quota)
        if result.evicted:
            self.metrics.refuse("mailbox_join_evicted")
        if result.refused is MailboxRefusal.RECIPIENT_FULL:
            raise self._refuse("mailbox_recipient_full", ErrorCode.QUOTA_EXCEEDED,
                               f"recipient mailbox is full ({result.limit} items)")
        if result.refused is MailboxRefusal.SENDER_QUOTA:
            raise self._refuse("mailbox_sender_quota", ErrorCode.QUOTA_EXCEEDED,
                               "this sender has too much waiting in mailboxes here "
                               f"({result.sender_bytes} bytes, {result.sender_items} items)")
        if result.refused is MailboxRefusal.NODE_QUOTA:
            raise self._refuse("mailbox_node_quota", ErrorCode.QUOTA_EXCEEDED,
                               "this syncnode's mailbox is full")
        self.notify(msg.recipient)
        return MailboxStored(result.item_id)

    def require_key(self, session: Session, key: bytes) -> None:
        if session.keys.get(fingerprint(key)) != key:
            raise self._refuse("mailbox_not_recipient", ErrorCode.UNAUTHORIZED,
                               "authenticate with the recipient key to read its mailbox")

    async def fetch(self, session: Session, msg: MailboxFetch) -> MailboxItems:
        self.require_key(session, msg.recipient)
        now = int(self.clock())
        limit = max(1, min(msg.limit, MAX_PAGE))
        records, more = await self.store.mailbox_items(msg.recipient, after=msg.after, now=now,
                                                       limit=limit, max_bytes=FETCH_BYTES)
        return MailboxItems(tuple(MailboxItem(r.item_id, MailboxKind(r.kind), r.payload,
                                              r.expires_at) for r in records), more)

    async def ack(self, session: Session, msg: MailboxAck) -> Done:
        self.require_key(session, msg.recipient)
        return Done(await self.store.mailbox_ack(msg.recipient, msg.item_ids))

    async def expire(self) -> None:
        await self.store.mailbox_expire(int(self.clock()))

    async def usage(self) -> dict[str, int]:
        """Live bytes of join requests and of everything else (for tests and operators)."""
        got: MailboxUsage = await self.store.mailbox_usage()
        return {"join_requests": got.join_requests, "other": got.other}
