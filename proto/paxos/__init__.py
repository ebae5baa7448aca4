"""Paxos for the group log: one single-decree instance per ``(group, slot)``, sans-IO.

* :mod:`proto.paxos.messages` - wire messages, signed bodies, certificates
* :mod:`proto.paxos.acceptor` - the acceptor (runs on syncnodes)
* :mod:`proto.paxos.proposer` - the proposer (runs on devices)
* :mod:`proto.paxos.learner` - turns signed votes into verified decisions or equivocation proofs
* :mod:`proto.paxos.quorum` - acceptor sets, quorums, certificate verification

The fast path (a lease: the next slot's phase 1 done with this slot's phase 2) is spread over
the acceptor (:meth:`Acceptor.handle_accept_leased`), the proposer (``want_lease``,
:meth:`Proposer.next_lease`, ``lease``) and the messages (:class:`AcceptLeased`,
:class:`AcceptedLeased`, :class:`Lease`).
"""

from proto.paxos.acceptor import Acceptor, Reject, RejectReason, SlotState, Step
from proto.paxos.learner import Decision, Learner
from proto.paxos.messages import (
    Accept,
    Accepted,
    AcceptedLeased,
    AcceptedValue,
    AcceptLeased,
    AcceptorRecord,
    Ballot,
    Certificate,
    Decided,
    EquivocationProof,
    Lease,
    Nack,
    Prepare,
    Promise,
    value_hash,
)
from proto.paxos.proposer import Lost, Phase, Proposer
from proto.paxos.quorum import (
    AcceptorSet,
    CertificateError,
    verify_certificate,
    verify_equivocation,
)

__all__ = [
    "Accept", "AcceptLeased", "Accepted", "AcceptedLeased", "AcceptedValue", "Acceptor",
    "AcceptorRecord", "AcceptorSet", "Ballot",
    "Certificate", "CertificateError", "Decided", "Decision", "EquivocationProof", "Learner",
    "Lease", "Lost", "Nack", "Phase", "Prepare", "Promise", "Proposer", "Reject", "RejectReason",
    "SlotState", "Step", "value_hash", "verify_certificate", "verify_equivocation",
]
