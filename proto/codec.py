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

* Decoding untrusted bytes is the most exposed code in the project. The decoder checks every value
  against the schema and raises :class:`proto.errors.DecodeError` naming the field; msgpack is
  called with hard limits and its exceptions never escape.
* Encodings are **canonical** (dict keys sorted, smallest int forms — msgpack's own choice) and the
  decoder rejects any non-canonical input. A decoded message therefore has exactly one byte
  representation, which is what signatures and hashes are computed over: nobody can re-encode a
  signed record into different bytes that still verify.
* Unbounded types are not allowed: every ``bytes``/``str``/sequence/map has a maximum (an explicit
  one, or the conservative defaults below). Schemas may not be recursive, so nesting depth is
  bounded by the schema itself; deeper input is rejected as a type mismatch.

Tag ranges (keep this table current when adding messages):

* ``0x01-0x0F`` connection handshake and generic errors (:mod:`proto.messages`)
* ``0x20-0x3F`` Paxos (:mod:`proto.paxos.messages`)
* ``0x40-0x7F`` syncnode service requests/responses (later issues)
* ``0x80-0xBF`` device-to-device messages (later issues)
"""

from __future__ import annotations

import dataclasses
import enum
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin, get_type_hints

import msgpack

from proto.errors import DecodeError

# ---------------------------------------------------------------------------------------------
# Bounds, attached to field types with typing.Annotated
# ---------------------------------------------------------------------------------------------

U64_MAX = 2**64 - 1
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
"""Default bound of a ``bytes`` field: the default maximum frame size."""
DEFAULT_MAX_STR = 4096
DEFAULT_MAX_ITEMS = 4096
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Hard cap for :func:`decode` input regardless of the caller's frame limit."""


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

# ---------------------------------------------------------------------------------------------
# Field specs: a compiled schema node per field type
# ---------------------------------------------------------------------------------------------


class Spec:
    """A schema node: converts one Python value to/from its msgpack object form."""

    def to_wire(self, value: Any) -> Any:
        raise NotImplementedError

    def from_wire(self, obj: Any, path: str) -> Any:
        raise NotImplementedError


def _type_name(obj: object) -> str:
    return type(obj).__name__


@dataclass(frozen=True)
class IntSpec(Spec):
    lo: int = 0
    hi: int = U64_MAX

    def to_wire(self, value: Any) -> Any:
        return int(value)

    def from_wire(self, obj: Any, path: str) -> int:
        if type(obj) is not int:  # bool is an int subclass: refuse it explicitly
            raise DecodeError(path, f"expected int, got {_type_name(obj)}")
        if not self.lo <= obj <= self.hi:
            raise DecodeError(path, f"int {obj} out of range [{self.lo}, {self.hi}]")
        return obj


@dataclass(frozen=True)
class EnumSpec(Spec):
    enum_cls: type[enum.IntEnum]

    def to_wire(self, value: Any) -> Any:
        return int(value)

    def from_wire(self, obj: Any, path: str) -> enum.IntEnum:
        if type(obj) is not int:
            raise DecodeError(path, f"expected int enum, got {_type_name(obj)}")
        try:
            return self.enum_cls(obj)
        except ValueError:
            raise DecodeError(path, f"unknown {self.enum_cls.__name__} value {obj}") from None


@dataclass(frozen=True)
class BoolSpec(Spec):
    def to_wire(self, value: Any) -> Any:
        return bool(value)

    def from_wire(self, obj: Any, path: str) -> bool:
        if type(obj) is not bool:
            raise DecodeError(path, f"expected bool, got {_type_name(obj)}")
        return obj


@dataclass(frozen=True)
class BytesSpec(Spec):
    min_len: int = 0
    max_len: int = DEFAULT_MAX_BYTES

    def to_wire(self, value: Any) -> Any:
        return bytes(value)

    def from_wire(self, obj: Any, path: str) -> bytes:
        if type(obj) is not bytes:
            raise DecodeError(path, f"expected bytes, got {_type_name(obj)}")
        if not self.min_len <= len(obj) <= self.max_len:
            if self.min_len == self.max_len:
                raise DecodeError(path, f"expected exactly {self.max_len} bytes, got {len(obj)}")
            raise DecodeError(
                path, f"length {len(obj)} outside [{self.min_len}, {self.max_len}] bytes"
            )
        return obj


@dataclass(frozen=True)
class StrSpec(Spec):
    max_len: int = DEFAULT_MAX_STR

    def to_wire(self, value: Any) -> Any:
        return str(value)

    def from_wire(self, obj: Any, path: str) -> str:
        if type(obj) is not str:
            raise DecodeError(path, f"expected str, got {_type_name(obj)}")
        if len(obj) > self.max_len:
            raise DecodeError(path, f"string of {len(obj)} chars exceeds {self.max_len}")
        return obj


@dataclass(frozen=True)
class OptSpec(Spec):
    inner: Spec

    def to_wire(self, value: Any) -> Any:
        return None if value is None else self.inner.to_wire(value)

    def from_wire(self, obj: Any, path: str) -> Any:
        return None if obj is None else self.inner.from_wire(obj, path)


@dataclass(frozen=True)
class ListSpec(Spec):
    item: Spec
    max_items: int = DEFAULT_MAX_ITEMS

    def to_wire(self, value: Any) -> Any:
        return [self.item.to_wire(v) for v in value]

    def from_wire(self, obj: Any, path: str) -> tuple[Any, ...]:
        if type(obj) is not list:
            raise DecodeError(path, f"expected array, got {_type_name(obj)}")
        if len(obj) > self.max_items:
            raise DecodeError(path, f"{len(obj)} items exceed the maximum of {self.max_items}")
        return tuple(self.item.from_wire(v, f"{path}[{i}]") for i, v in enumerate(obj))


@dataclass(frozen=True)
class MapSpec(Spec):
    key: Spec
    value: Spec
    max_items: int = DEFAULT_MAX_ITEMS

    def to_wire(self, value: Any) -> Any:
        items = [(self.key.to_wire(k), self.value.to_wire(v)) for k, v in value.items()]
        items.sort(key=lambda kv: kv[0])  # canonical: sorted keys
        return dict(items)

    def from_wire(self, obj: Any, path: str) -> dict[Any, Any]:
        if type(obj) is not dict:
            raise DecodeError(path, f"expected map, got {_type_name(obj)}")
        if len(obj) > self.max_items:
            raise DecodeError(path, f"{len(obj)} entries exceed the maximum of {self.max_items}")
        out: dict[Any, Any] = {}
        for k, v in obj.items():
            key = self.key.from_wire(k, f"{path}.<key>")
            out[key] = self.value.from_wire(v, f"{path}[{key!r}]")
        return out


@dataclass(frozen=True)
class StructSpec(Spec):
    """A nested message: encoded as an array of its fields (no tag, the schema knows the type)."""

    cls: type[Any]

    def to_wire(self, value: Any) -> Any:
        if type(value) is not self.cls:
            raise TypeError(f"expected {self.cls.__name__}, got {type(value).__name__}")
        return [f.spec.to_wire(getattr(value, f.name)) for f in schema_of(self.cls)]

    def from_wire(self, obj: Any, path: str) -> Any:
        fields = schema_of(self.cls)
        if type(obj) is not list:
            raise DecodeError(path, f"expected {self.cls.__name__} array, got {_type_name(obj)}")
        if len(obj) != len(fields):
            raise DecodeError(
                path, f"{self.cls.__name__} has {len(fields)} fields, got {len(obj)}"
            )
        kwargs = {f.name: f.spec.from_wire(v, f"{path}.{f.name}")
                  for f, v in zip(fields, obj, strict=True)}
        try:
            return self.cls(**kwargs)
        except (ValueError, TypeError) as exc:  # __post_init__ cross-field validation
            raise DecodeError(path, str(exc)) from None


@dataclass(frozen=True)
class FieldSchema:
    name: str
    spec: Spec


# ---------------------------------------------------------------------------------------------
# Schema compilation
# ---------------------------------------------------------------------------------------------

_SCHEMAS: dict[type[Any], tuple[FieldSchema, ...]] = {}
_COMPILING: set[type[Any]] = set()


def _spec_for(tp: Any, owner: str) -> Spec:
    meta: tuple[Any, ...] = ()
    if get_origin(tp) is Annotated:
        tp, *rest = get_args(tp)
        meta = tuple(rest)

    def bound(kind: type[Any]) -> Any:
        found = [m for m in meta if isinstance(m, kind)]
        return found[-1] if found else None

    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        members = [a for a in get_args(tp) if a is not type(None)]
        if len(members) != 1 or len(get_args(tp)) != 2:
            raise TypeError(f"{owner}: only Optional[X] unions are supported")
        inner_tp = Annotated[(members[0], *meta)] if meta else members[0]
        return OptSpec(_spec_for(inner_tp, owner))
    if tp is bool:
        return BoolSpec()
    if isinstance(tp, type) and issubclass(tp, enum.IntEnum):
        return EnumSpec(tp)
    if tp is int:
        r = bound(Range)
        return IntSpec(r.lo, r.hi) if r else IntSpec()
    if tp is bytes:
        exact, mx = bound(Len), bound(MaxLen)
        if exact:
            return BytesSpec(exact.n, exact.n)
        return BytesSpec(0, mx.n if mx else DEFAULT_MAX_BYTES)
    if tp is str:
        mx = bound(MaxLen)
        return StrSpec(mx.n if mx else DEFAULT_MAX_STR)
    if origin is tuple:
        args = get_args(tp)
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"{owner}: sequences must be declared as tuple[X, ...]")
        mi = bound(MaxItems)
        return ListSpec(_spec_for(args[0], owner), mi.n if mi else DEFAULT_MAX_ITEMS)
    if origin is dict:
        k, v = get_args(tp)
        mi = bound(MaxItems)
        return MapSpec(
            _spec_for(k, owner), _spec_for(v, owner), mi.n if mi else DEFAULT_MAX_ITEMS
        )
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        schema_of(tp)  # compile now: detects recursion at registration time
        return StructSpec(tp)
    raise TypeError(f"{owner}: unsupported wire type {tp!r}")


