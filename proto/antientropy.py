"""Anti-entropy between the syncnodes of a group: what they exchange to find out, cheaply,
whether their copies of the group's envelopes differ, and the rule that turns a peer's
summary into the ranges to fetch (sans-IO; :mod:`syncnode.reconcile` drives it).

Two steps, so that a group whose copies agree costs one small answer and no envelope:

1. :class:`FetchDigests` for up to :data:`MAX_DIGESTS` groups at once: per group, a 16-byte
   digest of the per-sender summaries (:func:`group_digest`). Equal digests: nothing to do.
   A group the peer leaves out is one it does not host, or does not let the asker read.
2. For a group whose digest differs, :class:`FetchMarks`: the peer's per-sender summary
   (:class:`SenderMark`). :func:`backfill_marks` compares it with ours and gives the
   watermarks of an ordinary ``Backfill`` that returns what we may lack: for each sender whose
   copies differ, everything above our *contiguous* mark (so a seq missing below our own top
   is fetched again, and ones above it that we hold come back and are ignored).

Tags ``0x5D``, ``0x5E``, ``0x5F``, ``0x84``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, NamedTuple

from proto.codec import U64, Hash32, Len, MaxItems, message
from proto.paxos.messages import GroupId

MAX_DIGESTS = 256
"""Groups one :class:`FetchDigests` may ask about."""
MAX_SENDERS = 4096
"""Senders one :class:`Marks` lists (a ``Backfill`` lists at most as many watermarks)."""
DIGEST_BYTES = 16


class Summary(NamedTuple):
    """One sender's envelopes as a syncnode holds them (mirrors the storage's summary)."""

    envelopes: int
    top: int
    contiguous: int
    setsum: int


@dataclass(frozen=True)
class SenderMark:
    sender: Hash32
    count: U64
    top: U64
    contiguous: U64
    setsum: U64


@dataclass(frozen=True)
class GroupDigest:
    group_id: GroupId
    digest: Annotated[bytes, Len(DIGEST_BYTES)]
    envelopes: U64


@message(0x5D)
@dataclass(frozen=True)
class FetchDigests:
    """The digest of each listed group's envelopes (for the groups' own syncnodes and
    members; the others are left out, hosted or not, like ``FetchHeads``)."""

    group_ids: Annotated[tuple[GroupId, ...], MaxItems(MAX_DIGESTS)]


@message(0x5E)
@dataclass(frozen=True)
class Digests:
    digests: Annotated[tuple[GroupDigest, ...], MaxItems(MAX_DIGESTS)]


@message(0x5F)
@dataclass(frozen=True)
class FetchMarks:
    """The per-sender summary of one group's envelopes (who may read the group's log)."""

    group_id: GroupId


@message(0x84)
@dataclass(frozen=True)
class Marks:
    """``senders``: the first :data:`MAX_SENDERS` senders by id; ``more`` when there were
    more (the rest are then compared at a later round, after the first ones are in sync)."""

    group_id: GroupId
    senders: Annotated[tuple[SenderMark, ...], MaxItems(MAX_SENDERS)]
    more: bool = False


def group_digest(summary: Mapping[bytes, Summary]) -> bytes:
    """The digest two syncnodes compare: equal exactly when they hold the same envelopes (the
    same count, top and set sum for every sender), up to a hash collision."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES, person=b"syncnode-ae-v1")
    for sender in sorted(summary):
        s = summary[sender]
        h.update(sender + s.envelopes.to_bytes(8, "big") + s.top.to_bytes(8, "big")
                 + s.setsum.to_bytes(8, "big"))
    return h.digest()


def marks_of(summary: Mapping[bytes, Summary]) -> tuple[tuple[SenderMark, ...], bool]:
    """The :class:`Marks` senders for a summary, and whether some were cut."""
    senders = sorted(summary)
    return (tuple(SenderMark(s, *summary[s]) for s in senders[:MAX_SENDERS]),
            len(senders) > MAX_SENDERS)


def backfill_marks(ours: Mapping[bytes, Summary], theirs: tuple[SenderMark, ...]
                   ) -> dict[bytes, int] | None:
    """The watermarks of a ``Backfill`` to the peer that returns every envelope it holds and
    we may lack, or None when it holds nothing we lack (then no request at all).

    A sender whose summaries agree, or whose every seq the peer holds is within our
    contiguous run, gets the peer's top (nothing comes back for it); any other, our
    contiguous mark. Every sender of ``theirs`` is listed: a ``Backfill`` returns everything of
    a sender it does not list."""
    out: dict[bytes, int] = {}
    wanted = False
    for m in theirs:
        mine = ours.get(m.sender)
        contiguous = mine.contiguous if mine is not None else 0
        same = mine is not None and (mine.envelopes, mine.top, mine.setsum) == \
            (m.count, m.top, m.setsum)
        if same or m.top <= contiguous or m.count == 0:
            out[m.sender] = m.top
        else:
            out[m.sender] = contiguous
            wanted = True
    return out if wanted else None
