"""The Paxos proposer for one ``(group, slot)``, sans-IO.

Drive it with :meth:`Proposer.start`, :meth:`Proposer.receive` and :meth:`Proposer.retry`; each
returns the messages to broadcast to the slot's acceptors. The driver owns time: it calls
``retry()`` after a timeout or, when :attr:`Proposer.wants_retry` is set by a Nack, after a
randomised backoff (jitter is the driver's, so the core stays deterministic).

Safety rule of phase 2: if any promise in the quorum reports an accepted value, the proposer
proposes the one with the highest ballot, never its own. The outcome is
:class:`~proto.paxos.messages.Decided` when its own value was chosen, :class:`Lost` when another
was (the driver then processes the winner and may retry in the next slot), or an
:class:`~proto.paxos.messages.EquivocationProof`.

**Fast path.** With ``want_lease`` phase 2 sends :class:`~proto.paxos.messages.AcceptLeased`,
and the signed next-slot promises that come back with the votes of the current ballot are kept;
:meth:`Proposer.next_lease` hands them over once the slot is decided. A proposer built with that
``lease`` for the next slot starts at the lease's ballot with those promises already in, as if
its own Prepare had just been answered: when they are a quorum of *its* slot's acceptors it
sends Accept at once (one round trip); otherwise, and on any retry, it runs the full protocol
with a higher round. The lease is spent by :meth:`Proposer.start` whatever happens, so its
ballot carries at most one value.
"""

from __future__ import annotations

import copy
import enum
from dataclasses import dataclass

from proto.codec import encode_struct
from proto.identity import SecretKey, fingerprint, is_valid_signature
from proto.paxos.learner import Decision, Learner
from proto.paxos.messages import (
    ACCEPT_CTX,
    PREPARE_CTX,
    PROMISE_CTX,
    Accept,
    AcceptBody,
    Accepted,
    AcceptedLeased,
    AcceptLeased,
    Ballot,
    Certificate,
    Decided,
    EquivocationProof,
    Lease,
    Nack,
    Prepare,
    PrepareBody,
    Promise,
    value_hash,
)
from proto.paxos.quorum import AcceptorSet

__all__ = ["Lost", "Outcome", "Phase", "Proposer"]


class Phase(enum.Enum):
    IDLE = "idle"
    PREPARING = "preparing"
    ACCEPTING = "accepting"
    BACKING_OFF = "backing-off"
    DONE = "done"


@dataclass(frozen=True)
class Lost:
    """Another value was decided. ``value`` is None when this proposer never saw it (fetch it
    from the decided log by its certificate's hash)."""

    value: bytes | None
    certificate: Certificate


Outcome = Decided | Lost | EquivocationProof


