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
  one, or the conservative defaults below). Schemas may not be recursive, so nesting depth is
  bounded by the schema itself; deeper input is rejected as a type mismatch.
* The pure-Python validators (:meth:`Spec.from_wire`, :func:`reference_decode`) are kept as the
  executable specification the fast decoder is tested against. They materialise the whole msgpack
  object tree before checking it, so they must never see untrusted input.

Tag ranges (keep this table current when adding messages):

* ``0x01-0x0F`` connection handshake and generic errors (:mod:`proto.messages`)
* ``0x20-0x3F`` Paxos (:mod:`proto.paxos.messages`)
* ``0x40-0x7F`` syncnode service requests/responses (later issues)
* ``0x80-0xBF`` device-to-device messages (later issues)
"""

from __future__ import annotations

import dataclasses
import enum
import re
import threading
import types
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin, get_type_hints

import msgpack
import msgspec

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
MAX_OBJECTS = 1 << 18
"""Most msgpack values (containers and scalars) one wire type may hold, counting every sequence
and map at its maximum (:func:`max_objects`); the largest today is ``DecidedPage`` (about
105,000). A decoded frame can never hold more, whatever its size."""
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

# ---------------------------------------------------------------------------------------------
# Field specs: a compiled schema node per field type
# ---------------------------------------------------------------------------------------------


class Spec:
    """A schema node: converts one Python value to/from its msgpack object form, and names the
    msgspec type that decodes exactly the values it accepts (:meth:`mirror`)."""

    def to_wire(self, value: Any) -> Any:
        raise NotImplementedError

    def from_wire(self, obj: Any, path: str) -> Any:
        """Reference validation of an already unpacked object (see :func:`reference_decode`)."""
        raise NotImplementedError

    def mirror(self) -> Any:
        """The msgspec type accepting the same msgpack values as :meth:`from_wire`. Raises
        TypeError for a bound msgspec cannot express, so such a schema is refused when it is
        declared instead of being decoded with a weaker check."""
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

    def mirror(self) -> Any:
        # msgpack carries ints in [-2**63, 2**64-1], so a bound at or beyond those ends needs no
        # check; msgspec only takes bounds that fit an int64.
        ge = self.lo if self.lo > I64_MIN else None
        le = self.hi if self.hi < U64_MAX else None
        if any(v is not None and not I64_MIN <= v <= I64_MAX for v in (ge, le)):
            raise TypeError(f"int range [{self.lo}, {self.hi}]: bounds other than the ends of "
                            "the u64 range must fit in an int64")
        return int if ge is None and le is None else Annotated[int, msgspec.Meta(ge=ge, le=le)]


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

    def mirror(self) -> Any:
        return self.enum_cls  # msgspec accepts an IntEnum's members only, and never a bool


@dataclass(frozen=True)
class BoolSpec(Spec):
    def to_wire(self, value: Any) -> Any:
        return bool(value)

    def from_wire(self, obj: Any, path: str) -> bool:
        if type(obj) is not bool:
            raise DecodeError(path, f"expected bool, got {_type_name(obj)}")
        return obj

    def mirror(self) -> Any:
        return bool


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

    def mirror(self) -> Any:
        return Annotated[bytes, msgspec.Meta(min_length=self.min_len or None,
                                             max_length=self.max_len)]


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

    def mirror(self) -> Any:
        return Annotated[str, msgspec.Meta(max_length=self.max_len)]  # in characters, like ours


@dataclass(frozen=True)
class OptSpec(Spec):
    inner: Spec

    def to_wire(self, value: Any) -> Any:
        return None if value is None else self.inner.to_wire(value)

    def from_wire(self, obj: Any, path: str) -> Any:
        return None if obj is None else self.inner.from_wire(obj, path)

    def mirror(self) -> Any:
        return Union[self.inner.mirror(), None]  # noqa: UP007  (built at run time)


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

    def mirror(self) -> Any:
        # msgspec checks the length against max_length from the array header, before any item.
        return Annotated[tuple[self.item.mirror(), ...],  # type: ignore[misc]
                         msgspec.Meta(max_length=self.max_items)]


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

    def mirror(self) -> Any:
        return Annotated[dict[self.key.mirror(), self.value.mirror()],  # type: ignore[misc]
                         msgspec.Meta(max_length=self.max_items)]


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

    def mirror(self) -> Any:
        return _mirror_struct(self.cls, None)


@dataclass(frozen=True)
class FieldSchema:
    name: str
    spec: Spec


# ---------------------------------------------------------------------------------------------
# Schema compilation
# ---------------------------------------------------------------------------------------------

_SCHEMAS: dict[type[Any], tuple[FieldSchema, ...]] = {}
_COMPILING: set[type[Any]] = set()
_LOCK = threading.RLock()
"""Held while compiling a schema or building a decoder (both cached, so rarely taken)."""
_MAX_OBJECTS: dict[type[Any], int] = {}
_MIRROR_FIELDS: dict[type[Any], tuple[tuple[str, Any], ...]] = {}


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
        key = _spec_for(k, owner)
        if not isinstance(key, StrSpec | BytesSpec):  # msgpack's strict_map_key: nothing else
            raise TypeError(f"{owner}: map keys must be str or bytes")
        return MapSpec(key, _spec_for(v, owner), mi.n if mi else DEFAULT_MAX_ITEMS)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        schema_of(tp)  # compile now: detects recursion at registration time
        return StructSpec(tp)
    raise TypeError(f"{owner}: unsupported wire type {tp!r}")


def schema_of(cls: type[Any]) -> tuple[FieldSchema, ...]:
    """The compiled field schema of a wire dataclass (cached)."""
    cached = _SCHEMAS.get(cls)
    if cached is not None:
        return cached
    with _LOCK:  # the server decodes on worker threads: _COMPILING must not see another's work
        return _compile(cls)


def _compile(cls: type[Any]) -> tuple[FieldSchema, ...]:
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
    n = 1 + sum(_max_objects(f.spec) for f in schema)
    if n > MAX_OBJECTS:
        raise TypeError(f"{cls.__name__}: up to {n} msgpack values in one message exceed "
                        f"MAX_OBJECTS ({MAX_OBJECTS}); lower a MaxItems bound")
    try:
        mirrored = tuple((f.name, f.spec.mirror()) for f in schema)
    except TypeError as exc:
        raise TypeError(f"{cls.__name__}: {exc}") from None
    _SCHEMAS[cls] = schema
    _MAX_OBJECTS[cls] = n
    _MIRROR_FIELDS[cls] = mirrored
    return schema


def _max_objects(spec: Spec) -> int:
    if isinstance(spec, StructSpec):
        return max_objects(spec.cls)
    if isinstance(spec, OptSpec):
        return _max_objects(spec.inner)
    if isinstance(spec, ListSpec):
        return 1 + spec.max_items * _max_objects(spec.item)
    if isinstance(spec, MapSpec):
        return 1 + spec.max_items * (_max_objects(spec.key) + _max_objects(spec.value))
    return 1


def max_objects(cls: type[Any]) -> int:
    """The most msgpack values (the struct's array, its fields, every item of every sequence at
    its maximum length) one encoded ``cls`` can hold: what decoding one frame can build at most."""
    schema_of(cls)
    return _MAX_OBJECTS[cls]


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
        _wire(cls, tag)  # build the decoder now: a schema msgspec cannot take fails here
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


# ---------------------------------------------------------------------------------------------
# Schema-directed decoding (msgspec mirrors of the schema)
# ---------------------------------------------------------------------------------------------

_MIRRORS: dict[tuple[type[Any], int | None], type[msgspec.Struct]] = {}
_WIRES: dict[tuple[type[Any], int | None], _Wire] = {}
_ENCODER = msgspec.msgpack.Encoder()


def _mirror_struct(cls: type[Any], tag: int | None) -> type[msgspec.Struct]:
    """The msgspec struct decoding ``cls``'s wire array: ``[tag, *fields]`` when ``tag`` is given,
    else ``[*fields]``. ``forbid_unknown_fields`` makes an array longer than the schema an error
    (msgspec would otherwise skip the extra items: parsing attacker bytes for nothing); ``gc=False``
    because these transient objects cannot form cycles."""
    key = (cls, tag)
    found = _MIRRORS.get(key)
    if found is not None:
        return found
    schema_of(cls)
    mirror = msgspec.defstruct(
        f"{cls.__name__}Wire", list(_MIRROR_FIELDS[cls]), array_like=True,
        forbid_unknown_fields=True, gc=False, tag=tag,
        module=__name__)
    return _MIRRORS.setdefault(key, mirror)


def _has_map(spec: Spec) -> bool:
    if isinstance(spec, MapSpec):
        return True
    if isinstance(spec, OptSpec):
        return _has_map(spec.inner)
    if isinstance(spec, ListSpec):
        return _has_map(spec.item)
    if isinstance(spec, StructSpec):
        return any(_has_map(f.spec) for f in schema_of(spec.cls))
    return False


class _Wire:
    """The compiled decoder of one wire type: msgspec reads and validates the bytes into the
    mirror struct, which is checked to be the canonical encoding and then converted (in C) to the
    declared dataclass, running its ``__post_init__`` checks. The conversion sets the fields and
    calls ``__post_init__`` without calling ``__init__``: wire dataclasses keep the generated
    ``__init__`` and put their checks in ``__post_init__``."""

    def __init__(self, cls: type[Any], tag: int | None) -> None:
        self.cls = cls
        self.tag = tag
        self.decoder = msgspec.msgpack.Decoder(_mirror_struct(cls, tag))
        # msgspec can only sort str keys when encoding, so a type holding a map is checked for
        # canonical form by the reference encoder (no wire type has a map today).
        self.has_map = _has_map(StructSpec(cls))

    def decode(self, data: bytes | bytearray | memoryview) -> Any:
        try:
            wire = self.decoder.decode(data)
        except msgspec.ValidationError as exc:  # a value the schema does not allow
            raise self.error(str(exc), schema=True) from None
        except msgspec.DecodeError as exc:  # not msgpack: truncated, trailing bytes, bad UTF-8
            raise DecodeError("<message>", str(exc)) from None
        except RecursionError:  # not reachable with a bounded schema; never let it escape
            raise DecodeError(self.cls.__name__, "nesting too deep") from None
        if not self.has_map and _ENCODER.encode(wire) != data:
            # Checked before conversion: the cheapest refusal, and the lowest peak memory.
            raise DecodeError(self.cls.__name__, "non-canonical encoding")
        try:
            value = msgspec.convert(wire, self.cls, from_attributes=True)
        except msgspec.ValidationError as exc:  # __post_init__ cross-field validation
            raise self.error(str(exc), schema=False) from None
        if self.has_map:
            top = StructSpec(self.cls).to_wire(value)
            if pack([self.tag, *top] if self.tag is not None else top) != bytes(data):
                raise DecodeError(self.cls.__name__, "non-canonical encoding")
        return value

    def error(self, text: str, *, schema: bool) -> DecodeError:
        """A msgspec error as ours: its ``$[2][0]`` path translated to field names and, for the
        schema's own checks, its wording in the style of the other decode errors."""
        m = _MSGSPEC_ERROR.fullmatch(text)
        assert m is not None  # the pattern matches any text
        reason, path = m["reason"], m["path"] or "$"
        if schema:
            reason = reason.replace("`object`", "map").replace("`", "")
            if reason.startswith(("Expected ", "Invalid ")):
                reason = reason[0].lower() + reason[1:]
        name = self.cls.__name__
        where, tag_slot = name, self.tag is not None
        spec: Spec = StructSpec(self.cls)
        for tok in _PATH_TOKEN.finditer(path[1:]):
            while isinstance(spec, OptSpec):
                spec = spec.inner
            index, field = tok["index"], tok["name"]
            if isinstance(spec, StructSpec):
                fields = schema_of(spec.cls)
                if field is None and index is not None:
                    i = int(index) - tag_slot
                    if i < 0:
                        return DecodeError("<tag>", reason)
                    field = fields[i].name if i < len(fields) else None
                found = [f for f in fields if f.name == field]
                if not found:
                    return DecodeError(f"{name}{path[1:]}", reason)
                where, spec = f"{where}.{field}", found[0].spec
            elif isinstance(spec, ListSpec) and index is not None:
                where, spec = f"{where}[{index}]", spec.item
            elif isinstance(spec, MapSpec):
                where, spec = f"{where}[...]", spec.value
            else:
                return DecodeError(f"{name}{path[1:]}", reason)
            tag_slot = False
        while isinstance(spec, OptSpec):
            spec = spec.inner
        if m["key"]:
            where += ".<key>"
        elif isinstance(spec, StructSpec) and (arity := _ARITY.fullmatch(reason)):
            n = len(schema_of(spec.cls))
            # msgspec counts the tag in "at least" but not in "at most"
            got = int(arity[2]) - (tag_slot if arity[1] == "least" else 0)
            reason = f"{spec.cls.__name__} has {n} fields, got {got}"
        elif isinstance(spec, EnumSpec) and reason.startswith("invalid enum value "):
            reason = f"unknown {spec.enum_cls.__name__} value {reason.rsplit(' ', 1)[1]}"
        elif isinstance(spec, IntSpec) and reason.startswith(("expected int >", "expected int <")):
            reason = f"int out of range [{spec.lo}, {spec.hi}]"
        return DecodeError(where, reason)


