"""Reading the public parts of an MLS commit (RFC 9420 section 6-12), without any MLS secrets.

Syncnodes are not group members, yet they must check that a proposed commit matches its signed
manifest: the epoch it was made in, the committing member's leaf, and which members it adds and
removes. Commits are sent as ``PublicMessage`` (the binding's default for handshake messages), so
these fields are readable with a small parser of the TLS presentation language. Members get the
same facts from MLS itself and compare them too.

Only what validation needs is extracted; everything else is skipped by its declared length. The
parser is strict: every length is bounded by the input, unknown wire formats/proposal types are
refused, and any inconsistency raises :class:`proto.errors.DecodeError` (never IndexError).
"""

from __future__ import annotations

from dataclasses import dataclass

from proto.errors import DecodeError

MLS10 = 1
WIRE_PUBLIC_MESSAGE = 1
SENDER_MEMBER = 1
CONTENT_COMMIT = 3
PROPOSAL_BY_VALUE = 1
PROPOSAL_BY_REFERENCE = 2

ADD, UPDATE, REMOVE, PSK, REINIT, EXTERNAL_INIT, GROUP_CONTEXT_EXTENSIONS = range(1, 8)
CREDENTIAL_BASIC = 1
LEAF_SOURCE_KEY_PACKAGE, LEAF_SOURCE_UPDATE, LEAF_SOURCE_COMMIT = 1, 2, 3


@dataclass(frozen=True)
class CommitInfo:
    """The public facts of one commit."""

    group_id: bytes
    epoch: int
    sender_leaf: int
    added_signature_keys: tuple[bytes, ...]
    """Signature public keys of the members added, in proposal order."""
    removed_leaves: tuple[int, ...]
    has_path: bool
    other_proposals: tuple[int, ...]
    """Types of proposals other than add/remove (update, PSK, ...), for the caller to refuse."""


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def fail(self, reason: str) -> DecodeError:
        return DecodeError(f"mls@{self.pos}", reason)

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise self.fail(f"needs {n} bytes, {len(self.data) - self.pos} left")
        out = bytes(self.data[self.pos:self.pos + n])
        self.pos += n
        return out

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def varint(self) -> int:
        """RFC 9000 variable-length integer, as RFC 9420 uses for vector lengths (max 2^30)."""
        first = self.uint(1)
        prefix = first >> 6
        if prefix == 3:
            raise self.fail("invalid vector length prefix")
        value = first & 0x3F
        for _ in range((1 << prefix) - 1):
            value = (value << 8) | self.uint(1)
        if prefix and value < (1 << (8 * (1 << (prefix - 1)) - 2)):
            raise self.fail("non-minimal vector length")
        return value

    def opaque(self) -> bytes:
        return self.take(self.varint())

    def sub(self) -> _Reader:
        """A reader over the next length-prefixed vector (and skip it here)."""
        return _Reader(self.opaque())

    def optional(self) -> bool:
        flag = self.uint(1)
        if flag > 1:
            raise self.fail("optional flag not 0/1")
        return flag == 1

    def done(self) -> bool:
        return self.pos == len(self.data)


def _leaf_node(r: _Reader) -> bytes:
    """Parse a LeafNode; return its signature key."""
    r.opaque()  # encryption_key
    signature_key = r.opaque()
    credential_type = r.uint(2)
    if credential_type == CREDENTIAL_BASIC:
        r.opaque()  # identity
    else:
        r.opaque()  # x509 certificate chain or other: one vector
    for _ in range(5):  # capabilities: versions, cipher_suites, extensions, proposals, credentials
        r.opaque()
    source = r.uint(1)
    if source == LEAF_SOURCE_KEY_PACKAGE:
        r.take(16)  # lifetime not_before, not_after
    elif source == LEAF_SOURCE_COMMIT:
        r.opaque()  # parent_hash
    elif source != LEAF_SOURCE_UPDATE:
        raise r.fail(f"unknown leaf node source {source}")
    r.opaque()  # extensions
    r.opaque()  # signature
    return signature_key


def _key_package(r: _Reader) -> bytes:
    """Parse a KeyPackage; return the signature key of its leaf."""
    version = r.uint(2)
    if version != MLS10:
        raise r.fail(f"key package version {version}")
    r.uint(2)  # cipher suite
    r.opaque()  # init_key
    key = _leaf_node(r)
    r.opaque()  # extensions
    r.opaque()  # signature
    return key


def parse_commit(data: bytes) -> CommitInfo:
    """Parse an ``MLSMessage`` carrying a ``PublicMessage`` commit from a member."""
    r = _Reader(data)
    if r.uint(2) != MLS10:
        raise r.fail("not an MLS 1.0 message")
    if r.uint(2) != WIRE_PUBLIC_MESSAGE:
        raise r.fail("not a PublicMessage (commits must be sent in plaintext framing)")
    group_id = r.opaque()
    epoch = r.uint(8)
    if r.uint(1) != SENDER_MEMBER:
        raise r.fail("commit sender is not a member")
    sender_leaf = r.uint(4)
    r.opaque()  # authenticated_data
    if r.uint(1) != CONTENT_COMMIT:
        raise r.fail("content is not a commit")
    proposals = r.sub()
    added: list[bytes] = []
    removed: list[int] = []
    others: list[int] = []
    while not proposals.done():
        kind = proposals.uint(1)
        if kind == PROPOSAL_BY_REFERENCE:
            proposals.opaque()
            others.append(0)  # by reference: contents unknown to a non-member
            continue
        if kind != PROPOSAL_BY_VALUE:
            raise proposals.fail(f"unknown ProposalOrRef type {kind}")
        ptype = proposals.uint(2)
        if ptype == ADD:
            added.append(_key_package(proposals))
        elif ptype == REMOVE:
            removed.append(proposals.uint(4))
        elif ptype == UPDATE:
            _leaf_node(proposals)
            others.append(ptype)
        else:
            # The other proposal types are never produced by the device agent; their bodies
            # are not self-delimiting without the full grammar, so stop here and refuse.
            others.append(ptype)
            break
    has_path = r.optional()
    return CommitInfo(group_id, epoch, sender_leaf, tuple(added), tuple(removed), has_path,
                      tuple(others))
