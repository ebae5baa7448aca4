"""Acceptor sets, quorums, and certificate verification.

The acceptors of slot ``e`` are the syncnodes named in the group's manifest at epoch ``e`` (a
later issue wires manifests in); the core only sees an :class:`AcceptorSet` per slot, so a change
of syncnodes takes effect exactly at a slot boundary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from proto.codec import encode_struct
from proto.errors import SyncnodeError
from proto.identity import is_valid_signature
from proto.paxos.messages import (
    ACCEPTED_CTX,
    MAX_ACCEPTORS,
    AcceptorSignature,
    Ballot,
    Certificate,
    EquivocationProof,
)


class CertificateError(SyncnodeError):
    """A certificate or equivocation proof does not verify against the acceptor set."""


@dataclass(frozen=True)
class AcceptorSet:
    """The acceptors (node ids) of one slot. Quorum: a strict majority."""

    members: frozenset[bytes]

    def __post_init__(self) -> None:
        if not 1 <= len(self.members) <= MAX_ACCEPTORS:
            raise ValueError(f"an acceptor set needs 1..{MAX_ACCEPTORS} members")

    @classmethod
    def of(cls, *node_ids: bytes) -> AcceptorSet:
        return cls(frozenset(node_ids))

    @property
    def quorum(self) -> int:
        return len(self.members) // 2 + 1

    def __contains__(self, node_id: object) -> bool:
        return node_id in self.members

    def __len__(self) -> int:
        return len(self.members)


AcceptorsFor = Callable[[bytes, int], AcceptorSet | None]
"""``(group_id, slot) -> AcceptorSet`` (None: the slot's acceptor set is not known yet)."""


def verify_certificate(cert: Certificate, acceptors: AcceptorSet) -> None:
    """Raise :class:`CertificateError` unless ``cert`` proves a decision under ``acceptors``:
    distinct signers, all in the set, all signatures valid, at least a quorum of them."""
    seen: set[bytes] = set()
    body = encode_struct(cert.body())
    for entry in cert.signatures:
        if entry.acceptor in seen:
            raise CertificateError(f"acceptor {entry.acceptor.hex()[:10]} signed twice")
        if entry.acceptor not in acceptors:
            raise CertificateError(f"{entry.acceptor.hex()[:10]} is not an acceptor of the slot")
        if not is_valid_signature(entry.acceptor, ACCEPTED_CTX, body, entry.signature):
            raise CertificateError(f"bad signature from {entry.acceptor.hex()[:10]}")
        seen.add(entry.acceptor)
    if len(seen) < acceptors.quorum:
        raise CertificateError(f"{len(seen)} signatures, quorum is {acceptors.quorum}")


def verify_equivocation(proof: EquivocationProof, acceptors: AcceptorSet) -> None:
    """Raise unless ``proof`` holds two valid certificates for one slot with different values."""
    a, b = proof.first, proof.second
    if (a.group_id, a.slot) != (b.group_id, b.slot):
        raise CertificateError("certificates are for different slots")
    if a.value_hash == b.value_hash:
        raise CertificateError("certificates agree on the value")
    verify_certificate(a, acceptors)
    verify_certificate(b, acceptors)


def make_certificate(group_id: bytes, slot: int, ballot: Ballot, value_hash: bytes,
                     signatures: dict[bytes, bytes]) -> Certificate:
    """Assemble a certificate with signatures in canonical (sorted by acceptor) order."""
    return Certificate(group_id, slot, ballot, value_hash, tuple(
        AcceptorSignature(acc, sig) for acc, sig in sorted(signatures.items())))