_MSGSPEC_ERROR = re.compile(
    r"(?s)(?P<reason>.*?)(?: - at `(?P<key>key` in `)?(?P<path>\$[^`]*)`)?")
_ARITY = re.compile(r"expected array of at (least|most) length \d+, got (\d+)")
_PATH_TOKEN = re.compile(r"\[(?P<index>\d+)\]|\[\.\.\.\]|\.(?P<name>\w+)")


def _wire(cls: type[Any], tag: int | None) -> _Wire:
    key = (cls, tag)
    found = _WIRES.get(key)
    if found is None:
        with _LOCK:
            found = _WIRES.get(key)
            if found is None:
                found = _WIRES[key] = _Wire(cls, tag)
    return found


# ---------------------------------------------------------------------------------------------
# Top-level decoding
# ---------------------------------------------------------------------------------------------


def _check_size(data: Any, max_bytes: int) -> None:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError("<message>", f"expected bytes, got {_type_name(data)}")
    if len(data) > max_bytes:
        raise DecodeError("<message>", f"{len(data)} bytes exceed the maximum of {max_bytes}")


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


def _peek_tag(data: bytes | bytearray | memoryview) -> int:
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


def _registered(tag: int) -> type[Any]:
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
    _check_size(data, max_bytes)
    cls = _registered(_peek_tag(data))
    if only is not None and cls not in only:
        raise DecodeError("<tag>", f"{cls.__name__} is not expected here")
    return _wire(cls, _TAG_OF[cls]).decode(data)


