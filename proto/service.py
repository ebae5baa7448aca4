"""Requests and responses of the syncnode service (tags ``0x40-0x7F``).

Conversation shape: a client opens a stream and sends request frames; the syncnode answers each,
in order, with one response frame (a success message below, a Paxos reply, or
:class:`proto.messages.ErrorReply`). Requests on one stream may be pipelined. ``Subscribe`` turns
its stream into a push stream: after ``Subscribed`` the syncnode sends :class:`Envelope` and
:class:`proto.paxos.messages.Decided` frames as they are stored.

Authentication: the transport authenticates the peer's endpoint id; devices additionally prove
that they hold an MLS signature key by signing the connection's challenge
(:class:`AuthBody`). Member-only requests (store, backfill, subscribe) check that key against the
group's current manifest; mailbox fetches check it against the recipient.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass
from typing import Annotated

from proto.codec import (
    U32,
    U64,
    Hash32,
    Len,
    MaxItems,
    MaxLen,
    PublicKey,
    Signature64,
    encode_struct,
    message,
)
from proto.envelope import Envelope
from proto.identity import SecretKey, is_valid_signature, register_context
from proto.paxos.messages import Decided, GroupId

AUTH_CTX = register_context("syncnode/auth/v1")
PUT_PROOF_CTX = register_context("syncnode/mailbox-put/v1")
MAX_PAGE = 1024
MAX_COVERED_SENDERS = 1000
"""Senders a compaction point covers (:data:`proto.compaction.MAX_SENDERS`)."""
INCARNATION_BYTES = 16
Incarnation = Annotated[bytes, Len(INCARNATION_BYTES)]
"""Which life of a syncnode's storage signed a statement: random bytes made with its database,
new when the database is lost and made again (:mod:`proto.holdings`)."""
MAX_HEADS = 256
MAX_MAILBOX_PAYLOAD = 256 * 1024
MAX_JOIN_REQUEST = 64 * 1024
"""Largest ``KEY_PACKAGE`` payload: a sealed join request is a few KiB."""


@dataclass(frozen=True)
class AuthBody:
    """What a device signs to authenticate on one connection: the syncnode it talks to, its own
    transport endpoint id, and the syncnode's fresh nonce (so a signature is never reusable)."""

    node_id: PublicKey
    client_endpoint: PublicKey
    nonce: Annotated[bytes, Len(32)]


@message(0x40)
@dataclass(frozen=True)
class GetChallenge:
    pass


@message(0x41)
@dataclass(frozen=True)
class Challenge:
    nonce: Annotated[bytes, Len(32)]


@message(0x42)
@dataclass(frozen=True)
class Authenticate:
    public_key: PublicKey
    signature: Signature64


@message(0x43)
@dataclass(frozen=True)
class Authenticated:
    fingerprint: Hash32


@message(0x44)
@dataclass(frozen=True)
class RegisterGroup:
    """Create a group from its signed genesis record (an encoded ``LogValue``)."""

    value: Annotated[bytes, MaxLen(256 * 1024)]


@message(0x45)
@dataclass(frozen=True)
class GroupRegistered:
    group_id: GroupId
    created: bool
    """False when the same genesis was already registered (registration is idempotent)."""


@message(0x46)
@dataclass(frozen=True)
class FetchDecided:
    group_id: GroupId
    from_slot: U64
    limit: U32


@message(0x47)
@dataclass(frozen=True)
class DecidedPage:
    """Slots ``from_slot..``; ``genesis`` is set when slot 0 was asked for. ``top`` is the
    highest slot this syncnode has decided, so a client knows whether to ask again."""

    group_id: GroupId
    genesis: Annotated[bytes, MaxLen(256 * 1024)] | None
    decided: Annotated[tuple[Decided, ...], MaxItems(MAX_PAGE)]
    top: U64


@dataclass(frozen=True)
class Head:
    group_id: GroupId
    top: U64


@message(0x48)
@dataclass(frozen=True)
class FetchHeads:
    group_ids: Annotated[tuple[GroupId, ...], MaxItems(MAX_HEADS)]


@message(0x49)
@dataclass(frozen=True)
class Heads:
    """Top decided slot of each requested group this syncnode hosts (unknown ones omitted)."""

    heads: Annotated[tuple[Head, ...], MaxItems(MAX_HEADS)]


