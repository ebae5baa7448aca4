"""The plaintext inside an MLS application message (tags ``0x80-0x8F``).

The envelope around it is public (syncnodes check its signature and store it by
``(group, sender, seq)``); this payload is only ever seen by members. It repeats
``(sender, seq)`` so a receiver can check that the envelope matches the MLS-authenticated sender,
and carries what the engine needs for **causal delivery** (DESIGN.md): the sender's dependency
vector. Kinds:

* ``UPDATE``: CRDT updates made by the sender. Deliverable once the sender's previous payload
  and every dependency in ``deps`` are delivered.
* ``STATE``: a CRDT diff covering the vector ``deps`` (everything the sender had applied). It is
  self-contained: delivering it marks all of ``deps`` as delivered. Members send it to answer a
  ``SYNC_REQUEST``; it is how a device that joined later (and so cannot decrypt older epochs)
  gets the document.
* ``SYNC_REQUEST``: "here is what I have (``deps``, and the CRDT version in ``body``); send me
  what I lack".
* ``DOC_INVITE``: an admin offers the members a new document with the same members and roles;
  ``body`` is a :class:`proto.doc_offer.DocOffer` (not compressed). Goes through causal
  delivery like the others; not CRDT content.

``body`` of UPDATE/STATE is zlib-compressed (MLS pads ciphertexts, so compressing first pays).
"""

from __future__ import annotations

import enum
import zlib
from dataclasses import dataclass
from typing import Annotated

from proto.codec import U64, Hash32, MaxItems, MaxLen, decode_as, encode, message
from proto.envelope import MAX_CIPHERTEXT
from proto.errors import DecodeError
from proto.manifest import MAX_DEVICES

MAX_BODY = MAX_CIPHERTEXT - 64 * 1024
MAX_UPDATES = 4096


class PayloadKind(enum.IntEnum):
    UPDATE = 1
    STATE = 2
    SYNC_REQUEST = 3
    DOC_INVITE = 4


@dataclass(frozen=True)
class Dep:
    sender: Hash32
    seq: U64


@message(0x80)
@dataclass(frozen=True)
class Payload:
    kind: PayloadKind
    sender: Hash32
    seq: U64
    deps: Annotated[tuple[Dep, ...], MaxItems(MAX_DEVICES)]
    backend: Annotated[str, MaxLen(32)]
    body: Annotated[bytes, MaxLen(MAX_BODY)]

    def encode(self) -> bytes:
        return encode(self)

    @staticmethod
    def decode(data: bytes) -> Payload:
        return decode_as(data, Payload)

    def vector(self) -> dict[bytes, int]:
        return {d.sender: d.seq for d in self.deps}


@dataclass(frozen=True)
class _Updates:
    updates: Annotated[tuple[Annotated[bytes, MaxLen(MAX_BODY)], ...], MaxItems(MAX_UPDATES)]


def pack_updates(updates: list[bytes]) -> bytes:
    """Coalesce several CRDT updates into one compressed body."""
    from proto.codec import encode_struct

    return zlib.compress(encode_struct(_Updates(tuple(updates))), 6)


def unpack_updates(body: bytes) -> tuple[bytes, ...]:
    """Inverse of :func:`pack_updates`; bounded, raises :class:`DecodeError`."""
    from proto.codec import decode_struct

    try:
        d = zlib.decompressobj()
        raw = d.decompress(body, MAX_BODY + 1)
    except zlib.error as exc:
        raise DecodeError("Payload.body", f"not zlib data: {exc}") from None
    if len(raw) > MAX_BODY or d.unconsumed_tail:
        raise DecodeError("Payload.body", "decompresses beyond the size limit")
    return decode_struct(raw, _Updates).updates


def vector_deps(vector: dict[bytes, int], *, exclude: bytes | None = None) -> tuple[Dep, ...]:
    return tuple(Dep(s, q) for s, q in sorted(vector.items()) if q > 0 and s != exclude)
