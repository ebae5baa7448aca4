"""The joiner asks the inviter for the document as soon as its join request is posted.

The inviter's device answers a snapshot request from a joiner's endpoint only once that endpoint
is in its manifest (:class:`device.p2p.PeerServer` holds the request until then), and it applies
the add only after a quorum of syncnodes stored the decision. So the answer does two things at
once:

* it **wakes** the joiner's wait for its Welcome (:mod:`device.joining`), which otherwise finds
  the decision at its next poll of the syncnodes (up to ``fast_poll_interval`` later);
* it **brings the document** over a connection dialled while the inviter was still balloting,
  off the join's critical path.

Before the joiner is a member it cannot read the manifest, so the offer is verified against the
inviter the ticket names (its MLS signature key, its endpoint); once the joiner reads the
decided log, :func:`device.joining._check_inviter` confirms that this key is a member's. The
snapshot is loaded only after that, like one fetched later (:mod:`device.state_fetch`).

A request the inviter refuses (the add not done within its wait) or a connection that fails is
tried again after a pause that grows to :data:`RETRY_MAX`; a transfer cut once it started is
resumed once at its offset; the whole thing ends with the join.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from device.host import Host
from device.p2p_fetch import Progress, TransferError, fetch_signed_by
from proto.identity import short_id
from proto.invite import InviteTicket
from proto.logs import get_logger
from proto.p2p import SnapshotBody

log = get_logger("device.joining")

RETRY_FIRST = 0.25
RETRY_MAX = 5.0
OFFER_WAIT = 30.0
"""Longest one request waits for the inviter's offer (the inviter answers within its own wait
for our add, a few seconds; a connection that says nothing longer is tried anew)."""


class InviterFetch:
    """One join's early request to the inviter (see the module doc)."""

    def __init__(self, device: Host, t: InviteTicket,
                 on_progress: Callable[[Progress], None] | None) -> None:
        self.device = device
        self.ticket = t
        self.on_progress = on_progress
        self.result: tuple[bytes, SnapshotBody] | None = None
        self.answered = trio.Event()
        """The inviter started sending the document: it has added us."""
        self.over = trio.Event()
        """:attr:`result` is set, or :meth:`run` ended without it."""
        self.asking = False
        """A request is out (not in the pause between two)."""
        self._scope = trio.CancelScope()

    def stop(self) -> None:
        """Give up (the join found its add another way while no request was out)."""
        self._scope.cancel()

    def worth_waiting_for(self) -> bool:
        """The document is here, or coming, or a request is out: the answer is then at most the
        inviter's own apply of our add away."""
        return self.result is not None or (
            not self.over.is_set() and (self.asking or self.answered.is_set()))

    async def run(self) -> None:
        """Ask until the inviter sends the document (cancelled when the join ends)."""
        try:
            with self._scope:
                await self._ask(self.ticket)
        finally:
            self.asking = False
            self.over.set()

    async def _ask(self, t: InviteTicket) -> None:
        partial: dict[bytes, bytearray] = {}  # an interrupted transfer is resumed once
        resumed = False
        pause = RETRY_FIRST
        while self.result is None:
            self.asking = True
            try:
                self.result = await fetch_signed_by(
                    self.device.transport, t.inviter_endpoint, t.inviter_addrs, t.group_id,
                    t.inviter, progress=self._progress, partial=partial,
                    timeout=self.device.config.connect_timeout, offer_timeout=OFFER_WAIT)
            except TransferError as exc:
                if self.answered.is_set() and partial and not resumed:
                    resumed = True
                    continue
                if self.answered.is_set():  # it had added us, then failed: the others try
                    log.info("direct transfer from the inviter failed",
                             inviter=short_id(t.inviter_endpoint), error=str(exc))
                    return
                log.debug("inviter not answering yet", error=str(exc))
                self.asking = False
                await trio.sleep(pause)
                pause = min(pause * 2, RETRY_MAX)
        self.answered.set()

    def _progress(self, p: Progress) -> None:
        self.answered.set()
        if self.on_progress is not None:
            self.on_progress(p)
