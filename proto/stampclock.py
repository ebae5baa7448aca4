"""A syncnode's statement clock: the stamps ``at`` of its signed statements
(:mod:`proto.holdings`), sans-IO.

``at`` is the node's wall clock in milliseconds, but never lower than one past the last stamp
it issued (:class:`StampClock`), and a restarted node starts above every stamp it may have
issued before (it persists a reservation, ``RESERVE_MS`` ahead, in its database; a node that
lost its database starts over, in a new incarnation: :mod:`proto.holdings`). So an ack stamped
after its write and a heads statement stamped before its read are ordered as they happened,
whatever the wall clock does. A dishonest node can stamp anything; that only lets it avoid
signing a contradiction, which a device notices (a statement stamped before an ack it already
received from the same incarnation: *backdated*, suspected but not provable, see SECURITY.md).
"""

from __future__ import annotations

RESERVE_MS = 60_000
"""How far ahead a syncnode reserves its statement clock durably (one write per minute)."""


def backdated(latest_ack_at: int | None, statement_at: int) -> bool:
    """A statement asked for after we received an ack stamped ``latest_ack_at`` must be stamped
    later: an honest node's clock only moves forward. Not provable to others (who cannot tell
    which was asked first), so only suspected."""
    return latest_ack_at is not None and statement_at <= latest_ack_at


class StampClock:
    """A syncnode's statement clock, sans-IO: strictly increasing stamps near the wall clock,
    never above the durable reservation (the driver reserves more when :meth:`next` says so,
    and starts a restarted node from its last reservation)."""

    def __init__(self, reserved: int) -> None:
        self.reserved = reserved
        self.last = reserved

    def next(self, wall_ms: int) -> int | None:
        """The next stamp, or None when a reservation of :meth:`wanted` must be made first."""
        t = max(wall_ms, self.last + 1)
        if t > self.reserved:
            return None
        self.last = t
        return t

    def wanted(self, wall_ms: int) -> int:
        return max(wall_ms, self.last + 1) + RESERVE_MS