@message(0x4B)
@dataclass(frozen=True)
class Stored:
    """The envelope ``(group, sender, seq)`` is durable on this syncnode: a signed ack
    (:class:`proto.holdings.AckBody`, under the syncnode's node key) of the envelope's
    ``digest``, by the ``incarnation`` of the node's storage that holds it, stamped ``at`` on
    the node's statement clock, so that a later loss is provable (:mod:`proto.holdings`)."""

    group_id: GroupId
    sender: Hash32
    seq: U64
    digest: Hash32
    incarnation: Incarnation
    at: U64
    signature: Signature64


@dataclass(frozen=True)
class Watermark:
    sender: Hash32
    seq: U64


@message(0x4C)
@dataclass(frozen=True)
class Backfill:
    """Envelopes with ``seq`` above the watermark of their sender (senders not listed: all)."""

    group_id: GroupId
    watermarks: Annotated[tuple[Watermark, ...], MaxItems(4096)]
    limit: U32


@message(0x4D)
@dataclass(frozen=True)
class BackfillPage:
    """``signature``: the syncnode's over :class:`proto.holdings.BackfillBody` (the request's
    watermarks, what this page returns, ``more``, the storage ``incarnation`` that answered,
    stamped ``at``): a complete answer that leaves out an envelope the node said it held is
    provable (:mod:`proto.holdings`)."""

    envelopes: Annotated[tuple[Envelope, ...], MaxItems(MAX_PAGE)]
    more: bool
    incarnation: Incarnation
    at: U64
    signature: Signature64
    covered: Annotated[tuple[Watermark, ...], MaxItems(MAX_COVERED_SENDERS)] = ()
    """The covered vector of the compaction the node applied, signed with the page."""


@message(0x4E)
@dataclass(frozen=True)
class Subscribe:
    group_id: GroupId


@message(0x4F)
@dataclass(frozen=True)
class Subscribed:
    group_id: GroupId
    top: U64


class MailboxKind(enum.IntEnum):
    KEY_PACKAGE = 1
    WELCOME = 2
    INVITE_REPLY = 3
    STATE_HANDOFF = 4
    """A part of the document state an inviter leaves for the device it adds."""
    JOIN_REFUSED = 5
    """The inviter's answer to a join request with a spent, expired or unknown ticket."""
    LEAVE_REQUEST = 6
    """A member's signed request to be removed, left for each admin (:mod:`proto.leave`)."""


@message(0x50)
@dataclass(frozen=True)
class MailboxPut:
    """Leave ``payload`` for the holder of ``recipient`` (a public key) for ``ttl`` seconds.

    Who may put what (the syncnode checks it before storing anything):

    * ``KEY_PACKAGE`` (a join request, at most :data:`MAX_JOIN_REQUEST` bytes): anyone who knows
      the invite ticket. ``recipient`` is the invite's **box key**, an Ed25519 key derived from
      the ticket's secret (:func:`proto.handoff.invite_box`), and ``proof`` is the box key's
      signature over :class:`MailboxPutProof` (this syncnode's id, recipient, kind, payload
      hash, ttl). The syncnode checks it against ``recipient`` itself: it needs no registration
      and learns only the public key, so even a malicious syncnode cannot forge a request to
      the others, and a proof is useless on any other syncnode.
    * every other kind: a session authenticated as a current member of ``group_id``, a group
      this syncnode hosts (the inviter staging the document for a joiner, or refusing it).

    Puts are further bounded per box, per sender (the member's key, or the endpoint of an
    unauthenticated join request), per endpoint over time, and node-wide (``[limits]``).
    """

    recipient: PublicKey
    kind: MailboxKind
    payload: Annotated[bytes, MaxLen(MAX_MAILBOX_PAYLOAD)]
    ttl: U32
    group_id: GroupId | None = None
    """The group the sender acts for as a member (every kind but ``KEY_PACKAGE``)."""
    proof: Signature64 | None = None
    """``KEY_PACKAGE`` only: the recipient (box) key's signature over :class:`MailboxPutProof`."""