def schema_of(cls: type[Any]) -> tuple[FieldSchema, ...]:
    """The compiled field schema of a wire dataclass (cached)."""
    cached = _SCHEMAS.get(cls)
    if cached is not None:
        return cached
    if cls in _COMPILING:
        raise TypeError(f"{cls.__name__}: recursive wire types are not allowed (unbounded depth)")
    if not (dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen):  # type: ignore[attr-defined]
        raise TypeError(f"{cls.__name__}: wire types must be frozen dataclasses")
    _COMPILING.add(cls)
    try:
        hints = get_type_hints(cls, include_extras=True)
        schema = tuple(
            FieldSchema(f.name, _spec_for(hints[f.name], f"{cls.__name__}.{f.name}"))
            for f in dataclasses.fields(cls)
        )
    finally:
        _COMPILING.discard(cls)
    _SCHEMAS[cls] = schema
    return schema


# ---------------------------------------------------------------------------------------------
# Message registry and top-level encode/decode
# ---------------------------------------------------------------------------------------------

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


def encode_struct(value: Any) -> bytes:
    """Canonical bytes of an unregistered wire dataclass (for hashing/signing records)."""
    return pack(StructSpec(type(value)).to_wire(value))


def pack(obj: Any) -> bytes:
    out = msgpack.packb(obj, use_bin_type=True)
    assert isinstance(out, bytes)
    return out


