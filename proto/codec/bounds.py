"""The vocabulary of a wire declaration: the bounds a field type carries and the codec's limits.

A wire dataclass states each field's bound with ``typing.Annotated`` metadata (``MaxLen``,
``Len``, ``MaxItems``, ``Range``), or uses one of the common field types below. These are plain
values with no behaviour: :mod:`proto.codec.schema` reads them when it compiles a declaration,
so every module that declares messages depends on this small module alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

U64_MAX = 2**64 - 1
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
"""Default bound of a ``bytes`` field: the default maximum frame size."""
DEFAULT_MAX_STR = 4096
DEFAULT_MAX_ITEMS = 4096
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Hard cap for :func:`proto.codec.decode` input regardless of the caller's frame limit."""
MAX_OBJECTS = 1 << 18
"""Most msgpack values (containers and scalars) one wire type may hold, counting every sequence
and map at its maximum (:func:`proto.codec.max_objects`); the largest today is ``DecidedPage``
(about 105,000). A decoded frame can never hold more, whatever its size."""
I64_MIN, I64_MAX = -(2**63), 2**63 - 1


@dataclass(frozen=True)
class MaxLen:
    """Maximum length of a ``bytes`` (in bytes) or ``str`` (in characters) field."""

    n: int


@dataclass(frozen=True)
class Len:
    """Exact length of a ``bytes`` field (keys, hashes, signatures)."""

    n: int


@dataclass(frozen=True)
class MaxItems:
    """Maximum number of elements of a sequence or map field."""

    n: int


@dataclass(frozen=True)
class Range:
    """Inclusive range of an ``int`` field (default ``0..2**64-1``)."""

    lo: int
    hi: int


# Common field types.
Hash32 = Annotated[bytes, Len(32)]
PublicKey = Annotated[bytes, Len(32)]
Signature64 = Annotated[bytes, Len(64)]
U8 = Annotated[int, Range(0, 255)]
U16 = Annotated[int, Range(0, 2**16 - 1)]
U32 = Annotated[int, Range(0, 2**32 - 1)]
U64 = Annotated[int, Range(0, U64_MAX)]
