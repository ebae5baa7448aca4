"""A reader's way to the document's state: peer to peer from a member, never through the
syncnodes.

A reader sends no envelopes at all (syncnodes refuse them and members drop them: a syncnode
cannot see what kind of payload an envelope holds, so "a reader may only ask for the state" is
not a rule it could enforce). What a writer gets by sealing a ``SYNC_REQUEST`` (members answer
with a ``STATE`` through the syncnodes), a reader gets directly: it fetches a member's snapshot
over iroh (:mod:`device.p2p_fetch`, the same verified transfer a new device uses) and loads it
with the vector it covers. Its first copy after joining needs nothing new: it comes from the
inviter directly or from the copy staged on the syncnodes (:mod:`device.state_fetch`); this is
for the gaps after that (updates of an epoch it cannot read, a join where neither source
answered).
"""

from __future__ import annotations

from collections.abc import Callable

from device.p2p_fetch import TransferError, fetch_snapshot
from device.replica import Replica
from proto import entropy
from proto.crdt import CrdtError
from proto.identity import short_id
from proto.logs import get_logger

log = get_logger("device.document")

Load = Callable[[bytes, dict[bytes, int]], None]


class DirectState:
    """At most one direct fetch at a time for one document (:meth:`want` starts it)."""

    def __init__(self, replica: Replica, load: Load, on_failure: Callable[[], None]) -> None:
        self.replica = replica
        self.load = load
        self.on_failure = on_failure
        self.running = False

    def want(self) -> None:
        """Fetch the state from a member in the background (unless a fetch is under way)."""
        if not self.running:
            self.running = True
            self.replica.host.spawn(self._run)

    async def _run(self) -> None:
        try:
            if not await self.fetch():
                self.on_failure()  # asked again at the next chance (rate limited)
        finally:
            self.running = False

    async def fetch(self) -> bool:
        """Try the members in random order; True once one's snapshot verified and loaded."""
        r = self.replica
        host = r.host
        members = [d for d in r.manifest.devices if d.fingerprint != r.me]
        entropy.rng().shuffle(members)
        for member in members:
            if r.status != "active":
                return False
            try:
                data, body = await fetch_snapshot(host.transport, member.endpoint_id,
                                                  member.addrs, r.manifest,
                                                  timeout=host.config.connect_timeout)
                if body.backend != r.crdt.backend_id:
                    raise TransferError(f"snapshot of backend {body.backend!r}")
                async with r.apply_lock:
                    self.load(data, {d.sender: d.seq for d in body.covers})
            except (TransferError, CrdtError) as exc:
                log.info("direct state fetch failed", doc=short_id(r.group_id),
                         source=short_id(member.fingerprint), error=str(exc))
                continue
            log.info("loaded the document state from a member directly (this device is a "
                     "reader)", doc=short_id(r.group_id), source=short_id(member.fingerprint),
                     bytes=len(data))
            return True
        return False
