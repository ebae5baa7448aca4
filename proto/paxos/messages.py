"""Paxos wire messages, signed bodies and decision certificates (tags ``0x20-0x3F``, and
``0x66``/``0x67`` for the fast path).

What is signed, by whom, under which context (:mod:`proto.identity`):

* ``Prepare`` / ``Accept`` by the **proposer** (a device's MLS signature key): acceptors only act
  for members of the group at that slot, and nobody can spend another device's ballots.
* ``Promise`` / ``Accepted`` by the **acceptor** (the syncnode's node key). A quorum of signed
  Accepteds for one ``(group, slot, ballot, value hash)`` is a :class:`Certificate`: anyone can
  check a decision without trusting whoever relays it. A signed Promise also commits the acceptor
  to what it claimed to have accepted, so a lying acceptor leaves signed evidence.

``Nack`` is unsigned: it can only slow a proposer down, never make it decide.

The fast path (:class:`AcceptLeased` / :class:`AcceptedLeased`) adds no new kind of vote: an
acceptor that accepts slot ``n`` at ballot ``b`` may also give an ordinary signed
:class:`Promise` for ``(n + 1, b)``; a quorum of those is phase 1 of slot ``n + 1`` done in
advance (:class:`Lease`), so the next commit needs only phase 2.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import total_ordering
from typing import Annotated

from proto.codec import U16, U64, Hash32, MaxItems, MaxLen, PublicKey, Signature64, message
from proto.identity import register_context

PREPARE_CTX = register_context("syncnode/paxos/prepare/v1")
ACCEPT_CTX = register_context("syncnode/paxos/accept/v1")
PROMISE_CTX = register_context("syncnode/paxos/promise/v1")
ACCEPTED_CTX = register_context("syncnode/paxos/accepted/v1")

GroupId = Annotated[bytes, MaxLen(64)]
MAX_VALUE_BYTES = 8 * 1024 * 1024
Value = Annotated[bytes, MaxLen(MAX_VALUE_BYTES)]
MAX_ACCEPTORS = 31


def value_hash(value: bytes) -> bytes:
    """The 32-byte hash that acceptors sign instead of the (possibly large) value."""
    return hashlib.blake2b(value, digest_size=32, person=b"syncnode-value").digest()


@total_ordering
@dataclass(frozen=True)
class Ballot:
    """``(round, proposer fingerprint)``, ordered lexicographically; unique per proposer."""

    round: U64
    proposer: Hash32

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Ballot):
            return NotImplemented
        return (self.round, self.proposer) < (other.round, other.proposer)

    def __repr__(self) -> str:
        return f"Ballot({self.round}, {self.proposer.hex()[:8]})"


@dataclass(frozen=True)
class AcceptedValue:
    """What an acceptor reports having accepted: the ballot and the full value."""

    ballot: Ballot
    value: Value


# -- signed bodies (never sent alone; encoded canonically and signed) ---------------------------


@dataclass(frozen=True)
class PrepareBody:
    group_id: GroupId
    slot: U64
    ballot: Ballot


@dataclass(frozen=True)
class AcceptBody:
    group_id: GroupId
    slot: U64
    ballot: Ballot
    value_hash: Hash32


@dataclass(frozen=True)
class PromiseBody:
    group_id: GroupId
    slot: U64
    ballot: Ballot
    accepted_ballot: Ballot | None
    accepted_hash: Hash32 | None

    @classmethod
    def of(cls, group_id: bytes, slot: int, ballot: Ballot, accepted: AcceptedValue | None
           ) -> PromiseBody:
        """The signed form of a promise: the accepted value enters only by its hash."""
        if accepted is None:
            return cls(group_id, slot, ballot, None, None)
        return cls(group_id, slot, ballot, accepted.ballot, value_hash(accepted.value))


@dataclass(frozen=True)
class AcceptedBody:
    group_id: GroupId
    slot: U64
    ballot: Ballot
    value_hash: Hash32


# -- messages ----------------------------------------------------------------------------------


@message(0x20)
@dataclass(frozen=True)
class Prepare:
    group_id: GroupId
    slot: U64
    ballot: Ballot
    signature: Signature64

    def body(self) -> PrepareBody:
        return PrepareBody(self.group_id, self.slot, self.ballot)


@message(0x21)
@dataclass(frozen=True)
class Promise:
    group_id: GroupId
    slot: U64
    ballot: Ballot
    accepted: AcceptedValue | None
    acceptor: PublicKey
    signature: Signature64

    def body(self) -> PromiseBody:
        return PromiseBody.of(self.group_id, self.slot, self.ballot, self.accepted)


@message(0x22)
@dataclass(frozen=True)
class Accept:
    group_id: GroupId
    slot: U64
    ballot: Ballot
    value: Value
    signature: Signature64

    def body(self) -> AcceptBody:
        return AcceptBody(self.group_id, self.slot, self.ballot, value_hash(self.value))


@message(0x23)
@dataclass(frozen=True)
class Accepted:
    group_id: GroupId
    slot: U64
    ballot: Ballot
    value_hash: Hash32
    acceptor: PublicKey
    signature: Signature64

    def body(self) -> AcceptedBody:
        return AcceptedBody(self.group_id, self.slot, self.ballot, self.value_hash)


@message(0x24)
@dataclass(frozen=True)
class Nack:
    """Refusal because the acceptor promised a higher ballot (``promised``)."""

    group_id: GroupId
    slot: U64
    ballot: Ballot
    promised: Ballot
    acceptor: PublicKey


@dataclass(frozen=True)
class AcceptorSignature:
    acceptor: PublicKey
    signature: Signature64


@message(0x25)
@dataclass(frozen=True)
class Certificate:
    """A decision certificate: a quorum of acceptor signatures over one AcceptedBody."""

    group_id: GroupId
    slot: U64
    ballot: Ballot
    value_hash: Hash32
    signatures: Annotated[tuple[AcceptorSignature, ...], MaxItems(MAX_ACCEPTORS)]

    def body(self) -> AcceptedBody:
        return AcceptedBody(self.group_id, self.slot, self.ballot, self.value_hash)


@message(0x26)
@dataclass(frozen=True)
class Decided:
    """A decided value with its certificate, as served from the decided log."""

    value: Value
    certificate: Certificate


@message(0x27)
@dataclass(frozen=True)
class EquivocationProof:
    """Two valid certificates for one slot with different values: proof that a quorum's worth
    of acceptors (necessarily including misbehaving ones) signed conflicting decisions."""

    first: Certificate
    second: Certificate


@message(0x28)
@dataclass(frozen=True)
class AcceptorRecord:
    """Durable state of one acceptor for one ``(group, slot)``; the driver persists it before
    releasing the reply that depends on it. Reloading records restores the acceptor."""

    group_id: GroupId
    slot: U64
    promised: Ballot | None
    accepted: AcceptedValue | None


@message(0x29)
@dataclass(frozen=True)
class PaxosRejected:
    """An acceptor refused a request without changing anything. ``reason`` is the acceptor's
    :class:`proto.paxos.acceptor.RejectReason`; ``rule`` names the manifest rule a value broke
    (:class:`proto.manifest.Rule`, 0 when not a value problem)."""

    group_id: GroupId
    slot: U64
    reason: U16
    rule: U16
    detail: Annotated[str, MaxLen(512)]


@message(0x66)
@dataclass(frozen=True)
class AcceptLeased:
    """An :class:`Accept` for slot ``n`` that also asks each acceptor to promise the same ballot
    for slot ``n + 1`` (the proposer expects to commit again: :mod:`proto.paxos.lease`)."""

    accept: Accept

    @property
    def group_id(self) -> bytes:
        return self.accept.group_id

    @property
    def slot(self) -> int:
        return self.accept.slot

    @property
    def ballot(self) -> Ballot:
        return self.accept.ballot


@message(0x67)
@dataclass(frozen=True)
class AcceptedLeased:
    """The answer to :class:`AcceptLeased`: the Accepted vote for slot ``n`` and, when the
    acceptor could give it, its signed Promise of the same ballot for slot ``n + 1`` with
    nothing accepted there (None when it had promised a higher ballot or accepted a value)."""

    accepted: Accepted
    lease: Promise | None

    @property
    def group_id(self) -> bytes:
        return self.accepted.group_id

    @property
    def slot(self) -> int:
        return self.accepted.slot

    @property
    def ballot(self) -> Ballot:
        return self.accepted.ballot


@dataclass(frozen=True)
class Lease:
    """Promises for ``(group_id, slot, ballot)`` collected from the previous slot's
    :class:`AcceptedLeased` answers. Held by one proposer in memory and spent at most once:
    a proposer that used the ballot of a lease with one value must never use it with another.
    """

    group_id: bytes
    slot: int
    ballot: Ballot
    promises: tuple[Promise, ...]
