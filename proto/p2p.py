"""Device-to-device messages (tags ``0x81-0x8F``): initial state transfer for a joining device.

A new member connects directly (iroh) to a member device named in the manifest and asks for the
document: ``SnapshotRequest`` -> ``SnapshotOffer`` (size, hash, covered vector, all signed by the
sender's MLS signature key) -> ``SnapshotChunk`` frames until ``size`` bytes. Both sides check the
other's endpoint id against the manifest (the transport authenticates endpoint ids). The offer's
signature binds the whole snapshot by its hash, so a peer that sends garbage, a truncated or
altered snapshot, or one for another group is caught before anything is loaded. A transfer cut
off midway resumes at an offset from the same sender if it still holds that snapshot (same hash).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Annotated

from proto.codec import U64, Hash32, MaxItems, MaxLen, Signature64, encode_struct, message
from proto.identity import SecretKey, fingerprint, is_valid_signature, register_context
from proto.manifest import MAX_DEVICES
from proto.paxos.messages import GroupId
from proto.payload import Dep

SNAPSHOT_CTX = register_context("syncnode/p2p/snapshot/v1")
CHUNK = 256 * 1024
MAX_SNAPSHOT = 2 * 1024 * 1024 * 1024


@message(0x81)
@dataclass(frozen=True)
class SnapshotRequest:
    group_id: GroupId
    resume: Hash32 | None
    """Digest of a snapshot partly received from this peer; ``offset`` says how much."""
    offset: U64


@dataclass(frozen=True)
class SnapshotBody:
    group_id: GroupId
    epoch: U64
    size: U64
    digest: Hash32
    covers: Annotated[tuple[Dep, ...], MaxItems(MAX_DEVICES)]
    backend: Annotated[str, MaxLen(32)]


@message(0x82)
@dataclass(frozen=True)
class SnapshotOffer:
    body: SnapshotBody
    offset: U64
    """Where the chunks that follow start (0, or the requested resume offset)."""
    signer: Hash32
    signature: Signature64

    @classmethod
    def sign(cls, key: SecretKey, body: SnapshotBody, offset: int) -> SnapshotOffer:
        return cls(body, offset, fingerprint(key.public),
                   key.sign(SNAPSHOT_CTX, encode_struct(body)))

    def verify(self, sig_pub: bytes) -> bool:
        return is_valid_signature(sig_pub, SNAPSHOT_CTX, encode_struct(self.body), self.signature)


@message(0x83)
@dataclass(frozen=True)
class SnapshotChunk:
    offset: U64
    data: Annotated[bytes, MaxLen(CHUNK)]


def snapshot_digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=32, person=b"syncnode-snap").digest()
