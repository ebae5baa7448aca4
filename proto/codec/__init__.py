"""Typed MessagePack wire codec.

Every protocol message is a frozen dataclass registered with :func:`message` under a stable numeric
tag. On the wire a message is the MessagePack array ``[tag, field1, field2, ...]`` (fields in
declaration order; nested structs are arrays without a tag). Field types carry their bounds as
``typing.Annotated`` metadata, so one declaration gives the Python type, the encoder, the
validating decoder and (in the tests) the Hypothesis strategy::

    @message(0x01)
    @dataclass(frozen=True)
    class Hello:
        versions: Annotated[tuple[int, ...], MaxItems(8)]
        agent: Annotated[str, MaxLen(128)]

Why this shape:

* Decoding untrusted bytes is the most exposed code in the project, and it runs before any
  authentication. The decoder therefore reads the bytes *against the schema*: each declaration is
  mirrored once as a ``msgspec`` struct type (see :meth:`Spec.mirror`), and msgspec's C decoder
  checks every value's type and bound as it reads it, refusing a sequence that is too long from its
  header and any value of the wrong type at its first byte. A frame can therefore never make the
  node build objects the schema does not allow (a frame of nested empty arrays used to cost 70
  times its size before the first check). Errors are :class:`proto.errors.DecodeError` naming the
  field; no library exception escapes.
* The number of objects one frame can produce is bounded by the schema alone: every sequence and
  map has a maximum, schemas may not be recursive, and :func:`schema_of` refuses a type whose
  worst case exceeds :data:`MAX_OBJECTS` (see :func:`max_objects`). Together with the input size
  this bounds what decoding any frame can cost.
* Encodings are **canonical** (dict keys sorted, smallest int forms — msgpack's own choice) and the
  decoder rejects any non-canonical input. A decoded message therefore has exactly one byte
  representation, which is what signatures and hashes are computed over: nobody can re-encode a
  signed record into different bytes that still verify.
* Unbounded types are not allowed: every ``bytes``/``str``/sequence/map has a maximum (an explicit
  one, or the conservative defaults in :mod:`proto.codec.bounds`). Schemas may not be recursive,
  so nesting depth is bounded by the schema itself; deeper input is rejected as a type mismatch.
* The pure-Python validators (:meth:`Spec.from_wire`, :func:`reference_decode`) are kept as the
  executable specification the fast decoder is tested against. They materialise the whole msgpack
  object tree before checking it, so they must never see untrusted input.

Tag ranges (keep this table current when adding messages):

* ``0x01-0x0F`` connection handshake and generic errors (:mod:`proto.messages`)
* ``0x20-0x3F`` Paxos (:mod:`proto.paxos.messages`); its fast path took ``0x66``/``0x67``
  (``AcceptLeased``, ``AcceptedLeased``) from the range below
* ``0x40-0x7F`` syncnode service requests/responses (later issues)
* ``0x80-0xBF`` device-to-device messages (later issues)

Where each part lives (each module imports only the ones above it):

* :mod:`proto.codec.bounds`: the declaration vocabulary (``MaxLen``, ``Len``, ``MaxItems``,
  ``Range``, ``U64``, ``Hash32``...) and the codec's limits.
* :mod:`proto.codec.specs`: one schema node per field type, with its encoder, its msgspec mirror
  and its reference validator side by side.
* :mod:`proto.codec.schema`: compiling a dataclass into its schema (and refusing a bad one),
  nested structs, the object-count bound, the msgspec mirror struct.
* :mod:`proto.codec.wire`: canonical encoding and the schema-directed decoder of one type.
* :mod:`proto.codec.registry`: tags; ``encode``/``decode``/``decode_as`` of top-level messages.
* :mod:`proto.codec.reference`: the reference decoder (tests and benchmarks only).

This package re-exports the public names, so callers import from ``proto.codec`` alone.
"""

from __future__ import annotations

from proto.codec.bounds import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_ITEMS,
    DEFAULT_MAX_STR,
    MAX_MESSAGE_BYTES,
    MAX_OBJECTS,
    U8,
    U16,
    U32,
    U64,
    U64_MAX,
    Hash32,
    Len,
    MaxItems,
    MaxLen,
    PublicKey,
    Range,
    Signature64,
)
from proto.codec.reference import reference_decode, reference_decode_struct
from proto.codec.registry import (
    decode,
    decode_as,
    encode,
    message,
    registered_messages,
    tag_of,
    to_wire,
)
from proto.codec.schema import FieldSchema, StructSpec, max_objects, schema_of
from proto.codec.specs import (
    BoolSpec,
    BytesSpec,
    EnumSpec,
    IntSpec,
    ListSpec,
    MapSpec,
    OptSpec,
    Spec,
    StrSpec,
)
from proto.codec.wire import decode_struct, encode_struct, pack

__all__ = [
    "DEFAULT_MAX_BYTES", "DEFAULT_MAX_ITEMS", "DEFAULT_MAX_STR", "MAX_MESSAGE_BYTES",
    "MAX_OBJECTS", "U8", "U16", "U32", "U64", "U64_MAX", "BoolSpec", "BytesSpec", "EnumSpec",
    "FieldSchema", "Hash32", "IntSpec", "Len", "ListSpec", "MapSpec", "MaxItems", "MaxLen",
    "OptSpec", "PublicKey", "Range", "Signature64", "Spec", "StrSpec", "StructSpec", "decode",
    "decode_as", "decode_struct", "encode", "encode_struct", "max_objects", "message", "pack",
    "reference_decode", "reference_decode_struct", "registered_messages", "schema_of", "tag_of",
    "to_wire",
]
