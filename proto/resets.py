"""A syncnode that lost its storage: the evidence a device keeps of it (``syncnode-reset``).

Every statement a syncnode signs names the **incarnation** of its storage (random bytes its
database is created with, :mod:`proto.holdings`). An honest node's incarnation changes only
when its database is lost and made again, e.g. a wiped data directory restarted with the same
key: it then honestly lacks what it acknowledged before (its peers refill it,
:mod:`syncnode.reconcile`), so a withholding proof across two incarnations is refused.

What is left is a fact worth telling the user, not hiding: the node forgot everything it had
acknowledged, at least once. :class:`StorageReset` is the evidence: two statements the node
signed under two incarnations. Like a withholding proof it needs nothing else to check, but it
proves much less: that the node's storage changed, not when, nor in which order (stamps of two
incarnations are not comparable: a lost database loses its statement clock too). A node that
resets often is unreliable; one that resets to escape a proof has, by resetting, publicly given
up everything it had acknowledged, which is what it would have been convicted of withholding.
"""

from __future__ import annotations

from dataclasses import dataclass

from proto.codec import message
from proto.errors import SyncnodeError
from proto.holdings import SignedAck, SignedBackfill, SignedHeads, Statement


class ResetError(SyncnodeError):
    """Reset evidence that does not hold up (forged, tampered, or one incarnation only)."""


@message(0x63)
@dataclass(frozen=True)
class StorageReset:
    """Two statements one syncnode signed under two incarnations of its storage: ``old_*`` is
    the one the device had kept (an ack or heads), ``new_*`` the first it received of another
    incarnation (exactly one of each set). Which came first is the device's word only."""

    old_ack: SignedAck | None = None
    old_heads: SignedHeads | None = None
    new_ack: SignedAck | None = None
    new_heads: SignedHeads | None = None
    new_backfill: SignedBackfill | None = None

    @property
    def old(self) -> SignedAck | SignedHeads | None:
        return self.old_ack if self.old_ack is not None else self.old_heads

    @property
    def new(self) -> Statement | None:
        return next((s for s in (self.new_ack, self.new_heads, self.new_backfill)
                     if s is not None), None)


@dataclass(frozen=True)
class Reset:
    """What valid reset evidence shows."""

    node_id: bytes
    old_incarnation: bytes
    new_incarnation: bytes

    def describe(self) -> str:
        return (f"syncnode {self.node_id.hex()} signed statements under two incarnations of its "
                f"storage ({self.old_incarnation.hex()} and {self.new_incarnation.hex()}): it "
                "lost what it had stored and acknowledged at least once")


def reset_between(old: SignedAck | SignedHeads, new: Statement) -> StorageReset | None:
    """The evidence, if ``new`` (verified) is by the node of ``old`` (kept, so verified) under
    another incarnation; None when it is the same incarnation or another node."""
    if new.node_id != old.node_id or new.incarnation == old.incarnation:
        return None
    return StorageReset(
        old_ack=old if isinstance(old, SignedAck) else None,
        old_heads=old if isinstance(old, SignedHeads) else None,
        new_ack=new if isinstance(new, SignedAck) else None,
        new_heads=new if isinstance(new, SignedHeads) else None,
        new_backfill=new if isinstance(new, SignedBackfill) else None)


def verify_reset(evidence: StorageReset) -> Reset:
    """What ``evidence`` shows, or :class:`ResetError`: both statements signed by the node id
    they carry, the same one, under different incarnations."""
    olds = (evidence.old_ack is not None) + (evidence.old_heads is not None)
    news = sum(s is not None for s in (evidence.new_ack, evidence.new_heads,
                                       evidence.new_backfill))
    old, new = evidence.old, evidence.new
    if olds != 1 or news != 1 or old is None or new is None:
        raise ResetError("reset evidence holds exactly one old and one new statement")
    if old.node_id != new.node_id:
        raise ResetError("the statements are signed by different syncnodes")
    if not old.valid() or not new.valid():
        raise ResetError("a statement's signature does not verify")
    if old.incarnation == new.incarnation:
        raise ResetError("both statements are of the same incarnation: nothing was reset")
    return Reset(old.node_id, old.incarnation, new.incarnation)


def reset_detail(node: bytes, old: bytes, new: bytes) -> str:
    """The ``syncnode-reset`` alarm's text (one alarm per change of incarnation)."""
    return (f"syncnode {node.hex()} lost its storage (incarnation {old.hex()[:8]}, now "
            f"{new.hex()[:8]}): it no longer holds what it acknowledged before (its peers give "
            "it back); a syncnode that resets often is unreliable")