class Proposer:
    def __init__(self, key: SecretKey, group_id: bytes, slot: int, value: bytes,
                 acceptors: AcceptorSet, *, first_round: int = 1, lease: Lease | None = None,
                 want_lease: bool = False) -> None:
        self.key = key
        self.fingerprint = fingerprint(key.public)
        self.group_id = group_id
        self.slot = slot
        self.own_value = value
        self.acceptors = acceptors
        self.round = 0
        self._next_round = max(1, first_round)
        self.phase = Phase.IDLE
        self.proposal: bytes | None = None
        self.promises: dict[bytes, Promise] = {}
        self.outcome: Outcome | None = None
        self._known_values = {value_hash(value): value}
        self.learner = Learner(lambda g, s: acceptors if (g, s) == (group_id, slot) else None)
        self.want_lease = want_lease
        self.lease_promises: dict[bytes, Promise] = {}
        """Next-slot promises of the current ballot (fast path), by acceptor."""
        self._lease = lease if lease is not None and _lease_fits(lease, self) else None
        if lease is not None:
            self._next_round = max(self._next_round, lease.ballot.round + 1)

    @property
    def ballot(self) -> Ballot:
        return Ballot(self.round, self.fingerprint)

    @property
    def wants_retry(self) -> bool:
        return self.phase is Phase.BACKING_OFF

    def start(self) -> list[Prepare] | list[Accept | AcceptLeased]:
        """Begin (or restart) phase 1 with a round above every round seen so far; the first
        call with a lease that is a quorum of this slot's acceptors goes to phase 2 at once."""
        if self.phase is Phase.DONE:
            return []
        lease, self._lease = self._lease, None  # spent, whatever comes of it
        if lease is not None:
            fast = self._start_leased(lease)
            if fast:
                return fast
        self.round = self._next_round
        self._next_round = self.round + 1
        self.phase = Phase.PREPARING
        self.promises = {}
        self.proposal = None
        body = PrepareBody(self.group_id, self.slot, self.ballot)
        return [Prepare(self.group_id, self.slot, self.ballot,
                        self.key.sign(PREPARE_CTX, encode_struct(body)))]

    def retry(self) -> list[Prepare]:
        """A timeout or a Nack both mean: try again with a higher ballot (full protocol)."""
        self._lease = None
        out = self.start()
        return out  # type: ignore[return-value]  # without a lease start() only prepares

    def _start_leased(self, lease: Lease) -> list[Accept | AcceptLeased]:
        """Phase 2 straight away at the lease's ballot, if its promises make a quorum."""
        self.round = lease.ballot.round
        self.phase = Phase.PREPARING
        self.promises = {}
        self.proposal = None
        self.lease_promises = {}
        out: list[Accept | AcceptLeased] = []
        for p in lease.promises:
            if p.accepted is None:  # a lease reports nothing accepted, by construction
                out.extend(self._on_promise(p))
        if out:
            return out
        self.phase = Phase.IDLE
        return []

    def next_lease(self) -> Lease | None:
        """The promises for slot + 1 gathered with this slot's decision, if it is decided and
        any came (whether they are a quorum is for the next slot's acceptor set to say)."""
        if self.outcome is None or isinstance(self.outcome, EquivocationProof):
            return None
        if not self.lease_promises:
            return None
        return Lease(self.group_id, self.slot + 1, self.ballot,
                     tuple(p for _, p in sorted(self.lease_promises.items())))

    def receive(self, msg: Promise | Accepted | AcceptedLeased | Nack
                ) -> list[Prepare | Accept | AcceptLeased]:
        if (msg.group_id, msg.slot) != (self.group_id, self.slot):
            return []
        if self.phase is Phase.DONE:  # late votes can still bring lease promises
            if isinstance(msg, AcceptedLeased):
                self._on_lease(msg)
            return []
        if isinstance(msg, AcceptedLeased):
            self._on_lease(msg)
            self._on_accepted(msg.accepted)
            return []
        if isinstance(msg, Promise):
            return list(self._on_promise(msg))
        if isinstance(msg, Accepted):
            self._on_accepted(msg)
            return []
        self._on_nack(msg)
        return []

    def _on_lease(self, msg: AcceptedLeased) -> None:
        """Keep the next-slot promise that came with a vote for our current ballot."""
        p, vote = msg.lease, msg.accepted
        if (p is None or self.phase not in (Phase.ACCEPTING, Phase.DONE)
                or self.proposal is None or vote.ballot != self.ballot
                or p.ballot != self.ballot or p.acceptor != vote.acceptor
                or (p.group_id, p.slot) != (self.group_id, self.slot + 1)
                or p.accepted is not None or p.acceptor not in self.acceptors):
            return
        if not is_valid_signature(p.acceptor, PROMISE_CTX, encode_struct(p.body()), p.signature):
            return
        self.lease_promises[p.acceptor] = p

    def _on_promise(self, msg: Promise) -> list[Accept | AcceptLeased]:
        if (self.phase is not Phase.PREPARING or msg.ballot != self.ballot
                or msg.acceptor not in self.acceptors or msg.acceptor in self.promises):
            return []
        if not is_valid_signature(msg.acceptor, PROMISE_CTX, encode_struct(msg.body()),
                                  msg.signature):
            return []
        if msg.accepted is not None:
            if not msg.accepted.ballot < self.ballot:
                return []  # cannot have accepted at or above the ballot it is promising
            self._known_values[value_hash(msg.accepted.value)] = msg.accepted.value
        self.promises[msg.acceptor] = msg
        if len(self.promises) < self.acceptors.quorum:
            return []
        reported = [p.accepted for p in self.promises.values() if p.accepted is not None]
        if reported:
            self.proposal = max(reported, key=lambda a: a.ballot).value
        else:
            self.proposal = self.own_value
        self.phase = Phase.ACCEPTING
        self.lease_promises = {}
        body = AcceptBody(self.group_id, self.slot, self.ballot, value_hash(self.proposal))
        accept = Accept(self.group_id, self.slot, self.ballot, self.proposal,
                        self.key.sign(ACCEPT_CTX, encode_struct(body)))
        return [AcceptLeased(accept) if self.want_lease else accept]

    def _on_accepted(self, msg: Accepted) -> None:
        event = self.learner.on_accepted(msg)
        if isinstance(event, EquivocationProof):
            self.outcome = event
            self.phase = Phase.DONE
        elif isinstance(event, Decision):
            cert = event.certificate
            value = self._known_values.get(cert.value_hash)
            if value == self.own_value:
                self.outcome = Decided(value, cert)
            else:
                self.outcome = Lost(value, cert)
            self.phase = Phase.DONE

    def _on_nack(self, msg: Nack) -> None:
        if msg.acceptor not in self.acceptors:
            return
        self._next_round = max(self._next_round, msg.promised.round + 1)
        if msg.ballot == self.ballot and self.phase in (Phase.PREPARING, Phase.ACCEPTING):
            self.phase = Phase.BACKING_OFF

    def clone(self) -> Proposer:
        """An independent copy (for simulators that branch on one proposer state)."""
        q = copy.copy(self)
        q.promises = dict(self.promises)
        q.lease_promises = dict(self.lease_promises)
        q._known_values = dict(self._known_values)
        q.learner = Learner(self.learner.acceptors_for, dict(self.learner.decided),
                            list(self.learner.proofs),
                            {k: dict(v) for k, v in self.learner._votes.items()})
        return q

    def snapshot(self) -> tuple[object, ...]:
        """Hashable summary of the proposer's state (for state-space exploration)."""
        return (self.round, self._next_round, self.phase, self.proposal,
                tuple(sorted(self.promises)), self.outcome, tuple(sorted(self.lease_promises)),
                self._lease is not None,
                tuple(sorted((k, tuple(sorted(v))) for k, v in self.learner._votes.items())))


def _lease_fits(lease: Lease, p: Proposer) -> bool:
    """A lease is only ever for the slot, group and proposer it was gathered for."""
    return ((lease.group_id, lease.slot) == (p.group_id, p.slot)
            and lease.ballot.proposer == p.fingerprint)
