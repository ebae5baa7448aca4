"""Top-level messages: the tag registry, and encoding and decoding by tag.

A top-level message is a wire dataclass registered with :func:`message` under a stable tag; on
the wire it is ``[tag, *fields]``. Decoding reads the tag from the frame's first bytes
(:func:`peek_tag`) and hands the rest to that one type's decoder, so a frame is never parsed
against any schema but its own, and a caller expecting particular types (``only``,
:func:`decode_as`) refuses the others from the tag, before their bodies are read.

Registering builds the type's decoder at once: a schema msgspec cannot take fails when its
module is imported, not on the first frame.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any, TypeVar

from proto.codec.bounds import MAX_MESSAGE_BYTES
from proto.codec.schema import StructSpec, schema_of
from proto.codec.wire import check_size, pack, wire_decoder
from proto.errors import DecodeError

_BY_TAG: dict[int, type[Any]] = {}
_TAG_OF: dict[type[Any], int] = {}

T = TypeVar("T")


def message(tag: int) -> Callable[[type[T]], type[T]]:
    """Register a frozen dataclass as a top-level wire message with a stable ``tag``."""
    if not 0 < tag <= 0xFFFF:
        raise ValueError(f"tag {tag} out of range")

    def register(cls: type[T]) -> type[T]:
        if tag in _BY_TAG and _BY_TAG[tag] is not cls:
            raise ValueError(f"tag {tag:#x} already used by {_BY_TAG[tag].__name__}")
        schema_of(cls)
        wire_decoder(cls, tag)  # build the decoder now: a schema msgspec cannot take fails here
        _BY_TAG[tag] = cls
        _TAG_OF[cls] = tag
        return cls

    return register


def tag_of(cls: type[Any]) -> int:
    return _TAG_OF[cls]


def registered_messages() -> Mapping[int, type[Any]]:
    """All registered message classes by tag (used by tests to cover every type)."""
    return dict(_BY_TAG)


def to_wire(msg: Any) -> Any:
    """The msgpack object form of a registered message (``[tag, *fields]``)."""
    cls = type(msg)
    tag = _TAG_OF.get(cls)
    if tag is None:
        raise TypeError(f"{cls.__name__} is not a registered wire message")
    return [tag, *StructSpec(cls).to_wire(msg)]


def encode(msg: Any) -> bytes:
    """Canonical bytes of a registered message."""
    return pack(to_wire(msg))


_INT_WIDTHS = {0xCC: (1, False), 0xCD: (2, False), 0xCE: (4, False), 0xCF: (8, False),
               0xD0: (1, True), 0xD1: (2, True), 0xD2: (4, True), 0xD3: (8, True)}


def _wire_type(op: int) -> str:
    """The msgpack type a first byte announces (for error messages)."""
    if op <= 0x7F or op >= 0xE0 or op in _INT_WIDTHS:
        return "int"
    if 0x80 <= op <= 0x8F or op in (0xDE, 0xDF):
        return "map"
    if 0x90 <= op <= 0x9F or op in (0xDC, 0xDD):
        return "array"
    if 0xA0 <= op <= 0xBF or op in (0xD9, 0xDA, 0xDB):
        return "str"
    names = {0xC0: "nil", 0xC2: "bool", 0xC3: "bool", 0xC4: "bytes", 0xC5: "bytes",
             0xC6: "bytes", 0xCA: "float", 0xCB: "float"}
    return names.get(op, "ext" if op != 0xC1 else "invalid byte")


def peek_tag(data: bytes | bytearray | memoryview) -> int:
    """The tag of ``[tag, ...]`` read from the first bytes, so that the message's own decoder
    (and nothing else) reads the rest."""
    n = len(data)
    if n == 0:
        raise DecodeError("<message>", "empty input")
    op = data[0]
    if 0x91 <= op <= 0x9F:
        pos = 1
    elif op in (0xDC, 0xDD) and n >= (3 if op == 0xDC else 5):
        pos = 3 if op == 0xDC else 5
        if not any(data[1:pos]):
            raise DecodeError("<message>", "expected a non-empty array [tag, ...]")
    elif op in (0xDC, 0xDD):
        raise DecodeError("<message>", "input data was truncated")
    else:
        raise DecodeError("<message>", "expected a non-empty array [tag, ...]")
    if pos >= n:
        raise DecodeError("<message>", "input data was truncated")
    op = data[pos]
    if op <= 0x7F:
        return op
    if op >= 0xE0:
        return op - 0x100
    width = _INT_WIDTHS.get(op)
    if width is None:
        raise DecodeError("<tag>", f"expected int tag, got {_wire_type(op)}")
    size, signed = width
    if pos + 1 + size > n:
        raise DecodeError("<message>", "input data was truncated")
    return int.from_bytes(data[pos + 1:pos + 1 + size], "big", signed=signed)


def registered(tag: int) -> type[Any]:
    cls = _BY_TAG.get(tag)
    if cls is None:
        raise DecodeError("<tag>", f"unknown message tag {tag:#x}")
    return cls


def decode(data: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES,
           only: Collection[type[Any]] | None = None) -> Any:
    """Decode one message from exactly ``data``; any defect raises :class:`DecodeError`.

    The tag selects the message type; that type's decoder then reads the rest against its
    schema, so a value of the wrong type or a sequence over its bound is refused when it is
    reached, before anything after it is read. ``only`` (e.g. the request types a server
    answers) refuses every other type from its tag, before its body is read: a stranger then
    cannot make a server decode a large response type."""
    check_size(data, max_bytes)
    cls = registered(peek_tag(data))
    if only is not None and cls not in only:
        raise DecodeError("<tag>", f"{cls.__name__} is not expected here")
    return wire_decoder(cls, _TAG_OF[cls]).decode(data)


def decode_as(data: bytes, cls: type[T], *, max_bytes: int = MAX_MESSAGE_BYTES) -> T:
    """Decode and require a particular message type (for request/response pairs); a message of
    another type is refused from its tag, before its body is read."""
    check_size(data, max_bytes)
    got = registered(peek_tag(data))
    if got is not cls:
        raise DecodeError("<tag>", f"expected {cls.__name__}, got {got.__name__}")
    return wire_decoder(cls, _TAG_OF[cls]).decode(data)  # type: ignore[no-any-return]
