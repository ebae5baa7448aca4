"""Hypothesis strategies derived from the wire schema, so every message type is covered: valid
messages, and hostile frames aimed at the decoder (object-count bombs, type confusion, huge
declared lengths, mutations of valid messages)."""

from __future__ import annotations

from typing import Any

import msgpack
from hypothesis import strategies as st

from proto import codec


def for_spec(spec: codec.Spec, *, max_blob: int = 64, max_list: int = 4
             ) -> st.SearchStrategy[Any]:
    def rec(s: codec.Spec) -> st.SearchStrategy[Any]:
        return for_spec(s, max_blob=max_blob, max_list=max_list)

    if isinstance(spec, codec.IntSpec):
        return st.integers(spec.lo, spec.hi)
    if isinstance(spec, codec.BoolSpec):
        return st.booleans()
    if isinstance(spec, codec.EnumSpec):
        return st.sampled_from(list(spec.enum_cls))
    if isinstance(spec, codec.BytesSpec):
        top = max(spec.min_len, min(spec.max_len, max_blob))
        return st.binary(min_size=spec.min_len, max_size=top)
    if isinstance(spec, codec.StrSpec):
        return st.text(max_size=min(spec.max_len, max_blob))
    if isinstance(spec, codec.OptSpec):
        return st.none() | rec(spec.inner)
    if isinstance(spec, codec.ListSpec):
        return st.lists(rec(spec.item), max_size=min(spec.max_items, max_list)).map(tuple)
    if isinstance(spec, codec.MapSpec):
        top = min(spec.max_items, max_list)
        return st.dictionaries(rec(spec.key), rec(spec.value), max_size=top)
    if isinstance(spec, codec.StructSpec):
        return for_struct(spec.cls, max_blob=max_blob, max_list=max_list)
    raise TypeError(f"no strategy for {spec!r}")


def for_struct(cls: type[Any], **kw: Any) -> st.SearchStrategy[Any]:
    fields = {f.name: for_spec(f.spec, **kw) for f in codec.schema_of(cls)}

    def build(values: dict[str, Any]) -> Any:
        try:
            return cls(**values)
        except (ValueError, TypeError):
            return None  # cross-field validation rejected this combination

    return st.fixed_dictionaries(fields).map(build).filter(lambda v: v is not None)


def any_message() -> st.SearchStrategy[Any]:
    return st.sampled_from(sorted(codec.registered_messages().items())).flatmap(
        lambda item: for_struct(item[1]))


# ---------------------------------------------------------------------------------------------
# Hostile frames. Each strategy yields raw bytes; a decoder must either return a valid message
# or raise DecodeError, and must never build more than the schema allows while doing so.
# ---------------------------------------------------------------------------------------------


def packb(obj: Any) -> bytes:
    out = msgpack.packb(obj, use_bin_type=True)
    assert isinstance(out, bytes)
    return out


def array_header(n: int) -> bytes:
    """A msgpack array header announcing ``n`` items (the items must follow)."""
    if n < 16:
        return bytes([0x90 | n])
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def map_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x80 | n])
    if n < 1 << 16:
        return b"\xde" + n.to_bytes(2, "big")
    return b"\xdf" + n.to_bytes(4, "big")


@st.composite
def object_bomb(draw: st.DrawFn) -> bytes:
    """Many cheap msgpack values: wide (an array of arrays of empty arrays or maps, or of tiny
    ints), deep (nested one-item arrays) or both, up to about 256 KiB. Built from bytes because
    building them as Python objects would cost what decoding them naively costs."""
    leaf = draw(st.sampled_from([b"\x90", b"\x80", b"\x01", b"\xc0", b"\xa0", b"\xc4\x00"]))
    shape = draw(st.sampled_from(["wide", "deep", "deep-wide"]))
    if shape == "wide":
        outer = draw(st.integers(1, 16))
        inner = draw(st.integers(0, 1 << 14))
        return array_header(outer) + (array_header(inner) + leaf * inner) * outer
    if shape == "deep":
        depth = draw(st.integers(1, 1 << 16))
        return b"\x91" * depth + leaf
    depth = draw(st.integers(1, 64))
    width = draw(st.integers(1, 1 << 12))
    return b"\x92" * depth + array_header(width) + leaf * width + b"\xc0" * depth


def _every_type() -> st.SearchStrategy[Any]:
    """One value of each msgpack type, small or at a size boundary."""
    return st.one_of(
        st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(),
        st.binary(max_size=40), st.text(max_size=40),
        st.lists(st.integers(0, 300), max_size=20), st.just([[], [], []]),
        st.dictionaries(st.text(max_size=3), st.integers(-(2**63), 2**64 - 1), max_size=3),
        st.just(msgpack.ExtType(1, b"x")), st.just(msgpack.ExtType(127, b"\x00" * 12)),
    )


@st.composite
def type_confusion(draw: st.DrawFn) -> bytes:
    """A registered message with one field (at any depth of its first instance) replaced by a
    value of another msgpack type, or by a bomb spliced in as raw bytes."""
    msg = draw(any_message())
    wire = codec.to_wire(msg)
    # collect paths to every value in the object tree
    paths: list[tuple[int, ...]] = []

    def walk(obj: Any, path: tuple[int, ...]) -> None:
        if path:
            paths.append(path)
        if isinstance(obj, list):
            for i, v in enumerate(obj):
                walk(v, (*path, i))

    walk(wire, ())
    path = draw(st.sampled_from(paths))
    parent = wire
    for i in path[:-1]:
        parent = parent[i]
    marker = "\x00bomb-goes-here\x00"
    splice = draw(st.booleans())
    parent[path[-1]] = marker if splice else draw(_every_type())
    raw = packb(wire)
    if splice:
        raw = raw.replace(packb(marker), draw(object_bomb()), 1)
    return raw


@st.composite
def huge_declared_length(draw: st.DrawFn) -> bytes:
    """A valid message with one array/map/bin/str header rewritten to announce up to 2**32-1
    items or bytes, with or without that much behind it."""
    raw = bytearray(codec.encode(draw(any_message())))
    n = draw(st.sampled_from([2**16 - 1, 2**16, 2**31, 2**32 - 1]))
    op = draw(st.sampled_from([b"\xdd", b"\xdf", b"\xc6", b"\xdb"]))
    at = draw(st.integers(0, len(raw)))
    tail = draw(st.sampled_from([b"", b"\x90" * 64, b"\x00" * 64]))
    return bytes(raw[:at] + op + n.to_bytes(4, "big") + tail + raw[at:])


@st.composite
def mutated_message(draw: st.DrawFn) -> bytes:
    """A valid message with a few bytes flipped, inserted, deleted, or the tail cut."""
    raw = bytearray(codec.encode(draw(any_message())))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        i = draw(st.integers(0, max(0, len(raw) - 1)))
        if kind == "flip" and raw:
            raw[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and raw:
            raw[i] = draw(st.integers(0, 255))
        elif kind == "insert":
            raw[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete" and raw:
            del raw[i:i + draw(st.integers(1, 8))]
        elif kind == "truncate":
            del raw[i:]
    return bytes(raw)


def hostile_frame() -> st.SearchStrategy[bytes]:
    """Any of the hostile shapes above, or plain random bytes."""
    return st.one_of(object_bomb(), type_confusion(), huge_declared_length(), mutated_message(),
                     st.binary(max_size=256))
