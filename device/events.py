"""What a document tells the app: :class:`Change`, :class:`Alarm` and :class:`NewDocument`
events, and the plain records :meth:`Document.members` and :meth:`Document.sync_status` return.

Plain frozen dataclasses with no behaviour, in a module of their own so that every part of the
engine can produce them without importing the :class:`~device.document.Document` facade (which
re-exports them: ``from device.document import Alarm, Change`` keeps working).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Change:
    """A change to the document. ``origin`` is ``"local"`` or ``"remote"``; ``senders`` are the
    short ids of the devices whose updates were applied; ``updates`` counts edit updates and
    ``states`` whole-document states (a member's snapshot, which may repeat known edits)."""

    origin: str
    senders: tuple[str, ...]
    updates: int
    states: int = 0


@dataclass(frozen=True)
class Alarm:
    """Something the app must show the user: ``equivocation`` (syncnodes signed two different
    decisions for one slot — evidence is kept), ``invalid-decision``, ``bad-update``,
    ``removed``, ``new-document`` (a document offered through this one could not be joined)."""

    kind: str
    detail: str


@dataclass(frozen=True)
class NewDocument:
    """This device joined a document that an admin made with the members of this one
    (:meth:`Device.create_document` with ``from_group``; :mod:`device.group_docs`): ``id`` and
    ``name`` are the new document's, open it with ``device.document(id)``."""

    id: str
    name: str
    sender: str
    """The short id of the admin's device that made it."""


Event = Change | Alarm | NewDocument


@dataclass(frozen=True)
class Member:
    id: str
    fingerprint: bytes
    role: str
    endpoint_id: bytes
    is_self: bool


@dataclass(frozen=True)
class SyncStatus:
    epoch: int
    durable: int
    """Our updates a quorum of syncnodes has stored."""
    unsent: int
    """Local edits not yet sealed into an update (sealed within the flush interval)."""
    outbox: int
    """Sealed updates still waiting for a quorum of acknowledgements."""
    connected: tuple[str, ...]
    syncnodes: int
    status: str
    waiting_for: int = 0
    """Updates of other devices that this device knows of but does not hold, and that later
    updates wait for (they are applied in causal order): normally fetched from the syncnodes
    within moments."""
    gap: bool = False
    """Some of ``waiting_for`` are on no syncnode this device reached: it asked the members
    for the document's state (again, less and less often, until one that holds them is online
    and answers)."""