@dataclass(frozen=True)
class MailboxPutProof:
    """What a join request's box key signs: the put is good on this syncnode only, for this
    payload and lifetime."""

    node_id: PublicKey
    recipient: PublicKey
    kind: MailboxKind
    payload_hash: Hash32
    ttl: U32

    @classmethod
    def of(cls, node_id: bytes, put: MailboxPut) -> MailboxPutProof:
        digest = hashlib.blake2b(put.payload, digest_size=32, person=b"syncnode-mbput").digest()
        return cls(node_id, put.recipient, put.kind, digest, put.ttl)


def put_proof(box: SecretKey, node_id: bytes, kind: MailboxKind, payload: bytes, ttl: int
              ) -> bytes:
    """The ``proof`` of a put of ``payload`` into the mailbox of ``box`` on syncnode
    ``node_id``."""
    put = MailboxPut(box.public, kind, payload, ttl)
    return box.sign(PUT_PROOF_CTX, encode_struct(MailboxPutProof.of(node_id, put)))


def put_proof_valid(node_id: bytes, put: MailboxPut) -> bool:
    """Whether ``put`` carries the recipient key's signature for syncnode ``node_id``."""
    return put.proof is not None and is_valid_signature(
        put.recipient, PUT_PROOF_CTX, encode_struct(MailboxPutProof.of(node_id, put)), put.proof)


@message(0x51)
@dataclass(frozen=True)
class MailboxStored:
    item_id: U64


@message(0x52)
@dataclass(frozen=True)
class MailboxFetch:
    """Items for ``recipient`` with id above ``after``; the connection must have authenticated
    with the recipient key."""

    recipient: PublicKey
    after: U64
    limit: U32


@dataclass(frozen=True)
class MailboxItem:
    item_id: U64
    kind: MailboxKind
    payload: Annotated[bytes, MaxLen(MAX_MAILBOX_PAYLOAD)]
    expires_at: U64


@message(0x53)
@dataclass(frozen=True)
class MailboxItems:
    items: Annotated[tuple[MailboxItem, ...], MaxItems(MAX_PAGE)]
    more: bool = False
    """The page was cut (by ``limit`` or its byte budget): ask again after its last item."""


@message(0x54)
@dataclass(frozen=True)
class MailboxAck:
    """Delete the given items (after the recipient has processed them)."""

    recipient: PublicKey
    item_ids: Annotated[tuple[U64, ...], MaxItems(MAX_PAGE)]


@message(0x56)
@dataclass(frozen=True)
class MailboxNotice:
    """Pushed on a subscription when an item arrives for a key the subscriber authenticated
    with (before subscribing, or later and then fetched that key's mailbox once, as an inviter
    does for its invite boxes): an online inviter reads a join request at once instead of
    polling."""

    recipient: PublicKey


@message(0x55)
@dataclass(frozen=True)
class Done:
    """Success with nothing else to say (learned decision stored, mailbox items deleted)."""

    count: U32


# -- changing a group's syncnodes (issue 16) ----------------------------------------------------


@message(0x5A)
@dataclass(frozen=True)
class AdoptGroup:
    """Host a group this syncnode was added to after its genesis, and fetch its history.

    ``named`` is the decision (with its certificate) of the slot whose manifest first names this
    syncnode. The syncnode cannot verify it yet (it lacks the manifests in between): it only
    takes the syncnodes ``named`` lists as dial targets, and verifies everything it then learns
    from the genesis forward. Idempotent; sending it again with another ``named`` replaces the
    hints while the adoption is still pending. Answered with :class:`GroupRegistered`."""

    genesis: Annotated[bytes, MaxLen(256 * 1024)]
    named: Decided


@message(0x5B)
@dataclass(frozen=True)
class FetchGroupStatus:
    """How far this syncnode is with a group (for those who may read its log)."""

    group_id: GroupId


@message(0x5C)
@dataclass(frozen=True)
class GroupStatus:
    """``serving``: this syncnode's newest manifest of the group names it (an adopted group:
    once its log reached the slot that named it). ``history_complete``: it also holds every
    envelope a quorum acknowledged before it was named (a group hosted from its genesis always
    has). ``removed_slot``: the slot whose manifest dropped this syncnode, if one did."""

    group_id: GroupId
    top: U64
    serving: bool
    history_complete: bool
    envelopes: U64
    removed_slot: U64 | None = None
