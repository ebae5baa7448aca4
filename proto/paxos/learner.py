"""The learner: turns signed Accepteds (or relayed certificates) into verified decisions.

A value is decided for ``(group, slot)`` once a quorum of the slot's acceptors has signed
Accepted for the same ballot and value hash; those signatures are the decision
:class:`~proto.paxos.messages.Certificate`. Unsigned, forged or out-of-set votes are ignored.
If a second valid certificate for the same slot names a different value, the learner does not
pick one: it returns an :class:`~proto.paxos.messages.EquivocationProof` (both certificates) for
the application to raise as an alarm.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from proto.codec import encode_struct
from proto.identity import is_valid_signature
from proto.paxos.messages import (
    ACCEPTED_CTX,
    Accepted,
    Ballot,
    Certificate,
    EquivocationProof,
)
from proto.paxos.quorum import (
    AcceptorsFor,
    CertificateError,
    make_certificate,
    verify_certificate,
)


@dataclass(frozen=True)
class Decision:
    certificate: Certificate

    @property
    def value_hash(self) -> bytes:
        return self.certificate.value_hash


LearnEvent = Decision | EquivocationProof


@dataclass
class Learner:
    acceptors_for: AcceptorsFor
    decided: dict[tuple[bytes, int], Certificate] = field(default_factory=dict)
    proofs: list[EquivocationProof] = field(default_factory=list)
    _votes: dict[tuple[bytes, int, Ballot, bytes], dict[bytes, bytes]] = field(
        default_factory=dict)

    def on_accepted(self, msg: Accepted) -> LearnEvent | None:
        """Count one vote; returns an event when it completes a (new or conflicting) decision."""
        acceptors = self.acceptors_for(msg.group_id, msg.slot)
        if acceptors is None or msg.acceptor not in acceptors:
            return None
        if not is_valid_signature(msg.acceptor, ACCEPTED_CTX, encode_struct(msg.body()),
                                  msg.signature):
            return None
        key = (msg.group_id, msg.slot, msg.ballot, msg.value_hash)
        votes = self._votes.setdefault(key, {})
        if msg.acceptor in votes:
            return None
        votes[msg.acceptor] = msg.signature
        if len(votes) != acceptors.quorum:  # exactly at quorum: each certificate forms once
            return None
        cert = make_certificate(msg.group_id, msg.slot, msg.ballot, msg.value_hash, votes)
        return self._learn(cert)

    def on_certificate(self, cert: Certificate) -> LearnEvent | None:
        """Learn from a relayed certificate; raises CertificateError if it does not verify."""
        acceptors = self.acceptors_for(cert.group_id, cert.slot)
        if acceptors is None:
            raise CertificateError(f"no acceptor set known for slot {cert.slot}")
        verify_certificate(cert, acceptors)
        return self._learn(cert)

    def _learn(self, cert: Certificate) -> LearnEvent | None:
        slot_key = (cert.group_id, cert.slot)
        prior = self.decided.get(slot_key)
        if prior is None:
            self.decided[slot_key] = cert
            return Decision(cert)
        if prior.value_hash == cert.value_hash:
            return None
        proof = EquivocationProof(prior, cert)
        if proof not in self.proofs:
            self.proofs.append(proof)
        return proof

    def forget_below(self, group_id: bytes, slot: int) -> None:
        """Drop vote tallies of slots below ``slot`` (decisions are kept by the caller's log)."""
        for key in [k for k in self._votes if k[0] == group_id and k[1] < slot]:
            del self._votes[key]

