"""The reference decoder: what :func:`proto.codec.decode` accepts, written plainly.

It unpacks the whole msgpack object tree with msgpack, then validates it with
:meth:`proto.codec.specs.Spec.from_wire` and checks the input is the canonical encoding. The
tests hold the fast decoder (:mod:`proto.codec.wire`) to the same accept/reject decisions and
values, and ``scripts/bench_codec.py --reference`` measures it as the decoder before issue 14.

Unpacking before validating lets hostile input allocate ~70x its size: nothing that came from
outside may ever be decoded with it. It has a module of its own so that the decoding path
(:mod:`proto.codec.wire`, :mod:`proto.codec.registry`) never depends on it.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgpack

from proto.codec.bounds import MAX_MESSAGE_BYTES
from proto.codec.registry import registered, to_wire
from proto.codec.schema import StructSpec
from proto.codec.specs import type_name
from proto.codec.wire import check_size, pack
from proto.errors import DecodeError

T = TypeVar("T")


def _unpack(data: bytes, max_bytes: int) -> Any:
    check_size(data, max_bytes)
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
        raise DecodeError("<tag>", f"expected int tag, got {type_name(tag)}")
    cls = registered(tag)
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
