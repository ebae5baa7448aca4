"""Schema nodes: what one field type accepts, seen three ways.

Each :class:`Spec` is compiled once from a field's annotation (:mod:`proto.codec.schema`) and
answers for that type in three places that must agree:

* :meth:`Spec.to_wire`: the msgpack object form the encoder packs;
* :meth:`Spec.mirror`: the msgspec type that decodes exactly the values the spec accepts, so the
  fast decoder (:mod:`proto.codec.wire`) checks every bound while it reads;
* :meth:`Spec.from_wire`: the plain-Python validation of an unpacked object, the executable
  specification the fast decoder is tested against (:mod:`proto.codec.reference`).

They sit side by side in one class per type so that a change to one view is made next to the
other two. The nested-struct node lives in :mod:`proto.codec.schema`, because it needs the
compiled schema of its dataclass.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Annotated, Any, Union

import msgspec

from proto.codec.bounds import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_ITEMS,
    DEFAULT_MAX_STR,
    I64_MAX,
    I64_MIN,
    U64_MAX,
)
from proto.errors import DecodeError


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


def type_name(obj: object) -> str:
    return type(obj).__name__


@dataclass(frozen=True)
class IntSpec(Spec):
    lo: int = 0
    hi: int = U64_MAX

    def to_wire(self, value: Any) -> Any:
        return int(value)

    def from_wire(self, obj: Any, path: str) -> int:
        if type(obj) is not int:  # bool is an int subclass: refuse it explicitly
            raise DecodeError(path, f"expected int, got {type_name(obj)}")
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
            raise DecodeError(path, f"expected int enum, got {type_name(obj)}")
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
            raise DecodeError(path, f"expected bool, got {type_name(obj)}")
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
            raise DecodeError(path, f"expected bytes, got {type_name(obj)}")
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
            raise DecodeError(path, f"expected str, got {type_name(obj)}")
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
            raise DecodeError(path, f"expected array, got {type_name(obj)}")
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
            raise DecodeError(path, f"expected map, got {type_name(obj)}")
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
