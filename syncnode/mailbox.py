"""The syncnode's mailbox: small sealed items kept for a recipient key until it acks them or
they expire (join requests for an inviter, state handoffs and refusals for a joiner).

:class:`Mailbox` holds what it needs of the node (read connection, group-commit writer, limits,
metrics, clock); :class:`~syncnode.service.Service` keeps thin handlers that delegate here.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import TYPE_CHECKING

from proto.identity import fingerprint
from proto.messages import ErrorCode
from proto.service import (
    MAX_PAGE,
    Done,
    MailboxAck,
    MailboxFetch,
    MailboxItem,
    MailboxItems,
    MailboxPut,
    MailboxStored,
)
from syncnode.config import Limits
from syncnode.metrics import Metrics
from syncnode.storage import Writer, rows

if TYPE_CHECKING:
    from syncnode.service import Session


def _refused(code: ErrorCode, detail: str) -> Exception:
    # Imported here: syncnode.service builds a Mailbox, so a module-level import would be
    # circular.
    from syncnode.service import RequestError
    return RequestError(code, detail)


class Mailbox:
    """Mailbox requests of one syncnode. ``notify(recipient)`` tells the recipient's live
    subscriptions that an item arrived."""

    def __init__(self, db: sqlite3.Connection, writer: Writer, limits: Limits, metrics: Metrics,
                 clock: Callable[[], float], notify: Callable[[bytes], None]) -> None:
        self.db = db
        self.writer = writer
        self.limits = limits
        self.metrics = metrics
        self.clock = clock
        self.notify = notify

    async def put(self, session: Session, msg: MailboxPut) -> MailboxStored:
        if not 1 <= msg.ttl <= self.limits.max_mailbox_ttl:
            raise _refused(ErrorCode.INVALID,
                           f"ttl must be 1..{self.limits.max_mailbox_ttl} seconds")
        now = int(self.clock())
        cap = self.limits.max_mailbox_items_per_recipient

        def write(c: sqlite3.Connection) -> int:
            c.execute("DELETE FROM mailbox WHERE recipient=? AND expires_at<=?",
                      (msg.recipient, now))
            (count,) = c.execute("SELECT count(*) FROM mailbox WHERE recipient=?",
                                 (msg.recipient,)).fetchone()
            if count >= cap:
                raise _refused(ErrorCode.QUOTA_EXCEEDED,
                               f"recipient mailbox is full ({cap} items)")
            cur = c.execute("INSERT INTO mailbox (recipient, kind, payload, expires_at) "
                            "VALUES (?,?,?,?)", (msg.recipient, int(msg.kind), msg.payload,
                                                 now + msg.ttl))
            return int(cur.lastrowid or 0)

        stored = MailboxStored(await self.writer.execute(write))
        self.notify(msg.recipient)
        return stored

    def require_key(self, session: Session, key: bytes) -> None:
        if session.keys.get(fingerprint(key)) != key:
            raise _refused(ErrorCode.UNAUTHORIZED,
                           "authenticate with the recipient key to read its mailbox")

    async def fetch(self, session: Session, msg: MailboxFetch) -> MailboxItems:
        self.require_key(session, msg.recipient)
        now = int(self.clock())
        items = tuple(
            MailboxItem(i, k, p, e) for i, k, p, e in rows(
                self.db, "SELECT item_id, kind, payload, expires_at FROM mailbox WHERE "
                "recipient=? AND item_id>? AND expires_at>? ORDER BY item_id LIMIT ?",
                msg.recipient, msg.after, now, max(1, min(msg.limit, MAX_PAGE))))
        return MailboxItems(items)

    async def ack(self, session: Session, msg: MailboxAck) -> Done:
        self.require_key(session, msg.recipient)
        ids = [(msg.recipient, i) for i in msg.item_ids]

        def write(c: sqlite3.Connection) -> int:
            return c.executemany("DELETE FROM mailbox WHERE recipient=? AND item_id=?",
                                 ids).rowcount

        return Done(await self.writer.execute(write))

    async def expire(self) -> None:
        now = int(self.clock())
        await self.writer.execute(lambda c: c.execute(
            "DELETE FROM mailbox WHERE expires_at<=?", (now,)))
