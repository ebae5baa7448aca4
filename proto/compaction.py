"""Compaction points: what a group's log records about a committed whole-document state.

A member seals the whole document as a ``STATE`` payload (an envelope of its own, stored on a
quorum of syncnodes), then commits a manifest whose ``compaction`` field is a
:class:`CompactionPoint`: the per-sender vector the state covers, which envelope holds it
(``state_sender``, ``state_seq``, the envelope's ``digest``), the hash of its plaintext body
and the CRDT version of the state. Once that value is decided:

* **syncnodes** delete every envelope the vector covers except the state envelope, and serve
  the state first to a device whose watermarks are below it (:mod:`syncnode.compaction`), so
  a group's storage stays about one state plus the updates since;
* **members** check the state against what they hold (:mod:`device.compaction`); a point that
  is proven wrong raises the ``bad-compaction`` alarm with evidence, and nothing on a device
  is ever dropped because of a point (devices keep sending their own edits, whatever their
  seq; syncnodes acknowledge a covered one without storing it again).

The rule (:func:`check_transition`) runs in :func:`proto.manifest.validate_transition`, on
syncnodes and devices alike. It needs no secrets, so it checks only form and order: a point
is decoded within bounds, names the committer's own envelope as the state, covers that
envelope itself, and covers at least what the previous point covered (monotone: a syncnode
has deleted those envelopes already). Readers send nothing, so they never compact. A manifest
that does not change the point carries the previous one forward unchanged
(:func:`proto.manifest.next_manifest`), so the newest manifest always holds the latest point.

This module imports neither :mod:`proto.manifest` nor :mod:`proto.payload` (both import it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated

from proto.codec import U64, Hash32, MaxItems, MaxLen, decode_as, encode, message
from proto.errors import DecodeError
from proto.paxos.messages import Decided

MAX_SENDERS = 1000
"""Senders a point may name (every device that ever sent, removed ones included)."""
MAX_VERSION = 16 * 1024
"""Bytes of the encoded CRDT version (Loro: about 12 bytes per peer)."""
MAX_POINT_BYTES = 64 * 1024
"""The bound of ``Manifest.compaction``: 1000 senders at 41 bytes plus the version fit."""


@dataclass(frozen=True)
class Covered:
    """Sender ``sender``'s seqs ``1..seq`` are in the state."""

    sender: Hash32
    seq: U64


@message(0x64)
@dataclass(frozen=True)
class CompactionPoint:
    covered: Annotated[tuple[Covered, ...], MaxItems(MAX_SENDERS)]
    """Sorted by sender, one entry per sender, every seq >= 1."""
    state_sender: Hash32
    """The committer: the state is its own envelope."""
    state_seq: U64
    """Seq of the state envelope; ``covered[state_sender]`` is exactly this."""
    state_digest: Hash32
    """:meth:`proto.envelope.Envelope.digest` of the state envelope (syncnodes check the
    envelope they keep against it)."""
    body_hash: Hash32
    """:func:`body_hash` of the STATE payload's body (members check what they decrypted, or a
    state they got another way, against it)."""
    version: Annotated[bytes, MaxLen(MAX_VERSION)]
    """The CRDT version (encoded version vector) of the state."""

    def vector(self) -> dict[bytes, int]:
        return {c.sender: c.seq for c in self.covered}

    def encode(self) -> bytes:
        return encode(self)

    @staticmethod
    def decode(data: bytes) -> CompactionPoint:
        return decode_as(data, CompactionPoint)


