"""A wire dataclass's schema: compiled once from its annotations, bounded, and mirrored for msgspec.

:func:`schema_of` turns a frozen dataclass into a tuple of :class:`FieldSchema` (one
:class:`proto.codec.specs.Spec` per field) and caches it. Compiling is where a declaration is
judged, so a bad one fails when its module is imported rather than on the first frame: unbounded
or unsupported types, recursive types (whose nesting depth would be unbounded), and types whose
worst case exceeds :data:`MAX_OBJECTS` values (:func:`max_objects`) are refused here.

The msgspec struct a type is decoded through (:func:`mirror_struct`) is built here too, from the
field mirrors recorded while compiling: it is the same schema in msgspec's terms, and a nested
struct field (:class:`StructSpec`) mirrors to it.

The server decodes on worker threads, so compiling (and building decoders, in
:mod:`proto.codec.wire`) happens under :data:`LOCK`; both are cached, so it is rarely taken.
"""

from __future__ import annotations

import dataclasses
import enum
import threading
import types
from dataclasses import dataclass
from typing import Annotated, Any, Union, get_args, get_origin, get_type_hints

import msgspec

from proto.codec.bounds import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_ITEMS,
    DEFAULT_MAX_STR,
    MAX_OBJECTS,
    Len,
    MaxItems,
    MaxLen,
    Range,
)
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
    type_name,
)
from proto.errors import DecodeError


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
            raise DecodeError(path, f"expected {self.cls.__name__} array, got {type_name(obj)}")
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
        return mirror_struct(self.cls, None)


@dataclass(frozen=True)
class FieldSchema:
    name: str
    spec: Spec


# ---------------------------------------------------------------------------------------------
# Schema compilation
# ---------------------------------------------------------------------------------------------

_SCHEMAS: dict[type[Any], tuple[FieldSchema, ...]] = {}
_COMPILING: set[type[Any]] = set()
LOCK = threading.RLock()
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
    with LOCK:  # the server decodes on worker threads: _COMPILING must not see another's work
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
# msgspec mirror structs
# ---------------------------------------------------------------------------------------------

_MIRRORS: dict[tuple[type[Any], int | None], type[msgspec.Struct]] = {}


def mirror_struct(cls: type[Any], tag: int | None) -> type[msgspec.Struct]:
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
