"""What an inviter leaves on the syncnodes for the device it adds (DESIGN.md "Join").

A joiner must be able to get the document even if the inviter vanishes the moment the add is
decided and no other member is online. So, **before** it proposes the add, the inviter stores
the whole document on a quorum of the group's syncnodes, in the joiner's mailbox:

* :class:`HandoffPart` items: the snapshot cut into parts, the first carrying the inviter's
  signed :class:`~proto.p2p.SnapshotOffer` (size, hash and the vector the snapshot covers, the
  same signed statement as a peer-to-peer transfer). The joiner checks the signature against the
  inviter's entry in the verified manifest and the hash against the reassembled bytes.
* :class:`JoinRefusal`: the inviter's answer to a request with a spent, expired or unknown
  ticket, so the joiner stops waiting at once instead of at its timeout.

Both are encrypted and authenticated with a key derived from the ticket's one-time secret
(XSalsa20-Poly1305): only the inviter and the joiner know it, so the syncnodes learn nothing
from the parts and nobody else can forge a refusal. Each is bound to the group and to the
joiner's key, so it cannot be replayed to another device or document.

The join request itself goes the other way, into the invite's own **box** on each syncnode:
:func:`invite_box` derives an Ed25519 key pair from the secret; its public key is the mailbox
recipient, and the joiner proves each put with it (:func:`proto.service.put_proof`, bound to
that syncnode's id). So nobody without the ticket can put anything where the inviter reads join
requests, no registration is needed, and a syncnode (which sees only the public key) cannot
forge a request to the others. The inviter authenticates with the box key to read and ack it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Annotated, TypeVar

import nacl.exceptions
import nacl.secret

from proto.codec import U32, Hash32, MaxLen, PublicKey, decode_struct, encode_struct
from proto.errors import DecodeError
from proto.identity import SecretKey
from proto.invite import secret_hash
from proto.p2p import SnapshotOffer, snapshot_digest
from proto.paxos.messages import GroupId

PART_DATA = 192 * 1024
"""Snapshot bytes per mailbox item (a mailbox item holds at most 256 KiB)."""
MAX_HANDOFF = 32 * 1024 * 1024
"""Larger documents are not staged on the syncnodes (only peer-to-peer transfer and members'
answers through the syncnodes remain for them)."""
MAX_PARTS = -(-MAX_HANDOFF // PART_DATA)

T = TypeVar("T")


@dataclass(frozen=True)
class HandoffPart:
    group_id: GroupId
    joiner: PublicKey
    digest: Hash32
    """Hash of the whole snapshot (repeated in every part: parts of two stagings never mix)."""
    index: U32
    count: U32
    offer: SnapshotOffer | None
    """The inviter's signed offer, in part 0 only."""
    data: Annotated[bytes, MaxLen(PART_DATA)]


@dataclass(frozen=True)
class JoinRefusal:
    group_id: GroupId
    joiner: PublicKey
    reason: Annotated[str, MaxLen(200)]


def invite_box(secret: bytes) -> SecretKey:
    """The invite's mailbox key pair, from the ticket's secret (see the module docstring)."""
    return invite_box_from_hash(secret_hash(secret))


def invite_box_from_hash(hashed: bytes) -> SecretKey:
    """The same from :func:`proto.invite.secret_hash` of the secret: what the inviter keeps
    (it never stores the secret itself)."""
    return SecretKey(hashlib.blake2b(hashed, digest_size=32, person=b"syncnode-invbox").digest())


def _box(secret: bytes, purpose: bytes) -> nacl.secret.SecretBox:
    key = hashlib.blake2b(secret, digest_size=32, person=b"syncnode-" + purpose).digest()
    return nacl.secret.SecretBox(key)


def seal_parts(secret: bytes, offer: SnapshotOffer, joiner: bytes, data: bytes) -> list[bytes]:
    """The sealed mailbox payloads carrying ``data`` (whose signed ``offer`` names its hash)."""
    if len(data) > MAX_HANDOFF:
        raise ValueError(f"snapshot of {len(data)} bytes is over the handoff limit")
    count = max(1, -(-len(data) // PART_DATA))
    box = _box(secret, b"handoff")
    body = offer.body
    return [bytes(box.encrypt(encode_struct(HandoffPart(
        body.group_id, joiner, body.digest, i, count, offer if i == 0 else None,
        data[i * PART_DATA:(i + 1) * PART_DATA]))))
        for i in range(count)]


def open_part(secret: bytes, group_id: bytes, joiner: bytes, sealed: bytes) -> HandoffPart:
    """Decrypt one part; raises :class:`DecodeError` if it is not for this join."""
    part = _open(secret, b"handoff", sealed, HandoffPart)
    if part.group_id != group_id or part.joiner != joiner or part.count > MAX_PARTS \
            or part.index >= part.count or (part.index == 0) != (part.offer is not None):
        raise DecodeError("<handoff>", "a part of another join, or malformed")
    return part


def assemble(parts: dict[int, HandoffPart]) -> tuple[SnapshotOffer, bytes] | None:
    """The offer and the snapshot once every part is there and the hash matches; None while
    parts are missing. The caller verifies the offer's signature against the manifest."""
    first = parts.get(0)
    if first is None or first.offer is None or len(parts) < first.count:
        return None
    if any(p.digest != first.digest or p.count != first.count for p in parts.values()):
        raise DecodeError("<handoff>", "parts of different snapshots")
    data = b"".join(parts[i].data for i in range(first.count))
    if len(data) != first.offer.body.size or snapshot_digest(data) != first.digest \
            or first.offer.body.digest != first.digest:
        raise DecodeError("<handoff>", "the snapshot does not match its signed hash")
    return first.offer, data


def seal_refusal(secret: bytes, refusal: JoinRefusal) -> bytes:
    return bytes(_box(secret, b"refusal").encrypt(encode_struct(refusal)))


def open_refusal(secret: bytes, group_id: bytes, joiner: bytes, sealed: bytes) -> JoinRefusal:
    refusal = _open(secret, b"refusal", sealed, JoinRefusal)
    if refusal.group_id != group_id or refusal.joiner != joiner:
        raise DecodeError("<refusal>", "a refusal of another join")
    return refusal


def _open(secret: bytes, purpose: bytes, sealed: bytes, cls: type[T]) -> T:
    try:
        raw = _box(secret, purpose).decrypt(sealed)
    except (nacl.exceptions.CryptoError, ValueError):
        raise DecodeError(f"<{purpose.decode()}>", "not sealed with this ticket's secret") \
            from None
    return decode_struct(raw, cls)
