"""The Paxos acceptor, sans-IO: messages in, (records to persist, reply) out.

One single-decree instance per ``(group, slot)``. The acceptor never releases a reply itself:
:meth:`Acceptor.handle` returns a :class:`Step` whose ``persist`` records the driver must make
durable (fsync) **before** sending ``reply``. A crash between the two loses only the reply, which
the proposer's retry recovers; a reply never claims state that a restart could forget.

**Fast path.** :class:`~proto.paxos.messages.AcceptLeased` is an Accept for slot ``n`` that also
asks for a promise of its ballot ``b`` for slot ``n + 1``. The acceptor gives it only as an
ordinary promise would be given: when it has promised nothing above ``b`` for ``n + 1`` (it
never lowers a promise) and accepted nothing there (so the promise reports nothing). Both
records are persisted in the same step, before the reply: one fsync covers the vote for ``n``
and the promise for ``n + 1``.

Requests are authenticated: the proposer's signature must verify under the key the membership
view gives for the ballot's fingerprint at that slot, and the acceptor must itself be in the
slot's acceptor set. Anything else gets a :class:`Reject` and changes nothing.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass, field

from proto.codec import encode_struct
from proto.identity import SecretKey, fingerprint, is_valid_signature
from proto.paxos.messages import (
    ACCEPT_CTX,
    ACCEPTED_CTX,
    PREPARE_CTX,
    PROMISE_CTX,
    Accept,
    Accepted,
    AcceptedBody,
    AcceptedLeased,
    AcceptedValue,
    AcceptLeased,
    AcceptorRecord,
    Ballot,
    Nack,
    Prepare,
    Promise,
    PromiseBody,
    value_hash,
)
from proto.paxos.quorum import AcceptorsFor

ProposerKeyFor = Callable[[bytes, int, bytes], bytes | None]
"""``(group_id, slot, proposer fingerprint) -> signature public key`` of a device allowed to
propose at that slot, or None. Built from the manifest chain by the driver."""

ValidateValue = Callable[[bytes, int, bytes], tuple[int, str] | None]
"""``(group_id, slot, value) -> (rule, detail)`` when the value may not be decided at that slot
(e.g. its manifest does not follow the previous one), None when it may."""


class RejectReason(enum.IntEnum):
    NOT_AN_ACCEPTOR = 1
    NOT_A_MEMBER = 2
    BAD_SIGNATURE = 3
    UNKNOWN_SLOT = 4
    INVALID_VALUE = 5


@dataclass(frozen=True)
class Reject:
    """An unauthenticated or misdirected request; nothing was changed."""

    reason: RejectReason
    detail: str
    rule: int = 0


Reply = Promise | Accepted | AcceptedLeased | Nack | Reject


@dataclass(frozen=True)
class Step:
    """Persist ``persist`` durably, then send ``reply``."""

    persist: tuple[AcceptorRecord, ...]
    reply: Reply


@dataclass(frozen=True)
class SlotState:
    promised: Ballot | None = None
    accepted: AcceptedValue | None = None


EMPTY = SlotState()


@dataclass
class Acceptor:
    """Acceptor core for every group/slot this node serves.

    ``slots`` maps ``(group_id, slot)`` to state; the daemon passes a lazily loaded, bounded cache
    backed by its database, tests a dict.
    """

    key: SecretKey
    acceptors_for: AcceptorsFor
    proposer_key_for: ProposerKeyFor
    slots: MutableMapping[tuple[bytes, int], SlotState] = field(default_factory=dict)
    validate_value: ValidateValue | None = None

    @property
    def node_id(self) -> bytes:
        return self.key.public

    @classmethod
    def restore(cls, key: SecretKey, acceptors_for: AcceptorsFor,
                proposer_key_for: ProposerKeyFor, records: Iterable[AcceptorRecord]
                ) -> Acceptor:
        """Rebuild an acceptor from persisted records (later records win)."""
        acc = cls(key, acceptors_for, proposer_key_for)
        for r in records:
            acc.slots[(r.group_id, r.slot)] = SlotState(r.promised, r.accepted)
        return acc

    def state(self, group_id: bytes, slot: int) -> SlotState:
        return self.slots.get((group_id, slot), EMPTY)

    # -- request handling ---------------------------------------------------------------------

    def handle(self, msg: Prepare | Accept | AcceptLeased) -> Step:
        if isinstance(msg, Prepare):
            return self.handle_prepare(msg)
        if isinstance(msg, AcceptLeased):
            return self.handle_accept_leased(msg)
        return self.handle_accept(msg)

    def _refusal(self, msg: Prepare | Accept, ctx: str) -> Step | None:
        """The Step answering ``msg`` without any state change (Reject or Nack), or None when
        the request is authentic and not below this acceptor's promise."""
        group_id, slot, ballot = msg.group_id, msg.slot, msg.ballot
        acceptors = self.acceptors_for(group_id, slot)
        if acceptors is None:
            return _reject(RejectReason.UNKNOWN_SLOT, "no acceptor set known for this slot")
        if self.node_id not in acceptors:
            return _reject(RejectReason.NOT_AN_ACCEPTOR, "this node is not an acceptor of the slot")
        key = self.proposer_key_for(group_id, slot, ballot.proposer)
        if key is None or fingerprint(key) != ballot.proposer:
            return _reject(RejectReason.NOT_A_MEMBER, "ballot owner may not propose at this slot")
        if not is_valid_signature(key, ctx, encode_struct(msg.body()), msg.signature):
            return _reject(RejectReason.BAD_SIGNATURE, "proposer signature does not verify")
        promised = self.state(group_id, slot).promised
        if promised is not None and ballot < promised:
            return Step((), Nack(group_id, slot, ballot, promised, self.node_id))
        return None

    def handle_prepare(self, msg: Prepare) -> Step:
        refused = self._refusal(msg, PREPARE_CTX)
        if refused:
            return refused
        st = self.state(msg.group_id, msg.slot)
        persist: tuple[AcceptorRecord, ...] = ()
        if st.promised != msg.ballot:
            st = SlotState(msg.ballot, st.accepted)
            persist = (self._commit(msg.group_id, msg.slot, st),)
        return Step(persist, self._promise(msg.group_id, msg.slot, msg.ballot, st.accepted))

    def handle_accept(self, msg: Accept) -> Step:
        refused = self._refusal(msg, ACCEPT_CTX)
        if refused:
            return refused
        if self.validate_value is not None:
            problem = self.validate_value(msg.group_id, msg.slot, msg.value)
            if problem is not None:
                return Step((), Reject(RejectReason.INVALID_VALUE, problem[1], problem[0]))
        st = self.state(msg.group_id, msg.slot)
        new = SlotState(msg.ballot, AcceptedValue(msg.ballot, msg.value))
        persist = () if new == st else (self._commit(msg.group_id, msg.slot, new),)
        return Step(persist, self._accepted(msg.group_id, msg.slot, msg.ballot, msg.value))

    def handle_accept_leased(self, msg: AcceptLeased) -> Step:
        """Accept ``msg.accept`` as usual; if accepted, also promise its ballot for the next
        slot when that is what Prepare would do with nothing to report (see the module doc)."""
        step = self.handle_accept(msg.accept)
        if not isinstance(step.reply, Accepted):
            return step  # refused: no lease either
        persist, lease = self._lease(msg.accept)
        return Step(step.persist + persist, AcceptedLeased(step.reply, lease))

    def _lease(self, accept: Accept) -> tuple[tuple[AcceptorRecord, ...], Promise | None]:
        """The promise of ``accept.ballot`` for ``accept.slot + 1`` and the record that makes
        it durable, or no promise. Never lowers a promise: a higher one made to another
        proposer must keep its Accepts below it out (that is what makes the lease safe)."""
        group_id, nxt, ballot = accept.group_id, accept.slot + 1, accept.ballot
        st = self.state(group_id, nxt)
        if st.accepted is not None or (st.promised is not None and ballot < st.promised):
            return (), None
        persist: tuple[AcceptorRecord, ...] = ()
        if st.promised != ballot:
            persist = (self._commit(group_id, nxt, SlotState(ballot, None)),)
        return persist, self._promise(group_id, nxt, ballot, None)

    # -- helpers ------------------------------------------------------------------------------

    def _commit(self, group_id: bytes, slot: int, st: SlotState) -> AcceptorRecord:
        """Adopt ``st`` in memory and return the record that makes it durable."""
        self.slots[(group_id, slot)] = st
        return AcceptorRecord(group_id, slot, st.promised, st.accepted)

    def _promise(self, group_id: bytes, slot: int, ballot: Ballot,
                 accepted: AcceptedValue | None) -> Promise:
        body = PromiseBody.of(group_id, slot, ballot, accepted)
        sig = self.key.sign(PROMISE_CTX, encode_struct(body))
        return Promise(group_id, slot, ballot, accepted, self.node_id, sig)

    def _accepted(self, group_id: bytes, slot: int, ballot: Ballot, value: bytes) -> Accepted:
        h = value_hash(value)
        sig = self.key.sign(ACCEPTED_CTX, encode_struct(AcceptedBody(group_id, slot, ballot, h)))
        return Accepted(group_id, slot, ballot, h, self.node_id, sig)


def _reject(reason: RejectReason, detail: str) -> Step:
    return Step((), Reject(reason, detail))