@message(0x65)
@dataclass(frozen=True)
class CompactionEvidence:
    """What a member holds when it finds a decided point wrong (the ``bad-compaction``
    alarm's evidence): the decision (certificate, and the committer's signed manifest with the
    point), and what the member observed against it. ``sender``/``seq`` name the update (or
    the state envelope) concerned, ``observed_version`` its CRDT version; for a state whose
    payload contradicts the point, ``observed_vector`` and ``observed_body_hash`` are what the
    decrypted state really covers and hashes to. Members can re-check it with their own keys;
    outsiders see who signed what."""

    decided: Decided
    reason: Annotated[str, MaxLen(512)]
    sender: Hash32
    seq: U64
    observed_version: Annotated[bytes, MaxLen(MAX_VERSION)]
    observed_vector: Annotated[tuple[Covered, ...], MaxItems(MAX_SENDERS)]
    observed_body_hash: Hash32 | None


def body_hash(body: bytes) -> bytes:
    return hashlib.blake2b(body, digest_size=32, person=b"syncnode-cstate").digest()


def make_point(vector: Mapping[bytes, int], state_sender: bytes, state_seq: int,
               state_digest: bytes, body: bytes, version: bytes) -> CompactionPoint:
    """The point for a state envelope ``(state_sender, state_seq)`` covering ``vector``
    (which must name the state envelope itself)."""
    covered = tuple(Covered(s, q) for s, q in sorted(vector.items()) if q > 0)
    return CompactionPoint(covered, state_sender, state_seq, state_digest, body_hash(body),
                           version)


class CompactionError(Exception):
    """A manifest's compaction point breaks a rule (``proto.manifest`` turns it into a
    :class:`~proto.manifest.ManifestError`); ``not_allowed`` when the signer may not
    compact at all."""

    def __init__(self, detail: str, *, not_allowed: bool = False) -> None:
        super().__init__(detail)
        self.detail = detail
        self.not_allowed = not_allowed


def decode_point(raw: bytes | None) -> CompactionPoint | None:
    """The point in a manifest's ``compaction`` field (None: the group never compacted).
    Raises :class:`CompactionError` for a malformed one."""
    if raw is None:
        return None
    try:
        return CompactionPoint.decode(raw)
    except DecodeError as exc:
        raise CompactionError(f"malformed compaction point: {exc}") from None


def check_form(point: CompactionPoint) -> None:
    senders = [c.sender for c in point.covered]
    if senders != sorted(set(senders)):
        raise CompactionError("covered senders must be sorted and unique")
    if any(c.seq < 1 for c in point.covered):
        raise CompactionError("covered seqs count from 1")
    if point.vector().get(point.state_sender) != point.state_seq or point.state_seq < 1:
        raise CompactionError("the point must cover its own state envelope")


def covers(new: Mapping[bytes, int], old: Mapping[bytes, int]) -> bool:
    """Whether vector ``new`` covers at least everything ``old`` does."""
    return all(new.get(s, 0) >= q for s, q in old.items())


def check_transition(prev_raw: bytes | None, new_raw: bytes | None, signer: bytes, *,
                     signer_may_send: bool) -> CompactionPoint | None:
    """Raise :class:`CompactionError` unless a manifest may carry ``new_raw`` after one that
    carried ``prev_raw``: unchanged, or a well-formed point committed by a member that may
    send (not a reader), naming its own envelope as the state, covering at least the
    previous point. Returns the new point when it changed (None when unchanged). Cost: two
    bounded decodes and a pass over at most 2 x :data:`MAX_SENDERS` entries."""
    if new_raw == prev_raw:
        return None
    if new_raw is None:
        raise CompactionError("a compaction point cannot be dropped")
    if not signer_may_send:
        raise CompactionError("readers do not compact", not_allowed=True)
    new = decode_point(new_raw)
    assert new is not None
    check_form(new)
    if new.state_sender != signer:
        raise CompactionError("the state must be the committer's own envelope")
    prev = decode_point(prev_raw)
    if prev is not None:
        if not covers(new.vector(), prev.vector()):
            raise CompactionError("a compaction point must cover the previous one")
        if new.state_seq <= prev.vector().get(new.state_sender, 0):
            # Syncnodes may have deleted that envelope already under the previous point.
            raise CompactionError("the state envelope must be newer than the previous point")
    return new
