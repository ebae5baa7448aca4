"""Paxos for the group log: one single-decree instance per ``(group, slot)``, sans-IO.

* :mod:`proto.paxos.messages` - wire messages, signed bodies, certificates
* :mod:`proto.paxos.acceptor` - the acceptor (runs on syncnodes)
* :mod:`proto.paxos.proposer` - the proposer (runs on devices)
* :mod:`proto.paxos.learner` - turns signed votes into verified decisions or equivocation proofs
* :mod:`proto.paxos.quorum` - acceptor sets, quorums, certificate verification
"""

from proto.paxos.acceptor import Acceptor, Reject, RejectReason, SlotState, Step
from proto.paxos.learner import Decision, Learner
from proto.paxos.messages import (
    Accept,
    Accepted,
    AcceptedValue,
    AcceptorRecord,
    Ballot,
    Certificate,
    Decided,
    EquivocationProof,
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
    "Accept", "Accepted", "AcceptedValue", "Acceptor", "AcceptorRecord", "AcceptorSet", "Ballot",
    "Certificate", "CertificateError", "Decided", "Decision", "EquivocationProof", "Learner",
    "Lost", "Nack", "Phase", "Prepare", "Promise", "Proposer", "Reject", "RejectReason",
    "SlotState", "Step", "value_hash", "verify_certificate", "verify_equivocation",
]
