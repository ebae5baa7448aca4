"""One wire type's bytes: canonical encoding, and the decoder that reads against the schema.

Encoding is msgpack's own (``use_bin_type``; dict keys sorted by :class:`MapSpec`, smallest int
forms), which is what makes it canonical: one value, one byte string, the bytes signatures and
hashes are computed over.

Decoding untrusted bytes is the most exposed code in the project and runs before any
authentication, so :class:`WireDecoder` never materialises what the schema does not allow:
msgspec's C decoder reads the bytes into the type's mirror struct
(:func:`proto.codec.schema.mirror_struct`), checking every value's type and bound as it reaches
it, and refusing an over-long sequence from its header. Only then is the input compared with the
canonical encoding and converted to the declared dataclass. msgspec's errors are translated to
:class:`proto.errors.DecodeError` naming the field in our terms (:meth:`WireDecoder.error`); no
library exception escapes.

Tags are not handled here: :mod:`proto.codec.registry` picks the type from a frame's tag and
asks this module for that type's decoder.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgpack
import msgspec

from proto.codec.bounds import MAX_MESSAGE_BYTES
from proto.codec.schema import LOCK, StructSpec, mirror_struct, schema_of
from proto.codec.specs import EnumSpec, IntSpec, ListSpec, MapSpec, OptSpec, Spec, type_name
from proto.errors import DecodeError

T = TypeVar("T")

# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------


def encode_struct(value: Any) -> bytes:
    """Canonical bytes of an unregistered wire dataclass (for hashing/signing records)."""
    return pack(StructSpec(type(value)).to_wire(value))


def pack(obj: Any) -> bytes:
    out = msgpack.packb(obj, use_bin_type=True)
    assert isinstance(out, bytes)
    return out


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------

_WIRES: dict[tuple[type[Any], int | None], WireDecoder] = {}
_ENCODER = msgspec.msgpack.Encoder()


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


class WireDecoder:
    """The compiled decoder of one wire type: msgspec reads and validates the bytes into the
    mirror struct, which is checked to be the canonical encoding and then converted (in C) to the
    declared dataclass, running its ``__post_init__`` checks. The conversion sets the fields and
    calls ``__post_init__`` without calling ``__init__``: wire dataclasses keep the generated
    ``__init__`` and put their checks in ``__post_init__``."""

    def __init__(self, cls: type[Any], tag: int | None) -> None:
        self.cls = cls
        self.tag = tag
        self.decoder = msgspec.msgpack.Decoder(mirror_struct(cls, tag))
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


def wire_decoder(cls: type[Any], tag: int | None) -> WireDecoder:
    key = (cls, tag)
    found = _WIRES.get(key)
    if found is None:
        with LOCK:
            found = _WIRES.get(key)
            if found is None:
                found = _WIRES[key] = WireDecoder(cls, tag)
    return found


def check_size(data: Any, max_bytes: int) -> None:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError("<message>", f"expected bytes, got {type_name(data)}")
    if len(data) > max_bytes:
        raise DecodeError("<message>", f"{len(data)} bytes exceed the maximum of {max_bytes}")


def decode_struct(data: bytes, cls: type[T], *, max_bytes: int = MAX_MESSAGE_BYTES) -> T:
    """Decode an unregistered wire dataclass encoded with :func:`encode_struct`."""
    check_size(data, max_bytes)
    return wire_decoder(cls, None).decode(data)  # type: ignore[no-any-return]
