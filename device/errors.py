"""The device agent's errors (one module, so every engine module can raise them without
importing the document facade)."""

from __future__ import annotations

from proto.errors import SyncnodeError


class DocumentError(SyncnodeError):
    """The operation cannot be done on this document (removed, unknown device, ...)."""


class Offline(DocumentError):
    """Not enough syncnodes reachable for a membership change (it needs a quorum)."""


class JoinError(SyncnodeError):
    """The join could not complete (bad, spent or expired ticket, refused, no syncnode
    reachable, timeout)."""


class NotAllowed(DocumentError):
    """This device's role in the document does not permit the operation (only admins add,
    remove, invite and change roles; readers do not edit). Raised before any network."""
class JoinRefused(JoinError):
    """The inviter refused the ticket (spent, expired, unknown, or bound to another device):
    asking again with the same ticket cannot succeed."""
