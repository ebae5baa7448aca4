"""Live delivery: subscriptions to a group's new envelopes and decisions, and mailbox notices.

A subscriber is a bounded queue the server drains onto the subscription's stream. Publishing
never waits: a subscriber that falls too far behind is dropped (it reconnects and backfills)
rather than making the node buffer without bound, and a decision that removes a subscriber's
device from the group ends its feed. A subscription also carries mailbox notices for every key
its session proved.

An envelope is not pushed back to its sender's own subscriptions: the sender sealed it, holds
it and is told it was stored by the ack. The echo cost the node a send and the sender a
receive and decode for every update it sent (a tenth of all pushes with ten members writing).
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from proto.codec import encode
from proto.envelope import Envelope
from proto.paxos.messages import Decided
from proto.service import MailboxNotice
from syncnode.groups import GroupState
from syncnode.metrics import Metrics
from syncnode.session import Session

SUBSCRIBER_QUEUE = 1024

Publish = Callable[..., None]
"""``publish(g, item, new_manifest=False)``: hand a stored envelope or decision to the group's
subscribers (:meth:`Fanout.publish`, through the service so a subclass may bend it)."""


class Subscriber:
    """One live subscription: a bounded queue of frames. A subscriber that falls too far behind
    (more than ``max_queue`` frames or ``max_bytes`` bytes waiting) is dropped (it reconnects and
    backfills) rather than making the node buffer without bound."""

    def __init__(self, group_id: bytes, fpr: bytes, session: Session, *,
                 max_bytes: int = 8 * 1024 * 1024) -> None:
        self.group_id = group_id
        self.fingerprint = fpr
        self.session = session
        self.send, self.receive = trio.open_memory_channel[bytes](SUBSCRIBER_QUEUE)
        self.closed_reason: str | None = None
        self.queued = 0
        self.max_bytes = max_bytes

    def offer(self, frame: bytes) -> bool:
        if self.queued + len(frame) > self.max_bytes and self.queued:
            self.close("subscriber fell behind")
            return False
        try:
            self.send.send_nowait(frame)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            self.close("subscriber fell behind")
            return False
        self.queued += len(frame)
        return True

    def taken(self, size: int) -> None:
        """The driver took a frame of ``size`` bytes off the queue to send it."""
        self.queued -= size

    def close(self, reason: str) -> None:
        if self.closed_reason is None:
            self.closed_reason = reason
            self.send.close()


class Fanout:
    """The live subscribers of every group and the mailbox watchers of every key."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.subscribers: dict[bytes, set[Subscriber]] = {}
        self.mailbox_watchers: dict[bytes, set[Subscriber]] = {}
        """Recipient key -> subscriptions of sessions authenticated with it (mailbox notices)."""

    def subscribe(self, session: Session, group_id: bytes, fpr: bytes, *, max_bytes: int
                  ) -> Subscriber:
        sub = Subscriber(group_id, fpr, session, max_bytes=max_bytes)
        self.subscribers.setdefault(group_id, set()).add(sub)
        for key in session.keys.values():
            self.mailbox_watchers.setdefault(key, set()).add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        subs = self.subscribers.get(sub.group_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self.subscribers[sub.group_id]
        for key in sub.session.keys.values():
            watchers = self.mailbox_watchers.get(key)
            if watchers is not None:
                watchers.discard(sub)
                if not watchers:
                    del self.mailbox_watchers[key]

    def publish(self, g: GroupState, item: Envelope | Decided, *,
                new_manifest: bool = False) -> None:
        frame = encode(item)
        sender = item.sender if isinstance(item, Envelope) else None
        for sub in list(self.subscribers.get(g.group_id, ())):
            if sub.fingerprint == sender:
                continue  # its own update (see the module doc)
            if new_manifest and g.manifest.device(sub.fingerprint) is None:
                sub.close("removed from the group")
                self.unsubscribe(sub)
                continue
            if not sub.offer(frame):
                self.metrics.refuse("subscriber_behind")
                self.unsubscribe(sub)
            elif isinstance(item, Envelope):
                self.metrics.messages_pushed.inc()

    def notify_mailbox(self, recipient: bytes) -> None:
        notice = encode(MailboxNotice(recipient))
        for sub in list(self.mailbox_watchers.get(recipient, ())):
            if not sub.offer(notice):
                self.unsubscribe(sub)

    def watch_mailbox(self, session: Session, recipient: bytes) -> None:
        """Notices for ``recipient`` also reach the session's subscriptions made before it
        authenticated with that key (an inviter reading its invite boxes). :meth:`unsubscribe`
        drops them with the session's other keys."""
        watchers = self.mailbox_watchers.get(recipient, set())
        if any(s.session is session for s in watchers):
            return
        mine = {s for key in session.keys.values() if key != recipient
                for s in self.mailbox_watchers.get(key, ()) if s.session is session}
        if mine:
            self.mailbox_watchers[recipient] = watchers | mine
