"""Invite tickets and join requests (DESIGN.md "Join").

An invite ticket is what a member hands to a new device out of band (copy-paste): the group
(its id and the hash of its genesis), the inviter's MLS signature key, the group's syncnodes, a
one-time secret and an expiry. The new device answers with a :class:`JoinRequest` (its
KeyPackage and endpoint id, plus the secret) sealed to the inviter's key (X25519 derived from the
Ed25519 signature key) and left in the syncnodes' mailbox for the inviter. Sealing matters: the
syncnodes relay the request but must not learn the secret, or they could get their own key
package added.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Annotated

import nacl.bindings
import nacl.exceptions
import nacl.public

from proto.codec import (
    U64,
    Hash32,
    Len,
    MaxItems,
    MaxLen,
    PublicKey,
    decode_struct,
    encode_struct,
)
from proto.errors import DecodeError
from proto.identity import SecretKey
from proto.manifest import Role, SyncnodeEntry
from proto.paxos.messages import MAX_ACCEPTORS, GroupId
from proto.ticket import Addrs, from_text, to_text

PREFIX = "sninv1"
MAX_TICKET_CHARS = 4096
MAX_KEY_PACKAGE = 64 * 1024
MAX_NAME = 64


@dataclass(frozen=True)
class InviteTicket:
    group_id: GroupId
    genesis: Hash32
    """:func:`proto.manifest.genesis_hash` of the group's slot-0 value: the new device accepts
    only that genesis from the syncnodes, so one malicious syncnode cannot hand it a forged
    group under the same id (issue 14, finding 4).

    Why the ticket carries the hash rather than the group id being the hash of the genesis:
    both let the new device check, from the ticket alone, the genesis a syncnode serves. The
    hash in the ticket changes nothing else: group ids, the genesis format, what syncnodes store
    and check, and every existing group stay as they are, while deriving the id would change
    group creation and registration on devices and syncnodes for the same guarantee to the one
    party that needs it (the joiner). It costs 32 bytes of ticket. The whole value is hashed
    (not just its manifest) so there is no second encoding of a genesis to reason about."""
    inviter: PublicKey
    """The inviter's MLS signature key (join requests are sealed to it)."""
    inviter_endpoint: PublicKey
    inviter_addrs: Addrs
    """Where to reach the inviter directly for the initial state (peer to peer)."""
    syncnodes: Annotated[tuple[SyncnodeEntry, ...], MaxItems(MAX_ACCEPTORS)]
    secret: Annotated[bytes, Len(16)]
    expires_at: U64
    name: Annotated[str, MaxLen(MAX_NAME)] = ""
    """The document's name on the inviter's device, so ``show NAME`` works on the new one."""
    role: Role = Role.WRITER
    """The role the inviter gives the new device, so the joiner can show it. Informative
    only: the inviter adds the device with the role it recorded for this invite, never one a
    joiner claims (the ticket is the joiner's to edit)."""

    def __str__(self) -> str:
        return to_text(PREFIX, self)

    @classmethod
    def parse(cls, text: str) -> InviteTicket:
        text = "".join(text.split()).lower()  # QR codes carry it upper case
        try:
            return from_text(PREFIX, text, cls, field="<invite>", kind="an invite ticket",
                             max_chars=MAX_TICKET_CHARS)
        except DecodeError as exc:
            try:  # printed before roles: the same fields without the last one
                old = from_text(PREFIX, text, _InviteTicketNoRole, field="<invite>",
                                kind="an invite ticket", max_chars=MAX_TICKET_CHARS)
            except DecodeError:
                raise exc from None
            return cls(**{f: getattr(old, f) for f in old.__dataclass_fields__})


@dataclass(frozen=True)
class _InviteTicketNoRole:
    """An :class:`InviteTicket` as printed before roles (issue 16): valid for a day, so some
    are still in people's messages after an upgrade. Parsed as a writer invite, which it was."""

    group_id: GroupId
    genesis: Hash32
    inviter: PublicKey
    inviter_endpoint: PublicKey
    inviter_addrs: Addrs
    syncnodes: Annotated[tuple[SyncnodeEntry, ...], MaxItems(MAX_ACCEPTORS)]
    secret: Annotated[bytes, Len(16)]
    expires_at: U64
    name: Annotated[str, MaxLen(MAX_NAME)] = ""


def secret_hash(secret: bytes) -> bytes:
    return hashlib.blake2b(secret, digest_size=32, person=b"syncnode-invite").digest()


@dataclass(frozen=True)
class JoinRequest:
    group_id: GroupId
    secret: Annotated[bytes, Len(16)]
    key_package: Annotated[bytes, MaxLen(MAX_KEY_PACKAGE)]
    sig_pub: PublicKey
    endpoint_id: PublicKey
    addrs: Addrs
    """The new device's addresses: dialling hints recorded in the manifest."""

    def seal(self, inviter: bytes) -> bytes:
        pk = nacl.public.PublicKey(nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(inviter))
        return bytes(nacl.public.SealedBox(pk).encrypt(encode_struct(self)))

    @classmethod
    def open(cls, key: SecretKey, sealed: bytes) -> JoinRequest:
        """Decrypt a request sealed to ``key``; raises :class:`DecodeError`."""
        sk = nacl.public.PrivateKey(
            nacl.bindings.crypto_sign_ed25519_sk_to_curve25519(key.seed + key.public))
        try:
            raw = nacl.public.SealedBox(sk).decrypt(sealed)
        except nacl.exceptions.CryptoError:
            raise DecodeError("<join request>", "not sealed to this device") from None
        return decode_struct(raw, cls)
