"""Leave requests: a member asks the group's admins to remove it.

MLS (mls-rs) refuses a commit that removes its own committer, so a device cannot take itself
out of a group. Leaving is therefore a request that an admin carries out: the leaver signs a
:class:`LeaveRequest` with its MLS signature key (the key the manifest names) and leaves it in
the mailbox of each admin's device key on the group's syncnodes (``MailboxKind.LEAVE_REQUEST``;
a syncnode takes that kind only from a current member of the group the put names). An admin
device that reads it checks the signature against the manifest and commits the removal through
Paxos like any other (:mod:`device.leaving`).

The request is signed but not sealed: the syncnodes already see who is a member, and learn at
the removal anyway. The signature binds the group, so a request cannot be replayed into
another group; one replayed later in the same group only asks to remove a device that is gone
or that asked to go.
"""

from __future__ import annotations

from dataclasses import dataclass

from proto.codec import U64, Hash32, Signature64, decode_struct, encode_struct
from proto.identity import SecretKey, fingerprint, is_valid_signature, register_context
from proto.paxos.messages import GroupId

LEAVE_CTX = register_context("syncnode/leave/v1")


@dataclass(frozen=True)
class LeaveBody:
    group_id: GroupId
    leaver: Hash32
    """The leaving device's fingerprint (of its MLS signature key)."""
    epoch: U64
    """The leaver's epoch when it asked (for the admins' logs)."""


@dataclass(frozen=True)
class LeaveRequest:
    body: LeaveBody
    signature: Signature64

    @classmethod
    def sign(cls, key: SecretKey, group_id: bytes, epoch: int) -> LeaveRequest:
        body = LeaveBody(group_id, fingerprint(key.public), epoch)
        return cls(body, key.sign(LEAVE_CTX, encode_struct(body)))

    def verify(self, sig_pub: bytes) -> bool:
        return fingerprint(sig_pub) == self.body.leaver and is_valid_signature(
            sig_pub, LEAVE_CTX, encode_struct(self.body), self.signature)

    def encode(self) -> bytes:
        return encode_struct(self)

    @classmethod
    def decode(cls, data: bytes) -> LeaveRequest:
        """Raises :class:`proto.errors.DecodeError`."""
        return decode_struct(data, cls)