def _unpack(data: bytes, max_bytes: int) -> Any:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError("<message>", f"expected bytes, got {_type_name(data)}")
    if len(data) > max_bytes:
        raise DecodeError("<message>", f"{len(data)} bytes exceed the maximum of {max_bytes}")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_bin_len=max_bytes,
            max_str_len=max_bytes,
            max_array_len=min(max_bytes, 1 << 20),
            max_map_len=min(max_bytes, 1 << 20),
            max_ext_len=0,
        )
    except msgpack.ExtraData:
        raise DecodeError("<message>", "trailing bytes after message") from None
    except RecursionError:
        raise DecodeError("<message>", "nesting too deep") from None
    except (ValueError, msgpack.UnpackException) as exc:
        # All of msgpack's input errors are ValueErrors: incomplete input, FormatError,
        # StackError (nesting bomb), invalid UTF-8, non-str/bytes map keys, ext types.
        raise DecodeError("<message>", f"malformed msgpack ({type(exc).__name__})") from None


def _check_canonical(obj: Any, data: bytes | bytearray | memoryview, what: str) -> None:
    if pack(obj) != bytes(data):
        raise DecodeError(what, "non-canonical encoding")


def decode(data: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> Any:
    """Decode one message from exactly ``data``; any defect raises :class:`DecodeError`."""
    obj = _unpack(data, max_bytes)
    if type(obj) is not list or not obj:
        raise DecodeError("<message>", "expected a non-empty array [tag, ...]")
    tag = obj[0]
    if type(tag) is not int:
        raise DecodeError("<tag>", f"expected int tag, got {_type_name(tag)}")
    cls = _BY_TAG.get(tag)
    if cls is None:
        raise DecodeError("<tag>", f"unknown message tag {tag:#x}")
    msg = StructSpec(cls).from_wire(obj[1:], cls.__name__)
    # Checked after field validation so errors name the field when a value is simply invalid.
    _check_canonical(to_wire(msg), data, cls.__name__)
    return msg


def decode_as(data: bytes, cls: type[T], *, max_bytes: int = MAX_MESSAGE_BYTES) -> T:
    """Decode and require a particular message type (for request/response pairs)."""
    msg = decode(data, max_bytes=max_bytes)
    if type(msg) is not cls:
        raise DecodeError("<tag>", f"expected {cls.__name__}, got {type(msg).__name__}")
    return msg


def decode_struct(data: bytes, cls: type[T], *, max_bytes: int = MAX_MESSAGE_BYTES) -> T:
    """Decode an unregistered wire dataclass encoded with :func:`encode_struct`."""
    obj = _unpack(data, max_bytes)
    value = StructSpec(cls).from_wire(obj, cls.__name__)
    _check_canonical(StructSpec(cls).to_wire(value), data, cls.__name__)
    return value  # type: ignore[no-any-return]