def decode_as(data: bytes, cls: type[T], *, max_bytes: int = MAX_MESSAGE_BYTES) -> T:
    """Decode and require a particular message type (for request/response pairs); a message of
    another type is refused from its tag, before its body is read."""
    _check_size(data, max_bytes)
    got = _registered(_peek_tag(data))
    if got is not cls:
        raise DecodeError("<tag>", f"expected {cls.__name__}, got {got.__name__}")
    return _wire(cls, _TAG_OF[cls]).decode(data)  # type: ignore[no-any-return]


def decode_struct(data: bytes, cls: type[T], *, max_bytes: int = MAX_MESSAGE_BYTES) -> T:
    """Decode an unregistered wire dataclass encoded with :func:`encode_struct`."""
    _check_size(data, max_bytes)
    return _wire(cls, None).decode(data)  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------------------------
# Reference decoder (the executable specification; tests only)
# ---------------------------------------------------------------------------------------------


def _unpack(data: bytes, max_bytes: int) -> Any:
    _check_size(data, max_bytes)
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


def reference_decode(data: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> Any:
    """What :func:`decode` accepts, written plainly: unpack everything, then validate it with
    :meth:`Spec.from_wire`. The tests hold :func:`decode` to the same accept/reject decisions.
    Unpacking before validating lets hostile input allocate ~70x its size: never use it on
    anything that came from outside."""
    obj = _unpack(data, max_bytes)
    if type(obj) is not list or not obj:
        raise DecodeError("<message>", "expected a non-empty array [tag, ...]")
    tag = obj[0]
    if type(tag) is not int:
        raise DecodeError("<tag>", f"expected int tag, got {_type_name(tag)}")
    cls = _registered(tag)
    msg = StructSpec(cls).from_wire(obj[1:], cls.__name__)
    # Checked after field validation so errors name the field when a value is simply invalid.
    _check_canonical(to_wire(msg), data, cls.__name__)
    return msg


def reference_decode_struct(data: bytes, cls: type[T], *,
                            max_bytes: int = MAX_MESSAGE_BYTES) -> T:
    """:func:`decode_struct` written plainly (see :func:`reference_decode`)."""
    obj = _unpack(data, max_bytes)
    value = StructSpec(cls).from_wire(obj, cls.__name__)
    _check_canonical(StructSpec(cls).to_wire(value), data, cls.__name__)
    return value  # type: ignore[no-any-return]
