"""Periodic key rotation (post-compromise security): each device updates its own MLS leaf.

A device that was compromised and then recovered stays readable by the attacker until it
commits fresh leaf keys. So every device, whatever its role, commits a key update of its own
leaf (:meth:`device.membership.Membership.rotate_keys`, through Paxos) after
``rotate_keys_after`` seconds or ``rotate_keys_after_messages`` updates sent by it since its
last own commit, whichever comes first (:func:`device.rules.rotation_wait`; 0 turns a threshold
off, both 0 turn rotation off). Any commit of ours counts (an add, a role change: each gives
our leaf fresh keys too).

When we last committed, and our seq then, are kept in the store's ``meta`` table, so a device
that restarts does not rotate at once, nor forget a rotation that is due. A due rotation first
waits a random jitter (:func:`device.rules.rotation_jitter`), so members that came online
together do not all propose for the same slot; a failed one (offline, contention) backs off,
doubling up to ``rotate_keys_backoff_max``. Paxos itself re-bases a commit that lost its slot.
"""

from __future__ import annotations

import math

import msgpack
import trio

from device.membership import Membership
from device.outbox import Outbox
from device.replica import Replica
from device.rules import rotation_jitter, rotation_wait
from proto import entropy
from proto.errors import SyncnodeError
from proto.identity import short_id
from proto.logs import get_logger
from proto.wakeup import Signal

log = get_logger("device.document")


def _key(group_id: bytes) -> str:
    return f"last_own_commit:{group_id.hex()}"


class Rotation:
    """One document's periodic rotation of our own leaf keys (see the module doc)."""

    def __init__(self, replica: Replica, outbox: Outbox, membership: Membership) -> None:
        self.replica = replica
        self.outbox = outbox
        self.membership = membership
        self.rotations = 0
        """Rotations this task committed (since the document was opened)."""

    def _last(self) -> tuple[float, int]:
        """When we last committed (wall clock) and our next seq then."""
        r = self.replica
        raw = r.store.get_meta(_key(r.group_id))
        if raw is None:  # first run here: count from now (a new or newly joined document)
            return self._record()
        at, seq = msgpack.unpackb(raw)
        return float(at), int(seq)

    def _record(self) -> tuple[float, int]:
        r = self.replica
        mark = (entropy.wall(), self.outbox.next_seq)
        with r.store.transaction():
            r.store.set_meta(_key(r.group_id), msgpack.packb(list(mark)))
        return mark

    def _saw_own_commit(self) -> None:
        """Record the latest slot if we signed it (any commit of ours refreshes our leaf)."""
        r = self.replica
        latest = r.values.get(r.epoch)
        if latest is not None and r.epoch > 0 and latest.signer == r.me:
            self._record()

    async def run(self) -> None:
        """Until the document stops being active: rotate whenever a threshold is crossed."""
        r = self.replica
        cfg = r.host.config
        backoff = 1.0
        seen_epoch = r.epoch
        while r.status == "active":
            if r.epoch != seen_epoch:
                seen_epoch = r.epoch
                self._saw_own_commit()
            at, seq = self._last()
            wait = rotation_wait(entropy.wall(), at, self.outbox.next_seq - seq,
                                 after=cfg.rotate_keys_after,
                                 after_messages=cfg.rotate_keys_after_messages)
            if wait is None:
                return
            if wait > 0:
                with trio.move_on_after(wait if math.isfinite(wait) else 3600.0):
                    await _either(self.outbox.changed, r.epoch_changed)
                continue
            await trio.sleep(entropy.uniform(0, rotation_jitter(cfg.rotate_keys_after)))
            if self._last() != (at, seq):
                continue  # a commit of ours happened meanwhile
            try:
                slot = await self.membership.rotate_keys()
            except SyncnodeError as exc:
                log.info("periodic key rotation failed; retrying later",
                         doc=short_id(r.group_id), error=str(exc), retry_in=backoff)
                await trio.sleep(backoff * entropy.uniform(0.5, 1.0))
                backoff = min(backoff * 2, cfg.rotate_keys_backoff_max)
                continue
            backoff = 1.0
            self.rotations += 1
            self._record()
            seen_epoch = r.epoch
            log.info("rotated our keys", doc=short_id(r.group_id), slot=slot)


async def _either(a: Signal, b: Signal) -> None:
    """Until either signal fires."""
    async with trio.open_nursery() as nursery:
        async def one(sig: Signal) -> None:
            await sig.wait()
            nursery.cancel_scope.cancel()

        nursery.start_soon(one, a)
        nursery.start_soon(one, b)
